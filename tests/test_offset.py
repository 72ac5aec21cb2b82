# SPDX-License-Identifier: Apache-2.0
"""A known per-point offset b in every component's logits, softmax(X theta_k + b): the fit, the
starts, the distributions, the Pyro models, the model object, files and the command line."""

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.models import collapsed_model, enumerated_model
from tests.helpers import best_permutation


def brute_log_pi(x, atoms, weights, b):
    """log pi_j = log sum_k w_k exp(x_j t_k + b_j) / sum_i exp(x_i t_k + b_i), by plain sums."""
    q = torch.stack([torch.exp(x @ a + b) / torch.exp(x @ a + b).sum() for a in atoms])
    return (weights[:, None] * q).sum(0).log()


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(3)
    x = torch.randn(300, 3, dtype=torch.float64)
    b = 0.8 * torch.randn(300, dtype=torch.float64)
    c = torch.tensor([0.7, -0.4, 0.25], dtype=torch.float64)
    truth = psm.simulate(features=x, num_components=2, num_obs=1, atom_norm=2.5, seed=4,
                         dtype=torch.float64)
    return x, b, c, truth.weights, truth.atoms


def test_fit_with_offset_recovers_the_truth_of_data_drawn_with_it(case):
    x, b, _, weights, atoms = case
    n = 400_000
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=n, seed=5, offset=b,
                        dtype=torch.float64)
    assert torch.allclose(data.probs.log(), brute_log_pi(x, atoms, weights, b), atol=1e-12)
    fit = psm.fit_em(x, counts=data.counts, num_components=2, seed=0, offset=b)
    assert fit.converged
    perm = list(best_permutation(fit.atoms, atoms))
    # Sampling error of the weights is about sqrt(w (1 - w) / N) (about 1e-3 here); atoms in
    # standardised units about 1 / sqrt(N w); allow 5 such standard errors.
    assert torch.allclose(fit.weights[perm], weights, atol=5 * 0.5 / math.sqrt(n))
    assert (fit.atoms[perm] - atoms).abs().max() < 5 * 3 / math.sqrt(n * float(weights.min()))
    # Ignoring the offset gives a worse fit of these data (its model is another one).
    plain = psm.fit_em(x, counts=data.counts, num_components=2, seed=0)
    assert plain.loglik < fit.loglik - 100
    # The reported log-likelihood is that of the offset model, by brute force.
    brute = float(data.counts.double() @ brute_log_pi(x, fit.atoms, fit.weights, b))
    assert fit.loglik == pytest.approx(brute, rel=1e-12)
    assert torch.allclose(fit.log_probs(), brute_log_pi(x, fit.atoms, fit.weights, b),
                          atol=1e-12)


def test_fit_with_offset_is_a_stationary_point_of_its_likelihood(case):
    x, b, _, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=50_000, seed=6,
                        offset=b, dtype=torch.float64)
    fit = psm.fit_em(x, counts=data.counts, num_components=2, seed=0, offset=b)
    a = fit.atoms.clone().requires_grad_()
    eta = fit.weights.log().clone().requires_grad_()
    loglik = data.counts.double() @ brute_log_pi(x, a, torch.softmax(eta, 0), b)
    g_a, g_eta = torch.autograd.grad(loglik, (a, eta))
    assert float(g_a.abs().max()) / data.num_obs < 1e-7
    assert float(g_eta.abs().max()) / data.num_obs < 1e-7


def test_constant_offset_changes_nothing(case):
    x, _, _, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=20_000, seed=7,
                        dtype=torch.float64)
    plain = psm.fit_em(x, counts=data.counts, num_components=2, seed=0)
    shifted = psm.fit_em(x, counts=data.counts, num_components=2, seed=0,
                         offset=torch.full((300,), -7.25, dtype=torch.float64))
    assert torch.allclose(shifted.atoms, plain.atoms, atol=1e-10)
    assert torch.allclose(shifted.weights, plain.weights, atol=1e-12)
    assert shifted.loglik == pytest.approx(plain.loglik, rel=1e-13)


def test_offset_in_the_span_of_the_features_shifts_every_atom(case):
    """Offset b = X c: softmax(X theta + X c) = softmax(X (theta + c)), so the MLE moves by -c."""
    x, _, c, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=20_000, seed=8,
                        dtype=torch.float64)
    opts = dict(counts=data.counts, num_components=2, seed=0, tol=1e-14)
    plain = psm.fit_em(x, **opts)
    shifted = psm.fit_em(x, offset=x @ c, **opts)
    perm = list(best_permutation(shifted.atoms, plain.atoms - c))
    assert torch.allclose(shifted.atoms[perm], plain.atoms - c, atol=1e-6)
    assert torch.allclose(shifted.weights[perm], plain.weights, atol=1e-8)
    assert shifted.loglik == pytest.approx(plain.loglik, rel=1e-12)


@pytest.mark.parametrize("method", ["projection", "tensor", "subspace", "random", "auto",
                                    "auto-race"])
def test_starts_with_an_offset_in_the_span_of_the_features_are_shifted(case, method):
    """The moment methods assume a uniform base measure: with b = X c their atoms move by -c
    exactly (the shift is the difference of the one-component fits); the calibrated random
    starts are drawn around the one-component fit, so they move by -c too."""
    x, _, c, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=20_000, seed=9,
                        dtype=torch.float64)
    # "auto" alone is its calibrated start (exact); "auto-race" races 4 of them, which hands
    # over its leader in another order and only about where the race stops (a relative gap
    # of 1e-3 or so to its limit).
    opts = dict(num_components=2, method=method.removesuffix("-race"), seed=0)
    if method == "auto":
        opts["num_inits"] = 1
    plain = psm.warm_start(x, data.counts, **opts)
    shifted = psm.warm_start(x, data.counts, offset=x @ c, **opts)
    tol = 1e-2 if method == "auto-race" else 1e-9
    perm = list(best_permutation(shifted.atoms, plain.atoms - c))
    assert torch.allclose(shifted.atoms[perm], plain.atoms - c, atol=tol)
    assert torch.allclose(shifted.weights[perm], plain.weights, atol=tol)


def test_grouped_fit_with_offset(case):
    x, b, c, weights, atoms = case
    gen = torch.Generator().manual_seed(10)
    groups = torch.arange(400).repeat_interleave(5)
    comp = torch.multinomial(weights, 400, replacement=True, generator=gen)
    log_q = torch.log_softmax(atoms @ x.T + b, -1)
    tokens = torch.multinomial(log_q[comp].exp(), 5, replacement=True, generator=gen).reshape(-1)
    opts = dict(tokens=tokens, groups=groups, num_components=2, seed=0, tol=1e-13)
    fit = psm.fit_em(x, offset=b, **opts)
    shifted = psm.fit_em(x, offset=b + x @ c, **opts)
    assert torch.allclose(shifted.atoms, fit.atoms - c, atol=1e-5)
    assert shifted.loglik == pytest.approx(fit.loglik, rel=1e-11)
    # The grouped log-likelihood with the offset, by brute force.
    log_q = torch.log_softmax(fit.atoms @ x.T + b, -1)  # (K, p)
    per_group = log_q[:, tokens].reshape(2, 400, 5).sum(-1)  # (K, G)
    brute = float(torch.logsumexp(per_group + fit.weights.log()[:, None], 0).sum())
    assert fit.loglik == pytest.approx(brute, rel=1e-12)


def test_distribution_with_offset(case):
    x, b, _, weights, atoms = case
    d = psm.SoftmaxMixture(x, atoms, weights, offset=b)
    assert torch.allclose(d.log_prob(torch.arange(300)), brute_log_pi(x, atoms, weights, b),
                          atol=1e-12)
    wide = d.expand((4,))
    assert torch.equal(wide.offset, d.offset) and wide.logits.shape == (4, 300)
    plain = psm.SoftmaxMixture(x, atoms, weights)
    assert not torch.allclose(plain.logits, d.logits)
    # The pointwise log-likelihood for ArviZ, per support point and per draw.
    counts = torch.arange(300) % 3
    draws = {"weights": weights.expand(1, 4, 2), "atoms": atoms.expand(1, 4, 2, 3)}
    data = psm.to_arviz(draws, features=x, counts=counts, offset=b, units="points")
    support = counts.nonzero().squeeze(1)
    expected = brute_log_pi(x, atoms, weights, b)[support]
    assert np.allclose(data.log_likelihood["obs"].values[0, 0], expected.numpy(), atol=1e-12)
    per_draw = psm.diagnostics.pointwise_log_likelihood(x, atoms, weights, counts=counts,
                                                        offset=b)
    assert float(per_draw.sum()) == pytest.approx(float(counts.double() @ brute_log_pi(
        x, atoms, weights, b)), rel=1e-12)


def test_pyro_models_use_the_offset(case):
    x, b, _, weights, atoms = case
    counts = torch.arange(300, dtype=torch.float64) % 7
    expected = float(counts @ brute_log_pi(x, atoms, weights, b))
    trace = poutine.trace(collapsed_model).get_trace(x, 2, counts, weights=weights, atoms=atoms,
                                                    offset=b)
    assert float(trace.log_prob_sum()) == pytest.approx(expected, rel=1e-12)
    tokens = torch.repeat_interleave(torch.arange(300), counts.long())
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)

    def model():
        enumerated_model(x, 2, tokens, weights=weights, atoms=atoms, offset=b)

    assert -elbo.loss(model, lambda: None) == pytest.approx(expected, rel=1e-10)


def test_model_object_carries_the_offset(case, tmp_path):
    x, b, _, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=20_000, seed=11,
                        offset=b, dtype=torch.float64)
    sm = psm.SoftmaxMixtureModel(x, 2, offset=b)
    fit = sm.fit_em(counts=data.counts, seed=0)
    direct = psm.fit_em(x, counts=data.counts, num_components=2, seed=0, offset=b)
    assert torch.allclose(fit.atoms, direct.atoms, atol=1e-10)
    assert torch.equal(fit.offset, b)
    with pytest.raises(TypeError, match="offset"):
        sm.fit_em(counts=data.counts, offset=b)
    # The model's log joint at the EM values is the EM log-likelihood plus the log priors.
    trace = poutine.trace(poutine.condition(sm.model, data={"weights": fit.weights,
                                                            "atoms": fit.atoms})).get_trace(
        **sm.model_kwargs())
    trace.compute_log_prob()
    assert float(trace.nodes["obs"]["log_prob_sum"]) == pytest.approx(fit.loglik, rel=1e-12)
    # Responsibilities of single draws use it too.
    resp = sm.infer_assignments(tokens=torch.tensor([0, 5]), params=fit)
    assert torch.allclose(resp, fit.responsibilities()[[0, 5]], atol=1e-12)
    # EM in the shape of SVI reaches the same estimate.
    em = psm.EM(sm.model, seed=0)
    for _ in range(200):
        em.step(counts=data.counts)
        if em.converged:
            break
    assert em.fit.loglik == pytest.approx(fit.loglik, rel=1e-9)
    # Saved and loaded with the fit.
    path = tmp_path / "fit.npz"
    fit.save(path)
    again = psm.load_fit(path)
    assert torch.equal(again.offset, fit.offset)
    assert torch.allclose(again.log_probs(x), fit.log_probs(), atol=1e-14)
    # Wald intervals are taken on the likelihood with the offset: with b + X c every
    # coordinate's standard error is the same (the atoms just move by -c).
    c = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    moved = psm.fit_em(x, counts=data.counts, num_components=2, seed=0, offset=b + x @ c,
                       tol=1e-14)
    se = psm.fisher_intervals(fit, counts=data.counts)
    se_moved = psm.fisher_intervals(moved, counts=data.counts)
    perm = list(best_permutation(moved.atoms, fit.atoms - c))
    assert torch.allclose(se_moved["atoms_se"][perm], se["atoms_se"], rtol=1e-4)
    assert torch.allclose(se_moved["weights_se"][perm], se["weights_se"], rtol=1e-4)


def test_cli_fit_with_offset(case, tmp_path):
    from pyro_softmix.cli import main

    x, b, _, weights, atoms = case
    data = psm.simulate(features=x, weights=weights, atoms=atoms, num_obs=20_000, seed=12,
                        offset=b, dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "n.npy", data.counts.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "x.npy"), "--counts", str(tmp_path / "n.npy"),
                 "--offset", str(tmp_path / "b.npy"), "-k", "2", "--quiet",
                 "--out", str(out)]) == 0
    fit = psm.load_fit(out / "fit.npz")
    direct = psm.fit_em(x, counts=data.counts, num_components=2, seed=0, offset=b)
    assert torch.equal(fit.offset, b)
    assert fit.loglik == pytest.approx(direct.loglik, rel=1e-12)


@pytest.mark.parametrize("offset, error, match", [
    (torch.zeros(299), ValueError, r"offset must have shape \(300,\)"),
    (torch.zeros(300, 1), ValueError, r"offset must have shape \(300,\)"),
    (torch.full((300,), math.nan), ValueError, "offset contains NaN"),
    (torch.cat([torch.zeros(299), torch.tensor([-math.inf])]), ValueError, "offset contains"),
    (torch.zeros(300, dtype=torch.bool), TypeError, "offset must be a real"),
    ("b.npy", TypeError, "offset must be"),
])
def test_bad_offsets_are_refused(case, offset, error, match):
    x = case[0]
    counts = torch.ones(300)
    with pytest.raises(error, match=match):
        psm.fit_em(x, counts=counts, num_components=2, offset=offset)
    with pytest.raises(error, match=match):
        psm.SoftmaxMixture(x, torch.zeros(2, 3), torch.ones(2) / 2, offset=offset)


def test_the_offset_passed_in_is_not_modified(case):
    x, b, _, _, _ = case
    before = b.clone()
    with pytest.warns(psm.ConvergenceWarning):
        psm.fit_em(x, counts=torch.ones(300), num_components=2, seed=0, offset=b, max_iter=2)
    assert torch.equal(b, before)
