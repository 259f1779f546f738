"""Pure-PyTorch reference of relation KD (SPEC §3): the contract written as code.

Every matrix of the SPEC is built in full (B x B, and B x B x B for the RKD angle), so this is
literal rather than memory-efficient; it is differentiable by autograd and exact in float64 when
given float64 features (the tests compare every fused kernel against it that way). Features
``[B, ...]`` are flattened to ``[B, d]``. Computes in float64 if either input is float64, else in
float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Lower clamp of squared distances (SPEC §3): d_ij = sqrt(max(., 1e-12)).
DIST_CLAMP = 1e-12
#: Lower clamp of the SP row norms of G (SPEC §3).
SP_NORM_CLAMP = 1e-12


def _work_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def flatten_features(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> ``[B, d]`` (a 1-D ``[B]`` input is ``[B, 1]``)."""
    return x.reshape(x.shape[0], -1)


def _scale(reduction: str, count: int) -> float:
    return 1.0 / count if reduction == "mean" else 1.0


def sq_distances(e: torch.Tensor) -> torch.Tensor:
    """The SPEC's squared distance before the clamp: ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, [B, B]."""
    sq = (e * e).sum(1)
    return sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())


def distances(e: torch.Tensor) -> torch.Tensor:
    """d_ij = sqrt(max(||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, 1e-12)) for i != j, d_ii = 0."""
    d = sq_distances(e).clamp_min(DIST_CLAMP).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def sp_loss_reference(student, teacher, reduction: str = "mean") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019), SPEC §3.

    G = e e^T per side; G_hat = G with each row divided by max(||row||_2, 1e-12);
    loss = ||G_hat_t - G_hat_s||_F^2 / B^2 (``"sum"``: without the / B^2).
    """
    dtype = _work_dtype(student, teacher)
    s = flatten_features(student).to(dtype)
    t = flatten_features(teacher).to(dtype)
    b = s.shape[0]

    def normed_gram(e):
        g = e @ e.t()
        return g / g.norm(dim=1, keepdim=True).clamp_min(SP_NORM_CLAMP)

    diff = normed_gram(t) - normed_gram(s)
    return (diff * diff).sum() * _scale(reduction, b * b)


def rkd_distance_term(s, t, reduction: str = "mean") -> torch.Tensor:
    """RKD distance term L_d on 2-D features of the working dtype (SPEC §3)."""
    b = s.shape[0]

    def normalised(e):
        d = distances(e)
        mu = d[d > 0].mean()  # mean over the positive distances
        return d / mu

    return F.smooth_l1_loss(normalised(s), normalised(t), reduction="sum", beta=1.0) \
        * _scale(reduction, b * b)


def unit_differences(e: torch.Tensor) -> torch.Tensor:
    """u[j, i] = (e_i - e_j) / ||e_i - e_j||, [B, B, d]; the zero vector when i = j.

    ``||e_i - e_j||`` is the SPEC distance d_ji. Where e_i and e_j coincide (d_ji clamped, i.e.
    the squared distance is <= 1e-12) u_ji is the zero vector as for i = j, so that psi and its
    gradient are 0 there instead of 0/0 (the literal formula is undefined at coincident rows).
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[j, i] = e_i - e_j
    d2 = sq_distances(e)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    apart = (d2 > DIST_CLAMP) & ~eye
    d = torch.where(apart, d2, torch.ones_like(d2)).sqrt()
    return torch.where(apart.unsqueeze(-1), diff / d.unsqueeze(-1), torch.zeros_like(diff))


def rkd_angle_term(s, t, reduction: str = "mean") -> torch.Tensor:
    """RKD angle term L_a on 2-D features of the working dtype (SPEC §3); O(B^3) memory."""
    b = s.shape[0]

    def angles(e):
        u = unit_differences(e)
        return torch.bmm(u, u.transpose(1, 2))  # psi[j, i, k] = u_ji . u_jk

    return F.smooth_l1_loss(angles(s), angles(t), reduction="sum", beta=1.0) \
        * _scale(reduction, b * b * b)


def rkd_loss_reference(student, teacher, distance_weight: float = 1.0, angle_weight: float = 2.0,
                       reduction: str = "mean") -> torch.Tensor:
    """Relational KD (Park et al. 2019), SPEC §3.

    loss = distance_weight * L_d + angle_weight * L_a, with d_hat = d / mean{d_ij > 0} per side,
    L_d = mean over the B^2 pairs of smooth_l1(d_hat_s, d_hat_t), psi_jik = u_ji . u_jk and
    L_a = mean over the B^3 triples of smooth_l1(psi_s, psi_t) (``"sum"``: sums, not means).
    A term whose weight is 0 is not computed; a weight given as a tensor (a schedule under
    ``torch.compile``) is data: its term is computed and selected where the weight is not 0.
    """
    dtype = _work_dtype(student, teacher)
    s = flatten_features(student).to(dtype)
    t = flatten_features(teacher).to(dtype)
    loss = torch.zeros((), dtype=dtype, device=s.device)
    for weight, term in ((distance_weight, rkd_distance_term), (angle_weight, rkd_angle_term)):
        if isinstance(weight, torch.Tensor):
            w = weight.to(dtype)
            loss = loss + torch.where(w != 0, w * term(s, t, reduction), torch.zeros_like(loss))
        elif weight != 0.0:
            loss = loss + weight * term(s, t, reduction)
    return loss


def pkt_loss_reference(student, teacher, eps: float = 1e-7, reduction: str = "mean"):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), SPEC §3.

    e_hat_i = e_i / (||e_i|| + eps); c_ij = (e_hat_i . e_hat_j + 1) / 2; P = c with each row
    divided by its sum; loss = mean over the B^2 pairs of P_t log((P_t + eps) / (P_s + eps))
    (``"sum"``: the sum).
    """
    dtype = _work_dtype(student, teacher)
    s = flatten_features(student).to(dtype)
    t = flatten_features(teacher).to(dtype)
    b = s.shape[0]

    def probs(e):
        e_hat = e / (e.norm(dim=1, keepdim=True) + eps)
        c = (e_hat @ e_hat.t() + 1.0) / 2.0
        return c / c.sum(dim=1, keepdim=True)

    p_s, p_t = probs(s), probs(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum() * _scale(reduction, b * b)
