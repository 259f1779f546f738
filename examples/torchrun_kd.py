"""fastkd inside torch.distributed: data-parallel and vocabulary-parallel distillation.

    torchrun --nproc_per_node=2 examples/torchrun_kd.py          # NCCL on GPUs, gloo on CPU

Part 1 — data parallel (DDP): every rank distils its slice of the batch with ``KDLoss`` (+ hard
CE) and a relation loss that sees the *global* batch (``RKDLoss(gather=True)``). DDP averages the
gradients over the ranks, so the gathered relation loss is multiplied by the world size: the
training is then that of one process on the concatenated batch.

Part 2 — vocabulary parallel (Megatron-style tensor parallelism of the output layer): every rank
holds the same rows and a shard of the vocabulary of the student and teacher logits;
``KDLoss(process_group=...)`` gives the full-vocabulary loss on every rank and each rank the
gradient of its shard, all-reducing O(rows) floats per call instead of gathering the logits.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import fastkd


def mlp(d_in, d_hidden, d_out):
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(),
                               torch.nn.Linear(d_hidden, d_out))


class Student(torch.nn.Module):
    def __init__(self, d_in=32, d_hidden=64, classes=100):
        super().__init__()
        self.body = mlp(d_in, d_hidden, d_hidden)
        self.head = torch.nn.Linear(d_hidden, classes)

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)


def data_parallel(device, rank, world, steps=20, batch=32, classes=100):
    torch.manual_seed(0)  # the same initial student and teacher on every rank
    teacher = mlp(32, 256, classes).to(device).eval()
    model = Student(classes=classes).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    kd = fastkd.KDLoss(temperature=2.0, hard_weight=0.5)
    rkd = fastkd.RKDLoss(gather=True)  # the relation over the global batch, gathered with grad
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank: its own data
    for step in range(steps):
        x = torch.randn(batch, 32, generator=gen).to(device)
        with torch.no_grad():
            t_logits = teacher(x)
            t_feat = teacher[:2](x)  # the teacher's hidden features
        y = t_logits.argmax(-1)
        h, logits = ddp(x)
        loss = kd(logits, t_logits, y) + world * rkd(h, t_feat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"[data parallel] step {step:2d}  loss {loss.item():.4f}")


def vocab_parallel(device, rank, world, rows=64, hidden=48, vocab=1000):
    group = dist.group.WORLD
    # Shard sizes may differ: rank r owns vocabulary columns [start, start + size).
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    torch.manual_seed(0)  # the same hidden states, targets and full weights on every rank
    h_student = torch.randn(rows, hidden, device=device)
    h_teacher = torch.randn(rows, hidden, device=device)
    w_student = torch.randn(vocab, hidden, device=device) / hidden ** 0.5
    w_teacher = torch.randn(vocab, hidden, device=device) / hidden ** 0.5
    target = torch.randint(0, vocab, (rows,), device=device)  # global vocabulary ids
    # This rank's shard of the student's output layer (a ColumnParallelLinear) and of the teacher.
    w_shard = w_student[start:start + sizes[rank]].clone().requires_grad_()
    s_shard = h_student @ w_shard.T  # [rows, V_r]
    t_shard = h_teacher @ w_teacher[start:start + sizes[rank]].T
    kd = fastkd.KDLoss(temperature=2.0, hard_weight=0.5, divergence="jsd", process_group=group)
    loss = kd(s_shard, t_shard, target)
    loss.backward()  # w_shard.grad: the gradient of the full-vocabulary loss for this shard
    # Check against one process holding the whole vocabulary.
    w_full = w_student.clone().requires_grad_()
    full = fastkd.KDLoss(temperature=2.0, hard_weight=0.5, divergence="jsd")(
        h_student @ w_full.T, h_teacher @ w_teacher.T, target)
    full.backward()
    err = (w_shard.grad - w_full.grad[start:start + sizes[rank]]).norm() / w_full.grad.norm()
    print(f"[vocab parallel] rank {rank}: columns [{start}, {start + sizes[rank]}) "
          f"loss {loss.item():.6f} (one process: {full.item():.6f}), shard grad rel err {err:.1e}")


def main():
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        data_parallel(device, rank, world)
        vocab_parallel(device, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
