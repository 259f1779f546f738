"""Self-distillation (Zhang et al. 2019, "Be Your Own Teacher"): the deep head teaches a shallow exit.

One network, two exits on a shared first layer (64 -> 256): a cheap shallow exit (a thin branch
256 -> 8 -> 10) and a deep head (256 -> 256 -> 10). Both exits are trained at once from
``--labels-per-class`` labelled digits per class. With self-distillation the shallow exit also
learns the deep head's softened predictions (logit KD) and regresses the deep head's last hidden
layer through a learned adapter (feature KD), both against the deep side *detached*:

    kd = fastkd.KDLoss(temperature=T, hard_weight=1.0)     # CE(shallow) + T^2 KL(deep || shallow)
    hint = fastkd.FeatureKDLoss(8, 256)                     # adapter 8 -> 256, trained too
    loss = ce(deep, y) + kd(shallow, deep.detach(), y) + w * hint(h_shallow, h_deep.detach())

The baseline trains the same two exits with cross-entropy only, from the same initialisation and
batch order. Printed: the test accuracy of each exit.

    python examples/self_distillation.py        # well under a minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (batches, labelled_subset, limit_threads,  # noqa: E402
                     load_digits_split)

import fastkd  # noqa: E402


class TwoExitNet(nn.Module):
    """A shared first layer, a thin early exit and a deeper head; returns both logits and the
    features the hint compares (the thin branch's and the deep head's last hidden layers)."""

    def __init__(self, width=256, thin=8, num_classes=10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(64, width), nn.ReLU())
        self.branch = nn.Sequential(nn.Linear(width, thin), nn.ReLU())
        self.exit1 = nn.Linear(thin, num_classes)
        self.block2 = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h1 = self.block1(x)
        e, h2 = self.branch(h1), self.block2(h1)
        return self.exit1(e), self.head(h2), e, h2


def train(x, y, *, distill, seed, epochs, temperature, hint_weight, lr=3e-3, batch_size=64):
    torch.manual_seed(seed)
    net = TwoExitNet()
    kd = fastkd.KDLoss(temperature=temperature, hard_weight=1.0)
    torch.manual_seed(10_000 + seed)
    hint = fastkd.FeatureKDLoss(8, 256)
    params = list(net.parameters()) + (list(hint.parameters()) if distill else [])
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            shallow, deep, h_shallow, h_deep = net(x[idx])
            loss = F.cross_entropy(deep, y[idx])
            if distill:
                loss = loss + kd(shallow, deep.detach(), y[idx])
                if hint_weight:
                    loss = loss + hint_weight * hint(h_shallow, h_deep.detach())
            else:
                loss = loss + F.cross_entropy(shallow, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    return net


@torch.no_grad()
def exit_accuracies(net, x, y):
    shallow, deep = net(x)[:2]
    return ((shallow.argmax(-1) == y).float().mean().item(),
            (deep.argmax(-1) == y).float().mean().item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--labels-per-class", type=int, default=20, help="0: all training images")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hint-weight", type=float, default=1.0, help="0: logit KD only")
    args = p.parse_args(argv)
    limit_threads(1)

    x_tr, y_tr, x_te, y_te = load_digits_split()
    sub = labelled_subset(y_tr, args.labels_per_class)
    x, y = x_tr[sub], y_tr[sub]
    print(f"two-exit net on {len(x)} labelled images, {args.epochs} epochs, seeds "
          f"0..{args.seeds - 1}; test accuracy of each exit (mean over seeds):")
    out = {}
    for name, distill in (("both exits CE only", False), ("self-distillation", True)):
        accs = [exit_accuracies(train(x, y, distill=distill, seed=s, epochs=args.epochs,
                                      temperature=args.temperature,
                                      hint_weight=args.hint_weight), x_te, y_te)
                for s in range(args.seeds)]
        sh = sum(a for a, _ in accs) / len(accs)
        dp = sum(b for _, b in accs) / len(accs)
        out[name] = (sh, dp)
        print(f"  {name:20s} shallow exit {100 * sh:6.2f}%   deep head {100 * dp:6.2f}%   "
              "per seed (shallow): " + " ".join(f"{100 * a:.1f}" for a, _ in accs), flush=True)
    return out


if __name__ == "__main__":
    main()
