"""Distillation across tokenizers with ULD: a word-level teacher, a character-level student.

Teacher and student read the same text through different tokenizers, so their vocabularies
have nothing in common (V_t = number of words, V_s = 28 characters). Universal Logit
Distillation (Boizard et al. 2024; ``fastkd.KDLoss(divergence="uld")``) compares the two
next-token distributions after sorting each in decreasing order: it needs no mapping between
the vocabularies, only a pairing of positions.

* The "language" is a fixed random bigram over ``--words`` made-up words (2-5 letters; each word
  has 4 successors with probabilities 0.4 / 0.3 / 0.2 / 0.1), written as text with spaces.
* The teacher (``TinyCausalLM`` of examples/distill_llm.py, 2 layers, hidden 128) is trained on
  word tokens, on its own stream of fresh sentences.
* The student (1 layer, hidden 64) reads characters (a-z, space, padding) of a small fixed set of
  training sentences. Positions are paired at word boundaries: the student's row at the space
  before word i + 1 (it predicts that word's first letter) with the teacher's row at word i (it
  predicts word i + 1). Only those rows get the ULD term; every character gets the hard CE.

Two arms per seed, from the same initial weights, on the same batches in the same order:
``hard`` (character cross-entropy alone) and ``uld`` (the same plus
``uld_weight * KDLoss(divergence="uld", temperature=T)`` on the paired rows). Both are evaluated
on the same held-out sentences: cross-entropy per character, and at word-initial characters
alone (where the teacher says something). Per-seed numbers and paired differences go to
``OUT.json`` / ``OUT.md``.

    python examples/distill_cross_tokenizer.py --threads 1 --out benchmarks/results/cross-tokenizer-uld
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

try:
    import fastkd
except ImportError:  # run from a checkout without installing: the repository root is one up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastkd
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_llm import BigramLanguage, TinyCausalLM, batch_order, mean, paired, param_hash, std  # noqa: E402,E501

ARMS = ("hard", "uld")
SPACE, PAD = 26, 27   # characters: a-z are 0..25
CHARS = 28
# Separate random streams: the word list, the language, the teacher's stream, the student's
# training set, the held-out set, the teacher's init.
WORDS_SEED, LANG_SEED, TEACHER_DATA_SEED, TRAIN_SEED, HELDOUT_SEED, TEACHER_INIT_SEED = range(6)


def make_words(n: int, seed: int = WORDS_SEED) -> list[str]:
    """``n`` distinct made-up words of 2-5 letters."""
    g = torch.Generator().manual_seed(seed)
    words: list[str] = []
    while len(words) < n:
        length = int(torch.randint(2, 6, (1,), generator=g))
        w = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (length,), generator=g))
        if w not in words:
            words.append(w)
    return words


class CharText:
    """The character view of word sentences: ``[n, C]`` character ids (padded with PAD), and
    for each sentence the character position of the space before each word (the paired row)."""

    def __init__(self, sentences: torch.Tensor, words: list[str]):
        rows, spaces = [], []
        for sent in sentences.tolist():
            chars, sp = [], []
            for i, w in enumerate(sent):
                if i:
                    sp.append(len(chars))
                    chars.append(SPACE)
                chars.extend(ord(c) - 97 for c in words[w])
            rows.append(chars)
            spaces.append(sp)
        width = max(map(len, rows))
        self.chars = torch.full((len(rows), width), PAD, dtype=torch.int64)
        for r, chars in enumerate(rows):
            self.chars[r, :len(chars)] = torch.tensor(chars)
        # [n, words - 1]: the position of the space before word i + 1
        self.spaces = torch.tensor(spaces, dtype=torch.int64)
        self.words = sentences


def train_teacher(lang, args, dev):
    torch.manual_seed(TEACHER_INIT_SEED)
    teacher = TinyCausalLM(args.words, 128, 2, 4, args.sentence).to(dev)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    stream = lang.sample(args.teacher_steps * args.batch, args.sentence, TEACHER_DATA_SEED)
    for step in range(args.teacher_steps):
        tok = stream[step * args.batch:(step + 1) * args.batch].to(dev)
        loss = F.cross_entropy(teacher(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


def char_targets(chars: torch.Tensor) -> torch.Tensor:
    """Next-character targets with padding ignored (-100)."""
    y = chars[:, 1:].clone()
    y[y == PAD] = -100
    return y


@torch.no_grad()
def evaluate(model, text: CharText, dev, batch=128):
    """Held-out CE per character, and at the word-initial characters alone."""
    ce_all = ce_init = 0.0
    n_all = n_init = 0
    for i in range(0, text.chars.shape[0], batch):
        chars = text.chars[i:i + batch].to(dev)
        sp = text.spaces[i:i + batch].to(dev)
        logp = torch.log_softmax(model(chars[:, :-1]).float(), -1)
        y = char_targets(chars)
        ce_all += float(F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="sum",
                                   ignore_index=-100))
        n_all += int((y != -100).sum())
        rows = torch.arange(chars.shape[0], device=dev).unsqueeze(1).expand_as(sp)
        ce_init += float(-logp[rows, sp].gather(-1, y[rows, sp].unsqueeze(-1)).sum())
        n_init += sp.numel()
    return ce_all / n_all, ce_init / n_init


def train_arm(arm, init_state, order, train: CharText, teacher, args, dev):
    student = TinyCausalLM(CHARS, 64, 1, 2, train.chars.shape[1]).to(dev)
    student.load_state_dict(init_state)
    record = {"init_sha256": param_hash(student)}
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    uld = fastkd.KDLoss(divergence="uld", temperature=args.temperature)
    seen = hashlib.sha256()
    t0 = time.perf_counter()
    for ids in order:
        seen.update(ids.numpy().astype("<i8").tobytes())
        chars = train.chars[ids].to(dev)
        logits = student(chars[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), char_targets(chars).flatten(),
                               ignore_index=-100)
        if arm == "uld":
            sp = train.spaces[ids].to(dev)
            rows = torch.arange(ids.numel(), device=dev).unsqueeze(1).expand_as(sp)
            with torch.no_grad():
                t_logits = teacher(train.words[ids, :-1].to(dev))   # row i predicts word i + 1
            loss = loss + args.uld_weight * uld(logits[rows, sp], t_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    record["train_seconds"] = time.perf_counter() - t0
    record["batches_sha256"] = seen.hexdigest()
    record["heldout_ce"], record["heldout_ce_word_initial"] = evaluate(student.eval(),
                                                                       args.heldout_data, dev)
    return record


def summarise(per_seed):
    summary, pairs = {}, {}
    for metric in ("heldout_ce", "heldout_ce_word_initial"):
        vals = {arm: [r["arms"][arm][metric] for r in per_seed] for arm in ARMS}
        summary[metric] = {arm: {"values": v, "mean": mean(v), "std": std(v)}
                           for arm, v in vals.items()}
        pairs[metric] = paired(vals["uld"], vals["hard"])
    return summary, pairs


def markdown(res):
    c, s, p = res["config"], res["summary"], res["paired"]
    lines = [
        "# Cross-tokenizer distillation with ULD (examples/distill_cross_tokenizer.py)", "",
        f"Produced by `{res['command']}` ({res['date']}; torch {res['versions']['torch']}, "
        f"fastkd {res['versions']['fastkd']}, {res['machine']}).", "",
        f"Word-level teacher (V_t = {c['words']} words, held-out word CE "
        f"{res['teacher_heldout_word_ce']:.3f} nats; the language's floor "
        f"{res['word_floor']:.3f}); character-level student (V_s = {CHARS}); "
        f"{c['train_sentences']} training sentences of {c['sentence']} words, {c['steps']} steps "
        f"of {c['batch']}; ULD at T = {c['temperature']}, weight {c['uld_weight']}; "
        f"{len(res['per_seed'])} seeds, each arm from the same initial weights on the same "
        "batches (hashes in the JSON).", "",
        "| held-out CE (nats/char) | hard | hard + ULD | paired diff (ULD - hard) | "
        "ULD better | p (paired t) |",
        "|---|---|---|---|---|---|",
    ]
    for metric, name in (("heldout_ce", "every character"),
                         ("heldout_ce_word_initial", "word-initial characters")):
        h, u, d = s[metric]["hard"], s[metric]["uld"], p[metric]
        pv = "n/a" if d["p"] is None else f"{d['p']:.2g}"
        lines.append(f"| {name} | {h['mean']:.4f} ± {h['std']:.4f} | {u['mean']:.4f} ± "
                     f"{u['std']:.4f} | {d['mean']:+.4f} ± {d['std']:.4f} | "
                     f"{d['a_better']}/{d['n']} | {pv} |")
    lines += ["", "Per seed (every character): " + ", ".join(
        f"{r['seed']}: {r['arms']['hard']['heldout_ce']:.4f} / "
        f"{r['arms']['uld']['heldout_ce']:.4f}" for r in res["per_seed"]), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--words", type=int, default=64)
    ap.add_argument("--sentence", type=int, default=8, help="words per sentence")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--train-sentences", type=int, default=128)
    ap.add_argument("--heldout-sentences", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--uld-weight", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    words = make_words(args.words)
    lang = BigramLanguage(args.words, seed=LANG_SEED)
    teacher = train_teacher(lang, args, dev)
    heldout_words = lang.sample(args.heldout_sentences, args.sentence, HELDOUT_SEED)
    with torch.no_grad():
        t_logits = teacher(heldout_words[:, :-1].to(dev)).float()
        teacher_ce = float(F.cross_entropy(t_logits.flatten(0, 1),
                                           heldout_words[:, 1:].flatten().to(dev)))
    train = CharText(lang.sample(args.train_sentences, args.sentence, TRAIN_SEED), words)
    args.heldout_data = CharText(heldout_words, words)
    per_seed = []
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        init = TinyCausalLM(CHARS, 64, 1, 2, train.chars.shape[1]).state_dict()
        order = batch_order(train.chars.shape[0], args.steps, args.batch, seed)
        arms = {arm: train_arm(arm, init, order, train, teacher, args, dev) for arm in ARMS}
        per_seed.append({"seed": seed, "arms": arms})
        print(f"seed {seed}: held-out CE/char hard {arms['hard']['heldout_ce']:.4f}, "
              f"uld {arms['uld']['heldout_ce']:.4f} (word-initial "
              f"{arms['hard']['heldout_ce_word_initial']:.4f} vs "
              f"{arms['uld']['heldout_ce_word_initial']:.4f})", flush=True)
    summary, pairs = summarise(per_seed)
    config = {k: v for k, v in vars(args).items() if k != "heldout_data"}
    res = {"command": "python examples/distill_cross_tokenizer.py " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "date": datetime.date.today().isoformat(),
           "versions": {"torch": torch.__version__, "fastkd": fastkd.__version__},
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
           "config": config, "teacher_heldout_word_ce": teacher_ce,
           "word_floor": lang.cross_entropy(heldout_words), "per_seed": per_seed,
           "summary": summary, "paired": pairs}
    d = pairs["heldout_ce"]
    print(f"ULD - hard, held-out CE per character: {d['mean']:+.4f} ± {d['std']:.4f} "
          f"({d['a_better']}/{d['n']} seeds better)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(res))
    return res


if __name__ == "__main__":
    main()
