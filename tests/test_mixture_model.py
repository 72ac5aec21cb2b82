# SPDX-License-Identifier: Apache-2.0
"""SoftmaxMixtureModel: the fit methods and what they leave behind."""

import pytest
import torch

import pyro_softmix as psm

from .helpers import brute_loglik


@pytest.fixture(scope="module")
def data():
    torch.set_default_dtype(torch.float64)
    return psm.simulate(num_points=80, num_features=2, num_components=2, num_obs=4000,
                        atom_norm=3.0, seed=0, return_tokens=True)


def test_fit_svi_starts_at_em_and_stays_near_it(data):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    losses = sm.fit_svi(counts=data.counts, num_steps=150, lr=0.01, seed=0)
    assert sm.em_fit is not None and len(losses) == 150
    med = sm.guide.median()
    se = psm.fisher_intervals(sm.em_fit, counts=data.counts)
    # The guide's centre stays within a few EM standard errors (the prior moves it a little).
    assert bool(((med["atoms"] - sm.em_fit.atoms).abs() < 3 * se["atoms_se"] + 1e-3).all())
    # At the EM start the loss is about -(loglik + log prior) + entropy terms: within 1%.
    assert losses[-1] == pytest.approx(-sm.em_fit.loglik, rel=0.01)


@pytest.mark.parametrize("guide", ["delta", "lowrank", "mvn"])
def test_fit_svi_guides(data, guide):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    sm.fit_em(counts=data.counts, seed=0)
    losses = sm.fit_svi(guide=guide, num_steps=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(sm.guide.median()) == {"weights", "atoms"}


def test_fit_svi_enumerated_with_minibatches(data):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    sm.fit_em(tokens=data.tokens, seed=0)
    losses = sm.fit_svi(collapsed=False, subsample_size=500, num_steps=30)
    # Minibatch losses are scaled to the full data: same order as the full NLL.
    assert sum(losses[-10:]) / 10 == pytest.approx(-sm.em_fit.loglik, rel=0.05)


def test_fit_mcmc_collapsed_and_enumerated_from_em(data):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    sm.fit_em(counts=data.counts, seed=0)
    mcmc = sm.fit_mcmc(num_samples=10, warmup_steps=10, max_tree_depth=3)
    s = mcmc.get_samples()
    assert s["weights"].shape == (10, 2) and s["atoms"].shape == (10, 2, 2)
    # Started at EM and the posterior is narrow (N = 4000): draws stay near EM.
    aligned = psm.relabel_samples(s, sm.em_fit)
    assert float((aligned["atoms"].mean(0) - sm.em_fit.atoms).abs().max()) < 0.5
    sm2 = psm.SoftmaxMixtureModel(data.features, 2)
    sm2.fit_em(tokens=data.tokens[:300], seed=0)
    mcmc2 = sm2.fit_mcmc(num_samples=3, warmup_steps=2, max_tree_depth=2, collapsed=False)
    assert mcmc2.get_samples()["atoms"].shape == (3, 2, 2)


def test_infer_assignments_and_predictive(data):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    fit = sm.fit_em(tokens=data.tokens, seed=0)
    resp = sm.infer_assignments()
    assert resp.shape == (4000, 2)
    r_points = fit.responsibilities()  # (p, K) per support point
    assert torch.allclose(resp, r_points[data.tokens], atol=1e-10)
    z_map = sm.infer_assignments(sample=True, temperature=0)
    assert torch.equal(z_map, resp.argmax(1))
    draws = torch.stack([sm.infer_assignments(sample=True) for _ in range(50)]).double()
    # Sampled assignments have the responsibilities as frequencies (binomial error).
    assert float((draws.mean(0) - resp[:, 1]).abs().max()) < 5 * (0.25 / 50) ** 0.5
    pred = sm.predictive(4)
    assert pred["obs"].shape == (4, 80) and bool((pred["obs"].sum(-1) == 4000).all())


def test_data_errors_and_reset(data):
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    with pytest.raises(ValueError, match="no data"):
        sm.fit_svi()
    with pytest.raises(ValueError, match="guide must be one of"):
        sm.fit_svi(counts=data.counts, guide="laplace")
    with pytest.raises(ValueError, match="init must be"):
        sm.fit_mcmc(counts=data.counts, init="prior")
    with pytest.raises(ValueError, match="no MCMC"):
        sm.to_arviz()
    with pytest.raises(ValueError, match="concentration"):
        psm.SoftmaxMixtureModel(data.features, 2, concentration=0.0)
    fit = sm.fit_em(counts=data.counts, seed=0)
    assert fit.loglik == pytest.approx(brute_loglik(data.features, data.counts, fit.atoms,
                                                    fit.weights), rel=1e-12)
    sm.fit_em(counts=data.counts * 2, seed=0)  # new data: a new fit, old results dropped
    assert sm.em_fit is not fit and sm.guide is None
