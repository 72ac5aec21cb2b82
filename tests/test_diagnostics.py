# SPDX-License-Identifier: Apache-2.0
"""Relabelling, ArviZ conversion, summaries, intervals, plots and the comparison."""

import math

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import arviz_bridge, diagnostics
from pyro_softmix.diagnostics import pointwise_log_likelihood

from .helpers import brute_grouped_loglik, brute_loglik


def _draws(chains=2, draws=30, K=3, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])[:K, :L]
    atoms = ref + 0.1 * torch.randn(chains, draws, K, L, generator=g)
    weights = torch.softmax(torch.randn(chains, draws, K, generator=g) * 0.1, -1)
    return ref, atoms, weights


def test_relabel_recovers_known_permutations():
    ref, atoms, weights = _draws()
    g = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(3, generator=g) for _ in range(60)]).reshape(2, 30, 3)
    shuffled_atoms = torch.gather(atoms, -2, perms[..., None].expand(atoms.shape))
    shuffled_w = torch.gather(weights, -1, perms)
    z = torch.randint(0, 3, (2, 30, 5), generator=g)
    # Under the shuffle, component perms[k] became label k: old label c -> argsort(perm)[c].
    shuffled_z = torch.gather(torch.argsort(perms, -1), -1, z)
    samples = {"atoms": shuffled_atoms, "weights": shuffled_w, "assignment": shuffled_z,
               "other": torch.ones(2)}
    out, applied = psm.relabel_samples(samples, ref, return_permutations=True)
    assert torch.equal(out["atoms"], atoms) and torch.equal(out["weights"], weights)
    assert torch.equal(out["assignment"], z)
    assert torch.equal(torch.gather(perms, -1, applied), torch.arange(3).expand(2, 30, 3))
    assert out["other"] is samples["other"] and samples["atoms"] is shuffled_atoms  # untouched
    with pytest.raises(ValueError, match="shape"):
        psm.relabel_samples({"atoms": atoms[..., :1]}, ref)


def test_pointwise_log_likelihood_sums_to_the_brute_force_loglik():
    d = psm.simulate(num_points=10, num_features=2, num_components=2, num_obs=40, seed=0,
                     return_tokens=True)
    atoms = torch.stack([d.atoms, d.atoms.flip(0)])
    weights = torch.stack([d.weights, d.weights.flip(0)])
    ll = pointwise_log_likelihood(d.features, atoms, weights, tokens=d.tokens)
    assert ll.shape == (2, 40)
    for s in range(2):
        assert float(ll[s].sum()) == pytest.approx(brute_loglik(d.features, d.counts, atoms[s],
                                                                weights[s]), rel=1e-12)
    assert torch.allclose(pointwise_log_likelihood(d.features, atoms, weights, counts=d.counts)
                          .sum(1), ll.sum(1))
    groups = torch.arange(40) % 7
    llg = pointwise_log_likelihood(d.features, atoms, weights, tokens=d.tokens, groups=groups)
    assert llg.shape == (2, 7)
    assert float(llg[0].sum()) == pytest.approx(brute_grouped_loglik(
        d.features, d.tokens, groups, atoms[0], weights[0]), rel=1e-12)
    with pytest.raises(ValueError, match="max_size"):
        pointwise_log_likelihood(d.features, atoms, weights, tokens=d.tokens, max_size=10)


def test_to_arviz_round_trips_shapes_and_log_likelihood():
    import arviz as az

    d = psm.simulate(num_points=10, num_features=2, num_components=3, num_obs=50, seed=0,
                     return_tokens=True)
    ref, atoms, weights = _draws()
    idata = psm.to_arviz({"atoms": atoms, "weights": weights}, features=d.features,
                         tokens=d.tokens, reference=ref)
    post = idata.posterior if hasattr(idata, "posterior") else idata["posterior"]
    assert tuple(post["atoms"].shape) == (2, 30, 3, 2)
    assert tuple(post["weights"].shape) == (2, 30, 3)
    ll = idata.log_likelihood["obs"].values
    assert ll.shape == (2, 30, 50)
    expected = brute_loglik(d.features, d.counts, atoms[1, 7], weights[1, 7])
    assert float(ll[1, 7].sum()) == pytest.approx(expected, rel=1e-12)
    # Flat draws with num_chains, and ArviZ's own diagnostics run on the result.
    flat = psm.to_arviz({"atoms": atoms.reshape(60, 3, 2), "weights": weights.reshape(60, 3)},
                        num_chains=2, log_likelihood=False)
    assert tuple(flat.posterior["atoms"].shape) == (2, 30, 3, 2)
    assert float(az.rhat(flat)["weights"].max()) < 1.2


def test_to_arviz_uses_the_v1_signature(monkeypatch):
    """ArviZ 1.x takes one dict of groups; the call is built for it when 1.x is installed."""
    import arviz as az

    calls = {}

    def fake_from_dict(data=None, **kwargs):
        calls["data"], calls["kwargs"] = data, kwargs
        return "tree"
    monkeypatch.setattr(arviz_bridge, "arviz_major", lambda: 1)
    monkeypatch.setattr(az, "from_dict", fake_from_dict)
    ref, atoms, weights = _draws()
    assert psm.to_arviz({"atoms": atoms, "weights": weights}) == "tree"
    assert set(calls["data"]) == {"posterior"}
    assert calls["data"]["posterior"]["atoms"].shape == (2, 30, 3, 2)
    assert calls["kwargs"]["dims"]["atoms"] == ["component", "feature"]


def test_posterior_summary_rhat_and_ess():
    ref, atoms, weights = _draws(chains=4, draws=200)
    rows = psm.posterior_summary({"atoms": atoms, "weights": weights})
    assert len(rows) == 3 + 6
    assert all(abs(r["r_hat"] - 1) < 0.05 for r in rows)  # i.i.d. draws
    assert all(r["ess"] > 400 for r in rows)
    atom = next(r for r in rows if r["name"] == "atoms[0,0]")
    assert atom["lo"] < 3.0 < atom["hi"] and atom["sd"] == pytest.approx(0.1, rel=0.15)
    shifted = atoms.clone()
    shifted[0] += 1.0  # one chain elsewhere: R-hat must flag it
    bad = psm.posterior_summary({"atoms": shifted, "weights": weights})
    assert max(r["r_hat"] for r in bad) > 1.5
    text = diagnostics.format_summary(rows)
    assert "atoms[2,1]" in text and "r_hat" in text


def test_fisher_intervals_match_the_closed_form_for_one_component():
    """K = 1 is a softmax regression: information N Cov_q(x), covariance its inverse."""
    d = psm.simulate(num_points=200, num_features=3, num_components=1, num_obs=20_000, seed=0)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=1, seed=0)
    ci = psm.fisher_intervals(fit, counts=d.counts, level=0.9)
    q = torch.softmax(d.features @ fit.atoms[0], 0)
    xc = d.features - q @ d.features
    info = d.counts.sum() * (xc.T * q) @ xc
    se = torch.linalg.inv(info).diagonal().sqrt()
    assert torch.allclose(ci["atoms_se"][0], se, rtol=1e-6)
    assert torch.allclose(ci["atoms"][0, :, 1] - ci["atoms"][0, :, 0], 2 * 1.6448536 * se,
                          rtol=1e-6)
    assert float(ci["weights_se"][0]) < 1e-6  # the single weight is fixed at 1


def test_plots_and_compare_fits(tmp_path):
    d = psm.simulate(num_points=80, num_features=2, num_components=2, num_obs=4000, seed=0)
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    fit = sm.fit_em(counts=d.counts, seed=0)
    sm.fit_svi(num_steps=30)
    sm.fit_mcmc(num_samples=8, warmup_steps=8, max_tree_depth=3)
    paths = psm.plot_diagnostics(sm.mcmc, tmp_path / "diag", reference=fit)
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cmp = psm.compare_fits(sm, truth=d)
    assert cmp.methods == ["EM", "SVI (AutoNormal)", "NUTS"]
    assert cmp.metrics["EM"]["loglik"] == fit.loglik
    est, lo, hi = cmp.params["EM"]["weights[0]"]
    assert est == pytest.approx(float(fit.weights[0])) and lo < est < hi
    assert math.isfinite(cmp.metrics["SVI (AutoNormal)"]["elbo"])
    assert "NUTS" in cmp.table() and "truth" in cmp.table()
    assert cmp.plot(tmp_path / "cmp.png").endswith("cmp.png")
    idata = sm.to_arviz()
    assert idata.log_likelihood["obs"].shape == (1, 8, 4000)


def test_one_matcher_for_relabelling_and_plots():
    """match_components is the exact assignment (brute force over K!), batched; plots and
    relabel_samples give its permutations."""
    import itertools

    from pyro_softmix._matching import match_components
    from pyro_softmix.plots import match_components as plot_match

    g = torch.Generator().manual_seed(4)
    ref = torch.randn(4, 3, generator=g, dtype=torch.float64)
    draws = ref + 1.2 * torch.randn(2, 25, 4, 3, generator=g, dtype=torch.float64)
    perm = match_components(draws, ref)
    assert perm.shape == (2, 25, 4)
    for c in range(2):
        for s in range(25):
            best = min(itertools.permutations(range(4)),
                       key=lambda q: float(((draws[c, s, list(q)] - ref) ** 2).sum()))
            assert perm[c, s].tolist() == list(best)
    assert plot_match(draws[0, 3], ref).tolist() == perm[0, 3].tolist()
    _, applied = psm.relabel_samples({"atoms": draws}, ref, return_permutations=True)
    assert torch.equal(applied, perm)


@pytest.fixture(scope="module")
def nuts_runs():
    """Two small real NUTS runs (K = 2 and K = 3 on the same data) whose chains move."""
    import pyro

    d = psm.simulate(num_points=40, num_features=2, num_components=2, num_obs=600,
                     atom_norm=2.5, seed=3, return_tokens=True, dtype=torch.float64)
    runs = {}
    for k in (2, 3):
        pyro.set_rng_seed(0)
        sm = psm.SoftmaxMixtureModel(d.features, k, prior_scale=2.0)
        sm.fit_em(counts=d.counts, seed=0, prior_scale=2.0)
        sm.fit_mcmc(num_samples=30, warmup_steps=60, seed=0, max_tree_depth=5)
        runs[k] = sm
    return d, runs


def test_arviz_loo_and_compare_on_real_nuts_draws_match_a_direct_computation(nuts_runs):
    """On the installed ArviZ major: az.loo and az.compare read to_arviz's output; elpd is the
    sum over draws of log sum_s w_s p(y_i | theta_s) with ArviZ's PSIS weights, p_loo is lppd
    less elpd, and psm.loo gives the same from the P distinct support points."""
    import warnings

    import arviz as az
    from scipy.special import logsumexp

    d, runs = nuts_runs
    datas = {}
    for k, sm in runs.items():
        samples = sm.mcmc.get_samples()["weights"]
        assert torch.unique(samples, dim=0).shape[0] > 25  # the chain moves: 30 draws
        datas[k] = sm.to_arviz(units="draws")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ 0.x: an import-time FutureWarning
        res = az.loo(datas[2], pointwise=True)
        rounding = {"round_to": "none"} if arviz_bridge.arviz_major() >= 1 else {}  # 1.x rounds
        table = az.compare({"K=2": datas[2], "K=3": datas[3]}, **rounding)
    ll = datas[2].log_likelihood["obs"].values.reshape(30, -1)  # (draws, N)
    assert ll.shape[1] == 600
    lppd = logsumexp(ll, axis=0) - np.log(30)
    mine = psm.loo(datas[2])
    major = arviz_bridge.arviz_major()
    if major >= 1:
        log_w = res.log_weights.transpose("chain", "draw", "obs_id").values.reshape(30, -1)
        elpd, p = res.elpd, res.p
    else:
        log_w, _ = az.psislw(-ll.T.copy())
        log_w = log_w.T
        elpd, p = res.elpd_loo, res.p_loo
    direct = logsumexp(log_w + ll, axis=0)
    assert float(direct.sum()) == pytest.approx(elpd, rel=1e-10)
    assert p == pytest.approx(float(lppd.sum()) - elpd, rel=1e-8)
    assert mine.elpd == pytest.approx(elpd, rel=1e-12) and mine.p == pytest.approx(p, rel=1e-8)
    assert mine.se == pytest.approx(res.se, rel=1e-8)
    elpds = {k: psm.loo(v).elpd for k, v in datas.items()}
    worse = "K=3" if elpds[3] < elpds[2] else "K=2"
    diff = abs(elpds[3] - elpds[2])
    reported = float(table.loc[worse, "elpd_diff"])
    assert abs(reported) == pytest.approx(diff, rel=1e-8)
    assert np.sign(reported) == (-1 if major >= 1 else 1)  # the majors' conventions


def test_loo_on_distinct_points_equals_loo_on_every_draw(nuts_runs):
    """units="points" keeps one column per support point; psm.loo weights them by counts:
    the same elpd, se, p and Pareto k as the N-column table."""
    d, runs = nuts_runs
    sm = runs[2]
    draws, points = sm.to_arviz(units="draws"), sm.to_arviz(units="points")
    assert points.log_likelihood["obs"].shape[-1] == int((d.counts > 0).sum()) < 600
    a, b = psm.loo(draws), psm.loo(points)
    assert b.num_units == a.num_units == 600
    for name in ("elpd", "se", "p"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-10)
    assert float(np.max(b.pareto_k)) == pytest.approx(float(np.max(a.pareto_k)), rel=1e-10)
    # "auto" keeps the draws while they are cheap, and switches to points when they are not.
    assert sm.to_arviz().log_likelihood["obs"].shape[-1] == 600
    assert sm.to_arviz(max_size=1000).log_likelihood["obs"].shape[-1] < 600


def test_forest_plot_has_a_panel_per_kind_and_intervals_wider_than_dots():
    from pyro_softmix.diagnostics import forest_figure

    g = torch.Generator().manual_seed(0)
    flat = {"weights[0]": 0.3 + 0.005 * torch.randn(1, 200, generator=g),
            "weights[1]": 0.7 + 0.005 * torch.randn(1, 200, generator=g)}
    flat |= {f"atoms[0,{i}]": 3.0 * i + 0.01 * torch.randn(1, 200, generator=g) for i in range(4)}
    fig = forest_figure(flat, level=0.9)
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax in axes:
        lo, hi = ax.get_xlim()
        intervals = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
        assert intervals
        for line in intervals:  # each interval spans a visible part of its panel
            x0, x1 = line.get_xdata()
            assert (x1 - x0) / (hi - lo) > 0.2
    labels = [t.get_text() for t in axes[1].get_yticklabels()]
    assert labels[3].startswith("atoms[0,3] = ") and abs(float(labels[3][13:]) - 9) < 0.01


def test_convergence_plot_shows_every_update_on_integer_ticks():
    from pyro_softmix.plots import convergence_figure

    data = psm.simulate(num_points=300, num_features=3, num_components=2, num_obs=5000, seed=0)
    fit = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
    fig = convergence_figure(fit)
    left, right = fig.get_axes()
    assert len(left.get_lines()[0].get_xdata()) == len(fit.history)  # the final point too
    for ax in (left, right):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_arviz_data_saves_to_netcdf_and_reads_back(nuts_runs, tmp_path):
    """``to_netcdf`` works on the installed major with the [arviz] extra (h5netcdf, h5py)."""
    import warnings

    import arviz as az

    pytest.importorskip("h5netcdf")
    pytest.importorskip("h5py")
    _, runs = nuts_runs
    data = runs[2].to_arviz(units="points")
    path = tmp_path / "posterior.nc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x
        data.to_netcdf(str(path))
        again = az.from_netcdf(str(path))
    np.testing.assert_array_equal(again.posterior["atoms"].values,
                                  data.posterior["atoms"].values)
    np.testing.assert_array_equal(again.log_likelihood["obs"].values,
                                  data.log_likelihood["obs"].values)
    assert psm.loo(again).elpd == pytest.approx(psm.loo(data).elpd, rel=1e-12)
