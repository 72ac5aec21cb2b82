# SPDX-License-Identifier: Apache-2.0
"""The Hessian-free M-step: batched preconditioned CG, the stale preconditioner and its
refresh, the choice by rank, and fits that reach the explicit M-step's optimum."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import _cg, engine, solvers
from pyro_softmix._cg import cholesky_apply, factor_hessians, pcg, stale_newton
from pyro_softmix._gram import weighted_cov
from pyro_softmix.engine import EMProblem
from pyro_softmix.solvers import newton_direction

from .helpers import simulated


def _spd(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    return m @ m.transpose(1, 2) + 0.1 * torch.eye(n, dtype=torch.float64)


def test_batched_pcg_solves_each_row_on_its_own():
    a = _spd(3, 8, 0)
    rhs = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rhs[1] = 0  # a zero right-hand side is solved by d = 0
    out = pcg(lambda v: (a @ v[..., None])[..., 0], rhs, lambda v: v, rel_tol=1e-10,
              max_iterations=50)
    exact = torch.linalg.solve(a, rhs)
    assert out.solved.all() and not out.bounded.any()
    assert torch.allclose(out.d, exact, atol=1e-7 * float(exact.abs().max()))
    assert torch.allclose(out.ad, (a @ out.d[..., None])[..., 0], atol=1e-9)
    # An exact preconditioner solves every row in one iteration.
    out = pcg(lambda v: (a @ v[..., None])[..., 0], rhs,
              lambda v: torch.linalg.solve(a, v), rel_tol=1e-8)
    assert out.iterations == 1 and torch.allclose(out.d, exact, atol=1e-9)
    # Inside a radius: the rows whose solution is longer stop on the sphere, still ascending.
    radius = 0.5 * float(exact.norm(dim=1)[0])
    out = pcg(lambda v: (a @ v[..., None])[..., 0], rhs, lambda v: v, radius=radius)
    assert out.bounded[0] and not out.solved[0]
    assert float(out.d[0].norm()) == pytest.approx(radius, rel=1e-12)
    assert float(rhs[0] @ out.d[0]) > 0


def _mstep_case(seed=2):
    d = simulated(p=400, L=5, K=3, N=20_000, seed=seed, norm=2.0)
    z = psm.standardize(d.features).transform(d.features)
    g = torch.Generator().manual_seed(seed)
    problem = EMProblem(z, d.counts, 3)
    st = problem.start(torch.randn(3, 5, generator=g, dtype=torch.float64),
                       torch.log_softmax(torch.randn(3, generator=g, dtype=torch.float64), 0))
    q = problem.workspace.q
    mean = q.T @ z
    total = st.w.sum(0)
    grad = st.w.T @ z - total[:, None] * mean
    cov = weighted_cov(z, q, mean)

    def hess_times(v):
        return total[:, None] * torch.einsum("krs,ks->kr", cov, v)

    return z, q, total, grad, cov, hess_times


def test_cholesky_apply_solves_each_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, 9, generator=g, dtype=torch.float64)
    mats = a @ a.mT
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = cholesky_apply(torch.linalg.cholesky(mats), v)
    torch.testing.assert_close((mats @ got[..., None])[..., 0], v, rtol=1e-10, atol=1e-10)


def test_stale_newton_with_an_exact_factor_is_the_newton_step():
    _, _, total, grad, cov, hess_times = _mstep_case()
    exact = newton_direction(grad, total[:, None, None] * cov)
    # A factor formed at other weights differs by a scale per component, which PCG does not
    # see: it is still exact.
    chol = factor_hessians(2.0 * total[:, None, None] * cov)
    d, curvature, ok = stale_newton(hess_times, grad, chol)
    assert ok.all()
    assert torch.allclose(d, exact, rtol=1e-8, atol=1e-10)
    assert torch.allclose(curvature, (grad * exact).sum(-1), rtol=1e-8)


def test_a_stale_factor_that_runs_out_of_iterations_is_reported(monkeypatch):
    _, _, total, grad, cov, hess_times = _mstep_case()
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    monkeypatch.setattr(_cg, "CG_MSTEP_ITERATIONS", 1)
    d, _, ok = stale_newton(hess_times, grad, factor_hessians(eye.clone()))
    assert not ok.all() and bool(((grad * d).sum(-1) > 0).all())  # still ascent directions


def test_the_m_step_is_hessian_free_from_its_rank_on():
    r = engine.HESSIAN_FREE_RANK
    assert EMProblem(torch.zeros(3, r, dtype=torch.float64), torch.ones(3), 2).hessian_free
    assert not EMProblem(torch.zeros(3, r - 1, dtype=torch.float64), torch.ones(3), 2).hessian_free


def _fit(d, hessian_free, monkeypatch, **kwargs):
    monkeypatch.setattr(engine, "HESSIAN_FREE_RANK", 1 if hessian_free else 10**6)
    changes = []  # (before, after) every EM iteration, per start
    original = engine.EMProblem.iterate

    def spy(self, st):
        out = original(self, st)
        changes.extend(zip(self.objective(st).tolist(), self.objective(out[0]).tolist(),
                           strict=True))
        return out

    monkeypatch.setattr(engine.EMProblem, "iterate", spy)
    fit = psm.fit_em(d.features, d.counts, num_components=3, seed=0, tol=1e-12, **kwargs)
    monkeypatch.setattr(engine.EMProblem, "iterate", original)
    return fit, changes


@pytest.mark.parametrize("option", [None, "prior_scale", "offset"])
def test_hessian_free_fits_reach_the_explicit_optimum_monotonically(monkeypatch, option):
    d = simulated(p=500, L=6, K=3, N=50_000, seed=11, norm=2.5)
    kwargs = {None: {}, "prior_scale": {"prior_scale": 0.5},
              "offset": {"offset": 0.5 * torch.randn(500, generator=torch.Generator().manual_seed(3),
                                                     dtype=torch.float64)}}[option]
    calls = []
    original = _cg.stale_newton
    monkeypatch.setattr(solvers, "stale_newton", lambda *a: calls.append(1) or original(*a))
    free, changes = _fit(d, True, monkeypatch, **kwargs)
    assert calls  # the M-steps were Hessian-free
    calls.clear()
    explicit, _ = _fit(d, False, monkeypatch, **kwargs)
    assert not calls
    assert free.converged and explicit.converged
    # Every EM iteration raises the objective (measured: the smallest rise is 3e-12 relative);
    # 1e-14 leaves room for the rounding of the objective itself.
    assert all(b >= a - 1e-14 * abs(a) for a, b in changes)
    assert free.loglik == pytest.approx(explicit.loglik, rel=1e-10, abs=0)
    perm = torch.cdist(free.atoms, explicit.atoms).argmin(1)
    assert torch.allclose(free.atoms, explicit.atoms[perm], atol=1e-5)
    assert torch.allclose(free.weights, explicit.weights[perm], atol=1e-6)


@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_the_m_steps_hessian_vector_products_give_the_newton_step(l2):
    """With the exact Hessian as preconditioner, CG on the M-step's own products (two passes
    over z) returns the explicit Newton direction: a wrong product would not."""
    z, q, total, grad, cov, _ = _mstep_case(seed=4)
    hess = total[:, None, None] * cov + l2 * torch.eye(5, dtype=torch.float64)
    grad = grad - l2 * torch.ones(3, 5, dtype=torch.float64)  # any right-hand side
    ws = solvers.Workspace(z, 3)
    d, _, ok = solvers._cg_direction(z, q, q.T @ z, total, grad, l2,
                                     factor_hessians(hess), None, ws)
    assert ok.all()
    assert torch.allclose(d, newton_direction(grad, hess), rtol=1e-8, atol=1e-10)


def test_heavy_cov_is_the_covariance_of_the_heavy_rows():
    """The preconditioner's covariances: by brute force over the rows with q_jk >= tail / p
    (renormalised) plus the left-out mass times the identity, in chunks, for a column with at
    most HEAVY_DENSE of its rows kept; over all rows, in float32 products summed in float64,
    for one with more (and so for every column with tail 0: weighted_cov); within the bound
    that the left-out mass allows,
    9 tail max_j |z_j - m_k|^2 (law of total covariance, and the identity's share); and
    positive definite for a column on one row (whose kept rows' covariance is 0)."""
    from pyro_softmix._gram import HEAVY_DENSE, heavy_cov

    gen = torch.Generator().manual_seed(0)
    p = 400
    z = torch.randn(p, 4, generator=gen, dtype=torch.float64)
    scale = torch.tensor([[0.1], [0.8], [2.5], [4.0]], dtype=torch.float64)
    q = torch.softmax(z @ (scale * torch.randn(4, 4, generator=gen, dtype=torch.float64)).T, 0)
    tail = 0.1
    kept = (q >= tail / p).sum(0)
    dense = kept > HEAVY_DENSE * p
    assert dense.tolist() == [True, True, False, False]  # both paths, one column each side
    brute = []
    for k in range(4):
        keep = q[:, k] >= tail / p if not dense[k] else torch.ones(p, dtype=torch.bool)
        w = q[keep, k] / q[keep, k].sum()
        m = w @ z[keep]
        brute.append(sum(wj * torch.outer(zj - m, zj - m) for wj, zj in zip(w, z[keep], strict=True))
                     + float(q[~keep, k].sum()) * torch.eye(4, dtype=torch.float64))
    got = heavy_cov(z, q, tail, chunk_size=7)
    brute = torch.stack(brute)
    # The gathered rows' products in float64; all rows' products in float32, summed in float64.
    torch.testing.assert_close(got[2:], brute[2:], rtol=1e-12, atol=1e-14)
    f32 = dict(rtol=0.0, atol=16 * torch.finfo(torch.float32).eps * float(brute.abs().max()))
    torch.testing.assert_close(got[:2], brute[:2], **f32)
    assert float((got[:2] - brute[:2]).abs().max()) > 1e-12  # float32 products
    torch.testing.assert_close(heavy_cov(z, q[:, 2:], tail), got[2:], rtol=1e-12, atol=1e-14)
    assert int(kept[3]) < p // 4  # the peaked column keeps few rows
    full = weighted_cov(z, q, q.T @ z)
    torch.testing.assert_close(heavy_cov(z, q, 0.0), full, **f32)
    torch.testing.assert_close(weighted_cov(z, q, q.T @ z, compute_dtype=torch.float32), full, **f32)
    radius = ((z[None] - (q.T @ z)[:, None]) ** 2).sum(-1).amax(1)  # (K,) max |z_j - m_k|^2
    error = torch.linalg.matrix_norm(got - full, ord=2)
    assert bool((error <= 9 * tail * radius).all())
    assert bool((error[~dense] > 0).all())  # rows were left out
    peaked = torch.full((p, 1), 1e-5 / (p - 1), dtype=torch.float64)
    peaked[0] = 1 - 1e-5
    assert float(torch.linalg.eigvalsh(heavy_cov(z, peaked, tail))[0].min()) >= 0.5e-5
