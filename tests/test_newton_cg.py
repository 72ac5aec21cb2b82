# SPDX-License-Identifier: Apache-2.0
"""The Hessian-free Newton finish: Hessian-vector products, preconditioned CG, the choice by
size, and the float64 finish of float32 fits."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import accelerate
from pyro_softmix._cg import cholesky_apply, factor_blocks, factor_hessians
from pyro_softmix._marginal import marginal_gradient, marginal_hessian, marginal_hvp
from pyro_softmix.engine import EMProblem

from .helpers import best_permutation, simulated


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_vector_products_equal_the_full_hessian_times_the_vector(dtype):
    d = simulated(p=60, L=3, K=3, N=800, seed=5, norm=2.0)
    counts = d.counts.double()
    counts[:7] = 0  # rows without draws
    z = psm.standardize(d.features).transform(d.features).to(dtype)
    g = torch.Generator().manual_seed(1)
    problem = EMProblem(z, counts, 3)
    st = problem.start(torch.randn(3, 3, generator=g).to(dtype),
                       torch.log_softmax(torch.randn(3, generator=g), 0).to(dtype))
    _, pieces = marginal_gradient(z, problem.workspace.q, st.w, st.log_weights)
    hess = marginal_hessian(z, problem.counts, problem.workspace.q, st.w, pieces, precise=True)
    times = marginal_hvp(z, problem.counts, problem.workspace.q, st.w, pieces)
    for _ in range(3):
        v = torch.randn(hess.shape[0], generator=g, dtype=torch.float64)
        hv = times(v)
        ref = hess @ v
        # Measured (relative to the largest entry of H v): 3e-16 in float64, 2e-7 in float32.
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(hv.double(), ref, atol=tol * float(ref.abs().max()), rtol=0)


def test_pcg_solves_to_its_tolerance_and_always_ascends():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 3, 30, dtype=torch.float64)) @ q.T
    rhs = torch.randn(30, generator=g, dtype=torch.float64)
    d, solved, bounded = accelerate._pcg(lambda v: a @ v, rhs, lambda v: v)
    res = rhs - a @ d
    assert solved and not bounded and float(res.norm()) <= accelerate.CG_TOL * float(rhs.norm())
    exact = torch.linalg.solve(a, rhs)
    d, solved, _ = accelerate._pcg(lambda v: a @ v, rhs, lambda v: exact * (v @ rhs) / (rhs @ rhs))
    assert solved and torch.allclose(d, exact, rtol=1e-12, atol=0)  # one step with P = A
    indefinite = a - 10 * torch.eye(30, dtype=torch.float64)
    d, solved, bounded = accelerate._pcg(lambda v: indefinite @ v, rhs, lambda v: v)
    assert not solved and bounded and float(rhs @ d) > 0


def _near_optimum(seed=0, prior_scale=None):
    """A problem, its MLE (tol 1e-14) and a state 20 EM iterations from 0.8 times its atoms."""
    d = simulated(p=2000, L=5, K=3, N=200_000, seed=seed, norm=2.0)
    design = psm.standardize(d.features)
    kw = dict(num_components=3, seed=0, tol=1e-14, max_iter=20_000, prior_scale=prior_scale)
    ref = psm.fit_em(d.features, counts=d.counts, **kw)
    problem = EMProblem(design.transform(d.features), d.counts, 3)
    if prior_scale is not None:
        from pyro_softmix.engine import prior_precision
        problem.penalty = prior_precision(d.features, design, prior_scale)
    st = problem.start(design.atoms_to_z(ref.atoms) * 0.8, ref.weights.log())
    for _ in range(20):
        st, _ = problem.iterate(st)
    return problem, st, ref, design


@pytest.mark.parametrize("prior_scale", [None, 0.5])
def test_newton_cg_reaches_the_explicit_newton_optimum_monotonically(prior_scale):
    problem, st, ref, design = _near_optimum(prior_scale=prior_scale)
    start = float(problem.objective(st)[0])
    ends = {}
    for method in (accelerate.newton_finish, accelerate.newton_cg_finish):
        fresh = problem.start(st.atoms, st.log_weights)
        end, objs, _, converged, failed, _ = method(problem, fresh, start, 1e-14, 40)
        assert converged and not failed
        path = [start] + objs
        assert all(b >= a for a, b in zip(path, path[1:], strict=False))  # monotone
        ends[method.__name__] = (path[-1], end.atoms.clone(), end.log_weights.exp())
    (f_exact, a_exact, w_exact), (f_cg, a_cg, w_cg) = ends.values()
    assert f_cg == pytest.approx(f_exact, rel=1e-10, abs=0)
    assert f_cg == pytest.approx(ref.history[-1], rel=1e-10, abs=0)
    # Measured: the atoms agree to 2e-7 (z coordinates), the weights to 1e-8.
    assert torch.allclose(a_cg, a_exact, atol=1e-5) and torch.allclose(w_cg, w_exact, atol=1e-6)


def test_newton_cg_trust_radius_follows_the_accepted_steps(monkeypatch):
    """Far from the optimum each CG solve is bounded by the length of the last accepted step
    where the line search shortened it, and by twice the last radius (at most CG_RADIUS)
    where it took the full step; the path still rises to the explicit Newton optimum."""
    problem, _, ref, design = _near_optimum(seed=1)
    st = problem.start(design.atoms_to_z(ref.atoms) * 0.2, ref.weights.log())
    start = float(problem.objective(st)[0])
    radii, steps = [], []
    pcg, search = accelerate._pcg, accelerate._newton_line_search

    def spy_pcg(matvec, rhs, precondition, radius=float("inf"), rel_tol=accelerate.CG_TOL,
                max_steps=accelerate.CG_MAX_STEPS):
        if rel_tol == accelerate.CG_TOL:  # the loose solves that make the steps
            radii.append(radius)
        return pcg(matvec, rhs, precondition, radius, rel_tol, max_steps)

    def spy_search(prob, state, direction, obj, decrement, noise):
        accepted, step = search(prob, state, direction, obj, decrement, noise)
        steps.append((step, float(direction.norm())))
        return accepted, step

    monkeypatch.setattr(accelerate, "_pcg", spy_pcg)
    monkeypatch.setattr(accelerate, "_newton_line_search", spy_search)
    end, objs, _, converged, failed, _ = accelerate.newton_cg_finish(problem, st, start, 1e-14, 80)
    assert converged and not failed
    path = [start] + objs
    assert all(b >= a for a, b in zip(path, path[1:], strict=False))
    assert path[-1] == pytest.approx(ref.history[-1], rel=1e-10, abs=0)
    assert radii[0] == accelerate.CG_RADIUS and any(step < 1 for step, _ in steps)
    for (step, length), radius, after in zip(steps, radii, radii[1:], strict=False):
        expected = (min(accelerate.CG_RADIUS, 2 * radius) if step >= 1
                    else max(step * length, 1e-3 * accelerate.CG_RADIUS))
        assert after == pytest.approx(expected, rel=1e-12)


def test_the_newton_finish_is_chosen_by_size(monkeypatch):
    """The full Hessian where |support| D <= HESSIAN_FREE_RATIO p, Newton-CG just above, and
    Newton-CG beyond MAX_NEWTON_PARAMS whatever the ratio (the grown start's smaller
    intermediate fits choose by their own size); the fits end at the same optimum."""
    d = simulated(p=1000, L=4, K=3, N=100_000, seed=3, norm=2.0)
    ran = []
    for name in ("newton_finish", "newton_cg_finish"):
        original = getattr(accelerate, name)
        monkeypatch.setattr(accelerate, name, lambda problem, *a, _f=original, _n=name:
                            ran.append((_n, accelerate.num_free(problem))) or _f(problem, *a))
    free, support, p = 3 * (4 + 1) - 1, int((d.counts > 0).sum()), 1000
    at = support * free / p
    fits = {}
    for ratio, cap, expected in ((at, 4096, "newton_finish"), (at * (1 - 1e-9), 4096,
                                 "newton_cg_finish"), (10**9, free - 1, "newton_cg_finish")):
        monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO", ratio)
        monkeypatch.setattr(accelerate, "MAX_NEWTON_PARAMS", cap)
        ran.clear()
        fits[expected] = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0,
                                    tol=1e-13)
        assert (expected, free) in ran
        assert all((n == "newton_cg_finish") == (support * size > ratio * p or size > cap)
                   for n, size in ran)
    exact, cg = fits["newton_finish"], fits["newton_cg_finish"]
    assert exact.converged and cg.converged
    assert cg.loglik == pytest.approx(exact.loglik, rel=1e-10, abs=0)
    perm = list(best_permutation(cg.atoms, exact.atoms))
    assert torch.allclose(cg.weights[perm], exact.weights, atol=1e-6)
    # The float64 twin of a float32 problem (cheaper CG products) has its own threshold.
    z = psm.standardize(d.features).transform(d.features)
    wide = EMProblem(z.float(), d.counts, 3).precise()
    monkeypatch.setattr(accelerate, "MAX_NEWTON_PARAMS", 4096)
    monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO", at)
    monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO_NARROW", at * (1 - 1e-9))
    assert accelerate.hessian_free(wide) and not accelerate.hessian_free(EMProblem(z, d.counts, 3))
    monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO_NARROW", at)
    assert not accelerate.hessian_free(wide)


def test_the_float64_finish_renormalises_float32_weights():
    """Float32 weights sum to 1 only to float32 rounding; at large N that shifts the objective by
    about N eps32. The float64 finish starts from renormalised weights: without that, every
    Newton trial (renormalised by the line search) looked like a loss and the finish failed."""
    d = simulated(p=500, L=3, K=2, N=10**7, seed=2, norm=2.0)
    z = psm.standardize(d.features).transform(d.features).float()
    problem = EMProblem(z, d.counts, 2)
    fit = psm.fit_em(d.features.float(), counts=d.counts, num_components=2, seed=0)
    design = psm.standardize(d.features)
    atoms = design.atoms_to_z(fit.atoms.double()).float()
    log_w = fit.weights.log().float() + 2e-6  # weights summing to 1 + 2e-6: 20 nats at N = 1e7
    st = problem.start(atoms, log_w)
    out = accelerate._precise_newton(problem, st, float(problem.objective(st)[0]), 1e-9, 10)
    _, _, _, converged, failed, _, _ = out
    assert converged and not failed


def test_the_float64_cg_finish_of_a_float32_fit_solves_with_float32_products(monkeypatch):
    """On the float64 twin of a float32 problem, the loose CG solves multiply by the Hessian on
    the float32 design (to float32 rounding of the float64 products) and the tight solve that
    certifies convergence in float64; the fit reaches the optimum it reaches with float64
    products throughout (its float64 objective to 1e-10 relative)."""
    from pyro_softmix import _marginal

    d = simulated(p=400, L=4, K=3, N=10**6, seed=3, norm=2.0)
    x32 = d.features.float()
    z = psm.standardize(x32).transform(x32)
    problem = EMProblem(z, d.counts, 3)
    wide = problem.precise()
    assert wide.narrow_z is z and wide.z.dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    st = wide.start(torch.randn(3, 4, generator=g, dtype=torch.float64),
                    torch.log_softmax(torch.randn(3, generator=g, dtype=torch.float64), 0))
    _, pieces = marginal_gradient(wide.z, wide.workspace.q, st.w, st.log_weights)
    v = torch.randn(3 * 4 + 2, generator=g, dtype=torch.float64)
    exact = _marginal.neg_hessian_times(wide, st, pieces, None, None)(v)
    narrow = _marginal.neg_hessian_times(wide, st, pieces, None, z)(v)
    torch.testing.assert_close(narrow, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    assert not torch.equal(narrow, exact)  # the float32 design was used

    kinds = []
    spy = _marginal.neg_hessian_times
    monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO_NARROW", 0)
    monkeypatch.setattr(accelerate, "neg_hessian_times", lambda *a: kinds.append(
        a[-1] is None) or spy(*a))
    fit = psm.fit_em(x32, counts=d.counts, num_components=3, seed=0, tol=1e-9)
    assert fit.converged and False in kinds and True in kinds  # float32 loose, float64 tight
    monkeypatch.setattr(accelerate, "neg_hessian_times", lambda *a: spy(*a[:-1], None))
    ref = psm.fit_em(x32, counts=d.counts, num_components=3, seed=0, tol=1e-9)
    # The float64 objectives of the finish (the fits' own loglik is a float32 E-step's,
    # rounded at eps32 N |log pi|, about 0.1 nats here) and the atoms to float32 accuracy.
    assert ref.converged and fit.history[-1] == pytest.approx(ref.history[-1], rel=1e-10)
    torch.testing.assert_close(fit.atoms, ref.atoms, rtol=0, atol=1e-5)


def test_convergence_is_claimed_only_from_a_tight_solve(monkeypatch):
    """Where CG cannot certify (here: one iteration allowed for the tight solve), the full
    Hessian finishes where it fits, and beyond that no convergence is claimed."""
    problem, st, ref, _ = _near_optimum(seed=1)
    start = float(problem.objective(st)[0])
    monkeypatch.setattr(accelerate, "CERTIFY_MAX_STEPS", 1)
    calls = []
    original = accelerate.newton_finish
    monkeypatch.setattr(accelerate, "newton_finish",
                        lambda *a: calls.append(1) or original(*a))
    out = accelerate.newton_cg_finish(problem, problem.start(st.atoms, st.log_weights), start,
                                      1e-14, 40)
    assert calls and out[3] and not out[4]
    assert out[1][-1] == pytest.approx(ref.history[-1], rel=1e-10, abs=0)
    for limit in ("MAX_NEWTON_PARAMS", "HANDOVER_MAX_WORK"):  # too large, or too costly
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(accelerate, limit, 0)
            out = accelerate.newton_cg_finish(problem, problem.start(st.atoms, st.log_weights),
                                              start, 1e-14, 40)
        assert not calls and not out[3]
    path = [start] + out[1]
    # Monotone up to rounding: at the optimum a step whose predicted gain is below the
    # objective's rounding is taken without a test (as in the full-Hessian finish).
    assert all(b >= a - 1e-13 * abs(a) for a, b in zip(path, path[1:], strict=False))
    assert path[-1] == pytest.approx(ref.history[-1], rel=1e-10, abs=0)


def test_a_solve_cut_at_the_trust_radius_is_a_step_not_a_handover(monkeypatch):
    """A solve cut at the radius has a decrement below the tolerance however far the optimum
    is (here a radius of 1e-7): Newton-CG takes its small steps, hands nothing over to the full
    Hessian and claims no convergence; with the usual radius it converges from the same state."""
    problem, st, ref, _ = _near_optimum(seed=1)
    start = float(problem.objective(st)[0])
    calls = []
    original = accelerate.newton_finish
    monkeypatch.setattr(accelerate, "newton_finish", lambda *a: calls.append(1) or original(*a))
    with monkeypatch.context() as m:
        m.setattr(accelerate, "CG_RADIUS", 1e-7)
        out = accelerate.newton_cg_finish(problem, problem.start(st.atoms, st.log_weights),
                                          start, 1e-9, 5)
    path = [start] + out[1]
    assert not calls and not out[3] and len(out[1]) == 5
    assert all(b >= a for a, b in zip(path, path[1:], strict=False))
    assert ref.history[-1] - path[-1] > 1e-9 * abs(start)  # far from the optimum still
    out = accelerate.newton_cg_finish(problem, problem.start(st.atoms, st.log_weights), start,
                                      1e-14, 40)
    assert out[3] and out[1][-1] == pytest.approx(ref.history[-1], rel=1e-10, abs=0)


def test_pcg_stays_in_its_trust_radius():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    for spectrum in (torch.logspace(-4, 0, 20, dtype=torch.float64),  # long Newton step
                     torch.linspace(-1, 1, 20, dtype=torch.float64)):  # indefinite
        a = q @ torch.diag(spectrum) @ q.T
        rhs = torch.randn(20, generator=g, dtype=torch.float64)
        d, solved, bounded = accelerate._pcg(lambda v, a=a: a @ v, rhs, lambda v: v, radius=0.5)
        assert not solved and bounded and float(d.norm()) <= 0.5 + 1e-12 and float(rhs @ d) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_preconditioner_of_a_one_point_component_is_finite(dtype):
    """A component whose softmax is one point has covariance 0: its preconditioner block is
    replaced (a ridge at rounding level would leave pivots of 1e-22 in float32, whose solves
    overflow to inf and NaN: SmolLM2 with K = 8, float32, after a split)."""
    g = torch.Generator().manual_seed(5)
    m = torch.randn(20, 20, generator=g, dtype=dtype)
    blocks = torch.stack([m @ m.T, torch.zeros(20, 20, dtype=dtype)])
    chol = factor_hessians(blocks)
    out = cholesky_apply(chol, torch.randn(2, 20, generator=g, dtype=dtype))
    assert bool(torch.isfinite(out).all()) and torch.equal(chol[1], torch.eye(20, dtype=dtype))


def test_the_preconditioner_factors_replace_only_the_singular_blocks():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    good = m @ m.T + torch.eye(3, dtype=torch.float64)
    singular = torch.zeros(3, 3, dtype=torch.float64)  # an empty component: W_k = 0
    chol = factor_blocks(torch.stack([good, singular]))
    assert torch.allclose(chol[0] @ chol[0].T, good, rtol=1e-12, atol=0)
    assert torch.equal(chol[1], torch.eye(3, dtype=torch.float64))
