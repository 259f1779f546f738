"""Multi-teacher distillation: an MLP and a CNN teacher, mixed by ``KDLoss(teacher_weights=...)``.

Two teachers of different architectures (an MLP 64-512-512-10 and a small CNN) are trained on the
full digits training split. A small student (64-32-10) that has only ``--labels-per-class``
labelled images per class is trained with CE plus logit KD from the MLP alone, the CNN alone, and
both at once: ``kd(student_logits, [mlp_logits, cnn_logits], y)`` with
``fastkd.KDLoss(teacher_weights=[w, 1 - w])``, i.e. the target is the mixture
``p = w softmax(t_mlp / T) + (1 - w) softmax(t_cnn / T)``, computed in one fused pass.

    python examples/multi_teacher.py            # ~1 minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MLP, accuracy, batches, labelled_subset, limit_threads,  # noqa: E402
                     load_digits_split, predict, train_cnn_teacher, train_mlp_teacher)

import fastkd  # noqa: E402


def train_student(x, y, teacher_logits, *, kd, seed, epochs, lr=3e-3, batch_size=64):
    """CE (``kd is None``) or ``kd(student, teacher_logits[idx] or a list of them, y)``."""
    torch.manual_seed(seed)
    student = MLP((32,))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            logits = student(x[idx])[0]
            if kd is None:
                loss = F.cross_entropy(logits, y[idx])
            else:
                loss = kd(logits, [t[idx] for t in teacher_logits], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return student


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=200, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--labels-per-class", type=int, default=20, help="0: all training images")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--mlp-weight", type=float, default=0.5,
                   help="weight of the MLP teacher in the mixture (the CNN gets 1 - w)")
    args = p.parse_args(argv)
    limit_threads(1)

    x_tr, y_tr, x_te, y_te = load_digits_split()
    mlp_t = train_mlp_teacher(x_tr, y_tr, epochs=args.teacher_epochs)
    cnn_t = train_cnn_teacher(x_tr, y_tr, epochs=args.teacher_epochs)
    print(f"teachers (full training split): MLP {100 * accuracy(mlp_t, x_te, y_te):.2f}%, "
          f"CNN {100 * accuracy(cnn_t, x_te, y_te):.2f}% test accuracy")

    sub = labelled_subset(y_tr, args.labels_per_class)
    x, y = x_tr[sub], y_tr[sub]
    t_mlp, t_cnn = predict(mlp_t, x), predict(cnn_t, x)
    T, w = args.temperature, args.mlp_weight
    setups = {
        "CE only": (None, []),
        "KD from the MLP": (fastkd.KDLoss(temperature=T, hard_weight=1.0), [t_mlp]),
        "KD from the CNN": (fastkd.KDLoss(temperature=T, hard_weight=1.0), [t_cnn]),
        f"KD from both (weights {w:g}/{1 - w:g})": (
            fastkd.KDLoss(temperature=T, hard_weight=1.0, teacher_weights=[w, 1 - w]),
            [t_mlp, t_cnn]),
    }
    print(f"student 64-32-10 on {len(x)} labelled images, {args.epochs} epochs, T={T:g}, "
          f"seeds 0..{args.seeds - 1}:")
    means = {}
    for name, (kd, teachers) in setups.items():
        accs = [accuracy(train_student(x, y, teachers, kd=kd, seed=s, epochs=args.epochs),
                         x_te, y_te) for s in range(args.seeds)]
        means[name] = sum(accs) / len(accs)
        print(f"  {name:32s} {100 * means[name]:6.2f}%   per seed: "
              + " ".join(f"{100 * a:.2f}" for a in accs), flush=True)
    return means


if __name__ == "__main__":
    main()
