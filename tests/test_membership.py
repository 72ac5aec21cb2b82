# SPDX-License-Identifier: Apache-2.0
"""Class membership with covariates of the groups, and the posterior of new groups."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import membership, moe_em, solvers
from pyro_softmix._logprob import group_log_joint
from pyro_softmix.uncertainty import _setup, information


def panel(num_groups=800, size=5, seed=0, gamma=((0.3, 1.5), (0.0, 0.0))):
    """A panel whose class shares are softmax(Gamma c_g), c_g = (1, x_g), x_g ~ N(0, 1)."""
    data = psm.simulate(num_points=150, num_features=3, num_components=2, num_obs=1,
                        atom_norm=2.5, seed=seed + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.ones(num_groups, 1, dtype=torch.float64),
                   torch.randn(num_groups, 1, generator=gen, dtype=torch.float64)], 1)
    gamma = torch.tensor(gamma, dtype=torch.float64)
    comp = torch.multinomial(torch.softmax(c @ gamma.T, 1), 1, generator=gen)[:, 0]
    q = torch.softmax(data.atoms @ data.features.T, -1)
    tokens = torch.multinomial(q[comp], size, replacement=True, generator=gen).reshape(-1)
    groups = torch.arange(num_groups).repeat_interleave(size)
    return data, c, gamma, tokens, groups


@pytest.fixture(scope="module")
def fitted():
    data, c, gamma, tokens, groups = panel()
    fit = psm.fit_em(data.features, tokens=tokens, groups=groups, num_components=2, seed=0,
                     group_features=c, tol=1e-13)
    return data, c, gamma, tokens, groups, fit


def test_membership_coefficients_are_recovered(fitted):
    data, c, gamma, tokens, groups, fit = fitted
    assert fit.converged and fit.membership_coef.shape == (2, 2)
    se = fit.standard_errors(tokens=tokens, groups=groups, group_features=c)
    # With the labels swapped the reference class is the other one: Gamma_0 becomes -Gamma_0.
    swapped = (float((fit.atoms[0] - data.atoms[0]).norm())
               > float((fit.atoms[1] - data.atoms[0]).norm()))
    truth = -gamma[0] if swapped else gamma[0]
    z = (fit.membership_coef[0] - truth) / se["membership_coef"][0]
    assert float(z.abs().max()) < 4
    assert torch.equal(se["membership_coef"][1], torch.zeros(2, dtype=torch.float64))
    # EM never lowers the log-likelihood, through the covariate stage too.
    h = torch.tensor(fit.history)
    assert bool((h[1:] >= h[:-1] - 1e-9 * h.abs()[1:]).all())
    # The fit's log-likelihood, by brute force.
    log_q = torch.log_softmax(fit.atoms @ data.features.T, -1)
    per_group = log_q[:, tokens].reshape(2, -1, 5).sum(-1).T  # (G, K)
    shares = torch.log_softmax(c @ fit.membership_coef.T, 1)
    assert fit.loglik == pytest.approx(float(torch.logsumexp(per_group + shares, 1).sum()),
                                       rel=1e-12)
    assert fit.num_params == 1 * 2 + 2 * 3
    table = fit.coefficient_table(tokens=tokens, groups=groups, group_features=c)
    rows = {row["name"]: row for row in table.rows}
    assert rows["membership[0, 1]"]["se"] == pytest.approx(float(se["membership_coef"][0, 1]))
    assert "membership[1, 0]" not in rows  # the reference class


def test_an_intercept_alone_is_the_grouped_fit(fitted):
    data, c, _, tokens, groups, _ = fitted
    plain = psm.fit_em(data.features, tokens=tokens, groups=groups, num_components=2, seed=0,
                       tol=1e-14)
    ones = psm.fit_em(data.features, tokens=tokens, groups=groups, num_components=2, seed=0,
                      tol=1e-14, group_features=c[:, :1])
    assert torch.allclose(ones.atoms, plain.atoms, atol=1e-10)
    assert torch.allclose(ones.weights, plain.weights, atol=1e-10)
    assert ones.loglik == pytest.approx(plain.loglik, rel=1e-13)
    log_w = plain.weights.log()
    assert torch.allclose(ones.membership_coef[:, 0], log_w - log_w[-1], atol=1e-9)
    assert torch.allclose(ones.group_responsibilities, plain.group_responsibilities, atol=1e-9)


def test_one_multinomial_logit_solver_for_the_gate_and_the_membership(monkeypatch):
    """The MoE gate and the membership M-step both run solvers.multinomial_objective's Newton
    steps (no second copy)."""
    assert moe_em.multinomial_objective is solvers.multinomial_objective
    assert membership.fit_multinomial_logit is solvers.fit_multinomial_logit
    calls = []
    original = solvers.multinomial_objective

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(solvers, "multinomial_objective", counted)
    data, c, _, tokens, groups = panel(num_groups=100, seed=3)
    psm.fit_em(data.features, tokens=tokens, groups=groups, num_components=2, seed=0,
               group_features=c)
    assert len(calls) >= 2


def test_information_with_covariates_by_autograd(fitted):
    data, c, _, tokens, groups, fit = fitted
    setup = _setup(fit, tokens=tokens, groups=groups, group_features=c)
    atoms_z = setup.design.atoms_to_z(fit.atoms)
    gamma = fit.membership_coef
    h, meat = information(setup, atoms_z, torch.log_softmax(c @ gamma.T, 1))
    pr = setup.problem

    def per_group(theta):
        t = theta[:6].reshape(2, 3)
        g = torch.cat([theta[6:].reshape(1, 2), theta.new_zeros(1, 2)])
        log_q = torch.log_softmax(setup.z @ t.T, 0)
        joint = group_log_joint(log_q, pr.group_index, pr.point_index, pr.values,
                                pr.num_groups) + torch.log_softmax(c @ g.T, 1)
        return torch.logsumexp(joint, 1)

    theta = torch.cat([atoms_z.reshape(-1), gamma[0]])
    ref = torch.autograd.functional.hessian(lambda t: per_group(t).sum(), theta)
    assert float((h - ref).abs().max()) <= 1e-9 * float(ref.abs().max())
    scores = torch.autograd.functional.jacobian(per_group, theta)
    assert torch.allclose(meat, scores.T @ scores, atol=1e-9 * float(meat.abs().max()))


def test_group_weights_posterior_and_prediction(fitted, tmp_path):
    data, c, _, tokens, groups, fit = fitted
    assert torch.allclose(fit.group_weights(c), torch.softmax(c @ fit.membership_coef.T, 1))
    post = fit.group_posterior(groups, tokens, group_features=c)
    assert torch.allclose(post, fit.group_responsibilities, atol=1e-10)
    assert torch.equal(fit.predict_groups(groups, tokens, group_features=c), post.argmax(1))
    # New groups as a count matrix.
    matrix = torch.zeros(3, 150, dtype=torch.float64)
    matrix[0, :5] = 1
    matrix[1, 100] = 4
    matrix[2, 7] = 2
    new_c = torch.tensor([[1.0, -2.0], [1.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    log_q = torch.log_softmax(fit.atoms @ data.features.T, -1)  # (K, p)
    brute = torch.softmax(matrix @ log_q.T + torch.log_softmax(new_c @ fit.membership_coef.T, 1),
                          1)
    assert torch.allclose(fit.group_posterior(matrix, group_features=new_c), brute, atol=1e-12)
    # Saved and loaded with the fit.
    fit.save(tmp_path / "fit.npz")
    again = psm.load_fit(tmp_path / "fit.npz")
    assert torch.equal(again.membership_coef, fit.membership_coef)
    assert again.num_params == fit.num_params


def test_group_posterior_without_covariates():
    data, _, _, tokens, groups = panel(num_groups=200, seed=2)
    fit = psm.fit_em(data.features, tokens=tokens, groups=groups, num_components=2, seed=0)
    assert torch.allclose(fit.group_posterior(groups, tokens), fit.group_responsibilities,
                          atol=1e-10)
    with pytest.raises(ValueError, match="no class-membership covariates"):
        fit.group_posterior(groups, tokens, group_features=torch.ones(200, 1))


def test_bad_group_features(fitted):
    data, c, _, tokens, groups, fit = fitted
    x = data.features
    with pytest.raises(ValueError, match="needs grouped data"):
        psm.fit_em(x, counts=torch.ones(150), num_components=2, group_features=c)
    with pytest.raises(ValueError, match=r"must have shape \(800, d\)"):
        psm.fit_em(x, tokens=tokens, groups=groups, num_components=2, group_features=c[:10])
    bad = c.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="group_features contains NaN"):
        psm.fit_em(x, tokens=tokens, groups=groups, num_components=2, group_features=bad)
    with pytest.raises(TypeError, match="group_features must be real"):
        psm.fit_em(x, tokens=tokens, groups=groups, num_components=2,
                   group_features=torch.ones(800, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="must have 2 columns"):
        fit.group_weights(torch.ones(4, 3))
    with pytest.raises(ValueError, match="pass group_features"):
        fit.group_weights()
    with pytest.raises(ValueError, match="pass group_features="):
        fit.standard_errors(tokens=tokens, groups=groups)


def test_pyro_models_with_group_covariates(fitted):
    import pyro
    import pyro.poutine as poutine

    from pyro_softmix.models import collapsed_model, enumerated_model

    data, c, _, tokens, groups, fit = fitted
    values = {"atoms": fit.atoms, "membership_coef": fit.membership_coef}
    trace = poutine.trace(collapsed_model).get_trace(
        data.features, 2, tokens=tokens, groups=groups, group_features=c, **values)
    trace.compute_log_prob()
    assert float(trace.nodes["obs"]["log_prob_sum"]) == pytest.approx(fit.loglik, rel=1e-12)
    assert "weights" not in trace.nodes and "membership_coef" not in trace.nodes
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)

    def model():
        enumerated_model(data.features, 2, tokens, groups=groups, group_features=c, **values)

    assert -elbo.loss(model, lambda: None) == pytest.approx(fit.loglik, rel=1e-10)
    # With the coefficients as a site: Normal(0, prior_scale) on the K - 1 free rows.
    trace = poutine.trace(collapsed_model).get_trace(
        data.features, 2, tokens=tokens, groups=groups, group_features=c, atoms=fit.atoms)
    assert trace.nodes["membership_coef"]["value"].shape == (1, 2)
    with pytest.raises(ValueError, match="needs grouped data"):
        collapsed_model(data.features, 2, counts=torch.ones(150), group_features=c)


def test_model_object_with_group_covariates(fitted):
    data, c, _, tokens, groups, fit = fitted
    sm = psm.SoftmaxMixtureModel(data.features, 2)
    em = sm.fit_em(tokens=tokens, groups=groups, group_features=c, seed=0, tol=1e-13)
    assert torch.allclose(em.membership_coef, fit.membership_coef, atol=1e-6)
    sm.fit_svi(num_steps=2, guide="delta", lr=1e-6)
    median = sm.guide.median()
    assert torch.allclose(median["membership_coef"], em.membership_coef[:1], atol=1e-4)
    assert torch.allclose(median["atoms"], em.atoms, atol=1e-4)
    mcmc = sm.fit_mcmc(num_samples=3, warmup_steps=2, max_tree_depth=2, seed=0)
    assert mcmc.get_samples()["membership_coef"].shape == (3, 1, 2)
    with pytest.raises(ValueError, match="needs grouped data"):
        sm.fit_em(counts=torch.ones(150), group_features=c)
