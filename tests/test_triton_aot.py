"""Ahead-of-time compilation of every Triton kernel configuration for sm_80 and sm_90 (no GPU
needed), the resource limits the dispatch choices were made for, and - under the interpreter -
the split grids those choices introduced, against the float64 reference.

Every configuration compiled is a ~7-minute job on 2 cores; its results are the committed table
``benchmarks/results/resources-triton.json`` (written by ``scripts/triton_resources.py``). By
default this suite checks that the table is current (it records the hash of the kernel sources
and the Triton version, and lists exactly the configurations the dispatchers pick now),
recompiles a sample (the first and last configuration of every kernel, both targets) and
requires the same resources as the table, then runs the resource checks on every row of the
table. A kernel change therefore fails here until the table is regenerated, which compiles
everything. ``FASTKD_AOT_FULL=1`` compiles every configuration in this session instead;
``FASTKD_AOT_CACHE=DIR`` keeps compile results between runs, keyed by the kernels' source hash.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from fastkd import _triton_aot as aot

triton = pytest.importorskip("triton")

MODULES = ("fastkd.logit.triton_kernel", "fastkd.feature.triton_kernel",
           "fastkd.relation.triton_kernel")


def _kernels_defined():
    import importlib
    names = set()
    for mod in MODULES:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                names.add(name)
    return names


@pytest.fixture(scope="module")
def configs():
    return aot.enumerate_launches()


TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "results", "resources-triton.json")
#: The resources a fresh compile must reproduce from the committed table.
COMPARED = ("num_warps", "num_stages", "regs", "spill_stores", "spill_loads", "stack", "shared",
            "static_smem", "tensor_cores")


@pytest.fixture(scope="module")
def table():
    import json
    with open(TABLE) as f:
        return json.load(f)


def _compile(configs, tmp_path_factory):
    cache = os.environ.get("FASTKD_AOT_CACHE") or str(tmp_path_factory.mktemp("aot-cache"))
    t0 = time.perf_counter()
    results = aot.compile_all(configs, workers=2, cache_dir=cache)
    print(f"\nahead-of-time compile: {len(configs)} configurations x {len(aot.TARGETS)} targets "
          f"in {time.perf_counter() - t0:.0f} s")
    return aot.rows(configs, results)


def test_committed_table_is_current(configs, table):
    """The committed table was compiled from today's kernel sources and Triton, and lists
    exactly the configurations the dispatchers pick now."""
    regenerate = "regenerate it: python scripts/triton_resources.py (about 7 minutes)"
    assert table["meta"].get("source_hash") == aot.source_hash(), \
        f"{TABLE} was compiled from other kernel sources or another Triton; {regenerate}"
    want = {(aot.config_key(c), f"sm_{a}") for c in configs for a in aot.TARGETS}
    have = {(r["key"], r["target"]) for r in table["rows"]}
    assert have == want, f"{len(want - have)} configurations missing from {TABLE} and " \
                         f"{len(have - want)} no longer picked; {regenerate}"


@pytest.fixture(scope="module")
def compiled(configs, table, tmp_path_factory):
    """Every (configuration, target) row with its resources: compiled now with
    FASTKD_AOT_FULL=1, otherwise the committed table, confirmed by compiling a sample."""
    if os.environ.get("FASTKD_AOT_FULL") == "1":
        return _compile(configs, tmp_path_factory)
    test_committed_table_is_current(configs, table)
    rows = {(r["key"], r["target"]): r for r in table["rows"]}
    for fresh in _compile(aot.sample(configs), tmp_path_factory):
        old = rows[(fresh["key"], fresh["target"])]
        assert "error" not in fresh, (fresh["kernel"], fresh["error"])
        assert {k: fresh[k] for k in COMPARED} == {k: old.get(k) for k in COMPARED}, \
            f"{fresh['kernel']} {fresh['target']}: compiled now {[fresh[k] for k in COMPARED]}, " \
            f"the table says {[old.get(k) for k in COMPARED]}"
    return table["rows"]


# ------------------------------------------------------------------------------- enumeration
def test_enumeration_covers_every_kernel(configs):
    """Every @triton.jit kernel of the three families is launched at the benchmark sizes."""
    seen = {c.name for c in configs}
    assert _kernels_defined() <= seen, _kernels_defined() - seen
    for c in configs:
        assert c.labels and all(c.grids.get(aot.LIMITS[a].sms) for a in aot.TARGETS), c.kernel
    keys = [c.key() for c in configs]
    assert len(keys) == len(set(keys))


def test_enumeration_axes(configs):
    logit = [c for c in configs if c.name == "_logit_kd_kernel"]
    axes = {(c.meta["NT"], c.meta["DIV"], c.meta["HARD"], c.meta["NEED_T_MASK"] != 0,
             c.pointer_dtypes().split(",")[0]) for c in logit}
    assert len(axes) == (len(aot.LOGIT_TEACHERS) * len(aot.LOGIT_DIVERGENCES) * 2 * 2 * 3)
    # Several teachers: each configuration also mixed in log space (teacher_mixture="logprob").
    logmix = {(c.meta["NT"], c.meta["DIV"], c.meta["HARD"], c.meta["NEED_T_MASK"] != 0,
               c.pointer_dtypes().split(",")[0]) for c in logit if c.meta["LOGMIX"]}
    assert logmix == {a for a in axes if a[0] > 1}
    fwd = [c for c in configs if c.name == "_feature_fwd_kernel"]
    assert {(c.meta["DOT"], c.meta["PREC"]) for c in fwd if c.meta["ADAPTER"]} >= {
        (0, "ieee"), (0, "tf32"), (1, "tf32"), (2, "tf32")}


def test_recorded_arguments_follow_specialisation():
    """Equal compile keys for launches that differ only in values Triton does not specialise on;
    different keys for an int that becomes 1 or loses its divisibility by 16."""
    k = aot._compile_key
    assert k(4096) == k(32000) != k(4099)
    assert k(1) != k(16) and k(2 ** 31) != k(2 ** 4 * 2 ** 20)
    assert k({"ptr": "float32", "offset": 0}) == k({"ptr": "float32", "offset": 64})
    assert k({"ptr": "float32", "offset": 4}) != k({"ptr": "float32", "offset": 0})


def test_occupancy_model():
    # 4 warps at 128 registers: 16 K registers per block, 4 blocks; 255 registers at 8 warps: 1
    assert aot.occupancy(90, 128, 4, 0) == 4
    assert aot.occupancy(80, 255, 8, 0) == 1
    assert aot.occupancy(90, 32, 4, 0) == 16          # threads: 2048 / 128
    assert aot.occupancy(80, 32, 4, 100 * 1024) == 1  # shared memory: 164 KB per SM
    assert aot.occupancy(80, 32, 4, 200 * 1024) == 0  # over the per-block maximum


def test_ptxas_log_parser():
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem\n")
    assert aot.parse_ptxas_log(log) == {"regs": 96, "stack": 8, "spill_stores": 12,
                                        "spill_loads": 16, "static_smem": 1024}
    with pytest.raises(RuntimeError, match="no ptxas resource line"):
        aot.parse_ptxas_log("ptxas fatal")


def test_compile_failure_is_reported(configs):
    """A configuration a GPU build would reject comes back as an error, not as a result."""
    c = next(c for c in configs if c.name == "_angle_t_kernel")
    bad = aot.Config(c.kernel, c.args, dict(c.meta, num_warps=3))
    res = aot.compile_all([bad], targets=(90,), workers=1)
    assert "error" in res[(0, 90)] and "num_warps" in res[(0, 90)]["error"]


# ------------------------------------------------------------------------- compile + resources
def test_every_configuration_compiles_for_sm80_and_sm90(compiled):
    failed = [(r["kernel"], r["target"], r["constexprs"], r["error"].strip().splitlines()[-1])
              for r in compiled if "error" in r]
    assert not failed, failed[:5]
    assert {r["target"] for r in compiled} == {f"sm_{a}" for a in aot.TARGETS}


def test_no_register_spills(compiled):
    """The tiles, warps and register budgets were chosen so that nothing spills to local
    memory. One exception is bounded rather than zero: in the feature forward kernel ptxas
    may trade a register or two for an extra resident block (sm_90, bf16 x float32 W cosine
    without stash: 80 registers, 3 blocks, 4 bytes); raising its register budget removes that
    but costs a block per SM in dozens of other forward configurations."""
    spills = [(r["kernel"], r["target"], r["constexprs"], r["spill_stores"], r["stack"])
              for r in compiled if "error" not in r
              and max(r["spill_stores"], r["stack"])
              > (8 if r["kernel"] == "_feature_fwd_kernel" else 0)]
    assert not spills, spills[:5]


def test_registers_fit_the_launch(compiled):
    for r in compiled:
        if "error" in r:
            continue
        # the block must be launchable: registers x threads within the SM's 64 K registers
        assert r["blocks_per_sm"] >= 1, r
        if r["maxnreg"]:
            assert r["regs"] <= r["maxnreg"], r
        if r["kernel"] == "_logit_kd_kernel":
            # a streaming kernel: at least 16 resident warps per SM
            assert r["blocks_per_sm"] * r["num_warps"] >= 16, r


def test_grids_fill_the_gpu(compiled):
    """The launches with the row-block grids that were too small (feature forward: 64 blocks
    per 4096-row chunk; relation sweeps: one block per 32 rows) now occupy every SM."""
    for r in compiled:
        if "error" in r or r["kernel"] not in ("_feature_fwd_kernel", "_stats_kernel",
                                               "_grad_kernel"):
            continue
        if r["kernel"] == "_feature_fwd_kernel" and r["constexprs"]["PHASE"] == 1 \
                and not (r["constexprs"]["WRITE_G"] or r["constexprs"]["WRITE_GX"]
                         or r["constexprs"]["WRITE_GT"]):
            continue  # cosine loss without gradients: reads 3 floats per row
        sms = aot.LIMITS[int(r["target"][3:])].sms
        assert r["grid_blocks"][0] >= sms, r


def test_tensor_cores_follow_the_precision_policy(compiled):
    for r in compiled:
        if "error" in r or r["kernel"] not in ("_feature_fwd_kernel", "_feature_dx_kernel",
                                               "_feature_dw_kernel"):
            continue
        c = r["constexprs"]
        if c.get("ADAPTER") is False or c.get("PHASE") == 1:
            continue
        tc = c["DOT"] in (1, 2) or c["PREC"] == "tf32"
        assert (r["tensor_cores"] != "-") == tc, r


# ------------------------------------------------------------------------- dispatch policies
def test_feature_gemm_dtype_policy(monkeypatch):
    from fastkd.feature import triton_kernel as fk
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert fk.gemm_operands(bf, bf, False, "ieee") == (1, "tf32")
    assert fk.gemm_operands(f16, f16, False, "ieee") == (2, "tf32")
    # mixed dtypes are promoted like F.linear(x.to(c), W.to(c)): float32, torch's precision
    assert fk.gemm_operands(bf, f32, False, "ieee") == (0, "ieee")
    assert fk.gemm_operands(bf, f16, False, "tf32") == (0, "tf32")
    monkeypatch.setattr(fk, "fp32_dot_precision", lambda: "tf32")
    assert fk.gemm_operands(f32, f32, False) == (0, "tf32")
    monkeypatch.setattr(fk, "fp32_dot_precision", lambda: "ieee")
    assert fk.gemm_operands(f32, f32, False) == (0, "ieee")


def test_fp32_dot_precision_follows_torch():
    from fastkd.feature import triton_kernel as fk
    assert fk.fp32_dot_precision() == "ieee"  # torch's default: full float32
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        try:
            mm.fp32_precision = "tf32"
            assert fk.fp32_dot_precision() == "tf32"
        finally:
            mm.fp32_precision = old
    assert fk.fp32_dot_precision() == "ieee"


def test_feature_column_splits_fill_the_gpu():
    from fastkd.feature import triton_kernel as fk
    for rows, dt in ((4096, 4096), (3136 * 4, 1024), (100, 4096)):
        blocks = math.ceil(rows / 64)
        splits, per = fk.column_splits(blocks, dt, 64, 132)
        assert per % 64 == 0 and (splits - 1) * per < dt <= splits * per
        assert blocks * splits >= min(2 * 132, blocks * math.ceil(dt / 64))
    assert fk.column_splits(64, 4096, 64, 132) == (8, 512)


def test_relation_column_splits_fill_the_gpu():
    from fastkd.relation import triton_kernel as rk
    assert rk.column_splits(32, 1024, 132) == (16, 64)
    assert rk.column_splits(2048, 65536, 132)[0] == 1
    for b, other in ((1024, 32), (4096, 512), (8192, 256), (40, 2)):
        splits, per = rk.column_splits(other, b, 132)
        assert per % rk.BLOCK_N == 0 and (splits - 1) * per < b <= splits * per
        assert other * splits >= min(2 * 132, other * math.ceil(b / rk.BLOCK_N))


def test_logit_launch_config():
    from fastkd.logit import triton_kernel as lk
    light = lk.launch_config(128256, 1, 0, False, False)
    assert light == {"BLOCK_V": 2048, "num_warps": 4, "maxnreg": lk.MAX_REGISTERS}
    assert lk.launch_config(32000, 1, 2, True, False)["BLOCK_V"] == 1024
    assert lk.launch_config(32000, 4, 1, True, False) == {"BLOCK_V": 512, "num_warps": 4,
                                                           "maxnreg": lk.MAX_REGISTERS}
    small = lk.launch_config(100, 1, 0, False, False)
    assert small["BLOCK_V"] == 128 and small["num_warps"] == 1
    assert lk.launch_config(32000, 1, 0, False, True) == {"BLOCK_V": 1024, "num_warps": 1}


# ------------------------------------------------------- split grids under the interpreter
def _interpreter_or_skip():
    from fastkd import _backend
    why = _backend._reason("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"triton on CPU tensors unavailable: {why}")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_feature_forward_split_over_teacher_channels(monkeypatch, loss, reduction):
    """Forward grid split over the teacher channels (3 splits, ragged last) = the reference."""
    _interpreter_or_skip()
    from fastkd.feature import triton_kernel as fk
    from fastkd.feature.ops import feature_kd_loss
    from fastkd.feature.reference import feature_kd_reference
    calls = []

    def three(row_blocks, dt, bn, sms):
        per = bn * math.ceil(math.ceil(dt / bn) / 3)
        calls.append(math.ceil(dt / per))
        return math.ceil(dt / per), per
    monkeypatch.setattr(fk, "column_splits", three)
    g = torch.Generator().manual_seed(0)
    n, ds, dt = 150, 40, 150  # 3 row blocks of 64, teacher channels 64 + 64 + 22
    x = torch.randn(n, ds, generator=g, dtype=torch.float64).float().requires_grad_(True)
    t = torch.randn(n, dt, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = (torch.randn(dt, ds, generator=g, dtype=torch.float64) / ds ** 0.5).float() \
        .requires_grad_(True)
    b = (0.1 * torch.randn(dt, generator=g, dtype=torch.float64)).float().requires_grad_(True)
    out = feature_kd_loss(x, t, w, b, loss=loss, reduction=reduction, backend="triton",
                          chunk_size=100)
    ins = [v.detach().double().requires_grad_(True) for v in (x, t, w, b)]
    ref = feature_kd_reference(*ins, loss=loss, reduction=reduction)
    assert calls and max(calls) == 3
    assert _rel(out, ref) < 1e-5
    seed = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * seed).sum(), (x, t, w, b))
    ref_grads = torch.autograd.grad((ref * seed).sum(), ins)
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-4


@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_relation_sweeps_split_over_columns(monkeypatch, loss):
    """Relation sweeps with the column loop split between programs (3 splits) = reference."""
    _interpreter_or_skip()
    import fastkd
    from fastkd.relation import triton_kernel as rk
    calls = []

    def three(other_blocks, b, sms):
        tiles = math.ceil(b / rk.BLOCK_N)
        per = math.ceil(tiles / 3)
        calls.append(math.ceil(tiles / per))
        return math.ceil(tiles / per), per * rk.BLOCK_N
    monkeypatch.setattr(rk, "column_splits", three)
    g = torch.Generator().manual_seed(1)
    bsz = 90  # 3 column tiles of 32, the last ragged
    fs = torch.randn(bsz, 24, generator=g, dtype=torch.float64)
    ft = torch.randn(bsz, 20, generator=g, dtype=torch.float64)
    cls = {"sp": fastkd.SPLoss, "rkd": fastkd.RKDLoss, "pkt": fastkd.PKTLoss}[loss]
    xs = fs.float().requires_grad_(True)
    xt = ft.float().requires_grad_(True)
    out = cls(backend="triton")(xs, xt)
    ins = [fs.clone().requires_grad_(True), ft.clone().requires_grad_(True)]
    ref = cls(backend="reference")(*ins)
    assert calls and max(calls) == 3
    assert _rel(out, ref) < 1e-5
    grads = torch.autograd.grad(out, (xs, xt))
    ref_grads = torch.autograd.grad(ref, ins)
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-4
