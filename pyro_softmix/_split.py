# SPDX-License-Identifier: Apache-2.0
"""Splitting a component in two: starts with K + 1 components from a K-component state.

At a state with E-step weights w (p, K), W_k = sum_j w_jk, and component softmaxes q_k, component
k explains its share of the data s_k = w_k / W_k by q_k and loses W_k KL(s_k || q_k) nats doing
so. The component that loses most is split along the leading eigenvector u of its residual
covariance

    R_k = sum_j (s_kj - q_kj)(z_j - m_k)(z_j - m_k)^T,      m_k = z^T q_k,

the direction in which its data are more spread than its softmax, to t_k +- delta u with
delta = sqrt(lambda_max(R_k)) / Var_{q_k}(u^T z) (clamped to [0.1, 4]: a step that moves, within
EM's trust region), each half with weight alpha_k / 2. A mixture with every atom at one point is a
saddle of the likelihood whose escape direction is u, so a split starts EM where it climbs.

:func:`~pyro_softmix.warmstart.grown_start` builds K components from the one-component fit by
K - 1 splits, each followed by a short EM run (a start of ``init="auto"``), and
:func:`merge_and_split` and :func:`pull_back` move a fit away from a component at infinity
(see :func:`~pyro_softmix._moves.finish`).
"""

from __future__ import annotations

import math

import torch

from ._chunks import column_sums, one_thread, ordered_dot, ordered_sum, weighted_sums
from ._gram import weighted_cov
from .engine import EMProblem

__all__ = ["merge_and_split", "pull_back", "split_component", "split_scores", "split_worst"]


def split_scores(w: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(K,) float64 W_k KL(w_k / W_k || q_k) from w (p, K) and log q (p, K)."""
    w, log_q = w.double(), log_q.double()
    total = column_sums(w)
    share = w / total.clamp_min(1e-300)
    kl = torch.where(share > 0, share * (share.clamp_min(1e-300).log() - log_q), 0.0)
    kl = column_sums(kl)
    return total * kl


def split_component(z: torch.Tensor, w: torch.Tensor, log_q: torch.Tensor, atoms: torch.Tensor,
                    weights: torch.Tensor, k: int, chunk_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Component k of (atoms (K, r), weights (K,)) split in two along its leading residual
    direction: atoms (K + 1, r) (the halves at rows k and K) and weights (K + 1,), in
    ``atoms``' and ``weights``' dtypes. z (p, r), w and log q (p, K) as in :func:`split_scores`;
    ``chunk_size`` rows per chunk of the residual covariance."""
    share = w[:, k].double() / ordered_sum(w[:, k].double()).clamp_min(1e-300)
    q = log_q[:, k].double().exp()
    mean = weighted_sums(q.to(z), z)
    resid = weighted_cov(z, (share - q)[:, None].to(z), mean[None],
                         chunk_size=chunk_size).double()[0]
    with one_thread():
        vals, vecs = torch.linalg.eigh(0.5 * (resid + resid.T))
    u = vecs[:, -1]
    uz = z @ u.to(z)
    centred = (uz - ordered_dot(uz.double(), q).to(uz)).double()
    sigma2 = float(ordered_dot(q, centred**2))
    delta = math.sqrt(max(float(vals[-1]), 0.0)) / max(sigma2, 1e-12)
    step = (min(max(delta, 0.1), 4.0) * u).to(atoms)
    new_atoms = torch.cat([atoms, atoms[k:k + 1] - step])
    new_atoms[k] += step
    new_weights = torch.cat([weights, weights[k:k + 1] / 2])
    new_weights[k] /= 2
    return new_atoms, new_weights


def split_worst(problem: EMProblem, state) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One start's ``state`` (K components) with the component that loses most
    (:func:`split_scores`) split in two (:func:`split_component`): atoms (K + 1, r), weights
    (K + 1,), and the index of the component split."""
    log_q = state.logits - state.lse
    worst = int(split_scores(state.w, log_q).argmax())
    atoms, weights = split_component(problem.z, state.w, log_q, state.atoms,
                                     state.log_weights.exp(), worst, problem.chunk_size)
    return atoms, weights, worst


def merge_and_split(problem: EMProblem, state, k: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A move away from a component at infinity (Ueda et al. 2000's split-and-merge EM): from
    one start's ``state`` (K components), component k is merged into the component whose
    data overlap most with its own (the largest cosine between their posterior vectors, in the
    counts' inner product: sum_j n_j r_jk r_jm), which takes its weight and keeps its atom;
    then the component of the K - 1 that loses most (:func:`split_scores`) is split in two
    (:func:`split_component`). A component that has run off along a ridge typically holds
    the most frequent points of several other components (a face of the hull); after the move
    EM can give each of them its own component.

    Returns atoms (K, r), log-weights (K,) and a description of the move.
    """
    w = state.w.double()
    r = w / problem.counts64.clamp_min(1e-300)[:, None]  # the posteriors r_jm
    inner = weighted_sums(w[:, k], r)  # (K,) sum_j n_j r_jk r_jm
    cosine = inner / (inner[k] * column_sums(w * r)).sqrt().clamp_min(1e-300)
    cosine[k] = -math.inf
    partner = int(cosine.argmax())
    keep = [m for m in range(state.atoms.shape[0]) if m != k]
    log_w = state.log_weights.clone()
    log_w[partner] = torch.logaddexp(log_w[partner], log_w[k])
    smaller = problem.with_starts(1, len(keep)).start(state.atoms[keep], log_w[keep])
    atoms, weights, worst = split_worst(problem, smaller)
    return atoms, weights.log(), (f"component {k} at infinity merged into {partner}, "
                                  f"component {keep[worst]} split in two")


def pull_back(problem: EMProblem, state, k: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The other move away from a component at infinity: atom k of one start's ``state``
    shortened, along its direction, to the length of the longest other atom (standardised
    units); the weights as they are. Where a true component overshot along a ridge it comes
    back; where the component belongs elsewhere, :func:`merge_and_split` is the move.

    Returns atoms (K, r), log-weights (K,) and a description of the move.
    """
    lengths = state.atoms.norm(dim=1)
    others = torch.cat([lengths[:k], lengths[k + 1:]])
    atoms = state.atoms.clone()
    atoms[k] *= others.max() / lengths[k]
    return atoms, state.log_weights.clone(), f"component {k} at infinity pulled back"
