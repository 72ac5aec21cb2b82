# SPDX-License-Identifier: Apache-2.0
"""The log-probabilities of a softmax mixture, in one place.

The fit (:class:`~pyro_softmix.SoftmaxMixtureFit`), the distributions
(:class:`~pyro_softmix.SoftmaxMixture`, :class:`~pyro_softmix.models.MixtureCounts`), the Pyro
model object and the diagnostics all compute

    log q_k(j) = log softmax(X theta_k + b)_j,      log pi_j = logsumexp_k (log w_k + log q_k(j))

through these functions (differentiable, any leading batch shape). The EM engine has its own
in-place version of the same arithmetic on the standardised design, for speed.
"""

from __future__ import annotations

import torch


def log_weights(weights: torch.Tensor) -> torch.Tensor:
    """log w, with weights below the dtype's smallest normal number clamped to it (so a weight
    of exactly 0 gives a finite value and a zero gradient instead of -inf and NaN)."""
    return weights.clamp_min(torch.finfo(weights.dtype).tiny).log()


def component_log_probs(features: torch.Tensor, atoms: torch.Tensor,
                        offset: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K, p) log q_k(j) = log softmax(X theta_k + b)_j from features (p, L), atoms
    (..., K, L) and an optional offset b (p,)."""
    logits = atoms @ features.T
    return torch.log_softmax(logits if offset is None else logits + offset, dim=-1)


def mixture_log_probs(component: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., p) log pi_j from component log-probabilities (..., K, p) and weights (..., K)."""
    return torch.logsumexp(component + log_weights(weights)[..., None], -2)


def posterior(component: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., p, K) P(component k | Y = j) from component log-probabilities (..., K, p)."""
    return torch.softmax(component + log_weights(weights)[..., None], -2).transpose(-1, -2)


def group_log_joint(log_q: torch.Tensor, group_index: torch.Tensor, point_index: torch.Tensor,
                    values: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, K) sum_j n_gj log q_k(j) from (p, K) log q and sparse (group, point, count) triplets.

    ``values`` has shape (nnz, 1). Differentiable (used for observed information too).
    """
    per_entry = log_q[point_index].mul_(values)
    return log_q.new_zeros(num_groups, log_q.shape[1]).index_add_(0, group_index, per_entry)
