"""Distil a small causal language model into a smaller one with ``fastkd.FusedLinearKDLoss``.

Both models are randomly initialised (no download); the teacher is first trained for a few
steps on a synthetic "language" (a fixed random bigram table) so that it has something to
teach. The student never materialises its N x V logits: the loss takes its last hidden states
and its lm_head weight. A second run distils offline from the teacher's stored top-k
log-probabilities (``teacher_topk``), the way large teachers are used when their logits are
precomputed.

    python examples/distill_llm.py            # ~1 minute on 2 CPU cores
    python examples/distill_llm.py --device cuda --vocab 128256 --steps 200
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import fastkd


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


def synthetic_batches(vocab, batch, seq, device, seed=0):
    """Token streams from a fixed sparse random bigram model (each token has 4 successors,
    so the best possible CE is log 4 = 1.386)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    while True:
        tok = torch.randint(0, vocab, (batch, 1), generator=g)
        cols = [tok]
        for _ in range(seq - 1):
            pick = torch.randint(0, 4, (batch, 1), generator=g)
            cols.append(successors[cols[-1].squeeze(1)].gather(1, pick))
        yield torch.cat(cols, 1).to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    data = synthetic_batches(args.vocab, args.batch, args.seq + 1, dev)

    teacher = TinyCausalLM(args.vocab, 128, 2, 4, args.seq).to(dev)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    # The teacher learns the bigram table with plain CE (FusedLinearKDLoss with hard_weight=1 and
    # soft_weight=0 would do as well; here the stock loss shows the two are interchangeable).
    for step in range(args.teacher_steps):
        tok = next(data)
        logits = teacher.lm_head(teacher.hidden_states(tok[:, :-1]))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"teacher trained {args.teacher_steps} steps: CE {loss.item():.3f} "
          f"(uniform would be {torch.log(torch.tensor(float(args.vocab))).item():.3f})")
    teacher.eval().requires_grad_(False)

    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, hard_weight=0.5)
    for mode in ("online: teacher hidden states + lm_head", f"offline: teacher top-{args.topk}"):
        torch.manual_seed(1)
        student = TinyCausalLM(args.vocab, 64, 1, 2, args.seq).to(dev)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        t0 = time.perf_counter()
        for step in range(args.steps):
            tok = next(data)
            inputs, target = tok[:, :-1], tok[:, 1:].flatten()
            with torch.no_grad():
                th = teacher.hidden_states(inputs).flatten(0, 1)
            sh = student.hidden_states(inputs).flatten(0, 1)
            if mode.startswith("online"):
                loss = kd(sh, student.lm_head.weight, th, teacher.lm_head.weight, target)
            else:
                # Stored ahead of training in practice: top-k of log_softmax(t / T).
                with torch.no_grad():
                    logp = torch.log_softmax(teacher.lm_head(th) / args.temperature, -1)
                    top = logp.topk(args.topk, -1)
                loss = kd(sh, student.lm_head.weight, target=target,
                          teacher_topk=(top.indices, top.values))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                print(f"  [{mode}] step {step:4d}  loss {loss.item():.4f}")
        with torch.no_grad():
            tok = next(data)
            logits = student.lm_head(student.hidden_states(tok[:, :-1]))
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
        print(f"{mode}: student CE on fresh data {ce.item():.3f} "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    import functools
    print = functools.partial(print, flush=True)  # noqa: A001 (progress shows when piped)
    main()
