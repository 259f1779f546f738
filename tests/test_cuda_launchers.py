"""The CUDA launchers against the emulator's mock runtime (csrc/emu/README.md).

The mock has the A100's and H100's limits (48 KiB of dynamic shared memory unless
cudaFuncSetAttribute raised the kernel's limit, the opt-in maximum per block, registers per
block from the committed ptxas table) and refuses every launch the real runtime would refuse.
Here the kernels are not executed (only launched), so real-size vocabularies cost nothing:
call sequences mix kernels, vocabularies, teacher counts, dtypes and the two devices in one
process, as a training job does, and every launch must be accepted. The blocks per SM that the
launcher's constants claim (``__launch_bounds__`` and its comments) must follow from the
registers and shared memory each launch asks for.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import cuda_emulator
from fastkd import _ext
from fastkd.functional import kd_loss

pytestmark = [
    pytest.mark.skipif(_ext._C is None, reason="fastkd._C is not built"),
    pytest.mark.skipif(cuda_emulator.unavailable_reason() is not None,
                       reason=str(cuda_emulator.unavailable_reason())),
]

RESOURCES = cuda_emulator.ROOT / "benchmarks" / "results" / "resources-cuda.json"
ARCH = {0: "sm_80", 1: "sm_90"}

# cudaDeviceAttr values (the real runtime's numbering)
ATTR_SMEM_PER_SM, ATTR_REGS_PER_SM, ATTR_THREADS_PER_SM = 81, 82, 39
ATTR_BLOCKS_PER_SM, ATTR_RESERVED_SMEM = 106, 111

#: Blocks per SM that csrc/cuda/logit_kd.cu claims for each logit kernel.
LOGIT_CLAIMS = {
    "logit_kd_kernel<false, 512, 2>": 2,
    "logit_kd_kernel<false, 128, 8>": 8,
    "logit_kd_kernel<true, 512, 1>": 1,
}


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.emulator()


def _logit_call(vocab, n_teachers=1, dtype=torch.float32, teacher_dtype=None, rows=2):
    s = torch.zeros(rows, vocab, dtype=dtype)
    ts = [torch.zeros(rows, vocab, dtype=teacher_dtype or dtype) for _ in range(n_teachers)]
    y = torch.zeros(rows, dtype=torch.long)
    kw = {"teacher_weights": [1.0] * n_teachers} if n_teachers > 1 else {}
    s.requires_grad_()
    kd_loss(s, ts if n_teachers > 1 else ts[0], y, hard_weight=0.5, backend="cpu", **kw)


# A job's worth of launches in one process: small vocabulary first (its kernel raises its own
# dynamic shared memory limit a little), then the large-vocabulary and several-teacher kernels,
# which need far more than 48 KiB, then the other device, then other dtypes.
SEQUENCE = [
    (0, dict(vocab=1000)),
    (0, dict(vocab=50000)),
    (0, dict(vocab=50000, n_teachers=3)),
    (1, dict(vocab=1000, dtype=torch.bfloat16)),
    (1, dict(vocab=128256, dtype=torch.bfloat16)),
    (1, dict(vocab=128256, n_teachers=2, dtype=torch.bfloat16)),
    (0, dict(vocab=128256, dtype=torch.float16)),
    (0, dict(vocab=4097, n_teachers=8)),
    (1, dict(vocab=4096)),
    (1, dict(vocab=33000, dtype=torch.bfloat16, teacher_dtype=torch.float32)),
    (0, dict(vocab=262144, dtype=torch.bfloat16)),
]


def test_mixed_launch_sequence_is_accepted(emu):
    """Every launch of a mixed sequence on two devices is accepted by the mock runtime (the
    dynamic-shared-memory attribute is raised for each kernel on each device it runs on)."""
    emu.take_launch_log()
    for device, kw in SEQUENCE:
        with cuda_emulator.emulated_cuda(device, execute=False):
            _logit_call(**kw)
    log = emu.take_launch_log()
    assert len(log) == len(SEQUENCE)
    refused = [entry for entry in log if entry["status"] != 0]
    assert not refused, refused
    # The sequence did reach all three logit kernels, on both devices, above 48 KiB.
    seen = {(e["kernel"], e["device"]) for e in log if e["dynamic_smem"] > 48 * 1024}
    for kernel in LOGIT_CLAIMS:
        if kernel != "logit_kd_kernel<false, 128, 8>":  # small rows never need 48 KiB
            assert {(kernel, 0), (kernel, 1)} <= seen, (kernel, seen)


def test_refusal_without_the_attribute(emu):
    """The mock refuses more than 48 KiB of dynamic shared memory for a kernel whose limit was
    never raised (the planted-bug test of the same check runs in test_cuda_emulated.py): a
    fresh kernel/device pair is the planted kernel 11 on device 1."""
    with cuda_emulator.emulated_cuda(1, execute=True):
        assert emu.lib.fastkd_emu_planted(11, 1) != 0
        assert "launch refused" in emu.last_error()


def _resources():
    assert RESOURCES.exists(), f"{RESOURCES} is missing: run scripts/cuda_resources.py"
    return json.loads(RESOURCES.read_text())


def _blocks_per_sm(emu, device, threads, regs, smem):
    attr = emu.lib.fastkd_emu_device_attribute
    warps = math.ceil(threads / 32)
    by_threads = attr(device, ATTR_THREADS_PER_SM) // (warps * 32)
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (attr(device, ATTR_REGS_PER_SM) // regs_per_warp) // warps
    per_block = smem + attr(device, ATTR_RESERVED_SMEM)
    by_smem = attr(device, ATTR_SMEM_PER_SM) // per_block
    return min(by_threads, by_regs, by_smem, attr(device, ATTR_BLOCKS_PER_SM))


@pytest.mark.parametrize("device", [0, 1], ids=["a100", "h100"])
def test_claimed_blocks_per_sm_follow_from_resources(emu, device):
    """For every logit launch of the sequence: registers (ptxas table) and shared memory
    (static from the table + the dynamic bytes the launcher asked for) give exactly the blocks
    per SM that the launcher's constants claim."""
    table = _resources()[ARCH[device]]
    emu.take_launch_log()
    for _, kw in SEQUENCE:
        with cuda_emulator.emulated_cuda(device, execute=False):
            _logit_call(**kw)
    checked = set()
    for entry in emu.take_launch_log():
        name = entry["kernel"]
        if name not in LOGIT_CLAIMS:
            continue
        res = table[name]
        threads = math.prod(entry["block"])
        got = _blocks_per_sm(emu, device, threads, res["regs"],
                             res["static_smem"] + entry["dynamic_smem"])
        assert got == LOGIT_CLAIMS[name], (name, entry, res, got)
        checked.add(name)
    assert checked == set(LOGIT_CLAIMS)


#: Blocks per SM that csrc/cuda/logit_topk.cu claims (its __launch_bounds__: at most 80
#: registers). Its dynamic shared memory (the listed-entry byte map) stays within 32 KiB, so no
#: launch needs the opt-in attribute.
TOPK_CLAIMS = {
    "logit_topk_kernel<256, 3>": 3,
    "logit_topk_kernel<128, 6>": 6,
}

TOPK_SEQUENCE = [
    (0, dict(vocab=1000, k=20)),
    (0, dict(vocab=50000, k=64)),
    (1, dict(vocab=4096, k=4096, dtype=torch.bfloat16)),
    (1, dict(vocab=128256, k=256, dtype=torch.bfloat16)),
    (0, dict(vocab=262144, k=8, dtype=torch.float16)),
    (1, dict(vocab=7, k=3)),
]


def _topk_call(vocab, k, dtype=torch.float32, rows=2):
    s = torch.zeros(rows, vocab, dtype=dtype, requires_grad=True)
    idx = torch.arange(k).expand(rows, k).contiguous()
    lp = torch.full((rows, k), -math.log(k))
    y = torch.zeros(rows, dtype=torch.long)
    kd_loss(s, None, y, teacher_topk=(idx, lp), hard_weight=0.5, backend="cpu")


@pytest.mark.parametrize("device", [0, 1], ids=["a100", "h100"])
def test_topk_launches_and_claimed_blocks_per_sm(emu, device):
    """Every top-k launch is accepted, and its registers (ptxas table) and shared memory give
    at least the blocks per SM its __launch_bounds__ claim (exactly on sm_90, whose 80
    registers are the cap; sm_80 needs 68, which leaves room for a seventh 128-thread CTA)."""
    table = _resources()[ARCH[device]]
    emu.take_launch_log()
    for _, kw in TOPK_SEQUENCE:
        with cuda_emulator.emulated_cuda(device, execute=False):
            _topk_call(**kw)
    log = [e for e in emu.take_launch_log() if e["kernel"] in TOPK_CLAIMS]
    assert len(log) == len(TOPK_SEQUENCE)
    assert all(e["status"] == 0 and e["dynamic_smem"] <= 32 * 1024 for e in log), log
    for entry in log:
        name = entry["kernel"]
        res = table[name]
        assert res["spill_stores"] == 0 and res["stack"] == 0, (name, res)
        got = _blocks_per_sm(emu, device, math.prod(entry["block"]), res["regs"],
                             res["static_smem"] + entry["dynamic_smem"])
        assert got >= TOPK_CLAIMS[name], (name, entry, res, got)
        if ARCH[device] == "sm_90":
            assert got == TOPK_CLAIMS[name], (name, entry, res, got)
    assert {e["kernel"] for e in log} == set(TOPK_CLAIMS)
