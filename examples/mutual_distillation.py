"""Online / mutual distillation (Zhang et al. 2018, "Deep Mutual Learning") with one KDLoss call.

Two small students (64-32-10, different initialisations) learn from ``--labels-per-class``
labelled digits per class, with no pre-trained teacher. Each step, besides each student's own
cross-entropy, the two students pull their temperature-softened predictions together with a single
``fastkd.KDLoss`` call whose "teacher" logits are the other student's, *not detached*:

    mutual = fastkd.KDLoss(temperature=T, divergence="jsd", beta=0.5)
    loss = ce(s1, y) + ce(s2, y) + w * mutual(s1_logits, s2_logits)   # s2_logits requires grad
    loss.backward()                     # one backward: gradients reach both students

With ``beta=0.5`` the Jensen-Shannon divergence is symmetric, so neither student is privileged.
(With ``divergence="kl"`` the same call differentiates KL(p_2 || q_1) with respect to both sides.)
Compared against the same two students trained independently (CE only), from the same
initialisations and batch order.

    python examples/mutual_distillation.py      # well under a minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MLP, accuracy, batches, labelled_subset, limit_threads,  # noqa: E402
                     load_digits_split)

import fastkd  # noqa: E402


def train_pair(x, y, *, mutual_weight, seed, epochs, temperature, lr=3e-3, batch_size=64):
    """Train two students jointly; ``mutual_weight=0`` means two independent CE runs."""
    torch.manual_seed(2 * seed)
    s1 = MLP((32,))
    torch.manual_seed(2 * seed + 1)
    s2 = MLP((32,))
    mutual = fastkd.KDLoss(temperature=temperature, divergence="jsd", beta=0.5)
    opt = torch.optim.Adam(list(s1.parameters()) + list(s2.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            l1, l2 = s1(x[idx])[0], s2(x[idx])[0]
            loss = F.cross_entropy(l1, y[idx]) + F.cross_entropy(l2, y[idx])
            if mutual_weight:
                # l2 requires grad: this one call gives gradients to both students.
                loss = loss + mutual_weight * mutual(l1, l2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return s1, s2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--labels-per-class", type=int, default=20, help="0: all training images")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--mutual-weight", type=float, default=1.0)
    args = p.parse_args(argv)
    limit_threads(1)

    x_tr, y_tr, x_te, y_te = load_digits_split()
    sub = labelled_subset(y_tr, args.labels_per_class)
    x, y = x_tr[sub], y_tr[sub]
    print(f"two students 64-32-10 on {len(x)} labelled images, {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}; mean test accuracy of the two students:")
    out = {}
    for name, w in (("independent (CE only)", 0.0),
                    (f"mutual (CE + {args.mutual_weight:g} x JSD, T={args.temperature:g})",
                     args.mutual_weight)):
        accs = []
        for seed in range(args.seeds):
            pair = train_pair(x, y, mutual_weight=w, seed=seed, epochs=args.epochs,
                              temperature=args.temperature)
            accs.append([accuracy(s, x_te, y_te) for s in pair])
        flat = [a for pair in accs for a in pair]
        out[name] = sum(flat) / len(flat)
        print(f"  {name:40s} {100 * out[name]:6.2f}%   per seed (student 1/2): "
              + " ".join(f"{100 * a:.1f}/{100 * b:.1f}" for a, b in accs), flush=True)
    return out


if __name__ == "__main__":
    main()
