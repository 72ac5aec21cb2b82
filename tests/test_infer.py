# SPDX-License-Identifier: Apache-2.0
"""EM as a Pyro inference object, and the init strategies."""

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide import AutoNormal

import pyro_softmix as psm

from .helpers import brute_loglik


def _data(seed=0, tokens=False):
    return psm.simulate(num_points=60, num_features=2, num_components=2, num_obs=3000,
                        atom_norm=3.0, seed=seed, return_tokens=tokens)


@pytest.mark.parametrize("grouped", [False, True])
def test_em_step_never_increases_the_loss_and_matches_fit_em(grouped):
    d = _data(tokens=True)
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    data = {"tokens": d.tokens}
    if grouped:
        data["groups"] = torch.arange(d.tokens.shape[0]) // 5
    em = psm.EM(sm.model, seed=0)
    losses = [em.step(**data) for _ in range(300)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:], strict=False))
    ref = psm.fit_em(d.features, num_components=2, seed=0, **data)
    assert em.converged
    assert losses[-1] == pytest.approx(-ref.loglik, rel=1e-9)
    # The estimate lives in the param store: guide.median() and Predictive see it.
    med = em.guide.median(**data)
    assert torch.allclose(med["weights"], em.fit.weights, atol=1e-12)
    assert torch.allclose(med["atoms"], em.fit.atoms, atol=1e-10)
    if not grouped:
        assert -losses[-1] == pytest.approx(brute_loglik(d.features, d.counts, med["atoms"],
                                                         med["weights"]), rel=1e-10)
    store = pyro.get_param_store()
    assert set(store.keys()) == {"AutoDelta.weights", "AutoDelta.atoms"}
    pred = Predictive(sm.model, guide=em.guide, num_samples=3, return_sites=["obs"])(
        num_obs=100, collapsed=True)
    assert pred["obs"].shape == (3, 60) and bool((pred["obs"].sum(-1) == 100).all())


def test_em_takes_the_place_of_svi_in_a_loop():
    """The same loop body runs SVI and EM; EM's loss after 50 steps is the MLE's."""
    d = _data()
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    fit = sm.fit_em(counts=d.counts, seed=0)
    pyro.clear_param_store()
    guide = pyro.infer.autoguide.AutoDelta(pyro.poutine.block(sm.model, hide=["assignment"]),
                                           init_loc_fn=psm.init_to_em(
                                               {"weights": torch.tensor([0.5, 0.5]),
                                                "atoms": torch.zeros(2, 2)}))
    svi = pyro.infer.SVI(sm.model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    em = psm.EM(sm.model, init="random", seed=1)
    last = {}
    for name, engine in (("svi", svi), ("em", em)):
        for _ in range(50):
            last[name] = engine.step(counts=d.counts)
    assert last["em"] == pytest.approx(-fit.loglik, rel=1e-6)
    assert last["svi"] > last["em"]  # -log joint at a MAP-in-progress vs the NLL at the MLE


def test_init_to_em_starts_nuts_at_the_em_values():
    d = _data()
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    fit = sm.fit_em(counts=d.counts, seed=0)
    kernel = NUTS(lambda: sm.model(counts=d.counts), init_strategy=psm.init_to_em(fit),
                  step_size=1e-9, adapt_step_size=False, adapt_mass_matrix=False,
                  max_tree_depth=1)
    mcmc = MCMC(kernel, num_samples=1, warmup_steps=0, disable_progbar=True)
    mcmc.run()
    s = mcmc.get_samples()
    assert torch.allclose(s["weights"][0], fit.weights, atol=1e-7)
    assert torch.allclose(s["atoms"][0], fit.atoms, atol=1e-7)


def test_em_initial_params_are_the_unconstrained_em_values():
    d = _data()
    fit = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    params = psm.em_initial_params(fit, num_chains=3)
    assert params["weights"].shape == (3, 1) and params["atoms"].shape == (3, 2, 2)
    back = torch.distributions.biject_to(torch.distributions.constraints.simplex)(
        params["weights"][0])
    assert torch.allclose(back, fit.weights, atol=1e-12)


def test_svi_from_init_to_em_leaves_the_fit_and_the_start_unchanged():
    """The guide's parameters start from copies: training them moves neither the EM fit nor a
    start given as a mapping (AutoDelta's atoms are unconstrained, so without the copy its
    parameter would be the fit's own tensor, updated in place by Adam)."""
    from pyro.infer.autoguide import AutoDelta

    d = _data()
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    fit = sm.fit_em(counts=d.counts, seed=0)
    start = {"weights": fit.weights.clone(), "atoms": fit.atoms.clone() + 0.5}

    def values(source):
        return {k: source[k] if isinstance(source, dict) else getattr(source, k)
                for k in ("weights", "atoms")}

    for source in (fit, start):
        before = {k: v.clone() for k, v in values(source).items()}
        pyro.clear_param_store()
        guide = AutoDelta(lambda: sm.model(counts=d.counts), init_loc_fn=psm.init_to_em(source))
        svi = pyro.infer.SVI(lambda: sm.model(counts=d.counts), guide,
                             pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
        for _ in range(5):
            svi.step()
        moved = guide.median()["atoms"]
        assert (moved - before["atoms"]).abs().max() > 1e-3  # SVI did move its own copy
        after = values(source)
        assert torch.equal(after["atoms"], before["atoms"])
        assert torch.equal(after["weights"], before["weights"])
    initial = psm.em_initial_params(fit)
    initial["atoms"].add_(1.0)
    assert not torch.equal(initial["atoms"], fit.atoms)


def test_init_to_em_for_an_autoguide_and_bad_input():
    d = _data()
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    fit = sm.fit_em(counts=d.counts, seed=0)
    guide = AutoNormal(lambda: sm.model(counts=d.counts), init_loc_fn=psm.init_to_em(fit))
    guide()
    med = guide.median()
    assert torch.allclose(med["atoms"], fit.atoms, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        AutoNormal(lambda: sm.model(counts=d.counts),
                   init_loc_fn=psm.init_to_em({"weights": torch.ones(3) / 3,
                                               "atoms": torch.zeros(3, 2)}))()
    with pytest.raises(TypeError, match="init_to_em"):
        psm.init_to_em(3.0)
    with pytest.raises(TypeError, match="SoftmaxMixtureModel"):
        psm.EM(lambda: None)
    with pytest.raises(TypeError, match="AutoDelta"):
        psm.EM(sm, guide=guide)
    with pytest.raises(RuntimeError, match="step"):
        psm.EM(sm).fit  # noqa: B018


@pytest.mark.parametrize("tty, progress, shown", [(True, None, True), (False, None, False),
                                                  (True, False, False), (False, True, True)])
def test_nuts_progress_bar_follows_the_terminal_by_default(monkeypatch, tty, progress, shown):
    """fit_mcmc shows Pyro's progress bar when stderr is a terminal, unless told otherwise."""
    import io
    import sys

    from pyro_softmix import infer

    seen = {}

    class RecordingMCMC:
        def __init__(self, kernel, **kwargs):
            seen.update(kwargs)

        def run(self):
            pass

    monkeypatch.setattr(infer, "MCMC", RecordingMCMC)
    class Stderr(io.StringIO):
        def isatty(self):
            return tty

    monkeypatch.setattr(sys, "stderr", Stderr())
    d = psm.simulate(num_points=30, num_features=2, num_components=2, num_obs=300, seed=0)
    sm = psm.SoftmaxMixtureModel(d.features, 2)
    sm.fit_mcmc(counts=d.counts, num_samples=5, warmup_steps=5, seed=0, progress=progress)
    assert seen["disable_progbar"] is (not shown)
