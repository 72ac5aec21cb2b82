# SPDX-License-Identifier: Apache-2.0
"""Mixtures of experts: M-step solvers, EM properties, the mirror-descent identity, Pyro models."""

import math
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import pyro_softmix as psm
from pyro_softmix import ConvergenceWarning, MixtureOfExperts, moe_em, simulate_moe
from pyro_softmix.plots import match_components
from pyro_softmix.solvers import (
    fit_logistic_regression,
    fit_multinomial_logit,
    logistic_objective,
    multinomial_objective,
    weighted_least_squares,
)


def _lbfgs(fn, init):
    v = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=1000, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -fn(v)
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    return v.detach()


def _regression_data(n=80, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.rand(n, k, generator=g) * 2
    return g, x, w


# ----------------------------------------------------------------------------------------------
# M-step solvers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_weighted_least_squares_closed_form(l2):
    g, x, w = _regression_data()
    y = torch.randn(80, generator=g)
    coef = weighted_least_squares(x, y, w, l2=l2)
    for k in range(2):
        sw = w[:, k].sqrt().numpy()
        a = np.vstack([x.numpy() * sw[:, None], math.sqrt(l2) * np.eye(3)])
        b = np.concatenate([y.numpy() * sw, np.zeros(3)])
        ref = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(coef[k].numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_logistic_regression_gradient_hessian_and_optimum(l2):
    g, x, w = _regression_data()
    y = (torch.rand(80, generator=g) < torch.sigmoid(x[:, 0] - x[:, 1])).double()
    evaluate = logistic_objective(x, y, w, l2)
    coef = torch.randn(2, 3, generator=g)
    f, grad, hess = evaluate(coef, True)
    for k in range(2):
        fk = lambda b, k=k: evaluate(torch.stack([b if j == k else coef[j] for j in range(2)]),  # noqa: E731
                                     False)[0][k]
        assert torch.allclose(torch.autograd.functional.jacobian(fk, coef[k]), grad[k], atol=1e-10)
        assert torch.allclose(-torch.autograd.functional.hessian(fk, coef[k]), hess[k],
                              atol=1e-10)
        ref = _lbfgs(fk, torch.zeros(3))
        res = fit_logistic_regression(x, y, w, l2=l2)
        assert res.converged
        assert torch.allclose(res.atoms[k], ref, atol=1e-6)


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_multinomial_logit_gradient_hessian_and_optimum(l2):
    g, x, _ = _regression_data()
    targets = torch.rand(80, 4, generator=g)  # soft labels with unequal row totals
    evaluate = multinomial_objective(x, targets, l2)
    flat = torch.randn(1, 9, generator=g)
    f, grad, hess = evaluate(flat, True)
    fn = lambda v: evaluate(v[None], False)[0][0]  # noqa: E731
    assert torch.allclose(torch.autograd.functional.jacobian(fn, flat[0]), grad[0], atol=1e-10)
    assert torch.allclose(-torch.autograd.functional.hessian(fn, flat[0]), hess[0], atol=1e-10)
    res = fit_multinomial_logit(x, targets, l2=l2)
    assert res.converged and bool(res.atoms[-1].eq(0).all())
    ref = _lbfgs(fn, torch.zeros(9))
    assert torch.allclose(res.atoms[:-1].reshape(-1), ref, atol=1e-6)


def test_solver_bad_input():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="weights must be finite and nonnegative"):
        weighted_least_squares(x, torch.randn(10), -torch.ones(10, 1))
    with pytest.raises(ValueError, match="y must have shape"):
        fit_logistic_regression(x, torch.full((10,), 2.0), torch.ones(10, 1))
    with pytest.raises(ValueError, match="targets must have at least 2 columns"):
        fit_multinomial_logit(x, torch.ones(10, 1))
    with pytest.raises(ValueError, match="init must have shape"):
        fit_multinomial_logit(x, torch.ones(10, 3), init=torch.zeros(3, 5))


# ----------------------------------------------------------------------------------------------
# EM
# ----------------------------------------------------------------------------------------------
def _brute_loglik(data, params, expert):
    """sum_i log sum_k gate_ik p(y_i | k), one observation at a time with scipy-free formulas."""
    x = torch.cat([data.x, torch.ones(len(data.y), 1)], 1)
    total = 0.0
    for i in range(len(data.y)):
        gate = torch.softmax(params["gate_weights"] @ x[i], 0)
        terms = []
        for k in range(gate.shape[0]):
            mu = float(params["expert_weights"][k] @ x[i])
            if expert == "linear":
                s = float(params["noise_scale"][k])
                dens = math.exp(-0.5 * ((float(data.y[i]) - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))
            else:
                p1 = 1 / (1 + math.exp(-mu))
                dens = p1 if data.y[i] == 1 else 1 - p1
            terms.append(float(gate[k]) * dens)
        total += math.log(sum(terms))
    return total


@pytest.mark.parametrize("expert", ["linear", "logistic"])
def test_log_likelihood_matches_brute_force(expert):
    data = simulate_moe(num_obs=60, num_features=2, num_experts=3, expert=expert, seed=1)
    moe = MixtureOfExperts(3, expert).fit(data.x, data.y, init=data.truth(), max_iter=5, warn=False)
    params = {"gate_weights": moe.gate_weights, "expert_weights": moe.expert_weights,
              "noise_scale": moe.noise_scale}
    # 1e-9: the brute force forms 1 - sigmoid(mu) directly, which loses digits when mu >> 0.
    assert moe.loglik == pytest.approx(_brute_loglik(data, params, expert), rel=1e-9)
    assert moe.log_likelihood(data.x, data.y) == pytest.approx(moe.loglik, rel=1e-12)


@pytest.mark.parametrize("expert,noise,l2", [("linear", "expert", 0.0), ("linear", "shared", 0.0),
                                             ("linear", "expert", 1.0), ("logistic", "expert", 0.0),
                                             ("logistic", "expert", 1.0)])
def test_em_is_monotone_and_stationary(expert, noise, l2):
    data = simulate_moe(num_obs=400, num_features=3, num_experts=3, expert=expert, snr=3, seed=2)
    moe = MixtureOfExperts(3, expert, noise=noise, l2=l2)
    moe.fit(data.x, data.y, init="random", num_inits=1, seed=0, max_iter=3000)
    h = np.array(moe.history)
    assert moe.converged
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))
    # At the fixed point the gradient of the penalised log-likelihood vanishes.
    xe, xg, y = moe._data(data.x, data.y, None)
    free = {"gate": moe.gate_weights[:-1].clone().requires_grad_(True),
            "experts": moe.expert_weights.clone().requires_grad_(True)}
    params = {"gate": torch.cat([free["gate"], torch.zeros(1, xg.shape[1])]),
              "experts": free["experts"]}
    if expert == "linear":
        s = moe.noise_scale if noise == "expert" else moe.noise_scale[:1]
        free["scale"] = s.clone().requires_grad_(True)
        params["scale"] = free["scale"].expand(3)
    obj = torch.logsumexp(moe_em.log_joint(moe, params, xe, xg, y), 1).sum() - moe_em.penalty(moe, params)
    grads = torch.autograd.grad(obj, list(free.values()))
    assert max(float(g.abs().max()) for g in grads) < 1e-3
    assert obj.item() == pytest.approx(moe.objective, rel=1e-12)


@pytest.mark.parametrize("expert", ["linear", "logistic"])
def test_exact_m_step_maximises_q(expert):
    """The M-step's blocks are the maximisers of Q(. | responsibilities): grad Q = 0 there."""
    data = simulate_moe(num_obs=300, num_features=2, num_experts=3, expert=expert, seed=3)
    moe = MixtureOfExperts(3, expert)
    xe, xg, y = moe._data(data.x, data.y, None, new_fit=True)
    resp = torch.softmax(torch.randn(300, 3), 1)
    new = moe_em.m_step(moe, xe, xg, y, resp, None, exact=True)
    free = {k: v.clone().requires_grad_(True) for k, v in new.items()}
    params = dict(free, gate=torch.cat([free["gate"][:-1], torch.zeros(1, xg.shape[1])]))
    q = (resp * moe_em.log_joint(moe, params, xe, xg, y)).sum()
    for name, g in zip(free, torch.autograd.grad(q, list(free.values()), allow_unused=True),
                       strict=True):
        if g is not None:
            assert float(g.abs().max()) < 1e-8, name
    if expert == "linear":  # closed forms: weighted least squares, weighted residual variance
        for k in range(3):
            ref = weighted_least_squares(xe, y, resp[:, k:k + 1])[0]
            assert torch.allclose(new["experts"][k], ref, atol=1e-10)
            var = (resp[:, k] * (y - xe @ ref) ** 2).sum() / resp[:, k].sum()
            assert float(new["scale"][k]) == pytest.approx(float(var.sqrt()), rel=1e-10)


def _free_vector(moe):
    parts = [moe.gate_weights[:-1].reshape(-1), moe.expert_weights.reshape(-1)]
    if moe.noise_scale is not None:
        parts.append(moe.noise_scale.log())
    return torch.cat(parts)


def _unpack(moe, v, dg, dx):
    k = moe.num_experts
    gate = torch.cat([v[: (k - 1) * dg].view(k - 1, dg), torch.zeros(1, dg)])
    experts = v[(k - 1) * dg: (k - 1) * dg + k * dx].view(k, dx)
    out = {"gate": gate, "experts": experts}
    if moe.expert == "linear":
        out["scale"] = v[(k - 1) * dg + k * dx:].exp()
    return out


def test_em_from_truth_stays_within_standard_errors():
    data = simulate_moe(num_obs=3000, num_features=2, num_experts=2, snr=8, seed=4)
    moe = MixtureOfExperts(2).fit(data.x, data.y, init=data.truth())
    xe, xg, y = moe._data(data.x, data.y, None)

    def loglik(v):
        return torch.logsumexp(moe_em.log_joint(moe, _unpack(moe, v, 3, 3), xe, xg, y), 1).sum()
    hat = _free_vector(moe)
    truth = torch.cat([data.gate_weights[:-1].reshape(-1), data.expert_weights.reshape(-1),
                       data.noise_scale.log()])
    info = -torch.autograd.functional.hessian(loglik, hat)
    se = torch.linalg.inv(info).diagonal().sqrt()
    z = (hat - truth) / se
    assert float(z.abs().max()) < 4.5, z  # 11 coordinates; P(max |N(0,1)| > 4.5) ~ 1e-4
    assert float(z.abs().max()) > 0.05  # the estimate is not the truth itself


# ----------------------------------------------------------------------------------------------
# EM is mirror descent (Fruytier, Mokhtari & Sanghavi 2024)
# ----------------------------------------------------------------------------------------------
def _natural(moe, params, xe, xg):
    """Natural parameters (n, K, m) of the complete-data (y, z) | x exponential family, whose
    statistics are (1[z=k], 1[z=k] y, 1[z=k] y^2) (linear) or (1[z=k], 1[z=k] y) (logistic)."""
    log_gate = torch.log_softmax(xg @ params["gate"].T, 1)
    mu = xe @ params["experts"].T
    if moe.expert == "linear":
        s2 = params["scale"] ** 2
        a = log_gate - mu**2 / (2 * s2) - 0.5 * torch.log(2 * math.pi * s2)
        return torch.stack([a, mu / s2, (-0.5 / s2).expand_as(mu)], -1)
    return torch.stack([log_gate - torch.nn.functional.softplus(mu), mu], -1)


def _log_partition(moe, eta):
    """A(eta): log of the (y, z) normaliser, per observation (n,)."""
    if moe.expert == "linear":
        a, b, c = eta.unbind(-1)
        return torch.logsumexp(a - b**2 / (4 * c) + 0.5 * torch.log(math.pi / -c), 1)
    a, b = eta.unbind(-1)
    return torch.logsumexp(a + torch.nn.functional.softplus(b), 1)


def _loglik_natural(moe, eta, y):
    """log p(y_i | x_i) as a function of the natural parameters, (n,)."""
    stats = torch.stack([torch.ones_like(y), y, y**2], -1)[:, None, : eta.shape[-1]]
    return torch.logsumexp((eta * stats).sum(-1), 1) - _log_partition(moe, eta)


@pytest.mark.parametrize("expert", ["linear", "logistic"])
def test_em_step_is_unit_step_mirror_descent(expert):
    """One exact EM step from theta_t maximises
        J(theta) = sum_i <grad_eta l_i(eta_i^t), eta_i(theta)> - D_A(eta_i(theta), eta_i^t),
    mirror ascent with unit step whose Bregman divergence D_A (of the complete-data
    log-partition A) is KL(p_{theta_t}(y, z | x_i) || p_theta(y, z | x_i))."""
    data = simulate_moe(num_obs=200, num_features=2, num_experts=3, expert=expert, snr=3, seed=5)
    moe = MixtureOfExperts(3, expert)
    start = moe.initial_params(data.x, data.y, init="random", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        moe.fit(data.x, data.y, init=start, max_iter=1, m_steps=200, tol=0)
    xe, xg, y = moe._data(data.x, data.y, None)
    old = moe_em.check_start(moe, start, xe, xg)
    eta_t = _natural(moe, old, xe, xg).detach()
    # A is the log-partition: it vanishes on the model, and its Bregman divergence is the KL.
    assert float(_log_partition(moe, eta_t).abs().max()) < 1e-10
    eta_var = eta_t.clone().requires_grad_(True)
    g = torch.autograd.grad(_loglik_natural(moe, eta_var, y).sum(), eta_var)[0]
    a_t = eta_t.clone().requires_grad_(True)
    grad_a = torch.autograd.grad(_log_partition(moe, a_t).sum(), a_t)[0]

    def mirror_objective(v, step=1.0):
        eta = _natural(moe, _unpack(moe, v, 3, 3), xe, xg)
        bregman = _log_partition(moe, eta) - _log_partition(moe, eta_t) - (
            grad_a * (eta - eta_t)).sum((-2, -1))
        return (g * eta).sum() - bregman.sum() / step

    em = _free_vector(moe)
    grad_em = torch.autograd.functional.jacobian(mirror_objective, em)
    grad_start = torch.autograd.functional.jacobian(mirror_objective, _free_vector_of(old))
    assert float(grad_em.abs().max()) < 1e-7 * float(grad_start.abs().max()) + 1e-9
    # A local maximum (the objective is concave in eta), and not a mirror step of another size.
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        nearby = em + 1e-3 * torch.randn(em.shape, generator=gen)
        assert mirror_objective(nearby) < mirror_objective(em)
    half = torch.autograd.functional.jacobian(lambda v: mirror_objective(v, 0.5), em)
    assert float(half.abs().max()) > 1e-3 * float(grad_start.abs().max())
    # The Bregman divergence equals the KL divergence of the complete-data distributions.
    new = _unpack(moe, em, 3, 3)
    eta_new = _natural(moe, new, xe, xg)
    bregman = (_log_partition(moe, eta_new) - (grad_a * (eta_new - eta_t)).sum((-2, -1)))
    gate_t = torch.softmax(xg @ old["gate"].T, 1)
    gate_new = torch.softmax(xg @ new["gate"].T, 1)
    mu_t, mu_new = xe @ old["experts"].T, xe @ new["experts"].T
    if expert == "linear":
        s_t, s_n = old["scale"], new["scale"]
        comp = torch.log(s_n / s_t) + (s_t**2 + (mu_t - mu_new) ** 2) / (2 * s_n**2) - 0.5
    else:
        p_t, p_n = torch.sigmoid(mu_t), torch.sigmoid(mu_new)
        comp = p_t * torch.log(p_t / p_n) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_n))
    kl = (gate_t * (torch.log(gate_t / gate_new) + comp)).sum(1)
    assert torch.allclose(bregman, kl, atol=1e-10)


def _free_vector_of(params):
    parts = [params["gate"][:-1].reshape(-1), params["experts"].reshape(-1)]
    if "scale" in params:
        parts.append(params["scale"].log())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Baselines, starts, reproducibility, dtypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,lr", [("gd", 1.0), ("adam", 0.05)])
def test_gradient_baselines_reach_the_em_optimum(method, lr):
    data = simulate_moe(num_obs=500, num_features=2, num_experts=2, snr=6, seed=6)
    start = data.truth()
    em = MixtureOfExperts(2).fit(data.x, data.y, init=start)
    base = MixtureOfExperts(2).fit(data.x, data.y, init=start, method=method, lr=lr,
                                   max_iter=20000)
    assert base.history[0] == pytest.approx(em.history[0], rel=1e-12)  # same start
    assert base.objective == pytest.approx(em.objective, rel=1e-7)
    assert em.n_iter < base.n_iter
    if method == "gd":
        assert np.all(np.diff(base.history) >= -1e-9)  # small steps ascend


def test_seeded_starts_are_reproducible():
    data = simulate_moe(num_obs=300, num_experts=2, seed=7)
    a = MixtureOfExperts(2).fit(data.x, data.y, seed=3)
    b = MixtureOfExperts(2).fit(data.x, data.y, seed=3)
    assert torch.equal(a.expert_weights, b.expert_weights) and a.history == b.history
    s1 = MixtureOfExperts(2).initial_params(data.x, data.y, seed=1)
    s2 = MixtureOfExperts(2).initial_params(data.x, data.y, seed=2)
    assert not torch.equal(s1["expert_weights"], s2["expert_weights"])
    k = MixtureOfExperts(2).initial_params(data.x, data.y, init="kmeans", seed=1)
    assert k["expert_weights"].shape == (2, 5)


def test_auto_start_recovers_well_separated_experts():
    data = simulate_moe(num_obs=2000, num_features=3, num_experts=3, snr=8, seed=8)
    moe = MixtureOfExperts(3).fit(data.x, data.y, seed=0)
    truth = MixtureOfExperts(3).fit(data.x, data.y, init=data.truth())
    assert moe.objective == pytest.approx(truth.objective, rel=1e-8)
    perm = match_components(moe.expert_weights, data.expert_weights)
    err = (moe.expert_weights[perm] - data.expert_weights).norm() / data.expert_weights.norm()
    assert float(err) < 0.05


def test_float32_matches_float64():
    # The gate separates these data, so without a ridge the gate's MLE is at infinity and both
    # runs only creep towards a supremum; the ridge makes the optimum finite and comparable.
    data = simulate_moe(num_obs=500, num_experts=2, snr=6, seed=9)
    f64 = MixtureOfExperts(2, l2=0.01).fit(data.x, data.y, seed=0)
    f32 = MixtureOfExperts(2, l2=0.01).fit(data.x.float(), data.y.float(), seed=0)
    assert f32.expert_weights.dtype == torch.float32
    assert f32.objective == pytest.approx(f64.objective, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Using a fit
# ----------------------------------------------------------------------------------------------
def test_predictions_bic_and_round_trip(tmp_path):
    data = simulate_moe(num_obs=600, num_experts=2, expert="logistic", snr=6, seed=10)
    x, y = data.x.clone(), data.y.clone()
    moe = MixtureOfExperts(2, "logistic").fit(data.x, data.y, seed=0)
    assert torch.equal(x, data.x) and torch.equal(y, data.y)  # inputs untouched
    proba = moe.predict_proba(data.x)
    gate = moe.predict_proba(data.x, gate=True)
    experts = moe.expert_predictions(data.x)
    assert torch.allclose(proba[:, 1], (gate * experts).sum(1), atol=1e-12)
    assert torch.allclose(proba.sum(1), torch.ones(600))
    assert torch.equal(moe.predict(data.x), (proba[:, 1] > 0.5).long())
    assert moe.num_params == 5 + 2 * 5
    assert moe.bic == pytest.approx(-2 * moe.loglik + 15 * math.log(600))
    resp = moe.responsibilities(data.x, data.y)
    joint = gate * torch.where(data.y[:, None] == 1, experts, 1 - experts)
    assert torch.allclose(resp, joint / joint.sum(1, keepdim=True), atol=1e-12)
    moe.save(tmp_path / "moe.npz")
    again = psm.load_moe(tmp_path / "moe.npz")
    assert torch.equal(again.gate_weights, moe.gate_weights)
    assert again.log_likelihood(data.x, data.y) == pytest.approx(moe.loglik, rel=1e-12)
    assert again.history == moe.history and again.expert == "logistic"
    lin = MixtureOfExperts(2).fit(data.x, data.y * 3.0, seed=0)
    mean = (lin.gate_probs(data.x) * lin.expert_predictions(data.x)).sum(1)
    assert torch.allclose(lin.predict(data.x), mean)
    with pytest.raises(ValueError, match="predict_proba needs logistic experts"):
        lin.predict_proba(data.x)


def test_separate_gate_features_and_no_intercept():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 2, generator=g)
    gate_x = torch.randn(400, 1, generator=g)
    z = (gate_x[:, 0] > 0).long()
    y = torch.where(z == 1, 3 * x[:, 0], -3 * x[:, 1]) + 0.1 * torch.randn(400, generator=g)
    moe = MixtureOfExperts(2, intercept=False).fit(x, y, gate_x, seed=0)
    assert moe.gate_weights.shape == (2, 1) and moe.expert_weights.shape == (2, 2)
    with pytest.raises(ValueError, match="gate_x must have 1 columns"):
        moe.predict(x)
    assert moe.predict(x, gate_x).shape == (400,)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(10)), ValueError, "x must be 2-D"),
    (dict(y=torch.randn(9)), ValueError, r"y must have shape \(10,\)"),
    (dict(x=torch.full((10, 2), math.nan)), ValueError, "x contains NaN"),
    (dict(y=torch.full((10,), math.inf)), ValueError, "y contains NaN"),
    (dict(gate_x=torch.randn(8, 2)), ValueError, "gate_x must have 10 rows"),
    (dict(expert="logistic"), ValueError, "y must contain only 0 and 1"),
    (dict(method="newton"), ValueError, "method must be one of"),
    (dict(init="best"), ValueError, "init must be 'auto'"),
    (dict(init={"gate_weights": torch.zeros(2, 3)}), ValueError, "init must have key"),
    (dict(init={"gate_weights": torch.zeros(2, 3), "expert_weights": torch.zeros(2, 2),
                "noise_scale": torch.ones(2)}), ValueError, r"init expert_weights must have shape"),
    (dict(init={"gate_weights": torch.zeros(2, 3), "expert_weights": torch.zeros(2, 3),
                "noise_scale": -torch.ones(2)}), ValueError, "finite and positive"),
    (dict(init=3), TypeError, "init must be"),
    (dict(method="adam", lr=-1.0), ValueError, "lr must be > 0"),
    (dict(x=[["a", "b"]] * 10), TypeError, "x must be numeric"),
])
def test_bad_input(kwargs, error, match):
    g = torch.Generator().manual_seed(12)
    args = dict(x=torch.randn(10, 2, generator=g), y=torch.randn(10, generator=g), gate_x=None,
                expert="linear", method="em", init="auto", lr=None)
    args.update(kwargs)
    moe = MixtureOfExperts(2, args.pop("expert"))
    with pytest.raises(error, match=match):
        moe.fit(args.pop("x"), args.pop("y"), args.pop("gate_x"), **args)


def test_bad_configuration():
    with pytest.raises(ValueError, match="expert must be one of"):
        MixtureOfExperts(2, "poisson")
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MixtureOfExperts(0)
    with pytest.raises(ValueError, match="noise must be one of"):
        MixtureOfExperts(2, noise="global")
    with pytest.raises(ValueError, match="not fitted"):
        MixtureOfExperts(2).predict(torch.randn(3, 2))


# ----------------------------------------------------------------------------------------------
# Pyro
# ----------------------------------------------------------------------------------------------
def _log_prior(moe, values):
    s = moe.prior_scale
    lp = pyro.distributions.Normal(0.0, s).log_prob(values["expert_weights"]).sum()
    lp = lp + pyro.distributions.Normal(0.0, s).log_prob(values["gate_weights"]).sum()
    if "noise_scale" in values:
        lp = lp + pyro.distributions.HalfNormal(s).log_prob(values["noise_scale"]).sum()
    return float(lp)


@pytest.mark.parametrize("expert,noise", [("linear", "expert"), ("linear", "shared"),
                                          ("logistic", "expert")])
def test_pyro_models_equal_the_likelihood_plus_prior(expert, noise):
    data = simulate_moe(num_obs=200, num_experts=3, expert=expert, seed=13)
    moe = MixtureOfExperts(3, expert, noise=noise).fit(data.x, data.y, seed=0)
    values = moe.init_values()
    expected = moe.loglik + _log_prior(moe, values)
    conditioned = poutine.condition(moe.model, data=values)
    trace = poutine.trace(conditioned).get_trace(data.x, data.y, collapsed=True)
    assert float(trace.log_prob_sum()) == pytest.approx(expected, rel=1e-10)
    # The enumerated model: TraceEnum_ELBO with an empty guide sums the assignment out exactly.
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.loss(conditioned, lambda *a, **k: None, data.x, data.y)
    assert -loss == pytest.approx(expected, rel=1e-10)


def test_pyro_init_strategy_svi_and_nuts_start_at_em():
    data = simulate_moe(num_obs=200, num_experts=2, seed=14)
    moe = MixtureOfExperts(2).fit(data.x, data.y, seed=0)
    losses = moe.fit_svi(data.x, data.y, guide="delta", num_steps=3, lr=1e-6)
    first = -(moe.loglik + _log_prior(moe, moe.init_values()))
    assert losses[0] == pytest.approx(first, rel=1e-8)
    mcmc = moe.fit_mcmc(data.x, data.y, num_samples=4, warmup_steps=2, step_size=1e-9,
                        adapt_step_size=False, max_tree_depth=1)
    draws = mcmc.get_samples()
    assert draws["expert_weights"].shape == (4, 2, 5)
    assert torch.allclose(draws["expert_weights"][0], moe.expert_weights, atol=1e-6)
    assert torch.allclose(draws["noise_scale"][0], moe.noise_scale, atol=1e-6)


def test_pyro_model_samples_and_composes():
    data = simulate_moe(num_obs=100, num_experts=2, expert="logistic", seed=15)
    moe = MixtureOfExperts(2, "logistic")

    def outer():
        out = moe.model(data.x, None, collapsed=True)
        pyro.deterministic("rate", out.mean())
    trace = poutine.trace(outer).get_trace()
    assert set(trace.nodes["obs"]["value"].unique().tolist()) <= {0.0, 1.0}
    assert trace.nodes["gate_weights"]["value"].shape == (1, 5)
    enum = poutine.trace(moe.model).get_trace(data.x, None)
    assert enum.nodes["assignment"]["value"].shape == (100,)
