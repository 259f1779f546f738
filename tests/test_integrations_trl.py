"""fastkd.integrations.trl: FastKDGKDTrainer equals TRL's own GKD loss and gradients.

Parity on a tiny randomly initialised Llama-style model (nothing downloaded): one step's loss
and the gradient of every student parameter equal TRL's GKDTrainer.compute_loss (T = 1, the
temperature it uses) or TRL's static generalized_jsd_loss at T = 2, to float32 tolerance, for
beta in {0, 0.5, 1}; one Trainer step with each trainer gives the same parameters; and a fully
on-policy step (generation by the student) runs.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

import datasets  # noqa: E402  (installed by scripts/setup_env.sh: these tests run in CI)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from fastkd.integrations.trl import FastKDGKDTrainer  # noqa: E402
from test_integrations_hf import V, counted, make_batch, rel, tiny_llama  # noqa: E402


def tokenizer():
    """A word-level tokenizer over "t0" .. "t999" built in memory (t0 pad, t2 eos)."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2",
                                   unk_token="t1")


def gkd_args(beta, **kw):
    # bf16=False: GKDConfig defaults to bf16 autocast; the parity here is float32's
    base = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], beta=beta,
                lmbda=0.0, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, bf16=False)
    base.update(kw)
    return GKDConfig(**base)


def prompt_data(batch):
    """A datasets.Dataset of a fixed batch's rows, each with a 4-token prompt (for on-policy
    generation)."""
    cols = {k: v.tolist() for k, v in batch.items()}
    cols["prompts"] = batch["input_ids"][:, :4].tolist()
    cols["prompt_attention_mask"] = [[1] * 4] * len(batch["input_ids"])
    return datasets.Dataset.from_dict(cols)


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


_DS = None


def dataset():
    global _DS
    if _DS is None:   # GKDTrainer wants a train_dataset; compute_loss never reads it
        _DS = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "t5"}]]})
    return _DS


def _trl_loss(student, teacher, batch, beta, temperature, nib):
    """TRL's static generalized_jsd_loss on the shifted logits (what compute_loss runs, at any
    temperature)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    return GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:],
                                           beta=beta, temperature=temperature,
                                           num_items_in_batch=nib)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_grads_equal_trl(beta):
    """Against TRL in float32: the loss to 2e-5 relative, each gradient to 1e-4 (relative in
    norm), at T = 1 and 2, with and without num_items_in_batch."""
    student, teacher = tiny_llama(0), tiny_llama(1, layers=3)
    batch = make_batch()
    batch["labels"][:, :5] = -100          # a prompt on every row, as GKD's collator makes
    nib = counted(batch["labels"])
    ours, theirs = copy.deepcopy(student), copy.deepcopy(student)
    trl_trainer = GKDTrainer(model=theirs, teacher_model=teacher, args=gkd_args(beta),
                             processing_class=tokenizer(), train_dataset=dataset())
    fast = FastKDGKDTrainer(model=ours, teacher_model=teacher, args=gkd_args(beta),
                            processing_class=tokenizer(), train_dataset=dataset())
    for temperature, n in ((1.0, nib), (2.0, nib), (1.0, None)):
        for m in (theirs, ours):
            m.zero_grad(set_to_none=True)
        if temperature == 1.0:   # GKD's compute_loss runs generalized_jsd_loss at T = 1
            ref = trl_trainer.compute_loss(theirs, dict(batch), num_items_in_batch=n)
        else:
            ref = _trl_loss(theirs, teacher, batch, beta, temperature, n)
        fast.kd_loss.temperature = temperature
        loss = fast.compute_loss(ours, dict(batch), num_items_in_batch=n)
        ref.backward()
        loss.backward()
        what = f"beta={beta} T={temperature} nib={n is not None}"
        assert loss.item() == pytest.approx(ref.item(), rel=2e-5), what
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
            assert rel(q.grad, p.grad) <= 1e-4, (what, name, rel(q.grad, p.grad))


def test_one_trainer_step_equals_trl():
    """Off-policy (lmbda = 0), one Trainer step with gradient accumulation 2: the same logged
    loss and the same gradients (taken before the optimizer step)."""
    student, teacher = tiny_llama(0), tiny_llama(1)
    data = prompt_data(make_batch(b=4, seed=2))
    got, losses = {}, {}
    for cls in (GKDTrainer, FastKDGKDTrainer):
        model = copy.deepcopy(student)

        class Record(TrainerCallback):
            def on_pre_optimizer_step(self, *a, _cls=cls, _model=model, **k):
                got[_cls] = {n: p.grad.clone() for n, p in _model.named_parameters()}

        args = gkd_args(0.5, max_steps=1, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, max_grad_norm=0.0, logging_steps=1)
        trainer = cls(model=model, teacher_model=teacher, args=args, callbacks=[Record()],
                      processing_class=tokenizer(), train_dataset=data, data_collator=collate)
        trainer.train()
        losses[cls] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[FastKDGKDTrainer] == pytest.approx(losses[GKDTrainer], rel=2e-5)
    for name, ref in got[GKDTrainer].items():
        err = rel(got[FastKDGKDTrainer][name], ref)
        assert err <= 1e-4, (name, err)


def test_on_policy_step_runs():
    student, teacher = tiny_llama(0), tiny_llama(1)
    args = gkd_args(0.5, lmbda=1.0, max_new_tokens=4, max_steps=1,
                    per_device_train_batch_size=2, logging_steps=1)
    trainer = FastKDGKDTrainer(model=student, teacher_model=teacher, args=args,
                               processing_class=tokenizer(),
                               train_dataset=prompt_data(make_batch(b=2, seed=4)),
                               data_collator=collate)
    trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(loss) == 1 and loss[0] == loss[0] and loss[0] >= 0
