"""fastkd.integrations.transformers: KDTrainer against the loss on materialised logits.

On tiny randomly initialised Llama-style models (nothing downloaded): the loss and every student
gradient of KDTrainer.compute_loss equal fastkd.KDLoss on the shifted, label-masked logits of
both models (float32, the SPEC tolerances), with untied and tied embeddings and a sparse top-k
teacher; gradient accumulation through num_items_in_batch; Trainer.train() logs the soft and hard
parts and leaves the teacher frozen; and with 2 gloo processes on CPU, DDP through the Trainer
and FSDP2 (fully_shard) give the gradients of one process on the whole batch.
"""
from __future__ import annotations

import copy
import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import fastkd

import transformers  # noqa: E402  (installed by scripts/setup_env.sh: these tests run in CI)
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from fastkd.integrations._causal_lm import fused_causal_lm_kd  # noqa: E402
from fastkd.integrations.transformers import KDTrainer  # noqa: E402

V = 1000
B, S = 3, 16


def tiny_llama(seed, layers=2, hidden=64, tie=False, vocab=V):
    """The issue's tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads), randomly initialised."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2, bos_token_id=3)
    return LlamaForCausalLM(cfg)


def make_batch(b=B, s=S, seed=0, vocab=V):
    """Right-padded rows (row 1 padded after 10 tokens) with a 4-token prompt on row 0 (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1 % b, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def counted(labels):
    return (labels[:, 1:] != -100).sum()


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def reference_loss(kd, student, teacher, batch, nib):
    """fastkd.KDLoss with the same arguments on both models' materialised, shifted logits."""
    ref = fastkd.KDLoss(temperature=kd.temperature, hard_weight=kd.hard_weight,
                        soft_weight=kd.soft_weight, divergence=kd.divergence, beta=kd.beta,
                        t2_scale=kd.t2_scale)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    return ref(s[:, :-1].reshape(-1, V), t[:, :-1].reshape(-1, V),
               batch["labels"][:, 1:].reshape(-1), num_items_in_batch=nib)


def make_args(**kw):
    base = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], save_strategy="no",
                disable_tqdm=True, per_device_train_batch_size=B, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, ref, tol=1e-4):
    assert got.keys() == ref.keys()
    for name in ref:
        assert rel(got[name], ref[name]) <= tol, (name, rel(got[name], ref[name]))


@pytest.mark.parametrize("tie,divergence", [(False, "kl"), (True, "jsd")])
def test_loss_and_grads_equal_materialised_logits(tie, divergence):
    student = tiny_llama(0, tie=tie)
    teacher = tiny_llama(1, layers=3, hidden=96, tie=tie)
    kd = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5, divergence=divergence,
                                  beta=0.3)
    trainer = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=make_args())
    batch = make_batch()
    nib = counted(batch["labels"])
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=nib)
    loss.backward()
    got = grads(student)
    student.zero_grad(set_to_none=True)
    ref = reference_loss(kd, student, teacher, batch, nib)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_same_grads(got, grads(student))
    assert teacher.training is False
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_gradient_accumulation_adds_up_to_the_whole_batch():
    student, teacher = tiny_llama(0), tiny_llama(1)
    kd = fastkd.FusedLinearKDLoss(temperature=1.5, hard_weight=1.0)
    trainer = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=make_args())
    whole = make_batch(b=4, seed=3)
    nib = counted(whole["labels"])
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):   # two micro-batches, the step's token count
        loss = trainer.compute_loss(student, {k: v[half] for k, v in whole.items()},
                                    num_items_in_batch=nib)
        loss.backward()
        total += loss.item()
    got = grads(student)
    student.zero_grad(set_to_none=True)
    ref = trainer.compute_loss(student, dict(whole), num_items_in_batch=nib)
    ref.backward()
    assert total == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(got, grads(student))


def test_topk_teacher_from_batch_keys_and_fn():
    """A top-k teacher with k = V in the batch is the dense teacher; a callable works too."""
    student, teacher = tiny_llama(0), tiny_llama(1)
    kd = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
    batch = make_batch()
    nib = counted(batch["labels"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
    top = fastkd.TopKTeacher.from_logits(t_logits, V, temperature=1.0)
    dense = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=make_args())
    ref = dense.compute_loss(student, dict(batch), num_items_in_batch=nib)
    sparse = KDTrainer(model=student, kd_loss=kd, args=make_args(),
                       teacher_topk_temperature=1.0)
    sparse._set_signature_columns_if_needed()   # the batch keys survive remove_unused_columns
    assert "teacher_topk_indices" in sparse._signature_columns
    loss = sparse.compute_loss(student, {**batch, "teacher_topk_indices": top.indices,
                                         "teacher_topk_logprobs": top.logprobs},
                               num_items_in_batch=nib)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    by_fn = KDTrainer(model=student, kd_loss=kd, args=make_args(),
                      teacher_topk_fn=lambda b: top)
    assert by_fn.compute_loss(student, dict(batch), num_items_in_batch=nib).item() == \
        pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no teacher"):
        KDTrainer(model=student, kd_loss=kd, args=make_args()).compute_loss(student,
                                                                            dict(batch))


class _Data(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_train_logs_parts_and_keeps_teacher_frozen():
    student, teacher = tiny_llama(0), tiny_llama(1)
    before = copy.deepcopy(teacher.state_dict())
    kd = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
    args = make_args(max_steps=2, logging_steps=1, gradient_accumulation_steps=2,
                     per_device_train_batch_size=2, learning_rate=1e-2)
    trainer = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=args,
                        train_dataset=_Data(make_batch(b=8, seed=5)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["kd_soft"] + h["kd_hard"] == pytest.approx(h["loss"], rel=1e-4)
        assert h["kd_hard"] == pytest.approx(0.5 * h["ce"], rel=1e-6)
        assert h["kd_soft"] > 0 and h["ce"] > 0
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _ScaledHead(torch.nn.Module):
    """A model that multiplies its logits after the output layer (like logit softcapping)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Embedding(V, 16)
        self.head = torch.nn.Linear(16, V, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.body(input_ids)) * 0.5}


def test_refuses_a_model_that_transforms_its_logits():
    batch = make_batch()
    kd = fastkd.FusedLinearKDLoss()
    with pytest.raises(RuntimeError, match="transforms the output"):
        fused_causal_lm_kd(_ScaledHead(), kd, {"input_ids": batch["input_ids"]},
                           batch["labels"], teacher=_ScaledHead())


def test_import_is_lazy_and_names_the_extra(monkeypatch):
    code = ("import sys, fastkd, fastkd.integrations; "
            "assert not {'transformers', 'trl', 'accelerate'} & set(sys.modules), "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'trl'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "transformers", None)   # as if not installed
    monkeypatch.delitem(sys.modules, "fastkd.integrations.transformers")
    with pytest.raises(ImportError, match=r"fastkd\[hf\]"):
        importlib.import_module("fastkd.integrations.transformers")


# ------------------------------------------------------------------- 2 gloo processes (CPU)
def _full_grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        if g is not None:
            out[name] = g.detach().clone()
    return out


def _dist_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    results = {}
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        whole = make_batch(b=2 * world, seed=7)
        kd = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
        # DDP through the Trainer: one SGD step on this rank's half of the data.
        student, teacher = tiny_llama(0), tiny_llama(1)
        args = make_args(max_steps=1, per_device_train_batch_size=2, max_grad_norm=0.0,
                         logging_strategy="no")

        class Record(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, *a, **k):   # the synchronised gradients
                results["ddp_grads"] = grads(student)

        trainer = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=args,
                            train_dataset=_Data(whole), callbacks=[Record()])
        trainer.train()
        results["ddp_wrapped"] = isinstance(trainer.model_wrapped, DistributedDataParallel)
        # FSDP2: the shared core on a fully_shard-ed student, this rank's rows of the batch.
        from torch.distributed.fsdp import fully_shard

        student = tiny_llama(0)
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
        mine = {k: v[2 * rank:2 * rank + 2] for k, v in whole.items()}
        res = fused_causal_lm_kd(student, kd, {k: mine[k] for k in ("input_ids",
                                                                  "attention_mask")},
                                 mine["labels"], teacher=tiny_llama(1),
                                 num_items_in_batch=counted(whole["labels"]))
        (res.loss * world).backward()       # FSDP averages the gradients over ranks
        results["fsdp_grads"] = _full_grads(student)
        dist.barrier()
    except Exception:
        results["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_equal_one_process(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(world)]
    for r in ranks:
        assert "error" not in r, r["error"]
        assert r["ddp_wrapped"]
    whole = make_batch(b=2 * world, seed=7)
    kd = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
    student, teacher = tiny_llama(0), tiny_llama(1)
    reference_loss(kd, student, teacher, whole, counted(whole["labels"])).backward()
    ref = grads(student)
    for r in ranks:
        assert_same_grads(r["ddp_grads"], ref)
        assert_same_grads(r["fsdp_grads"], ref)
