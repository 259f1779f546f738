"""The stock PyTorch code a user writes today, which fastkd is compared against.

Written from the formulas of docs/SPEC.md (and the usual code of torchdistill / RepDistiller):
every B x B (and, for the RKD angle, B x B x d and B x B x B) matrix is materialised, the teacher
side is computed under ``torch.no_grad()``, and nothing is fused. These are benchmark baselines,
not part of the fastkd API.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd(s, t, y, temperature: float, divergence: str = "kl", beta: float = 0.5,
       hard_weight: float = 1.0):
    """Logit KD as written by hand: ``D(softmax(t/T) || softmax(s/T)) * T^2 + hard_weight * CE``.

    ``"kl"`` is ``F.kl_div(F.log_softmax(s/T), F.softmax(t/T), reduction="batchmean") * T*T``;
    ``"reverse_kl"``, ``"jsd"`` (mixture ``beta p + (1 - beta) q``) and ``"tvd"`` follow
    docs/SPEC.md §1.
    """
    T = temperature
    logq = F.log_softmax(s / T, dim=-1)
    if divergence == "kl":
        soft = F.kl_div(logq, F.softmax(t / T, dim=-1), reduction="batchmean")
    elif divergence == "reverse_kl":
        soft = F.kl_div(F.log_softmax(t / T, dim=-1), logq, reduction="batchmean", log_target=True)
    elif divergence == "jsd":
        logp = F.log_softmax(t / T, dim=-1)
        logm = (beta * logp.exp() + (1.0 - beta) * logq.exp()).log()
        soft = (beta * F.kl_div(logm, logp, reduction="batchmean", log_target=True)
                + (1.0 - beta) * F.kl_div(logm, logq, reduction="batchmean", log_target=True))
    elif divergence == "tvd":
        soft = 0.5 * (F.softmax(t / T, dim=-1) - logq.exp()).abs().sum(-1).mean()
    else:
        raise ValueError(f"divergence must be kl, reverse_kl, jsd or tvd, got {divergence!r}")
    loss = soft * (T * T)
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(s, y)
    return loss


def _pdist(e, eps: float = 1e-12):
    """d_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps)), d_ii = 0 (RepDistiller's pdist)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps).sqrt()
    d = d.clone()
    idx = torch.arange(e.shape[0], device=e.device)
    d[idx, idx] = 0
    return d


def _mean_positive(d):
    """mean{d_ij : d_ij > 0} of a distance matrix (d >= 0), written without boolean indexing
    (``d[d > 0].mean()``), whose data-dependent shape would break ``torch.compile`` graphs."""
    return d.sum() / (d > 0).sum()


def sp(fs, ft):
    """Similarity-preserving KD: ||normalize(G_t) - normalize(G_s)||_F^2 / B^2 (row L2 norm)."""
    b = fs.shape[0]
    fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)
    gs = F.normalize(fs @ fs.t(), p=2, dim=1)
    with torch.no_grad():
        gt = F.normalize(ft @ ft.t(), p=2, dim=1)
    return (gt - gs).pow(2).sum() / (b * b)


def rkd(fs, ft, distance_weight: float = 1.0, angle_weight: float = 2.0):
    """Relational KD (distance + angle), RepDistiller style: the angle term builds the B x B x d
    difference vectors and the B x B x B angle tensor."""
    b = fs.shape[0]
    fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)
    loss = fs.new_zeros(())
    if distance_weight:
        with torch.no_grad():
            td = _pdist(ft)
            td = td / _mean_positive(td)
        d = _pdist(fs)
        d = d / _mean_positive(d)
        loss = loss + distance_weight * F.smooth_l1_loss(d, td)
    if angle_weight:
        with torch.no_grad():
            tv = F.normalize(ft.unsqueeze(0) - ft.unsqueeze(1), p=2, dim=2)
            ta = torch.bmm(tv, tv.transpose(1, 2)).reshape(-1)
        sv = F.normalize(fs.unsqueeze(0) - fs.unsqueeze(1), p=2, dim=2)
        sa = torch.bmm(sv, sv.transpose(1, 2)).reshape(-1)
        loss = loss + angle_weight * F.smooth_l1_loss(sa, ta)
    return loss


def pkt(fs, ft, eps: float = 1e-7):
    """Probabilistic KT: cosine kernels (c + 1) / 2, row-normalised, KL-like mean over B^2."""
    b = fs.shape[0]
    fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)
    fs = fs / (fs.norm(dim=1, keepdim=True) + eps)
    ps = (fs @ fs.t() + 1.0) / 2.0
    ps = ps / ps.sum(dim=1, keepdim=True)
    with torch.no_grad():
        ft = ft / (ft.norm(dim=1, keepdim=True) + eps)
        pt = (ft @ ft.t() + 1.0) / 2.0
        pt = pt / pt.sum(dim=1, keepdim=True)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def feature(y, t, loss: str = "mse"):
    """Feature loss after the adapter ``y = nn.Linear(x)``: ``F.mse_loss`` or mean 1 - cosine."""
    if loss == "mse":
        return F.mse_loss(y, t)
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(y, t, dim=-1, eps=1e-8)).mean()
    raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
