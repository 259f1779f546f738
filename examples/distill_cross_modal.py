"""Cross-modal distillation: a teacher that sees pixels, a student that sees only 1-D profiles.

Every digit of scikit-learn's 8x8 set is observed through two modalities:

* the teacher's: the 8x8 image (64 pixels);
* the student's: 16 numbers, the row and column projection profiles of the same image (the mean
  ink of each of the 8 rows and 8 columns), with fixed Gaussian "sensor" noise of std ``--noise``
  drawn once per sample, then standardised. The student never sees a pixel.

The teacher (``SmallCNN`` of examples/_common.py, 128-d embedding) is trained with every label of
the training part on pixels. The student (MLP 16 -> 64 -> 32 -> 10, 32-d embedding) gets labels
for only ``--labels-per-class`` samples per class, but all training samples come as pairs (both
views), so the teacher can describe each of them: the realistic cross-modal setting, where the
new sensor has few labels and the old one a trained model. The teacher's inputs are used only to
compute its targets, once, before the students train.

Arms (per seed: the same student initialisation and the same labelled-batch order in every arm;
each step takes ``--labelled-batch`` labelled samples and, except in ``hard``, ``--pool-batch``
samples of the paired pool, the labelled ones included, from one fixed order per seed):

- ``hard``:       cross-entropy on the labelled samples only (the student alone);
- ``kd``:         + ``fastkd.KDLoss`` (soft term, T^2 KL) against the teacher logits on every row;
- ``all``:        + ``fastkd.FeatureKDLoss(32, 128)`` (its own learned adapter from the student's
                  32-d embedding to the teacher's 128-d one, optimised with the student) and
                  ``fastkd.RKDLoss`` (distance + angle) between the two embeddings;
- ``all_labels``: a reference, not a method: cross-entropy with the true labels of every pool
                  sample (labels the distilled students never get), on the same batches.

Hyperparameters: the temperature, then the feature and relation weights, are chosen on a
validation part of the training split (never on the test set) with pilot seeds distinct from the
reported ones; the grid, every pilot score and the choice are written out. Then every arm runs on
``--seeds`` seeds and is scored on the 540 test digits; paired statistics (scipy's ``ttest_rel``
and Wilcoxon) compare each arm with ``hard``, and ``all`` with ``kd``.

Outputs ``<out>/<name>.json`` (everything measured) and ``<out>/<name>.md`` rendered from that
JSON alone (``--render FILE.json`` renders again). About 5 to 10 minutes on one CPU thread
(567 s on a shared, loaded 2-core machine)::

    python examples/distill_cross_modal.py                 # writes examples/results/
    python examples/distill_cross_modal.py --quick --out /tmp/xm   # seconds, a smoke run
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
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MLP, accuracy, labelled_subset, limit_threads,  # noqa: E402
                     load_digits_split, train_cnn_teacher)
from distill_digits import fmt_p, mean_std, paired_stats  # noqa: E402
from distill_llm import batch_order, param_hash  # noqa: E402

import fastkd  # noqa: E402

ARMS = ("hard", "kd", "all", "all_labels")
LABELS = {
    "hard": "student alone (CE on its labels)",
    "kd": "+ logit KD (KDLoss)",
    "all": "+ KD + FeatureKDLoss + RKDLoss",
    "all_labels": "reference: CE with every pool label",
}
PAIRS = (("kd", "hard"), ("all", "hard"), ("all", "kd"), ("all_labels", "hard"),
         ("all", "all_labels"))
STUDENT_HIDDEN = (64, 32)
PROFILE_DIM = 16
# Fixed random streams: the validation split, the sensor noise, the pool order (added to the
# seed), the adapter's initialisation (added to the seed).
VAL_SPLIT_SEED, NOISE_SEED, POOL_SEED_OFFSET, ADAPTER_SEED_OFFSET = 1, 2, 5_000, 20_000
QUICK = {"seeds": 2, "pilot_seeds": 1, "steps": 20, "teacher_epochs": 2}


def profiles(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """[N, 64] pixels -> [N, 16]: mean ink per row, then per column, plus fixed Gaussian noise."""
    img = x.view(-1, 8, 8)
    p = torch.cat([img.mean(2), img.mean(1)], 1)
    g = torch.Generator().manual_seed(seed)
    return p + noise * torch.randn(p.shape, generator=g)


def make_data(args):
    """The two views of the fit / validation / test parts, and the labelled subset of fit."""
    from sklearn.model_selection import train_test_split

    x_tr, y_tr, x_te, y_te = load_digits_split()
    fit, val = train_test_split(torch.arange(len(y_tr)).numpy(), test_size=args.val_fraction,
                                random_state=VAL_SPLIT_SEED, stratify=y_tr.numpy())
    fit, val = torch.as_tensor(fit), torch.as_tensor(val)
    # One noise draw per sample and part (the sensor's reading is fixed, not re-drawn per epoch).
    z_tr = profiles(x_tr, args.noise, NOISE_SEED)
    z_te = profiles(x_te, args.noise, NOISE_SEED + 1)
    mu, sd = z_tr[fit].mean(0), z_tr[fit].std(0)
    z_tr, z_te = (z_tr - mu) / sd, (z_te - mu) / sd
    return {
        "pix_fit": x_tr[fit], "pix_val": x_tr[val], "pix_test": x_te,
        "z_fit": z_tr[fit], "z_val": z_tr[val], "z_test": z_te,
        "y_fit": y_tr[fit], "y_val": y_tr[val], "y_test": y_te,
        "labelled": labelled_subset(y_tr[fit], args.labels_per_class),
    }


def order_hash(order: torch.Tensor) -> str:
    return hashlib.sha256(order.numpy().astype("<i8").tobytes()).hexdigest()


def train_student(arm, cfg, init_state, data, teacher_out, seed, args):
    """One student from ``init_state``; returns it and what identifies its training."""
    z, y, lab = data["z_fit"], data["y_fit"], data["labelled"]
    t_logits, t_emb = teacher_out
    student = MLP(STUDENT_HIDDEN, in_dim=PROFILE_DIM)
    student.load_state_dict(init_state)
    kd = fastkd.KDLoss(temperature=cfg.get("temperature", 1.0),
                       soft_weight=cfg.get("kd", 0.0), hard_weight=0.0)
    torch.manual_seed(ADAPTER_SEED_OFFSET + seed)        # the same adapter start per seed
    feat = fastkd.FeatureKDLoss(STUDENT_HIDDEN[-1], t_emb.shape[1])
    rkd = fastkd.RKDLoss(distance_weight=1.0, angle_weight=2.0)
    params = list(student.parameters())
    if cfg.get("feature"):
        params += list(feat.parameters())                # the adapter learns with the student
    opt = torch.optim.Adam(params, lr=args.lr)
    lab_order = batch_order(len(lab), args.steps, args.labelled_batch, seed)
    pool_order = batch_order(len(y), args.steps, args.pool_batch, POOL_SEED_OFFSET + seed)
    nl = args.labelled_batch
    t0 = time.perf_counter()
    student.train()
    for step in range(args.steps):
        li = lab[lab_order[step]]
        if arm == "hard":
            loss = F.cross_entropy(student(z[li])[0], y[li])
        else:
            idx = torch.cat([li, pool_order[step]])
            logits, emb = student(z[idx])
            if arm == "all_labels":
                loss = F.cross_entropy(logits, y[idx])
            else:
                # Labels only where the student has them; the teacher's signals on every row.
                loss = F.cross_entropy(logits[:nl], y[li]) + kd(logits, t_logits[idx])
                if cfg.get("feature"):
                    loss = loss + cfg["feature"] * feat(emb, t_emb[idx])
                if cfg.get("rkd"):
                    loss = loss + cfg["rkd"] * rkd(emb, t_emb[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    return student, {"labelled_batches_sha256": order_hash(lab_order),
                     "pool_batches_sha256": None if arm == "hard" else order_hash(pool_order),
                     "train_seconds": time.perf_counter() - t0}


def new_init(seed: int) -> MLP:
    """The seed's untrained student; every arm copies its weights."""
    torch.manual_seed(seed)
    return MLP(STUDENT_HIDDEN, in_dim=PROFILE_DIM)


def pilot(arm, cfg, data, teacher_out, args):
    """Validation accuracies of ``arm`` with ``cfg`` over the pilot seeds."""
    accs = []
    for seed in args.pilot_seed_list:
        st, _ = train_student(arm, cfg, new_init(seed).state_dict(), data, teacher_out, seed, args)
        accs.append(accuracy(st, data["z_val"], data["y_val"]))
    return accs


def tune(data, teacher_out, args, log):
    """Pick T on ``kd``, then (feature, rkd) weights on ``all`` with that T: best mean
    validation accuracy over the pilot seeds, the first in grid order on a tie."""
    rows = []

    def best(arm, cfgs):
        scored = []
        for cfg in cfgs:
            accs = pilot(arm, cfg, data, teacher_out, args)
            rows.append({"arm": arm, "config": cfg, "val_accuracy": accs,
                         "mean": sum(accs) / len(accs)})
            scored.append((rows[-1]["mean"], -len(scored), cfg))
            log(f"  tune {arm} {cfg}: val {100 * rows[-1]['mean']:.2f}")
        return max(scored, key=lambda s: s[:2])[2]

    hard = pilot("hard", {}, data, teacher_out, args)
    kd_cfg = best("kd", [{"temperature": t, "kd": 1.0} for t in args.temperature_grid])
    all_cfg = best("all", [dict(kd_cfg, feature=f, rkd=r)
                           for f in args.feature_grid for r in args.rkd_grid])
    return {"pilot_seeds": args.pilot_seed_list, "hard_val_accuracy": hard, "grid": rows,
            "chosen": {"hard": {}, "kd": kd_cfg, "all": all_cfg, "all_labels": {}}}


def paired(a, b):
    out = paired_stats(a, b)
    diffs = [u - v for u, v in zip(a, b)]
    out["diffs"] = diffs
    out["std_diff"] = mean_std(diffs)[1]
    return out


def environment(args):
    import numpy
    import scipy
    import sklearn
    return {"python": platform.python_version(), "torch": torch.__version__,
            "fastkd": fastkd.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "sklearn": sklearn.__version__,
            "machine": platform.machine(), "system": platform.system(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def run(args, log=print):
    t_start = time.time()
    data = make_data(args)
    teacher = train_cnn_teacher(data["pix_fit"], data["y_fit"], epochs=args.teacher_epochs,
                                seed=0)
    with torch.no_grad():
        teacher_out = teacher(data["pix_fit"])           # logits, 128-d embedding; fixed targets
    teacher_acc = {"fit": (teacher_out[0].argmax(-1) == data["y_fit"]).float().mean().item(),
                   "val": accuracy(teacher, data["pix_val"], data["y_val"]),
                   "test": accuracy(teacher, data["pix_test"], data["y_test"]),
                   # how close to one-hot its targets on the pool are (mean top probability)
                   "fit_confidence": teacher_out[0].softmax(-1).max(-1).values.mean().item()}
    log(f"teacher (pixels): val {100 * teacher_acc['val']:.2f}, "
        f"test {100 * teacher_acc['test']:.2f}")
    tuning = tune(data, teacher_out, args, log)
    chosen = tuning["chosen"]

    per_seed = []
    for seed in args.seed_list:
        init = new_init(seed)
        rec = {"seed": seed, "init_sha256": param_hash(init), "arms": {}}
        for arm in ARMS:
            st, info = train_student(arm, chosen[arm], init.state_dict(), data, teacher_out,
                                     seed, args)
            info["test_accuracy"] = accuracy(st, data["z_test"], data["y_test"])
            info["val_accuracy"] = accuracy(st, data["z_val"], data["y_val"])
            rec["arms"][arm] = info
        log(f"seed {seed}: " + ", ".join(f"{a} {100 * rec['arms'][a]['test_accuracy']:.2f}"
                                         for a in ARMS))
        per_seed.append(rec)

    test = {a: [r["arms"][a]["test_accuracy"] for r in per_seed] for a in ARMS}
    val = {a: [r["arms"][a]["val_accuracy"] for r in per_seed] for a in ARMS}
    summary = {a: {"test_mean": mean_std(test[a])[0], "test_std": mean_std(test[a])[1],
                   "val_mean": mean_std(val[a])[0]} for a in ARMS}
    settings = {k: v for k, v in vars(args).items()
                if k not in ("seed_list", "pilot_seed_list", "render", "command")}
    return {
        "command": args.command, "date": datetime.date.today().isoformat(),
        "settings": settings,
        "setup": {
            "teacher_modality": "8x8 image (64 pixels in [0, 1])",
            "student_modality": f"row and column mean-ink profiles (16 numbers) + fixed "
                                f"Gaussian noise (std {args.noise}), standardised",
            "teacher_model": "SmallCNN (conv 16, conv 32, max-pool, fc 128)",
            "teacher_dim": int(teacher_out[1].shape[1]),
            "student_model": "MLP " + "-".join(map(str, (PROFILE_DIM,) + STUDENT_HIDDEN
                                                   + (10,))),
            "student_dim": STUDENT_HIDDEN[-1],
            "student_params": sum(p.numel() for p in MLP(STUDENT_HIDDEN, in_dim=PROFILE_DIM)
                                  .parameters()),
            "rkd": {"distance_weight": 1.0, "angle_weight": 2.0},
            "n_fit": len(data["y_fit"]), "n_labelled": len(data["labelled"]),
            "n_val": len(data["y_val"]), "n_test": len(data["y_test"]),
        },
        "teacher_accuracy": teacher_acc, "tuning": tuning, "seeds": args.seed_list,
        "per_seed": per_seed, "summary": summary,
        "paired": {f"{a}-{b}": paired(test[a], test[b]) for a, b in PAIRS},
        "environment": environment(args), "seconds": time.time() - t_start,
    }


def _cfg_text(cfg):
    parts = []
    if "temperature" in cfg:
        parts.append(f"T = {cfg['temperature']:g}")
    if cfg.get("feature"):
        parts.append(f"feature weight {cfg['feature']:g}")
    if cfg.get("rkd"):
        parts.append(f"RKD weight {cfg['rkd']:g}")
    return ", ".join(parts) or "—"


def conclusion(res):
    """Sentences that follow from the paired numbers (a two-sided 5% level, as stated)."""
    p = res["paired"]

    def verdict(key):
        d = p[key]
        if d["t_p"] == d["t_p"] and d["t_p"] < 0.05:
            word = "better" if d["mean_diff"] > 0 else "worse"
            return (f"{100 * abs(d['mean_diff']):.2f} points {word} (significant, "
                    f"p = {fmt_p(d['t_p'])}, {d['wins']}/{d['ties']}/{d['losses']})")
        return (f"{100 * d['mean_diff']:+.2f} points, not significant at 5% "
                f"(p = {fmt_p(d['t_p'])}, {d['wins']}/{d['ties']}/{d['losses']})")

    s, su, t = res["summary"], res["setup"], res["teacher_accuracy"]
    ref = p["all_labels-hard"]["mean_diff"]
    gap = s["all_labels"]["test_mean"] - s["hard"]["test_mean"]
    closed = (s["all"]["test_mean"] - s["hard"]["test_mean"]) / gap if gap > 0 else float("nan")
    if closed != closed:
        reach = ""
    elif closed > 1:
        reach = (". Without a single pool label, KD + feature + RKD ends above that reference "
                 "(last pair of the table): with these settings the teacher's softened targets on "
                 "the pool did better than the pool's true one-hot labels")
    else:
        reach = (f". Of the gap between the student alone and that reference, KD + feature + "
                 f"RKD closes {100 * closed:.0f}%")
    text = [
        f"Against the student alone, logit KD alone is {verdict('kd-hard')}; KD + feature + "
        f"RKD is {verdict('all-hard')}. Adding the feature and relation terms to KD: "
        f"{verdict('all-kd')}. KD + feature + RKD against the reference with every pool "
        f"label: {verdict('all-all_labels')}.",
        "",
        f"The teacher reaches {100 * t['test']:.2f}% on pixels; the profile student with every "
        f"fit label reaches {100 * s['all_labels']['test_mean']:.2f}%"
        + (" (the 16 noisy profile numbers carry less than the 64 pixels, and the student is "
           "small)" if s["all_labels"]["test_mean"] < t["test"] else "") + reach + ".",
        "",
        f"Caveats: one data set, one split, one teacher. The teacher's pool targets are on its "
        f"own training images ({100 * t['fit']:.1f}% correct, mean top probability "
        f"{t['fit_confidence']:.3f} at T = 1): through the other modality it hands the student "
        + ("almost the true labels" if t["fit"] >= 0.95 else "its (often wrong) predictions")
        + f" of the {su['n_fit'] - su['n_labelled']} pool samples that have no student label. "
        f"Most of the gain over the student alone is the use of those samples at all (the "
        f"reference arm, with their true labels, gains {100 * ref:+.2f} points), which the "
        "student alone cannot have: that is the cross-modal setting this example shows.",
    ]
    return "\n".join(text)


def render_markdown(res) -> str:
    """The report, from the JSON of a run alone (nothing else is read)."""
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    st, su, env = res["settings"], res["setup"], res["environment"]
    tu, ch = res["tuning"], res["tuning"]["chosen"]
    lines = [
        f"# {st['name']}", "",
        f"Produced by `{res['command']}` ({res['date']}; torch {env['torch']}, fastkd "
        f"{env['fastkd']}, numpy {env['numpy']}, scipy {env['scipy']}, scikit-learn "
        f"{env['sklearn']}, Python {env['python']}, {env['system']} {env['machine']}, "
        f"{env['cpu_count']} CPU(s), {env['threads']} torch thread(s), "
        f"{res['seconds']:.0f} s).", "",
        "## Setup", "",
        f"- Teacher modality: {su['teacher_modality']}. Teacher: {su['teacher_model']}, "
        f"{su['teacher_dim']}-d embedding, trained on pixels with all {su['n_fit']} labels of "
        f"the fit part for {st['teacher_epochs']} epochs: {pct(res['teacher_accuracy']['val'])}% "
        f"validation, {pct(res['teacher_accuracy']['test'])}% test accuracy.",
        f"- Student modality: {su['student_modality']}; the student never sees pixels. "
        f"Student: {su['student_model']} ({su['student_params']} parameters), "
        f"{su['student_dim']}-d embedding.",
        f"- Data: the fixed 70/30 split of examples/_common.py; the training part is split "
        f"again into fit ({su['n_fit']}) and validation ({su['n_val']}, for the choice of "
        f"hyperparameters only); test: {su['n_test']}. The student has labels for "
        f"{su['n_labelled']} fit samples ({st['labels_per_class']} per class); all "
        f"{su['n_fit']} fit samples are paired (both views), and the teacher's logits and "
        f"embedding on their pixels are its targets.",
        f"- Training: {st['steps']} Adam steps, lr {st['lr']}; each step {st['labelled_batch']} "
        f"labelled samples (CE) and, in the distilled and reference arms, {st['pool_batch']} pool "
        f"samples. Per seed, every arm starts from the same weights and sees the same labelled "
        "batches (and the same pool batches where it uses the pool).",
        f"- Losses: `KDLoss(temperature=T, soft_weight=1, hard_weight=0)` on every row; "
        f"`FeatureKDLoss({su['student_dim']}, {su['teacher_dim']})` (MSE through its learned "
        f"{su['student_dim']}->{su['teacher_dim']} adapter); `RKDLoss(distance_weight="
        f"{su['rkd']['distance_weight']:g}, angle_weight={su['rkd']['angle_weight']:g})` "
        f"on the two embeddings.",
        "",
        "## Hyperparameters (chosen on validation, pilot seeds "
        f"{', '.join(map(str, tu['pilot_seeds']))})", "",
        f"Student alone on validation: {pct(mean_std(tu['hard_val_accuracy'])[0])}%."
        " First T on `kd`, then the feature and RKD weights on `all` with that T:", "",
        "| arm | configuration | validation accuracy (mean over pilot seeds) | chosen |",
        "|---|---|---|---|",
    ]
    for row in tu["grid"]:
        mark = "yes" if row["config"] == ch[row["arm"]] else ""
        lines.append(f"| {row['arm']} | {_cfg_text(row['config'])} | {pct(row['mean'])} "
                     f"| {mark} |")
    lines += [
        "", f"Chosen: kd: {_cfg_text(ch['kd'])}; all: {_cfg_text(ch['all'])}.", "",
        f"## Test accuracy (%), {len(res['seeds'])} seeds", "",
        "| seed | " + " | ".join(LABELS[a] for a in ARMS) + " | all − hard |",
        "|---" * (len(ARMS) + 2) + "|",
    ]
    for r in res["per_seed"]:
        acc = {a: r["arms"][a]["test_accuracy"] for a in ARMS}
        lines.append(f"| {r['seed']} | " + " | ".join(pct(acc[a]) for a in ARMS)
                     + f" | {100 * (acc['all'] - acc['hard']):+.2f} |")
    su_ = res["summary"]
    lines.append("| mean ± std | " + " | ".join(
        f"{pct(su_[a]['test_mean'])} ± {pct(su_[a]['test_std'])}" for a in ARMS)
        + f" | {100 * res['paired']['all-hard']['mean_diff']:+.2f} |")
    lines += [
        "", "## Paired comparison over seeds (test accuracy)", "",
        "| pair | mean difference (points) | std of difference | paired t-test p "
        "(`ttest_rel`) | Wilcoxon p | wins/ties/losses |",
        "|---|---|---|---|---|---|",
    ]
    for key, d in res["paired"].items():
        a, b = key.split("-")
        lines.append(f"| {a} − {b} | {100 * d['mean_diff']:+.2f} | {100 * d['std_diff']:.2f} "
                     f"| {fmt_p(d['t_p'])} | {fmt_p(d['wilcoxon_p'])} | "
                     f"{d['wins']}/{d['ties']}/{d['losses']} |")
    secs = {a: sum(r["arms"][a]["train_seconds"] for r in res["per_seed"]) / len(res["per_seed"])
            for a in ARMS}
    lines += ["", "Training time per run (s): " + ", ".join(f"{a} {secs[a]:.1f}" for a in ARMS)
              + ".", "", "## Conclusion", "", conclusion(res), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="reported seeds 0 .. seeds-1")
    p.add_argument("--pilot-seeds", type=int, default=3,
                   help="tuning seeds 100 .. 100+pilot_seeds-1 (validation only)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--labelled-batch", type=int, default=32)
    p.add_argument("--pool-batch", type=int, default=64)
    p.add_argument("--labels-per-class", type=int, default=20)
    p.add_argument("--noise", type=float, default=0.05, help="std of the profiles' noise")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature-grid", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--feature-grid", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--rkd-grid", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    p.add_argument("--name", default="cross_modal_digits", help="file name stem")
    p.add_argument("--render", metavar="JSON", help="only render JSON's Markdown next to it")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.seeds < 2 or args.pilot_seeds < 1:
        p.error("need --seeds >= 2 and --pilot-seeds >= 1")
    args.seed_list = list(range(args.seeds))
    args.pilot_seed_list = list(range(100, 100 + args.pilot_seeds))
    args.command = "python examples/distill_cross_modal.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    args.command = args.command.strip()
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(render_markdown(res))
        return res
    limit_threads(args.threads)
    res = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(res))
    print(f"wrote {stem}.json, {stem}.md ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
