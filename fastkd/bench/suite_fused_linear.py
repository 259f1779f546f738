"""Suite ``fused-linear``: ``fastkd.FusedLinearKDLoss`` (logits never materialised) against the
stock ``s = h_s @ W_s.T``, ``t = h_t @ W_t.T`` (teacher under ``no_grad``) + the stock KD loss,
that code under ``torch.compile``, and Liger-Kernel's ``LigerFusedLinearJSDLoss``.

The divergence defaults to JSD with beta = 0.5 (Liger's computation; its beta convention has
changed between versions, beta = 0.5 is the same in all) plus the hard CE term, all weights 1.
Floor: the GEMM FLOPs (forward: student and teacher logits, 2 x 2*BT*H*V; forward + backward:
also grad h_s and grad W_s, 4 x 2*BT*H*V) at the measured ``torch.mm`` rate, or the bytes of
h_s, h_t, W_s, W_t and the gradients at the copy bandwidth, whichever is larger.
"""
from __future__ import annotations

import inspect
import math

import torch

from fastkd.bench import core, stock

TEMPERATURE = 2.0
BETA = 0.5

# (BT, H, V) grids; dtypes.
SIZES = {
    ("cpu", "demo"): ([(256, 256, 16000)], ["float32"]),
    ("cpu", "quick"): ([(128, 256, 16000), (512, 256, 16000)], ["float32"]),
    ("cpu", "full"): ([(512, 512, 32000), (2048, 512, 32000)], ["float32", "bfloat16"]),
    ("cuda", "demo"): ([(8192, 4096, 128256)], ["bfloat16"]),
    ("cuda", "quick"): ([(1024, 4096, 128256), (8192, 4096, 128256)], ["bfloat16"]),
    ("cuda", "full"): ([(bt, 4096, 128256) for bt in (1024, 8192, 32768)], ["bfloat16"]),
}


class FusedLinearSuite(core.Suite):
    name = "fused-linear"
    needs = ("FusedLinearKDLoss",)

    def __init__(self):
        self.notes = []

    def make_config(self, dtype, shape, params=None):
        p = {"temperature": TEMPERATURE, "divergence": "jsd", "beta": BETA, "hard_weight": 1.0}
        p.update(params or {})
        bt, h, v = shape["BT"], shape["H"], shape["V"]
        return core.Config(suite=self.name, label=f"BT={bt} H={h} V={v} {dtype} {p['divergence']}",
                           dtype=dtype, shape={"BT": bt, "H": h, "V": v}, params=p,
                           size=float(bt), size_label="BT (tokens)",
                           series=f"H={h} V={v} {dtype} {p['divergence']}")

    def configs(self, device, sizes, dtypes, opts):
        grid, default_dtypes = SIZES[(device, sizes)]
        return [self.make_config(dtype, {"BT": bt, "H": h, "V": v}, {"divergence": div})
                for dtype in dtypes or default_dtypes
                for div in opts.get("divergence") or ["jsd"]
                for bt, h, v in grid]

    def make_inputs(self, cfg, device, seed):
        g = core.generator(device, seed)
        bt, h, v = cfg.shape["BT"], cfg.shape["H"], cfg.shape["V"]
        dt = cfg.torch_dtype
        w_scale = 1.0 / math.sqrt(h)  # logits of unit scale
        return {
            "hs": core.randn((bt, h), dt, device, g).requires_grad_(True),
            "ws": core.randn((v, h), dt, device, g, scale=w_scale).requires_grad_(True),
            "ht": core.randn((bt, h), dt, device, g),
            "wt": core.randn((v, h), dt, device, g, scale=w_scale),
            "y": torch.randint(0, v, (bt,), device=device, generator=g),
        }

    def contenders(self, device, backends):
        wrt = lambda x: [x["hs"], x["ws"]]  # noqa: E731

        def fastkd_build(backend):
            def build(cfg, inputs, dev):
                import fastkd
                p = cfg.params
                fn = fastkd.FusedLinearKDLoss(temperature=p["temperature"],
                                              hard_weight=p["hard_weight"],
                                              divergence=p["divergence"], beta=p["beta"],
                                              backend=backend)
                return core.Step(lambda x: fn(x["hs"], x["ws"], x["ht"], x["wt"], target=x["y"]),
                                 wrt)
            return build

        def stock_build(cfg, inputs, dev):
            p = cfg.params
            T, div, beta, hw = p["temperature"], p["divergence"], p["beta"], p["hard_weight"]

            def loss(x):
                s = x["hs"] @ x["ws"].t()
                with torch.no_grad():
                    t = x["ht"] @ x["wt"].t()
                return stock.kd(s, t, x["y"], T, div, beta, hw)
            return core.Step(loss, wrt)

        def liger_build(cfg, inputs, dev):
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
            p = cfg.params
            m = LigerFusedLinearJSDLoss(weight_hard_loss=p["hard_weight"], weight_soft_loss=1.0,
                                        beta=BETA, temperature=p["temperature"])
            # Older releases take no bias arguments; newer ones require them (None is fine).
            n_args = len(inspect.signature(m.forward).parameters)
            extra = (None,) * max(0, n_args - 5)
            note = "LigerFusedLinearJSDLoss(beta=0.5) + CE"
            if p["divergence"] != "jsd":
                note += f" (JSD, not {p['divergence']}: same work)"
            return core.Step(lambda x: m(x["hs"], x["ws"], x["ht"], x["wt"], x["y"], *extra),
                             wrt, note=note)

        stock_c = core.Contender("stock", "stock", build=stock_build)
        out = core.fastkd_contenders(device, backends, fastkd_build)
        out += [stock_c, core.compiled(stock_c)]
        skip = core.liger_skip(device)
        out.append(core.Contender("liger", "liger", skip=skip,
                                  build=None if skip else liger_build))
        return out

    def floor_work(self, cfg):
        bt, h, v = cfg.shape["BT"], cfg.shape["H"], cfg.shape["V"]
        elem = cfg.torch_dtype.itemsize
        gemm = 2 * bt * h * v
        read = elem * (2 * v * h + 2 * bt * h)
        write = elem * (v * h + bt * h)
        return {"fwd": (read, 2 * gemm), "fwd_bwd": (read + write, 4 * gemm),
                "basis": "FLOPs: fwd 2 GEMMs (student, teacher logits), fwd+bwd 4 GEMMs "
                         "(+ grad h_s, grad W_s), 2*BT*H*V each, / measured mm rate; or bytes of "
                         "h, W (+ their gradients) / copy bandwidth, whichever is larger"}


SUITE = FusedLinearSuite()
