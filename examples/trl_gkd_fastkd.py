"""TRL's GKD (on-policy distillation) with fastkd's fused loss: ``FastKDGKDTrainer``.

``trl.experimental.gkd.GKDTrainer`` computes both models' ``[B, S, V]`` logits and a generalized
JSD on them. ``fastkd.integrations.trl.FastKDGKDTrainer`` is a drop-in subclass that computes
the same loss from the last hidden states and the output layers (``FusedLinearKDLoss(
divergence="jsd", beta=args.beta, t2_scale=False)``), without the logits; everything else
(on-policy generation by the student with probability ``lmbda``, the collator, logging) is TRL's.

Everything is built here, nothing is downloaded: a word-level tokenizer over 1,000 tokens, a
synthetic "language" (the Markov chain of ``hf_trainer_kd.py``), a teacher Llama (3 layers,
hidden 128) trained for 100 steps on it, and a student Llama (2 layers, hidden 64). The script

1. checks on one batch that ``FastKDGKDTrainer.compute_loss`` equals TRL's own
   ``GKDTrainer.compute_loss`` (same student, same teacher);
2. distils the student for 25 steps with ``lmbda=0.5`` (half the steps on the student's own
   completions of 8-token prompts, sampled at ``args.temperature``), ``beta=0.5``;
3. prints the student's held-out next-token loss before and after.

    pip install 'fastkd[trl]'
    python examples/trl_gkd_fastkd.py          # under 2 minutes on 2 idle CPU cores
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
PROMPT = 8


def _hf_example():
    """examples/hf_trainer_kd.py: its Markov chain, training loop and held-out loss."""
    spec = importlib.util.spec_from_file_location("hf_trainer_kd",
                                                  os.path.join(HERE, "hf_trainer_kd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenizer(vocab):
    """Word-level tokens "t0" .. "t{vocab-1}" (t0 padding, as in the chain; t1 end of text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1",
                                   unk_token="t0")


def llama(vocab, layers, hidden, length, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=2 * length, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1)
    return LlamaForCausalLM(cfg)


def gkd_dataset(data):
    """Rows for GKD: the full sequence (labels -100 on the prompt) and its prompt alone."""
    import datasets

    labels = data["labels"].clone()
    labels[:, :PROMPT] = -100
    n = len(labels)
    return datasets.Dataset.from_dict({
        "input_ids": data["input_ids"].tolist(), "attention_mask": data["attention_mask"].tolist(),
        "labels": labels.tolist(), "prompts": data["input_ids"][:, :PROMPT].tolist(),
        "prompt_attention_mask": [[1] * PROMPT] * n})


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--student-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))

    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(trl|transformers)\b")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fastkd.integrations.trl import FastKDGKDTrainer

    transformers.logging.set_verbosity_error()
    hf = _hf_example()
    # Full-length sequences: padding would sit inside the prompt otherwise.
    chain = hf.MarkovChain(args.vocab, fanout=4, noise=0.05, seed=0)
    gen = torch.Generator().manual_seed(0)

    def sample(n):
        """n sequences of exactly args.length tokens (the chain pads rows shorter than asked:
        rows of at least 2 x length / 2 tokens, cut)."""
        full = chain.sample(n, 2 * args.length, gen)
        return {k: v[:, :args.length] for k, v in full.items()}

    heldout = sample(256)
    teacher = llama(args.vocab, 3, 128, args.length, seed=0)
    batches = [sample(args.batch_size) for _ in range(args.teacher_steps)]
    teacher = hf.train_loop(teacher, batches, lr=3e-3)
    print(f"teacher (3 layers, hidden 128, {args.teacher_steps} steps): held-out loss "
          f"{hf.eval_loss(teacher, heldout):.3f} (the chain's entropy {chain.entropy():.3f})")

    student = llama(args.vocab, 2, 64, args.length, seed=1)
    before = hf.eval_loss(student, heldout)
    train = gkd_dataset(sample(args.student_steps * args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        def config(**kw):
            return GKDConfig(output_dir=tmp, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, per_device_train_batch_size=args.batch_size,
                             beta=0.5, temperature=0.9, max_new_tokens=args.length - PROMPT,
                             learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
                             bf16=False, **kw)   # GKDConfig defaults to bf16 autocast

        common = dict(teacher_model=teacher, processing_class=tokenizer(args.vocab),
                      train_dataset=train, data_collator=collate)
        # 1. the same loss as TRL's own, on one batch
        batch = collate([train[i] for i in range(args.batch_size)])
        n = (batch["labels"][:, 1:] != -100).sum()
        ours = FastKDGKDTrainer(model=student, args=config(lmbda=0.0), **common)
        theirs = GKDTrainer(model=copy.deepcopy(student), args=config(lmbda=0.0), **common)
        with torch.no_grad():
            a = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n).item()
            b = theirs.compute_loss(theirs.model, dict(batch), num_items_in_batch=n).item()
        print(f"one batch: FastKDGKDTrainer loss {a:.6f}, TRL GKDTrainer loss {b:.6f}")
        # 2. on-policy distillation
        trainer = FastKDGKDTrainer(model=student, args=config(lmbda=0.5,
                                                              max_steps=args.student_steps,
                                                              logging_strategy="no"), **common)
        trainer.train()
    after = hf.eval_loss(student, heldout)
    print(f"student (2 layers, hidden 64): held-out next-token loss {before:.3f} before, "
          f"{after:.3f} after {args.student_steps} GKD steps (lmbda 0.5, beta 0.5)")
    return {"fastkd_loss": a, "trl_loss": b, "before": before, "after": after}


if __name__ == "__main__":
    main()
