# SPDX-License-Identifier: Apache-2.0
"""MixtureOfExperts, the estimator: fits from the truth and from starts, predictions, files, Pyro."""

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import pyro_softmix as psm
from pyro_softmix import MixtureOfExperts, moe_em, simulate_moe
from pyro_softmix.plots import match_components

from .helpers import moe_free_vector, moe_unpack


def test_em_from_truth_stays_within_standard_errors():
    data = simulate_moe(num_obs=3000, num_features=2, num_experts=2, snr=8, seed=4)
    moe = MixtureOfExperts(2).fit(data.x, data.y, init=data.truth())
    xe, xg, y = moe._data(data.x, data.y, None)

    def loglik(v):
        return torch.logsumexp(moe_em.log_joint(moe, moe_unpack(moe, v, 3, 3), xe, xg, y), 1).sum()
    hat = moe_free_vector(moe)
    truth = torch.cat([data.gate_weights[:-1].reshape(-1), data.expert_weights.reshape(-1),
                       data.noise_scale.log()])
    info = -torch.autograd.functional.hessian(loglik, hat)
    se = torch.linalg.inv(info).diagonal().sqrt()
    z = (hat - truth) / se
    assert float(z.abs().max()) < 4.5, z  # 11 coordinates; P(max |N(0,1)| > 4.5) ~ 1e-4
    assert float(z.abs().max()) > 0.05  # the estimate is not the truth itself


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


def test_progress_bar_counts_each_start_from_zero_to_max_iter(capsys):
    """One bar per start (0 to max_iter), not one over all starts (an ETA for the worst case
    of every start)."""
    data = psm.simulate_moe(num_obs=300, num_features=2, num_experts=2, seed=0)
    psm.MixtureOfExperts(2).fit(data.x, data.y, seed=0, num_inits=3, max_iter=500, progress=True)
    err = capsys.readouterr().err
    assert "/500" in err and "/1500" not in err and "run 3/3" in err
