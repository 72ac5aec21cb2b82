# SPDX-License-Identifier: Apache-2.0
"""Splits, the start grown by splits, the moves away from an atom at infinity,
the one-component start at K = 1, the float64 twin of a float32 problem (the Newton finish's),
and the trust region of the softmax regression."""

import math
import warnings

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import _moves, accelerate, engine, stopping, warmstart
from pyro_softmix._split import merge_and_split, pull_back, split_component, split_scores
from pyro_softmix.engine import prepare
from pyro_softmix.warmstart import grown_start, one_component_fit, tempered_grown_start


@pytest.fixture(scope="module")
def three():
    return psm.simulate(num_points=400, num_features=4, num_components=3, num_obs=50_000,
                        atom_norm=3.0, seed=3, dtype=torch.float64)


def _setup(data, k, dtype=torch.float64):
    return prepare(data.features, data.counts, None, None, k, dtype, None, None)


def test_split_component_follows_the_brute_force_residual_direction(three):
    setup = _setup(three, 1)
    z = setup.z
    centre, _ = one_component_fit(setup)
    st = setup.problem.start(centre[None], centre.new_zeros(1))
    log_q = st.logits - st.lse
    atoms, weights = split_component(z, st.w, log_q, centre[None], torch.ones(1, dtype=z.dtype), 0)
    # Brute force: R = sum_j (s_j - q_j)(z_j - m)(z_j - m)^T with numpy loops.
    zn, q = z.numpy(), log_q[:, 0].exp().numpy()
    s = (st.w[:, 0] / st.w[:, 0].sum()).numpy()
    m = q @ zn
    resid = sum((s[j] - q[j]) * np.outer(zn[j] - m, zn[j] - m) for j in range(zn.shape[0]))
    vals, vecs = np.linalg.eigh(resid)
    u = vecs[:, -1]
    var = float(q @ (zn @ u - q @ (zn @ u)) ** 2)
    delta = min(max(math.sqrt(vals[-1]) / var, 0.1), 4.0)
    step = (atoms[0] - centre).numpy()
    assert abs(abs(step @ u) - delta) < 1e-8 * delta
    assert np.allclose(atoms[1].numpy(), centre.numpy() - step, atol=1e-12)
    assert weights.tolist() == [0.5, 0.5]


def test_merge_and_split_merges_into_the_closest_component_and_splits_the_worst(three):
    setup = _setup(three, 3)
    problem, z = setup.problem, setup.z
    gen = torch.Generator().manual_seed(1)
    atoms = 2 * torch.randn(3, z.shape[1], generator=gen, dtype=z.dtype)
    log_w = torch.tensor([0.2, 0.5, 0.3], dtype=z.dtype).log()
    st = problem.start(atoms, log_w)
    seen = problem.counts64 > 0
    r = (st.w[seen] / problem.counts64[seen, None]).numpy()  # the posteriors where n_j > 0
    n = problem.counts64[seen].numpy()
    for k in range(3):
        cos = {m: sum(n * r[:, k] * r[:, m]) / math.sqrt(sum(n * r[:, k] ** 2) * sum(n * r[:, m] ** 2))
               for m in range(3) if m != k}
        partner = max(cos, key=cos.get)
        keep = [m for m in range(3) if m != k]
        merged_w = log_w.exp().clone()
        merged_w[partner] += merged_w[k]
        small = problem.with_starts(1, 2).start(atoms[keep], merged_w[keep].log())
        log_q = small.logits - small.lse
        worst = int(split_scores(small.w, log_q).argmax())
        want_atoms, want_w = split_component(z, small.w, log_q, atoms[keep], merged_w[keep], worst)
        got_atoms, got_log_w, move = merge_and_split(problem, problem.start(atoms, log_w), k)
        assert torch.allclose(got_atoms, want_atoms, atol=1e-12)
        assert torch.allclose(got_log_w.exp(), want_w, atol=1e-14)
        assert float(got_log_w.exp().sum()) == pytest.approx(1.0, abs=1e-14)
        assert move == (f"component {k} at infinity merged into {partner}, component "
                        f"{keep[worst]} split in two")


def test_pull_back_shortens_one_atom_to_the_longest_other(three):
    setup = _setup(three, 3)
    atoms = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [30.0, 40.0, 0, 0]], dtype=setup.z.dtype)
    log_w = torch.tensor([0.2, 0.5, 0.3], dtype=setup.z.dtype).log()
    st = setup.problem.start(atoms, log_w)
    got, got_log_w, move = pull_back(setup.problem, st, 2)
    assert torch.allclose(got[2], torch.tensor([1.2, 1.6, 0, 0], dtype=got.dtype), atol=1e-14)
    assert torch.equal(got[:2], atoms[:2]) and torch.equal(got_log_w, log_w)
    assert move == "component 2 at infinity pulled back" and atoms[2, 0] == 30  # not modified


def _unchanged(problem, st, k):
    return st.atoms.clone(), st.log_weights.clone(), "none"


def _vertex_start(seed):
    """Simulated data, the true atoms with atom 0 put 60 standard units out toward the hull
    vertex with the most draws, and the fit from the truth."""
    from scipy.spatial import ConvexHull

    d = psm.simulate(num_points=400, num_features=3, num_components=3, num_obs=100_000,
                     atom_norm=5.0, seed=seed, dtype=torch.float64)
    x = d.features
    hull = torch.as_tensor(ConvexHull(x.numpy()).vertices)
    vertex = x[int(hull[d.counts[hull].argmax()])] - x.mean(0)
    atoms = d.atoms.clone()
    atoms[0] = 60 * vertex / vertex.norm()
    ref = psm.fit_em(x, counts=d.counts, num_components=3, init={"weights": d.weights,
                                                                  "atoms": d.atoms})
    return d, atoms, ref


@pytest.mark.parametrize("seed", [0, 3, 5])
@pytest.mark.parametrize("move", ["merged into", "pulled back"])
def test_a_component_left_at_infinity_is_moved_back_to_the_optimum(seed, move, monkeypatch):
    """A start with one atom far out toward the hull vertex with the most draws: its component
    holds that point alone and EM pushes it out forever (a spurious optimum at infinity, far
    below the MLE). Either move alone (the other handing its start back unchanged) brings the
    fit back to the optimum EM reaches from the truth; with neither, it stays out."""
    d, atoms, ref = _vertex_start(seed)
    x = d.features
    start = {"weights": d.weights, "atoms": atoms}
    monkeypatch.setattr(_moves, "pull_back" if move == "merged into" else "merge_and_split",
                        _unchanged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = psm.fit_em(x, counts=d.counts, num_components=3, init=start)
    assert fit.converged and fit.diverging == ()
    assert f"at infinity {move}" in fit.init
    assert abs(fit.loglik - ref.loglik) <= 1e-9 * abs(ref.loglik)
    monkeypatch.setattr(_moves, "pull_back", _unchanged)
    monkeypatch.setattr(_moves, "merge_and_split", _unchanged)
    with pytest.warns(psm.DivergenceWarning):
        stuck = psm.fit_em(x, counts=d.counts, num_components=3, init=start)
    assert stuck.diverging == (0,) and stuck.loglik < ref.loglik - 100


def test_a_run_that_no_move_lifts_gets_the_fallback_start_once(monkeypatch):
    """The vertex start above with both moves handing their start back unchanged: its run ends
    with the atom at infinity, and ``finish`` asks its fallback (here the truth) for one more
    start, once, and keeps its run, at the optimum EM reaches from the truth."""
    d, atoms, ref = _vertex_start(0)
    x = d.features
    monkeypatch.setattr(_moves, "pull_back", _unchanged)
    monkeypatch.setattr(_moves, "merge_and_split", _unchanged)
    setup = prepare(x, d.counts, None, None, 3, torch.float64, None, None)
    truth = (setup.design.atoms_to_z(d.atoms), d.weights.log())
    asked, runs, real = [], [], _moves.run
    monkeypatch.setattr(_moves, "run", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    done = _moves.finish(setup.problem, setup.design.atoms_to_z(atoms)[None], d.weights.log()[None],
                         1000, 1e-10, fallback=lambda: asked.append(1) or (*truth, "the truth"))
    assert asked == [1]  # once, though the two moves were both tried
    assert done.moves == ("the truth",) and done.converged and done.diverging == ()
    assert abs(done.history[-1] - ref.loglik) <= 1e-9 * abs(ref.loglik)
    ridge = runs[0]  # the vertex start's own run, with its atom at infinity
    assert ridge.diverging == (0,) and ridge.history[-1] < ref.loglik - 100
    without = _moves.finish(setup.problem, setup.design.atoms_to_z(atoms)[None],
                            d.weights.log()[None], 1000, 1e-10)
    assert without.diverging == (0,) and not without.moves


def test_a_run_on_a_ridge_stops_once_its_bound_is_below_a_finished_runs_end(three, monkeypatch):
    """``finish``'s decisions, with EM replaced by scripted runs (tagged by their atoms): the
    second start, seen on a ridge after every cycle t with objective -50 + t / 10, estimated
    to reach objective + 100 / t in its budget of updates (and the stopping rule's bound
    infinite), tries both moves and the fallback at its first cycle only, goes on at t = 2
    (0.2, above the first start's end, -10) and stops at t = 3 (-16.4); the first start's run
    is kept."""
    problem = _setup(three, 3).problem
    tags, cycles = [], []

    def scripted(prob, atoms, log_w, max_iter, tol, bar, accelerate, on_update, on_ridge):
        tag = int(atoms[0, 0])
        tags.append(tag)
        history = {1: [-20.0, -10.0], 3: [-60.0, -55.0], 4: [-60.0, -30.0]}.get(tag, [-60.0])
        st = prob.start(atoms, log_w)
        for t in range(1, 50 if tag == 2 else 0):
            history.append(-50 + t / 10)
            cycles.append(t)
            if on_ridge(st, (0,), history[-1], math.inf, history[-1] + 100 / t):
                break
        return _run_of(st, history)

    def _run_of(st, history):
        return accelerate.Run(st, history, [[1.0] * 3] * len(history), True, 0.0)

    def tagged(tag):
        return torch.full((3, problem.z.shape[1]), float(tag), dtype=torch.float64)

    monkeypatch.setattr(_moves, "run", scripted)
    monkeypatch.setattr(_moves, "atoms_at_infinity", lambda *a: ())
    for name in ("merge_and_split", "pull_back"):
        monkeypatch.setattr(_moves, name, lambda prob, st, k, name=name: (tagged(3), st.log_weights, name))
    log_w = torch.full((2, 3), -math.log(3), dtype=torch.float64)
    done = _moves.finish(problem, torch.stack([tagged(1), tagged(2)]), log_w, 100, 1e-10,
                         fallback=lambda: (tagged(4), log_w[0], "fallback"))
    assert tags == [1, 2, 3, 3, 4] and cycles == [1, 2, 3]
    assert done.history == [-20.0, -10.0] and done.moves == ()


@pytest.mark.parametrize("moved_end, within_gain, stops_at, asked", [
    (-40.0, lambda t: 100 / t, 12, False),  # caught up with: stopped at t = 12, no fallback
    (-47.0, lambda t: 100.0, 49, True),  # never caught up with: ends above, then the fallback
])
def test_a_move_that_lifts_a_run_on_a_ridge_defers_the_fallback_to_its_end(
        three, monkeypatch, moved_end, within_gain, stops_at, asked):
    """One start, seen on a ridge after every cycle t with objective -50 + t / 10 (and an
    infinite stopping-rule bound): both moves end at ``moved_end``, above its objective then
    (-49.9) but not above its bound, so the fallback is not run at that first cycle. The run
    goes on; it stops at the first t where its estimate in its budget, objective +
    ``within_gain(t)``, falls below the moves' end, and then the moves' run is kept and the
    fallback is never asked. Where it ends on its ridge above them (-45.1) the fallback is
    asked then, and its run (-30) is kept."""
    problem = _setup(three, 3).problem
    tags, cycles = [], []

    def scripted(prob, atoms, log_w, max_iter, tol, bar, fast, on_update, on_ridge):
        tag = int(atoms[0, 0])
        tags.append(tag)
        history = {3: [-60.0, moved_end], 4: [-60.0, -30.0]}.get(tag, [-60.0])
        st = prob.start(atoms, log_w)
        for t in range(1, 50 if tag == 2 else 0):
            history.append(-50 + t / 10)
            cycles.append(t)
            if on_ridge(st, (0,), history[-1], math.inf, history[-1] + within_gain(t)):
                break
        return accelerate.Run(st, history, [[1.0] * 3] * len(history), True, 0.0)

    def tagged(tag):
        return torch.full((3, problem.z.shape[1]), float(tag), dtype=torch.float64)

    monkeypatch.setattr(_moves, "run", scripted)
    monkeypatch.setattr(_moves, "atoms_at_infinity", lambda prob, st, *a: (0,) if st.atoms[0, 0] == 2 else ())
    for name in ("merge_and_split", "pull_back"):
        monkeypatch.setattr(_moves, name, lambda prob, st, k, name=name: (tagged(3), st.log_weights, name))
    log_w = torch.full((1, 3), -math.log(3), dtype=torch.float64)
    done = _moves.finish(problem, tagged(2)[None], log_w, 100, 1e-10,
                         fallback=lambda: (tagged(4), log_w[0], "fallback"))
    assert tags == [2, 3, 3] + [4] * asked and cycles == list(range(1, stops_at + 1))
    if asked:
        assert done.history == [-60.0, -30.0] and done.moves == ("fallback",)
    else:
        assert done.history == [-60.0, moved_end] and done.moves == ("merge_and_split",)


def test_a_run_passes_on_the_bound_within_its_budget(monkeypatch):
    """``run`` gives ``on_ridge`` the objective plus the smaller of the stopping rule's gap and
    :func:`~pyro_softmix.stopping.budget_gain` of its history and the updates left."""
    from scipy.spatial import ConvexHull

    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.ones(200, dtype=torch.float64)
    vertices = ConvexHull(x.numpy()).vertices
    counts[int(vertices[0])], counts[int(vertices[1])] = 1000.0, 300.0  # atoms go out to them
    problem = prepare(x, counts, None, None, 2, torch.float64, None, None).problem
    asked, seen, history = [], [], []
    monkeypatch.setattr(accelerate, "budget_gain",
                        lambda h, left: asked.append((len(h) - 1, left)) or 0.125)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    accelerate.run(problem, z, torch.full((2,), -math.log(2), dtype=torch.float64), 100, 1e-10,
                   on_update=lambda st, h: history.append(len(h) - 1),
                   on_ridge=lambda st, ridge, obj, bound, within: seen.append(
                       (bound - obj, within - obj)) and False)
    assert seen and seen[0][1] == 0.125 < seen[0][0]  # the rule's gap is larger there
    assert all(left == 100 - it for it, left in asked) and asked[0][0] in history


def test_budget_gain_extrapolates_the_mean_rate_of_the_last_updates():
    history = [float(v) for v in range(-100, 0, 2)]  # gains of 2 per update
    assert stopping.budget_gain(history, 10) == pytest.approx(20.0)
    history[-stopping.BUDGET_WINDOW - 1] = history[-1] - 5.0  # 5 over the window
    assert stopping.budget_gain(history, 40) == pytest.approx(40 * 5.0 / stopping.BUDGET_WINDOW)
    assert stopping.budget_gain([-3.0, -1.0, -2.0], 7) == pytest.approx(7 * 0.5)  # window 2
    assert stopping.budget_gain([-1.0, -2.0], 7) == 0.0  # fell: no gain
    assert stopping.budget_gain([-1.0], 7) == math.inf  # no update yet


def test_split_scores_are_weighted_kl_divergences():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(30, 3, generator=gen, dtype=torch.float64)
    log_q = torch.log_softmax(torch.randn(30, 3, generator=gen, dtype=torch.float64), 0)
    for k, score in enumerate(split_scores(w, log_q).tolist()):
        total = float(w[:, k].sum())
        kl = sum(float(w[j, k] / total * (torch.log(w[j, k] / total) - log_q[j, k]))
                 for j in range(30))
        assert score == pytest.approx(total * kl, rel=1e-12)


def test_grown_start_reaches_the_raced_optimum(three):
    setup = _setup(three, 3)
    centre, _ = one_component_fit(setup)
    atoms, log_w, spent = grown_start(setup.problem, centre, 1000)
    assert atoms.shape == (3, 4) and 0 < spent <= 2 * warmstart.GROWN_MAX_ITER
    assert float(log_w.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    grown = psm.fit_em(three.features, three.counts, num_components=3,
                       init={"weights": log_w.exp(), "atoms": setup.design.atoms_from_z(atoms)})
    raced = psm.fit_em(three.features, three.counts, num_components=3, seed=0, num_inits=8)
    # The same optimum: the log-likelihood to 1e-10, and the atoms far within one standard
    # error of each other (distinct optima of these data differ by a sizeable fraction of one).
    assert grown.converged and grown.loglik == pytest.approx(raced.loglik, rel=1e-10)
    perm = torch.cdist(grown.atoms, raced.atoms).argmin(1)
    assert sorted(perm.tolist()) == [0, 1, 2]
    se = raced.standard_errors(counts=three.counts)["atoms"]
    assert float(((grown.atoms - raced.atoms[perm]).abs() / se[perm]).max()) < 0.01


def test_the_auto_race_includes_the_grown_start(three, monkeypatch):
    seen = {}
    original = warmstart.race

    def spy(problem, atoms, log_w, *args, **kwargs):
        seen["atoms"], seen["log_w"] = atoms.clone(), log_w.clone()
        return original(problem, atoms, log_w, *args, **kwargs)

    monkeypatch.setattr(warmstart, "race", spy)
    psm.fit_em(three.features, three.counts, num_components=3, seed=0)
    setup = _setup(three, 3)
    grown, grown_w, _ = grown_start(setup.problem, one_component_fit(setup)[0], 1000)
    assert seen["atoms"].shape[0] == warmstart.AUTO_NUM_INITS
    assert torch.allclose(seen["atoms"][-1], grown, atol=1e-10)
    assert torch.allclose(seen["log_w"][-1], grown_w, atol=1e-10)
    # The random starts are not the grown one.
    assert (seen["atoms"][0] - grown).abs().max() > 0.1


@pytest.mark.parametrize("gamma", [0.5, 0.3])
def test_tempered_start_undoes_the_power(gamma, monkeypatch):
    # Counts proportional to one softmax with an offset b: their power gamma is proportional to
    # the softmax of gamma (X theta + b), so the tempered one-component fit, divided by gamma,
    # is the fit to the counts themselves. (A start that kept the offset b, or did not divide
    # by gamma, would be off by O(1).)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(300, generator=gen, dtype=torch.float64)
    counts = 1e6 * torch.softmax(x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64) + b, 0)
    setup = prepare(x, counts, None, None, 1, None, None, None, None, b)
    centre, _ = one_component_fit(setup)
    monkeypatch.setattr(warmstart, "GROWN_TOL", 1e-14)  # the fit to the tempered counts, exact
    atoms, log_w, spent = tempered_grown_start(setup.problem, torch.zeros_like(centre), 100,
                                               gamma)
    assert atoms.shape == (1, 3) and float(log_w[0]) == 0.0 and spent > 0
    assert torch.allclose(atoms[0], centre, atol=1e-6)


def test_tempered_init_races_both_grown_starts(three, monkeypatch):
    seen = {}
    original = warmstart.race

    def spy(problem, atoms, log_w, *args, **kwargs):
        seen["atoms"] = atoms.clone()
        return original(problem, atoms, log_w, *args, **kwargs)

    monkeypatch.setattr(warmstart, "race", spy)
    fit = psm.fit_em(three.features, three.counts, num_components=3, init="tempered", seed=0)
    setup = _setup(three, 3)
    centre = one_component_fit(setup)[0]
    grown = grown_start(setup.problem, centre, 1000)[0]
    tempered = tempered_grown_start(setup.problem, centre, 1000)[0]
    assert seen["atoms"].shape[0] == warmstart.AUTO_NUM_INITS
    assert torch.allclose(seen["atoms"][-1], grown, atol=1e-10)
    assert torch.allclose(seen["atoms"][-2], tempered, atol=1e-10)
    assert (tempered - grown).abs().max() > 0.1 and (seen["atoms"][0] - tempered).abs().max() > 0.1
    assert fit.init.startswith("tempered (race of 4 starts") and fit.converged
    auto = psm.fit_em(three.features, three.counts, num_components=3, seed=0)
    assert fit.loglik == pytest.approx(auto.loglik, rel=1e-10)
    alone = psm.fit_em(three.features, three.counts, num_components=3, init="tempered",
                       num_inits=1)
    assert alone.init.startswith("tempered (grown by splits") and alone.converged
    start = psm.warm_start(three.features, three.counts, num_components=3, method="tempered",
                           seed=0)
    assert start.method == "tempered" and math.isfinite(start.loglik)


def test_one_component_auto_fit_is_the_softmax_regression(three):
    fit = psm.fit_em(three.features, three.counts, num_components=1, seed=0)
    res = psm.fit_softmax_regression(three.features, three.counts.double()[:, None])
    assert fit.init == "auto (the one-component fit)" and fit.converged
    theta = fit.atoms[0].double()
    # Softmax ignores a shift along the null space of the centred design: compare the logits.
    x = three.features.double()
    assert torch.allclose(torch.log_softmax(x @ theta, 0), torch.log_softmax(x @ res.atoms[0], 0),
                          atol=1e-8)


def test_concentrated_data_start_grown_by_splits():
    # All draws on two interior points: the data are more concentrated than the one-component
    # fit, which no random start around it can match.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    order = x.norm(dim=1).argsort()
    counts = torch.zeros(300, dtype=torch.float64)
    counts[order[0]], counts[order[1]] = 600.0, 400.0
    setup = prepare(x, counts, None, None, 2, None, None, None)
    from pyro_softmix.moments import standardised_moments
    mom = standardised_moments(setup.z, setup.problem.counts64, setup.design)
    centre, _ = one_component_fit(setup)
    assert warmstart.calibrated_atoms(mom, 2, 4, torch.Generator().manual_seed(0), centre) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = psm.fit_em(x, counts, num_components=2, seed=0)
    assert fit.init.startswith("auto (grown by splits")
    assert fit.loglik >= one_component_fit(setup)[1] - 1e-9 * abs(fit.loglik)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tempered = psm.fit_em(x, counts, num_components=2, init="tempered", seed=0)
    assert tempered.init.startswith("tempered (race of 2 starts")  # the two grown starts
    assert tempered.loglik >= fit.loglik - 1e-9 * abs(fit.loglik)


def test_float64_twin_of_a_float32_problem(three, monkeypatch):
    x32 = three.features.float()
    setup = prepare(x32, three.counts, None, None, 2, None, None, None)
    problem = setup.problem
    twin = problem.precise()
    assert twin.z.dtype == torch.float64 and problem.precise() is twin
    assert torch.equal(twin.z, problem.z.double()) and torch.equal(twin.counts64, problem.counts64)
    wide = prepare(x32, three.counts, None, None, 2, torch.float64, None, None).problem
    assert wide.precise() is wide
    monkeypatch.setattr(engine, "PRECISE_MAX_BYTES", 0)
    fresh = prepare(x32, three.counts, None, None, 2, None, None, None).problem
    assert fresh.precise() is fresh


def test_float32_fit_reaches_the_float64_optimum_of_its_design(monkeypatch):
    data = psm.simulate(num_points=3000, num_features=6, num_components=2, num_obs=2_000_000,
                        atom_norm=3.0, seed=5)
    x32 = data.features.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f64 = psm.fit_em(x32.double(), data.counts, num_components=2, seed=0)
        dtypes = []
        original = accelerate.newton_finish

        def spy(problem, *args, **kwargs):
            dtypes.append(problem.z.dtype)
            return original(problem, *args, **kwargs)

        monkeypatch.setattr(accelerate, "newton_finish", spy)
        f32 = psm.fit_em(x32, data.counts, num_components=2, seed=0)
    assert f32.converged and f64.converged
    assert f32.atoms.dtype == torch.float32
    assert dtypes and set(dtypes) == {torch.float64}  # float32's finish ran on the twin
    perm = torch.cdist(f32.atoms.double(), f64.atoms).argmin(1)
    scale = float(f64.atoms.norm(dim=1).max())
    assert float((f32.atoms.double() - f64.atoms[perm]).abs().max()) <= 1e-5 * scale
    assert float((f32.weights.double() - f64.weights[perm]).abs().max()) <= 1e-6


def test_a_float32_run_that_em_stops_after_a_newton_phase_is_finished_in_float64(three,
                                                                                 monkeypatch):
    """Where a float32 run's Newton phase ends without converging and EM's rule (float32
    gains) later stops the run, the float64 finish still polishes the last iterate, and the
    run reports EM's gap, not the phase's. Before, the phase's estimate was kept: no polish
    (SmolLM2, K = 4: 0.011 nats below the float64 optimum, 3.5 times the tolerance)."""
    x32 = three.features.float()
    problem = prepare(x32, three.counts, None, None, 3, None, None, None).problem
    assert problem.precise() is not problem
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(3, problem.z.shape[1], generator=gen, dtype=torch.float32)
    start = problem.start(atoms, torch.full((3,), -math.log(3), dtype=torch.float32))
    calls = []

    def failing(prob, st, obj, tol, max_steps):  # a phase that takes no step
        calls.append(obj)
        return st, [], [], False, True, 1e6, obj

    monkeypatch.setattr(accelerate, "_precise_newton", failing)
    done = accelerate.run(problem, start.atoms, start.log_weights, 2000, 1e-9)
    assert done.converged and len(calls) >= 2
    assert calls[-1] == done.history[-1]  # the last call: the finish of EM's last iterate
    assert done.gap <= 1e-9 * abs(done.history[-1])  # EM's estimate, not the phase's 1e6


def test_a_float32_run_goes_on_where_its_float64_finish_gains_more_than_the_tolerance(
        three, monkeypatch):
    """Where EM's rule stops a float32 run too early and the float64 Newton steps after it gain
    more than the tolerance without converging, the run goes on (EM, then those steps again)
    until they converge. Before, it reported convergence, with EM's gap, wherever those steps
    ended (SmolLM2, K = 4: 2.8 nats short, a gradient of 1.5e-3 per token)."""
    x32 = three.features.float()
    problem = prepare(x32, three.counts, None, None, 3, None, None, None).problem
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(3, problem.z.shape[1], generator=gen, dtype=torch.float32)
    log_w = torch.full((3,), -math.log(3), dtype=torch.float32)
    tol = 1e-9

    class Hasty(stopping.StoppingRule):  # claims convergence after its first cycle
        def converged(self, objective, scale=1.0):
            return bool(self.gains) or super().converged(objective, scale)

    monkeypatch.setattr(accelerate, "StoppingRule", Hasty)
    monkeypatch.setattr(accelerate, "NEWTON_MAX_STEPS", 1)  # one step per float64 phase
    monkeypatch.setattr(accelerate, "NEWTON_SWITCH", 0.0)  # only those phases
    done = accelerate.run(problem, atoms, log_w, 2000, tol)
    assert done.converged and done.gap <= tol * abs(done.history[-1])
    assert problem.relative_gradient(done.state.atoms, done.state.log_weights) <= 1e-6
    wide = problem.precise()  # more float64 Newton steps from there gain nothing
    start = wide.start(done.state.atoms.double(),
                       torch.log_softmax(done.state.log_weights.double(), 0))
    there = float(wide.objective(start)[0])
    more = accelerate.newton_finish(wide, start, there, 1e-13, 5)[1]
    assert more and more[-1] - there <= tol * abs(there)


def test_softmax_regression_trust_region():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    w = torch.softmax(z @ torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64), 0)[:, None]
    free = psm.fit_softmax_regression(z, w)
    capped = psm.fit_softmax_regression(z, w, max_step=0.5, max_steps=200)
    assert capped.converged and capped.num_steps > free.num_steps
    assert torch.allclose(capped.atoms, free.atoms, atol=1e-8)
    one = psm.fit_softmax_regression(z, w, max_step=0.5, max_steps=1)
    assert float(one.atoms.norm()) <= 0.5 + 1e-12
    with pytest.raises(ValueError, match="max_step"):
        psm.fit_softmax_regression(z, w, max_step=-1.0)


def _trap_first_run(monkeypatch, second_max_iter=None):
    """Make fit_em's first final run end as a trapped one (two updates, a move on record);
    the second run (the refit) is real, or cut to ``second_max_iter`` updates. Returns the
    number of starts of each call, and the first run's final objective once it ends."""
    from pyro_softmix import em
    seen, real = {"starts": []}, em.finish

    def fake(problem, starts_z, starts_w, max_iter, *args):
        seen["starts"].append(starts_z.shape[0])
        if len(seen["starts"]) == 1:
            done = real(problem, starts_z[:1], starts_w[:1], 2, *args)
            done.converged, done.moves = False, ("a move",)
            seen["first"] = done.history[-1]
            return done
        return real(problem, starts_z, starts_w, second_max_iter or max_iter, *args)

    monkeypatch.setattr(em, "finish", fake)
    return seen


def test_a_trapped_auto_fit_is_refit_from_the_tempered_start(three, monkeypatch):
    seen = _trap_first_run(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refit converges: no warning
        fit = psm.fit_em(three.features, three.counts, num_components=3, seed=0)
    assert seen["starts"][1] == 1  # the refit: one start
    assert "; not converged, so a run from the start grown on tempered" in fit.init
    assert fit.init.startswith("auto (race of 4 starts") and "a move" in fit.init
    setup = _setup(three, 3)
    atoms, log_w, _ = tempered_grown_start(setup.problem, one_component_fit(setup)[0], 1000)
    direct = psm.fit_em(three.features, three.counts, num_components=3,
                        init={"weights": log_w.exp(), "atoms": setup.design.atoms_from_z(atoms)})
    assert fit.converged and fit.loglik == pytest.approx(direct.loglik, rel=1e-12)


def test_a_refit_that_ends_lower_is_not_kept(three, monkeypatch):
    seen = _trap_first_run(monkeypatch, second_max_iter=1)
    with pytest.warns(psm.ConvergenceWarning):
        fit = psm.fit_em(three.features, three.counts, num_components=3, seed=0)
    assert fit.init.endswith("; a run from the start grown on tempered counts ended lower")
    # The first run's state is kept: the fit's log-likelihood is its own.
    ll = psm.SoftmaxMixture(three.features, fit.atoms, fit.weights).log_prob(
        torch.arange(400)) @ three.counts.double()
    assert fit.loglik == pytest.approx(float(ll), rel=1e-12) and not fit.converged
    assert fit.loglik == pytest.approx(seen["first"], rel=1e-12)


def test_auto_hands_finish_the_tempered_start_and_a_fit_that_tried_it_is_not_refit(
        three, monkeypatch):
    """``fit_em`` gives ``finish`` the tempered start as its fallback for ``init="auto"`` only
    (not for other inits, K = 1 or under a prior), made when asked; a fit whose ``finish``
    asked for it is not run again from it, even when it ends unconverged after moves."""
    from pyro_softmix import em
    real, given, made = em.finish, [], []

    def fake(problem, starts_z, starts_w, max_iter, *args):
        given.append(args[-1])
        done = real(problem, starts_z, starts_w, max_iter, *args)
        if args[-1] is not None:
            made.append(args[-1]())
            done.converged, done.moves = False, ("a move",)
        return done

    monkeypatch.setattr(em, "finish", fake)
    with pytest.warns(psm.ConvergenceWarning):
        psm.fit_em(three.features, three.counts, num_components=3, seed=0)
    assert len(given) == 1 and len(made) == 1  # asked once, no refit
    setup = _setup(three, 3)
    atoms, log_w, spent = tempered_grown_start(setup.problem, one_component_fit(setup)[0], 1000)
    assert torch.allclose(made[0][0], atoms, rtol=0, atol=1e-12)
    assert torch.allclose(made[0][1], log_w, rtol=0, atol=1e-12)
    assert made[0][2] == f"a run from the start grown on tempered counts ({spent} iterations)"
    given.clear()
    psm.fit_em(three.features, three.counts, num_components=3, seed=0, init="random")
    psm.fit_em(three.features, three.counts, num_components=1, seed=0)
    psm.fit_em(three.features, three.counts, num_components=3, seed=0, prior_scale=10.0)
    assert given == [None, None, None]


def test_no_refit_without_a_trap(three, monkeypatch):
    seen = []
    monkeypatch.setattr(psm.em, "tempered_grown_start", lambda *a: seen.append(1))
    psm.fit_em(three.features, three.counts, num_components=3, seed=0)  # converges
    with pytest.warns(psm.ConvergenceWarning):  # stopped by max_iter, no move: not a trap
        psm.fit_em(three.features, three.counts, num_components=3, seed=0, max_iter=2)
    with pytest.warns(psm.ConvergenceWarning):  # not init="auto"
        _trap_first_run(monkeypatch)
        psm.fit_em(three.features, three.counts, num_components=3, seed=0, init="random")
    assert not seen
