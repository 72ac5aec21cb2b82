# SPDX-License-Identifier: Apache-2.0
"""The algorithms of mixtures of experts: the likelihood, EM's monotonicity and fixed points, and
the mirror-descent identity."""

import math
import warnings

import numpy as np
import pytest
import torch

from pyro_softmix import ConvergenceWarning, MixtureOfExperts, moe_em, simulate_moe
from pyro_softmix.solvers import (
    weighted_least_squares,
)

from .helpers import moe_free_vector, moe_unpack


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


def _free_vector_of(params):
    parts = [params["gate"][:-1].reshape(-1), params["experts"].reshape(-1)]
    if "scale" in params:
        parts.append(params["scale"].log())
    return torch.cat(parts)


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
        eta = _natural(moe, moe_unpack(moe, v, 3, 3), xe, xg)
        bregman = _log_partition(moe, eta) - _log_partition(moe, eta_t) - (
            grad_a * (eta - eta_t)).sum((-2, -1))
        return (g * eta).sum() - bregman.sum() / step

    em = moe_free_vector(moe)
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
    new = moe_unpack(moe, em, 3, 3)
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
