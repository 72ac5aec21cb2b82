# SPDX-License-Identifier: Apache-2.0
"""Accelerated EM: SQUAREM cycles, the Newton finish on the marginal likelihood, the run schedule.

:func:`run` iterates one start of an :class:`~pyro_softmix.engine.EMProblem` to convergence:
SQUAREM cycles (two EM steps and an extrapolation along them, kept only where it raises the
objective), then, once EM's estimated gap is small, Newton steps on the full marginal objective
(exact gradient and Hessian from :mod:`pyro_softmix._marginal`, Armijo-damped), which converge
quadratically where EM converges linearly. Where forming the Hessian costs more
(:func:`hessian_free`), the Newton systems are solved by conjugate gradients on
Hessian-vector products instead (cost linear in r per product). The objective never decreases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._cg import cholesky_apply, pcg
from ._chunks import one_thread
from ._marginal import (
    em_preconditioner,
    marginal_gradient,
    marginal_hessian,
    mixed_precision,
    neg_hessian_times,
)
from .engine import EM_MAX_STEP, EMProblem, EMState
from .solvers import armijo_search
from .stopping import (
    DIVERGENCE_NORM,
    StoppingRule,
    budget_gain,
    check_finite,
    find_diverging,
)

__all__ = ["Run", "hessian_free", "newton_cg_finish", "newton_finish", "run", "squarem_cycle"]

#: Relative gap (EM's estimate) below which accelerated EM switches to Newton steps on the full
#: objective.
NEWTON_SWITCH = 1e-3
NEWTON_MAX_STEPS = 10
NEWTON_BACKTRACKS = 8
#: A Newton step reuses the previous step's Hessian (a chord step) while the Newton decrement
#: falls by at least this factor per step; otherwise a fresh Hessian is formed.
CHORD_CONTRACTION = 0.1
#: An eigenvalue of -H above -ROUNDING_EIGEN times the largest may be float32 rounding of a
#: mixed-precision Hessian (where the float64 Hessian was concave, the mixed one's most negative
#: eigenvalue measured -3e-11 to -8e-9 times the largest, on GloVe designs).
ROUNDING_EIGEN = 1e-7


def squarem_cycle(problem: EMProblem, st: EMState, num_steps: int = 2, step_max: list[float] | None = None):
    """``num_steps`` EM iterations, then (with ``step_max``, after two) a SQUAREM step.

    SQUAREM (Varadhan and Roland 2008, scheme S3) extrapolates the two EM steps
    r = F(t0) - t0, v = F(F(t0)) - 2 F(t0) + t0 to t0 - 2 a r + a^2 v with
    a = -||r|| / ||v||, clamped to [-step_max, -1] (a = -1 is plain EM); the parameters are
    the atoms and the log-weights of each start. The extrapolated point is kept, per start,
    only where its objective is at least that of the second EM step, so the objective never
    decreases; ``step_max`` (a list, one per start, updated in place) grows fourfold after
    a kept step at the bound and shrinks after a rejected one.

    Returns the new state and host lists (one host sync): the objective after each of the
    ``num_steps`` updates (the last one after the extrapolation when it was kept), the gains
    of the EM steps, and the atoms' norms after each update, each as a list of per-step
    lists.
    """
    s, k = problem.num_starts, problem.num_components
    states, gains = [st], []
    for _ in range(num_steps):
        nxt, gain = problem.iterate(states[-1])
        states.append(nxt)
        gains.append(gain)
    extrapolate = step_max is not None and num_steps == 2
    parts = [problem.objective(x) for x in states[1:]] + gains
    parts += [x.atoms.norm(dim=1).double() for x in states[1:]]
    if extrapolate:
        t0, t1, t2 = states
        trial, alpha = squarem_point(problem, t0, t1, t2, step_max)
        parts += [problem.objective(trial), trial.atoms.norm(dim=1).double(), alpha]
    values = torch.cat(parts).tolist()
    n = num_steps
    objs = [values[i * s:(i + 1) * s] for i in range(n)]
    gain_lists = [values[(n + i) * s:(n + i + 1) * s] for i in range(n)]
    off = 2 * n * s
    norms = [values[off + i * s * k:off + (i + 1) * s * k] for i in range(n)]
    if not extrapolate:
        return states[-1], objs, gain_lists, norms
    off += n * s * k
    obj_e = values[off:off + s]
    norm_e = values[off + s:off + s + s * k]
    alpha = values[off + s + s * k:]
    keep = [math.isfinite(a) and a >= b for a, b in zip(obj_e, objs[-1], strict=True)]
    for i in range(s):
        if not keep[i]:
            step_max[i] = max(1.0, step_max[i] / 4)
        elif -alpha[i] >= step_max[i]:
            step_max[i] *= 4
    if all(keep):
        return trial, objs[:-1] + [obj_e], gain_lists, norms[:-1] + [norm_e]
    # Back to the second EM step where the extrapolation lost (its buffers were reused).
    t2 = states[-1]
    if any(keep):
        mask = torch.tensor(keep, device=t2.atoms.device).repeat_interleave(k)
        atoms = torch.where(mask[:, None], trial.atoms, t2.atoms)
        log_weights = torch.where(mask, trial.log_weights, t2.log_weights)
        logits = torch.where(mask, trial.logits, t2.logits)
    else:
        atoms, log_weights, logits = t2.atoms, t2.log_weights, t2.logits
    lse = problem.normalise(logits)
    loglik, w = problem.e_step(logits, lse, log_weights)
    best = [a if kept else b for a, b, kept in zip(obj_e, objs[-1], keep, strict=True)]
    last_norms = [norm_e[i] if keep[i // k] else norms[-1][i] for i in range(s * k)]
    return (EMState(atoms, log_weights, logits, lse, w, loglik), objs[:-1] + [best],
            gain_lists, norms[:-1] + [last_norms])


def squarem_point(problem: EMProblem, t0: EMState, t1: EMState, t2: EMState, step_max: list[float]):
    """The SQUAREM point from three successive states, evaluated (logits and E-step)."""
    s, k = problem.num_starts, problem.num_components
    r_a, v_a = t1.atoms - t0.atoms, t2.atoms - 2 * t1.atoms + t0.atoms
    r_w = t1.log_weights - t0.log_weights
    v_w = t2.log_weights - 2 * t1.log_weights + t0.log_weights

    def per_start(a, w):
        return (a.square().sum(1) + w.square()).view(s, k).sum(1)

    ratio = (per_start(r_a, r_w) / per_start(v_a, v_w)).sqrt()
    limit = torch.tensor(step_max, dtype=ratio.dtype, device=ratio.device)
    alpha = -ratio.nan_to_num(nan=1.0, posinf=math.inf).clamp_min(1.0).minimum(limit)
    a = alpha.repeat_interleave(k)
    atoms = t0.atoms - (2 * a)[:, None] * r_a + (a * a)[:, None] * v_a
    log_weights = t0.log_weights - 2 * a * r_w + a * a * v_w
    log_weights = log_weights.view(s, k).log_softmax(1).view(-1)
    logits = problem.logits(atoms, out=problem.workspace.trial_buffer(t2.logits))
    lse = problem.normalise(logits)
    loglik, w = problem.e_step(logits, lse, log_weights)
    return EMState(atoms, log_weights, logits, lse, w, loglik), alpha.double()


def num_free(problem: EMProblem) -> int:
    """Free coordinates of one start: K r atoms and K - 1 weight logits."""
    return problem.num_components * (problem.z.shape[1] + 1) - 1


def newton_finish(problem: EMProblem, st: EMState, obj: float, tol: float, max_steps: int):
    """Newton steps on the full marginal objective from ``st`` (one start, S = 1), whose
    objective is ``obj``.

    Each step solves with the exact Hessian (:mod:`pyro_softmix._marginal`) and is damped
    by Armijo backtracking, so the objective never decreases. Where the Hessian is not
    negative definite the step uses a shifted spectrum (below). It stops when half the
    Newton decrement g^T (-H)^-1 g, the quadratic model's estimate of the remaining gap, is
    at most ``tol`` times the objective (converged), after ``max_steps`` steps, or when no
    step is accepted (failed: EM must go on).

    Returns (state, objectives after each step, atom norms after each step, converged,
    failed, the final gap estimate).
    """
    k, r = problem.num_components, problem.z.shape[1]
    _support(problem)
    noise = 64 * torch.finfo(problem.z.dtype).eps * abs(obj)
    objs, norms, gap, chol = [], [], math.inf, None
    pen = None if problem.penalty is None else problem.penalty.to(torch.float64)

    def solve(chol):
        """Newton direction, decrement, and whether half the decrement is within tol."""
        direction = cholesky_apply(chol[None], grad[None])[0]
        decrement = float(grad @ direction)
        return direction, decrement, decrement / 2 <= tol * abs(obj)

    last = 0.0  # the decrement of the last full step taken with a concave Hessian, else 0
    for _ in range(max_steps):
        grad, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
        check_finite([float(grad.abs().max())], "the gradient of the Newton finish")
        if pen is not None:
            grad[:k * r] -= (st.atoms.double() @ pen).reshape(-1)
        fresh = True
        if chol is not None:
            # The previous step's Hessian changes little from one step to the next here:
            # no new Hessian just to confirm convergence, and none while a step with the
            # old one (a chord step) still cuts the decrement by CHORD_CONTRACTION.
            direction, decrement, done = solve(chol)
            gap = decrement / 2
            if done:
                return st, objs, norms, True, False, gap
            fresh = decrement > CHORD_CONTRACTION * last
        if fresh:
            chol, eig = factor_hessian(problem, st, pieces, pen)
        if fresh and chol is not None:
            direction, decrement, done = solve(chol)
            gap = decrement / 2
            if done:
                return st, objs, norms, True, False, gap
        elif fresh:
            # Not concave here (a saddle region of a weakly separated mixture): shift the
            # spectrum of -H to twice its most negative eigenvalue, a damped step that
            # still ascends; no convergence claim from it.
            evals, evecs = eig
            shift = 2 * max(-float(evals[0]), 0.0) + 1e-8 * float(evals[-1].abs()) + 1e-300
            direction = evecs @ ((evecs.T @ grad) / (evals + shift))
            decrement = float(grad @ direction)
        accepted, step = _newton_line_search(problem, st, direction, obj, decrement, noise)
        if accepted is None:
            # The trials overwrote the workspace and the E-step buffer: restore st.
            st = problem.start(st.atoms, st.log_weights)
            if not fresh:  # the old Hessian is too stale: a fresh one next
                chol, last = None, 0.0
                continue
            return st, objs, norms, False, True, gap
        last = decrement if chol is not None and step == 1.0 else 0.0
        st, obj = accepted, _record(problem, accepted, objs, norms)
    return st, objs, norms, False, False, gap


#: Largest number of free coordinates for which the full Hessian is formed (its float64 copy
#: then takes at most 128 MB): beyond it Newton-CG runs alone.
MAX_NEWTON_PARAMS = 4096
#: The Newton finish is Hessian-free (:func:`newton_cg_finish`) where |support| D exceeds
#: HESSIAN_FREE_RATIO p (D = K r + K - 1 free coordinates, |support| the points with n_j > 0),
#: and always beyond MAX_NEWTON_PARAMS. The full Hessian costs about |support| D^2 (its B^T B
#: part), a Newton-CG step tens of products of 2 p D each. Measured (bench_newton.py, |support|
#: D / p): SmolLM2 K = 2 (130), the full Hessian 1.7x faster; Gaussian r = 128, K = 4 (515),
#: equal; SmolLM2 K = 4 (355) and Gaussian r = 256, K = 4 (1,027), Newton-CG 1.5-1.7x faster.
HESSIAN_FREE_RATIO = 256
#: HESSIAN_FREE_RATIO of the float64 twin of a float32 problem, whose CG products run on the
#: float32 design (2.5x faster): measured on SmolLM2 from float32 features, Newton-CG at K = 2
#: (130) took the fit from 31.8 s to 23.8 s, and at K = 4 from 66 s to 50 s.
HESSIAN_FREE_RATIO_NARROW = 100
#: Conjugate-gradient iterations per Hessian-free Newton step (at most), and the relative
#: residual (in the preconditioner's norm) at which its system counts as solved.
CG_MAX_STEPS = 50
CG_TOL = 0.05
#: Trust radius of a Newton-CG step (z coordinates, all atoms and weight logits together), EM's
#: M-step radius: far from the optimum CG otherwise follows flat or negatively curved directions
#: to steps (measured: length 116 on SmolLM2, K = 4) that no line search can shorten enough.
#: Within a phase the radius follows the steps: the length of the last accepted step where the
#: line search shortened it, twice the last radius (at most this) after a full step.
CG_RADIUS = EM_MAX_STEP
#: Where a step's decrement is within the tolerance, the system is solved again to this relative
#: residual (at most CERTIFY_MAX_STEPS iterations) before convergence is claimed.
CERTIFY_TOL = 1e-3
CERTIFY_MAX_STEPS = 200
#: Largest multiply-adds (|support| D^2 + p K r^2) of the one full Hessian that finishes where
#: Newton-CG cannot certify convergence (about 10 s on 2 CPU cores; SmolLM2 with K = 4: 1.1e11).
HANDOVER_MAX_WORK = 1e12


def newton_cg_finish(problem: EMProblem, st: EMState, obj: float, tol: float, max_steps: int):
    """:func:`newton_finish` without forming the Hessian (Newton-CG): each step solves
    -H d = g by preconditioned conjugate gradients, every iteration one Hessian-vector product
    (:func:`~pyro_softmix._marginal.marginal_hvp`: two passes over z, O(p K r)), so a step
    costs O(p K r) per iteration where the full Hessian costs p (K r)^2.

    The preconditioner is EM's own curvature, the complete-data information: W_k Cov_{q_k}(z)
    (plus the prior's precision) for each atom and N (diag alpha - alpha alpha^T) for the
    weight logits, factored once per call (K covariances, what one EM M-step forms). The
    preconditioned system is then governed by the fraction of information the latent
    assignments hide, which is what makes EM slow. Each solve stops at a residual of
    ``CG_TOL``, after ``CG_MAX_STEPS`` iterations, or at the trust radius (:func:`_pcg`;
    ``CG_RADIUS``, then following the accepted steps); steps are Armijo-damped, so the
    objective never decreases. On the float64
    twin of a float32 problem these loose solves multiply on the float32 design.

    Convergence is claimed only from a tight solve (residual ``CERTIFY_TOL``, float64
    products), made where a step's decrement is within ``tol``: CG's estimate g^T d of the
    decrement only grows with its iterations. Where the tight solve cannot be reached, the
    full-Hessian finish takes over if it is affordable (:func:`_full_hessian_affordable`);
    otherwise no convergence is claimed.

    Returns as :func:`newton_finish`.
    """
    k, r = problem.num_components, problem.z.shape[1]
    z = problem.z
    noise = 64 * torch.finfo(z.dtype).eps * abs(obj)
    pen = None if problem.penalty is None else problem.penalty.to(z.dtype)
    objs, norms, gap, precondition = [], [], math.inf, None
    radius = CG_RADIUS
    for _ in range(max_steps):
        grad, pieces = marginal_gradient(z, problem.workspace.q, st.w, st.log_weights)
        check_finite([float(grad.abs().max())], "the gradient of the Newton finish")
        if pen is not None:
            grad[:k * r] -= (st.atoms.to(z.dtype) @ pen).reshape(-1).double()
        if precondition is None:
            precondition = em_preconditioner(problem, st, pieces, pen)

        neg_hess_times = neg_hessian_times(problem, st, pieces, pen, problem.narrow_z)
        direction, solved, bounded = _pcg(neg_hess_times, grad, precondition, radius)
        decrement = float(grad @ direction)
        gap = decrement / 2 / (1 - CG_TOL) ** 2
        # A solve cut at the trust radius (or at a flat direction) says the model's maximum is
        # further away: its decrement is no estimate of the gap, and the step is taken.
        if gap <= tol * abs(obj) and not bounded:
            # A loose or unfinished solve underestimates the decrement (CG's g^T d only grows
            # with its iterations; measured on SmolLM2, K = 4: 7e-4 from 3 iterations, then
            # 1.5e-3 at the next step): convergence is claimed only from a tight one.
            if problem.narrow_z is not None:  # certified with float64 products
                neg_hess_times = neg_hessian_times(problem, st, pieces, pen, None)
            direction, solved, bounded = _pcg(neg_hess_times, grad, precondition, CG_RADIUS,
                                              CERTIFY_TOL, CERTIFY_MAX_STEPS)
            decrement = float(grad @ direction)
            gap = decrement / 2 / (1 - CERTIFY_TOL) ** 2
            if solved and gap <= tol * abs(obj):
                return st, objs, norms, True, False, gap
            if not (solved or bounded) and _full_hessian_affordable(problem):
                # CG cannot resolve the flattest directions (where the latent assignments hide
                # nearly all the information): the full Hessian, where it fits, finishes. (Not
                # where the solve was cut at the radius: measured on SmolLM2, an atom running
                # off along a ridge, each full-Hessian step 2.5-16 s and 150-200 nats.)
                out = newton_finish(problem, st, obj, tol, max_steps - len(objs))
                return (out[0], objs + out[1], norms + out[2]) + out[3:]
        accepted, step = _newton_line_search(problem, st, direction, obj, decrement, noise)
        if accepted is None:
            st = problem.start(st.atoms, st.log_weights)
            return st, objs, norms, False, True, gap
        st, obj = accepted, _record(problem, accepted, objs, norms)
        radius = (min(CG_RADIUS, 2 * radius) if step >= 1
                  else max(step * float(direction.norm()), 1e-3 * CG_RADIUS))
    return st, objs, norms, False, False, gap


def _pcg(matvec, rhs: torch.Tensor, precondition, radius: float = math.inf,
         rel_tol: float = CG_TOL, max_steps: int = CG_MAX_STEPS
         ) -> tuple[torch.Tensor, bool, bool]:
    """:func:`~pyro_softmix._cg.pcg` for one flat system: (d, solved, bounded)."""
    out = pcg(lambda v: matvec(v[0])[None], rhs[None], lambda v: precondition(v[0])[None],
              radius, rel_tol, max_steps)
    return out.d[0], bool(out.solved[0]), bool(out.bounded[0])


def _record(problem: EMProblem, st: EMState, objs: list, norms: list) -> float:
    """Append the objective and the atoms' norms at an accepted Newton step; its objective."""
    values = torch.cat([problem.objective(st), st.atoms.norm(dim=1).double()]).tolist()
    objs.append(values[0])
    norms.append(values[1:])
    return values[0]


def _newton_line_search(problem: EMProblem, st: EMState, direction: torch.Tensor, obj: float,
                        decrement: float, noise: float) -> tuple[EMState | None, float]:
    """The Armijo-damped step from ``st`` along ``direction`` (atoms, then the free weight
    logits): the accepted state (None if no step of the NEWTON_BACKTRACKS tried is accepted)
    and its step length."""
    k, r = problem.num_components, problem.z.shape[1]
    d_atoms = direction[:k * r].view(k, r).to(st.atoms)
    d_eta = torch.cat([direction[k * r:], direction.new_zeros(1)]).to(st.atoms)
    trials = []

    def evaluate(step):
        s = float(step[0])
        log_w = torch.log_softmax(st.log_weights + s * d_eta, 0)
        trials.append(problem.start(st.atoms + s * d_atoms, log_w))
        return problem.objective(trials[-1])

    like = dict(dtype=torch.float64, device=st.loglik.device)
    steps, _, found = armijo_search(torch.tensor([obj], **like), torch.tensor([decrement], **like),
                                    evaluate, NEWTON_BACKTRACKS,
                                    torch.tensor([decrement <= noise], device=like["device"]))
    return (trials[-1] if bool(found[0]) else None), float(steps[0])


def factor_hessian(problem: EMProblem, st: EMState, pieces, pen: torch.Tensor | None):
    """The full Hessian H of the objective at ``st``, as (Cholesky factor of -H, None)
    where -H is positive definite, else (None, eigendecomposition of -H).

    The Hessian's products may run in mixed precision (:func:`mixed_precision`). Where
    -H then looks indefinite by no more than float32 rounding (near a flat ridge), the
    decision is made again on the float64 Hessian; a clear saddle keeps the cheap one.
    """
    k, r = problem.num_components, problem.z.shape[1]

    def negative_hessian(precise: bool) -> torch.Tensor:
        hess = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces,
                                problem.support, precise=precise, chunk_size=problem.chunk_size)
        if pen is not None:
            hess[:k * r, :k * r] -= torch.block_diag(*[pen] * k)
        return hess.neg_()

    neg = negative_hessian(precise=False)
    check_finite([float(neg.abs().max())], "the Hessian of the Newton finish")
    with one_thread():
        chol, info = torch.linalg.cholesky_ex(neg)
        eig = None if int(info) == 0 else torch.linalg.eigh(neg)
    if eig is None:
        return chol, None
    if mixed_precision(problem.z, k) and (
            float(eig[0][0]) >= -ROUNDING_EIGEN * float(eig[0][-1])):
        precise = negative_hessian(precise=True)
        with one_thread():
            chol, info = torch.linalg.cholesky_ex(precise)
        if int(info) == 0:
            return chol, None
    return None, eig  # where the float64 Hessian is not concave either, the first one's


#: The float64 Newton finish of a float32 fit runs to this fraction of the fit's tolerance (the
#: ratio of float64's default tolerance to float32's): float32's tolerance allows for float32
#: rounding of the objective, which the float64 finish does not have.
PRECISE_TOL = 0.1


def _newton_method(problem: EMProblem):
    """The Newton finish for this problem: the full Hessian (:func:`newton_finish`) or, where
    that costs more (``HESSIAN_FREE_RATIO``, ``MAX_NEWTON_PARAMS``), Newton-CG
    (:func:`newton_cg_finish`)."""
    return newton_cg_finish if hessian_free(problem) else newton_finish


def _full_hessian_affordable(problem: EMProblem) -> bool:
    """Whether one full Hessian fits MAX_NEWTON_PARAMS and HANDOVER_MAX_WORK."""
    free, (p, r) = num_free(problem), problem.z.shape
    work = _support(problem).shape[0] * free**2 + p * problem.num_components * r**2
    return free <= MAX_NEWTON_PARAMS and work <= HANDOVER_MAX_WORK


def hessian_free(problem: EMProblem) -> bool:
    """Whether the Newton finish of ``problem`` is Hessian-free (see ``HESSIAN_FREE_RATIO``
    and ``HESSIAN_FREE_RATIO_NARROW``)."""
    free = num_free(problem)
    ratio = HESSIAN_FREE_RATIO if problem.narrow_z is None else HESSIAN_FREE_RATIO_NARROW
    return free > MAX_NEWTON_PARAMS or _support(problem).shape[0] * free > ratio * problem.z.shape[0]


def _support(problem: EMProblem) -> torch.Tensor:
    """The indices of the points with n_j > 0 (computed once per problem)."""
    if problem.support is None:
        problem.support = torch.nonzero(problem.counts64 > 0).squeeze(1)
    return problem.support


def _precise_newton(problem: EMProblem, st: EMState, obj: float, tol: float, max_steps: int):
    """:func:`newton_finish` on ``problem.precise()`` (float64, to ``PRECISE_TOL`` times
    ``tol`` when that is a float32 problem's twin) from ``st``; its outputs, with
    the final state back in ``problem``'s dtype (and the objectives of that state's phase in
    float64, the finish's own), then the objective it started from (in float64)."""
    wide = problem.precise()
    if wide is problem:
        return _newton_method(problem)(problem, st, obj, tol, max_steps) + (obj,)
    # Renormalised in float64: float32 weights sum to 1 only to float32 rounding, which
    # shifts the objective by about N eps32 (0.05 nats at N = 10^6) and makes every Newton
    # trial, renormalised by the line search, look like a loss.
    start = wide.start(st.atoms.double(), torch.log_softmax(st.log_weights.double(), 0))
    begin = float(wide.objective(start)[0])
    out = _newton_method(wide)(wide, start, begin, PRECISE_TOL * tol, max_steps) + (begin,)
    if not out[1]:  # no step taken: st, and problem's buffers, are as they were
        return (st,) + out[1:]
    end = out[0]
    return (problem.start(end.atoms.to(st.atoms), end.log_weights.to(st.log_weights)),) + out[1:]


def run(problem: EMProblem, atoms: torch.Tensor, log_weights: torch.Tensor, max_iter: int,
        tol: float, bar=None, accelerate: bool = True, on_update=None, on_ridge=None) -> Run:
    """Iterate one start from (atoms, log_weights) until the estimated gap is <= tol.

    With ``accelerate``, EM runs in SQUAREM cycles (two EM steps and an extrapolation, see
    :func:`squarem_cycle`); the stopping rule reads the gains of the cycle's two EM steps. Once the
    estimated gap is below ``NEWTON_SWITCH`` (relative) it switches to Newton steps on the
    full objective (:func:`newton_finish`, or Hessian-free :func:`newton_cg_finish` where
    :func:`hessian_free` says so), which converge quadratically; if no Newton step is
    accepted EM goes on and Newton is tried again after a growing number of iterations.
    ``on_update(state, history)``, if given, is called after every cycle and every phase of
    Newton steps (for checkpoints). ``on_ridge(state, components, objective, bound, within)``,
    if given, is called after every cycle in which some atoms are seen running off to infinity
    along a flat ridge (:func:`~pyro_softmix.stopping.find_diverging`), with ``bound`` the
    objective this run is estimated to reach and ``within`` the smaller estimate of what it
    reaches in the updates left, where its gains shrink
    (:func:`~pyro_softmix.stopping.budget_gain`); it returns True to stop this run there.
    Returns a :class:`Run`; the workspace then holds the final softmax.
    """
    st = problem.start(atoms, log_weights)
    values = torch.cat([problem.objective(st), atoms.norm(dim=1).double()]).tolist()
    check_finite(values[:1], "the objective at the start")
    history, rule = [values[0]], StoppingRule(tol)
    norms = [values[1:]]  # after every update, as the history
    step_max = [1.0] if accelerate else None
    converged, it = False, 0
    use_newton = accelerate and problem.newton_capable and problem.num_starts == 1
    next_newton, backoff, newton_gap = 0, 1, None

    def record(objs: list[float], step_norms: list) -> None:
        """Count the updates that led to ``st`` (their objectives and atoms' norms), and show
        them (the progress bar, ``on_update``)."""
        nonlocal it
        it += len(objs)
        history.extend(objs)
        norms.extend(step_norms)
        if objs and bar is not None:
            bar.update(len(objs))
            bar.set_postfix(loglik=f"{history[-1]:.8g}", refresh=False)
        if objs and on_update is not None:
            on_update(st, history)

    def newton_phase(max_steps: int) -> tuple[bool, bool, float, float]:
        """Newton steps from ``st`` (:func:`_precise_newton`), recorded as updates: whether
        they converged, failed, their gap estimate and what they gained (in float64)."""
        nonlocal st
        st, objs, step_norms, done, failed, phase_gap, begin = _precise_newton(
            problem, st, history[-1], tol, max_steps)
        record(objs, step_norms)
        return done, failed, phase_gap, objs[-1] - begin if objs else 0.0

    while it < max_iter:
        num_steps = 2 if accelerate and max_iter - it >= 2 else 1
        st, objs, step_gains, step_norms = squarem_cycle(problem, st, num_steps, step_max)
        check_finite([o[0] for o in objs] + [g[0] for g in step_gains], "the EM objective")
        record([o[0] for o in objs], step_norms)
        rule.record([g[0] for g in step_gains], cycle=num_steps == 2 and accelerate)
        # A log-likelihood (less a penalty) is at most 0: at 0 nothing is left to gain.
        if history[-1] >= 0.0:
            converged = True
            break
        if rule.converged(history[-1]):
            if not use_newton or problem.precise() is problem:  # float64, or no room for a twin
                converged = True
                break
            # A float32 run stopped by EM's rule, which reads float32 gains: they round at
            # about eps32 N |logit|. Newton steps in float64 take the iterate to the optimum
            # of the float32 design (a few steps where EM has converged to float32 accuracy).
            # Where they gain more than the tolerance without converging, EM's claim was
            # wrong (SmolLM2, K = 4: 2.8 nats in 10 steps) and the run goes on.
            done, _, phase_gap, gain = newton_phase(NEWTON_MAX_STEPS)
            converged = done or gain <= tol * abs(history[-1])
            if converged:
                newton_gap = phase_gap if done else None
                break
            rule.reset()
            continue
        gap = rule.gap(history[-1])
        if on_ridge is not None and max(norms[-1]) >= DIVERGENCE_NORM:
            ridge = find_diverging(norms, history, problem.workspace.q)
            if ridge and on_ridge(st, ridge, history[-1], history[-1] + gap,
                                  history[-1] + min(gap, budget_gain(history, max_iter - it))):
                break
        if use_newton and it >= next_newton and gap <= NEWTON_SWITCH * abs(history[-1]):
            converged, failed, newton_gap, _ = newton_phase(min(NEWTON_MAX_STEPS, max_iter - it))
            if converged:
                break
            newton_gap = None  # EM goes on: the phase's estimate no longer applies
            if failed:  # EM goes on; try again after a growing number of iterations
                next_newton, backoff = it + 2 * backoff, 2 * backoff
            rule.reset()  # increments from before the Newton steps no longer apply
    gap = newton_gap if converged and newton_gap is not None else rule.gap(history[-1])
    return Run(st, history, norms, converged, gap)


@dataclass
class Run:
    """One start run to convergence (:func:`run`): its final state, the objective
    and the atoms' norms (z coordinates) after every update, whether the stopping rule was met,
    and the final estimated gap."""

    state: EMState
    history: list[float]
    norms: list[list[float]]
    converged: bool
    gap: float
    #: The moves away from atoms at infinity that led to this run, if any
    #: (:func:`~pyro_softmix._moves.finish`).
    moves: tuple[str, ...] = ()
    #: The components whose atoms go to infinity (:func:`~pyro_softmix._moves.finish` finds them).
    diverging: tuple[int, ...] = ()
