# SPDX-License-Identifier: Apache-2.0
"""Weighted softmax regression over a fixed set of support points, batched over components.

For features Z (p, r) and nonnegative weights w (p, K), component k's problem is

    maximise  f_k(t) = sum_j w_jk log softmax(Z t)_j - (l2 / 2) ||t||^2,     t in R^r.

It is concave; with W_k = sum_j w_jk and q = softmax(Z t) its gradient and negative Hessian are

    g_k = Z^T (w_k - W_k q) - l2 t,
    H_k = W_k Z^T (diag q - q q^T) Z + l2 I = W_k sum_j q_j (z_j - m)(z_j - m)^T + l2 I,

with m = Z^T q. At the maximiser g_k = 0: the q-weighted mean of the features matches the
w-weighted one (moment matching). This is the M-step of EM for softmax mixtures (and of any
conditional logit with one shared choice set). The batched Newton machinery here (Cholesky with a
growing ridge, per-problem Armijo backtracking) is shared by the other regression M-steps.

The Newton direction is computed by a batched Cholesky solve with a ridge that grows until the
factorisation succeeds; steps are damped by Armijo backtracking, per component, so each accepted
step increases f_k. Memory is O(pK) plus a (chunk, K, r) temporary for the Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import as_tensor, check_positive_float, check_positive_int

_ARMIJO = 1e-4


#: Bytes of the (chunk, K, r) temporary of the Hessian products: small enough to stay in cache on
#: a CPU (larger chunks are slower there: allocation and memory traffic dominate), large on a GPU.
_GRAM_CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}


def _gram_chunk_rows(features: torch.Tensor, num_components: int) -> int:
    budget = _GRAM_CHUNK_BYTES.get(features.device.type, _GRAM_CHUNK_BYTES["cuda"])
    return max(64, budget // (num_components * features.shape[1] * features.element_size()))


def _weighted_gram(features: torch.Tensor, probs: torch.Tensor, chunk_size: int | None = None,
                   buffer: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j probs_jk z_j z_j^T for every k, chunked over j.

    Each chunk is one (r x c)(c x K r) matrix product into a single accumulator, with the
    (c, K, r) product of weights and features written into ``buffer`` when given, so a call
    makes no large allocation.

    Args:
        features: (p, r).  probs: (p, K) nonnegative.
        buffer: optional (chunk, K, r) scratch tensor (its length sets the chunk).
    Returns:
        (K, r, r) symmetric positive semidefinite matrices.
    """
    p, r = features.shape
    k = probs.shape[1]
    chunk = buffer.shape[0] if buffer is not None else (chunk_size or _gram_chunk_rows(features, k))
    acc = features.new_zeros(r, k * r)
    for s in range(0, p, chunk):
        zc = features[s:s + chunk]
        c = zc.shape[0]
        out = buffer[:c] if buffer is not None else None
        weighted = torch.mul(zc.unsqueeze(1), probs[s:s + chunk].unsqueeze(-1), out=out)
        acc.addmm_(zc.T, weighted.view(c, k * r))
    return acc.view(r, k, r).transpose(0, 1).contiguous()


def _column_logsumexp(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 of (p, K) logits; leaves softmax(logits, 0) in ``scratch``."""
    top = logits.amax(0)
    torch.sub(logits, top, out=scratch).exp_()
    total = scratch.sum(0)
    scratch.div_(total)
    return top + total.log()


class _Workspace:
    """Persistent buffers for repeated Newton steps on one (p, K, r) problem.

    Repeated multi-megabyte allocations are costly on CPUs (the allocator hands the memory back
    to the system and page-faults it in again), so the EM loop reuses these. Between steps,
    ``q`` holds softmax(logits, 0) of the current logits, whose log-normaliser the step returns,
    so neither the E-step nor the next step recomputes it.
    """

    def __init__(self, features: torch.Tensor, num_components: int,
                 chunk_size: int | None = None):
        p, r = features.shape
        new = features.new_empty
        self.q = new(p, num_components)
        self.scratch = new(p, num_components)
        self.logits = (new(p, num_components), new(p, num_components))
        chunk = min(p, chunk_size or _gram_chunk_rows(features, num_components))
        self.gram = new(chunk, num_components, r)

    def trial_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """A logits buffer that is not ``logits`` (so the current logits stay intact)."""
        a, b = self.logits
        return b if logits.data_ptr() == a.data_ptr() else a


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


def _objective(lin: torch.Tensor, total: torch.Tensor, lse: torch.Tensor,
               atoms: torch.Tensor, l2: float) -> torch.Tensor:
    """f_k = lin_k . t_k - W_k lse_k - l2/2 |t_k|^2, shape (K,)."""
    f = (lin * atoms).sum(-1) - total * lse
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
    ws = _Workspace(features, atoms.shape[0], chunk_size)
    new_atoms, new_logits, _, info = _newton_step(features, weights, atoms, logits, ws, l2=l2,
                                                  max_backtracks=max_backtracks)
    return new_atoms, new_logits, info


def _newton_step(features, weights, atoms, logits, ws: _Workspace, lse=None, *,
                 l2: float = 0.0, max_backtracks: int = 30):
    """:func:`softmax_regression_step` on preallocated buffers.

    ``lse`` is the column log-normaliser of ``logits`` when ``ws.q`` already holds their
    softmax (as after a previous step); if None both are computed. Returns ``(new_atoms,
    new_logits, new_lse, info)``; ``new_logits`` lives in one of ``ws.logits`` (never in the
    ``logits`` passed in) and ``ws.q`` then holds its softmax.
    """
    total = weights.sum(0)  # (K,)
    if lse is None:
        lse = _column_logsumexp(logits, ws.q)
    q = ws.q
    # (K, p) @ (p, r): much faster than features.T @ weights through a transposed view.
    lin = weights.T @ features  # (K, r): w-weighted sums of z
    mean_q = q.T @ features  # (K, r): q-weighted means of z
    grad = lin - total[:, None] * mean_q
    if l2:
        grad = grad - l2 * atoms
    # Covariance of z under q_k: sum_j q_j z_j z_j^T - m m^T (the columns of q sum to 1).
    cov = _weighted_gram(features, q, buffer=ws.gram) - mean_q[:, :, None] * mean_q[:, None, :]
    hess = total[:, None, None] * cov
    if l2:
        hess = hess + l2 * torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    direction = _newton_direction(grad, hess)
    gain = (grad * direction).sum(-1)
    f0 = _objective(lin, total, lse, atoms, l2)
    # Below this predicted gain the objective cannot resolve the change in this dtype: a full
    # Newton step on a concave function is then taken without a test.
    noise = 64 * torch.finfo(features.dtype).eps * (
        (lin * atoms).sum(-1).abs() + total * lse.abs() + 1)
    step = torch.ones_like(total)
    done = torch.zeros_like(total, dtype=torch.bool)
    trial = ws.trial_buffer(logits)
    new_atoms, f1 = atoms, f0
    for _ in range(max_backtracks + 1):
        new_atoms = atoms + step[:, None] * direction
        torch.mm(features, new_atoms.T, out=trial)
        new_lse = _column_logsumexp(trial, ws.scratch)  # softmax of the trial in ws.scratch
        f1 = _objective(lin, total, new_lse, new_atoms, l2)
        ok = (f1 >= f0 + _ARMIJO * step * gain) | (gain <= noise)
        done = done | ok
        if bool(done.all()):
            break
        step = torch.where(done, step, step / 2)
    if bool(done.all()):
        # The last trial is the accepted one: its softmax becomes the current q.
        ws.q, ws.scratch = ws.scratch, ws.q
    else:
        # No ascent step found for some components (at a maximum up to rounding): keep them.
        step = torch.where(done, step, torch.zeros_like(step))
        new_atoms = atoms + step[:, None] * direction
        trial.copy_(torch.where(done[None, :], trial, logits))
        new_lse = _column_logsumexp(trial, ws.q)
        f1 = torch.where(done, f1, f0)
    info = NewtonStepInfo(grad=grad, step=step, gain=gain, objective=f1)
    return new_atoms, trial, new_lse, info


@dataclass
class SoftmaxRegressionResult:
    """Result of :func:`fit_softmax_regression`.

    Attributes:
        atoms: (K, r) maximisers.  objective: (K,) f_k at them.  grad_norm: (K,) norm of g_k there.
        num_steps: Newton steps taken.  converged: whether every norm of g_k fell below tolerance.
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
        tol: stop when ``norm(g_k) <= tol * (W_k + 1)`` for every k (default: 1e3 * eps of the dtype).
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
    logits, lse = z @ t.T, None
    ws = _Workspace(z, k, chunk_size)
    steps, info, converged = 0, None, False
    for steps in range(1, max_steps + 1):  # noqa: B007
        t, logits, lse, info = _newton_step(z, w, t, logits, ws, lse, l2=l2)
        converged = bool((info.grad.norm(dim=-1) <= tol * scale).all())
        if converged or bool((info.step == 0).all()):
            break
    # Report the gradient at the returned atoms (ws.q holds their softmax).
    grad = w.T @ z - w.sum(0)[:, None] * (ws.q.T @ z) - l2 * t
    converged = converged or bool((grad.norm(dim=-1) <= tol * scale).all())
    return SoftmaxRegressionResult(atoms=t, objective=info.objective, grad_norm=grad.norm(dim=-1),
                                   num_steps=steps, converged=converged)
