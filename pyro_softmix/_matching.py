# SPDX-License-Identifier: Apache-2.0
"""Matching components to a reference (the mixture's labels are arbitrary).

One matcher for the package: the relabelling of posterior draws
(:func:`~pyro_softmix.relabel_samples`), the recovery plots and tables
(:func:`~pyro_softmix.plots.match_components`) and anything else that must say which estimated
component is which.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def match_components(atoms, reference) -> torch.Tensor:
    """Permutations ``perm`` (..., K) with ``atoms[..., perm[k], :]`` matched to ``reference[k]``.

    For every leading index the permutation minimises ``sum_k ||atoms[perm[k]] - ref_k||^2``
    (Hungarian algorithm, exact).

    Args:
        atoms: (..., K, L) estimated atoms (any leading shape, e.g. draws or chains x draws).
        reference: (K, L) atoms to match against.
    Returns:
        (..., K) int64 tensor on the CPU.
    """
    a = torch.as_tensor(atoms).detach().cpu().to(torch.float64)
    ref = torch.as_tensor(reference).detach().cpu().to(torch.float64)
    if ref.dim() != 2 or a.dim() < 2 or a.shape[-2:] != ref.shape:
        raise ValueError(f"atoms must have shape (..., {tuple(ref.shape)[0]}, "
                         f"{tuple(ref.shape)[-1]}) to match the reference {tuple(ref.shape)}, "
                         f"got {tuple(a.shape)}")
    lead, k = a.shape[:-2], ref.shape[0]
    flat = a.reshape(-1, k, ref.shape[1])
    cost = ((flat[:, :, None, :] - ref[None, None, :, :]) ** 2).sum(-1)  # (S, K own, K ref)
    perms = np.empty((flat.shape[0], k), dtype=np.int64)
    for s, c in enumerate(cost.numpy()):
        rows, cols = linear_sum_assignment(c)
        perms[s, cols] = rows  # reference slot cols[i] takes own component rows[i]
    return torch.from_numpy(perms).reshape(lead + (k,))
