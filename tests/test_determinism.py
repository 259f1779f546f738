"""Determinism: with ``torch.use_deterministic_algorithms(True)`` every backend gives bit-identical
losses and gradients across runs, for every public loss.

Why it holds (audited; ``test_no_float_atomics_in_kernels`` keeps it so):
- cpu: ``at::parallel_for`` over rows (logit, feature epilogue, relation tiles); each row's sums
  run in a fixed order inside one task, whatever the thread that runs it, and the cross-row
  reductions are torch ops or GEMMs on fixed shapes. The only atomic is an integer OR of error
  flags (``#pragma omp atomic``), which is order-independent.
- cuda: one CTA per row (logit) with fixed shuffle/shared-memory trees; feature and relation
  kernels write per-element/per-tile results and reduce through cuBLAS GEMMs and torch sums; the
  only atomic is ``atomicOr`` on the error flags. cuBLAS is deterministic for a fixed
  configuration when ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (which torch requires in deterministic
  mode); the GPU variant runs in a child process with it set.
- triton: one program per row / row block; partial sums per program are written to buffers and
  reduced in a fixed order on the host; ``grad_W`` tiles are owned by one program each; the only
  atomic is ``tl.atomic_or`` on the error flags.
The CPU backend is also bit-identical across thread counts for logit KD (rows are independent);
feature and relation losses use GEMMs whose blocking may depend on the thread count, so across
thread counts only closeness is promised (checked below).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _inputs(device, small):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    n, v = (4, 70) if small else (96, 3001)
    nf, b = (40, 12) if small else (3000, 257)
    return dict(
        s=r(n, v), t1=r(n, v), t2=r(n, v).bfloat16(), y=torch.randint(0, v, (n,), generator=g),
        xf=r(nf, 24), tf=r(nf, 40), wf=r(40, 24) / 5, bf=r(40),
        xm=r(2, 24, 6, 7), tm=r(2, 40, 6, 7),
        es=r(b, 33), et=r(b, 17),
    ), device


def _runs(backend, device, small):
    """name -> list of tensors (loss and gradients) for each loss family on ``backend``."""
    import fastkd
    F = fastkd.functional
    data, dev = _inputs(device, small)
    d = {k: v.to(dev) for k, v in data.items()}
    out = {}

    def grads(loss, *leaves):
        loss.backward(torch.ones_like(loss))
        return [loss.detach()] + [x.grad for x in leaves]

    def leaf(name, rg=True):
        return d[name].clone().requires_grad_(rg)

    for div in ("kl", "reverse_kl", "jsd", "tvd"):
        s, t1, t2 = leaf("s"), leaf("t1"), leaf("t2")
        out[f"kd_{div}"] = grads(F.kd_loss(s, [t1, t2], d["y"], divergence=div, hard_weight=0.5,
                                           label_smoothing=0.1, temperature=2.0,
                                           backend=backend), s, t1, t2)
    s, t1 = leaf("s"), leaf("t1", False)
    out["kd_none"] = grads(fastkd.KDLoss(reduction="none", backend=backend)(s, t1), s)
    for loss in ("mse", "cosine"):
        x, t, w, b = leaf("xf"), leaf("tf"), leaf("wf"), leaf("bf")
        out[f"feature_{loss}"] = grads(F.feature_kd_loss(x, t, w, b, loss=loss, backend=backend),
                                       x, t, w, b)
        x, w = leaf("xm"), leaf("wf")
        out[f"feature_{loss}_nchw_none"] = grads(
            F.feature_kd_loss(x, d["tm"], w, None, loss=loss, channel_dim=1, reduction="none",
                              backend=backend), x, w)
    for name, fn, kw in (("sp", F.sp_loss, {}), ("rkd", F.rkd_loss, {}), ("pkt", F.pkt_loss, {})):
        s, t = leaf("es"), leaf("et")
        out[name] = grads(fn(s, t, backend=backend, **kw), s, t)
    if hasattr(F, "fused_linear_kd_loss"):
        h, w = leaf("xf"), leaf("wf")
        hs = h[: (8 if small else 500)]
        out["fused_linear"] = grads(F.fused_linear_kd_loss(hs, w, teacher_logits=d["tf"][:hs.shape[0]],
                                                           backend=backend, chunk_size=64), h, w)
    return out


def _digest(tensors):
    h = hashlib.sha256()
    for x in tensors:
        if x is None:
            h.update(b"None")
            continue
        x = x.detach().cpu().contiguous()
        h.update(str((x.dtype, tuple(x.shape))).encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def digests(backend, device, small, repeats=3):
    """[{name: sha256 of loss + gradient bytes}] for ``repeats`` runs, deterministic mode on."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return [{k: _digest(v) for k, v in _runs(backend, device, small).items()}
                for _ in range(repeats)]
    finally:
        torch.use_deterministic_algorithms(old)


def _cpu_backends():
    from _helpers import backends_for
    return ["reference"] + backends_for("cpu")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_bit_identical_across_runs_cpu(backend):
    small = backend == "triton"  # the Triton interpreter is slow
    runs = digests(backend, "cpu", small)
    for name in runs[0]:
        assert len({r[name] for r in runs}) == 1, f"{backend}: {name} differs between runs"


def test_cpu_logit_bit_identical_across_thread_counts():
    """The cpu backend's logit KD is bit-identical for 1 and 2 threads (and feature/relation are
    close: their GEMMs may block differently by thread count)."""
    from _helpers import backends_for
    if "cpu" not in backends_for("cpu"):
        pytest.skip("the cpu backend is not built")
    old = torch.get_num_threads()
    res = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res[n] = _runs("cpu", "cpu", small=False)
    finally:
        torch.set_num_threads(old)
    for name in res[1]:
        for a, b in zip(res[1][name], res[2][name]):
            if a is None:
                continue
            if name.startswith("kd"):
                assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bit_identical_across_runs_gpu(backend):
    """Run in a child with CUBLAS_WORKSPACE_CONFIG set (cuBLAS reads it at handle creation)."""
    from _helpers import backends_for
    if backend not in backends_for("cuda"):
        pytest.skip(f"{backend} is not available on CUDA here")
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "test_determinism.py"), "--child",
                           backend], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in runs[0]:
        assert len({r[name] for r in runs}) == 1, f"{backend}: {name} differs between runs"


# Atomics allowed in the kernels: integer OR of error flags (order-independent).
_ATOMIC = re.compile(r"(\batomic[A-Z]\w*\s*\(|\btl\.atomic_\w+\s*\(|__atomic_\w+\s*\(|"
                     r"#pragma\s+omp\s+atomic|std::atomic)")
_ALLOWED = re.compile(r"atomicOr|atomic_or|__atomic_fetch_or|atomic_or_flag|#pragma omp atomic|"
                      r"std::atomic|atomic>|fetch_or")


def test_no_float_atomics_in_kernels():
    """Audit: no kernel accumulates floats with atomics (which would make the summation order
    scheduling-dependent). The only atomics are ORs of integer error flags, plus a host-side
    std::atomic bitmask of configured devices in the CUDA launcher. A new float atomic must be
    replaced by per-block partials reduced in a fixed order when
    torch.are_deterministic_algorithms_enabled() - and this list updated."""
    files = []
    for sub in ("csrc/cuda", "csrc/cpu", "csrc/glue"):
        d = os.path.join(ROOT, sub)
        files += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    pkg = os.path.join(ROOT, "fastkd")
    for fam in sorted(os.listdir(pkg)):
        p = os.path.join(pkg, fam, "triton_kernel.py")
        if os.path.exists(p):
            files.append(p)
    bad = []
    for path in files:
        with open(path) as fh:
            for no, line in enumerate(fh, 1):
                code = line.split("//")[0] if path.endswith((".cu", ".cuh", ".cpp", ".h")) \
                    else line.split("#")[0] if "#pragma" not in line else line
                for m in _ATOMIC.finditer(code):
                    if not _ALLOWED.search(code):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{no}: {line.strip()}")
    assert not bad, "atomics outside the allowed flag ORs:\n" + "\n".join(bad)
    # and the flag ORs really are on integer flags
    for path in files:
        src = open(path).read()
        for m in re.finditer(r"#pragma omp atomic\s*\n\s*(.+)", src):
            assert re.match(r"flags \|= \w+;", m.group(1).strip()), m.group(1)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.path.insert(0, HERE)
    print(json.dumps(digests(sys.argv[2], "cuda", small=False)))
