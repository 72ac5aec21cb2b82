# SPDX-License-Identifier: Apache-2.0
"""SoftmaxMixture and MixtureCounts, and the one log-probability path they share with the fit."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_softmix as psm
from pyro_softmix import SoftmaxMixture

from .helpers import brute_mixture_log_probs


def _args(p=7, L=2, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, L, generator=g)
    atoms = torch.randn(K, L, generator=g)
    weights = torch.softmax(torch.randn(K, generator=g), 0)
    return x, atoms, weights


def test_log_prob_is_brute_force_marginal():
    x, atoms, weights = _args()
    d = SoftmaxMixture(x, atoms, weights)
    values = torch.arange(7)
    assert torch.allclose(d.log_prob(values), brute_mixture_log_probs(x, atoms, weights),
                          atol=1e-12)
    assert torch.allclose(d.probs.sum(-1), torch.tensor(1.0))


def test_component_log_prob_and_enumerate_support():
    x, atoms, weights = _args()
    d = SoftmaxMixture(x, atoms, weights)
    v = torch.tensor([0, 3, 6])
    comp = d.component_log_prob(v)
    assert comp.shape == (3, 3)
    expected = torch.log_softmax(x @ atoms.T, 0)[v]
    assert torch.allclose(comp, expected)
    support = d.enumerate_support()
    assert support.shape == (7,) and torch.equal(support, torch.arange(7))
    assert torch.allclose(d.log_prob(d.enumerate_support(expand=False)).squeeze(-1).exp().sum(),
                          torch.tensor(1.0))


def test_batch_shapes_broadcast_and_expand():
    x, atoms, weights = _args()
    batched_atoms = torch.stack([atoms, 2 * atoms])  # (2, K, L)
    d = SoftmaxMixture(x, batched_atoms, weights)
    assert d.batch_shape == (2,) and d.event_shape == ()
    lp = d.log_prob(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    assert lp.shape == (3, 2)
    ref = SoftmaxMixture(x, 2 * atoms, weights).log_prob(torch.tensor([2, 4, 6]))
    assert torch.allclose(lp[:, 1], ref)
    e = d.expand((4, 2))
    assert e.batch_shape == (4, 2) and e.sample().shape == (4, 2)
    assert torch.allclose(e.log_prob(torch.tensor(3))[2], d.log_prob(torch.tensor(3)))
    assert d.enumerate_support().shape == (7, 2)
    assert d.component_log_prob(torch.tensor(3)).shape == (2, 3)


def test_sampling_frequencies_match_probabilities():
    x, atoms, weights = _args(p=6)
    d = SoftmaxMixture(x, atoms, weights)
    n = 200_000
    counts = torch.bincount(d.sample((n,)), minlength=6).double()
    expected = n * d.probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square(5) 0.999 quantile


def test_gradients_flow_to_atoms_and_weights():
    x, atoms, weights = _args()
    a = atoms.clone().requires_grad_(True)
    logits = torch.zeros(3, requires_grad=True)
    lp = SoftmaxMixture(x, a, torch.softmax(logits, 0)).log_prob(torch.tensor([1, 4])).sum()
    ga, gl = torch.autograd.grad(lp, [a, logits])

    def f(a_, l_):
        return brute_like(x, a_, torch.softmax(l_, 0))

    def brute_like(x_, a_, w_):
        comp = torch.log_softmax(a_ @ x_.T, -1)
        return torch.logsumexp(comp + w_.log()[:, None], 0)[[1, 4]].sum()

    ga2, gl2 = torch.autograd.grad(f(a, logits), [a, logits])
    assert torch.allclose(ga, ga2) and torch.allclose(gl, gl2)
    assert float(ga.abs().sum()) > 0


def test_usable_as_a_pyro_likelihood():
    x, atoms, weights = _args()
    data = SoftmaxMixture(x, atoms, weights).sample((50,))

    def model():
        w = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
        with pyro.plate("data", 50):
            pyro.sample("obs", SoftmaxMixture(x, atoms, w), obs=data)

    def guide():
        pyro.sample("weights", dist.Delta(weights, event_dim=1))

    loss = Trace_ELBO().loss(model, guide)
    expected = -(SoftmaxMixture(x, atoms, weights).log_prob(data).sum()
                 + dist.Dirichlet(torch.ones(3)).log_prob(weights))
    assert loss == pytest.approx(float(expected), rel=1e-10)


def test_bad_arguments_are_rejected():
    x, atoms, weights = _args()
    with pytest.raises(ValueError, match="atoms must have shape"):
        SoftmaxMixture(x, atoms[:, :1], weights)
    with pytest.raises(ValueError, match="weights must have shape"):
        SoftmaxMixture(x, atoms, weights[:2])
    with pytest.raises(ValueError, match="weights"):
        SoftmaxMixture(x, atoms, torch.tensor([0.5, 0.6, 0.2]))
    with pytest.raises(ValueError, match="features must be 2-D"):
        SoftmaxMixture(x[0], atoms, weights)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features contains NaN"):
        SoftmaxMixture(bad, atoms, weights)
    d = SoftmaxMixture(x, atoms, weights)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([7]))


def test_one_log_probability_path_for_fit_distributions_and_diagnostics():
    """The fit, SoftmaxMixture, MixtureCounts and the pointwise log-likelihood of the
    diagnostics give the same numbers (they share one path); a zero weight stays finite."""
    from pyro_softmix.diagnostics import pointwise_log_likelihood
    from pyro_softmix.models import MixtureCounts

    d = psm.simulate(num_points=40, num_features=3, num_components=3, num_obs=2000, seed=2,
                     dtype=torch.float64)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    mix = psm.SoftmaxMixture(d.features, fit.atoms, fit.weights)
    counts = MixtureCounts(fit.component_log_probs(), fit.weights, d.num_obs)
    assert torch.equal(fit.log_probs(), counts.mixture_logits())
    # Categorical renormalises its logits: equal up to that rounding.
    assert torch.allclose(fit.log_probs(), mix.logits, rtol=0, atol=1e-13)
    assert float(counts.log_prob(d.counts.double())) == pytest.approx(fit.loglik, rel=1e-12)
    point = pointwise_log_likelihood(d.features, fit.atoms[None], fit.weights[None],
                                     counts=d.counts)
    assert float(point.sum()) == pytest.approx(fit.loglik, rel=1e-12)
    assert torch.allclose(fit.responsibilities().sum(1), torch.ones(40, dtype=torch.float64))
    zero = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    logits = psm.SoftmaxMixture(d.features, fit.atoms, zero).logits
    assert bool(torch.isfinite(logits).all())
    (grad,) = torch.autograd.grad(logits.sum(), zero)
    assert bool(torch.isfinite(grad).all())
