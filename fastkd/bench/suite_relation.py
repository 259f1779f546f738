"""Suite ``relation``: ``fastkd.SPLoss()``, ``fastkd.RKDLoss(distance_weight=1.0,
angle_weight=2.0)`` (and its distance term alone, ``angle_weight=0``, for batches too large for the
angle) and ``fastkd.PKTLoss(eps=1e-7)`` against the stock formulas that materialise the B x B
matrices (:mod:`fastkd.bench.stock`; RKD angle: B x B x d and B x B x B), that code under
``torch.compile``; Liger-Kernel has no equivalent. The teacher side does not require grad.
Floor: the Gram FLOPs (forward: G_s and G_t, 2*B^2*(ds + dt); forward + backward: also
grad e_s = (dL/dG + dL/dG^T) e_s, 2*B^2*ds) at the measured ``torch.mm`` rate, or the bytes of the
features and the gradient at the copy bandwidth. It does not count the B^3 work of the RKD angle,
so it is a loose lower bound there.
"""
from __future__ import annotations

from fastkd.bench import core, stock

VARIANTS = {  # name: (fastkd class, constructor kwargs, stock function)
    "sp": ("SPLoss", {}, lambda fs, ft: stock.sp(fs, ft)),
    "rkd": ("RKDLoss", {"distance_weight": 1.0, "angle_weight": 2.0},
            lambda fs, ft: stock.rkd(fs, ft, 1.0, 2.0)),
    "rkd-distance": ("RKDLoss", {"distance_weight": 1.0, "angle_weight": 0.0},
                     lambda fs, ft: stock.rkd(fs, ft, 1.0, 0.0)),
    "pkt": ("PKTLoss", {"eps": 1e-7}, lambda fs, ft: stock.pkt(fs, ft, 1e-7)),
}

# Batch sizes B per variant group ("angle" = rkd with its angle term, "main" = the others; a key
# named after a variant replaces its group's list, [] leaves it out), feature dims d; dtypes.
SIZES = {
    # demo: SP and the full RKD (distance + angle) only, to keep the all-suite demo within two
    # minutes on 2 CPU cores (each config costs a torch.compile of the stock code, twice).
    ("cpu", "demo"): ({"main": [512], "angle": [128], "rkd-distance": [], "pkt": []}, [128],
                      ["float32"]),
    ("cpu", "quick"): ({"main": [256, 1024], "angle": [128, 256]}, [128], ["float32"]),
    ("cpu", "full"): ({"main": [1024, 4096], "angle": [256, 512]}, [128, 512], ["float32"]),
    ("cuda", "demo"): ({"main": [8192], "angle": [1024], "rkd-distance": [], "pkt": []}, [128],
                       ["float32"]),
    ("cuda", "quick"): ({"main": [1024, 8192], "angle": [1024]}, [128], ["float32"]),
    ("cuda", "full"): ({"main": [1024, 8192, 65536], "angle": [1024, 4096]}, [128, 512],
                       ["float32"]),
}


class RelationSuite(core.Suite):
    name = "relation"
    needs = ("SPLoss", "RKDLoss", "PKTLoss")

    def __init__(self):
        self.notes = []

    def unavailable(self):
        import fastkd
        if not any(hasattr(fastkd, n) for n in self.needs):
            return ", ".join(f"fastkd.{n}" for n in self.needs) + " not available yet"
        return None

    def make_config(self, dtype, shape, params=None):
        variant = (params or {}).get("loss", "sp")
        if variant not in VARIANTS:
            raise ValueError(f"relation loss must be one of {sorted(VARIANTS)}, got {variant!r}")
        b, ds, dt = shape["B"], shape["ds"], shape["dt"]
        d = f"d={ds}" if ds == dt else f"ds={ds} dt={dt}"
        return core.Config(suite=self.name, label=f"{variant} B={b} {d} {dtype}", dtype=dtype,
                           shape={"B": b, "ds": ds, "dt": dt}, params={"loss": variant},
                           size=float(b), size_label="B (batch)", series=f"{variant} {d} {dtype}")

    def configs(self, device, sizes, dtypes, opts):
        import fastkd
        batches, dims, default_dtypes = SIZES[(device, sizes)]
        self.notes = []
        out = []
        for variant, (cls, _, _) in VARIANTS.items():
            if not hasattr(fastkd, cls):
                self.notes.append(f"fastkd.{cls} not available yet: {variant} configs skipped")
                continue
            for dtype in dtypes or default_dtypes:
                for d in dims:
                    group = batches["angle" if variant == "rkd" else "main"]
                    for b in batches.get(variant, group):  # a variant may have its own list
                        out.append(self.make_config(dtype, {"B": b, "ds": d, "dt": d},
                                                    {"loss": variant}))
        return out

    def make_inputs(self, cfg, device, seed):
        g = core.generator(device, seed)
        b, ds, dt = cfg.shape["B"], cfg.shape["ds"], cfg.shape["dt"]
        return {"fs": core.randn((b, ds), cfg.torch_dtype, device, g).requires_grad_(True),
                "ft": core.randn((b, dt), cfg.torch_dtype, device, g)}

    def contenders(self, device, backends):
        wrt = lambda x: [x["fs"]]  # noqa: E731

        def fastkd_build(backend):
            def build(cfg, inputs, dev):
                import fastkd
                cls, kwargs, _ = VARIANTS[cfg.params["loss"]]
                if not hasattr(fastkd, cls):
                    raise core.NotApplicable(f"fastkd.{cls} not available yet")
                m = getattr(fastkd, cls)(**kwargs, backend=backend)
                return core.Step(lambda x: m(x["fs"], x["ft"]), wrt)
            return build

        def stock_build(cfg, inputs, dev):
            fn = VARIANTS[cfg.params["loss"]][2]
            return core.Step(lambda x: fn(x["fs"], x["ft"]), wrt)

        stock_c = core.Contender("stock", "stock", build=stock_build)
        out = core.fastkd_contenders(device, backends, fastkd_build)
        return out + [stock_c, core.compiled(stock_c), core.no_liger("relation loss")]

    def floor_work(self, cfg):
        b, ds, dt = cfg.shape["B"], cfg.shape["ds"], cfg.shape["dt"]
        elem = cfg.torch_dtype.itemsize
        fwd_flops = 2 * b * b * (ds + dt)
        read = elem * b * (ds + dt)
        return {"fwd": (read, fwd_flops), "fwd_bwd": (read + elem * b * ds,
                                                      fwd_flops + 2 * b * b * ds),
                "basis": "FLOPs of the Gram matrices (fwd 2*B^2*(ds+dt), fwd+bwd + 2*B^2*ds) / "
                         "measured mm rate, or feature bytes / copy bandwidth; the RKD angle's "
                         "B^3 work is not counted"}


SUITE = RelationSuite()
