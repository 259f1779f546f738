"""Suite ``topk``: KD against a sparse top-k teacher (offline distillation, SPEC §1b).

``fastkd.KDLoss(temperature=T, hard_weight=1.0)(s, None, y, teacher_topk=(indices, logprobs))``
against the stock code a competent PyTorch user writes for a top-k teacher with a residual bucket
(:func:`stock_topk_kd`), that code under ``torch.compile``, and, as the reference point (what a
sparse teacher should cost next to a dense one), the same ``KDLoss`` with a dense teacher ``t``
[N, V] on the same fastkd backend (``fastkd[<backend> dense]``). Liger-Kernel has no top-k teacher loss.

The dense teacher is the full distribution the top-k teacher describes: the listed entries keep
their log-probabilities and the residual mass is spread over the unlisted entries in proportion to
the student's probabilities. Then the dense KL equals the k + 1 bucket KL exactly, so every
contender computes the same loss and the usual loss cross-check covers the dense rows too (the
dense kernel's time does not depend on the teacher's values).

Floor: the forward reads s (N*V elements) and the teacher (N*k*(8 + 4) bytes: int64 indices,
float32 log-probabilities); forward + backward also writes the gradient (N*V elements).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastkd.bench import core

TEMPERATURE = 2.0
TOPK_ELEM_BYTES = 8 + 4  # int64 index + float32 log-probability per listed entry
KS = (8, 64, 256)

# (N, V, k) grids; dtypes. The CPU quick grid is the headline CPU config: N=512, V=32000, fp32.
SIZES = {
    ("cpu", "demo"): ([(256, 32000, 64)], ["float32"]),
    ("cpu", "quick"): ([(512, 32000, k) for k in KS], ["float32"]),
    ("cpu", "full"): ([(512, v, k) for v in (32000, 128256) for k in KS],
                      ["float32", "bfloat16"]),
    ("cuda", "demo"): ([(8192, 128256, 64)], ["bfloat16"]),
    ("cuda", "quick"): ([(8192, 128256, k) for k in KS], ["bfloat16", "float32"]),
    ("cuda", "full"): ([(n, v, k) for n in (8192, 32768) for v in (128256, 151936) for k in KS],
                       ["bfloat16", "float32"]),
}

# Rows per chunk when building the teacher: bounds the float32 temporaries to ~256 MiB each
# (the CUDA full sizes have 5e9 logits per tensor).
_BUILD_ELEMENTS = 1 << 26


def stock_topk_kd(s, indices, logprobs, y, temperature: float, hard_weight: float = 1.0):
    """Top-k KD as a competent PyTorch user writes it: KL(P || Q) over the k listed entries and
    one residual bucket, times T^2, plus cross-entropy.

    ``log_softmax(s / T)`` once; the listed entries by ``gather``; the student's residual
    log-mass as a logsumexp over the unlisted entries (listed ones masked to -inf by
    ``scatter``), not as ``log(1 - sum Q_j)``, which cancels catastrophically when the listed
    entries hold nearly all the mass. The teacher's residual is ``1 - sum P_j`` (clamped at 0),
    and ``F.kl_div`` with a probability target handles P = 0 (xlogy).
    """
    T = temperature
    logq = F.log_softmax(s / T, dim=-1)
    logq_rest = logq.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
    # The bucket tensors are [N, k + 1]: float32 there costs nothing and keeps bf16 runs exact.
    logq_b = torch.cat([logq.gather(-1, indices), logq_rest], -1).float()
    p = logprobs.float().exp()
    p_b = torch.cat([p, (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)], -1)
    loss = F.kl_div(logq_b, p_b, reduction="batchmean") * (T * T)
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(s, y)
    return loss


def teacher_bytes(cfg: core.Config) -> tuple:
    """(top-k teacher bytes, dense teacher bytes) of ``cfg``."""
    n, v, k = cfg.shape["N"], cfg.shape["V"], cfg.shape["k"]
    return n * k * TOPK_ELEM_BYTES, n * v * cfg.torch_dtype.itemsize


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.2f} MiB"


def _fused_path(backend: str) -> str:
    """Which top-k code a backend runs: a fused kernel or fastkd's chunked PyTorch ops."""
    from fastkd.logit import topk
    if backend == "reference":
        return "autograd reference"
    return "fused kernel" if backend in topk.FUSED_KERNELS else "chunked PyTorch ops"


class TopKSuite(core.Suite):
    name = "topk"
    needs = ("KDLoss",)

    def __init__(self):
        self.notes = [
            "fastkd[b] = KDLoss(temperature=2, hard_weight=1)(s, None, y, teacher_topk=(indices, "
            "logprobs)); fastkd[b dense] = the same KDLoss on backend b with a dense teacher "
            "t [N, V] (the reference point: `top-k / dense` in a fastkd[b] row's note is its "
            "time divided by fastkd[b dense]'s, forward+backward and forward)",
            "stock: log_softmax(s/T), gather at the indices, residual by a masked logsumexp, "
            "F.kl_div over the k + 1 buckets * T^2 + F.cross_entropy; Liger-Kernel has no "
            "top-k teacher loss",
            f"teacher memory: top-k N*k*{TOPK_ELEM_BYTES} bytes (int64 indices, float32 "
            "log-probabilities) against N*V*elem for a dense teacher (each row's note gives "
            "both); the floor counts the top-k teacher, so `x floor` of a dense row is against "
            "the top-k floor",
            "the dense teacher is the top-k teacher's distribution with the residual spread like "
            "the student's, so the dense and top-k losses are equal (and cross-checked)",
        ]

    def make_config(self, dtype, shape, params=None):
        p = {"temperature": TEMPERATURE, "hard_weight": 1.0}
        p.update(params or {})
        n, v, k = shape["N"], shape["V"], shape["k"]
        # x = k: a series (dtype, N, V) shows how the top-k cost grows with k, dense being flat
        return core.Config(suite=self.name, label=f"N={n} V={v} k={k} {dtype}", dtype=dtype,
                           shape={"N": n, "V": v, "k": k}, params=p, size=float(k),
                           size_label="k (teacher entries per row)",
                           series=f"{dtype} N={n} V={v}")

    def configs(self, device, sizes, dtypes, opts):
        grid, default_dtypes = SIZES[(device, sizes)]
        return [self.make_config(dtype, {"N": n, "V": v, "k": k})
                for dtype in dtypes or default_dtypes for n, v, k in grid]

    def make_inputs(self, cfg, device, seed):
        g = core.generator(device, seed)
        n, v, k = cfg.shape["N"], cfg.shape["V"], cfg.shape["k"]
        T = cfg.params["temperature"]
        s = core.randn((n, v), cfg.torch_dtype, device, g, scale=2.0)
        # t holds the random teacher logits first and is overwritten, chunk by chunk, with the
        # dense teacher (no second N x V buffer at the GPU sizes).
        t = core.randn((n, v), cfg.torch_dtype, device, g, scale=2.0)
        y = torch.randint(0, v, (n,), device=device, generator=g)
        indices = torch.empty((n, k), dtype=torch.int64, device=device)
        logprobs = torch.empty((n, k), dtype=torch.float32, device=device)
        step = max(1, _BUILD_ELEMENTS // v)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            lp_all = F.log_softmax(t[lo:hi].float() / T, dim=-1)
            lp, idx = lp_all.topk(k, dim=-1)
            del lp_all
            indices[lo:hi], logprobs[lo:hi] = idx, lp
            logq = F.log_softmax(s[lo:hi].float() / T, dim=-1)
            logq_rest = logq.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)
            # clamped: a listed mass that rounds to >= 1 would make the residual NaN or -inf
            log_res = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp_max(1.0 - 1e-6))
            # log P_v: the listed log-probabilities; elsewhere residual * Q_v / Q_rest
            logp = (logq - logq_rest + log_res).scatter_(-1, idx, lp)
            t[lo:hi] = (logp * T).to(t.dtype)  # softmax(t / T) = P
            del logq, logp
        return {"s": s.requires_grad_(True), "t": t, "y": y, "indices": indices,
                "logprobs": logprobs}

    def contenders(self, device, backends):
        def fastkd_build(dense):
            def for_backend(backend):
                def build(cfg, inputs, dev):
                    import fastkd
                    p = cfg.params
                    m = fastkd.KDLoss(temperature=p["temperature"], hard_weight=p["hard_weight"],
                                      backend=backend)
                    top, full = teacher_bytes(cfg)
                    if dense:
                        return core.Step(lambda x: m(x["s"], x["t"], x["y"]), lambda x: [x["s"]],
                                         note=f"dense teacher {_mib(full)}")
                    return core.Step(
                        lambda x: m(x["s"], None, x["y"],
                                    teacher_topk=(x["indices"], x["logprobs"])),
                        lambda x: [x["s"]],
                        note=f"{_fused_path(backend)}; teacher {_mib(top)} (dense {_mib(full)})")
                return build
            return for_backend

        def stock_build(cfg, inputs, dev):
            p = cfg.params
            return core.Step(lambda x: stock_topk_kd(x["s"], x["indices"], x["logprobs"], x["y"],
                                                     p["temperature"], p["hard_weight"]),
                             lambda x: [x["s"]])

        # The CPU memory child asks for the backend named in the contender's name (``c_backend``
        # of "fastkd[cpu dense]" is "cpu dense"): its first word is the backend.
        backends = list(dict.fromkeys(b.split()[0] for b in backends))
        topk = core.fastkd_contenders(device, backends, fastkd_build(False))
        dense = core.fastkd_contenders(device, backends, fastkd_build(True))
        out = []
        for c, d in zip(topk, dense):
            out += [c, dataclasses.replace(d, name=f"fastkd[{d.backend} dense]")]
        stock_c = core.Contender("stock", "stock", build=stock_build)
        out += [stock_c, core.compiled(stock_c), core.no_liger("top-k teacher loss")]
        return out

    def annotate(self, cfg, results) -> None:
        """Top-k time / dense time on the same backend, into each fastkd
        top-k row's ``ratios`` (``topk_vs_dense_{fwd,fwd_bwd}``) and note."""
        rows = {r["contender"]: r for r in results}
        for r in results:
            if r["kind"] != "fastkd" or r["contender"].endswith(" dense]"):
                continue
            d = rows.get(f"fastkd[{r['backend']} dense]")
            ratios = r.setdefault("ratios", {})
            for key in ("fwd", "fwd_bwd"):
                a, b = r.get(f"{key}_ms"), d.get(f"{key}_ms") if d else None
                ratios[f"topk_vs_dense_{key}"] = (a / b) if a and b else None
            fb, fw = ratios["topk_vs_dense_fwd_bwd"], ratios["topk_vs_dense_fwd"]
            if fb is not None:
                msg = f"top-k / dense: fwd+bwd {fb:.2f}" + (f", fwd {fw:.2f}" if fw else "")
                r["note"] = msg + ("; " + r["note"] if r.get("note") else "")

    def floor_work(self, cfg):
        n, v = cfg.shape["N"], cfg.shape["V"]
        nv_bytes = n * v * cfg.torch_dtype.itemsize
        top, _ = teacher_bytes(cfg)
        return {"fwd": (nv_bytes + top, 0), "fwd_bwd": (2 * nv_bytes + top, 0),
                "basis": f"bytes: fwd reads s (N*V*elem) and the top-k teacher "
                         f"(N*k*{TOPK_ELEM_BYTES}); fwd+bwd also writes the gradient "
                         f"(N*V*elem); / measured copy bandwidth"}


SUITE = TopKSuite()
