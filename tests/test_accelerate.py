# SPDX-License-Identifier: Apache-2.0
"""Accelerated EM: SQUAREM cycles, the Newton finish, the run schedule."""

import math

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import accelerate
from pyro_softmix.engine import EMProblem

from .helpers import best_permutation, hessian_case, simulated


def test_squarem_cycle_never_loses_to_plain_em_and_keeps_consistent_buffers():
    """16 starts at scales 0.5..8 in one batch: the extrapolation is kept for some and rejected
    for others; each start ends at least as high as two plain EM steps, the returned state is
    the state of its own parameters, and a start's result does not depend on the batch."""
    d = psm.simulate(num_points=200, num_features=3, num_components=2, num_obs=20_000,
                     atom_norm=3.0, seed=1)
    z = psm.standardize(d.features).transform(d.features)
    s, k = 16, 2
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 8, s).repeat_interleave(k)[:, None]
    atoms = torch.randn(s * k, 3, generator=g) * scale
    log_w = torch.full((s * k,), -math.log(k))
    problem = EMProblem(z, d.counts, k, num_starts=s)
    step_max = [64.0] * s
    cycle = accelerate.squarem_cycle
    new, objs, gains, _ = cycle(problem, problem.start(atoms, log_w), 2, step_max)
    plain, plain_objs, plain_gains, _ = cycle(problem, problem.start(atoms, log_w), 2, None)
    gain = torch.tensor(objs[-1]) - torch.tensor(plain_objs[-1])
    assert bool((gain >= 0).all())
    assert bool((gain > 1.0).any()) and min(step_max) < 64  # some kept, some rejected
    assert gains == plain_gains and objs[0] == plain_objs[0]
    fresh = problem.start(new.atoms, new.log_weights)
    assert torch.equal(fresh.loglik, new.loglik) and torch.equal(fresh.w, new.w)
    assert torch.equal(problem.objective(new), torch.tensor(objs[-1]))
    one = EMProblem(z, d.counts, k)
    i = int(gain.argmax())
    alone, alone_objs, _, _ = cycle(one, one.start(atoms[i * k:(i + 1) * k], log_w[:k]), 2, [64.0])
    assert alone_objs[-1][0] == pytest.approx(objs[-1][i], rel=1e-12)
    assert torch.allclose(alone.atoms, new.atoms[i * k:(i + 1) * k], atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accelerated_em_reaches_the_plain_em_mle(seed):
    d = simulated(p=400, L=4, K=4, N=20_000, seed=seed, norm=2.0)
    kw = dict(num_components=4, init="random", seed=seed, max_iter=20_000, tol=1e-13)
    plain = psm.fit_em(d.features, counts=d.counts, accelerate=False, **kw)
    fast = psm.fit_em(d.features, counts=d.counts, **kw)
    again = psm.fit_em(d.features, counts=d.counts, **kw)
    assert fast.converged and plain.converged
    assert fast.loglik == pytest.approx(plain.loglik, rel=1e-11, abs=0)
    perm = list(best_permutation(fast.atoms, plain.atoms))
    assert torch.allclose(fast.atoms[perm], plain.atoms, atol=1e-4)
    assert torch.allclose(fast.weights[perm], plain.weights, atol=1e-5)
    h = np.asarray(fast.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))  # monotone between accepted steps
    assert fast.n_iter < plain.n_iter
    assert torch.equal(fast.atoms, again.atoms) and fast.history == again.history


def test_a_hessian_indefinite_by_rounding_only_is_decided_in_float64(monkeypatch):
    """Where the mixed-precision Hessian looks indefinite by no more than float32 rounding, the
    Newton step decides concavity on the float64 Hessian; a clear saddle keeps the cheap one."""
    from pyro_softmix import accelerate

    problem, st, pieces = hessian_case()
    problem.support = torch.nonzero(problem.counts64 > 0).squeeze(1)
    exact = accelerate.marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces,
                                 precise=True)
    evals, evecs = torch.linalg.eigh(-exact)
    assert evals[0] > 0  # concave near the MLE
    v = evecs[:, 0]
    calls = []

    def perturbed(shift, also_precise=False):
        # Moves -H's smallest eigenvalue to -shift times its largest: in the mixed-precision
        # Hessian only, or (a genuine saddle) in both.
        def hessian(*args, precise=False, **kwargs):
            calls.append(precise)
            h = exact.clone()
            if also_precise or not precise:
                h += (evals[0] + shift * evals[-1]) * torch.outer(v, v)
            return h
        return hessian

    # Rounding level (measured on GloVe: -3e-11 to -8e-9): decided on the float64 Hessian.
    monkeypatch.setattr(accelerate, "marginal_hessian", perturbed(2e-9))
    chol, eig = accelerate.factor_hessian(problem, st, pieces, None)
    assert calls == [False, True] and eig is None
    assert torch.allclose(chol @ chol.T, -exact, rtol=0, atol=1e-10 * float(evals[-1]))
    # The float64 Hessian is not concave either: the first eigendecomposition is kept.
    calls.clear()
    monkeypatch.setattr(accelerate, "marginal_hessian", perturbed(2e-9, also_precise=True))
    chol, eig = accelerate.factor_hessian(problem, st, pieces, None)
    assert calls == [False, True] and chol is None
    assert float(eig[0][0]) == pytest.approx(-2e-9 * float(evals[-1]), rel=1e-3)
    # A clear saddle: no float64 Hessian.
    for shift in (1e-6, 1e-2):
        calls.clear()
        monkeypatch.setattr(accelerate, "marginal_hessian", perturbed(shift))
        chol, eig = accelerate.factor_hessian(problem, st, pieces, None)
        assert calls == [False] and chol is None
        assert float(eig[0][0]) == pytest.approx(-shift * float(evals[-1]), rel=1e-3)


def test_mixed_precision_hessians_reach_the_same_mle(monkeypatch):
    from pyro_softmix import _marginal, accelerate

    d = simulated(p=2000, L=10, K=3, N=200_000, seed=5, norm=2.0)
    kw = dict(num_components=3, seed=0, tol=1e-13, max_iter=5000)
    formed = []  # the mixed-precision Hessians of the first fit
    hessian = accelerate.marginal_hessian
    monkeypatch.setattr(accelerate, "marginal_hessian", lambda z, *a, precise=False, **kw: formed.append(
        not precise and _marginal.mixed_precision(z, 3)) or hessian(z, *a, precise=precise, **kw))
    mixed = psm.fit_em(d.features, counts=d.counts, **kw)
    assert any(formed)  # the Newton finish ran, with mixed-precision Hessians
    monkeypatch.setattr(_marginal, "_MIXED_MIN_DIM", 10**9)
    precise = psm.fit_em(d.features, counts=d.counts, **kw)
    assert mixed.converged and precise.converged
    assert mixed.loglik == pytest.approx(precise.loglik, rel=1e-12, abs=0)
    h = np.asarray(mixed.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))


def _newton_from_em(seed, norm, scale, accelerate_ref, hessians=None, em_iterations=20,
                    max_steps=10):
    """Newton steps (tol 1e-14) from EM iterations started at ``scale`` times the MLE's atoms;
    checks convergence, monotonicity and the final gap, and returns the gaps to the MLE before
    and after each step, and the MLE's log-likelihood. ``hessians`` (a list that counts the
    Hessians formed) is cleared when the Newton steps begin."""
    d = simulated(p=2000, L=5, K=3, N=200_000, seed=seed, norm=norm)
    design = psm.standardize(d.features)
    problem = EMProblem(design.transform(d.features), d.counts, 3)
    ref = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, tol=1e-14,
                     max_iter=20_000, accelerate=accelerate_ref)
    st = problem.start(design.atoms_to_z(ref.atoms) * scale, ref.weights.log())
    for _ in range(em_iterations):
        st, _ = problem.iterate(st)
    start = float(problem.objective(st)[0])
    if hessians is not None:
        hessians.clear()
    _, objs, _, converged, failed, _ = accelerate.newton_finish(problem, st, start, 1e-14, max_steps)
    assert converged and not failed
    gaps = [ref.loglik - o for o in [start] + objs]
    assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:], strict=False))  # monotone
    assert abs(gaps[-1]) <= 1e-12 * abs(ref.loglik)
    return gaps, ref.loglik


def test_newton_endgame_converges_quadratically_and_never_decreases():
    """From EM's iterate near the optimum, one Newton step cuts the gap by orders of magnitude."""
    gaps, _ = _newton_from_em(seed=3, norm=2.0, scale=0.9, accelerate_ref=False)
    assert len(gaps) <= 6
    # Measured: 0.15 -> 4e-6 in one step (EM's linear rate would need dozens of iterations).
    assert gaps[0] > 0.05 and gaps[1] <= 1e-3 * gaps[0]


@pytest.fixture
def hessians_built(monkeypatch):
    """A list that grows by one for every full Hessian the Newton finish forms."""
    import pyro_softmix.accelerate as accelerate

    built = []
    hessian = accelerate.marginal_hessian
    monkeypatch.setattr(accelerate, "marginal_hessian",
                        lambda *a, **kw: built.append(1) or hessian(*a, **kw))
    return built


def test_chord_steps_reuse_the_hessian_and_reach_the_same_optimum(monkeypatch, hessians_built):
    """Once a full Newton step has cut the decrement, later steps reuse its Hessian: fewer
    Hessians than steps, the same optimum as fresh Hessians at every step, never a decrease."""
    import pyro_softmix.accelerate as accelerate

    built = hessians_built
    runs = []
    for contraction in (accelerate.CHORD_CONTRACTION, 0.0):  # 0: a fresh Hessian at every step
        monkeypatch.setattr(accelerate, "CHORD_CONTRACTION", contraction)
        gaps, loglik = _newton_from_em(seed=0, norm=1.0, scale=0.7, accelerate_ref=True,
                                       hessians=built)
        runs.append((len(built), len(gaps) - 1, gaps[-1]))
    (chord_h, chord_steps, chord_gap), (fresh_h, fresh_steps, fresh_gap) = runs
    # Measured: 1 Hessian for 4 steps (3.5e-7 -> 3e-10 -> 2e-12 -> 3e-14 relative) against one
    # per step (3) without chord steps.
    assert fresh_h == fresh_steps >= 2 and chord_h < chord_steps and chord_h < fresh_h
    assert abs(chord_gap - fresh_gap) <= 1e-13 * abs(loglik)  # the same optimum


def test_a_rejected_chord_step_falls_back_to_a_fresh_hessian(monkeypatch, hessians_built):
    """Chord steps forced (contraction 1e12) with one trial per step: a stale Hessian's step is
    then rejected, the state it overwrote is restored and the next step uses a fresh Hessian.
    With a single trial every accepted step is a full one, so the second Hessian can only come
    from that fallback. (Measured: 2 Hessians, 14 steps; without the restore Newton fails.)"""
    import pyro_softmix.accelerate as accelerate

    monkeypatch.setattr(accelerate, "CHORD_CONTRACTION", 1e12)
    monkeypatch.setattr(accelerate, "NEWTON_BACKTRACKS", 1)
    _newton_from_em(seed=0, norm=1.0, scale=0.7, accelerate_ref=True, hessians=hessians_built,
                    em_iterations=5, max_steps=30)
    assert len(hessians_built) >= 2


def test_newton_endgame_is_skipped_for_grouped_data_and_respects_the_prior(monkeypatch):
    from pyro_softmix import accelerate
    from pyro_softmix.engine import GroupedEMProblem

    newton = accelerate.newton_finish

    def no_newton(problem, *args, **kwargs):
        if isinstance(problem, GroupedEMProblem):
            raise AssertionError("the Newton endgame ran on grouped data")
        return newton(problem, *args, **kwargs)

    monkeypatch.setattr(accelerate, "newton_finish", no_newton)
    x = simulated(p=200, L=3, K=2, N=4000, seed=2, tokens=True)
    groups = torch.arange(4000) // 20
    kw = dict(groups=groups, num_components=2, seed=0, tol=1e-13, max_iter=20_000)
    fit = psm.fit_em(x.features, tokens=x.tokens, **kw)
    slow = psm.fit_em(x.features, tokens=x.tokens, accelerate=False, **kw)
    assert fit.converged and fit.loglik == pytest.approx(slow.loglik, rel=1e-11, abs=0)
    d = simulated(p=300, L=3, K=2, N=30_000, seed=2)
    kw = dict(num_components=2, seed=0, prior_scale=0.5, tol=1e-13, max_iter=20_000)
    plain = psm.fit_em(d.features, counts=d.counts, accelerate=False, **kw)
    fast = psm.fit_em(d.features, counts=d.counts, **kw)
    assert fast.history[-1] == pytest.approx(plain.history[-1], rel=1e-11, abs=0)
