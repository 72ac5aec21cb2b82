# SPDX-License-Identifier: Apache-2.0
"""Property-based checks on random small problems."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyro_softmix as psm
from pyro_softmix.solvers import column_logsumexp

from .helpers import brute_mixture_log_probs

problems = st.tuples(st.integers(2, 9), st.integers(1, 3), st.integers(1, 4),
                     st.integers(0, 2**31 - 1), st.floats(0.1, 4.0))


@settings(max_examples=40, deadline=None)
@given(problems)
def test_mixture_log_probs_are_normalised_and_match_brute_force(problem):
    p, L, K, seed, scale = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, L, generator=g, dtype=torch.float64)
    atoms = scale * torch.randn(K, L, generator=g, dtype=torch.float64)
    weights = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    d = psm.SoftmaxMixture(x, atoms, weights)
    assert torch.allclose(d.logits.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(d.logits, brute_mixture_log_probs(x, atoms, weights), atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(problems)
def test_column_logsumexp_matches_torch_and_leaves_softmax(problem):
    p, _, K, seed, scale = problem
    g = torch.Generator().manual_seed(seed)
    logits = 50 * scale * torch.randn(p, K, generator=g, dtype=torch.float64)
    scratch = torch.empty_like(logits)
    lse = column_logsumexp(logits, scratch)
    assert torch.allclose(lse, torch.logsumexp(logits, 0))
    assert torch.allclose(scratch, torch.softmax(logits, 0))


@settings(max_examples=25, deadline=None)
@given(problems)
def test_atom_maps_round_trip_on_random_designs(problem):
    p, L, _, seed, scale = problem
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(p + L + 1, L, generator=g, dtype=torch.float64) + seed % 7
    design = psm.standardize(x)
    theta = torch.randn(2, L, generator=g, dtype=torch.float64)
    xc = x - x.mean(0)
    back = design.atoms_from_z(design.atoms_to_z(theta))
    assert torch.allclose(xc @ back.T, xc @ theta.T, atol=1e-8 * (1 + (xc @ theta.T).abs().max()))
