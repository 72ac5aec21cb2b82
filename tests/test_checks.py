# SPDX-License-Identifier: Apache-2.0
"""Argument conventions shared by every public entry point: options by keyword, one seed
convention."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix._checks import check_seed, make_generator, seed_global

from .helpers import simulated


def _entry_points():
    d = simulated(p=60, L=2, K=2, N=500, seed=0)
    m = psm.simulate_moe(num_obs=100, num_experts=2, seed=0)
    sm = psm.SoftmaxMixtureModel(d.features, num_components=2)
    moe = psm.MixtureOfExperts(2)
    return [
        (lambda: psm.fit_em(d.features, d.counts, None, 2), "num_components=2"),
        (lambda: psm.fit_em(d.features, d.counts, None, 2, "random"), "init='random'"),
        (lambda: psm.warm_start(d.features, d.counts, None, 2, "tensor"), "method='tensor'"),
        (lambda: moe.fit(m.x, m.y, None, "adam"), "method='adam'"),
        (lambda: sm.fit_svi(None, d.counts, None, "em"), "init='em'"),
        (lambda: sm.fit_mcmc(None, d.counts, None, "em"), "init='em'"),
        (lambda: sm.fit_em(None, d.counts, None, 3), "each by its name"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_options_after_the_data_are_keyword_only_and_the_error_names_them(index):
    call, keyword = _entry_points()[index]
    with pytest.raises(TypeError, match=f"by keyword only.*{keyword}"):
        call()


def test_one_seed_convention():
    assert check_seed(None) is None and check_seed(2**64 - 1) == 2**64 - 1
    g = torch.Generator().manual_seed(3)
    assert check_seed(g) is g and make_generator(g) is g
    for bad, error in ((2**64, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                       ("0", TypeError)):
        with pytest.raises(error, match="seed must be None, an int in"):
            check_seed(bad)
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    seed_global(5)
    first = torch.rand(2)
    seed_global(torch.Generator().manual_seed(5))  # a generator seeds reproducibly too
    second = torch.rand(2)
    seed_global(torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(2), second) and not torch.equal(first, second)
    state = torch.get_rng_state()
    seed_global(None)  # None leaves the global state alone
    assert torch.equal(torch.get_rng_state(), state)


def test_every_random_entry_point_takes_the_seed_the_same_way():
    d = simulated(p=200, L=2, K=2, N=5000, seed=1)
    m = psm.simulate_moe(num_obs=300, num_experts=2, seed=0)
    runs = {
        "fit_em": lambda s: psm.fit_em(d.features, counts=d.counts, num_components=2,
                                       init="random", seed=s).atoms,
        "warm_start": lambda s: psm.warm_start(d.features, counts=d.counts, num_components=2,
                                               method="random", seed=s).atoms,
        "MixtureOfExperts.fit": lambda s: psm.MixtureOfExperts(2).fit(
            m.x, m.y, init="random", num_inits=1, max_iter=3, warn=False, seed=s).expert_weights,
        "simulate": lambda s: psm.simulate(num_points=50, num_features=2, seed=s).counts,
    }
    for name, run in runs.items():
        assert torch.equal(run(11), run(11)), name
        assert torch.equal(run(torch.Generator().manual_seed(11)), run(11)), name
        assert not torch.equal(run(11), run(12)), name
        with pytest.raises(ValueError, match="seed must be"):
            run(-3)
