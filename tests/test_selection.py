# SPDX-License-Identifier: Apache-2.0
"""Choosing K along a grown path: the criteria, the split starts, cross-validation, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.selection import _folds, split_starts


@pytest.fixture(scope="module")
def two():
    """Two well-separated components (atoms of norm 3 in standardised units)."""
    return psm.simulate(num_points=300, num_features=3, num_components=2, num_obs=20_000,
                        atom_norm=3.0, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def selection(two):
    return psm.select_num_components(two.features, two.counts, num_components=range(1, 5),
                                     seed=0, cv=3)


def test_bic_picks_the_true_number_of_components(selection):
    assert selection.num_components == [1, 2, 3, 4]
    assert selection.best.num_components == 2
    assert [row["K"] for row in selection.rows] == [1, 2, 3, 4]
    # The log-likelihood never falls along the grown path (each K contains the K - 1 fit).
    lls = [row["loglik"] for row in selection.rows]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(lls, lls[1:], strict=False))
    # The held-out log-likelihood is best at the true K too.
    cv = [row["cv"] for row in selection.rows]
    assert int(np.argmax(cv)) == 1
    assert "K = 2" in selection.table().splitlines()[-1]


def test_criteria_follow_their_formulas(selection, two):
    n = float(two.counts.sum())
    for fit, row in zip(selection.fits, selection.rows, strict=True):
        d, ll = fit.num_params, fit.loglik
        assert d == fit.num_components - 1 + 3 * fit.num_components
        assert row["bic"] == pytest.approx(-2 * ll + d * math.log(n), rel=1e-12)
        assert row["aic"] == pytest.approx(-2 * ll + 2 * d, rel=1e-12)
        assert row["caic"] == pytest.approx(-2 * ll + d * (math.log(n) + 1), rel=1e-12)
        assert row["sabic"] == pytest.approx(-2 * ll + d * math.log((n + 2) / 24), rel=1e-12)
        # Classification entropy by plain loops over the points with draws.
        r = fit.responsibilities()
        entropy = 0.0
        for j in range(300):
            for k in range(fit.num_components):
                if two.counts[j] > 0 and r[j, k] > 0:
                    entropy -= float(two.counts[j] * r[j, k] * r[j, k].log())
        assert row["entropy"] == pytest.approx(entropy, rel=1e-9, abs=1e-9)
        assert row["icl"] == pytest.approx(row["bic"] + 2 * entropy, rel=1e-12)
        assert row["min_weight"] == pytest.approx(float(fit.weights.min()))


def test_split_start_goes_along_the_direction_that_separates_the_components(two):
    one = psm.fit_em(two.features, counts=two.counts, num_components=1, seed=0)
    (start,) = split_starts(one, counts=two.counts, num_splits=1)
    assert start["weights"].sum() == pytest.approx(1.0)
    design = psm.standardize(two.features)
    split = design.atoms_to_z(start["atoms"])
    truth = design.atoms_to_z(two.atoms)
    u = split[0] - split[1]
    v = truth[0] - truth[1]
    assert abs(float(u @ v)) / float(u.norm() * v.norm()) > 0.9
    # The two new atoms straddle the one-component fit.
    centre = design.atoms_to_z(one.atoms)[0]
    assert torch.allclose(0.5 * (split[0] + split[1]), centre, atol=1e-10)


def test_split_starts_pick_the_worst_explained_component():
    """Three components where a K = 2 fit merges two of them: the merged component is the one
    split first."""
    data = psm.simulate(num_points=500, num_features=3, num_components=3, num_obs=50_000,
                        atom_norm=3.0, seed=3, dtype=torch.float64)
    fit2 = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
    starts = split_starts(fit2, counts=data.counts, num_splits=2)
    assert len(starts) == 2
    fits = [psm.fit_em(data.features, counts=data.counts, num_components=3, init=s)
            for s in starts]
    truth = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0,
                       num_inits=8)
    assert fits[0].loglik == pytest.approx(truth.loglik, rel=1e-9)


def test_thinning_folds_partition_the_draws(two):
    gen = torch.Generator().manual_seed(0)
    folds = _folds(300, 4, two.counts, None, None, gen)
    held = torch.stack([h for _, h in folds])
    assert torch.equal(held.sum(0), two.counts.double())
    for train, part in folds:
        assert torch.equal(train["counts"] + part, two.counts.double())
    # Each fold holds about a quarter of the draws (binomial: sd about sqrt(N 3/16)).
    sizes = held.sum(1)
    n = float(two.counts.sum())
    assert float((sizes - n / 4).abs().max()) < 5 * math.sqrt(n * 3 / 16)


def test_grouped_path_and_group_folds():
    gen = torch.Generator().manual_seed(5)
    data = psm.simulate(num_points=200, num_features=3, num_components=2, num_obs=1,
                        atom_norm=2.5, seed=5, dtype=torch.float64)
    comp = torch.multinomial(data.weights, 300, replacement=True, generator=gen)
    q = torch.softmax(data.atoms @ data.features.T, -1)
    tokens = torch.multinomial(q[comp], 6, replacement=True, generator=gen).reshape(-1)
    groups = torch.arange(300).repeat_interleave(6)
    folds = _folds(200, 3, None, tokens, groups, torch.Generator().manual_seed(0))
    seen = torch.cat([h[0] for _, h in folds])
    assert sorted(seen.unique().tolist()) == list(range(300))
    assert sum(h[2].sum() for _, h in folds) == tokens.numel()
    sel = psm.select_num_components(data.features, tokens=tokens, groups=groups,
                                    num_components=[1, 2, 3], seed=0, cv=3)
    assert sel.best.num_components == 2
    assert sel.best.num_groups == 300
    assert sel.rows[1]["bic"] == pytest.approx(sel.fits[1].bic)  # n = G groups
    cv = [row["cv"] for row in sel.rows]
    assert cv[1] > cv[0]


def test_selection_outputs(selection, tmp_path):
    path = selection.plot(tmp_path / "sel.png")
    assert (tmp_path / "sel.png").stat().st_size > 1000 and path.endswith("sel.png")
    selection.save_json(tmp_path / "sel.json")
    saved = json.loads((tmp_path / "sel.json").read_text())
    assert saved["best"] == 2 and len(saved["rows"]) == 4
    assert "ComponentSelection" in repr(selection)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_components=[]), ValueError, "num_components is empty"),
    (dict(num_components=[2, 1]), ValueError, "increasing"),
    (dict(num_components=[0, 1]), ValueError, "increasing integers >= 1"),
    (dict(num_components=range(1, 400)), ValueError, "more than the 300 support points"),
    (dict(num_components=3), TypeError, "range or list"),
    (dict(num_components=[1, 2.5]), TypeError, "integers"),
    (dict(criterion="bicc"), ValueError, "criterion must be one of"),
    (dict(criterion="cv"), ValueError, "needs cv="),
    (dict(cv=1), ValueError, "cv must be >= 2"),
    (dict(race="some"), ValueError, "race must be"),
    (dict(init="tensor"), TypeError, "init="),
])
def test_bad_arguments(two, kwargs, error, match):
    with pytest.raises(error, match=match):
        psm.select_num_components(two.features, two.counts, **kwargs)


def test_cv_needs_integer_counts_and_enough_draws(two):
    with pytest.raises(ValueError, match="counts must be integers"):
        psm.select_num_components(two.features, two.counts * 0.5, num_components=[1], cv=2)
    few = torch.zeros(300)
    few[:2] = 1
    with pytest.raises(ValueError, match="cv=5 folds but only 2 draws"):
        psm.select_num_components(two.features, few, num_components=[1], cv=5)


def test_cli_select(two, tmp_path):
    from pyro_softmix.cli import main

    np.save(tmp_path / "x.npy", two.features.numpy())
    np.save(tmp_path / "n.npy", two.counts.numpy())
    out = tmp_path / "out"
    assert main(["select", str(tmp_path / "x.npy"), "--counts", str(tmp_path / "n.npy"),
                 "--k-max", "3", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["best"] == 2
    assert psm.load_fit(out / "fit.npz").num_components == 2
    assert (out / "selection.png").exists()


def test_selection_with_group_covariates():
    from tests.test_membership import panel

    data, c, _, tokens, groups = panel(num_groups=500, seed=4)
    sel = psm.select_num_components(data.features, tokens=tokens, groups=groups,
                                    group_features=c, num_components=[1, 2, 3], seed=0, cv=3)
    assert sel.best.num_components == 2
    assert sel.best.membership_coef.shape == (2, 2)
    # Two covariates: (K - 1) d class-share coefficients.
    assert [row["params"] for row in sel.rows] == [3, 1 * 2 + 2 * 3, 2 * 2 + 3 * 3]
    cv = [row["cv"] for row in sel.rows]
    assert cv[1] > cv[0]


def test_warnings_about_the_data_are_shown_once(two):
    x = torch.cat([two.features, torch.ones(300, 1, dtype=torch.float64)], 1)
    with pytest.warns(psm.IdentifiabilityWarning) as record:
        sel = psm.select_num_components(x, two.counts, num_components=[1, 2], seed=0)
    rank = [w for w in record if "rank" in str(w.message)]
    assert len(rank) == 1
    assert sel.best.num_components == 2
