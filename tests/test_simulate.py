# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

import pyro_softmix as psm


def test_same_seed_same_data_and_counts_sum_to_n():
    a = psm.simulate(num_points=50, num_features=3, num_components=2, num_obs=1000, seed=4)
    b = psm.simulate(num_points=50, num_features=3, num_components=2, num_obs=1000, seed=4)
    c = psm.simulate(num_points=50, num_features=3, num_components=2, num_obs=1000, seed=5)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.atoms, b.atoms)
    assert not torch.equal(a.counts, c.counts)
    assert int(a.counts.sum()) == 1000 == a.num_obs
    assert torch.allclose(a.weights.sum(), torch.tensor(1.0)) and bool((a.weights > 0).all())


def test_atom_norm_is_in_standardised_coordinates_and_probs_match():
    x = torch.randn(300, 3) * torch.tensor([10.0, 0.1, 1.0]) + 5
    d = psm.simulate(features=x, num_components=4, num_obs=10, atom_norm=1.5, seed=0)
    design = psm.standardize(x)
    assert torch.allclose(design.atoms_to_z(d.atoms).norm(dim=1), torch.full((4,), 1.5))
    expected = psm.SoftmaxMixture(x, d.atoms, d.weights).probs
    assert torch.allclose(d.probs, expected)


def test_tokens_follow_counts_and_mixture():
    d = psm.simulate(num_points=8, num_features=2, num_components=2, num_obs=100_000,
                     return_tokens=True, seed=1)
    assert torch.equal(torch.bincount(d.tokens, minlength=8), d.counts)
    same = psm.simulate(num_points=8, num_features=2, num_components=2, num_obs=100_000, seed=1)
    assert torch.equal(same.counts, d.counts)  # asking for the tokens changes no count
    # Each component's draws follow its own softmax (the assignments are the true ones).
    for k in range(2):
        own = torch.bincount(d.tokens[d.assignments == k], minlength=8).double()
        expect = own.sum() * torch.softmax(d.features @ d.atoms[k], 0)
        assert float(((own - expect) ** 2 / expect).sum()) < 24.3
    # Assignment frequencies match the weights within 4 binomial standard deviations.
    freq = torch.bincount(d.assignments, minlength=2).double() / 100_000
    sd = (d.weights * (1 - d.weights) / 100_000).sqrt()
    assert bool(((freq - d.weights).abs() < 4 * sd).all())
    chi2 = float(((d.counts - 1e5 * d.probs) ** 2 / (1e5 * d.probs)).sum())
    assert chi2 < 24.3  # chi-square(7) 0.999 quantile


def test_given_truth_is_used():
    w = torch.tensor([0.2, 0.8])
    a = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    d = psm.simulate(num_points=30, num_features=2, weights=w, atoms=a, num_obs=10, seed=0)
    assert torch.equal(d.weights, w) and torch.equal(d.atoms, a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_obs=0), "num_obs"), (dict(atom_norm=-1.0), "atom_norm"),
    (dict(num_points=1), "num_points"), (dict(num_components=0), "num_components"),
    (dict(weights=torch.tensor([0.5, 0.6, 0.1])), "weights must sum to 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        psm.simulate(**kwargs)
