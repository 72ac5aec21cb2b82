# SPDX-License-Identifier: Apache-2.0
"""Preconditioned conjugate gradients for B symmetric systems at once, inside a trust region.

Two solvers use it: the Hessian-free M-step (:mod:`pyro_softmix.solvers`, one system per
component, the Hessian W_k Cov_q(z) applied by two passes over the features) and the Newton-CG
finish on the marginal likelihood (:mod:`pyro_softmix.accelerate`, one system).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._chunks import one_thread

__all__ = ["CGResult", "cholesky_apply", "factor_blocks", "factor_hessians", "pcg", "stale_newton"]

#: Conjugate-gradient iterations of a Hessian-free M-step at most, and the relative residual at
#: which it stops (:func:`stale_newton`).
CG_MSTEP_ITERATIONS = 10
CG_MSTEP_TOL = 0.1


@dataclass
class CGResult:
    """What :func:`pcg` returns: (B, n) steps ``d`` and products ``ad`` = A d, (B,) ``solved``
    (the residual reached the tolerance) and ``bounded`` (stopped at the trust radius or at a
    direction of non-positive curvature), and the ``iterations`` run."""

    d: torch.Tensor
    ad: torch.Tensor
    solved: torch.Tensor
    bounded: torch.Tensor
    iterations: int


def pcg(matvec, rhs: torch.Tensor, precondition, radius: float = math.inf, rel_tol: float = 0.05,
        max_iterations: int = 50) -> CGResult:
    """Solve A_b d_b = rhs_b for B systems by preconditioned conjugate gradients from d = 0.

    Row b stops when its preconditioned residual's norm is at most ``rel_tol`` times its
    right-hand side's (solved), at the Euclidean ball ||d_b|| <= ``radius`` (the iterate that
    would leave it is cut there; Steihaug 1983), or at a direction of non-positive curvature
    (then it keeps its last iterate, or on the first iteration the preconditioned right-hand
    side cut to the ball). Every iterate, and every cut point between two iterates, raises the
    quadratic model rhs^T d - d^T A d / 2 above its value at the previous iterate, so each
    d_b is an ascent direction of an objective whose gradient is rhs_b (rhs_b^T d_b > 0 where
    rhs_b != 0). One host sync per iteration.

    Args:
        matvec: (B, n) -> (B, n), v_b -> A_b v_b.
        rhs: (B, n) right-hand sides.
        precondition: (B, n) -> (B, n), v_b -> M_b^-1 v_b for positive definite M_b.
        radius: the trust radius.
        rel_tol: relative residual at which a row is solved.
        max_iterations: iterations at most.

    Example:
        >>> a = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
        >>> out = pcg(lambda v: (a @ v[..., None])[..., 0],
        ...           torch.tensor([[2.0, 4.0]], dtype=torch.float64), lambda v: v, rel_tol=1e-12)
        >>> out.d.tolist(), out.solved.tolist()
        ([[1.0, 1.0]], [True])
    """
    d, ad = torch.zeros_like(rhs), torch.zeros_like(rhs)
    res = rhs.clone()
    y = precondition(res)
    ry = (res * y).sum(-1)
    stop = rel_tol**2 * ry
    direction = y.clone()
    solved = ~(ry > 0)
    active, bounded = ~solved, torch.zeros_like(solved)
    r2 = radius**2
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        if not bool(active.any()):
            iterations -= 1
            break
        ap = matvec(direction)
        curv, dd = (direction * ap).sum(-1), (d * d).sum(-1)
        dp, pp = (d * direction).sum(-1), (direction * direction).sum(-1)
        flat = active & ~(curv > 0)
        step = ry / torch.where(flat, torch.ones_like(curv), curv)
        leave = active & ~flat & (dd + 2 * step * dp + step * step * pp > r2)
        # The root tau > 0 of ||d + tau p|| = radius.
        tau = (-dp + (dp * dp + pp * (r2 - dd).clamp_min(0)).sqrt()) / pp.clamp_min(
            torch.finfo(rhs.dtype).tiny)
        on_flat = (radius / pp.sqrt()).clamp_max(1.0) if iterations == 1 else torch.zeros_like(pp)
        go = active & ~flat & ~leave
        # (go, leave and flat are disjoint subsets of the active rows; the others stay put.)
        length = torch.where(go, step, torch.where(leave, tau, torch.where(flat, on_flat, 0.0)))
        d.add_(length[:, None] * direction)
        ad.add_(length[:, None] * ap)
        res.sub_(torch.where(go, step, torch.zeros_like(step))[:, None] * ap)
        bounded, active = bounded | (active & ~go), go
        y = precondition(res)
        ry_new = (res * y).sum(-1)
        done = active & (ry_new <= stop)
        solved, active = solved | done, active & ~done
        direction = y + (ry_new / ry.clamp_min(torch.finfo(rhs.dtype).tiny))[:, None] * direction
        ry = ry_new
    return CGResult(d, ad, solved, bounded, iterations)


def cholesky_apply(chol: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, n) A_b^-1 v_b for (B, n, n) Cholesky factors of A_b (lower), by two triangular
    solves (torch's ``cholesky_solve`` copies its batched factors on every call: at n = 1,024
    it took 4x (float32) and 38x (float64) as long)."""
    y = torch.linalg.solve_triangular(chol, v[:, :, None], upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)[:, :, 0]


def factor_blocks(blocks: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Cholesky factors of (B, n, n) positive semidefinite blocks plus ``ridge`` times each
    block's mean diagonal (a ridge at rounding level keeps a factor finite where a block is
    flat in some direction); a block that is still not numerically positive definite (an
    empty component, a vanishing weight) is replaced by its diagonal's mean times the identity
    (a preconditioner only needs to be positive). So is a block whose mean diagonal is below
    the square root of the dtype's smallest normal number (a component whose softmax is one
    point: its covariance is 0, and a ridge at that level would leave pivots whose reciprocals
    overflow)."""
    level = blocks.diagonal(dim1=1, dim2=2).mean(1)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    if ridge:
        blocks = blocks + (ridge * level.clamp_min(0.0))[:, None, None] * eye
    with one_thread():
        chol, info = torch.linalg.cholesky_ex(blocks)
    info = torch.where(level >= torch.finfo(blocks.dtype).tiny ** 0.5, info, 1)
    if bool((info > 0).any()):
        scale = level.abs().clamp_min(1.0)
        chol = torch.where((info > 0)[:, None, None], scale.sqrt()[:, None, None] * eye, chol)
    return chol


def factor_hessians(hess: torch.Tensor) -> torch.Tensor:
    """The preconditioner of the Hessian-free M-steps: Cholesky factors (K, r, r) of the
    Hessians (K, r, r) of an earlier M-step, with a ridge at rounding level."""
    return factor_blocks(hess, 16 * torch.finfo(hess.dtype).eps)


def stale_newton(hess_times, grad: torch.Tensor, chol: torch.Tensor,
                 radius: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton directions H_k d_k = g_k for K concave M-step problems (grad (K, r)) by
    :func:`pcg` on the products ``hess_times``, preconditioned by an earlier M-step's Hessians
    (``chol``, from :func:`factor_hessians`), inside the trust ``radius``.

    PCG's iterates do not change when a system's preconditioner is multiplied by a positive
    number, so a Hessian W_k cov_k formed at other weights W_k is still an exact preconditioner
    where only the weights moved (and there is no prior). Returns (K, r) directions, (K,)
    curvatures d^T H d, and which solves reached ``CG_MSTEP_TOL`` or the radius (the others ran
    out of iterations: their preconditioner is stale)."""

    out = pcg(hess_times, grad, lambda v: cholesky_apply(chol, v), math.inf if radius is None else radius,
              CG_MSTEP_TOL, CG_MSTEP_ITERATIONS)
    return out.d, (out.d * out.ad).sum(-1), out.solved | out.bounded
