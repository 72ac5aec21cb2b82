# SPDX-License-Identifier: Apache-2.0
"""Standard errors: the closed-form information against autograd, the sandwich's scores, the
bootstrap against the observed errors, the coefficient table, bad input."""

import dataclasses

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import uncertainty
from pyro_softmix._logprob import group_log_joint
from pyro_softmix.diagnostics import _unit_loglik
from pyro_softmix.uncertainty import _setup, information, standard_errors


def autograd_errors(fit, features, **data):
    """Wald standard errors from the autograd Hessian of the log-likelihood in the user's
    coordinates (atoms, first K - 1 weights), with a pseudo-inverse: the reference."""
    unit_loglik, _ = _unit_loglik(features, offset=fit.offset, **data)
    a0, w0 = fit.atoms.double(), fit.weights.double()
    k, dim = a0.shape

    def f(theta):
        head = theta[k * dim:]
        return unit_loglik(theta[:k * dim].reshape(k, dim),
                           torch.cat([head, 1 - head.sum(0, keepdim=True)])).sum()

    hess = torch.autograd.functional.hessian(f, torch.cat([a0.reshape(-1), w0[:-1]]))
    cov = torch.linalg.pinv(-hess, hermitian=True)
    var = cov.diagonal().clamp_min(0)
    w_var = torch.cat([var[k * dim:], cov[k * dim:, k * dim:].sum().reshape(1)])
    return var[:k * dim].sqrt().reshape(k, dim), w_var.sqrt()


def grouped_case(seed=1, num_groups=400, size=4, offset=None):
    data = psm.simulate(num_points=150, num_features=3, num_components=2, num_obs=1,
                        atom_norm=2.5, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(data.weights, num_groups, replacement=True, generator=gen)
    logits = data.atoms @ data.features.T + (0 if offset is None else offset)
    tokens = torch.multinomial(torch.softmax(logits, -1)[comp], size, replacement=True,
                               generator=gen).reshape(-1)
    return data.features, tokens, torch.arange(num_groups).repeat_interleave(size)


@pytest.fixture(scope="module")
def three():
    data = psm.simulate(num_points=300, num_features=3, num_components=3, num_obs=50_000,
                        atom_norm=3.0, seed=2, dtype=torch.float64)
    fit = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0, tol=1e-14)
    return data, fit


def loglik_in_engine_coordinates(setup, counts=None, grouped=None):
    """f(theta) with theta = (atoms_z (K r), eta_1..eta_{K-1}) (eta_K = 0), by autograd."""
    z, b = setup.z, setup.problem.offset

    def f(theta, k, r):
        t = theta[:k * r].reshape(k, r)
        eta = torch.cat([theta[k * r:], theta.new_zeros(1)])
        logits = z @ t.T + (0 if b is None else b[:, None])
        log_q = torch.log_softmax(logits, 0)
        log_w = torch.log_softmax(eta, 0)
        if grouped is None:
            return counts @ torch.logsumexp(log_q + log_w, 1)
        gi, pi, values, g = grouped
        return torch.logsumexp(group_log_joint(log_q, gi, pi, values[:, None], g) + log_w,
                               1).sum()
    return f


@pytest.mark.parametrize("with_offset", [False, True])
def test_information_is_the_hessian_of_the_log_likelihood(three, with_offset):
    data, _ = three
    offset = None
    if with_offset:
        offset = 0.5 * torch.randn(300, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)
        data = psm.simulate(features=data.features, weights=data.weights, atoms=data.atoms,
                            num_obs=50_000, seed=3, offset=offset, dtype=torch.float64)
    fit = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0,
                     offset=offset)
    setup = _setup(fit, data.counts, None, None, None)
    atoms_z = setup.design.atoms_to_z(fit.atoms)
    log_w = fit.weights.log()
    h, _ = information(setup, atoms_z, log_w)
    f = loglik_in_engine_coordinates(setup, counts=data.counts.double())
    eta = log_w - log_w[-1]
    theta = torch.cat([atoms_z.reshape(-1), eta[:-1]])
    ref = torch.autograd.functional.hessian(lambda t: f(t, 3, 3), theta)
    assert float((h - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_grouped_information_and_scores_by_autograd():
    x, tokens, groups = grouped_case()
    fit = psm.fit_em(x, tokens=tokens, groups=groups, num_components=2, seed=0)
    setup = _setup(fit, None, tokens, groups, None)
    atoms_z = setup.design.atoms_to_z(fit.atoms)
    log_w = fit.weights.log()
    h, meat = information(setup, atoms_z, log_w)
    pr = setup.problem
    grouped = (pr.group_index, pr.point_index, pr.values[:, 0], pr.num_groups)
    f = loglik_in_engine_coordinates(setup, grouped=grouped)
    eta = log_w - log_w[-1]
    theta = torch.cat([atoms_z.reshape(-1), eta[:-1]])
    ref = torch.autograd.functional.hessian(lambda t: f(t, 2, 3), theta)
    assert float((h - ref).abs().max()) <= 1e-10 * float(ref.abs().max())

    # The meat is the sum over groups of the outer products of the groups' scores.
    def per_group(t):
        k, r = 2, 3
        log_q = torch.log_softmax(setup.z @ t[:k * r].reshape(k, r).T, 0)
        log_w = torch.log_softmax(torch.cat([t[k * r:], t.new_zeros(1)]), 0)
        joint = group_log_joint(log_q, grouped[0], grouped[1], grouped[2][:, None], grouped[3])
        return torch.logsumexp(joint + log_w, 1)

    scores = torch.autograd.functional.jacobian(per_group, theta)  # (G, D)
    assert torch.allclose(meat, scores.T @ scores, rtol=1e-10, atol=1e-10 * float(meat.abs().max()))


def test_observed_errors_match_autograd_in_the_users_coordinates(three):
    """Same information, other coordinates: equal where the gradient vanishes. At a fit
    converged to tol=1e-14 the log-likelihood's gradient is about 1e-4 (rounding of sums of
    5e4 draws), which moves the reparametrised Hessian by about 3e-10 relative and the errors by
    about 1e-7 (the Hessians themselves agree to 1e-14 in the same coordinates, above)."""
    data, fit = three
    se = standard_errors(fit, counts=data.counts)
    atoms_se, weights_se = autograd_errors(fit, data.features, counts=data.counts)
    assert torch.allclose(se["atoms"], atoms_se, rtol=1e-6)
    assert torch.allclose(se["weights"], weights_se, rtol=1e-6)
    ci = psm.fisher_intervals(fit, counts=data.counts)
    assert torch.equal(ci["atoms_se"], se["atoms"])


def test_observed_errors_grouped_and_rank_deficient():
    x, tokens, groups = grouped_case(seed=3)
    x = torch.cat([x, torch.full((150, 1), 2.0, dtype=torch.float64)], 1)  # a constant column
    with pytest.warns(psm.IdentifiabilityWarning):
        fit = psm.fit_em(x, tokens=tokens, groups=groups, num_components=2, seed=0, tol=1e-14)
    se = standard_errors(fit, tokens=tokens, groups=groups)
    atoms_se, weights_se = autograd_errors(fit, x, tokens=tokens, groups=groups)
    assert torch.allclose(se["atoms"], atoms_se, rtol=1e-6, atol=1e-10)
    assert torch.allclose(se["weights"], weights_se, rtol=1e-6)
    assert float(se["atoms"][:, 3].abs().max()) < 1e-12  # the unidentified column


def test_sandwich_equals_observed_when_the_model_is_right(three):
    """Singleton units and a correct model: E[scores' outer products] = information, so the
    two agree up to sampling error (a few percent at N = 5e4)."""
    data, fit = three
    observed = standard_errors(fit, counts=data.counts)
    sandwich = standard_errors(fit, "sandwich", counts=data.counts)
    ratio = torch.cat([(sandwich["atoms"] / observed["atoms"]).reshape(-1),
                       sandwich["weights"] / observed["weights"]])
    assert float((ratio - 1).abs().max()) < 0.15
    assert abs(float(ratio.mean()) - 1) < 0.05


def test_bootstrap_agrees_with_observed_errors(three):
    """Each bootstrap standard deviation from B = 60 replicates has a relative Monte-Carlo
    error of about 1 / sqrt(2 B) = 9%."""
    data, fit = three
    observed = standard_errors(fit, counts=data.counts)
    boot = standard_errors(fit, "bootstrap", counts=data.counts, num_replicates=60, seed=0)
    assert boot["replicates"] + boot["unaligned"] == 60 and boot["unaligned"] == 0
    ratio = torch.cat([(boot["atoms"] / observed["atoms"]).reshape(-1),
                       boot["weights"] / observed["weights"]])
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.5
    assert abs(float(ratio.mean()) - 1) < 0.15


def test_grouped_bootstrap_resamples_groups():
    x, tokens, groups = grouped_case(seed=4, num_groups=300)
    fit = psm.fit_em(x, tokens=tokens, groups=groups, num_components=2, seed=0)
    observed = standard_errors(fit, tokens=tokens, groups=groups)
    boot = standard_errors(fit, "bootstrap", tokens=tokens, groups=groups, num_replicates=40,
                           seed=1)
    ratio = boot["atoms"] / observed["atoms"]
    assert float(ratio.min()) > 0.55 and float(ratio.max()) < 1.6


def test_coefficient_table(three):
    data, fit = three
    table = fit.coefficient_table(counts=data.counts, level=0.9)
    se = fit.standard_errors(counts=data.counts)
    assert len(table.rows) == 3 + 3 * 3
    row = table.rows[3 + 1 * 3 + 2]  # atom[1, 2]
    assert row["name"] == "atom[1, 2]"
    assert row["estimate"] == pytest.approx(float(fit.atoms[1, 2]))
    assert row["se"] == pytest.approx(float(se["atoms"][1, 2]))
    assert row["z"] == pytest.approx(row["estimate"] / row["se"])
    assert row["hi"] - row["lo"] == pytest.approx(2 * 1.6448536 * row["se"], rel=1e-6)
    text = str(table)
    assert "weight[0]" in text and "90% lo" in text and "observed" in text


def test_bad_input(three, monkeypatch):
    data, fit = three
    with pytest.raises(ValueError, match="kind must be one of"):
        fit.standard_errors("fisher", counts=data.counts)
    with pytest.raises(ValueError, match="level must be in"):
        fit.coefficient_table(counts=data.counts, level=1.5)
    with pytest.raises(ValueError, match="num_replicates must be >= 2"):
        fit.standard_errors("bootstrap", counts=data.counts, num_replicates=1)
    bare = dataclasses.replace(fit, features=None)
    with pytest.raises(ValueError, match="pass features="):
        bare.standard_errors(counts=data.counts)
    assert torch.equal(bare.standard_errors(counts=data.counts, features=data.features)["atoms"],
                       fit.standard_errors(counts=data.counts)["atoms"])
    # Two coinciding atoms: a saddle, not a maximum.
    same = dataclasses.replace(fit, atoms=fit.atoms[[0, 0, 1]].clone())
    with pytest.raises(ValueError, match="not positive definite"):
        same.standard_errors(counts=data.counts)
    monkeypatch.setattr(uncertainty, "MAX_INFORMATION_BYTES", 1000)
    with pytest.raises(ValueError, match="more than 2 GB"):
        fit.standard_errors(counts=data.counts)
