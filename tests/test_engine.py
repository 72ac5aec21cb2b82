# SPDX-License-Identifier: Apache-2.0
"""The EM engine: one iteration (E-step, M-step) on counts and on grouped data."""

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.engine import EMProblem
from pyro_softmix.solvers import softmax_regression_step

from .helpers import brute_grouped_loglik, simulated


def test_em_gradient_is_the_loglik_gradient():
    """Fisher's identity: the M-step gradient at the current point is grad of the loglik."""
    d = simulated(p=40, L=3, K=2, N=2000)
    design = psm.standardize(d.features)
    z = design.transform(d.features)
    atoms = torch.randn(2, 3)
    log_w = torch.tensor([0.3, 0.7]).log()
    problem = EMProblem(z, d.counts, 2)
    logits = z @ atoms.T
    ll, w = problem.e_step(logits, problem.normalise(logits), log_w)
    _, _, info = softmax_regression_step(z, w, atoms)
    a = atoms.clone().requires_grad_(True)
    lw = log_w.clone().requires_grad_(True)
    mix = psm.SoftmaxMixture(z, a, torch.softmax(lw, 0))
    loglik = (d.counts * mix.logits).sum()
    ga, gw = torch.autograd.grad(loglik, [a, lw])
    assert ll == pytest.approx(float(loglik.detach()), rel=1e-12)
    assert torch.allclose(info.grad, ga, atol=1e-8)
    # For softmax weight logits: d l / d lw_k = W_k - N alpha_k.
    assert torch.allclose(w.sum(0) - problem.total * log_w.exp(), gw, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_the_column_e_step_of_few_components_is_the_brute_force_e_step(monkeypatch, k, dtype):
    """Up to ``engine.SMALL_K`` components the E-step works a column at a time; with 3 starts
    its log-likelihoods, weights w = n_j alpha_k q_k(j) / pi_j and their column sums are the
    brute-force ones (float64, from the definitions) and those of the broadcast path."""
    from pyro_softmix import engine

    gen = torch.Generator().manual_seed(k)
    p, r, s = 300, 4, 3
    z = torch.randn(p, r, generator=gen, dtype=dtype)
    counts = torch.randint(0, 20, (p,), generator=gen).to(dtype)
    atoms = torch.randn(s * k, r, generator=gen, dtype=dtype) * 3
    log_w = torch.randn(s, k, generator=gen, dtype=dtype).log_softmax(1).reshape(-1)
    problem = EMProblem(z, counts, k, None, s)
    logits = problem.logits(atoms)
    seen = []
    for small in (engine.SMALL_K, 0):  # the column path (k <= 4), then the broadcast path
        monkeypatch.setattr(engine, "SMALL_K", small)
        loglik, w = problem.e_step(logits, problem.normalise(logits), log_w)
        seen.append((loglik.clone(), w.clone(), problem.weight_sums.clone()))
    z64, a64 = z.double(), atoms.double().view(s, k, r)
    log_q = torch.log_softmax(torch.einsum("pr,skr->psk", z64, a64), dim=0)
    joint = log_q + log_w.double().view(s, k)
    log_pi = torch.logsumexp(joint, 2)
    want_w = counts.double()[:, None, None] * (joint - log_pi[:, :, None]).exp()
    want = (counts.double() @ log_pi, want_w.reshape(p, s * k), want_w.reshape(p, -1).sum(0))
    eps = torch.finfo(dtype).eps
    for got in seen:
        # (measured: at most 1, 23 and 10 eps; w's rounding grows with |logit| up to about 20)
        torch.testing.assert_close(got[0], want[0], rtol=16 * eps, atol=0)
        torch.testing.assert_close(got[1].double(), want[1], rtol=64 * eps, atol=64 * eps)
        torch.testing.assert_close(got[2].double(), want[2], rtol=32 * eps, atol=0)
    for a, b in zip(seen[0], seen[1], strict=True):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("rank, shared", [(40, 2), (64, 3)])
def test_reused_covariances_at_large_rank_reach_the_same_mle(monkeypatch, rank, shared):
    """Explicit M-steps from r = 32 on share one covariance between consecutive M-steps
    (quasi-Newton steps)."""
    from pyro_softmix import engine

    monkeypatch.setattr(engine, "HESSIAN_FREE_RANK", 10**6)  # the explicit M-steps
    assert engine.EMProblem(torch.zeros(3, rank), torch.ones(3), 2).cov_reuse == shared
    d = simulated(p=2000, L=rank, K=2, N=100_000, seed=4, norm=2.0)
    kw = dict(num_components=2, init="random", seed=0, tol=1e-12, max_iter=5000,
              accelerate=False)
    reused = psm.fit_em(d.features, counts=d.counts, **kw)
    monkeypatch.setattr(engine, "COV_REUSE", ())
    fresh = psm.fit_em(d.features, counts=d.counts, **kw)
    assert reused.converged and fresh.converged
    assert reused.loglik == pytest.approx(fresh.loglik, rel=1e-10, abs=0)
    h = np.asarray(reused.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))


def _grouped(p=30, L=2, K=2, G=40, size=6, seed=0, norm=3.0):
    """G groups of `size` draws, each group from one component of a simulated mixture."""
    d = psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=10, atom_norm=norm,
                     seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    comp = torch.multinomial(d.weights, G, replacement=True, generator=g)
    q = torch.softmax(d.atoms @ d.features.T, -1)  # (K, p)
    tokens = torch.cat([torch.multinomial(q[c], size, replacement=True, generator=g)
                        for c in comp.tolist()])
    groups = torch.arange(G).repeat_interleave(size) * 3 + 7  # arbitrary ids
    return d, tokens, groups, comp


def test_grouped_loglik_matches_brute_force_and_never_decreases():
    d, tokens, groups, _ = _grouped()
    fit = psm.fit_em(d.features, tokens=tokens, groups=groups, num_components=2, seed=0)
    assert fit.converged and fit.num_groups == 40
    assert fit.loglik == pytest.approx(brute_grouped_loglik(d.features, tokens, groups, fit.atoms,
                                                            fit.weights), rel=1e-12)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(fit.history, fit.history[1:], strict=False))
    assert torch.equal(fit.group_labels, torch.unique(groups))
    # The EM fixed point is a stationary point of the grouped log-likelihood.
    a = fit.atoms.clone().requires_grad_(True)
    lw = fit.weights.log().clone().requires_grad_(True)
    ll = 0.0
    comp = torch.log_softmax(a @ d.features.T, -1)
    for gid in torch.unique(groups):
        members = tokens[groups == gid]
        ll = ll + torch.logsumexp(torch.log_softmax(lw, 0) + comp[:, members].sum(1), 0)
    ga, gw = torch.autograd.grad(ll, [a, lw])
    assert float(ga.abs().max()) < 1e-4 and float(gw.abs().max()) < 1e-4


def test_group_responsibilities_are_the_bayes_posterior_and_recover_components():
    d, tokens, groups, comp = _grouped(G=60, size=15, norm=4.0)
    fit = psm.fit_em(d.features, tokens=tokens, groups=groups, num_components=2, seed=0)
    q = torch.log_softmax(fit.atoms @ d.features.T, -1)
    for row, gid in enumerate(torch.unique(groups)[:5]):
        joint = fit.weights.log() + q[:, tokens[groups == gid]].sum(1)
        assert torch.allclose(fit.group_responsibilities[row], torch.softmax(joint, 0),
                              atol=1e-10)
    labels = fit.group_responsibilities.argmax(1)
    agree = float((labels == comp).double().mean())
    assert max(agree, 1 - agree) > 0.95  # 15 draws per group at |t| = 4 separate them


def test_count_matrix_equals_ids_and_singleton_groups_equal_ungrouped():
    d, tokens, groups, _ = _grouped()
    by_ids = psm.fit_em(d.features, tokens=tokens, groups=groups, num_components=2, seed=3)
    labels, inverse = torch.unique(groups, return_inverse=True)
    matrix = torch.zeros(labels.shape[0], d.features.shape[0])
    matrix.index_put_((inverse, tokens), torch.ones(tokens.shape[0]), accumulate=True)
    by_matrix = psm.fit_em(d.features, groups=matrix, num_components=2, seed=3)
    assert by_matrix.loglik == pytest.approx(by_ids.loglik, rel=1e-12)
    assert torch.allclose(by_matrix.atoms, by_ids.atoms, atol=1e-8)
    # Each draw its own group: the grouped likelihood is the ungrouped one.
    single = psm.fit_em(d.features, tokens=tokens, groups=torch.arange(tokens.shape[0]),
                        num_components=2, seed=3)
    plain = psm.fit_em(d.features, tokens=tokens, num_components=2, seed=3)
    assert single.loglik == pytest.approx(plain.loglik, rel=1e-9)
    assert torch.allclose(single.weights, plain.weights, atol=1e-6)
    # BIC counts groups as the independent units.
    assert by_ids.bic == pytest.approx(-2 * by_ids.loglik + by_ids.num_params * torch.log(
        torch.tensor(40.0)).item())


def test_grouped_fit_saves_and_loads(tmp_path):
    d, tokens, groups, _ = _grouped()
    fit = psm.fit_em(d.features, tokens=tokens, groups=groups, num_components=2, seed=0)
    fit.save(tmp_path / "g.npz")
    again = psm.load_fit(tmp_path / "g.npz")
    assert again.num_groups == fit.num_groups
    assert torch.equal(again.group_labels, fit.group_labels)
    assert torch.allclose(again.group_responsibilities, fit.group_responsibilities)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(counts=torch.ones(30), groups=torch.zeros(5, dtype=torch.long)), "needs tokens"),
    (dict(tokens=torch.zeros(4, dtype=torch.long), groups=torch.zeros(3, dtype=torch.long)),
     "one id per token"),
    (dict(groups=torch.ones(3, 29)), r"shape \(G, 30\)"),
    (dict(groups=-torch.ones(3, 30)), "nonnegative"),
    (dict(groups=torch.cat([torch.ones(1, 30), torch.zeros(1, 30)])), "empty rows"),
    (dict(groups=torch.ones(2, 30), counts=torch.ones(30)), "takes no counts"),
    (dict(tokens=torch.zeros(4, dtype=torch.long), groups=torch.zeros(4)), "integers"),
    (dict(groups=torch.ones(2, 3, 30)), "count matrix"),
])
def test_bad_groups_are_named(kwargs, match):
    d = psm.simulate(num_points=30, num_features=2, num_components=2, num_obs=100, seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        psm.fit_em(d.features, num_components=2, **kwargs)
