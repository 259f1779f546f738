"""Peak memory and time of one distillation training step in the Hugging Face Trainer and in
TRL's GKD trainer, with and without fastkd (issue #16).

Contenders (each measured in a fresh process, one after the other):

- ``trainer-stock``: ``transformers.Trainer`` with a hand-written ``compute_loss``: both models'
  logits, ``F.kl_div(log_softmax(s/T), log_softmax(t/T)) * T^2 + CE`` in plain PyTorch;
- ``trainer-kdloss``: the same with ``fastkd.KDLoss`` on the materialised logits (what
  ``examples/hf_trainer_kd.py`` did before ``KDTrainer``);
- ``trainer-fastkd``: ``fastkd.integrations.transformers.KDTrainer`` (no logits);
- ``trainer-fastkd-parts``: the same on a step that logs the soft / hard split (one more
  no-grad GEMM of the student's output layer, in chunks);
- ``gkd-trl``: ``trl.experimental.gkd.GKDTrainer`` as it is (generalized JSD on the logits);
- ``gkd-fastkd``: ``fastkd.integrations.trl.FastKDGKDTrainer``.

One step = ``trainer.training_step`` (forward of teacher and student, loss, backward; no
optimizer step, the same for every contender), off-policy for GKD (``lmbda=0``: generation
costs the same with or without fastkd). Models: randomly initialised Llama-style, the vocabulary
of Llama 3 (V = 128,256), narrow so that CPU steps take seconds (student hidden 64, teacher
hidden 128, 2 layers each); batch 4 x 512 tokens, a 16-token prompt per row masked with -100.

Memory, as in docs/BENCHMARKING.md: in the child, after one warm-up step and with the gradients
freed, the resident set (models + batch) is the baseline; the kernel's high-water mark is reset
(``/proc/self/clear_refs``) and the peak of the next step is ``VmHWM - baseline``; glibc's mmap
threshold is pinned to 128 KiB so freed tensors leave the resident set. Time: the median of the
measured step and ``--repeats - 1`` more.

    python benchmarks/hf_trainer_memory.py               # all six, ~10 minutes on 2 cores
    python benchmarks/hf_trainer_memory.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONTENDERS = ("trainer-stock", "trainer-kdloss", "trainer-fastkd", "trainer-fastkd-parts",
              "gkd-trl", "gkd-fastkd")
PROMPT = 16


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed, hidden):
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=args.layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=args.vocab, pad_token_id=0,
                          eos_token_id=2, bos_token_id=1, max_position_embeddings=args.seq)
        return LlamaForCausalLM(cfg)

    return make(0, args.student_hidden), make(1, args.teacher_hidden)


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2",
                                   unk_token="t3")


def _trainer(name, student, teacher, args):
    import torch
    from torch.nn import functional as F

    import fastkd

    temperature, hard = 2.0, 0.5
    common = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[],
                  per_device_train_batch_size=args.batch, save_strategy="no",
                  disable_tqdm=True)
    if name.startswith("gkd"):
        import datasets
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        cfg = GKDConfig(**common, beta=0.5, lmbda=0.0)
        ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "t5"}]]})
        kw = dict(model=student, teacher_model=teacher, args=cfg,
                  processing_class=_tokenizer(args.vocab), train_dataset=ds)
        if name == "gkd-trl":
            return GKDTrainer(**kw)
        from fastkd.integrations.trl import FastKDGKDTrainer
        return FastKDGKDTrainer(**kw)

    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(**common)
    if name.startswith("trainer-fastkd"):
        from fastkd.integrations.transformers import KDTrainer
        kd = fastkd.FusedLinearKDLoss(temperature=temperature, hard_weight=hard)
        return KDTrainer(model=student, teacher_model=teacher, kd_loss=kd, args=targs,
                         log_kd_parts="every_step" if name.endswith("parts") else None)

    kdloss = fastkd.KDLoss(temperature=temperature, hard_weight=hard)

    class LogitsKD(Trainer):
        """The hand-written loss: both models' [B, S, V] logits, shifted."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t = teacher(**inputs).logits
            v = out.logits.shape[-1]
            s, t = out.logits[:, :-1].reshape(-1, v), t[:, :-1].reshape(-1, v)
            y = labels[:, 1:].reshape(-1)
            if name == "trainer-kdloss":
                loss = kdloss(s, t, y)
            else:
                keep = y != -100
                s, t, y = s[keep], t[keep], y[keep]
                soft = F.kl_div(F.log_softmax(s / temperature, -1),
                                F.log_softmax(t / temperature, -1), log_target=True,
                                reduction="batchmean") * temperature ** 2
                loss = soft + hard * F.cross_entropy(s, y)
            return (loss, out) if return_outputs else loss

    teacher.eval()
    return LogitsKD(model=student, args=targs)


def child(name, args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    student, teacher = _models(args)
    teacher.requires_grad_(False)
    trainer = _trainer(name, student, teacher, args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    nib = (labels[:, 1:] != -100).sum()
    model = trainer.model

    def step():
        trainer.training_step(model, dict(batch), nib)

    step()                                       # warm-up: first-call costs stay out
    losses, times = [], []
    for i in range(args.repeats):
        model.zero_grad(set_to_none=True)
        gc.collect()
        if i == 0:
            base = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = _status_kib("VmHWM") - base
    return {"contender": name, "peak_extra_bytes": peak * 1024, "baseline_bytes": base * 1024,
            "step_seconds": times, "step_seconds_median": statistics.median(times)}


def _versions():
    from importlib.metadata import version

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastkd.bench import envinfo

    out = {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "datasets")}
    out["python"] = sys.version.split()[0]
    out["fastkd_git"] = envinfo.git_info()
    out["cpu"] = envinfo.cpu_name()
    out["logical_cpus"] = os.cpu_count()
    with open("/proc/meminfo") as f:
        out["memory_bytes"] = int(f.readline().split()[1]) * 1024
    return out


def _markdown(rec) -> str:
    a, gib = rec["config"], 1024 ** 3
    n = a["batch"] * a["seq"]
    logits = 2 * n * a["vocab"] * 4
    rows = {r["contender"]: r for r in rec["results"]}
    lines = [
        f"# One distillation step in HF Trainer / TRL GKD, with and without fastkd "
        f"({rec['date']})", "",
        f"`python benchmarks/hf_trainer_memory.py` — batch {a['batch']} x seq {a['seq']} "
        f"(N = {n} positions), V = {a['vocab']:,}, student hidden {a['student_hidden']}, "
        f"teacher hidden {a['teacher_hidden']}, {a['layers']} layers each, float32, CPU, "
        f"{a['threads']} threads. Peak = resident-set high-water mark of one "
        "`training_step` (forward + loss + backward) above the models and the batch, fresh "
        "process per contender (docs/BENCHMARKING.md). Time: median of "
        f"{a['repeats']} steps.", "",
        f"Two models' N x V float32 logits: {logits / gib:.2f} GiB.", "",
        "| trainer | loss | peak extra (GiB) | step (s) |", "|---|---|---|---|"]
    for r in rec["results"]:
        lines.append(f"| {r['contender']} | {LABELS[r['contender']]} | "
                     f"{r['peak_extra_bytes'] / gib:.2f} | {r['step_seconds_median']:.2f} |")
    lines += ["", "| comparison | memory saved (GiB) | memory ratio | time ratio | target met "
              "(saved >= two models' logits) |", "|---|---|---|---|---|"]
    for ours, theirs in PAIRS:
        if ours in rows and theirs in rows:
            o, t = rows[ours], rows[theirs]
            saved = t["peak_extra_bytes"] - o["peak_extra_bytes"]
            lines.append(
                f"| {ours} vs {theirs} | {saved / gib:.2f} | "
                f"{o['peak_extra_bytes'] / t['peak_extra_bytes']:.3f} | "
                f"{o['step_seconds_median'] / t['step_seconds_median']:.2f} | "
                f"{'yes' if saved >= logits else 'no'} |")
    v = rec["versions"]
    lines += ["", f"Machine: {v['cpu']}, {v['logical_cpus']} logical CPUs, "
              f"{v['memory_bytes'] / gib:.0f} GiB; load average before / after: "
              f"{rec['load_before']} / {rec['load_after']}.",
              f"Versions: python {v['python']}, torch {v['torch']}, transformers "
              f"{v['transformers']}, accelerate {v['accelerate']}, trl {v['trl']}, datasets "
              f"{v['datasets']}; fastkd {v['fastkd_git'].get('commit')} "
              f"(dirty: {v['fastkd_git'].get('dirty')})."]
    return "\n".join(lines) + "\n"


LABELS = {"trainer-stock": "F.kl_div + CE on both models' logits",
          "trainer-kdloss": "fastkd.KDLoss on both models' logits",
          "trainer-fastkd": "KDTrainer (FusedLinearKDLoss, no logits)",
          "trainer-fastkd-parts": "KDTrainer on a step that logs kd_soft / kd_hard / ce",
          "gkd-trl": "TRL generalized_jsd_loss on both models' logits",
          "gkd-fastkd": "FastKDGKDTrainer (fused JSD, no logits)"}
PAIRS = (("trainer-fastkd", "trainer-stock"), ("trainer-fastkd", "trainer-kdloss"),
         ("trainer-fastkd-parts", "trainer-stock"), ("gkd-fastkd", "gkd-trl"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for hf-trainer-memory-<date>.md/json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("HF_TRAINER_MEMORY " + json.dumps(child(args.child, args)), flush=True)
        return None
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in args.contenders.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--child", name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HF_TRAINER_MEMORY ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(line[-1].split(" ", 1)[1])
        print(f"{name:15s} peak extra {res['peak_extra_bytes'] / 2**30:6.2f} GiB   "
              f"step {res['step_seconds_median']:6.2f} s", flush=True)
        results.append(res)
    config = {k: getattr(args, k) for k in ("batch", "seq", "vocab", "student_hidden",
                                            "teacher_hidden", "layers", "threads", "repeats")}
    rec = {"date": datetime.date.today().isoformat(), "config": config, "results": results,
           "versions": _versions(), "load_before": load_before,
           "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    md = _markdown(rec)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"hf-trainer-memory-{rec['date'].replace('-', '')}")
        with open(stem + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
    return rec


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
