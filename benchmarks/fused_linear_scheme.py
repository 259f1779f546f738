"""Why FusedLinearKDLoss is "chunked vendor GEMMs + the fused KD kernel": a measurement.

For each shape it times, in one process on one device:
  * the 4 GEMMs of the loss alone (student logits, teacher logits, grad hidden, grad weight),
    full size, the floor any scheme must pay;
  * the fused KD kernel alone on the full N x V logits (what a blockwise kernel would fuse);
  * FusedLinearKDLoss forward + backward at several chunk sizes and at the automatic one.
The ratio (fused loss) / (4 GEMMs) is what the scheme costs above the work no scheme avoids; on a
GPU it should stay <= 1.15, since the KD kernel is memory-bound there and the GEMMs run at
tensor-core rate. The kernel's share of the time bounds what a fully blockwise kernel could save.

    python benchmarks/fused_linear_scheme.py --device cpu --out benchmarks/results/fused-linear-scheme-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

import fastkd
from fastkd.logit.fused_linear import auto_chunk_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(n, h, vocab, dtype, device, repeats, chunks):
    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_()
    ws = (torch.randn(vocab, h, device=device, dtype=dtype, generator=g) / math.sqrt(h))
    ws.requires_grad_()
    ht = torch.randn(n, h, device=device, dtype=dtype, generator=g)
    wt = torch.randn(vocab, h, device=device, dtype=dtype, generator=g) / math.sqrt(h)
    y = torch.randint(0, vocab, (n,), device=device, generator=g)
    kw = dict(temperature=2.0, divergence="jsd", hard_weight=1.0)

    def gemms():
        s = hs.detach() @ ws.detach().t()
        t = ht @ wt.t()
        gh = s @ ws.detach()  # same shapes as grad_s @ W and grad_s.T @ h
        gw = s.t() @ hs.detach()
        return t, gh, gw

    s_full = (hs.detach() @ ws.detach().t()).requires_grad_()
    t_full = ht @ wt.t()

    def kernel():
        loss = fastkd.functional.kd_loss(s_full, t_full, y, **kw)
        loss.backward()
        s_full.grad = None

    row = {"N": n, "H": h, "V": vocab, "dtype": str(dtype).replace("torch.", ""),
           "gemms_ms": timeit(gemms, device, repeats), "kd_kernel_ms": timeit(kernel, device,
                                                                               repeats)}
    del s_full, t_full
    elem = torch.finfo(dtype).bits // 8
    auto = auto_chunk_size(n, vocab, 4 * elem, device)
    row["auto_chunk"] = auto
    row["fused"] = {}
    for chunk in sorted(set([c for c in chunks if c < n] + [auto])):
        fn = fastkd.FusedLinearKDLoss(chunk_size=chunk, **kw)

        def step():
            fn(hs, ws, ht, wt, y).backward()
            hs.grad = ws.grad = None
        row["fused"][str(chunk)] = timeit(step, device, repeats)
    best = min(row["fused"].values())
    row["fused_auto_vs_gemms"] = row["fused"][str(auto)] / row["gemms_ms"]
    row["fused_best_vs_gemms"] = best / row["gemms_ms"]
    row["kernel_share_of_fused"] = row["kd_kernel_ms"] / row["fused"][str(auto)]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None,
                    help="N:H:V,... (default: CPU 512:1024:32000,2048:1024:32000; "
                         "CUDA 8192:4096:128256,32768:4096:128256)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: CPU float32, "
                                                  "CUDA bfloat16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes or ("8192:4096:128256,32768:4096:128256" if device.type == "cuda"
                             else "512:1024:32000,2048:1024:32000")
    rows = []
    for spec in shapes.split(","):
        n, h, vocab = (int(x) for x in spec.split(":"))
        row = measure(n, h, vocab, dtype, device, args.repeats, [64, 256, 1024, 4096])
        rows.append(row)
        fused = ", ".join(f"chunk {c}: {t:.0f} ms" for c, t in row["fused"].items())
        print(f"N={n} H={h} V={vocab} {row['dtype']}: 4 GEMMs {row['gemms_ms']:.0f} ms, KD "
              f"kernel {row['kd_kernel_ms']:.0f} ms, fused {fused} (auto {row['auto_chunk']}); "
              f"fused/GEMMs {row['fused_auto_vs_gemms']:.2f}x", flush=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
