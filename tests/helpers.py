# SPDX-License-Identifier: Apache-2.0
"""Brute-force references used by several test modules."""

import itertools

import torch


def brute_mixture_log_probs(features, atoms, weights):
    """log pi_j by explicit sums over components and points (p,)."""
    p, k = features.shape[0], atoms.shape[0]
    out = torch.empty(p, dtype=torch.float64)
    for j in range(p):
        total = 0.0
        for c in range(k):
            logits = [float(features[i] @ atoms[c]) for i in range(p)]
            m = max(logits)
            norm = sum(torch.tensor(v - m).exp().item() for v in logits)
            total += float(weights[c]) * torch.tensor(logits[j] - m).exp().item() / norm
        out[j] = torch.tensor(total).log()
    return out


def brute_loglik(features, counts, atoms, weights):
    return float((counts.double() * brute_mixture_log_probs(features, atoms, weights)).sum())


def best_permutation(est, ref):
    """Permutation of est's rows closest to ref (brute force over K!)."""
    k = ref.shape[0]
    return min(itertools.permutations(range(k)),
               key=lambda perm: float((est[list(perm)] - ref).norm()))
