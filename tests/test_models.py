# SPDX-License-Identifier: Apache-2.0
"""The Pyro models: enumerated and collapsed agree, with brute force and with each other."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, infer_discrete
from pyro.infer.autoguide import AutoDelta

from pyro_softmix.models import MixtureCounts, collapsed_model, enumerated_model, pad_groups

from .helpers import brute_grouped_loglik, brute_loglik


def _setup(p=8, L=2, K=3, N=25, G=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, L, generator=g)
    atoms = torch.randn(K, L, generator=g)
    weights = torch.softmax(torch.randn(K, generator=g), 0)
    tokens = torch.randint(0, p, (N,), generator=g)
    groups = torch.randint(0, G, (N,), generator=g)
    return x, atoms, weights, tokens, groups


def _no_guide(*args, **kwargs):
    pass


def _enum_log_joint(model):
    """log p(observed, conditioned sites) with the assignment summed out by Pyro."""
    return -TraceEnum_ELBO(max_plate_nesting=1).loss(model, _no_guide)


@pytest.mark.parametrize("grouped", [False, True])
def test_enumerated_and_collapsed_give_the_same_log_joint(grouped):
    x, atoms, weights, tokens, groups = _setup()
    values = {"weights": weights, "atoms": atoms}
    g = groups if grouped else None
    enum = _enum_log_joint(poutine.condition(
        lambda: enumerated_model(x, 3, tokens, groups=g), data=values))
    trace = poutine.trace(poutine.condition(
        lambda: collapsed_model(x, 3, tokens=tokens, groups=g), data=values)).get_trace()
    collapsed = float(trace.log_prob_sum())
    prior = float(dist.Dirichlet(torch.ones(3)).log_prob(weights)
                  + trace.nodes["atoms"]["fn"].log_prob(atoms))
    if grouped:
        brute = brute_grouped_loglik(x, tokens, groups, atoms, weights)
    else:
        brute = brute_loglik(x, torch.bincount(tokens, minlength=8), atoms, weights)
    assert enum == pytest.approx(collapsed, rel=1e-12)
    assert collapsed == pytest.approx(brute + prior, rel=1e-12)


def test_trace_enum_elbo_with_a_delta_guide_is_the_negative_log_likelihood():
    x, atoms, weights, tokens, _ = _setup()
    nll = -brute_loglik(x, torch.bincount(tokens, minlength=8), atoms, weights)

    def model():  # values passed in: no prior terms, so the loss is the NLL exactly
        enumerated_model(x, 3, tokens, weights=weights, atoms=atoms)
    assert TraceEnum_ELBO(max_plate_nesting=1).loss(model, _no_guide) == pytest.approx(nll,
                                                                                       rel=1e-12)

    def full():
        enumerated_model(x, 3, tokens)

    def delta_guide():
        pyro.sample("weights", dist.Delta(weights, event_dim=1))
        pyro.sample("atoms", dist.Delta(atoms, event_dim=2))
    trace = poutine.trace(poutine.condition(full, {"weights": weights, "atoms": atoms})
                          ).get_trace()
    log_prior = float(trace.nodes["weights"]["fn"].log_prob(weights)
                      + trace.nodes["atoms"]["fn"].log_prob(atoms))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(full, delta_guide)
    assert loss == pytest.approx(nll - log_prior, rel=1e-12)


def test_subsampled_loss_is_unbiased_and_full_size_is_exact():
    x, atoms, weights, tokens, _ = _setup(N=40)
    nll = -brute_loglik(x, torch.bincount(tokens, minlength=8), atoms, weights)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    losses = torch.tensor([elbo.loss(lambda: enumerated_model(
        x, 3, tokens, weights=weights, atoms=atoms, subsample_size=10), _no_guide)
        for _ in range(400)])
    se = float(losses.std() / 20)
    assert abs(float(losses.mean()) - nll) < 4 * se


def test_infer_discrete_map_is_the_responsibility_argmax():
    x, atoms, weights, tokens, groups = _setup(N=60)
    model = poutine.condition(lambda: enumerated_model(x, 3, tokens),
                              {"weights": weights, "atoms": atoms})
    z = poutine.trace(infer_discrete(model, first_available_dim=-2, temperature=0)
                      ).get_trace().nodes["assignment"]["value"]
    log_q = torch.log_softmax(atoms @ x.T, -1)
    assert torch.equal(z, (log_q[:, tokens].T + weights.log()).argmax(1))
    # Grouped: one assignment per group, the argmax of the group posterior.
    padded, labels = pad_groups(tokens, groups)
    model = poutine.condition(lambda: enumerated_model(x, 3, padded),
                              {"weights": weights, "atoms": atoms})
    zg = poutine.trace(infer_discrete(model, first_available_dim=-2, temperature=0)
                       ).get_trace().nodes["assignment"]["value"]
    expected = torch.stack([log_q[:, tokens[groups == g]].sum(1) for g in labels])
    assert torch.equal(zg, (expected + weights.log()).argmax(1))


def test_pad_groups_round_trips():
    tokens = torch.tensor([5, 1, 2, 7, 3, 3])
    groups = torch.tensor([9, 4, 9, 4, 4, 0])
    padded, labels = pad_groups(tokens, groups)
    assert torch.equal(labels, torch.tensor([0, 4, 9]))
    assert torch.equal(padded, torch.tensor([[3, -1, -1], [1, 7, 3], [5, 2, -1]]))


def test_mixture_counts_sample_and_log_prob():
    x, atoms, weights, _, _ = _setup()
    comp = torch.log_softmax(atoms @ x.T, -1)
    d = MixtureCounts(comp, weights, 1000.0)
    draws = d.sample((200,))
    assert draws.shape == (200, 8) and bool((draws.sum(-1) == 1000).all())
    pi = torch.logsumexp(comp + weights.log()[:, None], 0).exp()
    mean = draws.mean(0) / 1000  # each coordinate within 5 standard errors of pi
    se = (pi * (1 - pi) / (1000 * 200)).sqrt()
    assert bool(((mean - pi).abs() < 5 * se).all())
    # Grouped: G count vectors, each from one component.
    dg = MixtureCounts(comp, weights, torch.tensor([3.0, 4.0]), grouped=True)
    value = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 0], [0, 0, 0, 4, 0, 0, 0, 0]])
    expected = torch.logsumexp(weights.log()[None] + value @ comp.T, -1)
    assert torch.allclose(dg.log_prob(value), expected)
    assert dg.sample().sum(-1).tolist() == [3.0, 4.0]


def test_composes_inside_a_user_model_with_covariate_atoms_and_hierarchical_prior():
    """Atoms as a regression on covariates, with a learned prior scale; SVI reduces the loss."""
    x, atoms, weights, tokens, _ = _setup(N=200)
    covariates = torch.randn(3, 4)  # one covariate row per component

    def model(tokens):
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([4, 2]).to_event(2))
        comp_atoms = covariates @ beta
        enumerated_model(x, 3, tokens, atoms=comp_atoms)

    def hier(tokens):
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        enumerated_model(x, 3, tokens, atoms_prior=dist.Normal(0.0, tau))

    for user_model in (model, hier):
        guide = AutoDelta(poutine.block(user_model, hide=["assignment"]))
        svi = SVI(user_model, guide, pyro.optim.Adam({"lr": 0.05}),
                  TraceEnum_ELBO(max_plate_nesting=1))
        losses = [svi.step(tokens) for _ in range(60)]
        assert losses[-1] < losses[0]
        values = guide.median(tokens)
        trace = poutine.trace(poutine.condition(user_model, values)).get_trace(tokens)
        if user_model is model:  # the composed log joint: priors plus the mixture likelihood
            comp_atoms = covariates @ values["beta"]
            nll = -brute_loglik(x, torch.bincount(tokens, minlength=8), comp_atoms,
                                values["weights"])
            log_prior = float(trace.nodes["beta"]["fn"].log_prob(values["beta"])
                              + trace.nodes["weights"]["fn"].log_prob(values["weights"]))
            joint = -_enum_log_joint(poutine.condition(lambda: model(tokens), values))
            assert joint == pytest.approx(nll - log_prior, rel=1e-10)
        else:  # the atoms' prior scale is the sampled tau
            assert float(trace.nodes["atoms"]["fn"].base_dist.scale.max()) == pytest.approx(
                float(values["tau"]))


def test_collapsed_model_under_trace_elbo_and_generation():
    x, atoms, weights, tokens, _ = _setup()
    counts = torch.bincount(tokens, minlength=8).double()
    nll = -brute_loglik(x, counts, atoms, weights)
    loss = Trace_ELBO().loss(lambda: collapsed_model(x, 3, counts, weights=weights, atoms=atoms),
                             _no_guide)
    assert loss == pytest.approx(nll, rel=1e-12)
    gen = collapsed_model(x, 3, num_obs=500, weights=weights, atoms=atoms)
    assert gen.shape == (8,) and float(gen.sum()) == 500
    toks = enumerated_model(x, 3, num_obs=50, weights=weights, atoms=atoms)
    assert toks.shape == (50,) and int(toks.max()) < 8


@pytest.mark.parametrize(("call", "match"), [
    (lambda x: enumerated_model(x, 3), "num_obs"),
    (lambda x: collapsed_model(x, 3), "num_obs"),
    (lambda x: enumerated_model(x, 3, torch.tensor([0, 9])), r"\[0, 7\]"),
    (lambda x: enumerated_model(x, 3, torch.tensor([[0, -1], [-1, -1]])), "empty group"),
    (lambda x: enumerated_model(x, 3, torch.tensor([0.5])), "integers"),
    (lambda x: collapsed_model(x, 3, torch.ones(7)), r"shape \(8,\)"),
    (lambda x: enumerated_model(x, 3, torch.tensor([0]), atoms_prior=dist.Normal(
        torch.zeros(2, 2), 1.0)), r"broadcast to shape \(3, 2\)"),
    (lambda x: enumerated_model(x, 3, torch.tensor([0]), atoms_prior=1.0), "distribution"),
    (lambda x: enumerated_model(x, 3, torch.tensor([0]), groups=torch.tensor([0, 1])),
     "one id per token|like tokens"),
])
def test_bad_model_input_is_named(call, match):
    x = _setup()[0]
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)
