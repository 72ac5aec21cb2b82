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
        torch.manual_seed(5)  # None draws from the global state: seeding that reproduces
        first = run(None)
        torch.manual_seed(5)
        assert torch.equal(run(None), first), name


def _bad_arguments():
    """(call, error type, the argument's name in the message) over the public API."""
    d = simulated(p=40, L=2, K=2, N=500, seed=0)
    x, n = d.features, d.counts
    m = psm.simulate_moe(num_obs=60, num_experts=2, num_features=2, seed=0)
    moe = psm.MixtureOfExperts(2)
    fit = psm.fit_em(x, counts=n, num_components=2, seed=0)
    sm = psm.SoftmaxMixtureModel(x, num_components=2)

    def em(**kw):
        return lambda: psm.fit_em(x, counts=n, num_components=2, **kw)

    return [
        (lambda: psm.fit_em(x.to(torch.complex128), counts=n), TypeError, "features"),
        (lambda: psm.fit_em(x, counts=n.to(torch.complex64)), TypeError, "counts"),
        (lambda: psm.fit_em("features.npy", counts=n), TypeError, "features"),
        (lambda: psm.fit_em(x, counts={"a": 1}), TypeError, "counts"),
        (lambda: psm.fit_em(x, counts=[[1, 2], [3]]), ValueError, "counts"),
        (em(device="mps"), ValueError, "device"),
        (em(device="nonsense"), ValueError, "device"),
        (em(device="cuda:3"), ValueError, "device"),
        (em(device=3.5), TypeError, "device"),
        (em(dtype=torch.int64), ValueError, "dtype"),
        (em(dtype=[1]), TypeError, "dtype"),
        (em(dtype="half"), ValueError, "dtype"),
        (em(seed=2**64 + 1), ValueError, "seed"),
        (em(seed=1.5), TypeError, "seed"),
        (em(init=None), TypeError, "init"),
        (em(init=3), TypeError, "init"),
        (em(init={"weight": [1.0], "atoms": [[0.0, 0.0]]}), ValueError, "init"),
        (em(init={"weights": torch.ones(2) / 2, "atoms": torch.zeros(2, 2, dtype=torch.cfloat)}),
         TypeError, "init atoms"),
        (em(max_iter=0), ValueError, "max_iter"),
        (em(tol=-1.0), ValueError, "tol"),
        (em(chunk_size=0), ValueError, "chunk_size"),
        (em(prior_scale=-1.0), ValueError, "prior_scale"),
        (em(num_inits=0), ValueError, "num_inits"),
        (em(accelerate="yes"), TypeError, "accelerate"),
        (em(progress="yes"), TypeError, "progress"),
        (em(groups=torch.zeros(3, 3)), ValueError, "groups"),
        (lambda: psm.fit_em(x, counts=n, num_components=41), ValueError, "num_components"),
        (lambda: psm.warm_start(x, n, num_components=2, method="kmeans"), ValueError, "method"),
        (lambda: psm.warm_start(x, n, num_components=2, num_inits=0), ValueError, "num_inits"),
        (lambda: psm.warm_start(x, n, num_components=2, seed=-4), ValueError, "seed"),
        (lambda: psm.latent_moments(x, n, dtype=torch.int32), ValueError, "dtype"),
        (lambda: psm.latent_moments(x, n, device="nonsense"), ValueError, "device"),
        (lambda: psm.standardize(x[:, 0]), ValueError, "features"),
        (lambda: psm.standardize(x.to(torch.complex64)), TypeError, "features"),
        (lambda: psm.SoftmaxMixture(x, torch.zeros(2, 2, dtype=torch.cfloat), torch.ones(2) / 2),
         TypeError, "atoms"),
        (lambda: psm.SoftmaxMixture(x, torch.zeros(2, 2), torch.ones(3) / 3), ValueError,
         "weights"),
        (lambda: psm.SoftmaxMixtureModel(x, 2, dtype=torch.int64), ValueError, "dtype"),
        (lambda: psm.SoftmaxMixtureModel(x, 0), ValueError, "num_components"),
        (lambda: psm.SoftmaxMixtureModel(x, 2, concentration=-1.0), ValueError, "concentration"),
        (lambda: sm.fit_svi(counts=n, num_steps=0), ValueError, "num_steps"),
        (lambda: sm.fit_svi(counts=n, seed="a"), TypeError, "seed"),
        (lambda: psm.simulate(num_points=10, num_obs=0), ValueError, "num_obs"),
        (lambda: psm.simulate(num_points=10, seed=-1), ValueError, "seed"),
        (lambda: psm.simulate(num_points=10, dtype=torch.int8), ValueError, "dtype"),
        (lambda: psm.MixtureOfExperts(0), ValueError, "num_experts"),
        (lambda: psm.MixtureOfExperts(2, "quadratic"), ValueError, "expert"),
        (lambda: moe.fit(m.x.to(torch.complex64), m.y), TypeError, "x"),
        (lambda: moe.fit(m.x, m.y[:5]), ValueError, "y"),
        (lambda: moe.fit(m.x, m.y, device="cuda"), ValueError, "device"),
        (lambda: moe.fit(m.x, m.y, max_iter=0), ValueError, "max_iter"),
        (lambda: moe.fit(m.x, m.y, method="sgd"), ValueError, "method"),
        (lambda: moe.fit(m.x, m.y, init="best"), ValueError, "init"),
        (lambda: moe.fit(m.x, m.y, seed="a"), TypeError, "seed"),
        (lambda: moe.fit(m.x, m.y, dtype="int"), ValueError, "dtype"),
        (lambda: psm.load_fit("no-such-file.npz"), OSError, "no-such-file"),
        (lambda: psm.load_fit(".", ), OSError, "'.'"),
        (lambda: psm.relabel_samples({"atoms": torch.zeros(3, 2, 2)}, "fit"), TypeError,
         "reference"),
        (lambda: psm.relabel_samples({"weights": torch.zeros(3, 2)}, fit), ValueError, "atoms"),
        (lambda: psm.to_arviz([1, 2]), TypeError, "samples"),
        (lambda: psm.EM(lambda: None), TypeError, "EM needs"),
        (lambda: psm.EM(sm.model, tol=-1.0), ValueError, "tol"),
        (lambda: psm.init_to_em(3), TypeError, "init_to_em"),
    ]


NUM_BAD = 62


def test_the_table_of_bad_arguments_is_complete():
    assert len(_bad_arguments()) == NUM_BAD


@pytest.mark.parametrize("index", range(NUM_BAD))
def test_bad_arguments_raise_a_named_value_or_type_error(index):
    """No public entry point lets another exception type escape on bad input, and each
    message names the argument."""
    call, error, name = _bad_arguments()[index]
    with pytest.raises(error) as caught:
        call()
    assert type(caught.value) is not AssertionError
    assert name in str(caught.value), str(caught.value)


def test_nonfinite_features_are_found_chunk_by_chunk():
    """The finiteness check runs over chunks of rows (no temporaries the size of X), and still
    names the first bad row, here in a later chunk."""
    x = torch.zeros(3000, 2000)
    x[1500, 7] = float("inf")
    x[2999, 0] = float("nan")
    with pytest.raises(ValueError, match=r"first bad row: 1500\)"):
        psm.fit_em(x, counts=torch.ones(3000), num_components=2)
