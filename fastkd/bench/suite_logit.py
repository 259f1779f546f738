"""Suite ``logit``: ``fastkd.KDLoss(temperature=T, hard_weight=1.0)`` against
``F.kl_div(F.log_softmax(s/T,-1), F.softmax(t/T,-1), reduction="batchmean")*T*T
+ F.cross_entropy(s, y)`` (other divergences with ``--divergence``), that code under
``torch.compile``, and Liger-Kernel's KL / JSD / TVD losses composed with ``log_softmax`` plus
``LigerCrossEntropyLoss``. Floor: 3 passes over N x V (read s, read t, write the gradient) at the
measured copy bandwidth; the forward alone: 2 passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.bench import core, stock

TEMPERATURE = 2.0
BETA = 0.5

# (N, V) grids; dtypes. The CPU quick grid keeps the headline CPU config N=512, V=32000, fp32.
SIZES = {
    # demo: one config per suite, so that `--suite all --sizes demo` shows every family fast.
    ("cpu", "demo"): ([(256, 32000)], ["float32"]),
    ("cpu", "quick"): ([(128, 32000), (512, 32000)], ["float32"]),
    ("cpu", "full"): ([(128, 32000), (512, 32000), (2048, 32000), (512, 128256)],
                      ["float32", "bfloat16"]),
    ("cuda", "demo"): ([(8192, 128256)], ["bfloat16"]),
    ("cuda", "quick"): ([(1024, 32000), (8192, 32000), (8192, 128256)], ["bfloat16", "float32"]),
    ("cuda", "full"): ([(n, v) for v in (32000, 128256, 262144) for n in (1024, 8192, 32768)],
                       ["bfloat16", "float32"]),
}


def _liger(divergence: str, beta: float):
    """Liger's loss for ``divergence`` composed as a user would: (log_q, log_p) -> soft term."""
    from liger_kernel.transformers import (LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss,
                                           LigerTVDLoss)
    ce = LigerCrossEntropyLoss()
    if divergence == "kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        soft = lambda logq, logp: kl(logq, logp)  # noqa: E731  (KL(p || q))
    elif divergence == "reverse_kl":
        jsd = LigerJSD(beta=1.0)  # Liger: beta = 1 is the reverse KL
        soft = lambda logq, logp: jsd(logq, logp)  # noqa: E731
    elif divergence == "jsd":
        jsd = LigerJSD(beta=beta)
        soft = lambda logq, logp: jsd(logq, logp)  # noqa: E731
    else:
        tvd = LigerTVDLoss(reduction="batchmean")
        soft = lambda logq, logp: tvd(logq.exp(), logp.exp())  # noqa: E731
    return soft, ce


class LogitSuite(core.Suite):
    name = "logit"
    needs = ("KDLoss",)

    def __init__(self):
        self.notes = []

    def make_config(self, dtype, shape, params=None):
        p = {"temperature": TEMPERATURE, "divergence": "kl", "beta": BETA, "hard_weight": 1.0}
        p.update(params or {})
        n, v = shape["N"], shape["V"]
        return core.Config(suite=self.name, label=f"N={n} V={v} {dtype} {p['divergence']}",
                           dtype=dtype, shape={"N": n, "V": v}, params=p, size=float(n * v),
                           size_label="N x V (logits per tensor)",
                           series=f"{dtype} {p['divergence']}")

    def configs(self, device, sizes, dtypes, opts):
        grid, default_dtypes = SIZES[(device, sizes)]
        return [self.make_config(dtype, {"N": n, "V": v}, {"divergence": div})
                for dtype in dtypes or default_dtypes
                for div in opts.get("divergence") or ["kl"]
                for n, v in grid]

    def make_inputs(self, cfg, device, seed):
        g = core.generator(device, seed)
        n, v = cfg.shape["N"], cfg.shape["V"]
        s = core.randn((n, v), cfg.torch_dtype, device, g, scale=2.0).requires_grad_(True)
        t = core.randn((n, v), cfg.torch_dtype, device, g, scale=2.0)
        y = torch.randint(0, v, (n,), device=device, generator=g)
        return {"s": s, "t": t, "y": y}

    def contenders(self, device, backends):
        def fastkd_build(backend):
            def build(cfg, inputs, dev):
                import fastkd
                p = cfg.params
                m = fastkd.KDLoss(temperature=p["temperature"], hard_weight=p["hard_weight"],
                                  divergence=p["divergence"], beta=p["beta"], backend=backend)
                return core.Step(lambda x: m(x["s"], x["t"], x["y"]), lambda x: [x["s"]])
            return build

        def stock_build(cfg, inputs, dev):
            p = cfg.params
            T, div, beta, hw = p["temperature"], p["divergence"], p["beta"], p["hard_weight"]
            return core.Step(lambda x: stock.kd(x["s"], x["t"], x["y"], T, div, beta, hw),
                             lambda x: [x["s"]])

        def liger_build(cfg, inputs, dev):
            p = cfg.params
            T = p["temperature"]
            soft, ce = _liger(p["divergence"], p["beta"])

            def loss(x):
                logq = F.log_softmax(x["s"] / T, dim=-1)
                logp = F.log_softmax(x["t"] / T, dim=-1)
                return soft(logq, logp) * (T * T) + p["hard_weight"] * ce(x["s"], x["y"])
            return core.Step(loss, lambda x: [x["s"]],
                             note="Liger divergence on torch log_softmax + LigerCrossEntropyLoss")

        stock_c = core.Contender("stock", "stock", build=stock_build)
        out = core.fastkd_contenders(device, backends, fastkd_build)
        out += [stock_c, core.compiled(stock_c)]
        skip = core.liger_skip(device)
        out.append(core.Contender("liger", "liger", skip=skip,
                                  build=None if skip else liger_build))
        return out

    def floor_work(self, cfg):
        nv = cfg.shape["N"] * cfg.shape["V"]
        elem = cfg.torch_dtype.itemsize
        return {"fwd": (2 * nv * elem, 0), "fwd_bwd": (3 * nv * elem, 0),
                "basis": "bytes: fwd reads s and t (2 x N*V*elem); fwd+bwd also writes the "
                         "gradient (3 x N*V*elem); / measured copy bandwidth"}


SUITE = LogitSuite()
