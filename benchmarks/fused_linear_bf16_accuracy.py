"""Accuracy (and speed) of FusedLinearKDLoss with low-precision lm_heads.

For each divergence: the gradients of the fused loss (student hidden, weight, bias; teacher hidden,
weight, bias) against the float64 gradients of the *exact* logits (materialised, autograd), as a
ratio to the rounding floor: the error of rounding that exact gradient to the parameter dtype.
A ratio of 1 is the best any implementation returning gradients in that dtype can do.

    python benchmarks/fused_linear_bf16_accuracy.py --n 512 --h 128 --v 32000 --dtype bfloat16
    python benchmarks/fused_linear_bf16_accuracy.py --time-only --h 1024 --repeats 7

Results: benchmarks/results/fused-linear-bf16-accuracy.md.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

import fastkd
from fastkd.functional import fused_linear_kd_loss, kd_loss

NAMES = ("hs", "ws", "bs", "ht", "wt", "bt")


def make_inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa
    return {"hs": r(n, h), "ws": r(v, h, scale=2 / math.sqrt(h)), "bs": r(v),
            "ht": r(n, h), "wt": r(v, h, scale=3 / math.sqrt(h)), "bt": r(v),
            "y": torch.randint(0, v, (n,), generator=g)}


def exact_grads(x, kw):
    """float64 gradients of the loss of the exact (unrounded) logits."""
    p = {k: x[k].double().requires_grad_() for k in NAMES}
    s = torch.addmm(p["bs"], p["hs"], p["ws"].t())
    t = torch.addmm(p["bt"], p["ht"], p["wt"].t())
    kd_loss(s, t, x["y"], backend="reference", **kw).backward()
    return {k: p[k].grad for k in NAMES}


def fused_grads(x, kw, backend, chunk=None):
    p = {k: x[k].clone().requires_grad_() for k in NAMES}
    loss = fused_linear_kd_loss(p["hs"], p["ws"], p["ht"], p["wt"], x["y"], p["bs"], p["bt"],
                                backend=backend, chunk_size=chunk, **kw)
    loss.backward()
    return {k: p[k].grad for k in NAMES}


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def floor_ratios(x, ref, got):
    """{name: (fused error / rounding floor, rounding floor)}."""
    dtype = x["hs"].dtype
    return {k: (rel(got[k], ref[k]) / rel(ref[k].to(dtype), ref[k]), rel(ref[k].to(dtype), ref[k]))
            for k in NAMES}


#: The backward GEMMs that split the float32 logit gradient in each emulated CUDA variant.
CUDA_VARIANTS = {"cuda": None, "cuda-split": {"hidden": True, "weight": True},
                 "cuda-round": {"hidden": False, "weight": False}}


def variant_grads(x, kw, backend, variant):
    """``cpu``: the code as it runs. ``cuda*``: the CUDA GEMM scheme run on CPU (operands not
    widened, float32 results from the low-precision operands; the float32 logit gradient split
    in two for the backward GEMMs as the code does (``cuda``), for both, or for neither)."""
    if variant == "cpu":
        return fused_grads(x, kw, backend)
    from fastkd.logit import fused_linear as fl
    saved = fl._gemm_operand, fl._SPLIT
    fl._gemm_operand = lambda t: t
    fl._SPLIT = CUDA_VARIANTS[variant] or fl._SPLIT
    try:
        return fused_grads(x, kw, backend)
    finally:
        fl._gemm_operand, fl._SPLIT = saved


def time_step(x, kw, backend, repeats, warmup=2):
    """Median seconds of forward + backward (student hidden and weight require grad; a frozen
    hidden+weight teacher), the default chunking."""
    hs, ws = x["hs"].clone().requires_grad_(), x["ws"].clone().requires_grad_()
    fn = fastkd.FusedLinearKDLoss(backend=backend, **kw)
    times = []
    for i in range(warmup + repeats):
        hs.grad = ws.grad = None
        t0 = time.perf_counter()
        fn(hs, ws, x["ht"], x["wt"], x["y"]).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--h", type=int, default=128)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--divergences", default="kl,reverse_kl,jsd,tvd")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hard-weight", type=float, default=0.0)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--repeats", type=int, default=0, help="timed calls (0: no timing)")
    p.add_argument("--time-only", action="store_true")
    p.add_argument("--variants", default="cpu",
                   help="comma list of cpu, cuda, cuda-split, cuda-round")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    x = make_inputs(a.n, a.h, a.v, dtype)
    print(f"fastkd from {os.path.dirname(fastkd.__file__)}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; N={a.n} H={a.h} V={a.v} {a.dtype} "
          f"T={a.temperature} hard_weight={a.hard_weight} backend={a.backend}")
    for div in a.divergences.split(","):
        kw = dict(temperature=a.temperature, divergence=div, hard_weight=a.hard_weight)
        if not a.time_only:
            ref = exact_grads(x, kw)
            for variant in a.variants.split(","):
                r = floor_ratios(x, ref, variant_grads(x, kw, a.backend, variant))
                print(f"{div:>10} {variant}: " + " ".join(f"{k} {q:.2f}" for k, (q, _) in r.items())
                      + f"  (floors hs {r['hs'][1]:.3g} ws {r['ws'][1]:.3g})", flush=True)
        if a.repeats:
            med, best = time_step(x, kw, a.backend, a.repeats)
            print(f"{div:>10}: fwd+bwd median {med * 1e3:.1f} ms (min {best * 1e3:.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
