"""Offline vs online distillation of a small causal LM, against hard labels, on held-out data.

Everything is randomly initialised and synthetic (no download). The "language" is a fixed random
bigram table: every token has 4 successors with probabilities 0.4 / 0.3 / 0.2 / 0.1, so the best
possible next-token cross-entropy is about 1.28 nats. A teacher (TinyCausalLM, 2 layers, hidden
128) is trained on its own stream of fresh sequences, then writes a teacher cache
(``fastkd.teacher_cache.write_cache_from_model``: top-k log-probabilities at T_src = 1, bf16)
over a fixed, small set of student training sequences. The student (1 layer, hidden 64) is then
trained three ways, per seed from the same initial weights on the same batches in the same
order, with the same optimizer and steps:

* ``hard``: next-token cross-entropy alone (plain ``F.cross_entropy``; ``FusedLinearKDLoss``
  insists on a teacher even with ``soft_weight=0``);
* ``online``: ``FusedLinearKDLoss(temperature=T, hard_weight=w)`` with the teacher run on every
  batch (its hidden states and lm_head weight);
* ``offline``: the same loss with ``teacher_topk=cache.stack(ids)``, the cached top-k at T_src = 1
  re-tempered to the loss's T (T = 2 by default: the flattening direction, where re-tempering is
  an approximation).

Every arm is evaluated on the same held-out sequences (a separate draw from the language, never
trained on): next-token cross-entropy of the student, and KL(teacher || student) at T = 1.
Per-seed numbers, means and paired differences (with a paired t statistic and a sign count) go
to ``OUT.json`` and ``OUT.md``; the JSON also records, per arm, a hash of the initial student
weights and of the batch order actually consumed, so that the pairing can be checked.

The student's training set is deliberately small (256 sequences, 12.5 epochs: the regime where a
teacher that saw more data has most to add, and where hard labels overfit). With
``--train-seqs 3200`` (one pass, no repetition) the gain shrinks to about 0.19 nats and offline
matches online (2 seeds).

    python examples/distill_llm.py --out benchmarks/results/offline-distill-llm  # ~2.2 CPU-min
    python examples/distill_llm.py --device cuda --vocab 32000 --steps 1000
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import fastkd
except ImportError:  # run from a checkout without installing: the repository root is one up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastkd
from fastkd.teacher_cache import load_cache, write_cache_from_model

ARMS = ("hard", "online", "offline")
PAIRS = (("offline", "hard"), ("online", "hard"), ("offline", "online"))
SUCCESSOR_PROBS = (0.4, 0.3, 0.2, 0.1)
# Separate random streams, so that no two data sets share draws: the language itself, the
# teacher's training stream, the student's training set, the held-out set, the teacher's init.
LANG_SEED, TEACHER_DATA_SEED, TRAIN_SEED, HELDOUT_SEED, TEACHER_INIT_SEED = 0, 1, 2, 3, 4


class TinyCausalLM(nn.Module):
    """Token embedding + a few causal Transformer layers + an untied lm_head."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.zeros(max_len, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        x = self.embed(tokens) + self.pos[:n]
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens))


class BigramLanguage:
    """A fixed random bigram table: token v is followed by ``successors[v, j]`` with probability
    ``SUCCESSOR_PROBS[j]`` (a successor drawn twice gets both shares)."""

    def __init__(self, vocab: int, seed: int = LANG_SEED):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, len(SUCCESSOR_PROBS)), generator=g)
        self.probs = torch.tensor(SUCCESSOR_PROBS)
        # Dense [V, V] table of the true next-token probabilities (V <= a few thousand here).
        self.table = torch.zeros(vocab, vocab).scatter_add_(
            1, self.successors, self.probs.expand(vocab, -1).contiguous())

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """``[n, length]`` int64 sequences; the first token is uniform."""
        g = torch.Generator().manual_seed(seed)
        cols = [torch.randint(0, self.vocab, (n,), generator=g)]
        for _ in range(length - 1):
            pick = torch.multinomial(self.probs, n, replacement=True, generator=g)
            cols.append(self.successors[cols[-1], pick])
        return torch.stack(cols, 1)

    def cross_entropy(self, seqs: torch.Tensor) -> float:
        """The Bayes limit on ``seqs``: mean of -log P(next | previous) under the true table."""
        p = self.table[seqs[:, :-1], seqs[:, 1:]]
        return float(-p.log().mean())


def param_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in registration order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` indices into the training set: epochs of fresh permutations, built
    once per seed and handed to every arm."""
    g = torch.Generator().manual_seed(10_000 + seed)
    epochs = math.ceil(steps * batch / n_train)
    flat = torch.cat([torch.randperm(n_train, generator=g) for _ in range(epochs)])
    return flat[:steps * batch].reshape(steps, batch)


def train_teacher(lang, args, dev):
    torch.manual_seed(TEACHER_INIT_SEED)
    teacher = TinyCausalLM(args.vocab, args.teacher_hidden, 2, 4, args.seq).to(dev)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    # The teacher's own stream: fresh sequences every step, drawn apart from the student's
    # training set and the held-out set.
    stream = lang.sample(args.teacher_steps * args.batch, args.seq + 1, TEACHER_DATA_SEED)
    for step in range(args.teacher_steps):
        tok = stream[step * args.batch:(step + 1) * args.batch].to(dev)
        loss = F.cross_entropy(teacher(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(model, teacher, heldout, dev, batch=64):
    """Held-out next-token CE of ``model`` and, with a teacher, KL(teacher || model) at T = 1,
    per token."""
    ce = kl = 0.0
    n = 0
    for i in range(0, heldout.shape[0], batch):
        tok = heldout[i:i + batch].to(dev)
        s = torch.log_softmax(model(tok[:, :-1]).float(), -1)
        ce += float(F.nll_loss(s.flatten(0, 1), tok[:, 1:].flatten(), reduction="sum"))
        if teacher is not None:
            t = torch.log_softmax(teacher(tok[:, :-1]).float(), -1)
            kl += float((t.exp() * (t - s)).sum())
        n += tok[:, 1:].numel()
    return ce / n, (kl / n if teacher is not None else None)


def train_arm(arm, init_state, order, train, cache, teacher, args, dev):
    """Train one student from ``init_state`` on the batches ``order``; returns its record."""
    student = TinyCausalLM(args.vocab, args.hidden, 1, 2, args.seq).to(dev)
    student.load_state_dict(init_state)
    record = {"init_sha256": param_hash(student)}
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, hard_weight=args.hard_weight)
    seen = hashlib.sha256()
    curve = []
    eval_seconds = 0.0
    t0 = time.perf_counter()
    for step, ids in enumerate(order):
        if args.eval_every and step % args.eval_every == 0 and step:
            # Held-out CE along the way (not used for training): shows whether an arm's final
            # number is an overfitted one that early stopping would have avoided.
            te = time.perf_counter()
            curve.append([step, evaluate(student.eval(), None, args.heldout_data, dev)[0]])
            student.train()
            eval_seconds += time.perf_counter() - te
        seen.update(ids.numpy().astype("<i8").tobytes())  # what this arm actually consumed
        tok = train[ids].to(dev)
        inputs, target = tok[:, :-1], tok[:, 1:]
        h = student.hidden_states(inputs)
        if arm == "hard":
            loss = F.cross_entropy(student.lm_head(h).flatten(0, 1), target.flatten())
        elif arm == "online":
            with torch.no_grad():
                th = teacher.hidden_states(inputs)
            loss = kd(h, student.lm_head.weight, th, teacher.lm_head.weight, target)
        else:
            # [B, L, k] int32 / bf16 rows of the memory-mapped cache, at T_src = cache.temperature
            top = cache.stack(ids.tolist()).to(dev)
            loss = kd(h, student.lm_head.weight, target=target, teacher_topk=top)
        opt.zero_grad()
        loss.backward()
        opt.step()
    record["train_seconds"] = time.perf_counter() - t0 - eval_seconds
    record["batches_sha256"] = seen.hexdigest()
    record["final_train_loss"] = loss.item()
    record["heldout_ce"], record["heldout_kl_to_teacher"] = evaluate(
        student.eval(), teacher, args.heldout_data, dev)
    curve.append([len(order), record["heldout_ce"]])
    record["heldout_ce_curve"] = curve
    # The best checkpoint picked on the held-out set itself: an optimistic (oracle) early stop.
    record["heldout_ce_best_checkpoint"] = min(ce for _, ce in curve)
    return record


def mean(v):
    return sum(v) / len(v)


def std(v):
    """Sample standard deviation (n - 1); 0 for one value."""
    if len(v) < 2:
        return 0.0
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def paired(a, b):
    """Paired statistics of a - b (lower CE is better, so a negative mean favours a)."""
    d = [x - y for x, y in zip(a, b)]
    s = std(d)
    t = mean(d) / (s / math.sqrt(len(d))) if len(d) > 1 and s > 0 else None
    out = {"diffs": d, "mean": mean(d), "std": s, "t": t, "n": len(d),
           "a_better": sum(x < 0 for x in d), "a_worse": sum(x > 0 for x in d), "p": None}
    if t is not None:
        try:
            from scipy import stats
            out["p"] = float(2 * stats.t.sf(abs(t), len(d) - 1))
        except ImportError:
            pass
    return out


def summarise(per_seed):
    summary, pairs = {}, {}
    for metric in ("heldout_ce", "heldout_kl_to_teacher", "heldout_ce_best_checkpoint"):
        vals = {arm: [r["arms"][arm][metric] for r in per_seed] for arm in ARMS}
        summary[metric] = {arm: {"values": v, "mean": mean(v), "std": std(v)}
                           for arm, v in vals.items()}
        pairs[metric] = {f"{a}-{b}": paired(vals[a], vals[b]) for a, b in PAIRS}
    secs = {arm: [r["arms"][arm]["train_seconds"] for r in per_seed] for arm in ARMS}
    summary["train_seconds"] = {arm: {"values": v, "mean": mean(v)} for arm, v in secs.items()}
    return summary, pairs


def markdown(res):
    c, s, p = res["config"], res["summary"], res["paired"]
    lines = [
        "# Offline distillation of a small causal LM (examples/distill_llm.py)", "",
        f"Produced by `{res['command']}` ({res['date']}; torch {res['versions']['torch']}, "
        f"fastkd {res['versions']['fastkd']}, {res['device']}, {c['threads']} thread(s), "
        f"{res['total_seconds']:.0f} s).", "",
        f"Synthetic bigram language, V = {c['vocab']}; Bayes-optimal held-out CE "
        f"{res['language']['heldout_bayes_ce']:.4f} nats, uniform {math.log(c['vocab']):.3f}. "
        f"Teacher (2 layers, hidden {c['teacher_hidden']}, {c['teacher_steps']} steps on its own "
        f"{c['teacher_steps'] * c['batch']} sequences): held-out CE "
        f"{res['teacher']['heldout_ce']:.4f}. Student: 1 layer, hidden {c['hidden']}, "
        f"{c['steps']} steps of {c['batch']} sequences x {c['seq']} tokens over a fixed training "
        f"set of {c['train_seqs']} sequences ({c['steps'] * c['batch'] / c['train_seqs']:.1f} "
        f"epochs), AdamW lr {c['lr']}. KD arms: FusedLinearKDLoss(temperature={c['temperature']}"
        f", hard_weight={c['hard_weight']}); offline: top-{c['topk']} cache at T_src = "
        f"{c['cache_temperature']:g} (bf16, {res['cache']['bytes_per_token']:.1f} bytes/token) "
        f"used at T = {c['temperature']}. Held-out: {c['heldout_seqs']} sequences "
        f"({res['language']['heldout_tokens']} predicted tokens) never trained on; all arms of a "
        f"seed start from the same weights and see the same batches.", "",
        "Held-out next-token cross-entropy (nats, lower is better), per seed:", "",
        "| seed | hard labels | online KD | offline KD (cache) | offline − hard "
        "| online − hard | offline − online |",
        "|---|---|---|---|---|---|---|"]
    for r in res["per_seed"]:
        v = {a: r["arms"][a]["heldout_ce"] for a in ARMS}
        lines.append(f"| {r['seed']} | {v['hard']:.4f} | {v['online']:.4f} | {v['offline']:.4f}"
                     f" | {v['offline'] - v['hard']:+.4f} | {v['online'] - v['hard']:+.4f} | "
                     f"{v['offline'] - v['online']:+.4f} |")
    ce = s["heldout_ce"]
    lines.append(f"| mean ± std | {ce['hard']['mean']:.4f} ± {ce['hard']['std']:.4f} | "
                 f"{ce['online']['mean']:.4f} ± {ce['online']['std']:.4f} | "
                 f"{ce['offline']['mean']:.4f} ± {ce['offline']['std']:.4f} | " + " | ".join(
                     f"{p['heldout_ce'][f'{a}-{b}']['mean']:+.4f}" for a, b in PAIRS) + " |")
    lines += ["", "Paired differences over seeds (first arm − second arm; negative: first arm "
              "better):", "",
              "| metric | pair | mean diff | std | paired t | p (two-sided) "
              "| first better / worse |",
              "|---|---|---|---|---|---|---|"]
    for metric, label in (("heldout_ce", "held-out CE"),
                          ("heldout_kl_to_teacher", "KL(teacher‖student)"),
                          ("heldout_ce_best_checkpoint", "best-checkpoint CE")):
        for a, b in PAIRS:
            d = p[metric][f"{a}-{b}"]
            t = "—" if d["t"] is None else f"{d['t']:.2f}"
            pv = "—" if d["p"] is None else f"{d['p']:.2g}"
            lines.append(f"| {label} | {a} − {b} | {d['mean']:+.4f} | {d['std']:.4f} | {t} | "
                         f"{pv} | {d['a_better']}/{d['a_worse']} |")
    kl, best = s["heldout_kl_to_teacher"], s["heldout_ce_best_checkpoint"]
    secs = s["train_seconds"]
    lines += ["", "Mean KL(teacher‖student) on the held-out tokens (T = 1): " + ", ".join(
        f"{a} {kl[a]['mean']:.4f}" for a in ARMS) + ". Best-checkpoint CE: the lowest held-out "
        f"CE among the checkpoints every {c['eval_every']} steps and the final one, i.e. early "
        "stopping chosen on the held-out set itself (optimistic, for every arm alike): " +
        ", ".join(f"{a} {best[a]['mean']:.4f}" for a in ARMS) +
        ". Training time per arm and seed (evaluations excluded): " +
        ", ".join(f"{a} {secs[a]['mean']:.1f} s" for a in ARMS) +
        f". Teacher cache: {res['cache']['num_tokens']} tokens, {res['cache']['bytes']} bytes, "
        f"written in {res['cache']['write_seconds']:.2f} s.", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=32, help="tokens predicted per sequence")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200, help="student steps per arm")
    ap.add_argument("--train-seqs", type=int, default=256,
                    help="size of the student's fixed training set (sequences)")
    ap.add_argument("--heldout-seqs", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64, help="student hidden size")
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--topk", type=int, default=32, help="entries per token in the cache")
    ap.add_argument("--temperature", type=float, default=2.0, help="the loss's temperature T")
    ap.add_argument("--cache-temperature", type=float, default=1.0,
                    help="T_src of the cached log-probabilities (default 1: re-tempered to T)")
    ap.add_argument("--hard-weight", type=float, default=0.5,
                    help="weight of the hard-label CE in the KD arms (soft weight 1)")
    ap.add_argument("--eval-every", type=int, default=40,
                    help="held-out CE every N steps too (0: only at the end)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None,
                    help="keep the teacher cache here (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    lang = BigramLanguage(args.vocab)
    train = lang.sample(args.train_seqs, args.seq + 1, TRAIN_SEED)
    args.heldout_data = lang.sample(args.heldout_seqs, args.seq + 1, HELDOUT_SEED)

    t0 = time.perf_counter()
    teacher = train_teacher(lang, args, dev)
    teacher_seconds = time.perf_counter() - t0
    teacher_ce, _ = evaluate(teacher, None, args.heldout_data, dev)
    say(f"teacher: {args.teacher_steps} steps in {teacher_seconds:.1f} s, held-out CE "
        f"{teacher_ce:.4f} (Bayes {lang.cross_entropy(args.heldout_data):.4f}, uniform "
        f"{math.log(args.vocab):.4f})")

    with tempfile.TemporaryDirectory() as tmp:
        cache_path = os.path.join(args.cache_dir or tmp, "teacher-cache.safetensors")
        if args.cache_dir:
            os.makedirs(args.cache_dir, exist_ok=True)
        t0 = time.perf_counter()
        # The cache covers the student's inputs (all but each sequence's last token): row j of
        # sequence i is the teacher's top-k for token j + 1, aligned with the student's targets.
        write_cache_from_model(teacher, list(train[:, :-1]), cache_path, k=args.topk,
                               temperature=args.cache_temperature, batch_size=64, device=dev,
                               logprob_dtype="bf16", metadata={"model": "TinyCausalLM teacher"},
                               progress=False)
        cache_seconds = time.perf_counter() - t0
        cache = load_cache(cache_path)
        size = os.path.getsize(cache_path)
        cache_info = {"file": os.path.basename(cache_path), "bytes": size,
                      "num_sequences": len(cache), "num_tokens": cache.num_tokens, "k": cache.k,
                      "vocab_size": cache.vocab_size, "source_temperature": cache.temperature,
                      "logprob_dtype": cache.logprob_dtype,
                      "bytes_per_token": size / cache.num_tokens,
                      "data_bytes_per_token": cache.k * (4 + 2), "write_seconds": cache_seconds}
        say(f"cache: {cache.num_tokens} tokens, top-{cache.k} at T_src = {cache.temperature:g}, "
            f"{size} bytes ({size / cache.num_tokens:.1f} bytes/token) in {cache_seconds:.2f} s")

        per_seed = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            init = TinyCausalLM(args.vocab, args.hidden, 1, 2, args.seq).to(dev)
            init_state = {k: v.clone() for k, v in init.state_dict().items()}
            order = batch_order(args.train_seqs, args.steps, args.batch, seed)
            arms = {arm: train_arm(arm, init_state, order, train, cache, teacher, args, dev)
                    for arm in ARMS}
            per_seed.append({"seed": seed, "arms": arms})
            say(f"seed {seed}: held-out CE " + "  ".join(
                f"{a} {arms[a]['heldout_ce']:.4f}" for a in ARMS) + "   (" + ", ".join(
                f"{a} {arms[a]['train_seconds']:.1f} s" for a in ARMS) + ")")
        del cache  # release the memory map before the directory goes

    summary, pairs = summarise(per_seed)
    config = {k: v for k, v in vars(args).items() if k not in ("heldout_data", "out", "quiet",
                                                               "cache_dir")}
    res = {
        "command": " ".join(["python examples/distill_llm.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "fastkd": fastkd.__version__,
                     "python": platform.python_version()},
        "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"cpu ({platform.machine()})"),
        "config": config,
        "arms": {"hard": "F.cross_entropy on the next tokens",
                 "online": f"FusedLinearKDLoss(temperature={args.temperature}, hard_weight="
                           f"{args.hard_weight}) with teacher_hidden/teacher_weight",
                 "offline": f"the same loss with teacher_topk=cache.stack(ids) (top-{args.topk}"
                            f", T_src = {args.cache_temperature:g}, loss T = "
                            f"{args.temperature:g})"},
        "language": {"successor_probs": list(SUCCESSOR_PROBS),
                     "heldout_bayes_ce": lang.cross_entropy(args.heldout_data),
                     "heldout_tokens": args.heldout_data[:, 1:].numel(),
                     "train_tokens": train[:, 1:].numel()},
        "teacher": {"heldout_ce": teacher_ce, "train_seconds": teacher_seconds,
                    "parameters": sum(p.numel() for p in teacher.parameters())},
        "student_parameters": sum(p.numel() for p in init.parameters()),
        "cache": cache_info,
        "per_seed": per_seed,
        "summary": summary,
        "paired": pairs,
        "total_seconds": time.perf_counter() - t_start,
    }
    say("")
    say(markdown(res))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(args.out + ".md", "w") as f:
            f.write(markdown(res))
    return res


if __name__ == "__main__":
    main()
