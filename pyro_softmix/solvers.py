# SPDX-License-Identifier: Apache-2.0
"""Weighted softmax regression over a fixed set of support points, batched over components.

For features Z (p, r) and nonnegative weights w (p, K), component k's problem is

    maximise  f_k(t) = sum_j w_jk log softmax(Z t)_j - (l2 / 2) ||t||^2,     t in R^r.

It is concave; with W_k = sum_j w_jk and q = softmax(Z t) its gradient and negative Hessian are

    g_k = Z^T (w_k - W_k q) - l2 t,
    H_k = W_k Z^T (diag q - q q^T) Z + l2 I = W_k sum_j q_j (z_j - m)(z_j - m)^T + l2 I,

with m = Z^T q. At the maximiser g_k = 0: the q-weighted mean of the features matches the
w-weighted one (moment matching). This is the M-step of EM for softmax mixtures, and with one
"support point" per class it is the gate of a mixture of experts.

The Newton direction is computed by a batched Cholesky solve with a ridge that grows until the
factorisation succeeds; steps are damped by Armijo backtracking, per component, so each accepted
step increases f_k. Memory is O(pK) plus a (chunk, K, r) temporary for the Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import as_tensor, check_positive_float, check_positive_int, default_chunk_size

_ARMIJO = 1e-4


def _weighted_gram(features: torch.Tensor, probs: torch.Tensor, centres: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """sum_j probs_jk (z_j - c_k)(z_j - c_k)^T for every k, chunked over j.

    Args:
        features: (p, r).  probs: (p, K) nonnegative.  centres: (K, r).
    Returns:
        (K, r, r) symmetric positive semidefinite matrices.
    """
    p, r = features.shape
    k = probs.shape[1]
    chunk = chunk_size or default_chunk_size(p, k * r, features.element_size())
    out = features.new_zeros(k, r, r)
    for s in range(0, p, chunk):
        zc = features[s:s + chunk]
        y = (zc.unsqueeze(0) - centres.unsqueeze(1)) * probs[s:s + chunk].T.sqrt().unsqueeze(-1)
        out += y.transpose(1, 2) @ y
    return out


def _newton_direction(grad: torch.Tensor, hess: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Solve hess d = grad, batched; add a growing ridge where Cholesky fails.

    Args:
        grad: (K, r).  hess: (K, r, r), symmetric positive semidefinite.
    Returns:
        (K, r) directions; zero for a batch member whose Hessian is zero.
    """
    r = hess.shape[-1]
    eye = torch.eye(r, dtype=hess.dtype, device=hess.device)
    level = hess.diagonal(dim1=-2, dim2=-1).mean(-1).abs()  # (K,)
    ridge = 10 * torch.finfo(hess.dtype).eps * level
    usable = level > 0
    safe_level = torch.where(usable, level, torch.ones_like(level))
    chol = None
    for _ in range(max_tries):
        mat = hess + (torch.where(usable, ridge, safe_level))[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(mat)
        failed = info > 0
        if not bool(failed.any()):
            break
        ridge = torch.where(failed, ridge * 100 + 1e-6 * safe_level, ridge)
    d = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
    d = torch.where(usable[:, None] & torch.isfinite(d), d, torch.zeros_like(d))
    return d


def _objective(lin: torch.Tensor, total: torch.Tensor, logits: torch.Tensor,
               atoms: torch.Tensor, l2: float) -> torch.Tensor:
    """f_k = lin_k . t_k - W_k logsumexp_j(logits_jk) - l2/2 |t_k|^2, shape (K,)."""
    f = (lin * atoms).sum(-1) - total * torch.logsumexp(logits, 0)
    if l2:
        f = f - 0.5 * l2 * (atoms * atoms).sum(-1)
    return f


@dataclass
class NewtonStepInfo:
    """Diagnostics of one batched Newton step (all tensors of shape (K,) unless noted).

    Attributes:
        grad: (K, r) gradient g_k at the starting atoms.
        step: (K,) accepted step length (0 where no ascent step was found).
        gain: (K,) predicted increase g_k . d_k of the full Newton step.
        objective: (K,) f_k at the accepted atoms.
    """

    grad: torch.Tensor
    step: torch.Tensor
    gain: torch.Tensor
    objective: torch.Tensor


def softmax_regression_step(features: torch.Tensor, weights: torch.Tensor, atoms: torch.Tensor,
                            logits: torch.Tensor | None = None, *, l2: float = 0.0,
                            chunk_size: int | None = None, max_backtracks: int = 30,
                            ) -> tuple[torch.Tensor, torch.Tensor, NewtonStepInfo]:
    """One damped Newton step for every component's weighted softmax regression.

    Args:
        features: (p, r) support-point features Z.
        weights: (p, K) nonnegative weights w (counts times responsibilities in EM).
        atoms: (K, r) current parameters T.
        logits: (p, K) ``features @ atoms.T`` if already known (saves one product).
        l2: ridge penalty (a Normal(0, 1/l2) prior on each coordinate); 0 for none.
        chunk_size: rows per chunk for the Hessian.
        max_backtracks: halvings of the step before giving up on a component.

    Returns:
        ``(new_atoms, new_logits, info)``; ``new_logits = features @ new_atoms.T``.

    Example:
        >>> z = torch.randn(50, 2, dtype=torch.float64)
        >>> w = torch.rand(50, 3, dtype=torch.float64)
        >>> t, lg, info = softmax_regression_step(z, w, torch.zeros(3, 2, dtype=torch.float64))
        >>> t.shape, lg.shape, bool((info.step > 0).all())
        ((3, 2), (50, 3), True)
    """
    if logits is None:
        logits = features @ atoms.T
    total = weights.sum(0)  # (K,)
    lse = torch.logsumexp(logits, 0)
    q = torch.exp(logits - lse)
    # One product gives both weighted means: Z^T w and Z^T q.
    both = features.T @ torch.cat([weights, q], 1)  # (r, 2K)
    k = atoms.shape[0]
    lin, mean_q = both[:, :k].T, both[:, k:].T  # (K, r)
    grad = lin - total[:, None] * mean_q
    if l2:
        grad = grad - l2 * atoms
    hess = total[:, None, None] * _weighted_gram(features, q, mean_q, chunk_size)
    if l2:
        hess = hess + l2 * torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    direction = _newton_direction(grad, hess)
    gain = (grad * direction).sum(-1)
    f0 = _objective(lin, total, logits, atoms, l2)
    # Below this predicted gain the objective cannot resolve the change in this dtype: a full
    # Newton step on a concave function is then taken without a test.
    noise = 64 * torch.finfo(features.dtype).eps * (
        (lin * atoms).sum(-1).abs() + total * lse.abs() + 1)
    step = torch.ones_like(total)
    done = torch.zeros_like(total, dtype=torch.bool)
    new_atoms, new_logits, f1 = atoms, logits, f0
    for _ in range(max_backtracks + 1):
        new_atoms = atoms + step[:, None] * direction
        new_logits = features @ new_atoms.T
        f1 = _objective(lin, total, new_logits, new_atoms, l2)
        ok = (f1 >= f0 + _ARMIJO * step * gain) | (gain <= noise)
        done = done | ok
        if bool(done.all()):
            break
        step = torch.where(done, step, step / 2)
    if not bool(done.all()):
        # No ascent step found for some components (at a maximum up to rounding): keep them.
        step = torch.where(done, step, torch.zeros_like(step))
        new_atoms = atoms + step[:, None] * direction
        new_logits = torch.where(done[None, :], new_logits, logits)
        f1 = torch.where(done, f1, f0)
    return new_atoms, new_logits, NewtonStepInfo(grad=grad, step=step, gain=gain, objective=f1)


@dataclass
class SoftmaxRegressionResult:
    """Result of :func:`fit_softmax_regression`.

    Attributes:
        atoms: (K, r) maximisers.  objective: (K,) f_k at them.  grad_norm: (K,) |g_k| there.
        num_steps: Newton steps taken.  converged: whether every |g_k| fell below tolerance.
    """

    atoms: torch.Tensor
    objective: torch.Tensor
    grad_norm: torch.Tensor
    num_steps: int
    converged: bool


def fit_softmax_regression(features, weights, init=None, *, l2: float = 0.0,
                           max_steps: int = 100, tol: float | None = None,
                           chunk_size: int | None = None) -> SoftmaxRegressionResult:
    """Maximise every component's weighted softmax log-likelihood by damped Newton.

    Args:
        features: (p, r) tensor or array.
        weights: (p, K) nonnegative weights (a column of counts per independent problem).
        init: (K, r) starting atoms (default zeros).
        l2: ridge penalty; needed for a finite maximiser when some w_k is concentrated on the
            points that are extreme in some direction.
        max_steps: Newton steps at most.
        tol: stop when |g_k| <= tol * (W_k + 1) for every k (default: 1e3 * eps of the dtype).
        chunk_size: rows per chunk for the Hessian.

    Returns:
        :class:`SoftmaxRegressionResult`.

    Example:
        >>> z = torch.randn(200, 3, dtype=torch.float64)
        >>> w = torch.rand(200, 2, dtype=torch.float64)
        >>> res = fit_softmax_regression(z, w)
        >>> res.converged
        True
    """
    z = as_tensor(features, "features")
    w = as_tensor(weights, "weights")
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"features must be a 2-D floating tensor, got shape {tuple(z.shape)}")
    if w.dim() != 2 or w.shape[0] != z.shape[0]:
        raise ValueError(f"weights must have shape ({z.shape[0]}, K), got {tuple(w.shape)}")
    w = w.to(z)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and nonnegative")
    l2 = check_positive_float(l2, "l2", allow_zero=True)
    max_steps = check_positive_int(max_steps, "max_steps")
    k, r = w.shape[1], z.shape[1]
    t = z.new_zeros(k, r) if init is None else as_tensor(init, "init").to(z).clone()
    if t.shape != (k, r):
        raise ValueError(f"init must have shape ({k}, {r}), got {tuple(t.shape)}")
    tol = 1e3 * torch.finfo(z.dtype).eps if tol is None else tol
    scale = w.sum(0) + 1
    logits = z @ t.T
    converged, steps = False, 0
    info = None
    for steps in range(1, max_steps + 1):  # noqa: B007
        t, logits, info = softmax_regression_step(z, w, t, logits, l2=l2, chunk_size=chunk_size)
        if bool((info.grad.norm(dim=-1) <= tol * scale).all()) or bool((info.step == 0).all()):
            converged = bool((info.grad.norm(dim=-1) <= tol * scale).all())
            break
    # Report the gradient at the returned atoms.
    q = torch.softmax(logits, 0)
    grad = z.T @ w - (z.T @ q) * w.sum(0)
    grad = grad.T - l2 * t
    converged = converged or bool((grad.norm(dim=-1) <= tol * scale).all())
    return SoftmaxRegressionResult(atoms=t, objective=info.objective, grad_norm=grad.norm(dim=-1),
                                   num_steps=steps, converged=converged)
