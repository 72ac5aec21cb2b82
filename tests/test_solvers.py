# SPDX-License-Identifier: Apache-2.0
"""Weighted softmax, logistic, least-squares and multinomial-logit solvers, and their one Armijo
line search."""

import math

import numpy as np
import pytest
import torch

from pyro_softmix import fit_softmax_regression, softmax_regression_step
from pyro_softmix.solvers import (
    fit_logistic_regression,
    fit_multinomial_logit,
    logistic_objective,
    multinomial_objective,
    weighted_gram,
    weighted_least_squares,
)

from .helpers import lbfgs


def _problem(p=120, r=3, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(p, r, generator=g)
    w = torch.rand(p, k, generator=g) * 4
    return z, w


def _objective(z, w, t, l2=0.0):
    return (w * torch.log_softmax(z @ t.T, 0)).sum(0) - 0.5 * l2 * (t * t).sum(1)


@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_gradient_and_hessian_match_autograd(l2):
    z, w = _problem()
    t = torch.randn(3, 3) * 0.5
    new_t, _, info = softmax_regression_step(z, w, t, l2=l2)
    tt = t.clone().requires_grad_(True)
    grad = torch.autograd.grad(_objective(z, w, tt, l2).sum(), tt)[0]
    assert torch.allclose(info.grad, grad, atol=1e-10)
    for k in range(3):
        hess = torch.autograd.functional.hessian(
            lambda v, k=k: _objective(z, w[:, k:k + 1], v[None], l2).sum(), t[k])
        q = torch.softmax(z @ t[k], 0)
        m = z.T @ q
        cov = weighted_gram(z, q[:, None])[0] - torch.outer(m, m)
        ours = w[:, k].sum() * cov + l2 * torch.eye(3)
        assert torch.allclose(ours, -hess, atol=1e-10)
        # The solver's own Newton step uses that Hessian: d = H^{-1} g and gain = g^T H^{-1} g.
        d = torch.linalg.solve(-hess, grad[k])
        assert info.gain[k] == pytest.approx(float(grad[k] @ d), rel=1e-8)
        assert float(info.step[k]) > 0
        assert torch.allclose((new_t[k] - t[k]) / info.step[k], d, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solution_matches_moments_and_lbfgs(dtype):
    z, w = _problem()
    res = fit_softmax_regression(z.to(dtype), w.to(dtype))
    assert res.converged
    q = torch.softmax(z @ res.atoms.double().T, 0)
    # Moment matching: the q-weighted mean of z equals the w-weighted mean, per component.
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(z.T @ q, (z.T @ w) / w.sum(0), atol=tol)
    t = torch.zeros(3, 3, requires_grad=True)
    opt = torch.optim.LBFGS([t], max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -_objective(z, w, t).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(res.atoms.double(), t.detach(), atol=1e-6 if dtype == torch.float64
                          else 1e-3)


def test_each_step_increases_every_objective_and_batches_independently():
    z, w = _problem(k=4, seed=3)
    t = torch.randn(4, 3) * 3  # far from the optimum: backtracking is needed
    f_prev = _objective(z, w, t)
    for _ in range(6):
        t, logits, info = softmax_regression_step(z, w, t)
        assert torch.allclose(logits, z @ t.T)
        f = _objective(z, w, t)
        assert bool((f >= f_prev - 1e-12).all())
        f_prev = f
    single = fit_softmax_regression(z, w[:, 2:3]).atoms
    assert torch.allclose(fit_softmax_regression(z, w).atoms[2:3], single, atol=1e-9)


def test_zero_weight_component_stays_put_and_l2_gives_finite_solution():
    z, w = _problem()
    w[:, 1] = 0
    t0 = torch.randn(3, 3)
    t, _, info = softmax_regression_step(z, w, t0)
    assert torch.equal(t[1], t0[1]) and torch.isfinite(t).all()
    # All weight on the single most extreme point: no finite MLE without a ridge.
    w2 = torch.zeros(120, 1)
    w2[int(z[:, 0].argmax()), 0] = 10.0
    res = fit_softmax_regression(z, w2, l2=1.0)
    assert res.converged and torch.isfinite(res.atoms).all()
    q = torch.softmax(z @ res.atoms[0], 0)
    assert torch.allclose(10.0 * (z[int(z[:, 0].argmax())] - z.T @ q), res.atoms[0], atol=1e-8)


def test_chunked_hessian_equals_unchunked():
    z, w = _problem(p=500)
    q = torch.softmax(z @ torch.randn(3, 3).T, 0)
    brute = torch.stack([(z.T * q[:, k]) @ z for k in range(3)])
    assert torch.allclose(weighted_gram(z, q, chunk_size=7), brute, atol=1e-12)
    assert torch.allclose(weighted_gram(z, q), brute, atol=1e-12)


def test_bad_arguments_name_themselves():
    z, w = _problem()
    with pytest.raises(ValueError, match="weights must have shape"):
        fit_softmax_regression(z, w[:10])
    with pytest.raises(ValueError, match="nonnegative"):
        fit_softmax_regression(z, -w)
    with pytest.raises(ValueError, match="l2"):
        fit_softmax_regression(z, w, l2=-1.0)
    with pytest.raises(ValueError, match="init must have shape"):
        fit_softmax_regression(z, w, init=torch.zeros(2, 3))


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
        ref = lbfgs(fk, torch.zeros(3))
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
    ref = lbfgs(fn, torch.zeros(9))
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


def test_armijo_search_takes_each_members_first_sufficient_step():
    """Members accept at steps 1, 1/2 and 1/8 of f(s) = s slope - c s^2; a member whose gain
    is negligible accepts the first finite value; one that never ascends keeps step 0, f0."""
    from pyro_softmix.solvers import ARMIJO, armijo_search

    f0 = torch.zeros(5, dtype=torch.float64)
    slope = torch.ones(5, dtype=torch.float64)
    curvature = torch.tensor([0.5, 1.2, 7.0, 0.0, 0.0], dtype=torch.float64)
    calls = []

    def evaluate(step):
        calls.append(step.clone())
        f = step * slope - curvature * step**2
        f[3] = float("nan") if len(calls) == 1 else -1.0  # negligible: NaN first, then finite
        f[4] = -1.0  # never an ascent
        return f

    negligible = torch.tensor([False, False, False, True, False])
    step, f1, done = armijo_search(f0, slope, evaluate, 6, negligible)
    assert step.tolist() == [1.0, 0.5, 0.125, 0.5, 0.0]
    assert done.tolist() == [True, True, True, True, False] and f1[4] == 0.0
    for s, c in zip(step[:3].tolist(), curvature[:3].tolist(), strict=True):
        assert s - c * s * s >= ARMIJO * s and (2 * s) - c * (2 * s) ** 2 < ARMIJO * 2 * s
    assert len(calls) == 6  # member 4 never accepts: every trial is spent


def test_trust_region_step_is_the_dogleg():
    """Inside the radius: the Newton step. Outside: a step of the radius' length whose
    quadratic-model increase is at least the Cauchy point's (steepest ascent within the radius);
    with a vanished Hessian: the gradient direction."""
    from pyro_softmix.solvers import trust_region_step

    g = torch.Generator().manual_seed(0)
    r = 4
    a = torch.randn(3, r, r, generator=g, dtype=torch.float64)
    hess = a @ a.mT + 0.01 * torch.eye(r, dtype=torch.float64)
    hess[2] = 0.0
    grad = 5 * torch.randn(3, r, generator=g, dtype=torch.float64)
    newton = torch.linalg.solve(hess[:2], grad[:2][..., None])[..., 0]
    newton = torch.cat([newton, torch.zeros(1, r, dtype=torch.float64)])
    radius = 0.5 * float(torch.linalg.vector_norm(newton[1]))
    newton[0] *= radius / (2 * float(torch.linalg.vector_norm(newton[0])))  # fits inside
    step, capped = trust_region_step(grad, hess, newton, radius)
    assert capped.tolist() == [False, True, True]
    assert torch.equal(step[0], newton[0])
    lengths = torch.linalg.vector_norm(step, dim=-1)
    assert torch.allclose(lengths[1:], torch.tensor([radius, radius], dtype=torch.float64))
    assert torch.allclose(step[2] / lengths[2], grad[2] / grad[2].norm())

    def model(p, k):
        return float(grad[k] @ p - 0.5 * p @ hess[k] @ p)

    cauchy = min(radius / float(grad[1].norm()),
                 float(grad[1] @ grad[1] / (grad[1] @ hess[1] @ grad[1]))) * grad[1]
    assert model(step[1], 1) >= model(cauchy, 1) - 1e-12


def test_weighted_cov_is_centred_before_the_products():
    """The covariance of z under q, by brute force on a tiny problem, and in float32 for a
    component concentrated far from the origin, where m m^T dwarfs the covariance: the
    difference form loses its digits there, the centred sums keep float32 accuracy."""
    from pyro_softmix._gram import weighted_cov, weighted_gram

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(30, 2, generator=gen, dtype=torch.float64), 0)
    m = q.T @ z
    brute = torch.stack([sum(q[j, k] * torch.outer(z[j] - m[k], z[j] - m[k]) for j in range(30))
                         for k in range(2)])
    assert torch.allclose(weighted_cov(z, q, m, chunk_size=7), brute, atol=1e-14)
    z = torch.randn(20_000, 8, generator=gen, dtype=torch.float64) + 30.0
    q = torch.softmax(3 * z[:, :1] @ torch.ones(1, 2, dtype=torch.float64), 0)
    m = q.T @ z
    ref = weighted_cov(z, q, m)
    z32, q32 = z.float(), q.float()
    m32 = q32.T @ z32
    centred = weighted_cov(z32, q32, m32).double()
    difference = (weighted_gram(z32, q32) - m32[:, :, None] * m32[:, None, :]).double()
    scale = float(ref.abs().max())
    assert float((centred - ref).abs().max()) < 1e-4 * scale
    assert float((difference - ref).abs().max()) > 10 * float((centred - ref).abs().max())
