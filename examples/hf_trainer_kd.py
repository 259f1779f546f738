"""fastkd inside Hugging Face transformers: causal-LM distillation with ``KDTrainer``.

Both models are randomly initialised GPT-2s built from a config (nothing is downloaded). The
teacher (3 layers, hidden 128) is first trained for 200 steps on a synthetic "language":
sequences from a fixed random Markov chain over a 1,000-token vocabulary, where after each token
comes one of its four likely successors (or, 5% of the time, any token). Then a smaller student
(2 layers, hidden 64) is trained for 100 steps on the same kind of text, twice from the same
initialisation: with cross-entropy only (the plain ``Trainer``), and with

    from fastkd.integrations.transformers import KDTrainer

    kd = fastkd.FusedLinearKDLoss(temperature=1.0, hard_weight=1.0, ignore_index=-100)
    trainer = KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=args, ...)

which scores position i against token i + 1 (KL + CE; padded positions have label -100 and do
not count) from both models' last hidden states and output layers, without their ``[B, S, V]``
logits. The student's held-out loss (cross-entropy against the real next tokens) is printed for
both: the teacher's whole next-token distribution says more than the one sampled next token, so
the distilled student learns the chain faster.

``--mode trainer`` (the default when ``accelerate`` is installed) uses ``KDTrainer``; ``--mode
loop`` computes the same loss in a plain PyTorch loop, on the materialised logits with
``fastkd.KDLoss``. Without transformers the example prints a message and exits with status 0.

    pip install 'fastkd[hf]'                 # transformers, accelerate: not needed by fastkd
    python examples/hf_trainer_kd.py         # ~30 s on one CPU core
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastkd  # noqa: E402

PAD = 0          # token 0 is padding; the chain uses tokens 1 .. vocab-1


class MarkovChain:
    """A fixed random "language" over tokens ``1 .. vocab-1``: after each token comes one of its
    ``fanout`` successors (random weights) with probability ``1 - noise``, else a uniform token."""

    def __init__(self, vocab: int, fanout: int = 4, noise: float = 0.05, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.noise = vocab, noise
        self.succ = torch.randint(1, vocab, (vocab, fanout), generator=g)
        w = torch.rand(vocab, fanout, generator=g) + 0.5
        self.cdf = (w / w.sum(1, keepdim=True)).cumsum(1)
        self.cdf[:, -1] = 1.0

    def probs(self) -> torch.Tensor:
        """The dense transition matrix ``[vocab, vocab]`` (row PAD unused)."""
        p = torch.full((self.vocab, self.vocab), self.noise / (self.vocab - 1))
        p[:, PAD] = 0.0
        w = torch.diff(self.cdf, dim=1, prepend=torch.zeros(self.vocab, 1))
        p.scatter_add_(1, self.succ, (1 - self.noise) * w)
        return p

    def entropy(self) -> float:
        p = self.probs()[1:]
        return -(p * p.clamp_min(1e-30).log()).sum(1).mean().item()

    def sample(self, n: int, length: int, gen: torch.Generator):
        """``n`` sequences of random length in ``[length // 2, length]``, right-padded with PAD.

        Returns ``input_ids``, ``attention_mask`` and ``labels`` (``input_ids``, -100 at padding).
        """
        ids = torch.empty(n, length, dtype=torch.long)
        ids[:, 0] = torch.randint(1, self.vocab, (n,), generator=gen)
        u = torch.rand(length, n, 1, generator=gen)
        jump = torch.rand(n, length, generator=gen) < self.noise
        rand_tok = torch.randint(1, self.vocab, (n, length), generator=gen)
        for i in range(1, length):
            prev = ids[:, i - 1]
            k = torch.searchsorted(self.cdf[prev], u[i]).clamp_max(self.succ.shape[1] - 1)
            nxt = self.succ[prev].gather(1, k).squeeze(1)
            ids[:, i] = torch.where(jump[:, i], rand_tok[:, i], nxt)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, PAD)
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def batches(self, steps: int, batch_size: int, length: int, gen: torch.Generator):
        data = self.sample(steps * batch_size, length, gen)
        return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in data.items()}
                for i in range(steps)]


def kd_on_shifted_logits(kd, student_logits, teacher_logits, labels):
    """KD (+ CE) of a causal LM: logits at position i are scored against the token at i + 1."""
    v = student_logits.shape[-1]
    return kd(student_logits[:, :-1].reshape(-1, v), teacher_logits[:, :-1].reshape(-1, v),
              labels[:, 1:].reshape(-1))


def lm_ce(logits, labels):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def make_model(vocab, layers, hidden, heads, length, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=hidden, n_layer=layers,
                     n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=1, eos_token_id=1, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg)


def train_loop(model, batches, lr, teacher=None, kd=None):
    """Plain PyTorch loop: CE only, or ``kd`` (its arguments in a ``fastkd.KDLoss``, on the
    logits) against ``teacher`` when given."""
    if kd is not None:
        kd = fastkd.KDLoss(temperature=kd.temperature, hard_weight=kd.hard_weight,
                           ignore_index=kd.ignore_index)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        if teacher is None:
            loss = lm_ce(logits, batch["labels"])
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
            loss = kd_on_shifted_logits(kd, logits, t_logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches
                     for i in range(len(b["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_with_trainer(model, batches, lr, teacher=None, kd=None):
    """The same training through ``transformers.Trainer`` (``KDTrainer`` when distilling)."""
    from transformers import (PrinterCallback, Trainer, TrainingArguments,
                              default_data_collator)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=len(batches[0]["input_ids"]),
            max_steps=len(batches), learning_rate=lr, lr_scheduler_type="constant",
            weight_decay=0.01, warmup_steps=0, logging_strategy="no", save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
            disable_tqdm=True, remove_unused_columns=False)
        data = _ListDataset(batches)
        common = dict(model=model, args=args, train_dataset=data,
                      data_collator=default_data_collator)
        if teacher is None:
            trainer = Trainer(**common)         # the model's own shifted CE (labels -100 ignored)
        else:
            from fastkd.integrations.transformers import KDTrainer

            trainer = KDTrainer(**common, teacher_model=teacher, kd_loss=kd)
        trainer.remove_callback(PrinterCallback)   # no per-run metrics printout
        trainer.train()
    model.eval()
    return model


@torch.no_grad()
def eval_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return lm_ce(logits, batch["labels"]).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["auto", "trainer", "loop"], default="auto",
                   help="auto: trainer if accelerate is installed, else loop")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher-layers", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--student-steps", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    if importlib.util.find_spec("transformers") is None:
        print("hf_trainer_kd: transformers is not installed (pip install transformers "
              "accelerate); skipping this example.")
        return None
    mode = args.mode
    if mode == "auto":
        mode = "trainer" if importlib.util.find_spec("accelerate") is not None else "loop"
    if mode == "trainer" and importlib.util.find_spec("accelerate") is None:
        print("hf_trainer_kd: --mode trainer needs accelerate (pip install accelerate); "
              "skipping this example.")
        return None
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    import transformers

    transformers.logging.set_verbosity_error()
    chain = MarkovChain(args.vocab, fanout=4, noise=0.05, seed=0)
    gen = torch.Generator().manual_seed(0)
    heldout = chain.sample(256, args.length, gen)

    teacher = make_model(args.vocab, args.teacher_layers, 128, 4, args.length, seed=0)
    teacher = train_loop(teacher, chain.batches(args.teacher_steps, args.batch_size, args.length,
                                                gen), lr=3e-3)
    print(f"teacher ({args.teacher_layers} layers, hidden 128, {args.teacher_steps} steps): "
          f"held-out loss {eval_loss(teacher, heldout):.3f} (the chain's entropy "
          f"{chain.entropy():.3f}, uniform {math.log(args.vocab - 1):.3f})")

    student_data = chain.batches(args.student_steps, args.batch_size, args.length, gen)
    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, hard_weight=1.0,
                                  ignore_index=-100)
    train = train_with_trainer if mode == "trainer" else train_loop
    results = {}
    for name, t in (("CE only", None), ("KD + CE (fastkd)", teacher)):
        student = make_model(args.vocab, 2, 64, 2, args.length, seed=1)   # same init for both
        student = train(student, student_data, lr=3e-3, teacher=t, kd=kd)
        results[name] = eval_loss(student, heldout)
    print(f"student (2 layers, hidden 64, {args.student_steps} steps, mode={mode}): "
          "held-out next-token loss")
    for name, v in results.items():
        print(f"  {name:26s} {v:.3f}")
    return results


if __name__ == "__main__":
    main()
