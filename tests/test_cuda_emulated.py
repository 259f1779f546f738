"""The CUDA kernels of csrc/cuda/, run on the CPU by the host CUDA emulator (csrc/emu/README.md).

Each test runs the production path — Python dispatch, torch glue, CUDA launcher, kernel — with
the launch configuration the launcher computes for a mock A100 (device 0) or H100 (device 1),
one fiber per CUDA thread, and compares with the float64 reference as the cpu backend's tests
do. Every memory access of a kernel is checked while it runs (out-of-bounds, misaligned vector
accesses, writes to inputs, shared memory beyond the launch, shared-memory races between
barriers; barriers and shuffles not reached by every thread): a violation fails the launch with
a RuntimeError naming it. The planted-bug tests prove each of those checks fires.

Shapes are small (the emulator runs every CUDA thread of a block as a fiber); the real block
sizes (128 threads for V <= 4096, 512 above and for several teachers) are what the launcher picks.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import cuda_emulator
import fastkd
from fastkd import _ext
from fastkd.functional import kd_loss
from fastkd.relation import ops as relation_ops

from test_feature import _check as feature_check, _make as feature_make
from test_logit import _case, _check as logit_check, _run as logit_run
from test_relation import _compare as relation_compare, _features

pytestmark = [
    pytest.mark.skipif(_ext._C is None, reason="fastkd._C is not built"),
    pytest.mark.skipif(cuda_emulator.unavailable_reason() is not None,
                       reason=str(cuda_emulator.unavailable_reason())),
]

A100, H100 = 0, 1
DIVS = ["kl", "reverse_kl", "jsd", "tvd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.emulator()


@pytest.fixture(params=[A100, H100], ids=["a100", "h100"])
def on_device(request, emu):
    with cuda_emulator.emulated_cuda(request.param) as e:
        yield e


def _emulated(device=A100):
    return cuda_emulator.emulated_cuda(device)


# ------------------------------------------------------------------------------------ planted bugs
PLANTED = [
    (1, "a barrier not reached by every thread"),
    (2, "different __syncthreads"),
    (3, "exited while its warp waits at a shuffle"),
    (4, "misaligned 16-byte read"),
    (5, "right after the end of in"),
    (6, "4 bytes before out"),
    (7, "write to the read-only in"),
    (8, "beyond the 256 bytes the launch requested"),
    (9, "shared-memory race"),
    (10, "shared-memory race"),
    (11, "launch refused by the mock runtime"),
]


@pytest.mark.parametrize("case,message", PLANTED, ids=[m.split()[0] + str(c) for c, m in PLANTED])
def test_planted_bug_is_caught(emu, case, message):
    """Each check of the emulator fires on a kernel with the bug and stays quiet without it.
    (The buggy run goes first: case 11's fix raises a per-kernel attribute that then stays.)"""
    rc = emu.lib.fastkd_emu_planted(case, 1)
    assert rc != 0, f"planted bug {case} was not detected"
    assert message in emu.last_error(), emu.last_error()
    assert emu.lib.fastkd_emu_planted(case, 0) == 0, emu.last_error()


def test_emulated_failure_reaches_python_as_runtime_error(emu):
    """A kernel fault inside the glue surfaces as a RuntimeError with the emulator's message (here:
    a launch refused because the test pretends the 512-thread kernel needs 255 registers per
    thread: 16 warps x 8192 registers > the 65536 of a block)."""
    s, ts, y = _case(2, 5000, torch.float32, "cpu")
    emu.lib.fastkd_emu_set_resources(b"logit_kd_kernel<false, 512, 2>@sm_80", 255, 0)
    try:
        with _emulated(A100):
            with pytest.raises(RuntimeError, match="too many resources requested"):
                kd_loss(s, ts[0], y, backend="cpu")
    finally:
        emu.lib.fastkd_emu_set_resources(b"logit_kd_kernel<false, 512, 2>@sm_80", 0, 0)
        emu._load_resources()


# ------------------------------------------------------------------------------------------- logit
LOGIT_VOCABS = [7, 100, 4096, 4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_logit_matches_reference(on_device, dtype, divergence):
    """Every divergence and dtype, V on both sides of the 128/512-thread switch, with and without
    the hard CE (label smoothing, ignore_index rows), several temperatures."""
    temps = [0.5, 1.0, 4.0, 20.0]
    for k, (vocab, with_target) in enumerate(itertools.product(LOGIT_VOCABS, [False, True])):
        s, ts, y = _case(3, vocab, dtype, "cpu", seed=k)
        kw = dict(temperature=temps[k % 4], divergence=divergence, beta=0.3)
        if with_target:
            kw.update(hard_weight=0.5, label_smoothing=0.1 if k % 2 else 0.0)
        got, ref = logit_run("cpu", s, ts, y if with_target else None, **kw)
        logit_check(got, ref, dtype)


@pytest.mark.parametrize("divergence", DIVS)
def test_logit_single_entry_vocab_hard_ce(on_device, divergence):
    """V = 1: q = p = 1, every gradient is exactly 0 (the hard-CE terms cancel exactly)."""
    s, ts, y = _case(3, 1, torch.float32, "cpu", seed=1)
    got, ref = logit_run("cpu", s, ts, y, divergence=divergence, temperature=1.0,
                         hard_weight=0.5, label_smoothing=0.1)
    logit_check(got, ref, torch.float32)


@pytest.mark.parametrize("divergence,dtype", [("kl", torch.float32), ("jsd", torch.bfloat16),
                                              ("tvd", torch.float16)])
def test_logit_large_vocab(divergence, dtype):
    """V = 33000 (512 threads, a row longer than the shared-memory row cache) on both devices."""
    for device in (A100, H100):
        s, ts, y = _case(2, 33000, dtype, "cpu", seed=7)
        with _emulated(device):
            got, ref = logit_run("cpu", s, ts, y, teacher_grad=True, divergence=divergence,
                                 temperature=2.0, hard_weight=0.5, label_smoothing=0.1)
        logit_check(got, ref, dtype)


@pytest.mark.parametrize("divergence", DIVS)
def test_logit_several_teachers(on_device, divergence):
    """1-3 teachers with weights (one of them 0), teacher gradients, fp32 and bf16."""
    for nt, dtype, vocab in [(2, torch.float32, 100), (3, torch.bfloat16, 4099),
                             (3, torch.float32, 7)]:
        s, ts, y = _case(3, vocab, dtype, "cpu", n_teachers=nt, seed=nt)
        weights = [3.0, 1.0, 0.0][:nt]
        got, ref = logit_run("cpu", s, ts, y, teacher_grad=True, divergence=divergence,
                             temperature=2.0, beta=0.7, hard_weight=0.3, teacher_weights=weights)
        logit_check(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logit_misaligned_rows_and_mixed_dtypes(on_device, dtype):
    """Row views that start off the 16-byte boundary: every row equally misaligned (row stride a
    multiple of 8 elements: vector path after a scalar head), rows misaligned differently (odd
    stride: element path), and aligned rows; then a float32 teacher for a `dtype` student."""
    vocab, n = 1003, 3
    for width, offset in [(1024, 1), (1024, 0), (1027, 3)]:
        g = torch.Generator().manual_seed(width + offset)
        big_s = (torch.randn(n, width, generator=g) * 3).to(dtype)
        big_t = (torch.randn(n, width, generator=g) * 3).to(dtype)
        s, t = big_s[:, offset:offset + vocab], big_t[:, offset:offset + vocab]
        y = torch.randint(0, vocab, (n,), generator=g)
        got, ref = logit_run("cpu", s, [t], y, teacher_grad=True, divergence="jsd",
                             temperature=3.0, hard_weight=0.5)
        logit_check(got, ref, dtype)
    s, _, y = _case(3, 517, dtype, "cpu", seed=5)
    _, ts, _ = _case(3, 517, torch.float32, "cpu", seed=6)
    got, ref = logit_run("cpu", s, ts, y, divergence="kl", temperature=2.0, hard_weight=0.2)
    logit_check(got, ref, dtype)


@pytest.mark.parametrize("divergence", DIVS)
def test_logit_masked_and_extreme(on_device, divergence):
    """-inf masked entries and logits of +-1e4 stay finite and exact (at T = 0.5 the rows are
    saturated: reverse KL's student gradient is exact only with its row sum shifted by the
    dominant entry)."""
    for dtype in DTYPES:
        s, ts, y = _case(3, 1003, dtype, "cpu", mask=True, seed=3)
        got, ref = logit_run("cpu", s, ts, y, teacher_grad=True, divergence=divergence,
                             temperature=2.0, hard_weight=1.0, label_smoothing=0.2)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
        logit_check(got, ref, dtype)
        s, ts, y = _case(3, 4099, dtype, "cpu", scale=1e4, seed=4)
        got, ref = logit_run("cpu", s, ts, y, divergence=divergence, temperature=0.5,
                             hard_weight=0.5)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
        logit_check(got, ref, dtype)


def test_logit_errors_flagged(on_device):
    """Out-of-range targets and all-masked rows raise the cpu kernel's errors (kernel flags)."""
    s, ts, y = _case(3, 100, torch.float32, "cpu", ignore=False)
    for bad_target in ([0, 100, 1], [0, -3, 1]):
        with pytest.raises(ValueError, match="target"):
            kd_loss(s, ts[0], torch.tensor(bad_target), backend="cpu")
    bad = s.clone()
    bad[1] = -math.inf
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(bad, ts[0], backend="cpu")
    bad = ts[0].clone()
    bad[2] = -math.inf
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(s, bad, backend="cpu")


# ----------------------------------------------------------------------------------------- feature

FEATURE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
def test_feature_rows_match_reference(on_device, loss, dtype):
    """[N, C] features (rows kernel: one warp per row) with channel and row counts off 32."""
    for n, ds, dt, reduction in [(37, 13, 45, "mean"), (5, 65, 33, "sum"), (9, 7, 70, "none")]:
        x, t, w, b = feature_make((n, ds), (n, dt), ds, dt, dtype, "cpu", seed=n)
        feature_check("cpu", x, t, w, b, loss=loss, channel_dim=-1, reduction=reduction,
                      chunk_size=16)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
def test_feature_maps_match_reference(on_device, loss, dtype):
    """NCHW maps read in place (columns kernel: 32 positions x 8 channel splits per block) with
    a position tail (35 = 32 + 3) and a chunk that splits an image."""
    for b_, ds, dt, hw, reduction in [(3, 5, 19, (7, 5), "mean"), (2, 9, 8, (6, 11), "none")]:
        x, t, w, b = feature_make((b_, ds, *hw), (b_, dt, *hw), ds, dt, dtype, "cpu", seed=b_)
        feature_check("cpu", x, t, w, b, loss=loss, channel_dim=1, reduction=reduction,
                      chunk_size=50)


def test_feature_without_adapter_and_teacher_grad(on_device):
    for loss in ("mse", "cosine"):
        x, t, _, _ = feature_make((11, 40), (11, 40), 40, 40, torch.float32, "cpu", seed=2)
        feature_check("cpu", x, t, None, None, loss=loss, channel_dim=-1, reduction="mean")


# ---------------------------------------------------------------------------------------- relation
@pytest.fixture
def small_tiles(monkeypatch):
    # Tiles of a few rows, so the sweeps cross several tiles with a tail tile.
    monkeypatch.setattr(relation_ops, "TILE_ELEMS", 7 * 64)


@pytest.mark.parametrize("loss", ["sp", "rkd", "rkd_dist", "pkt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relation_matches_reference(on_device, small_tiles, loss, dtype):
    """SP, RKD (distance + angle: the angle kernels' 32x8 blocks and 64-anchor blocks get tails at
    B = 70), PKT; batch and widths off the block multiples."""
    for b, ds, dt in [(37, 13, 29), (70, 33, 8)]:
        xs = _features(b, ds, dtype, "cpu", seed=b)
        xt = _features(b, dt, dtype, "cpu", seed=b + 1, offset=0.5)
        relation_compare(loss, xs, xt, "cpu", reduction="mean")
