"""Progressive distillation: do KD schedules (annealed temperature, "hints then logits") beat a
fixed KD setting? Paired over seeds, on the digits of examples/distill_digits.py and on the
small causal LM of examples/distill_llm.py.

The hyperparameters change during training through :mod:`fastkd.schedules`: a
``Scheduler`` sets ``KDLoss.temperature`` / ``soft_weight`` (``setattr`` on the module, no
rebuild) and holds the weight of the feature-hint term as a string target (``sched["hint"]``);
``sched.step()`` runs once per optimizer step.

``--task digits`` (teacher MLP 64-512-512-10 on the full training split; student 64-32-10 on
20 labelled images per class, 200 epochs, as in distill_digits.py). Arms, every one with the
hard-label cross-entropy at weight 1:

* ``ce``: CE alone (reference: shows that the teacher matters in this regime);
* ``fixed``: ``KDLoss(temperature=4, soft_weight=1)`` + 10 x ``FeatureKDLoss(32, 512)`` hint
  (the student's hidden layer regressed onto the teacher's last hidden layer), all the time;
* ``anneal_T``: the same, with T along ``Cosine(8, 2)`` over all steps (2T -> T/2, the fixed T
  at the geometric middle);
* ``hints_then_logits``: ``Stages(("hints", "logits"))`` with the boundary at 1/4 of the steps:
  CE + hint first, then CE + logit KD at T = 4 (FitNets-style; the hint is not computed once its
  weight is 0).

``--task llm`` (distill_llm.py's bigram language, teacher and student; online KD with
``FusedLinearKDLoss(hard_weight=0.5)``): ``fixed`` T = 2 vs ``anneal_T`` T along
``Cosine(4, 1)`` over all steps (again 2T -> T/2).

The schedules above were fixed before any test / held-out number was seen, and not changed
after. One arm was added after the first results, as a control: ``fixed_end_T``, the fixed arm
at the anneal's final temperature T/2 (is a gain or loss of ``anneal_T`` the schedule, or its
lower end temperature?); its comparisons are reported apart, uncorrected. Within a seed every
arm starts from the same weights and sees the same batches in the same order (hashes of both are
in the JSON). Per-seed results, means, and the paired differences against
``fixed`` (``scipy.stats.ttest_rel``, Wilcoxon, wins/ties/losses, 95% CI) go to
``OUT/progressive_kd_<task>.json``; the Markdown next to it is rendered from that JSON alone
(``render_markdown``), so its numbers are the run's numbers.

    python examples/progressive_kd.py --task digits     # 20 seeds, ~13 min on 1 thread
    python examples/progressive_kd.py --task llm        # 10 seeds, ~4 min on 1 thread
    python examples/progressive_kd.py --task digits --quick --out /tmp/pkd   # seconds
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MLP, accuracy, batches, labelled_subset, limit_threads,  # noqa: E402
                     load_digits_split, train_mlp_teacher)
import distill_llm as llm  # noqa: E402

import fastkd  # noqa: E402
from fastkd.schedules import Constant, Cosine, Scheduler, Stages  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = {"digits": ("ce", "fixed", "anneal_T", "hints_then_logits", "fixed_end_T"),
        "llm": ("fixed", "anneal_T", "fixed_end_T")}
BASELINE = "fixed"
# The comparisons decided before the run (Bonferroni over these), then the post-hoc ones:
# fixed_end_T (a constant T at the anneal's final value) was added after the first results, to
# tell an effect of annealing from an effect of the lower final temperature.
PLANNED = {"digits": (("anneal_T", "fixed"), ("hints_then_logits", "fixed")),
           "llm": (("anneal_T", "fixed"),)}
POST_HOC = (("anneal_T", "fixed_end_T"), ("fixed_end_T", "fixed"))
PAIRS = {"digits": PLANNED["digits"] + (("fixed", "ce"),) + POST_HOC,
         "llm": PLANNED["llm"] + POST_HOC}
METRIC = {"digits": ("test_accuracy", "test accuracy (%)", True),
          "llm": ("heldout_ce", "held-out CE (nats/token)", False)}   # name, label, higher better
HINT_WEIGHT = 10.0     # distill_digits.py's hint weight
HINT_FRACTION = 0.25   # share of the steps spent on hints in hints_then_logits

QUICK = {"digits": {"seeds": 2, "epochs": 3, "teacher_epochs": 2},
         "llm": {"seeds": 2, "steps": 6, "batch": 4, "train_seqs": 12, "heldout_seqs": 8,
                 "seq": 8, "vocab": 97, "hidden": 16, "teacher_hidden": 32,
                 "teacher_steps": 3}}


def digits_schedules(arm, kd, total_steps, temperature):
    """The Scheduler of one digits arm: KDLoss attributes as (module, attr) targets, the hint
    weight as the string target "hint"."""
    stages = None
    if arm == "ce":
        plan = {(kd, "soft_weight"): Constant(0.0), "hint": Constant(0.0)}
    elif arm == "fixed":
        plan = {(kd, "temperature"): Constant(temperature), "hint": Constant(HINT_WEIGHT)}
    elif arm in ("anneal_T", "fixed_end_T"):
        plan = {(kd, "temperature"): temperature_schedule(arm, total_steps, temperature),
                "hint": Constant(HINT_WEIGHT)}
    elif arm == "hints_then_logits":
        stages = Stages(("hints", "logits"), boundaries=[max(1, int(HINT_FRACTION * total_steps))])
        plan = {(kd, "temperature"): Constant(temperature),
                (kd, "soft_weight"): stages.gate("logits"),
                "hint": stages.gate("hints", on=HINT_WEIGHT)}
    else:
        raise ValueError(arm)
    return Scheduler(plan, stages=stages)


def temperature_schedule(arm, total_steps, temperature):
    """T of the temperature arms: fixed T, annealed 2T -> T/2, or fixed at the anneal's end."""
    return {"fixed": Constant(temperature), "fixed_end_T": Constant(temperature / 2),
            "anneal_T": Cosine(2 * temperature, temperature / 2, steps=total_steps)}[arm]


def run_steps(sched, total, one_step):
    """Calls ``one_step(step)`` ``total`` times, stepping the scheduler after each; returns the
    values it applied at the first step, 1/4, 1/2, 3/4 and the last (the schedule as run)."""
    marks = {0, total // 4, total // 2, 3 * total // 4, total - 1}
    seen = {}
    for step in range(total):
        if step in marks:
            seen[str(step)] = dict(sched.last_values)
        one_step(step)
        sched.step()
    return seen


def train_digits_arm(arm, init_state, data, args, seed):
    x, y, t_logits, t_hidden = data
    hidden = (args.student_hidden,)
    student = MLP(hidden)
    student.load_state_dict(init_state)
    record = {"init_sha256": llm.param_hash(student)}
    kd = fastkd.KDLoss(temperature=args.temperature, soft_weight=1.0, hard_weight=1.0)
    torch.manual_seed(10_000 + seed)     # the hint adapter's init: the same in every arm
    hint = fastkd.FeatureKDLoss(hidden[-1], t_hidden.shape[1])
    opt = torch.optim.Adam(list(student.parameters()) + list(hint.parameters()), lr=args.lr)
    per_epoch = math.ceil(len(x) / args.batch_size)
    total = args.epochs * per_epoch
    sched = digits_schedules(arm, kd, total, args.temperature)
    gen = torch.Generator().manual_seed(seed)      # the batch order, the same in every arm
    order = iter([idx for _ in range(args.epochs) for idx in batches(len(x), args.batch_size,
                                                                       gen)])
    seen = hashlib.sha256()
    student.train()

    def one_step(step):
        idx = next(order)
        seen.update(idx.numpy().astype("<i8").tobytes())
        logits, h = student(x[idx])
        loss = kd(logits, t_logits[idx], y[idx])   # soft_weight * T^2 KL + CE
        w = sched["hint"]
        if w:   # weight 0 (ce, or the logits stage): skip the hint's forward and backward
            loss = loss + w * hint(h, t_hidden[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    record["schedule_trace"] = run_steps(sched, total, one_step)
    record["train_seconds"] = time.perf_counter() - t0
    record["steps"] = total
    record["batches_sha256"] = seen.hexdigest()
    record["schedule"] = repr(sched)
    return student.eval(), record


def run_digits(args):
    x_tr, y_tr, x_te, y_te = load_digits_split()
    teacher = train_mlp_teacher(x_tr, y_tr, epochs=args.teacher_epochs, seed=0)
    with torch.no_grad():
        t_logits, t_hidden = teacher(x_tr)
    sub = labelled_subset(y_tr, args.labels_per_class)
    data = (x_tr[sub], y_tr[sub], t_logits[sub], t_hidden[sub])
    per_seed = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = copy.deepcopy(MLP((args.student_hidden,)).state_dict())
        arms = {}
        for arm in ARMS["digits"]:
            student, rec = train_digits_arm(arm, init, data, args, seed)
            rec["test_accuracy"] = accuracy(student, x_te, y_te)
            arms[arm] = rec
        per_seed.append({"seed": seed, "arms": arms})
        args.say(f"seed {seed}: " + "  ".join(f"{a} {100 * r['test_accuracy']:.2f}"
                                              for a, r in arms.items()))
    info = {"teacher_test_accuracy": accuracy(teacher, x_te, y_te), "n_labelled": len(sub),
            "n_test": len(y_te)}
    return per_seed, info


def train_llm_arm(arm, init_state, order, train, teacher, args, dev):
    student = llm.TinyCausalLM(args.vocab, args.hidden, 1, 2, args.seq).to(dev)
    student.load_state_dict(init_state)
    record = {"init_sha256": llm.param_hash(student)}
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, hard_weight=args.hard_weight)
    sched = Scheduler({(kd, "temperature"): temperature_schedule(arm, len(order),
                                                                 args.temperature)})
    seen = hashlib.sha256()

    def one_step(step):
        ids = order[step]
        seen.update(ids.numpy().astype("<i8").tobytes())
        tok = train[ids].to(dev)
        with torch.no_grad():
            th = teacher.hidden_states(tok[:, :-1])
        loss = kd(student.hidden_states(tok[:, :-1]), student.lm_head.weight, th,
                  teacher.lm_head.weight, tok[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    record["schedule_trace"] = run_steps(sched, len(order), one_step)
    record["train_seconds"] = time.perf_counter() - t0
    record["steps"] = len(order)
    record["batches_sha256"] = seen.hexdigest()
    record["schedule"] = repr(sched)
    record["heldout_ce"], record["heldout_kl_to_teacher"] = llm.evaluate(
        student.eval(), teacher, args.heldout_data, dev)
    return record


def run_llm(args):
    dev = torch.device("cpu")
    lang = llm.BigramLanguage(args.vocab)
    train = lang.sample(args.train_seqs, args.seq + 1, llm.TRAIN_SEED)
    args.heldout_data = lang.sample(args.heldout_seqs, args.seq + 1, llm.HELDOUT_SEED)
    teacher = llm.train_teacher(lang, args, dev)   # reads vocab, teacher_hidden, seq, lr, ...
    per_seed = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = llm.TinyCausalLM(args.vocab, args.hidden, 1, 2, args.seq).state_dict()
        init = {k: v.clone() for k, v in init.items()}
        order = llm.batch_order(args.train_seqs, args.steps, args.batch, seed)
        arms = {arm: train_llm_arm(arm, init, order, train, teacher, args, dev)
                for arm in ARMS["llm"]}
        per_seed.append({"seed": seed, "arms": arms})
        args.say(f"seed {seed}: " + "  ".join(f"{a} {r['heldout_ce']:.4f} "
                                              f"({r['train_seconds']:.1f} s)"
                                              for a, r in arms.items()))
    info = {"teacher_heldout_ce": llm.evaluate(teacher, None, args.heldout_data, dev)[0],
            "heldout_bayes_ce": lang.cross_entropy(args.heldout_data),
            "heldout_tokens": args.heldout_data[:, 1:].numel()}
    del args.heldout_data   # not a setting: keep it out of the JSON
    return per_seed, info


def paired(a, b, higher_is_better):
    """Paired comparison of per-seed values ``a`` (an arm) against ``b`` (its baseline):
    differences a - b, a's wins/ties/losses, paired t-test and Wilcoxon p, 95% CI of the mean."""
    from scipy import stats

    d = [u - v for u, v in zip(a, b)]
    sign = 1 if higher_is_better else -1
    n, m = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    out = {"diffs": d, "mean": m, "std": sd, "n": n,
           "wins": sum(sign * x > 0 for x in d), "ties": sum(x == 0 for x in d),
           "losses": sum(sign * x < 0 for x in d), "t_p": None, "wilcoxon_p": None,
           "ci95": None}
    if n > 1 and sd > 0:
        out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out["ci95"] = [m - half, m + half]
        if any(d):
            out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return out


def summarise(task, per_seed):
    key, _, higher = METRIC[task]
    vals = {arm: [r["arms"][arm][key] for r in per_seed] for arm in ARMS[task]}
    summary = {}
    for arm, v in vals.items():
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        summary[arm] = {"values": v, "mean": m, "std": sd}
    pairs = {f"{a}-{b}": paired(vals[a], vals[b], higher) for a, b in PAIRS[task]}
    return summary, pairs


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


# ---- Markdown, from the JSON alone ---------------------------------------------------------

def _p(p):
    return "—" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _sentence(res, pair, level):
    """``a`` vs ``b`` in words and numbers; significant when p < ``level`` (None: no verdict)."""
    task = res["task"]
    a, b = pair.split("-")
    d = res["paired"][pair]
    scale, unit = (100, " points") if task == "digits" else (1, " nats")
    better = (d["mean"] > 0) == METRIC[task][2]
    ci = ("" if d["ci95"] is None else
          f", 95% CI [{scale * d['ci95'][0]:+.3g}, {scale * d['ci95'][1]:+.3g}]{unit}")
    if level is None:
        verdict = f"`{a}` − `{b}`"
    elif d["t_p"] is not None and d["t_p"] < level:
        verdict = f"`{a}` is {'better' if better else 'worse'} than `{b}` (p < {level:.3g})"
    else:
        verdict = (f"`{a}` shows no significant difference from `{b}` at α = {level:.3g} "
                   f"(mean leaning {'its' if better else 'the other'} way)")
    return (f"{verdict}: {scale * d['mean']:+.3g}{unit}, p = {_p(d['t_p'])}, "
            f"{d['wins']}/{d['ties']}/{d['losses']} wins/ties/losses{ci}.")


def _conclusion(task, res):
    """Sentences from the paired statistics: the planned comparisons at 0.05 Bonferroni, then
    the reference and post-hoc ones (uncorrected)."""
    planned = [f"{a}-{b}" for a, b in PLANNED[task]]
    alpha = 0.05 / len(planned)
    bonf = f" / {len(planned)} (Bonferroni)" if len(planned) > 1 else ""
    out = [f"Planned comparisons (α = 0.05{bonf}):", ""]
    out += [f"- {_sentence(res, k, alpha)}" for k in planned]
    out += ["", "Reference and post-hoc comparisons (exploratory, p uncorrected):", ""]
    if task == "digits":
        out.append("- Does the teacher matter in this regime? "
                   + _sentence(res, "fixed-ce", None))
    out.append("- Annealing vs a fixed T at the anneal's end value (is it the schedule or the "
               "end temperature?): " + _sentence(res, "anneal_T-fixed_end_T", 0.05))
    out.append("- The end temperature alone: " + _sentence(res, "fixed_end_T-fixed", 0.05))
    return out


def render_markdown(res):
    """The Markdown report of one run, a function of its JSON dict only."""
    task, c = res["task"], res["config"]
    key, label, higher = METRIC[task]
    scale, fmt = (100, "{:.2f}") if task == "digits" else (1, "{:.4f}")
    f = lambda v: fmt.format(scale * v)  # noqa: E731
    fd = lambda v: fmt.replace("{:", "{:+").format(scale * v)  # noqa: E731
    arms = ARMS[task]
    v = res["versions"]
    lines = [f"# Progressive KD vs fixed KD: {task} (examples/progressive_kd.py)", "",
             f"Produced by `{res['command']}` ({res['date']}; torch {v['torch']}, fastkd "
             f"{v['fastkd']}, scipy {v['scipy']}, Python {v['python']}; {res['machine']}; "
             f"{c['threads']} thread(s); {res['total_seconds']:.0f} s).", ""]
    if task == "digits":
        i = res["info"]
        lines += [
            f"Teacher MLP 64-512-512-10 ({c['teacher_epochs']} epochs on the full training "
            f"split): test accuracy {100 * i['teacher_test_accuracy']:.2f}%. Student MLP "
            f"64-{c['student_hidden']}-10 trained on {i['n_labelled']} labelled images "
            f"({c['labels_per_class']} per class), {c['epochs']} epochs of batch "
            f"{c['batch_size']}, Adam lr {c['lr']}; test set: {i['n_test']} digits. Every arm "
            "has the hard-label CE at weight 1.", ""]
    else:
        i = res["info"]
        lines += [
            f"Synthetic bigram language of examples/distill_llm.py, V = {c['vocab']} (Bayes "
            f"held-out CE {i['heldout_bayes_ce']:.4f} nats). Teacher: 2 layers, hidden "
            f"{c['teacher_hidden']}, {c['teacher_steps']} steps, held-out CE "
            f"{i['teacher_heldout_ce']:.4f}. Student: 1 layer, hidden {c['hidden']}, "
            f"{c['steps']} steps of {c['batch']} sequences x {c['seq']} tokens over a fixed "
            f"set of {c['train_seqs']} sequences, AdamW lr {c['lr']}, online KD "
            f"`FusedLinearKDLoss(hard_weight={c['hard_weight']})`. Held-out: "
            f"{c['heldout_seqs']} sequences ({i['heldout_tokens']} tokens) never trained on.",
            ""]
    lines += ["Arms (the schedules were fixed before any test/held-out result was seen; "
              "`fixed_end_T` is a control added afterwards):", ""]
    lines += [f"- `{a}`: {res['arms'][a]}" for a in arms]
    lines += ["", f"Within a seed every arm starts from the same weights and sees the same "
              "batches in the same order (SHA-256 of both per arm in the JSON).", "",
              f"{label[0].upper() + label[1:]}, per seed "
              f"({'higher' if higher else 'lower'} is better):", "",
              "| seed | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for r in res["per_seed"]:
        lines.append(f"| {r['seed']} | " + " | ".join(f(r["arms"][a][key]) for a in arms)
                     + " |")
    s = res["summary"]
    lines.append("| mean ± std | " + " | ".join(f"{f(s[a]['mean'])} ± {f(s[a]['std'])}"
                                                for a in arms) + " |")
    lines += ["", f"Paired differences over {len(res['per_seed'])} seeds (first arm − second; "
              f"wins: the first arm {'higher' if higher else 'lower'}):", "",
              "| pair | mean diff | std | 95% CI | wins/ties/losses | paired t-test p "
              "| Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for k, d in res["paired"].items():
        ci = "—" if d["ci95"] is None else f"[{f(d['ci95'][0])}, {f(d['ci95'][1])}]"
        lines.append(f"| {k.replace('-', ' − ')} | {fd(d['mean'])} | "
                     f"{f(d['std'])} | {ci} | {d['wins']}/{d['ties']}/{d['losses']} | "
                     f"{_p(d['t_p'])} | {_p(d['wilcoxon_p'])} |")
    lines += ["", "## Conclusion (generated from the statistics above)", ""]
    lines += _conclusion(task, res)
    n = len(res["per_seed"])
    avg = lambda k: {a: sum(r["arms"][a][k] for r in res["per_seed"]) / n  # noqa: E731
                     for a in arms}
    lines += ["", "What this does not show: one data split and one teacher; one schedule per "
              "idea, its endpoints chosen without tuning (a different T range or stage boundary "
              "may behave otherwise)."]
    if task == "digits":
        lines[-1] += (f" `hints_then_logits` differs from `fixed` in two ways at once: the order "
                      f"of the two teacher signals, and how long each is on (hint for the first "
                      f"{HINT_FRACTION:g} of the steps, logit KD for the rest, against both all "
                      f"the time). One test digit is {100 / res['info']['n_test']:.3f} points.")
    else:
        kl = avg("heldout_kl_to_teacher")
        lines += ["", "Mean held-out KL(teacher‖student) per token at T = 1: " +
                  ", ".join(f"{a} {kl[a]:.4f}" for a in arms) + "."]
    secs = avg("train_seconds")
    lines += ["", "Mean training time per arm and seed: " +
              ", ".join(f"{a} {secs[a]:.1f} s" for a in arms) + ".", ""]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------

def arm_descriptions(task, args):
    t = args.temperature
    if task == "digits":
        kd = "KDLoss(soft_weight=1, hard_weight=1)"
        return {
            "ce": "CE only (KDLoss soft_weight 0, no hint)",
            "fixed": f"{kd} at T = {t:g} + {HINT_WEIGHT:g} x FeatureKDLoss hint "
                     f"({args.student_hidden} -> 512), constant",
            "anneal_T": f"as fixed, T along Cosine({2 * t:g} -> {t / 2:g}) over all steps",
            "hints_then_logits": f"Stages hints / logits, boundary at {HINT_FRACTION:g} of the "
                                 f"steps: CE + {HINT_WEIGHT:g} x hint, then CE + logit KD at "
                                 f"T = {t:g} (hint off)",
            "fixed_end_T": f"as fixed, at T = {t / 2:g} (post-hoc control)"}
    return {"fixed": f"T = {t:g} constant",
            "anneal_T": f"T along Cosine({2 * t:g} -> {t / 2:g}) over all steps",
            "fixed_end_T": f"T = {t / 2:g} constant (post-hoc control)"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("digits", "llm"), default="digits")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (seconds), for the tests: " + json.dumps(QUICK))
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds 0 .. N-1 (default: digits 20, llm 10)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="the fixed T, the anneal goes 2T -> T/2 (default: digits 4, llm 2)")
    ap.add_argument("--lr", type=float, default=None, help="default: digits 3e-3, llm 3e-3")
    g = ap.add_argument_group("digits")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--teacher-epochs", type=int, default=60)
    g.add_argument("--labels-per-class", type=int, default=20)
    g.add_argument("--student-hidden", type=int, default=32)
    g.add_argument("--batch-size", type=int, default=64)
    g = ap.add_argument_group("llm (defaults of examples/distill_llm.py)")
    for name, default in (("vocab", 1024), ("seq", 32), ("batch", 16), ("steps", 200),
                          ("train-seqs", 256), ("heldout-seqs", 256), ("hidden", 64),
                          ("teacher-hidden", 128), ("teacher-steps", 400)):
        g.add_argument("--" + name, type=int, default=default)
    g.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=RESULTS, help="folder of progressive_kd_<task>.json/.md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = 20 if args.task == "digits" else 10
    if args.temperature is None:
        args.temperature = 4.0 if args.task == "digits" else 2.0
    if args.lr is None:
        args.lr = 3e-3
    if args.quick:
        for k, v in QUICK[args.task].items():
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    limit_threads(args.threads)
    args.say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    per_seed, info = (run_digits if args.task == "digits" else run_llm)(args)
    summary, pairs = summarise(args.task, per_seed)
    import scipy
    config = {k: v for k, v in vars(args).items() if k not in ("say", "out", "quiet")}
    config["threads"] = torch.get_num_threads()
    res = {"task": args.task,
           "command": " ".join(["python examples/progressive_kd.py", *argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "fastkd": fastkd.__version__,
                        "scipy": scipy.__version__, "python": platform.python_version()},
           "machine": machine(), "config": config,
           "arms": arm_descriptions(args.task, args), "metric": METRIC[args.task][0],
           "info": info, "per_seed": per_seed, "summary": summary, "paired": pairs,
           "total_seconds": time.perf_counter() - t_start}
    # Round-trip through JSON before rendering: the Markdown is then exactly what
    # render_markdown gives for the file on disk.
    res = json.loads(json.dumps(res))
    md = render_markdown(res)
    stem = os.path.join(args.out, f"progressive_kd_{args.task}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
        fh.write("\n")
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    args.say("\n" + md + f"\nwrote {stem}.json / .md")
    return res


if __name__ == "__main__":
    main()
