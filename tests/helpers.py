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


def brute_grouped_loglik(features, tokens, groups, atoms, weights):
    """sum_g log sum_k w_k prod_{i in g} q_k(y_i), by explicit loops over groups and draws."""
    total = 0.0
    for g in sorted(set(groups.tolist())):
        members = [int(t) for t, h in zip(tokens.tolist(), groups.tolist(), strict=True) if h == g]
        terms = []
        for c in range(atoms.shape[0]):
            q = torch.softmax(features @ atoms[c], 0)
            terms.append(float(weights[c]) * float(torch.prod(q[members])))
        total += float(torch.tensor(sum(terms)).log())
    return total
