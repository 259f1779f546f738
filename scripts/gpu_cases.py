#!/usr/bin/env python3
"""GPU cases of scripts/gpu_check.sh: every CUDA kernel of fastkd once on small inputs (for
compute-sanitizer), the mixed launch sequence, and a logit case with N * V > 2^31.

  python scripts/gpu_cases.py --list                   the cases and the kernels each launches
  python scripts/gpu_cases.py --check-coverage JSON    every kernel of a resource table
                                                       (scripts/cuda_resources.py) has a case
  python scripts/gpu_cases.py --run [--only REGEX]     run the cases on CUDA (under a sanitizer)
  python scripts/gpu_cases.py --mixed                  kernels, vocabularies, teacher counts and
                                                       dtypes mixed in one process, on every GPU,
                                                       with the kernels each case launches
                                                       checked by the profiler
  python scripts/gpu_cases.py --large                  N = 32768, V = 128256 bf16 KDLoss forward
                                                       and backward vs a chunked float32 torch
                                                       computation

Every case runs forward and backward on the cuda backend and compares the loss and gradients
with the float64 reference (the large case: float32, in row chunks). --list and
--check-coverage need no GPU. Exit status: 0 all passed, 1 a case failed, 2 usage / no GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_resources  # noqa: E402  (its kernel short names)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
#: torch dtype -> the CUDA type name in kernel template arguments
CUDA_TYPE = {F32: "float", BF16: "__nv_bfloat16", F16: "__half"}
#: kernels of the logit launcher (csrc/cuda/logit_kd.cu): one teacher with V <= 4096, one
#: teacher with larger V, several teachers
LOGIT_SMALL = "logit_kd_kernel<false, 128, 8>"
LOGIT_LARGE = "logit_kd_kernel<false, 512, 2>"
LOGIT_MULTI = "logit_kd_kernel<true, 512, 1>"
#: kernels of the top-k launcher (csrc/cuda/logit_topk.cu): V <= 4096, larger V
TOPK_SMALL = "logit_topk_kernel<128, 6>"
TOPK_LARGE = "logit_topk_kernel<256, 3>"


@dataclass
class Case:
    name: str
    kernels: frozenset          # short kernel names (as in resources-cuda.json) it launches
    # (device, fastkd backend) -> a one-line result; raises CaseFailure
    run: Callable[[torch.device, str], str] = field(repr=False)


class CaseFailure(AssertionError):
    pass


# ------------------------------------------------------------------------------------ helpers
def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def _tol(*dtypes) -> float:
    """Relative tolerance against the float64 reference: 1e-4 for float32, 5e-2 with a 16-bit
    input. These cases catch a kernel that misreads or miswrites memory, not lost precision
    (the test suite holds every backend to SPEC's tolerances)."""
    return 1e-4 if all(d == F32 for d in dtypes) else 5e-2


def _compare(what: str, got, want, tol: float) -> float:
    if got is None or want is None:
        if (got is None) != (want is None):
            raise CaseFailure(f"{what}: got {got is not None}, reference {want is not None}")
        return 0.0
    if not torch.isfinite(got).all():
        raise CaseFailure(f"{what}: not finite")
    err = _rel(got, want)
    if not err <= tol:
        raise CaseFailure(f"{what}: relative error {err:.3g} > {tol:g}")
    return err


def _grads_of(fn, inputs, seed_grad=None):
    out = fn(*inputs)
    go = torch.ones_like(out) if seed_grad is None else seed_grad
    req = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(out, req, go)
    it = iter(grads)
    return out, [next(it) if isinstance(x, torch.Tensor) and x.requires_grad else None
                 for x in inputs]


def _against_reference(fn_cuda, fn_ref, inputs, tol) -> str:
    """Runs fn on the inputs (cuda backend) and on float64 copies (reference); compares the
    output and every input gradient."""
    out, grads = _grads_of(fn_cuda, inputs)
    ref_in = [x.detach().double().requires_grad_(x.requires_grad)
              if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    rout, rgrads = _grads_of(fn_ref, ref_in)
    worst = _compare("loss", out, rout, tol)
    for k, (g, r) in enumerate(zip(grads, rgrads)):
        worst = max(worst, _compare(f"grad of input {k}", g, r, tol))
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return f"max rel err {worst:.2e}"


# ------------------------------------------------------------------------------------- logit
def _logit_case(name, kernel, *, n, vocab, teachers, sdt, tdt, divergence="kl",
                teacher_grad=False, hard=False, misaligned=False, temperature=2.0):
    from fastkd.functional import kd_loss

    def run(dev, backend):
        g = torch.Generator().manual_seed(_seed(name))
        width = vocab + (1 if misaligned else 0)

        def logits(dt):
            x = (3 * torch.randn(n, width, generator=g)).to(dev, dt)
            return x[:, 1:] if misaligned else x  # rows start one element past 16 bytes

        s = logits(sdt).requires_grad_()
        ts = [logits(tdt).requires_grad_(teacher_grad) for _ in range(teachers)]
        y = torch.randint(0, vocab, (n,), generator=g).to(dev)
        if n > 1:
            y[1] = -100  # an ignored row
        kw = dict(divergence=divergence, temperature=temperature, beta=0.3)
        if hard:
            kw.update(hard_weight=0.5, label_smoothing=0.1)
        if teachers > 1:
            w = torch.rand(teachers, generator=g) + 0.1
            kw["teacher_weights"] = (w / w.sum()).tolist()
        tgt = y if hard else None

        def f(backend):
            return lambda s_, *t_: kd_loss(s_, list(t_) if teachers > 1 else t_[0], tgt,
                                           backend=backend, **kw)
        return _against_reference(f(backend), f("reference"), [s, *ts], _tol(sdt, tdt))
    return Case(name, frozenset({kernel}), run)


def logit_cases():
    return [
        _logit_case("logit-small-bf16-kl-hard", LOGIT_SMALL, n=3, vocab=1000, teachers=1,
                    sdt=BF16, tdt=BF16, hard=True),
        _logit_case("logit-small-f32-jsd-teachergrad-misaligned", LOGIT_SMALL, n=3, vocab=4096,
                    teachers=1, sdt=F32, tdt=F32, divergence="jsd", teacher_grad=True,
                    misaligned=True),
        _logit_case("logit-large-bf16-kl-misaligned", LOGIT_LARGE, n=2, vocab=5003, teachers=1,
                    sdt=BF16, tdt=BF16, misaligned=True, hard=True),
        _logit_case("logit-large-f32-f16-rkl-teachergrad", LOGIT_LARGE, n=2, vocab=33000,
                    teachers=1, sdt=F32, tdt=F16, divergence="reverse_kl", teacher_grad=True),
        _logit_case("logit-multi3-bf16-tvd-teachergrad", LOGIT_MULTI, n=3, vocab=5000,
                    teachers=3, sdt=BF16, tdt=BF16, divergence="tvd", teacher_grad=True,
                    hard=True),
        _logit_case("logit-multi2-f32-kl-smallvocab", LOGIT_MULTI, n=2, vocab=100, teachers=2,
                    sdt=F32, tdt=F32, misaligned=True),
    ]


def _topk_case(name, kernel, *, n, vocab, k, sdt, divergence="kl", hard=False):
    """KD against a sparse top-k teacher (one slot of row 0 empty, -1) vs the reference."""
    from fastkd.functional import kd_loss

    def run(dev, backend):
        g = torch.Generator().manual_seed(_seed(name))
        s = (3 * torch.randn(n, vocab, generator=g)).to(dev, sdt).requires_grad_()
        t = 3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
        lp, idx = torch.log_softmax(t / 2.0, -1).topk(k, -1)
        idx[0, -1] = -1
        idx, lp = idx.to(dev), lp.float().to(dev)
        y = torch.randint(0, vocab, (n,), generator=g).to(dev)
        y[-1] = -100
        kw = dict(divergence=divergence, temperature=2.0, beta=0.3,
                  hard_weight=0.5 if hard else 0.0)

        def f(backend):
            return lambda s_: kd_loss(s_, None, y if hard else None, backend=backend,
                                      teacher_topk=(idx, lp), **kw)
        return _against_reference(f(backend), f("reference"), [s], _tol(sdt))
    return Case(name, frozenset({kernel}), run)


def topk_cases():
    return [
        _topk_case("topk-small-bf16-kl-hard", TOPK_SMALL, n=3, vocab=1000, k=20, sdt=BF16,
                   hard=True),
        _topk_case("topk-large-f32-jsd", TOPK_LARGE, n=2, vocab=33000, k=64, sdt=F32,
                   divergence="jsd"),
    ]


# ----------------------------------------------------------------------------------- feature
def _feature_case(layout, tdt, gdt, loss):
    """Teacher dtype tdt picks the kernel's T; the dL/dy dtype G is the student (= adapter)
    dtype when the GEMMs run in 16 bits, float32 otherwise (csrc/glue/feature.h)."""
    from fastkd.feature.ops import feature_kd_loss
    kernel = f"{layout}_kernel<{CUDA_TYPE[tdt]}, {CUDA_TYPE[gdt]}>"
    name = f"feature-{layout}-t{str(tdt)[6:]}-g{str(gdt)[6:]}-{loss}"

    def run(dev, backend):
        g = torch.Generator().manual_seed(_seed(name))
        ds, dt = 24, 40
        if layout == "rows":
            xs, ts, cd = (37, ds), (37, dt), -1
        else:  # conv maps with >= 32 positions per image: the columns layout
            xs, ts, cd = (2, ds, 6, 6), (2, dt, 6, 6), 1
        x = torch.randn(xs, generator=g).to(dev, gdt).requires_grad_()
        t = torch.randn(ts, generator=g).to(dev, tdt).requires_grad_()
        w = (torch.randn(dt, ds, generator=g) / math.sqrt(ds)).to(dev, gdt).requires_grad_()
        b = (0.1 * torch.randn(dt, generator=g)).to(dev, gdt).requires_grad_()

        def f(backend):
            return lambda *a: feature_kd_loss(*a, loss=loss, channel_dim=cd, reduction="mean",
                                              backend=backend)
        return _against_reference(f(backend), f("reference"), [x, t, w, b], _tol(tdt, gdt))
    return Case(name, frozenset({kernel}), run)


def feature_cases():
    out = []
    for k, (layout, tdt, gdt) in enumerate(
            (lay, t, g) for lay in ("rows", "columns") for t in CUDA_TYPE for g in CUDA_TYPE):
        out.append(_feature_case(layout, tdt, gdt, "cosine" if k % 2 else "mse"))
    return out


# ---------------------------------------------------------------------------------- relation
def _relation_case(name, kernels, fn_name, dtype, **kw):
    import fastkd.functional as F

    def run(dev, backend):
        g = torch.Generator().manual_seed(_seed(name))
        s = torch.randn(37, 24, generator=g).to(dev, dtype).requires_grad_()
        t = torch.randn(37, 40, generator=g).to(dev, dtype).requires_grad_()
        fn = getattr(F, fn_name)

        def f(backend):
            return lambda a, b: fn(a, b, backend=backend, **kw)
        return _against_reference(f(backend), f("reference"), [s, t], _tol(dtype))
    return Case(name, frozenset(kernels), run)


def relation_cases():
    return [
        _relation_case("relation-sp-f32", {"sp_stats_kernel", "sp_tile_kernel"}, "sp_loss", F32),
        _relation_case("relation-rkd-distance-angle-bf16",
                       {"rkd_stats_kernel", "rkd_tile_kernel", "angle_t_kernel",
                        "angle_r_kernel"}, "rkd_loss", BF16),
        _relation_case("relation-pkt-f16", {"pkt_stats_kernel", "pkt_tile_kernel"}, "pkt_loss",
                       F16),
    ]


def all_cases():
    return logit_cases() + topk_cases() + feature_cases() + relation_cases()


# -------------------------------------------------------------------------------- mixed order
def mixed_sequence():
    """The order that a launcher keeping per-kernel-type state got wrong: a small vocabulary
    first (128-thread kernel, little shared memory), then a large one (512 threads, ~115 KB of
    row cache), then several teachers (~230 KB), with dtypes changing, the other families in
    between, and the small vocabulary again at the end."""
    lg = {c.name: c for c in logit_cases()}
    return [
        _logit_case("mixed-v1000-bf16", LOGIT_SMALL, n=4, vocab=1000, teachers=1, sdt=BF16,
                    tdt=BF16),
        _logit_case("mixed-v50000-bf16", LOGIT_LARGE, n=4, vocab=50000, teachers=1, sdt=BF16,
                    tdt=BF16, hard=True),
        _logit_case("mixed-3teachers-v50000-bf16", LOGIT_MULTI, n=3, vocab=50000, teachers=3,
                    sdt=BF16, tdt=BF16, teacher_grad=True),
        _feature_case("rows", BF16, BF16, "mse"),
        _logit_case("mixed-v50000-f32-jsd", LOGIT_LARGE, n=2, vocab=50000, teachers=1,
                    sdt=F32, tdt=F32, divergence="jsd", teacher_grad=True),
        _relation_case("mixed-sp-bf16", {"sp_stats_kernel", "sp_tile_kernel"}, "sp_loss", BF16),
        _logit_case("mixed-2teachers-v128256-f16", LOGIT_MULTI, n=2, vocab=128256, teachers=2,
                    sdt=F16, tdt=F16),
        _feature_case("columns", F32, F32, "cosine"),
        lg["logit-small-f32-jsd-teachergrad-misaligned"],
        _logit_case("mixed-v1000-f16-again", LOGIT_SMALL, n=4, vocab=1000, teachers=1,
                    sdt=F16, tdt=F16, hard=True),
    ]


# ------------------------------------------------------------------------------- large N * V
def large_case(dev, n=32768, vocab=128256, chunk=2048) -> str:
    """KDLoss (KL at T = 2 plus hard CE) on bf16 logits with N * V > 2^31 elements: the loss and
    the student gradient against a float32 torch computation of the same loss, chunk by chunk."""
    from fastkd.functional import kd_loss
    assert n * vocab > 2**31
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.empty(n, vocab, device=dev, dtype=BF16)
    t = torch.empty(n, vocab, device=dev, dtype=BF16)
    for a in range(0, n, chunk):  # fill in chunks: no float32 [N, V] temporary
        s[a:a + chunk] = (3 * torch.randn(min(chunk, n - a), vocab, generator=g, device=dev))
        t[a:a + chunk] = (3 * torch.randn(min(chunk, n - a), vocab, generator=g, device=dev))
    y = torch.randint(0, vocab, (n,), generator=g, device=dev)
    kw = dict(temperature=2.0, divergence="kl", hard_weight=0.5, reduction="sum")
    s.requires_grad_()
    t0 = time.perf_counter()
    loss = kd_loss(s, t, y, backend="cuda", **kw)
    loss.backward(torch.tensor(1.0 / n, device=dev))
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    gs = s.grad
    ref_loss, worst = 0.0, 0.0
    for a in range(0, n, chunk):
        sc = s.detach()[a:a + chunk].float().requires_grad_()
        tc = t[a:a + chunk].float()
        part = kd_loss(sc, tc, y[a:a + chunk], backend="reference", **kw)
        (gc,) = torch.autograd.grad(part, [sc], torch.tensor(1.0 / n, device=dev))
        ref_loss += part.double().item()
        worst = max(worst, _compare(f"grad rows {a}..{a + chunk}", gs[a:a + chunk], gc, 2e-2))
        # The last rows are where a 32-bit element offset would have wrapped.
    lerr = abs(loss.double().item() - ref_loss) / abs(ref_loss)
    if not lerr <= 1e-4:
        raise CaseFailure(f"loss {loss.item():.6g} vs {ref_loss:.6g}: relative error {lerr:.3g}")
    return (f"N={n} V={vocab} (N*V = {n * vocab / 2**31:.2f} * 2^31) bf16: forward+backward "
            f"{secs:.2f} s, loss rel err {lerr:.2e}, worst chunk grad rel err {worst:.2e}")


# ------------------------------------------------------------------------------------ running
def _launched_kernels(fn) -> set:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {cuda_resources.short_name(e.name) for e in prof.events()
            if e.device_type.name == "CUDA"}


def run_cases(cases, devices, verify_kernels=False, backend="cuda") -> int:
    failed = 0
    for dev in devices:
        for c in cases:
            t0 = time.perf_counter()
            try:
                if verify_kernels:
                    box = {}
                    seen = _launched_kernels(lambda: box.setdefault("r", c.run(dev, backend)))
                    msg = box["r"]
                    missing = c.kernels - seen
                    if missing:
                        raise CaseFailure(f"expected kernels not launched: {sorted(missing)}")
                else:
                    msg = c.run(dev, backend)
                print(f"PASS {dev} {c.name}: {msg} ({time.perf_counter() - t0:.2f} s)",
                      flush=True)
            except Exception as exc:  # report every case, then fail
                failed += 1
                print(f"FAIL {dev} {c.name}: {type(exc).__name__}: {exc}", flush=True)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true")
    mode.add_argument("--check-coverage", metavar="JSON")
    mode.add_argument("--run", action="store_true")
    mode.add_argument("--mixed", action="store_true")
    mode.add_argument("--large", action="store_true")
    ap.add_argument("--only", default=None, help="regex on case names (--run)")
    ap.add_argument("--cpu", action="store_true",
                    help="--run / --mixed on CPU tensors with the cpu backend (checks the cases "
                         "themselves without a GPU)")
    args = ap.parse_args(argv)

    cases = all_cases()
    if args.list:
        for c in cases:
            print(f"{c.name}: {', '.join(sorted(c.kernels))}")
        print(f"mixed sequence: {', '.join(c.name for c in mixed_sequence())}")
        return 0
    if args.check_coverage:
        with open(args.check_coverage) as f:
            table = json.load(f)
        kernels = {k for arch, per in table.items() if arch.startswith("sm_") for k in per}
        covered = set().union(*(c.kernels for c in cases))
        missing, unknown = sorted(kernels - covered), sorted(covered - kernels)
        for k in missing:
            print(f"no case launches {k}")
        for k in unknown:
            print(f"a case claims {k}, which is not in {args.check_coverage}")
        print(f"{len(cases)} cases cover {len(covered & kernels)} of {len(kernels)} kernels")
        return 1 if missing or unknown else 0

    if args.cpu and not args.large:
        cpu = [torch.device("cpu")]
        seq = mixed_sequence() if args.mixed else \
            [c for c in cases if args.only is None or re.search(args.only, c.name)]
        failed = run_cases(seq, cpu, backend="cpu")
        print(f"{'FAILED' if failed else 'OK'}: {failed} failed", flush=True)
        return 1 if failed else 0
    if not torch.cuda.is_available():
        print("gpu_cases.py: no CUDA device", file=sys.stderr)
        return 2
    import fastkd
    if not fastkd.available_backends()["cuda"]["available"]:
        print(f"gpu_cases.py: the cuda backend is unavailable: "
              f"{fastkd.available_backends()['cuda']}", file=sys.stderr)
        return 2
    dev0 = torch.device("cuda", 0)
    if args.large:
        try:
            print(f"PASS large: {large_case(dev0)}", flush=True)
            return 0
        except Exception as exc:
            print(f"FAIL large: {type(exc).__name__}: {exc}", flush=True)
            return 1
    if args.mixed:
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        # Each device in turn, then the sequence again on the first: every launcher's per-device
        # state is exercised after another device's.
        failed = run_cases(mixed_sequence(), devices + devices[:1], verify_kernels=True)
        failed += run_cases(cases, [dev0], verify_kernels=True)
    else:
        sel = [c for c in cases if args.only is None or re.search(args.only, c.name)]
        failed = run_cases(sel, [dev0])
    print(f"{'FAILED' if failed else 'OK'}: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
