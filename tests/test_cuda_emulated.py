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
from fastkd.logit import topk as topk_ops
from fastkd.logit.config import FLAG_STUDENT_MASKED, FLAG_TARGET, LogitKDConfig
from fastkd.logit.reference import kd_rows_topk_reference
from fastkd.relation import ops as relation_ops

from _helpers import assert_close_grad, assert_close_loss
from test_feature import _check as feature_check, _make as feature_make
from test_logit import _case, _check as logit_check, _run as logit_run
from test_relation import _compare as relation_compare, _features
from test_topk_kernels import Kernel, _check as topk_check, _run as topk_run
from test_topk_kernels import _student as topk_student, _teacher as topk_teacher

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


@pytest.mark.parametrize("divergence", DIVS)
def test_logit_log_mixture(on_device, divergence):
    """teacher_mixture="logprob" (the mixture is one teacher of logits sum_i w_i t_i): 2-3
    teachers (one of weight 0), -inf shared by all and (but reverse KL, infinite there) in one
    teacher only, teacher gradients, every dtype, T in {1, 2.5}."""
    for nt, dtype, vocab, temp in [(2, torch.float32, 100, 2.5), (3, torch.bfloat16, 4099, 1.0),
                                   (3, torch.float16, 7, 2.5)]:
        s, ts, y = _case(3, vocab, dtype, "cpu", n_teachers=nt, mask=True, seed=nt)
        if divergence != "reverse_kl":
            ts[0][:, 2] = -math.inf
        got, ref = logit_run("cpu", s, ts, y, teacher_grad=True, divergence=divergence,
                             temperature=temp, beta=0.7, hard_weight=0.3,
                             teacher_weights=[3.0, 1.0, 0.0][:nt], teacher_mixture="logprob")
        logit_check(got, ref, dtype)


def test_logit_log_mixture_disjoint_raises(on_device):
    """A counted row whose teachers' unmasked entries do not overlap: ValueError (kernel flag)."""
    s, ts, y = _case(3, 100, torch.float32, "cpu", n_teachers=2, ignore=False)
    ts[0][2, :50] = -math.inf
    ts[1][2, 50:] = -math.inf
    with pytest.raises(ValueError, match="log mixture"):
        kd_loss(s, ts, y, backend="cpu", teacher_mixture="logprob")


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


# ------------------------------------------------------------------------------------------- top-k
# The fused top-k kernel (csrc/cuda/logit_topk.cu) through the cpu backend's glue, emulated: the
# cases of test_topk_kernels.py (same helpers and tolerances) at the CUDA launch configuration
# (128 threads for V <= 4096, 256 above; byte-map windows of 32768 entries).
TOPK = Kernel(lambda *args, **_launch: topk_ops.FUSED_KERNELS["cpu"](*args), "cpu")


def _topk_launches(emu):
    return [e["kernel"] for e in emu.take_launch_log() if "logit_topk" in e["kernel"]]


@pytest.mark.parametrize("divergence", DIVS)
def test_topk_matches_reference(on_device, divergence):
    """k = 1, 20, V (empty residual) at V = 100 (128 threads) and V = 4099 (256 threads, a
    partial chunk); T = 1 and 2.5; hard CE (label smoothing at T = 2.5), an ignored row,
    grad_scale. Every launch is the CUDA kernel's."""
    on_device.take_launch_log()
    for vocab, temperature in [(100, 1.0), (4099, 2.5)]:
        for case, k in enumerate([1, 20, vocab]):
            idx, lp = topk_teacher(3, vocab, k, temperature, seed=case)
            s = topk_student(3, vocab, seed=case)
            y = torch.randint(0, vocab, (3,), generator=torch.Generator().manual_seed(case))
            y[1] = -100
            cfg = LogitKDConfig(temperature=temperature, divergence=divergence, beta=0.3,
                                hard_weight=0.5,
                                label_smoothing=0.1 if temperature != 1.0 else 0.0)
            rows, grad = topk_check(TOPK, s, idx, lp, y, cfg, what=f"V={vocab} k={k}",
                                    grad_scale=0.25)
            assert rows[1] == 0 and (grad[1] == 0).all()
    assert _topk_launches(on_device) == ["logit_topk_kernel<128, 6>"] * 3 + \
        ["logit_topk_kernel<256, 3>"] * 3


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype,device", [(torch.bfloat16, A100), (torch.float16, H100)],
                         ids=["bf16-a100", "fp16-h100"])
def test_topk_half_student(divergence, dtype, device):
    """Half-precision students, gradient in their dtype; V = 257 and 4100."""
    with _emulated(device):
        for vocab in (257, 4100):
            idx, lp = topk_teacher(3, vocab, 20, 2.0, seed=7)
            s = topk_student(3, vocab, seed=7, dtype=dtype)
            cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.7, t2_scale=False)
            topk_check(TOPK, s, idx, lp, None, cfg, what=f"V={vocab}")


def test_topk_jsd_endpoints(on_device):
    """JSD at beta 0 / 1 is KL / reverse KL exactly (as the cpu kernel maps it)."""
    idx, lp = topk_teacher(3, 100, 10, 3.0, seed=3, dtype=torch.float32)
    s = topk_student(3, 100, seed=3)
    for beta, other in ((0.0, "kl"), (1.0, "reverse_kl")):
        cfg = LogitKDConfig(temperature=3.0, divergence="jsd", beta=beta, soft_weight=0.7)
        rows, grad = topk_check(TOPK, s, idx, lp, None, cfg, what=f"beta={beta}")
        cfg2 = LogitKDConfig(temperature=3.0, divergence=other, soft_weight=0.7)
        rows2, grad2, _ = TOPK(s, idx, lp, None, cfg2, None, True)
        assert torch.equal(rows, rows2) and torch.equal(grad, grad2)


@pytest.mark.parametrize("divergence", DIVS)
def test_topk_residual_edges(on_device, divergence):
    """Listed mass 1 + 5e-4 (P_res = 0, the excess counts); every unlisted entry -inf (empty
    residual); a residual of ~1e-9 (summed directly, not as 1 - sum Q_j)."""
    k = 12
    idx, lp = topk_teacher(3, 64, k, 1.0, seed=11, dtype=torch.float32)
    lp = (torch.log_softmax(lp.double(), -1) + math.log1p(5e-4)).float()
    s = topk_student(3, 64, seed=11)
    cfg = LogitKDConfig(divergence=divergence, beta=0.4)
    if divergence != "reverse_kl":
        topk_check(TOPK, s, idx, lp, None, cfg, what="excess")
    else:  # P_res = 0 < Q_res: infinite
        rows, _, ref, _ = topk_run(TOPK, s, idx, lp, None, cfg)
        assert torch.isinf(ref).all() and torch.isinf(rows).all()
    masked = torch.full_like(s, -math.inf).scatter(-1, idx, s.gather(-1, idx))
    _, lp2 = topk_teacher(3, 64, k, 1.0, seed=12)
    topk_check(TOPK, masked, idx, lp2, None, cfg, what="empty")
    idx3, lp3 = topk_teacher(4, 200, 16, 1.0, seed=5)
    g = torch.Generator().manual_seed(5)
    tiny = torch.randn(4, 200, generator=g) - 25.0
    tiny.scatter_(-1, idx3, torch.randn(4, 16, generator=g))
    cfg = LogitKDConfig(divergence=divergence, beta=0.5, hard_weight=0.3)
    topk_check(TOPK, tiny, idx3, lp3, idx3[:, 0].clone(), cfg, what="tiny")


@pytest.mark.parametrize("divergence", DIVS)
def test_topk_masked_and_extreme(on_device, divergence):
    """Logits of +-1e4 (listed ones near +1e4, some listed and the rest near -1e4: the residual
    ~e^-2e4, summed relative to its own max), at T = 1 with the hard CE and at T = 0.5; -inf
    entries, unlisted and listed (where the divergence stays finite), with label smoothing."""
    k, vocab = 16, 200
    idx, lp = topk_teacher(4, vocab, k, 1.0, seed=5)
    g = torch.Generator().manual_seed(6)
    far = -1e4 + torch.randn(4, vocab, generator=g)
    far.scatter_(-1, idx, 1e4 + torch.randn(4, k, generator=g))
    far[0, idx[0, :4]] = -1e4
    y = idx[:, 0].clone()
    y[2] = int(torch.nonzero(~torch.zeros(vocab, dtype=torch.bool).scatter(0, idx[2], True))[0])
    for temperature in (1.0, 0.5):
        cfg = LogitKDConfig(temperature=temperature, divergence=divergence, beta=0.5,
                            hard_weight=0.3)
        rows, grad = topk_check(TOPK, far, idx, lp, y, cfg, what=f"far T={temperature}")
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    idx, lp = topk_teacher(4, 150, 20, 2.0, seed=9)
    s = topk_student(4, 150, seed=9)
    unlisted = torch.ones(4, 150, dtype=torch.bool).scatter(-1, idx, False)
    s[unlisted & (torch.arange(150) % 3 == 0)] = -math.inf
    if divergence != "kl":  # Q = 0 < P is infinite for KL(P || Q)
        s[0, idx[0, 3]] = -math.inf
    cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=1.0,
                        label_smoothing=0.2)
    topk_check(TOPK, s, idx, lp, idx[:, 1].clone(), cfg, what="masked")


def _compact(idx, lp):
    """Each row's non-empty slots first, -1 after (the same teacher without padding where every
    row has the same count)."""
    order = torch.argsort((idx < 0).to(torch.int8), dim=-1, stable=True)
    return idx.gather(-1, order), lp.gather(-1, order)


@pytest.mark.parametrize("divergence", DIVS)
def test_topk_empty_slots(on_device, divergence):
    """Slots of index -1 (rows with fewer entries, padding): P = Q = 0, their logprob not read
    (NaN there), no gradient from them. Against the reference, and equal to the same teacher
    without the padding."""
    vocab, k = 300, 24
    idx, lp = topk_teacher(4, vocab, k, 2.0, seed=21, dtype=torch.float32)
    pad = torch.zeros(4, k, dtype=torch.bool)
    pad[0, 20:] = True          # trailing padding
    pad[1, ::3] = True          # interleaved
    pad[3, 1:] = True           # one entry left
    idx = idx.masked_fill(pad, -1)
    lp_nan = lp.masked_fill(pad, math.nan)
    s = topk_student(4, vocab, seed=21)
    y = torch.tensor([3, 7, -100, 11])
    cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.4,
                        label_smoothing=0.1)
    rows, grad, flags = TOPK(s, idx, lp_nan, y, cfg, torch.tensor([0.5]), True)
    assert int(flags) == 0
    sd = s.double().requires_grad_()
    ref = kd_rows_topk_reference(sd, idx, lp.double(), y, **cfg.reference_kwargs())
    ref.backward(torch.full_like(ref, 0.5))
    assert_close_loss(rows, ref, torch.float32, "padded loss")
    assert_close_grad(grad, sd.grad, torch.float32, "padded grad")
    # Row 1 without its padding: the same row of a k = 16 teacher.
    keep = ~pad[1]
    rows1, grad1, _ = TOPK(s[1:2], idx[1:2, keep], lp[1:2, keep], y[1:2], cfg,
                           torch.tensor([0.5]), True)
    torch.testing.assert_close(rows1[0], rows[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad1[0], grad[1], rtol=1e-5, atol=1e-9)
    # Compacted order gives the same result as interleaved (-1 anywhere in the row).
    cidx, clp = _compact(idx, lp_nan)
    rows2, grad2, _ = TOPK(s, cidx, clp, y, cfg, torch.tensor([0.5]), True)
    torch.testing.assert_close(rows2, rows, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-9)


def test_topk_flags_loss_only_and_ignored_rows(on_device):
    """Loss only (no gradient) equals the loss with it; an ignored row full of NaN stays out;
    NaN in a counted row reaches its loss; a bad target and a counted all -inf row raise their
    flags with loss 0 and gradient 0."""
    idx, lp = topk_teacher(4, 50, 5, 1.0, seed=2)
    s = topk_student(4, 50, seed=2)
    s[2] = math.nan
    y = torch.tensor([3, 7, 5, 9])
    cfg = LogitKDConfig(hard_weight=1.0, label_smoothing=0.1, ignore_index=5)
    rows, grad, ref, _ = topk_run(TOPK, s, idx, lp, y, cfg)
    assert rows[2] == 0 and (grad[2] == 0).all() and torch.isfinite(grad).all()
    assert_close_loss(rows, ref, torch.float32)
    rows2, none, flags = TOPK(s, idx, lp, y, cfg, None, False)
    assert none is None and int(flags) == 0 and torch.equal(rows2, rows)
    s_nan = s.clone()
    s_nan[3, int(idx[3, 0])] = math.nan
    s_nan[0, [i for i in range(50) if i not in idx[0].tolist()][0]] = math.nan
    rows3, _, flags = TOPK(s_nan, idx, lp, y, cfg, None, True)
    assert int(flags) == 0 and torch.isnan(rows3[[0, 3]]).all() and torch.isfinite(rows3[1])
    s[1] = -math.inf
    y[0] = 50
    rows4, grad4, flags = TOPK(s, idx, lp, y, cfg, None, True)
    assert int(flags) == FLAG_TARGET | FLAG_STUDENT_MASKED
    assert (rows4[:3] == 0).all() and (grad4[:3] == 0).all()


@pytest.mark.parametrize("dtype,device", [(torch.float32, H100), (torch.bfloat16, A100)],
                         ids=["fp32-h100", "bf16-a100"])
def test_topk_large_vocab(dtype, device):
    """V = 33000: two byte-map windows (listed entries in both), 256 threads; k = 64."""
    vocab, k = 33000, 64
    with _emulated(device):
        idx, lp = topk_teacher(2, vocab, k, 2.0, seed=31)
        idx[:, 0] = vocab - 1  # in the second window for sure (and the last element)
        s = topk_student(2, vocab, seed=31, dtype=dtype)
        y = torch.tensor([5, vocab - 3])
        cfg = LogitKDConfig(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.5,
                            label_smoothing=0.1)
        topk_check(TOPK, s, idx, lp, y, cfg, what="V=33000")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_misaligned_rows(on_device, dtype):
    """Row views off the 16-byte boundary: equally misaligned rows (scalar head, then chunks)
    and rows misaligned differently (element path)."""
    vocab, n = 1003, 3
    for width, offset in [(1024, 1), (1027, 3)]:
        g = torch.Generator().manual_seed(width + offset)
        big = (torch.randn(n, width, generator=g) * 3).to(dtype)
        s = big[:, offset:offset + vocab]
        idx, lp = topk_teacher(n, vocab, 30, 2.0, seed=width)
        y = torch.randint(0, vocab, (n,), generator=g)
        cfg = LogitKDConfig(temperature=2.0, divergence="tvd", hard_weight=0.5)
        topk_check(TOPK, s, idx, lp, y, cfg, what=f"offset {offset}")


def test_topk_public_api_mean(on_device):
    """fastkd.KDLoss with teacher_topk on the cpu backend, reduction mean (grad_scale 1 / the
    counted rows), runs the emulated CUDA kernel; loss and gradient match the reference."""
    idx, lp = topk_teacher(5, 700, 8, 2.0, seed=41)
    s = topk_student(5, 700, seed=41).requires_grad_()
    y = torch.tensor([1, -100, 3, 4, 5])
    loss_fn = fastkd.KDLoss(temperature=2.0, divergence="reverse_kl", hard_weight=0.2,
                            reduction="mean", backend="cpu")
    on_device.take_launch_log()
    loss = loss_fn(s, target=y, teacher_topk=(idx, lp))
    loss.backward()
    assert _topk_launches(on_device) == ["logit_topk_kernel<128, 6>"]
    sd = s.detach().double().requires_grad_()
    cfg = LogitKDConfig(temperature=2.0, divergence="reverse_kl", hard_weight=0.2)
    ref = kd_rows_topk_reference(sd, idx, lp.double(), y, **cfg.reference_kwargs()).sum() / 4
    ref.backward()
    assert_close_loss(loss, ref, torch.float32)
    assert_close_grad(s.grad, sd.grad, torch.float32)
