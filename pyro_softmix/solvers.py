# SPDX-License-Identifier: Apache-2.0
"""Weighted softmax regression over a fixed set of support points, batched over components.

For features Z (p, r) and nonnegative weights w (p, K), component k's problem is

    maximise  f_k(t) = sum_j w_jk log softmax(Z t)_j - (l2 / 2) ||t||^2,     t in R^r.

It is concave; with W_k = sum_j w_jk and q = softmax(Z t) its gradient and negative Hessian are

    g_k = Z^T (w_k - W_k q) - l2 t,
    H_k = W_k Z^T (diag q - q q^T) Z + l2 I = W_k sum_j q_j (z_j - m)(z_j - m)^T + l2 I,

with m = Z^T q. At the maximiser g_k = 0: the q-weighted mean of the features matches the
w-weighted one (moment matching). This is the M-step of EM for softmax mixtures (and of any
conditional logit with one shared choice set), and its batched Newton machinery is shared by the
other regression M-steps: a Cholesky solve with a ridge that grows until the factorisation
succeeds, and Armijo backtracking per component, so each accepted step increases f_k. Memory is
O(pK) plus a (chunk, K, r) temporary for the Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._cg import cholesky_apply, factor_hessians, stale_newton
from ._checks import as_tensor, check_offset, check_positive_float, check_positive_int
from ._chunks import column_max, column_sums, one_thread, weighted_sums
from ._gram import gram_chunk_rows, weighted_cov, weighted_gram

#: Armijo's sufficient-increase constant: a step s along d is accepted when
#: f(x + s d) >= f(x) + ARMIJO s g^T d.
ARMIJO = 1e-4


def offset_logits(features: torch.Tensor, atoms: torch.Tensor, offset: torch.Tensor | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(p, K) logits ``features @ atoms.T + offset[:, None]`` (no offset: the product alone),
    into ``out`` if given: the one place the engine, the solvers and the starts form them."""
    if offset is None:
        return features @ atoms.T if out is None else torch.mm(features, atoms.T, out=out)
    return torch.addmm(offset[:, None], features, atoms.T, out=out)


def column_logsumexp(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 of (p, K) logits; leaves softmax(logits, 0) in ``scratch``."""
    top = column_max(logits)
    torch.sub(logits, top, out=scratch).exp_()
    total = column_sums(scratch)
    scratch.div_(total)
    return top + total.log()


class Workspace:
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
        self.q, self.scratch = new(p, num_components), new(p, num_components)
        self.pair = new(p, 2 * num_components)  # (w, q) side by side: one pass for both sums
        self.logits = (new(p, num_components), new(p, num_components))
        chunk = gram_chunk_rows(features, num_components, chunk_size)
        self.gram = (new(chunk, num_components, r), new(chunk, num_components, r))

    def trial_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """A logits buffer that is not ``logits`` (so the current logits stay intact)."""
        a, b = self.logits
        return b if logits.data_ptr() == a.data_ptr() else a


def newton_direction(grad: torch.Tensor, hess: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
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
        with one_thread():
            chol, info = torch.linalg.cholesky_ex(mat)
        failed = info > 0
        if not bool(failed.any()):
            break
        ridge = torch.where(failed, ridge * 100 + 1e-6 * safe_level, ridge)
    d = cholesky_apply(chol, grad)
    d = torch.where(usable[:, None] & torch.isfinite(d), d, torch.zeros_like(d))
    return d


def armijo_search(f0: torch.Tensor, slope: torch.Tensor, evaluate, max_trials: int,
                  negligible: torch.Tensor | None = None):
    """Backtracking line search for B independent ascent problems at once.

    The one Armijo loop of the package: every damped Newton step (softmax regression, the
    generic batched solver, the marginal-likelihood Newton finish) takes its step length here.
    Trial steps 1, 1/2, 1/4, ... (``max_trials`` at most) are evaluated for all members
    together (a member already accepted is evaluated again at its accepted step, so the last
    evaluation holds every accepted value); member b accepts step s when
    ``f(s) >= f0 + ARMIJO s slope``, or, where ``negligible`` (the predicted gain is below
    rounding level), at the first finite objective.

    Args:
        f0: (B,) objectives at the current point.  slope: (B,) directional derivatives g^T d.
        evaluate: ``evaluate(step)`` -> (B,) objectives at the trial steps ``step`` (B,).
        max_trials: trial steps at most.
        negligible: (B,) bool, or None.
    Returns:
        ``(step, f1, done)``: (B,) accepted steps (0 where none was found), the objectives
        there (``f0`` where none), and which members found one.
    """
    step = torch.ones_like(f0)
    done = torch.zeros_like(f0, dtype=torch.bool)
    f1 = f0
    for _ in range(max_trials):
        f1 = evaluate(step)
        ok = f1 >= f0 + ARMIJO * step * slope
        if negligible is not None:
            ok = ok | (negligible & torch.isfinite(f1))
        done = done | ok
        if bool(done.all()):
            break
        step = torch.where(done, step, step / 2)
    if bool(done.all()):
        return step, f1, done
    return torch.where(done, step, torch.zeros_like(step)), torch.where(done, f1, f0), done


def _penalty_grad(atoms: torch.Tensor, l2) -> torch.Tensor:
    """Gradient P t_k of the penalty 0.5 t_k^T P t_k, P = l2 I (a float) or an (r, r) matrix."""
    return atoms @ l2 if isinstance(l2, torch.Tensor) else l2 * atoms


def _has_penalty(l2) -> bool:
    return isinstance(l2, torch.Tensor) or l2 != 0


def _objective(lin: torch.Tensor, total: torch.Tensor, lse: torch.Tensor,
               atoms: torch.Tensor, l2) -> torch.Tensor:
    """f_k = lin_k . t_k - W_k lse_k - 0.5 t_k^T P t_k, shape (K,)."""
    f = (lin * atoms).sum(-1) - total * lse
    if _has_penalty(l2):
        f = f - 0.5 * (atoms * _penalty_grad(atoms, l2)).sum(-1)
    return f


@dataclass
class NewtonStepInfo:
    """Diagnostics of one batched Newton step (all tensors of shape (K,) unless noted).

    Attributes:
        grad: (K, r) gradient g_k at the starting atoms.
        step: (K,) accepted fraction of the step (of the Newton step, or of the trust-region
            step where ``capped``; 0 where no ascent step was found).
        gain: (K,) predicted increase g_k . d_k of the full Newton step.
        objective: (K,) f_k at the accepted atoms.
        cov: (K, r, r) covariance of z under q_k at the starting atoms (or the one passed in).
        model_gain: (K,) the quadratic model's increase for the step taken.
        capped: (K,) which steps were cut to the trust region (dogleg steps), or None.
        solved: (K,) which CG solves of a Hessian-free step reached their tolerance or the
            trust region (the others' preconditioner is stale); None for an explicit step.
    """

    grad: torch.Tensor
    step: torch.Tensor
    gain: torch.Tensor
    objective: torch.Tensor
    cov: torch.Tensor | None = None
    model_gain: torch.Tensor | None = None
    capped: torch.Tensor | None = None
    solved: torch.Tensor | None = None


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
        >>> tuple(t.shape), tuple(lg.shape), bool((info.step > 0).all())
        ((3, 2), (50, 3), True)
    """
    if logits is None:
        logits = features @ atoms.T
    ws = Workspace(features, atoms.shape[0], chunk_size)
    new_atoms, new_logits, _, info = softmax_newton_step(features, weights, atoms, logits, ws, l2=l2,
                                                  max_backtracks=max_backtracks)
    return new_atoms, new_logits, info


def softmax_newton_step(features, weights, atoms, logits, ws: Workspace, lse=None, *,
                 l2: float | torch.Tensor = 0.0, max_backtracks: int = 30,
                 max_step: float | None = None, cov: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, factor: torch.Tensor | None = None):
    """:func:`softmax_regression_step` on preallocated buffers.

    ``l2`` may also be an (r, r) positive semidefinite matrix P (the penalty 0.5 t^T P t, a
    Normal prior with precision P). ``max_step`` caps the Euclidean length of a step (a trust
    region, :func:`trust_region_step`): far from the maximiser, where q is concentrated on a
    few points and the Hessian nearly singular, the full Newton step would be huge and point
    where the objective barely changes.
    ``lse`` is the column log-normaliser of ``logits`` when ``ws.q`` already holds their
    softmax (as after a previous step); if None both are computed. Returns ``(new_atoms,
    new_logits, new_lse, info)``; ``new_logits`` lives in one of ``ws.logits`` (never in the
    ``logits`` passed in) and ``ws.q`` then holds its softmax. ``cov`` is a (K, r, r) covariance
    of z under q from an earlier step to use instead of the current one (it is the p r^2 K part
    of the cost); the step is then a quasi-Newton step, still an ascent step under the line
    search. ``info.cov`` is the covariance used. ``offset`` (p,) is a fixed term of every
    column's logits (``logits = features @ atoms.T + offset[:, None]``).

    With ``factor`` (an earlier step's Hessians, factored (K, r, r): :func:`stale_factor`) the
    step is Hessian-free: conjugate gradients preconditioned by them solve the Newton system,
    each iteration two (p x r)(r x K) products (:func:`_cg_direction`); no covariance is formed.
    """
    total = column_sums(weights)  # (K,)
    if lse is None:
        lse = column_logsumexp(logits, ws.q)
    q = ws.q
    # (K, r) w-weighted sums and q-weighted means of z, in one pass over the features
    lin, mean_q = weighted_sums(torch.cat([weights, q], 1, out=ws.pair), features).split(len(total))
    grad = lin - total[:, None] * mean_q
    if _has_penalty(l2):
        grad = grad - _penalty_grad(atoms, l2)
    capped = solved = None
    if factor is not None:
        direction, curvature, solved = _cg_direction(features, q, mean_q, total, grad, l2,
                                                     factor, max_step, ws)
        gain = slope = (grad * direction).sum(-1)
    else:
        # Covariance of z under q_k, sum_j q_j (z_j - m_k)(z_j - m_k)^T (q's columns sum to 1).
        if cov is None:
            cov = weighted_cov(features, q, mean_q, buffers=ws.gram)
        hess = add_ridge(total[:, None, None] * cov, l2)
        direction = newton_direction(grad, hess)
        gain = (grad * direction).sum(-1)
        if max_step is not None:
            direction, capped = trust_region_step(grad, hess, direction, max_step)
        slope = gain if capped is None else torch.where(capped, (grad * direction).sum(-1), gain)
    f0 = _objective(lin, total, lse, atoms, l2)
    # Below this predicted gain the objective cannot resolve the change in this dtype: a full
    # Newton step on a concave function is then taken without a test.
    noise = 64 * torch.finfo(features.dtype).eps * (
        (lin * atoms).sum(-1).abs() + total * lse.abs() + 1)
    trial = ws.trial_buffer(logits)

    last = {}

    def evaluate(step):
        last["atoms"] = atoms + step[:, None] * direction
        offset_logits(features, last["atoms"], offset, out=trial)
        last["lse"] = column_logsumexp(trial, ws.scratch)  # the trial's softmax in ws.scratch
        return _objective(lin, total, last["lse"], last["atoms"], l2)

    step, f1, done = armijo_search(f0, slope, evaluate, max_backtracks + 1, gain <= noise)
    if bool(done.all()):
        # The last trial is the accepted one: its softmax becomes the current q.
        new_atoms, new_lse = last["atoms"], last["lse"]
        ws.q, ws.scratch = ws.scratch, ws.q
    else:
        new_atoms = atoms + step[:, None] * direction
        # No ascent step found for some components (at a maximum up to rounding): keep them.
        trial.copy_(torch.where(done[None, :], trial, logits))
        new_lse = column_logsumexp(trial, ws.q)
    # The quadratic model's increase for the step taken: (s - s^2/2) g^T d for a fraction s of
    # the Newton step d; s g^T p - s^2 p^T H p / 2 for a trust-region step p.
    if solved is not None:  # CG carried d^T H d
        model_gain = step * slope - 0.5 * step**2 * curvature
    else:
        model_gain = (step - 0.5 * step**2) * gain
        if capped is not None and bool(capped.any()):
            curvature = torch.einsum("kr,krs,ks->k", direction, hess, direction)
            model_gain = torch.where(capped, step * (slope - 0.5 * step * curvature), model_gain)
    info = NewtonStepInfo(grad=grad, step=step, gain=gain, objective=f1, cov=cov,
                          model_gain=model_gain, capped=capped, solved=solved)
    return new_atoms, trial, new_lse, info


def _cg_direction(features, q, mean_q, total, grad, l2, factor: torch.Tensor, max_step, ws):
    """Newton directions H_k d_k = g_k of the M-step by conjugate gradients preconditioned by
    ``factor`` (:func:`~pyro_softmix._cg.stale_newton`); H_k v = W_k (sum_j q_jk z_j (z_j . v)
    - m_k (m_k . v)) + P v costs two (p x r)(r x K) products for all K."""

    def hess_times(v):
        u = torch.mm(features, v.T, out=ws.scratch).mul_(q)  # q_jk z_j . v_k
        hv = (weighted_sums(u, features) - mean_q * (mean_q * v).sum(-1, keepdim=True)) * total[:, None]
        return hv + _penalty_grad(v, l2) if _has_penalty(l2) else hv

    return stale_newton(hess_times, grad, factor, max_step)


def stale_factor(cov: torch.Tensor, total: torch.Tensor, l2) -> torch.Tensor:
    """The preconditioner of Hessian-free M-steps from covariances (K, r, r) of z under q and
    weights W (K,): the Hessians W cov + P, factored (K, r, r)."""
    return factor_hessians(add_ridge(total[:, None, None] * cov, l2))


def trust_region_step(grad: torch.Tensor, hess: torch.Tensor, newton: torch.Tensor,
                      radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dogleg steps of length at most ``radius`` for K concave problems at once.

    Where the Newton step (K, r) is longer than the radius, the step follows the dogleg path
    (Powell): along the gradient to the Cauchy point (the quadratic model's maximum along the
    gradient), then towards the Newton step, and stops at the radius. Far from the maximiser
    of a softmax regression, where q is concentrated on a few points and the Hessian nearly
    singular, the Newton step points mostly along directions the objective barely changes in;
    the dogleg step still takes the gradient's share, so EM keeps moving there.

    Args:
        grad: (K, r) gradients g.  hess: (K, r, r) negative Hessians H (positive definite).
        newton: (K, r) Newton steps H^-1 g.
    Returns:
        ``(steps, capped)``: (K, r) steps and which of them were capped.
    """
    tiny = torch.finfo(grad.dtype).tiny
    g2 = (grad * grad).sum(-1)
    length = torch.linalg.vector_norm(newton, dim=-1)
    # A zero Newton step with a nonzero gradient: the Hessian vanished (q on a single point);
    # the quadratic model is then linear, and its trust-region step is along the gradient.
    capped = (length > radius) | ((length == 0) & (g2 > 0))
    if not bool(capped.any()):
        return newton, capped
    g_hg = torch.einsum("kr,krs,ks->k", grad, hess, grad)
    cauchy = (g2 / g_hg.clamp_min(tiny))[:, None] * grad
    c_len = torch.linalg.vector_norm(cauchy, dim=-1)
    along_gradient = radius * grad / g2.sqrt().clamp_min(tiny)[:, None]
    diff = newton - cauchy  # solve |cauchy + tau diff| = radius for tau in [0, 1]
    a = (diff * diff).sum(-1).clamp_min(tiny)
    b = 2 * (cauchy * diff).sum(-1)
    c = c_len**2 - radius**2
    tau = ((-b + (b * b - 4 * a * c).clamp_min(0).sqrt()) / (2 * a)).clamp(0, 1)
    dogleg = cauchy + tau[:, None] * diff
    outside = (c_len >= radius) | (g_hg <= 0)
    step = torch.where(outside[:, None], along_gradient, dogleg)
    return torch.where(capped[:, None], step, newton), capped


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
                           chunk_size: int | None = None, offset=None,
                           max_step: float | None = None) -> SoftmaxRegressionResult:
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
        offset: (p,) known term added to every column's logits, softmax(Z t_k + offset).
        max_step: longest step (Euclidean, a trust region; default none). Far from the
            maximiser the Hessian can be nearly singular and the full Newton step useless even
            when damped: a trust region then keeps the steps moving.

    Returns:
        :class:`SoftmaxRegressionResult`.

    Example:
        >>> z = torch.randn(200, 3, dtype=torch.float64)
        >>> w = torch.rand(200, 2, dtype=torch.float64)
        >>> res = fit_softmax_regression(z, w)
        >>> res.converged
        True
    """
    z, w = _check_regression(features, weights, name_x="features")
    l2 = check_positive_float(l2, "l2", allow_zero=True)
    max_steps = check_positive_int(max_steps, "max_steps")
    if max_step is not None:
        max_step = check_positive_float(max_step, "max_step")
    k, r = w.shape[1], z.shape[1]
    t = z.new_zeros(k, r) if init is None else as_tensor(init, "init").to(z).clone()
    if t.shape != (k, r):
        raise ValueError(f"init must have shape ({k}, {r}), got {tuple(t.shape)}")
    offset = check_offset(offset, z.shape[0], like=z)
    tol = 1e3 * torch.finfo(z.dtype).eps if tol is None else tol
    scale = column_sums(w) + 1
    logits, lse = offset_logits(z, t, offset), None
    ws = Workspace(z, k, chunk_size)
    steps, info, converged = 0, None, False
    for steps in range(1, max_steps + 1):  # noqa: B007
        t, logits, lse, info = softmax_newton_step(z, w, t, logits, ws, lse, l2=l2,
                                                   offset=offset, max_step=max_step)
        converged = bool((info.grad.norm(dim=-1) <= tol * scale).all())
        if converged or bool((info.step == 0).all()):
            break
    # Report the gradient at the returned atoms (ws.q holds their softmax).
    grad = weighted_sums(w, z) - column_sums(w)[:, None] * weighted_sums(ws.q, z) - l2 * t
    converged = converged or bool((grad.norm(dim=-1) <= tol * scale).all())
    return SoftmaxRegressionResult(atoms=t, objective=info.objective, grad_norm=grad.norm(dim=-1),
                                   num_steps=steps, converged=converged)


# ----------------------------------------------------------------------------------------------
# Per-observation regressions (the M-steps of mixtures of experts), batched over experts
# ----------------------------------------------------------------------------------------------
def damped_newton(params: torch.Tensor, evaluate, max_backtracks: int = 30
                   ) -> tuple[torch.Tensor, NewtonStepInfo]:
    """One batched damped Newton ascent step on B independent concave problems.

    Args:
        params: (B, m) current parameters.
        evaluate: ``evaluate(params, derivatives)`` returning the objectives (B,) and, when
            ``derivatives`` is true, also the gradients (B, m) and negative Hessians (B, m, m).
    Returns:
        ``(new_params, info)``; each accepted step satisfies Armijo's condition, so every
        objective increases (or stays, where no ascent step exists up to rounding).
    """
    f0, grad, hess = evaluate(params, True)
    direction = newton_direction(grad, hess)
    gain = (grad * direction).sum(-1)
    noise = 64 * torch.finfo(params.dtype).eps * (f0.abs() + 1)
    step, f1, _ = armijo_search(
        f0, gain, lambda s: evaluate(params + s[:, None] * direction, False)[0],
        max_backtracks + 1, gain <= noise)
    new = params + step[:, None] * direction
    return new, NewtonStepInfo(grad=grad, step=step, gain=gain, objective=f1)


def newton_solve(params: torch.Tensor, evaluate, max_steps: int, tol: float, scale: torch.Tensor):
    """Damped Newton steps until every gradient norm is <= tol * scale (or no step is taken).

    Returns ``(params, objective, grad, steps, converged)``, the last three at the returned
    parameters.
    """
    steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007
        params, info = damped_newton(params, evaluate)
        if bool((info.grad.norm(dim=-1) <= tol * scale).all()) or bool((info.step == 0).all()):
            break
    f, grad, _ = evaluate(params, True)
    return params, f, grad, steps, bool((grad.norm(dim=-1) <= tol * scale).all())


def _check_regression(x, weights, name_w="weights", name_x="x"):
    x = as_tensor(x, name_x)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name_x} must be a 2-D floating tensor, got shape {tuple(x.shape)}")
    w = as_tensor(weights, name_w)
    if w.dim() != 2 or w.shape[0] != x.shape[0]:
        raise ValueError(f"{name_w} must have shape ({x.shape[0]}, K), got {tuple(w.shape)}")
    w = w.to(x)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name_w} must be finite and nonnegative")
    return x, w


def add_ridge(hess: torch.Tensor, l2) -> torch.Tensor:
    if isinstance(l2, torch.Tensor):
        return hess + l2
    if not l2:
        return hess
    return hess + l2 * torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)


def weighted_least_squares(x, y, weights, *, l2: float = 0.0) -> torch.Tensor:
    """Closed-form weighted (ridge) least squares for K weight vectors at once.

    Solves ``min_b sum_i w_ik (y_i - x_i . b)^2 + l2 |b|^2`` for every k by a batched Cholesky
    solve of ``(X^T W_k X + l2 I) b_k = X^T W_k y`` (a vanishing ridge is added where the Gram
    matrix is singular, which gives the minimum-norm-like solution).

    Args:
        x: (n, d) regressors.  y: (n,) targets.  weights: (n, K) nonnegative.
    Returns:
        (K, d) coefficients; a column of zero weights gives zero coefficients.

    Example:
        >>> x = torch.randn(50, 2, dtype=torch.float64)
        >>> b = weighted_least_squares(x, x @ torch.tensor([1.0, -2.0]).double(), torch.ones(50, 1))
        >>> torch.allclose(b, torch.tensor([[1.0, -2.0]]).double())
        True
    """
    x, w = _check_regression(x, weights)
    y = as_tensor(y, "y").to(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    gram = add_ridge(weighted_gram(x, w), check_positive_float(l2, "l2", allow_zero=True))
    return newton_direction((w * y[:, None]).T @ x, gram)


def logistic_objective(x, y, w, l2):
    def evaluate(coef, derivatives):
        eta = x @ coef.T  # (n, K)
        f = (w * (y[:, None] * eta - torch.nn.functional.softplus(eta))).sum(0)
        if l2:
            f = f - 0.5 * l2 * (coef * coef).sum(-1)
        if not derivatives:
            return f, None, None
        s = torch.sigmoid(eta)
        grad = (w * (y[:, None] - s)).T @ x - l2 * coef
        hess = add_ridge(weighted_gram(x, w * s * (1 - s)), l2)
        return f, grad, hess
    return evaluate


def fit_logistic_regression(x, y, weights, init=None, *, l2: float = 0.0, max_steps: int = 50,
                            tol: float | None = None) -> SoftmaxRegressionResult:
    """Weighted (ridge) logistic regressions for K weight vectors at once, by damped Newton (IRLS).

    Maximises ``f_k(b) = sum_i w_ik [y_i x_i.b - log(1 + exp(x_i.b))] - l2/2 |b|^2`` for every k.

    Args:
        x: (n, d).  y: (n,) in [0, 1] (0/1 labels, or fractions).  weights: (n, K) nonnegative.
        init: (K, d) starting coefficients (default zeros).
        tol: stop when every gradient norm is <= tol * (sum_i w_ik + 1) (default 1e3 * eps).
    Returns:
        :class:`SoftmaxRegressionResult` with ``atoms`` holding the (K, d) coefficients.

    Example:
        >>> x = torch.randn(200, 2, dtype=torch.float64)
        >>> y = (torch.rand(200, dtype=torch.float64) < torch.sigmoid(x[:, 0])).double()
        >>> fit_logistic_regression(x, y, torch.ones(200, 3)).converged
        True
    """
    x, w = _check_regression(x, weights)
    y = as_tensor(y, "y").to(x)
    if y.shape != (x.shape[0],) or bool((y < 0).any()) or bool((y > 1).any()):
        raise ValueError(f"y must have shape ({x.shape[0]},) with values in [0, 1]")
    l2 = check_positive_float(l2, "l2", allow_zero=True)
    coef = x.new_zeros(w.shape[1], x.shape[1]) if init is None else as_tensor(init, "init").to(x)
    if coef.shape != (w.shape[1], x.shape[1]):
        raise ValueError(f"init must have shape ({w.shape[1]}, {x.shape[1]}), got "
                         f"{tuple(coef.shape)}")
    tol = 1e3 * torch.finfo(x.dtype).eps if tol is None else tol
    evaluate = logistic_objective(x, y, w, l2)
    coef, f, grad, steps, ok = newton_solve(coef, evaluate,
                                             check_positive_int(max_steps, "max_steps"), tol,
                                             w.sum(0) + 1)
    return SoftmaxRegressionResult(atoms=coef, objective=f, grad_norm=grad.norm(dim=-1),
                                   num_steps=steps, converged=ok)


def multinomial_objective(x, targets, l2):
    """Objective of a multinomial logit with the last class as reference (logit 0)."""
    n, d = x.shape
    k = targets.shape[1]
    totals = targets.sum(1)

    def evaluate(flat, derivatives):
        coef = flat.view(k - 1, d)
        logits = torch.cat([x @ coef.T, x.new_zeros(n, 1)], 1)
        log_p = torch.log_softmax(logits, 1)
        f = (targets * log_p).sum().reshape(1)
        if l2:
            f = f - 0.5 * l2 * (coef * coef).sum()
        if not derivatives:
            return f, None, None
        p = log_p[:, :-1].exp()  # (n, K-1)
        rp = totals[:, None] * p
        grad = (targets[:, :-1] - rp).T @ x - l2 * coef
        # -Hessian = sum_i R_i (diag p_i - p_i p_i^T) (x) x_i x_i^T, R_i the row total: two
        # products, the second giving the diagonal blocks.
        rpx = (rp[:, :, None] * x[:, None, :]).reshape(n, -1)  # (n, (K-1) d)
        hess = -(rpx.T @ (p[:, :, None] * x[:, None, :]).reshape(n, -1))
        blocks = torch.arange(k - 1, device=x.device)
        hess.view(k - 1, d, k - 1, d)[blocks, :, blocks, :] += (rpx.T @ x).view(k - 1, d, d)
        return f, grad.reshape(1, -1), add_ridge(hess, l2).unsqueeze(0)
    return evaluate


def fit_multinomial_logit(x, targets, init=None, *, l2: float = 0.0, max_steps: int = 50,
                          tol: float | None = None) -> SoftmaxRegressionResult:
    """Multinomial logistic regression on soft labels, by damped Newton on all classes jointly.

    Maximises ``sum_i sum_k R_ik log softmax(W x_i)_k - l2/2 |W|^2`` over W (K, d) whose last
    row is fixed at 0 (the reference class), for soft labels R (n, K) (any nonnegative rows:
    responsibilities, one-hot labels, or counts). This is the gate M-step of a mixture of
    experts. The Hessian is ((K-1) d)^2, so this suits moderate K d.

    Args:
        x: (n, d).  targets: (n, K) nonnegative.  init: (K, d) or (K-1, d) starting weights.
    Returns:
        :class:`SoftmaxRegressionResult`; ``atoms`` is (K, d) with a zero last row and
        ``objective``/``grad_norm`` have shape (1,).

    Example:
        >>> x = torch.randn(300, 2, dtype=torch.float64)
        >>> labels = torch.distributions.Categorical(logits=x @ torch.randn(2, 3).double()).sample()
        >>> res = fit_multinomial_logit(x, torch.nn.functional.one_hot(labels, 3).double())
        >>> res.atoms.shape, bool(res.atoms[-1].eq(0).all())
        (torch.Size([3, 2]), True)
    """
    x, r = _check_regression(x, targets, "targets")
    k, d = r.shape[1], x.shape[1]
    if k < 2:
        raise ValueError("targets must have at least 2 columns (classes)")
    l2 = check_positive_float(l2, "l2", allow_zero=True)
    coef = x.new_zeros(k - 1, d) if init is None else as_tensor(init, "init").to(x)[: k - 1]
    if coef.shape != (k - 1, d):
        raise ValueError(f"init must have shape ({k}, {d}), got {tuple(coef.shape)}")
    tol = 1e3 * torch.finfo(x.dtype).eps if tol is None else tol
    evaluate = multinomial_objective(x, r, l2)
    flat, f, grad, steps, ok = newton_solve(coef.reshape(1, -1), evaluate,
                                             check_positive_int(max_steps, "max_steps"), tol,
                                             r.sum().reshape(1) + 1)
    full = torch.cat([flat.view(k - 1, d), x.new_zeros(1, d)])
    return SoftmaxRegressionResult(atoms=full, objective=f, grad_norm=grad.norm(dim=-1),
                                   num_steps=steps, converged=ok)
