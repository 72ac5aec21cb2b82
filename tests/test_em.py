# SPDX-License-Identifier: Apache-2.0
"""fit_em, the public entry point: correctness against brute force and known laws, its options,
inputs and errors."""

import math
import warnings

import numpy as np
import pytest
import torch

import pyro_softmix as psm

from .conftest import DEVICES
from .helpers import best_permutation, outlier_data, simulated


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K", [2, 4])
def test_loglik_never_decreases(seed, K):
    d = simulated(p=400, L=4, K=K, N=20_000, seed=seed, norm=3.0)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=K, init="random", seed=seed,
                     max_iter=2000)
    h = np.asarray(fit.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    assert fit.converged and fit.n_iter == len(h) - 1


def test_m_step_moment_matching_at_convergence():
    d = simulated(p=300, L=3, K=3, N=30_000)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    # At a fixed point of EM: X^T w_k = W_k X^T q_k, with w = n r in feature coordinates.
    x = d.features
    resp = fit.responsibilities()
    w = d.counts[:, None] * resp
    q = torch.softmax(x @ fit.atoms.T, 0)
    lhs = x.T @ w
    rhs = (x.T @ q) * w.sum(0)
    # The score's sampling s.d. is of order sqrt(N); at convergence the imbalance must be a tiny
    # fraction of it (a wrong M-step leaves an imbalance of order N).
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-2 * math.sqrt(float(d.counts.sum())))
    assert torch.allclose(fit.weights, w.sum(0) / d.counts.sum(), atol=1e-8)


def test_counts_and_tokens_give_identical_fits():
    d = simulated(N=5000, tokens=True)
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=4)
    b = psm.fit_em(d.features, tokens=d.tokens, num_components=3, seed=4)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.weights, b.weights)
    assert a.loglik == b.loglik and a.num_obs == b.num_obs == 5000


def test_affine_change_of_features_transforms_atoms():
    d = simulated(p=300, L=3, K=3, N=30_000)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 3, generator=g) + 3 * torch.eye(3)
    c = torch.tensor([10.0, -4.0, 0.5])
    x2 = d.features @ A + c
    start = {"weights": torch.tensor([0.3, 0.3, 0.4]), "atoms": 0.8 * d.atoms.flip(0)}
    start2 = {"weights": start["weights"], "atoms": start["atoms"] @ torch.linalg.inv(A).T}
    f1 = psm.fit_em(d.features, counts=d.counts, num_components=3, init=start)
    f2 = psm.fit_em(x2, counts=d.counts, num_components=3, init=start2)
    assert f2.loglik == pytest.approx(f1.loglik, rel=1e-11)
    assert torch.allclose(f2.atoms, f1.atoms @ torch.linalg.inv(A).T, atol=1e-6)
    assert torch.allclose(f2.weights, f1.weights, atol=1e-8)


def test_float32_and_float64_agree():
    d = simulated(p=1000, L=4, K=3, N=200_000, seed=2)
    start = {"weights": torch.full((3,), 1 / 3), "atoms": d.atoms * 0.7}
    f64 = psm.fit_em(d.features, counts=d.counts, num_components=3, init=start)
    f32 = psm.fit_em(d.features.float(), counts=d.counts, num_components=3, init=start)
    assert f32.atoms.dtype == torch.float32 and f64.atoms.dtype == torch.float64
    assert f32.loglik == pytest.approx(f64.loglik, rel=1e-6)
    assert torch.allclose(f32.atoms.double(), f64.atoms, atol=2e-3)
    assert torch.allclose(f32.weights.double(), f64.weights, atol=1e-3)
    f32b = psm.fit_em(d.features, counts=d.counts, num_components=3, init=start,
                      dtype=torch.float32)
    assert f32b.atoms.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_request_and_matches_cpu(device):
    d = simulated(p=500, L=3, K=2, N=20_000)
    f = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0, device=device)
    assert f.atoms.device.type == device and f.weights.device.type == device
    ref = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    assert torch.allclose(f.atoms.cpu(), ref.atoms, atol=1e-6)


def test_chunked_fit_equals_unchunked():
    d = simulated()
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    b = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, chunk_size=64)
    # Chunked sums round differently, so the race may hand another (equally good) survivor
    # the final run: the same maximum, up to the components' order.
    assert b.loglik == pytest.approx(a.loglik, rel=1e-12, abs=0)
    perm = list(best_permutation(b.atoms, a.atoms))
    assert torch.allclose(b.atoms[perm], a.atoms, atol=1e-4)  # both within tol of the MLE
    # From one given start (no race to choose among survivors) chunking changes only the
    # order of sums: the same path, iteration for iteration.
    start = {"weights": d.weights, "atoms": d.atoms}
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, init=start)
    b = psm.fit_em(d.features, counts=d.counts, num_components=3, init=start, chunk_size=64)
    assert b.n_iter == a.n_iter and torch.allclose(b.atoms, a.atoms, atol=1e-8)


def test_seeded_starts_are_reproducible():
    d = simulated()
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=11)
    b = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=11)
    assert torch.equal(a.atoms, b.atoms) and a.init.startswith("auto (race of 4 starts")
    c = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=11, num_inits=3)
    e = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=11, num_inits=3)
    assert torch.equal(c.atoms, e.atoms) and c.init.startswith("auto (race of 3 starts")


def test_em_from_truth_lands_within_standard_errors():
    """p=2000, L=5, K=3, N=10^6: the MLE is within chi-square bounds of the truth."""
    d = psm.simulate(num_points=2000, num_features=5, num_components=3, num_obs=1_000_000,
                     seed=3)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3,
                     init={"weights": d.weights, "atoms": d.atoms})
    assert fit.converged

    def log_pi(params):
        logits_w = torch.cat([params[:2], torch.zeros(1)])
        atoms = params[2:].reshape(3, 5)
        comp = torch.log_softmax(atoms @ d.features.T, -1)
        return torch.logsumexp(comp + torch.log_softmax(logits_w, 0)[:, None], 0)

    def pack(weights, atoms):
        lw = weights.log()
        return torch.cat([lw[:2] - lw[2], atoms.reshape(-1)])

    truth = pack(d.weights, d.atoms)
    perm = list(best_permutation(fit.atoms, d.atoms))
    est = pack(fit.weights[perm], fit.atoms[perm])
    jac = torch.autograd.functional.jacobian(log_pi, truth)  # (p, 17)
    pi = log_pi(truth).exp()
    fisher = float(d.counts.sum()) * (jac.T * pi) @ jac
    delta = est - truth
    se = torch.linalg.inv(fisher).diagonal().sqrt()
    assert float((delta.abs() / se).max()) < 4.5
    assert float(delta @ fisher @ delta) < 40.8  # chi-square(17) 0.999 quantile


def test_rank_deficient_features_fit_the_identifiable_part():
    d = simulated(p=300, L=3, K=2, N=20_000)
    x = torch.cat([d.features, torch.full((300, 1), 2.0), d.features[:, :1] - d.features[:, 1:2]],
                  1)
    start = {"weights": torch.tensor([0.5, 0.5]), "atoms": d.atoms}
    start_big = {"weights": start["weights"], "atoms": torch.cat([d.atoms, torch.zeros(2, 2)], 1)}
    with pytest.warns(psm.IdentifiabilityWarning):
        big = psm.fit_em(x, counts=d.counts, num_components=2, init=start_big)
    small = psm.fit_em(d.features, counts=d.counts, num_components=2, init=start)
    assert big.rank == 3 and big.num_params == 1 + 2 * 3
    assert big.loglik == pytest.approx(small.loglik, rel=1e-10)
    assert torch.allclose(big.probs(), small.probs(), atol=1e-10)
    xc = x - x.mean(0)
    assert torch.allclose(big.atoms, (torch.linalg.pinv(xc) @ xc @ big.atoms.T).T, atol=1e-8)


# --- bad input -------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(20, 2)
    n = torch.ones(20)
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    inf_n = n.clone()
    inf_n[0] = float("inf")
    return [
        (dict(features=x[0], counts=n), ValueError, "features must be 2-D"),
        (dict(features=nan_x, counts=n), ValueError, "features contains NaN"),
        (dict(features=x, counts=-n), ValueError, "counts must be nonnegative"),
        (dict(features=x, counts=torch.full((20,), float("nan"))), ValueError, "counts contains"),
        (dict(features=x, counts=inf_n), ValueError, "counts contains NaN or inf"),
        (dict(features=x, counts=n[:5]), ValueError, r"counts must have shape \(20,\)"),
        (dict(features=x, counts=torch.zeros(20)), ValueError, "counts are all zero"),
        (dict(features=x), ValueError, "exactly one of counts"),
        (dict(features=x, counts=n, tokens=torch.arange(3)), ValueError, "exactly one of"),
        (dict(features=x, tokens=torch.tensor([0, 20])), ValueError, r"tokens must lie in \[0, 19\]"),
        (dict(features=x, tokens=torch.tensor([-1, 2])), ValueError, "tokens must lie in"),
        (dict(features=x, tokens=torch.tensor([0.0, 1.5])), TypeError, "tokens must be integers"),
        (dict(features=x, tokens=torch.zeros(2, 2, dtype=torch.long)), ValueError, "tokens must be 1-D"),
        # fit_em(x, n, 3): the third positional argument is tokens.
        (dict(features=x, counts=n, tokens=3), TypeError, "pass num_components= by keyword"),
        (dict(features=x, counts=n, num_components=0), ValueError, "num_components must be in"),
        (dict(features=x, counts=n, num_components=21), ValueError, "num_components must be in"),
        (dict(features=x, counts=n, num_components=2.5), TypeError, "num_components must be an int"),
        (dict(features=x, counts=n, init="kmeans"), ValueError, "init must be"),
        (dict(features=x, counts=n, max_iter=0), ValueError, "max_iter must be"),
        (dict(features=x, counts=n, tol=-1.0), ValueError, "tol must be"),
        (dict(features=x, counts=n, dtype=torch.int32), ValueError, "dtype must be"),
        (dict(features=x, counts=n, device="tpu9"), ValueError, "device"),
        (dict(features="x.npy", counts=n), TypeError, "features must be a torch.Tensor"),
        (dict(features=x, counts=n, num_components=2,
              init={"weights": torch.tensor([0.5, 0.6]), "atoms": torch.zeros(2, 2)}),
         ValueError, "init weights must sum to 1"),
        (dict(features=x, counts=n, num_components=2,
              init={"weights": torch.tensor([0.5, 0.5]), "atoms": torch.zeros(3, 2)}),
         ValueError, "init atoms must have 2 rows"),
        (dict(features=x, counts=n, seed="abc"), TypeError, "seed must be"),
        (dict(features=x, counts=n, accelerate=1), TypeError, "accelerate must be True or False"),
        (dict(features=x, counts=n, prior_scale=0.0), ValueError, "prior_scale must be"),
    ]


@pytest.mark.parametrize("kwargs,error,match", _bad_cases())
def test_bad_input_is_rejected_with_the_argument_named(kwargs, error, match):
    kwargs = {"num_components": 2} | kwargs
    with pytest.raises(error, match=match):
        psm.fit_em(**kwargs)


def test_inputs_are_not_modified():
    d = simulated(tokens=True)
    x_np = d.features.numpy().copy()
    x_keep, n_keep, t_keep = x_np.copy(), d.counts.clone(), d.tokens.clone()
    start = {"weights": d.weights.clone(), "atoms": d.atoms.clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", psm.ConvergenceWarning)
        psm.fit_em(x_np, counts=d.counts, num_components=3, init=start, max_iter=5)
        psm.fit_em(x_np, tokens=d.tokens, num_components=3, max_iter=5, dtype=torch.float32,
                   seed=0)
    assert np.array_equal(x_np, x_keep)
    assert torch.equal(d.counts, n_keep) and torch.equal(d.tokens, t_keep)
    assert torch.equal(start["weights"], d.weights) and torch.equal(start["atoms"], d.atoms)


def test_numpy_and_integer_inputs_are_accepted():
    d = simulated()
    fit = psm.fit_em(d.features.numpy(), counts=d.counts.numpy(), num_components=3, seed=0)
    ref = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    assert torch.equal(fit.atoms, ref.atoms)
    xi = torch.randint(-3, 4, (200, 2))
    fi = psm.fit_em(xi, counts=torch.ones(200), num_components=1, seed=0)
    assert fi.atoms.dtype == torch.get_default_dtype()
    # Half-precision features are computed in float32, never in half precision.
    for half in (torch.float16, torch.bfloat16):
        fh = psm.fit_em(d.features.to(half), counts=d.counts, num_components=3, seed=0)
        assert fh.atoms.dtype == torch.float32 and fh.converged


def test_map_em_is_stationary_for_the_models_prior():
    x, counts = outlier_data()
    fit = psm.fit_em(x, counts, num_components=2, prior_scale=2.0, seed=0)
    atoms = fit.atoms.clone().requires_grad_(True)
    logits = fit.weights.log().clone().requires_grad_(True)
    mix = psm.SoftmaxMixture(x, atoms, torch.softmax(logits, 0))
    prior = psm.models.default_atoms_prior(x, 2, 2.0)
    objective = (counts * mix.logits).sum() + prior.log_prob(atoms)
    ga, gl = torch.autograd.grad(objective, [atoms, logits])
    scale = float(counts.sum())
    # Measured: 4e-7 N (atoms) and 1.4e-7 N (weights) at the default tol.
    assert float(ga.abs().max()) < 2e-6 * scale and float(gl.abs().max()) < 2e-6 * scale
    assert abs(fit.history[-1] - (fit.loglik + float(prior.log_prob(fit.atoms))
                                  - float(prior.log_prob(torch.zeros_like(fit.atoms))))) < 1e-6
    assert fit.prior_scale == 2.0
