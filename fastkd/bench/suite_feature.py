"""Suite ``feature``: ``fastkd.FeatureKDLoss(student_dim, teacher_dim, bias=True, loss="mse")``
against ``F.mse_loss(nn.Linear(student_dim, teacher_dim)(x), t)`` (and ``"cosine"``: mean of
1 - ``F.cosine_similarity``), that code under ``torch.compile``; Liger-Kernel has no equivalent.
Both adapters start from the same weight and bias. Gradients go to x, the weight and the bias.
Floor: 3 GEMMs of 2*N*Ds*Dt FLOPs (y = x W^T, grad x, grad W; the forward alone: 1) at the
measured ``torch.mm`` rate, or the bytes of x, t, W and the gradients at the copy bandwidth.
"""
from __future__ import annotations

import math

import torch

from fastkd.bench import core, stock

# (N, Ds, Dt) grids; dtypes; losses.
SIZES = {
    ("cpu", "demo"): ([(4096, 256, 1024)], ["float32"], ["mse"]),
    ("cpu", "quick"): ([(2048, 256, 1024), (8192, 256, 1024)], ["float32"], ["mse"]),
    ("cpu", "full"): ([(8192, 512, 1024), (32768, 512, 1024)], ["float32", "bfloat16"],
                      ["mse", "cosine"]),
    ("cuda", "demo"): ([(65536, 1024, 4096)], ["bfloat16"], ["mse"]),
    ("cuda", "quick"): ([(8192, 1024, 4096), (65536, 1024, 4096)], ["bfloat16"], ["mse"]),
    ("cuda", "full"): ([(n, ds, 4096) for ds in (1024, 2048) for n in (8192, 65536)],
                       ["bfloat16", "float32"], ["mse", "cosine"]),
}


def _copy_adapter(module, weight, bias):
    """Give ``module`` the shared initial weight/bias when it exposes them as ``weight``/``bias``
    (the values matter only for the loss cross-check; the timing does not depend on them)."""
    with torch.no_grad():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == weight.shape:
            w.copy_(weight)
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and b.shape == bias.shape:
            b.copy_(bias)


class FeatureSuite(core.Suite):
    name = "feature"
    needs = ("FeatureKDLoss",)

    def __init__(self):
        self.notes = []

    def make_config(self, dtype, shape, params=None):
        p = {"loss": "mse"}
        p.update(params or {})
        n, ds, dt = shape["N"], shape["Ds"], shape["Dt"]
        return core.Config(suite=self.name, label=f"N={n} {ds}->{dt} {dtype} {p['loss']}",
                           dtype=dtype, shape={"N": n, "Ds": ds, "Dt": dt}, params=p,
                           size=float(n), size_label="N (feature rows)",
                           series=f"{ds}->{dt} {dtype} {p['loss']}")

    def configs(self, device, sizes, dtypes, opts):
        grid, default_dtypes, losses = SIZES[(device, sizes)]
        return [self.make_config(dtype, {"N": n, "Ds": ds, "Dt": dt}, {"loss": loss})
                for dtype in dtypes or default_dtypes
                for loss in losses
                for n, ds, dt in grid]

    def make_inputs(self, cfg, device, seed):
        g = core.generator(device, seed)
        n, ds, dt = cfg.shape["N"], cfg.shape["Ds"], cfg.shape["Dt"]
        typ = cfg.torch_dtype
        return {
            "x": core.randn((n, ds), typ, device, g).requires_grad_(True),
            "t": core.randn((n, dt), typ, device, g),
            "weight": core.randn((dt, ds), typ, device, g, scale=1.0 / math.sqrt(ds)),
            "bias": core.randn((dt,), typ, device, g, scale=0.1),
        }

    def contenders(self, device, backends):
        def fastkd_build(backend):
            def build(cfg, inputs, dev):
                import fastkd
                ds, dt = cfg.shape["Ds"], cfg.shape["Dt"]
                m = fastkd.FeatureKDLoss(ds, dt, bias=True, loss=cfg.params["loss"],
                                         channel_dim=-1, reduction="mean", backend=backend)
                m = m.to(device=dev, dtype=cfg.torch_dtype)
                _copy_adapter(m, inputs["weight"], inputs["bias"])
                params = [p for p in m.parameters() if p.requires_grad]
                return core.Step(lambda x: m(x["x"], x["t"]), lambda x: [x["x"], *params])
            return build

        def stock_build(cfg, inputs, dev):
            ds, dt = cfg.shape["Ds"], cfg.shape["Dt"]
            lin = torch.nn.Linear(ds, dt, bias=True, device=dev, dtype=cfg.torch_dtype)
            _copy_adapter(lin, inputs["weight"], inputs["bias"])
            loss = cfg.params["loss"]
            return core.Step(lambda x: stock.feature(lin(x["x"]), x["t"], loss),
                             lambda x: [x["x"], lin.weight, lin.bias])

        stock_c = core.Contender("stock", "stock", build=stock_build)
        out = core.fastkd_contenders(device, backends, fastkd_build)
        return out + [stock_c, core.compiled(stock_c), core.no_liger("feature-adapter loss")]

    def floor_work(self, cfg):
        n, ds, dt = cfg.shape["N"], cfg.shape["Ds"], cfg.shape["Dt"]
        elem = cfg.torch_dtype.itemsize
        gemm = 2 * n * ds * dt
        read = elem * (n * ds + n * dt + ds * dt)
        write = elem * (n * ds + ds * dt)
        return {"fwd": (read, gemm), "fwd_bwd": (read + write, 3 * gemm),
                "basis": "FLOPs: 2*N*Ds*Dt per GEMM, fwd 1 GEMM, fwd+bwd 3 (y, grad x, grad W), "
                         "/ measured mm rate; or bytes of x, t, W (+ grad x, grad W) / copy "
                         "bandwidth, whichever is larger"}


SUITE = FeatureSuite()
