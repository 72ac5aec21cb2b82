# SPDX-License-Identifier: Apache-2.0
import math
import warnings

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import accelerate
from pyro_softmix.engine import EMProblem
from pyro_softmix.solvers import softmax_regression_step

from .conftest import DEVICES
from .helpers import best_permutation, brute_loglik


def _data(p=300, L=4, K=3, N=50_000, seed=0, norm=3.0, tokens=False):
    return psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=N,
                        atom_norm=norm, seed=seed, return_tokens=tokens)


@pytest.mark.filterwarnings("ignore::pyro_softmix.ConvergenceWarning")
def test_loglik_and_responsibilities_match_brute_force():
    d = _data(p=12, L=2, K=3, N=500)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=1, max_iter=30)
    assert fit.loglik == pytest.approx(brute_loglik(d.features, d.counts, fit.atoms,
                                                    fit.weights), rel=1e-12)
    # Responsibilities: alpha_k q_k(j) / pi_j by explicit sums.
    comp = torch.stack([torch.softmax(d.features @ a, 0) for a in fit.atoms], 1)
    joint = comp * fit.weights
    assert torch.allclose(fit.responsibilities(), joint / joint.sum(1, keepdim=True), atol=1e-12)
    assert torch.allclose(fit.probs(), joint.sum(1), atol=1e-14)


def test_em_gradient_is_the_loglik_gradient():
    """Fisher's identity: the M-step gradient at the current point is grad of the loglik."""
    d = _data(p=40, L=3, K=2, N=2000)
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


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K", [2, 4])
def test_loglik_never_decreases(seed, K):
    d = _data(p=400, L=4, K=K, N=20_000, seed=seed, norm=3.0)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=K, init="random", seed=seed,
                     max_iter=2000)
    h = np.asarray(fit.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    assert fit.converged and fit.n_iter == len(h) - 1


def test_m_step_moment_matching_at_convergence():
    d = _data(p=300, L=3, K=3, N=30_000)
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
    d = _data(N=5000, tokens=True)
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=4)
    b = psm.fit_em(d.features, tokens=d.tokens, num_components=3, seed=4)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.weights, b.weights)
    assert a.loglik == b.loglik and a.num_obs == b.num_obs == 5000


def test_affine_change_of_features_transforms_atoms():
    d = _data(p=300, L=3, K=3, N=30_000)
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
    d = _data(p=1000, L=4, K=3, N=200_000, seed=2)
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
    d = _data(p=500, L=3, K=2, N=20_000)
    f = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0, device=device)
    assert f.atoms.device.type == device and f.weights.device.type == device
    ref = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    assert torch.allclose(f.atoms.cpu(), ref.atoms, atol=1e-6)


def test_chunked_fit_equals_unchunked():
    d = _data()
    a = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    b = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, chunk_size=64)
    assert torch.allclose(a.atoms, b.atoms, atol=1e-8) and a.n_iter == b.n_iter


def test_seeded_starts_are_reproducible():
    d = _data()
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


def test_not_converged_warns():
    d = _data()
    with pytest.warns(psm.ConvergenceWarning, match="did not converge in max_iter=2"):
        fit = psm.fit_em(d.features, counts=d.counts, num_components=3, max_iter=2, seed=0,
                         init="random")
    assert not fit.converged and fit.n_iter == 2 and len(fit.history) == 3
    # Under "auto" the race is not counted in n_iter (its label says what it spent).
    with pytest.warns(psm.ConvergenceWarning):
        auto = psm.fit_em(d.features, counts=d.counts, num_components=3, max_iter=2, seed=0)
    assert auto.n_iter == 2 and np.all(np.diff(auto.history) >= 0)


def test_rank_deficient_features_fit_the_identifiable_part():
    d = _data(p=300, L=3, K=2, N=20_000)
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


def test_save_and_load_round_trip_without_pickle(tmp_path):
    d = _data()
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    fit.save(tmp_path / "a.npz")
    fit.save(tmp_path / "b.npz", include_features=True)
    a = psm.load_fit(tmp_path / "a.npz")
    b = psm.load_fit(tmp_path / "b.npz")
    for loaded in (a, b):
        assert torch.equal(loaded.atoms, fit.atoms) and torch.equal(loaded.weights, fit.weights)
        assert loaded.loglik == fit.loglik and loaded.history == fit.history
        assert loaded.bic == fit.bic and loaded.converged == fit.converged
    assert torch.allclose(b.probs(), fit.probs())
    with pytest.raises(ValueError, match="pass features="):
        a.probs()
    assert torch.allclose(a.probs(d.features), fit.probs())
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a pyro-softmix fit"):
        psm.load_fit(tmp_path / "other.npz")


def test_summary_and_information_criteria():
    d = _data()
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    k = 2 + 3 * 4
    assert fit.bic == pytest.approx(-2 * fit.loglik + k * math.log(50_000))
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * k)
    text = fit.summary()
    assert "K=3" in text and "converged" in text and f"{fit.loglik:.8g}" in text
    assert repr(fit).startswith("SoftmaxMixtureFit(K=3, p=300, L=4")


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
    d = _data(tokens=True)
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
    d = _data()
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


def test_progress_bar_is_shown_on_request_and_off_otherwise(capsys):
    d = _data()
    psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "EM starts:" in err and "EM:" in err and "/1000" in err
    psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)  # stderr is not a tty
    assert capsys.readouterr().err == ""


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
    d = _data(p=400, L=4, K=4, N=20_000, seed=seed, norm=2.0)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_marginal_gradient_and_hessian_match_autograd(dtype):
    from pyro_softmix._marginal import marginal_gradient, marginal_hessian

    d = _data(p=30, L=2, K=3, N=500, seed=1, norm=2.0)
    counts = d.counts.double()
    counts[:5] = 0  # rows without draws drop out of the Hessian
    z = psm.standardize(d.features).transform(d.features)
    k, r = 3, 2
    atoms = torch.randn(k, r, generator=torch.Generator().manual_seed(0))
    eta = torch.tensor([0.3, -0.2, 0.0])

    def loglik(theta):
        t = theta[:k * r].view(k, r)
        log_w = torch.log_softmax(torch.cat([theta[k * r:], torch.zeros(1)]), 0)
        return counts @ torch.logsumexp(torch.log_softmax(z @ t.T, 0) + log_w, 1)

    theta = torch.cat([atoms.reshape(-1), eta[:-1]])
    grad_ref = torch.autograd.functional.jacobian(loglik, theta)
    hess_ref = torch.autograd.functional.hessian(loglik, theta)
    problem = EMProblem(z.to(dtype), counts, k)
    st = problem.start(atoms.to(dtype), torch.log_softmax(eta, 0).to(dtype))
    grad, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    hess = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    # Measured (relative to the largest Hessian entry): 7e-16 in float64, 9e-7 in float32.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(hess_ref.abs().max())
    assert torch.allclose(grad, grad_ref, atol=tol * scale, rtol=0)
    assert torch.allclose(hess, hess_ref, atol=tol * scale, rtol=0)


def test_marginal_hessian_is_the_same_in_chunks():
    """B^T B accumulated over chunks of rows (the last one shorter) equals one pass."""
    from pyro_softmix._marginal import marginal_gradient, marginal_hessian

    d = _data(p=1000, L=4, K=3, N=5000, seed=2, norm=2.0)
    z = psm.standardize(d.features).transform(d.features)
    problem = EMProblem(z, d.counts, 3)
    atoms = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    st = problem.start(atoms, torch.tensor([0.2, 0.3, 0.5]).log())
    w_before = st.w.clone()
    _, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    whole = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    support = int((d.counts > 0).sum())
    assert support % 100 != 0
    chunked = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces,
                               chunk_size=100)
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-12 * float(whole.abs().max()))
    assert torch.equal(st.w, w_before)  # the E-step weights are read, not written


def _hessian_case(p=3000, L=10, K=3, seed=4):
    """A float64 problem with K L + K >= 32 coordinates (mixed-precision Hessians) at a point
    near its MLE; returns (problem, state, gradient pieces)."""
    from pyro_softmix._marginal import marginal_gradient

    d = _data(p=p, L=L, K=K, N=200_000, seed=seed, norm=2.0)
    design = psm.standardize(d.features)
    problem = EMProblem(design.transform(d.features), d.counts, K)
    st = problem.start(design.atoms_to_z(d.atoms), d.weights.log())
    _, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    return problem, st, pieces


def test_mixed_precision_hessian_is_float32_accurate_and_precise_on_request(monkeypatch):
    """The Hessian's products over the rows of a float64 problem run in float32 chunks summed
    in float64: within float32 accuracy of the float64 Hessian, in one chunk or many;
    ``precise=True`` gives the all-float64 Hessian."""
    from pyro_softmix import _marginal
    from pyro_softmix._marginal import marginal_hessian, mixed_precision

    problem, st, pieces = _hessian_case()
    args = (problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    assert mixed_precision(problem.z, 3) and not mixed_precision(problem.z.float(), 3)
    mixed = marginal_hessian(*args)
    precise = marginal_hessian(*args, precise=True)
    monkeypatch.setattr(_marginal, "_MIXED_CHUNK_ROWS", 700)  # several chunks, a short last one
    chunked = marginal_hessian(*args)
    monkeypatch.setattr(_marginal, "_MIXED_MIN_DIM", 10**9)
    assert torch.equal(marginal_hessian(*args), precise)
    scale = float(precise.abs().max())
    for h in (mixed, chunked):
        err = float((h - precise).abs().max()) / scale
        # Measured: 2e-7 relative (float32 rounding, not zero: the products did run in float32).
        assert 0 < err <= 1e-5


def test_a_hessian_indefinite_by_rounding_only_is_decided_in_float64(monkeypatch):
    """Where the mixed-precision Hessian looks indefinite by no more than float32 rounding, the
    Newton step decides concavity on the float64 Hessian; a clear saddle keeps the cheap one."""
    from pyro_softmix import accelerate

    problem, st, pieces = _hessian_case()
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

    d = _data(p=2000, L=10, K=3, N=200_000, seed=5, norm=2.0)
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
    d = _data(p=2000, L=5, K=3, N=200_000, seed=seed, norm=norm)
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
    x = _data(p=200, L=3, K=2, N=4000, seed=2, tokens=True)
    groups = torch.arange(4000) // 20
    kw = dict(groups=groups, num_components=2, seed=0, tol=1e-13, max_iter=20_000)
    fit = psm.fit_em(x.features, tokens=x.tokens, **kw)
    slow = psm.fit_em(x.features, tokens=x.tokens, accelerate=False, **kw)
    assert fit.converged and fit.loglik == pytest.approx(slow.loglik, rel=1e-11, abs=0)
    d = _data(p=300, L=3, K=2, N=30_000, seed=2)
    kw = dict(num_components=2, seed=0, prior_scale=0.5, tol=1e-13, max_iter=20_000)
    plain = psm.fit_em(d.features, counts=d.counts, accelerate=False, **kw)
    fast = psm.fit_em(d.features, counts=d.counts, **kw)
    assert fast.history[-1] == pytest.approx(plain.history[-1], rel=1e-11, abs=0)


@pytest.mark.parametrize("rank, shared", [(40, 2), (64, 3)])
def test_reused_covariances_at_large_rank_reach_the_same_mle(monkeypatch, rank, shared):
    """From r = 32 on, consecutive M-steps share one covariance (quasi-Newton steps)."""
    from pyro_softmix import engine

    assert engine.EMProblem(torch.zeros(3, rank), torch.ones(3), 2).cov_reuse == shared
    d = _data(p=2000, L=rank, K=2, N=100_000, seed=4, norm=2.0)
    kw = dict(num_components=2, init="random", seed=0, tol=1e-12, max_iter=5000,
              accelerate=False)
    reused = psm.fit_em(d.features, counts=d.counts, **kw)
    monkeypatch.setattr(engine, "COV_REUSE", ())
    fresh = psm.fit_em(d.features, counts=d.counts, **kw)
    assert reused.converged and fresh.converged
    assert reused.loglik == pytest.approx(fresh.loglik, rel=1e-10, abs=0)
    h = np.asarray(reused.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))


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
