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

:func:`grown_start` builds K components from the one-component fit by K - 1 splits, each followed
by a short EM run: the start of ``init="auto"`` where random atoms around the one-component fit
cannot match how concentrated the data are (see :func:`~pyro_softmix.warmstart.calibrated_atoms`).
"""

from __future__ import annotations

import math

import torch

from ._gram import weighted_cov
from .accelerate import run
from .engine import EMProblem

__all__ = ["grown_start", "split_component", "split_scores"]

#: Relative gap to which the intermediate fits of :func:`grown_start` are run: the next split
#: needs their components, not their last digits.
GROWN_TOL = 1e-5
#: EM iterations at most per intermediate number of components of :func:`grown_start`.
GROWN_MAX_ITER = 40


def split_scores(w: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(K,) float64 W_k KL(w_k / W_k || q_k) from w (p, K) and log q (p, K)."""
    w, log_q = w.double(), log_q.double()
    total = w.sum(0)
    share = w / total.clamp_min(1e-300)
    kl = torch.where(share > 0, share * (share.clamp_min(1e-300).log() - log_q), 0.0).sum(0)
    return total * kl


def split_component(z: torch.Tensor, w: torch.Tensor, log_q: torch.Tensor, atoms: torch.Tensor,
                    weights: torch.Tensor, k: int, chunk_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Component k of (atoms (K, r), weights (K,)) split in two along its leading residual
    direction: atoms (K + 1, r) (the halves at rows k and K) and weights (K + 1,), in
    ``atoms``' and ``weights``' dtypes. z (p, r), w and log q (p, K) as in :func:`split_scores`;
    ``chunk_size`` rows per chunk of the residual covariance."""
    share = w[:, k].double() / w[:, k].double().sum().clamp_min(1e-300)
    q = log_q[:, k].double().exp()
    mean = q.to(z) @ z
    resid = weighted_cov(z, (share - q)[:, None].to(z), mean[None],
                         chunk_size=chunk_size).double()[0]
    vals, vecs = torch.linalg.eigh(0.5 * (resid + resid.T))
    u = vecs[:, -1]
    uz = z @ u.to(z)
    centred = (uz - uz.double().mul(q).sum().to(uz)).double()
    sigma2 = float(q @ centred**2)
    delta = math.sqrt(max(float(vals[-1]), 0.0)) / max(sigma2, 1e-12)
    step = (min(max(delta, 0.1), 4.0) * u).to(atoms)
    new_atoms = torch.cat([atoms, atoms[k:k + 1] - step])
    new_atoms[k] += step
    new_weights = torch.cat([weights, weights[k:k + 1] / 2])
    new_weights[k] /= 2
    return new_atoms, new_weights


def grown_start(problem: EMProblem, centre: torch.Tensor, max_iter: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K = ``problem.num_components`` atoms (K, r) and log-weights (K,) grown from the
    one-component fit ``centre`` (r,) by K - 1 splits of the worst component, with EM to
    ``GROWN_TOL`` (at most ``GROWN_MAX_ITER`` iterations) on each intermediate number of
    components; and the EM iterations spent. With K = 2 it costs one E-step and one
    covariance."""
    last = problem.num_components
    st = problem.with_starts(1, 1).start(centre[None], centre.new_zeros(1))
    atoms, log_w, spent = st.atoms, st.log_weights, 0
    for k in range(1, last):
        log_q = st.logits - st.lse
        worst = int(split_scores(st.w, log_q).argmax())
        atoms, weights = split_component(problem.z, st.w, log_q, st.atoms,
                                         st.log_weights.exp(), worst, problem.chunk_size)
        log_w = weights.log()
        if k + 1 == last:
            break
        grown = problem.with_starts(1, k + 1)
        if spent < max_iter:  # the run's final state is the next split's E-step
            done = run(grown, atoms, log_w, min(GROWN_MAX_ITER, max_iter - spent), GROWN_TOL)
            st, spent = done.state, spent + len(done.history) - 1
        else:
            st = grown.start(atoms, log_w)
    return atoms, log_w, spent
