"""fastkd inside torch.distributed, with real process groups (gloo on CPU, 2 and 3 ranks).

Spawning a group costs seconds, so each world size is spawned once (a module-scoped fixture):
every rank runs all the checks of that world size in order and records, per check, ``None`` or
the error; the tests below then report one result per check. Every check compares against the
single-process result on the full data (vocabulary or batch), computed on each rank:

- vocabulary-parallel logit KD (``fastkd.distributed.vocab_parallel_kd_loss``,
  ``KDLoss(process_group=...)``): loss and the shard gradients (student, teachers) equal the
  full-vocabulary reference, float64 to 1e-10, float32/bfloat16 to the SPEC tolerances;
- relation KD with ``gather=True`` (SP, RKD distance + angle, PKT): the loss equals the loss on
  the concatenated batch and each rank's gradient its slice of the single-process gradient;
- DDP (and FSDP2 where it runs on CPU) training of a small student with KDLoss + CE + a gathered
  relation loss gives the parameters of single-process training on the concatenated batch.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import pickle
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd import distributed as fdist
from fastkd.functional import kd_loss

F64 = torch.float64


# ----------------------------------------------------------------------------- data helpers
def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    den = ref.norm()
    return float((x - ref).norm() / den) if den > 0 else float((x - ref).norm())


def _close(x, ref, tol, what):
    assert x is not None, f"{what}: missing"
    assert torch.isfinite(x).all(), f"{what}: non-finite values {x}"
    err = _rel(x, ref)
    assert err <= tol, f"{what}: rel err {err:.3g} > {tol:.1g}\n{x}\nvs\n{ref}"


def _logit_data(seed, lead, vocab, n_teachers, *, masks, target, ignore_frac=0.3, dtype=F64,
                near=False):
    """Full-vocabulary student/teacher logits (float64) and target, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vocab, generator=g, dtype=F64) * 2
    noise = 0.01 if near else 2.0  # near: teachers close to the student (small divergences)
    ts = [torch.randn(*lead, vocab, generator=g, dtype=F64) * noise + s * (1.0 if near else 0.5)
          for _ in range(n_teachers)]
    if masks:
        common = torch.rand(*lead, vocab, generator=g) < 0.15
        s = s.masked_fill(common, -math.inf)
        ts = [t.masked_fill(common, -math.inf) for t in ts]
        if masks == "independent":  # masks that differ between student and teachers (jsd, tvd)
            s = s.masked_fill(torch.rand(*lead, vocab, generator=g) < 0.1, -math.inf)
            ts = [t.masked_fill(torch.rand(*lead, vocab, generator=g) < 0.1, -math.inf)
                  for t in ts]
        # One row whose first 4 columns (a whole shard on some rank) are -inf on every side.
        s.view(-1, vocab)[1, :4] = -math.inf
        for t in ts:
            t.view(-1, vocab)[1, :4] = -math.inf
    tgt = None
    if target:
        tgt = torch.randint(0, vocab, lead, generator=g)
        tgt = torch.where(torch.rand(lead, generator=g) < ignore_frac,
                          torch.full_like(tgt, -100), tgt)
        flat_t = tgt.view(-1)
        for r in range(flat_t.numel()):  # the target entry is never masked (on any side)
            for x in [s] + ts:
                if flat_t[r] >= 0 and x.view(-1, vocab)[r, flat_t[r]] == -math.inf:
                    x.view(-1, vocab)[r, flat_t[r]] = 0.5
    return s.to(dtype), [t.to(dtype) for t in ts], tgt


def _vp_case(group, rank, splits, *, seed=0, lead=(7,), n_teachers=1, teacher_grad=True,
             masks=False, target=True, dtype=F64, grad_out=1.0, chunk_rows=3, module=False,
             vocab_scale=1, near=False, **cfg):
    splits = [v * vocab_scale for v in splits]
    vocab = sum(splits)
    a, b = sum(splits[:rank]), sum(splits[:rank + 1])
    s, ts, tgt = _logit_data(seed, lead, vocab, n_teachers, masks=masks, target=target, dtype=dtype,
                             near=near)
    reduction = cfg.get("reduction", "mean")
    # Single process on the full vocabulary: the float64 reference (on the same rounded inputs).
    s_ref = s.double().clone().requires_grad_()
    t_ref = [t.double().clone().requires_grad_(teacher_grad) for t in ts]
    teach = t_ref if n_teachers > 1 else t_ref[0]
    ref = kd_loss(s_ref, teach, tgt, backend="reference", **cfg)
    # This rank's shards.
    s_loc = s[..., a:b].clone().requires_grad_()
    t_loc = [t[..., a:b].clone().requires_grad_(teacher_grad) for t in ts]
    teach_loc = t_loc if n_teachers > 1 else t_loc[0]
    if module:
        out = fastkd.KDLoss(process_group=group, **cfg)(s_loc, teach_loc, tgt)
    else:
        out = fdist.vocab_parallel_kd_loss(s_loc, teach_loc, tgt, process_group=group,
                                           chunk_rows=chunk_rows, **cfg)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) \
        if reduction == "none" else torch.tensor(grad_out, dtype=F64)
    (ref * go).sum().backward()
    (out * go.to(out.dtype)).sum().backward()
    loss_tol, grad_tol = {F64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}.get(dtype, (1e-4, 1e-2))
    assert out.dtype == (F64 if dtype == F64 else torch.float32), out.dtype
    assert out.shape == ref.shape
    _close(out, ref, loss_tol, "loss")
    assert s_loc.grad.dtype == dtype
    _close(s_loc.grad, s_ref.grad[..., a:b], grad_tol, "student grad")
    for i, (tl, tr) in enumerate(zip(t_loc, t_ref)):
        if teacher_grad:
            assert tl.grad.dtype == dtype
            if tr.grad is None:  # a teacher of weight 0 is not in the reference's graph
                assert (tl.grad == 0).all(), f"teacher {i} grad"
                continue
            _close(tl.grad, tr.grad[..., a:b], grad_tol, f"teacher {i} grad")
        else:
            assert tl.grad is None


VP_CONFIGS = {
    "kl_T2_teacher_grad_mean": dict(temperature=2.0),
    "kl_masks_hard_smooth_sum": dict(temperature=1.5, hard_weight=0.5, label_smoothing=0.1,
                                     reduction="sum", masks="common", grad_out=1.7),
    "kl_3teachers_weights_masks_none": dict(n_teachers=3, teacher_weights=[0.2, 0.0, 0.8],
                                            masks="common", reduction="none", temperature=3.0),
    "reverse_kl_2teachers_hard_mean": dict(divergence="reverse_kl", n_teachers=2,
                                           teacher_weights=[0.3, 0.7], hard_weight=1.0,
                                           temperature=1.5, masks="common"),
    "reverse_kl_t2off_soft0.7_sum": dict(divergence="reverse_kl", t2_scale=False,
                                         soft_weight=0.7, temperature=0.5, reduction="sum"),
    "jsd_b0.3_3teachers_indep_masks_smooth_none": dict(
        divergence="jsd", beta=0.3, n_teachers=3, teacher_weights=[1.0, 0.0, 2.0],
        masks="independent", hard_weight=0.4, label_smoothing=0.2, reduction="none"),
    "jsd_b0.7_hard_T1_mean": dict(divergence="jsd", beta=0.7, hard_weight=0.3, temperature=1.0,
                                  label_smoothing=0.05, grad_out=0.5),
    "jsd_beta0_is_kl": dict(divergence="jsd", beta=0.0, temperature=2.0, masks="common"),
    "jsd_beta1_is_reverse_kl": dict(divergence="jsd", beta=1.0, n_teachers=2, masks="common"),
    "tvd_2teachers_indep_masks_hard_mean": dict(divergence="tvd", n_teachers=2,
                                                masks="independent", hard_weight=0.5,
                                                temperature=2.0),
    "tvd_no_target_sum": dict(divergence="tvd", target=False, reduction="sum", lead=(2, 3)),
    "kl_no_teacher_grad_3d_lead": dict(teacher_grad=False, lead=(2, 4), hard_weight=1.0),
    "all_rows_ignored_mean_is_0": dict(hard_weight=1.0, teacher_grad=True),  # see _vp_ignored
    "float32_kl_hard": dict(dtype=torch.float32, hard_weight=0.5, label_smoothing=0.1,
                            temperature=2.0, n_teachers=2),
    "float32_jsd": dict(dtype=torch.float32, divergence="jsd", masks="independent"),
    "float32_near_identical_V_x100_kl": dict(dtype=torch.float32, vocab_scale=100, near=True,
                                             lead=(16,), chunk_rows=5, temperature=2.0),
    "float32_near_identical_V_x100_reverse_kl_2teachers": dict(
        dtype=torch.float32, vocab_scale=100, near=True, lead=(16,), divergence="reverse_kl",
        n_teachers=2, hard_weight=0.5),
    "float32_near_identical_V_x100_jsd": dict(
        dtype=torch.float32, vocab_scale=100, near=True, lead=(16,), divergence="jsd", beta=0.3),
    "float32_near_identical_V_x100_tvd_2teachers": dict(
        dtype=torch.float32, vocab_scale=100, near=True, lead=(16,), divergence="tvd",
        n_teachers=2, temperature=2.0),
    "bfloat16_kl": dict(dtype=torch.bfloat16, temperature=2.0, hard_weight=0.5),
    "module_KDLoss_process_group": dict(module=True, divergence="jsd", hard_weight=0.5,
                                        n_teachers=2, masks="common"),
}


def _vp_ignored(group, rank, splits):
    """Every row ignored: loss 0 with zero gradients (not NaN)."""
    vocab = sum(splits)
    a, b = sum(splits[:rank]), sum(splits[:rank + 1])
    s, ts, _ = _logit_data(3, (5,), vocab, 1, masks=False, target=False)
    s_loc = s[..., a:b].clone().requires_grad_()
    t_loc = ts[0][..., a:b].clone().requires_grad_()
    tgt = torch.full((5,), -100)
    out = fdist.vocab_parallel_kd_loss(s_loc, t_loc, tgt, process_group=group, hard_weight=1.0)
    out.backward()
    assert out.item() == 0.0
    assert (s_loc.grad == 0).all() and (t_loc.grad == 0).all()


def _vp_kernel_convention(group, rank, splits):
    """vocab_parallel_kd_forward called per row chunk (as a fused-linear caller would), with the
    global "mean" scale, gives the row losses and shard gradients of the whole batch."""
    from fastkd.logit.config import LogitKDConfig
    vocab = sum(splits)
    a, b = sum(splits[:rank]), sum(splits[:rank + 1])
    s, ts, tgt = _logit_data(6, (9,), vocab, 2, masks="common", target=True)
    cfg = dict(divergence="kl", temperature=2.0, hard_weight=0.5, label_smoothing=0.1)
    s_ref = s.clone().requires_grad_()
    t_ref = [t.clone().requires_grad_() for t in ts]
    ref = kd_loss(s_ref, t_ref, tgt, backend="reference", teacher_weights=[0.25, 0.75],
                  reduction="none", **cfg)
    count = (tgt != -100).sum()
    (ref.sum() / count).backward()
    kcfg = LogitKDConfig(**cfg)
    scale = (1.0 / count.double()).reshape(1)
    rows, gs, gt0, gt1 = [], [], [], []
    for lo, hi in ((0, 4), (4, 9)):
        row_loss, g_s, g_t, flags = fdist.vocab_parallel_kd_forward(
            s[lo:hi, a:b], [t[lo:hi, a:b] for t in ts], tgt[lo:hi], [0.25, 0.75], kcfg, scale,
            True, [True, False], process_group=group)
        assert int(flags) == 0 and g_t[1] is None
        rows.append(row_loss)
        gs.append(g_s)
        gt0.append(g_t[0])
    _close(torch.cat(rows), ref, 1e-10, "row losses")
    _close(torch.cat(gs), s_ref.grad[:, a:b], 1e-10, "student grad")
    _close(torch.cat(gt0), t_ref[0].grad[:, a:b], 1e-10, "teacher 0 grad")


def _vp_single_rank_group(singletons, rank, splits):
    """A group of one rank (and process_group=None) is exactly the single-process path."""
    s, ts, tgt = _logit_data(4, (6,), sum(splits), 2, masks="common", target=True,
                             dtype=torch.float32)
    cfg = dict(divergence="jsd", beta=0.4, hard_weight=0.5, temperature=2.0)
    want = kd_loss(s, ts, tgt, **cfg)
    for pg in (singletons[rank], None):
        got = fdist.vocab_parallel_kd_loss(s, ts, tgt, process_group=pg, **cfg)
        assert torch.equal(got, want)
        got = fastkd.KDLoss(process_group=pg, **cfg)(s, ts, tgt)
        assert torch.equal(got, want)
    got = fastkd.functional.kd_loss(s, ts, tgt, process_group=singletons[rank], **cfg)
    assert torch.equal(got, want)


def _vp_errors(group, rank, splits):
    """SPEC errors are raised on every rank alike (no rank is left waiting in a collective)."""
    vocab = sum(splits)
    a, b = sum(splits[:rank]), sum(splits[:rank + 1])
    s, ts, tgt = _logit_data(5, (4,), vocab, 1, masks=False, target=True, ignore_frac=0.0)
    sl, tl = s[..., a:b], ts[0][..., a:b]
    bad = tgt.clone()
    bad[2] = vocab  # valid locally on no rank: the global V decides
    with pytest.raises(ValueError, match="target"):
        fdist.vocab_parallel_kd_loss(sl, tl, bad, process_group=group, hard_weight=1.0)
    dead = sl.clone()
    dead[3] = -math.inf  # row 3 is -inf on every shard
    with pytest.raises(ValueError, match="student_logits has a row that is -inf"):
        fdist.vocab_parallel_kd_loss(dead, tl, process_group=group)
    part = sl.clone()
    if rank == 0:
        part[3] = -math.inf  # -inf on one shard only: fine
    fdist.vocab_parallel_kd_loss(part, tl, process_group=group)
    rows = s[: 3 + rank, a:b]  # ranks disagree on the number of rows
    with pytest.raises(ValueError, match="different numbers of rows"):
        fdist.vocab_parallel_kd_loss(rows, ts[0][: 3 + rank, a:b], process_group=group)
    with pytest.raises(ValueError, match="same vocabulary columns"):
        fdist.vocab_parallel_kd_loss(sl, ts[0][..., :b - a + 1], process_group=group)
    with pytest.raises(ValueError, match="teacher_topk"):
        fastkd.KDLoss(process_group=group)(sl, teacher_topk=(tgt[:, None], torch.zeros(4, 1)))
    nan = sl.clone()
    if rank == dist.get_world_size(group) - 1:
        nan[0, -1] = math.nan  # NaN on one shard: that row's loss is NaN on every rank
    out = fdist.vocab_parallel_kd_loss(nan, tl, tgt, process_group=group, hard_weight=1.0,
                                       reduction="none")
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all(), out


# ------------------------------------------------------------------------------ relation KD
REL_CASES = {
    "sp_float64": ("sp", F64, False),
    "rkd_float64_teacher_grad": ("rkd", F64, True),
    "pkt_float64": ("pkt", F64, False),
    "sp_float32_fused": ("sp", torch.float32, True),
    "rkd_float32_fused": ("rkd", torch.float32, False),
    "pkt_float32_fused": ("pkt", torch.float32, True),
}


def _rel_case(group, rank, sizes, name, *, functional=False, explicit_group=False):
    kind, dtype, teacher_grad = REL_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    batch = sum(sizes)
    a, b = sum(sizes[:rank]), sum(sizes[:rank + 1])
    s = torch.randn(batch, 3, 4, generator=g, dtype=F64).to(dtype)
    t = torch.randn(batch, 5, generator=g, dtype=F64).to(dtype)
    backend = "reference" if dtype == F64 else "auto"
    make = {"sp": lambda **k: fastkd.SPLoss(backend=backend, **k),
            "rkd": lambda **k: fastkd.RKDLoss(distance_weight=1.0, angle_weight=2.0,
                                              backend=backend, **k),
            "pkt": lambda **k: fastkd.PKTLoss(backend=backend, **k)}[kind]
    s_ref, t_ref = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    ref = make()(s_ref, t_ref)
    (ref * 1.3).backward()
    s_loc = s[a:b].clone().requires_grad_()
    t_loc = t[a:b].clone().requires_grad_(teacher_grad)
    gather = group if explicit_group else True
    if functional:
        fn = {"sp": fastkd.functional.sp_loss, "rkd": fastkd.functional.rkd_loss,
              "pkt": fastkd.functional.pkt_loss}[kind]
        out = fn(s_loc, t_loc, backend=backend, gather=gather)
    else:
        out = make(gather=gather)(s_loc, t_loc)
    (out * 1.3).backward()
    tol = 1e-12 if dtype == F64 else 1e-5
    _close(out, ref, tol, "loss")
    _close(s_loc.grad, s_ref.grad[a:b], tol * 10, "student grad")
    if teacher_grad:
        _close(t_loc.grad, t_ref.grad[a:b], tol * 10, "teacher grad")
    else:
        assert t_loc.grad is None


# ---------------------------------------------------------------------------- DDP and FSDP
class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)


def _train_data(batch):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 6, generator=g, dtype=F64)
    y = torch.randint(0, 10, (batch,), generator=g)
    t_logits = torch.randn(batch, 10, generator=g, dtype=F64) * 2
    t_feat = torch.randn(batch, 5, generator=g, dtype=F64)
    return x, y, t_logits, t_feat


def _train(model, x, y, t_logits, t_feat, *, steps, world, gather):
    kd = fastkd.KDLoss(temperature=2.0, hard_weight=1.0)
    rel = fastkd.RKDLoss(gather=gather)
    sp = fastkd.SPLoss(gather=gather)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for _ in range(steps):
        opt.zero_grad()
        h, logits = model(x)
        # Under DDP/FSDP (gradient average over `world` ranks) the gathered relation losses are
        # multiplied by the world size (see fastkd.distributed).
        loss = kd(logits, t_logits, y) + world * (0.5 * rel(h, t_feat) + sp(h, t_feat))
        loss.backward()
        opt.step()


def _ddp_case(group, rank, world, *, fsdp=False):
    batch = 4 * world
    x, y, tl, tf = _train_data(batch)
    torch.manual_seed(11)
    base = _Student().double()
    single = copy.deepcopy(base)
    _train(single, x, y, tl, tf, steps=3, world=1, gather=False)
    sl = slice(4 * rank, 4 * rank + 4)
    model = copy.deepcopy(base)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.body, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    _train(wrapped, x[sl], y[sl], tl[sl], tf[sl], steps=3, world=world, gather=True)
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        _close(p.detach(), q.detach(), 1e-10, f"parameter {name}")


def _vp_fused_linear(group, rank, splits):
    """FusedLinearKDLoss(process_group=...): each rank holds the same hidden states and a shard of
    the lm_head rows; loss and weight-shard gradients equal the single-process result, and the
    hidden-state gradients summed over ranks (what the tensor-parallel layer upstream does)
    equal the single-process gradient."""
    g = torch.Generator().manual_seed(11)
    n, h, vocab = 7, 5, sum(splits)
    hs = torch.randn(n, h, generator=g, dtype=F64)
    ws = torch.randn(vocab, h, generator=g, dtype=F64)
    bs = torch.randn(vocab, generator=g, dtype=F64)
    ht = torch.randn(n, h + 2, generator=g, dtype=F64)
    wt = torch.randn(vocab, h + 2, generator=g, dtype=F64)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[2] = -100
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    kw = dict(temperature=1.7, hard_weight=0.5, divergence="jsd", label_smoothing=0.1)
    full = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    ref = fastkd.FusedLinearKDLoss(backend="reference", **kw)(full[0], full[1], ht, wt, y,
                                                              student_bias=full[2])
    ref.backward()
    mine = [hs.clone().requires_grad_(), ws[lo:hi].clone().requires_grad_(),
            bs[lo:hi].clone().requires_grad_()]
    loss = fastkd.FusedLinearKDLoss(process_group=group, chunk_size=3, **kw)(
        mine[0], mine[1], ht, wt[lo:hi], y, student_bias=mine[2])
    loss.backward()
    _close(loss, ref, 1e-10, "fused-linear vp loss")
    _close(mine[1].grad, full[1].grad[lo:hi], 1e-10, "weight shard grad")
    _close(mine[2].grad, full[2].grad[lo:hi], 1e-10, "bias shard grad")
    gh = mine[0].grad.clone()
    dist.all_reduce(gh, group=group)
    _close(gh, full[0].grad, 1e-10, "hidden grad summed over ranks")


# ------------------------------------------------------------------------------- the groups
SPLITS = {2: [4, 5], 3: [3, 6, 2]}
BATCH_SIZES = {2: [3, 4], 3: [2, 4, 3]}


def _checks(world, group, singletons, rank):
    splits, sizes = SPLITS[world], BATCH_SIZES[world]
    out = []
    for name, cfg in VP_CONFIGS.items():
        cfg = dict(cfg)
        if name == "all_rows_ignored_mean_is_0":
            out.append((f"vp/{name}", lambda: _vp_ignored(group, rank, splits)))
        else:
            out.append((f"vp/{name}", lambda cfg=cfg: _vp_case(group, rank, splits, **cfg)))
    out.append(("vp/shard_of_one_column", lambda: _vp_case(
        group, rank, [1] + splits[1:-1] + [splits[-1] + splits[0] - 1], divergence="jsd",
        n_teachers=2, hard_weight=0.5)))
    out.append(("vp/single_rank_group_is_plain_path",
                lambda: _vp_single_rank_group(singletons, rank, splits)))
    out.append(("vp/errors", lambda: _vp_errors(group, rank, splits)))
    out.append(("vp/kernel_convention_row_chunks",
                lambda: _vp_kernel_convention(group, rank, splits)))
    out.append(("vp/fused_linear", lambda: _vp_fused_linear(group, rank, splits)))
    for name in REL_CASES:
        out.append((f"rel/{name}", lambda name=name: _rel_case(group, rank, sizes, name)))
    out.append(("rel/functional_gather", lambda: _rel_case(
        group, rank, sizes, "rkd_float64_teacher_grad", functional=True)))
    out.append(("rel/explicit_group", lambda: _rel_case(
        group, rank, sizes, "pkt_float64", explicit_group=True)))
    out.append(("train/ddp", lambda: _ddp_case(group, rank, world)))
    if world == 2:
        out.append(("train/fsdp2", lambda: _ddp_case(group, rank, world, fsdp=True)))
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    singletons = [dist.new_group([r]) for r in range(world)]
    results = {}
    for name, fn in _checks(world, group, singletons, rank):
        try:
            fn()
            results[name] = None
        except Exception:  # recorded and reported by the test of that check
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def _run_group(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    merged = {}
    for rank in range(world):
        with open(tmp / f"rank{rank}.pkl", "rb") as f:
            for name, err in pickle.load(f).items():
                merged.setdefault(name, {})[rank] = err
    return merged


_GROUPS = {}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")

    def get(world):
        if world not in _GROUPS:
            _GROUPS[world] = _run_group(world, tmp_path_factory)
        return _GROUPS[world]
    return get


def _names(world):
    return [name for name, _ in _checks(world, None, [None] * world, 0)]


@pytest.mark.parametrize("world,name", [(w, n) for w in (2, 3) for n in _names(w)])
def test_distributed(groups, world, name):
    results = groups(world)
    assert name in results, f"check {name} did not run"
    errors = {rank: err for rank, err in results[name].items() if err is not None}
    assert not errors, "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items())
