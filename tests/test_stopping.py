# SPDX-License-Identifier: Apache-2.0
"""The stopping rule, the divergence check, the warnings and progress bars."""

import math
import warnings

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.stopping import find_diverging, remaining_gap

from .helpers import outlier_data, simulated


@pytest.mark.parametrize("rate", [0.3, 0.9, 0.999])
def test_remaining_gap_is_exact_for_linear_convergence(rate):
    from pyro_softmix.stopping import remaining_gap

    # Increments of a linearly converging sequence: Delta_t = c rate^t; the remaining gap after
    # step t is sum_{s > t} Delta_s = Delta_t rate / (1 - rate); the rule adds the last step.
    gains = [5.0 * rate**t for t in range(30)]
    expected = gains[-1] / (1 - rate)
    assert remaining_gap(gains) == pytest.approx(expected, rel=1e-9)
    assert remaining_gap(gains[:1]) == math.inf
    assert remaining_gap(gains + [0.0]) == 0.0


def test_slow_em_is_not_stopped_at_a_stall():
    """Weak separation: EM's rate is ~0.985. A rule on the last step alone stops ~300
    iterations early with the weights visibly away from the EM fixed point."""
    d = psm.simulate(num_points=300, num_features=3, num_components=3, num_obs=30_000,
                     atom_norm=2.0, seed=0)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, max_iter=3000,
                     accelerate=False)
    assert fit.converged
    h = np.asarray(fit.history)
    rates = np.diff(h)[-5:] / np.diff(h)[-6:-1]
    assert rates.min() > 0.95  # it is a slow problem
    w = d.counts[:, None] * fit.responsibilities()
    assert torch.allclose(fit.weights, w.sum(0) / d.counts.sum(), atol=1e-7)
    # SQUAREM cuts the iterations; its stopping rule keeps the slow rate of earlier cycles (the
    # increments right after an extrapolation decay fast), so it stops as close to the limit.
    ref = psm.fit_em(d.features, counts=d.counts, num_components=3, init=fit, max_iter=20_000,
                     tol=1e-15, accelerate=False)
    fast = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, max_iter=3000)
    assert fast.converged and fast.n_iter < fit.n_iter / 3
    for f in (fit, fast):
        assert 0 <= ref.loglik - f.loglik <= 3e-10 * abs(ref.loglik)


def test_a_converged_start_stops_although_its_gains_are_rounding_noise():
    """K = 1: every raced start reaches the optimum, so the final run starts there and its gains
    rise and fall at rounding level. The stopping rule must read that as a stationary point (on
    these seeds the run used to go on to max_iter and warn)."""
    d = psm.simulate(num_points=200, num_features=3, num_components=1, num_obs=20_000, seed=0)
    for seed in (1, 3, 25):
        with warnings.catch_warnings():
            warnings.simplefilter("error", psm.ConvergenceWarning)
            fit = psm.fit_em(d.features, counts=d.counts, num_components=1, seed=seed)
        assert fit.converged and fit.n_iter <= 10


def test_progress_bar_is_shown_on_request_and_off_otherwise(capsys):
    d = simulated()
    psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "EM starts:" in err and "EM:" in err and "/1000" in err
    psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)  # stderr is not a tty
    assert capsys.readouterr().err == ""


def test_not_converged_warns():
    d = simulated()
    with pytest.warns(psm.ConvergenceWarning, match="did not converge in max_iter=2"):
        fit = psm.fit_em(d.features, counts=d.counts, num_components=3, max_iter=2, seed=0,
                         init="random")
    assert not fit.converged and fit.n_iter == 2 and len(fit.history) == 3
    # Under "auto" the race is not counted in n_iter (its label says what it spent).
    with pytest.warns(psm.ConvergenceWarning):
        auto = psm.fit_em(d.features, counts=d.counts, num_components=3, max_iter=2, seed=0)
    assert auto.n_iter == 2 and np.all(np.diff(auto.history) >= 0)


def test_stopping_rule_does_not_stop_at_a_stall():
    assert remaining_gap([1e-3, 1e-12]) < 1e-11  # fast geometric decay: converged
    assert remaining_gap([1e-14, 1e-13]) == math.inf  # growing gains: leaving a saddle
    assert remaining_gap([1e-6, 0.99e-6]) > 90 * 0.99e-6  # slow rate: far from converged
    # A stall built into EM: two atoms start almost equal, EM first heads for the symmetric
    # saddle (increments fall to ~3e-10 relative) and then escapes it (they grow again); a
    # relative-change rule with tolerance 1e-9 stops at the saddle.
    d = psm.simulate(num_points=2000, num_features=2, num_components=2, num_obs=100_000,
                     atom_norm=2.0, seed=4, dtype=torch.float64)
    ref = psm.fit_em(d.features, d.counts, num_components=2,
                     init={"weights": d.weights, "atoms": d.atoms})
    mean = d.atoms.mean(0)
    start = {"weights": d.weights,
             "atoms": torch.stack([mean, mean + torch.tensor([1e-4, 3e-5], dtype=torch.float64)])}
    fit = psm.fit_em(d.features, d.counts, num_components=2, init=start, max_iter=3000)
    h = torch.tensor(fit.history)
    rel = (h[1:] - h[:-1]).abs() / h[0].abs()
    assert float(rel[:5].min()) <= 1e-9  # where a relative-change rule stops
    assert abs(fit.loglik - ref.loglik) <= 1e-9 * abs(ref.loglik)


def test_divergence_is_reported_and_the_prior_fixes_it():
    x, counts = outlier_data()
    start = {"weights": torch.tensor([0.85, 0.15], dtype=torch.float64),
             "atoms": torch.tensor([[0.5, -0.5], [2.0, 2.0]], dtype=torch.float64)}
    for accelerate in (False, True):
        # the warning names both remedies: other starts (init= near the expected atoms) and a prior
        with pytest.warns(psm.DivergenceWarning, match="init= with atoms near.*prior_scale"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", psm.ConvergenceWarning)
                fit = psm.fit_em(x, counts, num_components=2, init=start, max_iter=300,
                                 accelerate=accelerate)
        assert fit.diverging == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        map_fit = psm.fit_em(x, counts, num_components=2, init=start, prior_scale=2.0)
    assert map_fit.diverging == () and map_fit.converged
    assert float(map_fit.atoms.norm(dim=1).max()) < 20


def test_divergence_along_a_ridge_is_reported_after_the_growth_has_stopped():
    """On a ridge towards a face of the design (a component spreading its mass over a few
    support points), Newton steps can carry an atom far out while the objective's last digits
    settle, then stop moving it: growth over the whole final flat stretch is what counts."""
    probs = torch.full((50, 2), 0.02, dtype=torch.float64)  # no point mass anywhere
    obj = -4e5 + torch.tensor([-500.0, -80.0, -0.34, -0.2, -0.1, -0.01, 0.0, 0.0, 0.0, 0.0])
    history = obj.tolist()
    far = [1.0, 120.0, 323.0, 400.0, 450.0, 490.0, 494.0, 494.0, 494.0, 494.0]
    norms = [[3.0, v] for v in far]
    assert find_diverging(norms, history, probs) == (1,)
    # The same growth but while the objective still rose by 80 nats (2e-4 relative): a
    # regular approach to a finite maximum, not a ridge.
    early = [[3.0, v] for v in [1.0, 120.0] + [494.0] * 8]
    assert find_diverging(early, history, probs) == ()
    # Growth of 5% within the flat stretch is not enough.
    small = [[3.0, v] for v in [1.0, 120.0, 470.0, 480.0, 490.0] + [494.0] * 5]
    assert find_diverging(small, history, probs) == ()
    # Nor is a short atom's growth (below the norm at which a component can saturate).
    short = [[3.0, v / 100] for v in far]
    assert find_diverging(short, history, probs) == ()


def test_default_tolerance_is_one_per_dtype_for_every_method(monkeypatch):
    """EM, the race, the Pyro EM object and the mixtures of experts all stop by the one rule,
    at default_tol(dtype) when no tol is given."""
    import pyro_softmix.stopping as stopping

    assert stopping.default_tol(torch.float64) == 1e-10
    assert stopping.default_tol(torch.float32) == 1e-9
    made = []

    class Recording(stopping.StoppingRule):
        def __init__(self, tol, **kwargs):
            made.append(tol)
            super().__init__(tol, **kwargs)

    for module in ("accelerate", "_race", "infer", "moe_em"):
        monkeypatch.setattr(f"pyro_softmix.{module}.StoppingRule", Recording)
    d = simulated(p=200, L=2, K=2, N=5000, seed=1)
    m = psm.simulate_moe(num_obs=300, num_experts=2, seed=0)
    for dtype in (torch.float64, torch.float32):
        tol = stopping.default_tol(dtype)
        made.clear()
        psm.fit_em(d.features.to(dtype), counts=d.counts, num_components=2, seed=0)
        from pyro_softmix.warmstart import RACE_HANDOVER

        assert set(made) == {RACE_HANDOVER, tol}  # the race hands over at its own threshold
        made.clear()
        psm.MixtureOfExperts(2).fit(m.x.to(dtype), m.y.to(dtype), seed=0, num_inits=1)
        assert made == [tol]
        made.clear()
        em = psm.EM(psm.SoftmaxMixtureModel(d.features.to(dtype), 2).model, seed=0)
        em.step(counts=d.counts)
        assert em.converged in (True, False) and made[-1] == tol


def test_stopping_rule_reads_monotone_and_gradient_runs_differently():
    from pyro_softmix.stopping import NOISE_GAIN, StoppingRule

    obj = -1e4
    limit = 1e-10 * abs(obj)
    monotone = StoppingRule(1e-10)
    monotone.record([1e-3, 1e-4])  # geometric at rate 0.1: remaining ~ 1.1e-4 > limit
    assert not monotone.converged(obj)
    monotone.record(0.5 * NOISE_GAIN * limit)  # a gain at rounding level: stationary
    assert monotone.gap(obj) == 0.0 and monotone.converged(obj)
    gradient = StoppingRule(1e-10, monotone=False)
    gradient.record([1e-3, -1e-9])  # an overshoot is not convergence
    assert not gradient.converged(obj)
    gradient.record([1e-9, 1e-12])  # rate 1e-3: remaining ~ 1e-12 <= limit
    assert gradient.converged(obj)
    # A cycle's rate is a lower bound for later cycles (RATE_WINDOW of them), also after reset.
    cycles = StoppingRule(1e-10)
    cycles.record([1.0, 0.99], cycle=True)
    cycles.record([1e-3, 1e-5], cycle=True)  # fast decay right after an extrapolation
    assert cycles.gap(obj) == pytest.approx(1e-5 / (1 - 0.99))
    cycles.reset()
    assert not cycles.gains and cycles.rate == pytest.approx(0.99)
    assert cycles.bound(0.995) == math.inf  # no gains: nothing known
    cycles.record([2e-6, 1e-6])
    assert cycles.bound(0.995) == pytest.approx(1e-6 / 0.005)


def _far_start(d, norm, seed, k=3):
    design = psm.standardize(d.features)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, design.rank, generator=g, dtype=torch.float64)
    atoms = design.atoms_from_z(norm * dirs / dirs.norm(dim=1, keepdim=True))
    return {"weights": torch.full((k,), 1 / k, dtype=torch.float64), "atoms": atoms}


@pytest.mark.parametrize("accelerate", [True, False])
def test_a_start_far_from_the_data_is_repaired_and_never_falsely_converges(accelerate):
    """Atoms of norm 300 (standardised): every softmax sits on one point, EM's Newton steps
    vanish there, and the stopping rule used to declare convergence after 3-5 updates at a
    log-likelihood 100 times worse than a one-component fit's."""
    from pyro_softmix.engine import prepare
    from pyro_softmix.stopping import GRADIENT_TOL

    d = psm.simulate(num_points=2000, num_features=5, num_components=3, num_obs=5000, seed=0)
    one = psm.fit_em(d.features, counts=d.counts, num_components=1, seed=0)
    best = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    with pytest.warns(psm.StartWarning, match="far from the data"):
        fit = psm.fit_em(d.features, counts=d.counts, num_components=3,
                         init=_far_start(d, 300.0, 0), accelerate=accelerate)
    assert fit.converged and fit.init.startswith("given (moved toward")
    assert fit.loglik > one.loglik
    assert fit.loglik >= best.loglik - 1e-6 * abs(best.loglik)
    setup = prepare(d.features, d.counts, None, None, 3, None, None, None)
    atoms_z = setup.design.atoms_to_z(fit.atoms)
    assert setup.problem.relative_gradient(atoms_z, fit.weights.log()) <= GRADIENT_TOL


def test_the_gradient_check_of_a_float32_fit_sums_in_float64():
    """The convergence check's gradient at one point, from a float32 and a float64 problem on
    the same (float32) design, agrees to 1e-6 of N at p = 200,000. Summed in float32 the two
    differed by 1.3e-4, and on GloVe (p = 400,000) the rounding alone, 1e-3, failed the check
    at an optimum."""
    from pyro_softmix.engine import prepare

    p = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p, 5, generator=g, dtype=torch.float64).float()
    counts = torch.poisson(torch.full((p,), 1e9 / p, dtype=torch.float64), generator=g)
    atoms = torch.randn(2, 5, generator=g, dtype=torch.float64)
    values = []
    for dtype in (torch.float32, torch.float64):
        setup = prepare(x.to(dtype), counts, None, None, 2, None, None, None)
        atoms_z = setup.design.atoms_to_z(atoms.to(dtype)).float().to(dtype)
        log_w = torch.tensor([0.3, 0.7], dtype=dtype).log()
        values.append(setup.problem.relative_gradient(atoms_z, log_w))
    assert values[1] > 0.1  # far from a stationary point: a gradient of order 1 per draw
    assert abs(values[0] - values[1]) <= 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_random_far_starts_never_report_convergence_at_a_nonzero_gradient(seed):
    from pyro_softmix.engine import prepare
    from pyro_softmix.stopping import GRADIENT_TOL

    d = psm.simulate(num_points=800, num_features=4, num_components=3, num_obs=20_000,
                     atom_norm=2.0, seed=10 + seed)
    one = psm.fit_em(d.features, counts=d.counts, num_components=1, seed=0).loglik
    norm = [30.0, 60.0, 120.0, 250.0, 500.0][seed]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = psm.fit_em(d.features, counts=d.counts, num_components=3,
                         init=_far_start(d, norm, seed), max_iter=300)
    setup = prepare(d.features, d.counts, None, None, 3, None, None, None)
    gradient = setup.problem.relative_gradient(setup.design.atoms_to_z(fit.atoms),
                                               fit.weights.log())
    if fit.converged:
        assert gradient <= GRADIENT_TOL and fit.loglik >= one - 1e-10 * abs(one)


def test_a_fooled_stopping_rule_cannot_report_convergence(monkeypatch):
    """The final checks do not trust the stopping rule: with a rule that says "converged" at
    once, a fit from a poor start reports converged=False and says why."""
    import pyro_softmix.accelerate as accelerate

    class Fooled(accelerate.StoppingRule):
        def converged(self, objective):
            return True

    monkeypatch.setattr(accelerate, "StoppingRule", Fooled)
    d = psm.simulate(num_points=500, num_features=3, num_components=2, num_obs=20_000, seed=3)
    start = {"weights": d.weights, "atoms": 0.05 * d.atoms}  # valid, but far from the MLE
    with pytest.warns(psm.ConvergenceWarning,
                      match="not at a maximum.*gradient is not zero.*continue with init=fit"):
        fit = psm.fit_em(d.features, counts=d.counts, num_components=2, init=start)
    assert not fit.converged and fit.n_iter == 2


def _vertex_data(seed, vertices, p=300, L=3, k=3):
    from scipy.spatial import ConvexHull

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, L, generator=g, dtype=torch.float64)
    hull = torch.from_numpy(ConvexHull(x.numpy()).vertices)
    chosen = hull[torch.randperm(hull.shape[0], generator=g)[:vertices]]
    counts = torch.zeros(p, dtype=torch.float64)
    counts[chosen] = torch.randint(50, 500, (vertices,), generator=g).double()
    return x, counts


@pytest.mark.parametrize("vertices", [1, 3])
def test_atoms_at_infinity_are_reported_when_the_counts_sit_on_hull_vertices(vertices):
    """With all draws on 1 or K vertices of the design's convex hull, every atom goes to
    infinity (the likelihood's supremum is not attained): all are reported, on 10 designs,
    also where the race carried them out before the final run began."""
    for seed in range(10):
        x, counts = _vertex_data(seed, vertices)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # EM may also run out of iterations on the ridge
            fit = psm.fit_em(x, counts=counts, num_components=3, seed=seed)
        assert any(w.category is psm.DivergenceWarning and "prior_scale=" in str(w.message)
                   for w in caught)
        assert fit.diverging == (0, 1, 2), (seed, fit.diverging)
        assert fit.loglik <= 0.0  # a log-likelihood, despite rounding near 0


def test_a_nan_or_inf_anywhere_ends_the_fit_with_a_named_error(monkeypatch):
    """Counts beyond float32's range used to end in a bare StopIteration; a NaN objective was
    never detected. Now: a ValueError before any work, or NumericalError (a ValueError) as
    soon as the objective, a gradient or a Hessian is not finite."""
    import pyro_softmix.accelerate as accelerate
    import pyro_softmix.engine as engine

    d = psm.simulate(num_points=300, num_features=3, num_components=2, num_obs=20_000, seed=1)
    with pytest.raises(ValueError, match="counts sum to .* torch.float32"):
        psm.fit_em(d.features.float(), counts=d.counts.double() * 1e37, num_components=2)
    calls = []
    e_step = engine.EMProblem.e_step

    def poisoned(self, *args):
        loglik, w = e_step(self, *args)
        calls.append(1)
        return (loglik * math.nan, w) if len(calls) >= 12 else (loglik, w)  # from then on

    monkeypatch.setattr(engine.EMProblem, "e_step", poisoned)
    for init in ("random", "auto"):  # in the final run, and in the race
        calls.clear()
        with pytest.raises(psm.NumericalError, match="became nan"):
            psm.fit_em(d.features, counts=d.counts, num_components=2, init=init, seed=0,
                       num_inits=None if init == "random" else 2)
    monkeypatch.undo()
    gradient = accelerate.marginal_gradient
    monkeypatch.setattr(accelerate, "marginal_gradient", lambda *a: (
        gradient(*a)[0] * math.inf, gradient(*a)[1]))
    with pytest.raises(psm.NumericalError, match="gradient of the Newton finish"):
        psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    assert issubclass(psm.NumericalError, ValueError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_counts_on_a_hull_vertex_give_a_log_likelihood_of_at_most_zero(dtype):
    from scipy.spatial import ConvexHull

    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(200)
    counts[int(ConvexHull(x.numpy()).vertices[0])] = 1000
    with pytest.warns(psm.DivergenceWarning):
        fit = psm.fit_em(x, counts=counts, num_components=3, seed=0, dtype=dtype)
    assert fit.loglik <= 0 and max(fit.history) <= 0  # log pi_j <= 0 whatever the rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_components_that_coincide_say_num_components_is_too_large(dtype):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(200)
    counts[int(x.norm(dim=1).argmin())] = 1000  # one interior point: one component suffices
    with pytest.warns(psm.IdentifiabilityWarning, match=r"coincide \(\[0, 1, 2\]\).* 1 distinct"):
        fit = psm.fit_em(x, counts=counts, num_components=3, seed=0, dtype=dtype)
    assert fit.converged  # at the one-component fit's value, up to the dtype's rounding
    single = psm.fit_em(x, counts=counts, num_components=1, dtype=dtype)
    assert fit.loglik == pytest.approx(single.loglik, rel=1e-6)


def test_distinct_components_raise_no_coincidence_warning():
    data = psm.simulate(num_points=400, num_features=3, num_components=3, num_obs=20_000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", psm.IdentifiabilityWarning)
        psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0)


def test_points_below_the_resolved_mass_do_not_count_in_the_face_test():
    """A component on the edge of a square (two corners, half its mass each) is on a face of
    the hull; a leak of 1e-11 onto the centre, above ACTIVE_MASS but below what the stopping
    rule resolves (``floor``), does not take it off the face; a leak above the floor does."""
    from pyro_softmix.stopping import ACTIVE_MASS, on_a_face

    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    assert on_a_face(z, probs)
    leak = probs.clone()
    leak[4] = 1e-11
    assert leak[4] >= ACTIVE_MASS * leak.max()
    assert not on_a_face(z, leak)  # the centre is not on the edge's face
    assert on_a_face(z, leak, floor=1e-9)
    assert not on_a_face(z, leak, floor=1e-12)
    corners = torch.tensor([0.6, 0.0, 0.0, 0.4, 0.0])  # a diagonal: no face holds both
    assert not on_a_face(z, corners, floor=1e-9)
    assert on_a_face(z, corners, floor=0.5)  # one point is a face
    assert on_a_face(z, corners * 0.5, floor=0.9)  # a floor above all: the largest point stays
