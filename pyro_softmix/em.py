# SPDX-License-Identifier: Apache-2.0
"""EM for softmax mixtures on counts.

With counts n (p,), N = sum n, components q_k = softmax(Z t_k) and weights alpha, one iteration is

    E-step   r_jk = alpha_k q_k(j) / pi_j,      w_jk = n_j r_jk,      W_k = sum_j w_jk
    M-step   alpha_k = W_k / N;   t_k <- one damped Newton step on sum_j w_jk log q_k(j)

The Newton step increases every component's M-step objective (Armijo), so the log-likelihood
sum_j n_j log pi_j never decreases (a generalised EM). Everything runs on the standardised design
z (see :mod:`pyro_softmix.design`) and is reported in the user's feature coordinates.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._checks import (
    as_tensor,
    check_counts,
    check_features,
    check_groups,
    check_mixing,
    check_num_components,
    check_positive_float,
    check_positive_int,
    make_generator,
    resolve_device,
    resolve_dtype,
)
from ._marginal import MAX_NEWTON_PARAMS, _marginal_gradient, _marginal_hessian, _mixed_precision
from .design import Design, _feature_scales, standardize
from .solvers import _column_logsumexp, _newton_step, _Workspace

__all__ = ["ConvergenceWarning", "DivergenceWarning", "SoftmaxMixtureFit", "fit_em", "load_fit"]

#: Longest Newton step of an atom per EM iteration, in standardised coordinates (a trust region:
#: a step of length 1 changes a typical logit by about 1).
EM_MAX_STEP = 2.0
#: Number of candidate starts under ``init="auto"`` when ``num_inits`` is not given.
AUTO_NUM_INITS = 4
#: Relative gap (EM's estimate) below which accelerated EM switches to Newton steps on the full
#: objective.
NEWTON_SWITCH = 1e-3
_NEWTON_MAX_STEPS = 10
#: (rank r, n): from rank r on, one computation of the covariances (p r^2 K, the bulk of an
#: M-step at large r) serves n consecutive M-steps; the later ones are quasi-Newton steps.
_COV_REUSE = ((32, 2), (64, 3))
_NEWTON_BACKTRACKS = 8
#: A Newton step reuses the previous step's Hessian (a chord step) while the Newton decrement
#: falls by at least this factor per step; otherwise a fresh Hessian is formed.
_CHORD_CONTRACTION = 0.1
#: An eigenvalue of -H above -_ROUNDING_EIGEN times the largest may be float32 rounding of a
#: mixed-precision Hessian (where the float64 Hessian was concave, the mixed one's most negative
#: eigenvalue measured -3e-11 to -8e-9 times the largest, on GloVe designs).
_ROUNDING_EIGEN = 1e-7


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before its stopping rule was met."""


class DivergenceWarning(UserWarning):
    """Some atoms keep growing while the objective barely changes: the MLE may be at infinity."""


#: An atom whose norm (standardised coordinates) grew by ``_DIVERGENCE_GROWTH`` (relative) over the
#: last ``_DIVERGENCE_WINDOW`` updates while the objective changed by at most
#: ``_DIVERGENCE_FLAT`` (relative), and which is long (``_DIVERGENCE_NORM``) or whose component
#: puts at least ``_DIVERGENCE_MASS`` on a single support point, is reported as heading to infinity.
#: So is a long atom whose norm grew by ``_RIDGE_GROWTH`` (relative) over the final stretch of the
#: run in which the objective stayed within ``_RIDGE_FLAT`` (relative) of its final value: on a
#: ridge towards a face of the design's convex hull (a component concentrating on a few support
#: points) Newton steps can push an atom far out while the objective's last digits settle, and the
#: growth over the last few updates then falls below any threshold.
_DIVERGENCE_NORM = 10.0
_DIVERGENCE_MASS = 0.99
_DIVERGENCE_GROWTH = 1e-5
_DIVERGENCE_WINDOW = 3
_DIVERGENCE_FLAT = 1e-4
_RIDGE_GROWTH = 0.1
_RIDGE_FLAT = 1e-6


def _diverging(norm_history: list, history: list[float], probs: torch.Tensor
               ) -> tuple[int, ...]:
    """Components whose atoms run off to infinity along a flat ridge of the objective.

    ``norm_history`` holds the atoms' norms after every update, aligned with ``history`` (the
    objective); ``probs`` is the (p, K) softmax q_k of the final atoms; its column maxima are
    read only for components that pass the cheap tests.
    """
    assert len(norm_history) == len(history), "norms must be recorded after every update"
    if len(history) < 2:
        return ()
    now = norm_history[-1]
    # The long view: growth over the final flat stretch (the history never decreases).
    floor = history[-1] - _RIDGE_FLAT * abs(history[-1])
    start = norm_history[next(i for i, v in enumerate(history) if v >= floor)]
    found = {k for k, (a, b) in enumerate(zip(now, start, strict=True))
             if a >= _DIVERGENCE_NORM and a >= (1 + _RIDGE_GROWTH) * b}
    # The short view: still growing over the last updates, and long or on one point.
    w = _DIVERGENCE_WINDOW
    if len(history) > w and abs(history[-1] - history[-1 - w]) <= _DIVERGENCE_FLAT * abs(
            history[-1]):
        growing = [k for k, (a, b) in enumerate(zip(now, norm_history[-1 - w], strict=True))
                   if k not in found and a >= (1 + _DIVERGENCE_GROWTH) * b]
        if growing:
            top_mass = probs[:, growing].amax(0).tolist()
            found.update(k for k, mass in zip(growing, top_mass, strict=True)
                         if now[k] >= _DIVERGENCE_NORM or mass >= _DIVERGENCE_MASS)
    return tuple(sorted(found))


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-9


# ----------------------------------------------------------------------------------------------
# The engine: works on standardised features z (p, r) and counts n (p,), both on one device.
# ----------------------------------------------------------------------------------------------
class _EMProblem:
    """EM for S independent starts at once: the S K components are the columns of one problem.

    Start s owns columns s K .. s K + K - 1, so the logits of all starts come from one
    (p x r)(r x S K) product and the Newton steps of all components form one batch. With S = 1
    this is plain EM. ``penalty`` is None or an (r, r) precision matrix P of a Normal prior
    N(0, P^-1) on every atom (MAP-EM); the objective is then the log-likelihood minus
    0.5 sum_k t_k^T P t_k.
    """

    def __init__(self, z: torch.Tensor, counts: torch.Tensor, num_components: int,
                 chunk_size: int | None = None, num_starts: int = 1,
                 penalty: torch.Tensor | None = None):
        self.z = z
        self.counts = counts.to(z)
        self.counts64 = counts.to(device=z.device, dtype=torch.float64)
        self.total = float(self.counts64.sum())
        self.num_components = num_components
        self.num_starts = num_starts
        self.chunk_size = chunk_size
        self.penalty = penalty
        cols = num_starts * num_components
        # Persistent buffers: the loop then makes no allocation of size p x S K.
        self.workspace = _Workspace(z, cols, chunk_size)
        self.w = z.new_empty(z.shape[0], cols)
        self.rows = z.new_empty(z.shape[0], 2 * num_starts)
        #: The weights' M-step is alpha_k = weight_sums_k / weight_total (N here; G when grouped).
        self.weight_total = self.total
        self.weight_sums: torch.Tensor | None = None
        #: Rows with n_j > 0 (for the full Hessian of the Newton endgame; set on first use).
        self.support: torch.Tensor | None = None
        #: Whether the Newton endgame applies (the grouped likelihood has no full Hessian here).
        self.newton_capable = True
        #: M-steps that share one computation of the covariances of z under q (see m_step).
        self.cov_reuse = max((n for rank, n in _COV_REUSE if z.shape[1] >= rank), default=1)
        self.cov, self.cov_age = None, 0

    def with_starts(self, num_starts: int) -> _EMProblem:
        """The same problem for another number of starts (fresh buffers)."""
        return _EMProblem(self.z, self.counts64, self.num_components, self.chunk_size,
                          num_starts, self.penalty)

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Column log-normalisers of fresh logits (and their softmax into the workspace)."""
        return _column_logsumexp(logits, self.workspace.q)

    def penalty_value(self, atoms: torch.Tensor) -> torch.Tensor:
        """(S,) 0.5 sum_k t_k^T P t_k per start (zeros without a prior), in float64."""
        if self.penalty is None:
            return torch.zeros(self.num_starts, dtype=torch.float64, device=atoms.device)
        quad = 0.5 * ((atoms @ self.penalty) * atoms).sum(-1)
        return quad.double().view(self.num_starts, self.num_components).sum(1)

    def e_step(self, logits: torch.Tensor, lse: torch.Tensor, log_weights: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) float64 log-likelihoods at (atoms, weights) and the weights w = n r (p, S K).

        ``lse`` are the column log-normalisers of ``logits``. The returned w is a buffer of
        this problem, overwritten by the next call.
        """
        s, k = self.num_starts, self.num_components
        joint = torch.sub(logits, lse - log_weights, out=self.w)  # log alpha_k q_k(j)
        top, total = self.rows[:, :s], self.rows[:, s:]
        j3 = joint.view(-1, s, k)
        torch.amax(j3, 2, out=top)
        j3.sub_(top[:, :, None]).exp_()
        torch.sum(j3, 2, out=total)
        log_pi = top.add_(total.log())  # (p, S)
        # w = n_j alpha_k q_k(j) / pi_j
        j3.mul_(total.reciprocal_().mul_(self.counts[:, None])[:, :, None])
        loglik = self.counts64 @ log_pi.to(torch.float64)
        self.weight_sums = joint.sum(0)
        return loglik, joint

    def m_step(self, w: torch.Tensor, atoms: torch.Tensor, log_weights: torch.Tensor,
               logits: torch.Tensor, lse: torch.Tensor):
        """New (atoms, log_weights, logits, lse) and the (S,) increases of the EM surrogate Q.

        The increase is N KL(alpha_new || alpha_old) for the weights plus the quadratic-model
        gain (s - s^2/2) g^T H^{-1} g of each component's Newton step. Both come from gradients,
        not from differences of large sums, so they stay accurate in float32 where the
        log-likelihood itself is resolved only to about 1e-7 relative.
        """
        new_log_weights = torch.log(self.weight_sums / self.weight_total)
        l2 = 0.0 if self.penalty is None else self.penalty
        # At large r the covariances (p r^2 K) dominate an iteration: reuse them for a few
        # M-steps (quasi-Newton steps; the line search keeps EM monotone).
        reuse = self.cov is not None and self.cov_age < self.cov_reuse
        atoms, logits, lse, info = _newton_step(self.z, w, atoms, logits, self.workspace, lse,
                                                l2=l2, max_step=EM_MAX_STEP,
                                                cov=self.cov if reuse else None)
        self.cov, self.cov_age = info.cov, (self.cov_age + 1 if reuse else 1)
        # KL(a || b) to second order, 0.5 sum (a - b)^2 / b: no first-order cancellation.
        a, b = new_log_weights.double().exp(), log_weights.double().exp()
        kl = 0.5 * (a - b) ** 2 / b.clamp_min(1e-300)
        newton = ((info.step - 0.5 * info.step**2) * info.gain).double()
        gain = (self.weight_total * kl + newton).view(self.num_starts, -1).sum(1)
        return atoms, new_log_weights, logits, lse, gain

    def start(self, atoms: torch.Tensor, log_weights: torch.Tensor) -> _EMState:
        """The state at (atoms (S K, r), log_weights (S K,)): logits, normalisers, E-step."""
        logits = self.z @ atoms.T
        lse = self.normalise(logits)
        loglik, w = self.e_step(logits, lse, log_weights)
        return _EMState(atoms, log_weights, logits, lse, w, loglik)

    def iterate(self, st: _EMState) -> tuple[_EMState, torch.Tensor]:
        """One EM iteration (M-step, then E-step); also returns the (S,) surrogate gains."""
        atoms, log_weights, logits, lse, gain = self.m_step(st.w, st.atoms, st.log_weights,
                                                            st.logits, st.lse)
        loglik, w = self.e_step(logits, lse, log_weights)
        return _EMState(atoms, log_weights, logits, lse, w, loglik), gain

    def objective(self, st: _EMState) -> torch.Tensor:
        """(S,) float64 objective: log-likelihood minus the prior's penalty."""
        return st.loglik - self.penalty_value(st.atoms)

    def cycle(self, st: _EMState, num_steps: int = 2, step_max: list[float] | None = None):
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
        s, k = self.num_starts, self.num_components
        states, gains = [st], []
        for _ in range(num_steps):
            nxt, gain = self.iterate(states[-1])
            states.append(nxt)
            gains.append(gain)
        extrapolate = step_max is not None and num_steps == 2
        parts = [self.objective(x) for x in states[1:]] + gains
        parts += [x.atoms.norm(dim=1).double() for x in states[1:]]
        if extrapolate:
            t0, t1, t2 = states
            trial, alpha = self._extrapolate(t0, t1, t2, step_max)
            parts += [self.objective(trial), trial.atoms.norm(dim=1).double(), alpha]
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
        lse = self.normalise(logits)
        loglik, w = self.e_step(logits, lse, log_weights)
        best = [a if kept else b for a, b, kept in zip(obj_e, objs[-1], keep, strict=True)]
        last_norms = [norm_e[i] if keep[i // k] else norms[-1][i] for i in range(s * k)]
        return (_EMState(atoms, log_weights, logits, lse, w, loglik), objs[:-1] + [best],
                gain_lists, norms[:-1] + [last_norms])

    def _extrapolate(self, t0: _EMState, t1: _EMState, t2: _EMState, step_max: list[float]):
        """The SQUAREM point from three successive states, evaluated (logits and E-step)."""
        s, k = self.num_starts, self.num_components
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
        logits = torch.mm(self.z, atoms.T, out=self.workspace.trial_buffer(t2.logits))
        lse = self.normalise(logits)
        loglik, w = self.e_step(logits, lse, log_weights)
        return _EMState(atoms, log_weights, logits, lse, w, loglik), alpha.double()

    def _num_free(self) -> int:
        """Free coordinates of one start: K r atoms and K - 1 weight logits."""
        return self.num_components * (self.z.shape[1] + 1) - 1

    def newton(self, st: _EMState, obj: float, tol: float, max_steps: int):
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
        k, r = self.num_components, self.z.shape[1]
        if self.support is None:
            self.support = torch.nonzero(self.counts64 > 0).squeeze(1)
        noise = 64 * torch.finfo(self.z.dtype).eps * abs(obj)
        objs, norms, gap, chol = [], [], math.inf, None
        pen = None if self.penalty is None else self.penalty.to(torch.float64)

        def solve(chol):
            """Newton direction, decrement, and whether half the decrement is within tol."""
            direction = torch.cholesky_solve(grad[:, None], chol).squeeze(1)
            decrement = float(grad @ direction)
            return direction, decrement, decrement / 2 <= tol * abs(obj)

        last = 0.0  # the decrement of the last full step taken with a concave Hessian, else 0
        for _ in range(max_steps):
            grad, pieces = _marginal_gradient(self.z, self.workspace.q, st.w, st.log_weights)
            if pen is not None:
                grad[:k * r] -= (st.atoms.double() @ pen).reshape(-1)
            fresh = True
            if chol is not None:
                # The previous step's Hessian changes little from one step to the next here:
                # no new Hessian just to confirm convergence, and none while a step with the
                # old one (a chord step) still cuts the decrement by _CHORD_CONTRACTION.
                direction, decrement, done = solve(chol)
                gap = decrement / 2
                if done:
                    return st, objs, norms, True, False, gap
                fresh = decrement > _CHORD_CONTRACTION * last
            if fresh:
                chol, eig = self._factor(st, pieces, pen)
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
            d_atoms = direction[:k * r].view(k, r).to(st.atoms)
            d_eta = torch.cat([direction[k * r:], direction.new_zeros(1)]).to(st.atoms)
            step, accepted = 1.0, None
            for _ in range(_NEWTON_BACKTRACKS):
                log_w = torch.log_softmax(st.log_weights + step * d_eta, 0)
                trial = self.start(st.atoms + step * d_atoms, log_w)
                values = torch.cat([self.objective(trial),
                                    trial.atoms.norm(dim=1).double()]).tolist()
                if values[0] >= obj + 1e-4 * step * decrement or (
                        decrement <= noise and math.isfinite(values[0])):
                    accepted = trial
                    break
                step /= 2
            if accepted is None:
                # The trials overwrote the workspace and the E-step buffer: restore st.
                st = self.start(st.atoms, st.log_weights)
                if not fresh:  # the old Hessian is too stale: a fresh one next
                    chol, last = None, 0.0
                    continue
                return st, objs, norms, False, True, gap
            last = decrement if chol is not None and step == 1.0 else 0.0
            st, obj = accepted, values[0]
            objs.append(obj)
            norms.append(values[1:])
        return st, objs, norms, False, False, gap

    def _factor(self, st: _EMState, pieces, pen: torch.Tensor | None):
        """The full Hessian H of the objective at ``st``, as (Cholesky factor of -H, None)
        where -H is positive definite, else (None, eigendecomposition of -H).

        The Hessian's products may run in mixed precision (:func:`_mixed_precision`). Where
        -H then looks indefinite by no more than float32 rounding (near a flat ridge), the
        decision is made again on the float64 Hessian; a clear saddle keeps the cheap one.
        """
        k, r = self.num_components, self.z.shape[1]

        def negative_hessian(precise: bool) -> torch.Tensor:
            hess = _marginal_hessian(self.z, self.counts, self.workspace.q, st.w, pieces,
                                     self.support, precise=precise)
            if pen is not None:
                hess[:k * r, :k * r] -= torch.block_diag(*[pen] * k)
            return hess.neg_()

        neg = negative_hessian(precise=False)
        chol, info = torch.linalg.cholesky_ex(neg)
        if int(info) == 0:
            return chol, None
        eig = torch.linalg.eigh(neg)
        if _mixed_precision(self.z, k) and (
                float(eig[0][0]) >= -_ROUNDING_EIGEN * float(eig[0][-1])):
            chol, info = torch.linalg.cholesky_ex(negative_hessian(precise=True))
            if int(info) == 0:
                return chol, None
        return None, eig  # where the float64 Hessian is not concave either, the first one's

    def run(self, atoms: torch.Tensor, log_weights: torch.Tensor, max_iter: int, tol: float,
            bar=None, accelerate: bool = True) -> _Run:
        """Iterate one start from (atoms, log_weights) until the estimated gap is <= tol.

        With ``accelerate``, EM runs in SQUAREM cycles (two EM steps and an extrapolation, see
        :meth:`cycle`); the stopping rule reads the gains of the cycle's two EM steps. Once the
        estimated gap is below ``NEWTON_SWITCH`` (relative) it switches to Newton steps on the
        full objective (:meth:`newton`, when K r + K - 1 <= ``MAX_NEWTON_PARAMS``), which
        converge quadratically; if no Newton step is accepted EM goes on and Newton is tried
        again after a growing number of iterations.
        Returns a :class:`_Run`; the workspace then holds the final softmax.
        """
        st = self.start(atoms, log_weights)
        values = torch.cat([self.objective(st), atoms.norm(dim=1).double()]).tolist()
        history, gains = [values[0]], []
        norms = [values[1:]]  # after every update, as the history
        step_max = [1.0] if accelerate else None
        rates, rate = deque(maxlen=_RATE_WINDOW), 0.0
        converged, it = False, 0
        use_newton = (accelerate and self.newton_capable and self.num_starts == 1
                      and self._num_free() <= MAX_NEWTON_PARAMS)
        next_newton, backoff, newton_gap = 0, 1, None
        while it < max_iter:
            num_steps = 2 if accelerate and max_iter - it >= 2 else 1
            st, objs, step_gains, step_norms = self.cycle(st, num_steps, step_max)
            it += num_steps
            history.extend(o[0] for o in objs)
            gains.extend(g[0] for g in step_gains)
            norms.extend(step_norms)
            if bar is not None:
                bar.update(num_steps)
                bar.set_postfix(loglik=f"{history[-1]:.8g}", refresh=False)
            if num_steps == 2 and accelerate:
                rate = _cycle_rate(rates, gains)
            limit = tol * abs(history[-1])
            gap = _stopping_gap(gains, limit, rate)
            if gap <= limit:
                converged = True
                break
            if use_newton and it >= next_newton and gap <= NEWTON_SWITCH * abs(history[-1]):
                st, objs, step_norms, converged, failed, newton_gap = self.newton(
                    st, history[-1], tol, min(_NEWTON_MAX_STEPS, max_iter - it))
                it += len(objs)
                history.extend(objs)
                norms.extend(step_norms)
                if bar is not None and objs:
                    bar.update(len(objs))
                if converged:
                    break
                if failed:  # EM goes on; try again after a growing number of iterations
                    next_newton, backoff = it + 2 * backoff, 2 * backoff
                gains.clear()  # increments from before the Newton steps no longer apply
        gap = newton_gap if converged and newton_gap is not None else _stopping_gap(
            gains, tol * abs(history[-1]), rate)
        return _Run(st, history, norms, converged, gap)


@dataclass
class _EMState:
    """Where EM stands: atoms (S K, r), log-weights (S K,), logits z @ atoms.T (p, S K) with
    their column log-normalisers (S K,) (the workspace holds their softmax), the E-step's
    weights w (p, S K) and the (S,) float64 log-likelihoods."""

    atoms: torch.Tensor
    log_weights: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    w: torch.Tensor
    loglik: torch.Tensor


@dataclass
class _Run:
    """One start run to convergence (:meth:`_EMProblem.run`): its final state, the objective
    and the atoms' norms (z coordinates) after every update, whether the stopping rule was met,
    and the final estimated gap."""

    state: _EMState
    history: list[float]
    norms: list[list[float]]
    converged: bool
    gap: float


def _group_log_joint(log_q: torch.Tensor, group_index: torch.Tensor, point_index: torch.Tensor,
                     values: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, K) sum_j n_gj log q_k(j) from (p, K) log q and sparse (group, point, count) triplets.

    ``values`` has shape (nnz, 1). Differentiable (used for observed information too).
    """
    per_entry = log_q[point_index].mul_(values)
    return log_q.new_zeros(num_groups, log_q.shape[1]).index_add_(0, group_index, per_entry)


class _GroupedEMProblem(_EMProblem):
    """EM when all draws of a group share one component.

    Group g has counts n_gj (stored sparsely as triplets). Its log-likelihood is
    log sum_k alpha_k prod_j q_k(j)^{n_gj}; the E-step gives r_gk = P(component k | group g), the
    M-step weights are alpha_k = sum_g r_gk / G and the atoms' weighted softmax regression uses
    w_jk = sum_g n_gj r_gk, so the M-step for the atoms is the ungrouped one with these weights.
    """

    def __init__(self, z: torch.Tensor, group_index: torch.Tensor, point_index: torch.Tensor,
                 values: torch.Tensor, num_groups: int, num_components: int,
                 chunk_size: int | None = None, num_starts: int = 1,
                 penalty: torch.Tensor | None = None):
        counts = torch.zeros(z.shape[0], dtype=torch.float64).index_add_(
            0, point_index.cpu(), values.cpu().double())
        super().__init__(z, counts, num_components, chunk_size, num_starts, penalty)
        self.newton_capable = False
        dev = z.device
        self.triplets = (group_index, point_index, values)
        self.group_index = group_index.to(dev)
        self.point_index = point_index.to(dev)
        self.values = values.to(device=dev, dtype=z.dtype)[:, None]
        self.num_groups = num_groups
        self.weight_total = float(num_groups)

    def with_starts(self, num_starts: int) -> _GroupedEMProblem:
        return _GroupedEMProblem(self.z, *self.triplets, self.num_groups, self.num_components,
                                 self.chunk_size, num_starts, self.penalty)

    def _joint(self, log_q: torch.Tensor) -> torch.Tensor:
        return _group_log_joint(log_q, self.group_index, self.point_index, self.values,
                                self.num_groups)

    def e_step(self, logits, lse, log_weights):
        s, k = self.num_starts, self.num_components
        joint = self._joint(torch.sub(logits, lse, out=self.w)).add_(log_weights)  # (G, S K)
        j3 = joint.view(-1, s, k)
        group_ll = torch.logsumexp(j3, 2)  # (G, S)
        r = j3.sub_(group_ll[:, :, None]).exp_().view(-1, s * k)  # responsibilities
        self.weight_sums = r.sum(0)
        w = self.w.zero_().index_add_(0, self.point_index, r[self.group_index].mul_(self.values))
        return group_ll.to(torch.float64).sum(0), w

    def responsibilities(self, atoms, log_weights) -> torch.Tensor:
        """(G, K) P(component k | group g) at (atoms, log_weights)."""
        log_q = torch.log_softmax(self.z @ atoms.T, 0)
        return torch.softmax(self._joint(log_q) + log_weights, 1)


#: Largest linear rate assumed by the stopping rule (so the gap estimate is at most 1e4 steps).
_MAX_RATE = 1 - 1e-4
#: A gain at most this fraction of the tolerance (times |objective|) is at rounding level: from a
#: converged start (a race's survivor, K = 1) the gains then rise and fall at random, and only
#: this floor lets the stopping rule see the stationary point.
_NOISE_GAIN = 1e-3


def _remaining_gap(gains, max_rate: float = _MAX_RATE, rate: float = 0.0,
                   noise: float = 0.0) -> float:
    """Estimated distance l* - l_t from the last two EM increments (Aitken's extrapolation).

    EM converges linearly, l* - l_t ~ Delta_t / (1 - rho) with rho = Delta_t / Delta_{t-1}
    (capped at ``max_rate``), so a small step at a slow rate (a stall, rho near 1) does not count
    as convergence, and neither does a small step after a smaller one (EM speeding up as it
    leaves a saddle). The increments are Newton decrements of the M-step (gradient-based), not
    differences of the objective. ``rate`` is a lower bound on rho: after an extrapolation the
    two increments can decay fast (the slow direction was just cut) although EM is slow there,
    so accelerated runs pass the largest rate of their last few cycles. A last gain at most
    ``noise`` (rounding level: from a converged point the gains rise and fall at random) means
    a stationary point, whatever the trend.
    """
    if gains and gains[-1] <= noise:
        return 0.0
    if len(gains) < 2:
        return math.inf
    d1, d0 = gains[-1], gains[-2]
    if d1 > d0:
        # Gains that grow mean EM is leaving a slow stretch (a saddle, a plateau), not
        # converging: never stop there, however small the gain.
        return math.inf
    return d1 / (1 - min(max(d1 / d0, rate), max_rate))


def _stopping_gap(gains, limit: float, rate: float = 0.0) -> float:
    """The stopping rule's gap estimate (:func:`_remaining_gap`) against ``limit`` = tol times
    |objective|: a last gain below ``_NOISE_GAIN * limit`` is rounding noise."""
    return _remaining_gap(gains, rate=rate, noise=_NOISE_GAIN * limit)


#: Cycles over which an accelerated run keeps its largest observed EM rate (see _remaining_gap).
_RATE_WINDOW = 8


def _cycle_rate(rates: deque, gains) -> float:
    """Record the rate d1 / d0 of a cycle's two EM increments; the largest in the window."""
    d0, d1 = gains[-2], gains[-1]
    rates.append(d1 / d0 if d0 > 0 and d1 > 0 else 0.0)
    return max(rates)


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class SoftmaxMixtureFit:
    """A fitted softmax mixture (maximum-likelihood point estimate).

    Attributes:
        weights: (K,) mixture weights, summing to 1.
        atoms: (K, L) atoms in the user's feature coordinates (minimum-norm representative when
            the features are rank-deficient).
        loglik: sum_j n_j log pi_j at the solution.
        n_iter: updates from the chosen start to the solution: EM iterations (M-steps) and
            Newton steps of the run that was kept; the race that chose the start (and the
            runs of its other survivors) are counted in ``init``.
        converged: whether the stopping rule was met.
        history: the objective at the chosen start and after every update since (the
            log-likelihood; with ``prior_scale`` the log-likelihood plus the atoms' log prior,
            up to a constant).
        num_obs: N, the total count.
        num_points: p.  rank: number of identified directions r (= L for full-rank features).
        init: how the final run was started.  seconds: wall time of the whole fit.
        features: the (p, L) features the fit was made on (a reference, not a copy), or None
            after :func:`load_fit` of a file saved without features.
        num_groups, group_labels, group_responsibilities: for grouped data only (else None):
            G, the (G,) group ids in the order used, and (G, K) P(component k | group g).
        prior_scale: the scale of the Normal prior on the atoms for a MAP fit (None: MLE).
        diverging: components whose atoms were still growing along a flat ridge of the
            objective when EM stopped (the MLE is then at infinity; refit with ``prior_scale``).
    """

    weights: torch.Tensor
    atoms: torch.Tensor
    loglik: float
    n_iter: int
    converged: bool
    history: list[float]
    num_obs: float
    num_points: int
    rank: int
    init: str = "random"
    seconds: float = 0.0
    features: torch.Tensor | None = field(default=None)
    num_groups: int | None = None
    group_labels: torch.Tensor | None = None
    group_responsibilities: torch.Tensor | None = None
    prior_scale: float | None = None
    diverging: tuple[int, ...] = ()

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.atoms.shape[1])

    @property
    def num_params(self) -> int:
        """Free parameters: K - 1 weights and K r identified atom coordinates."""
        return self.num_components - 1 + self.num_components * self.rank

    @property
    def bic(self) -> float:
        """-2 loglik + num_params log(n), with n the independent units: N draws, or G groups."""
        units = self.num_obs if self.num_groups is None else self.num_groups
        return -2.0 * self.loglik + self.num_params * math.log(units)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.num_params

    def _features(self, features) -> torch.Tensor:
        x = self.features if features is None else check_features(features)
        if x is None:
            raise ValueError("this fit holds no features (it was loaded from a file saved "
                             "without them): pass features=")
        if x.shape[1] != self.num_features:
            raise ValueError(f"features must have {self.num_features} columns, got {x.shape[1]}")
        return x.to(device=self.atoms.device, dtype=self.atoms.dtype)

    def component_log_probs(self, features=None) -> torch.Tensor:
        """(K, p) log q_k(j) = log softmax(X theta_k)_j."""
        x = self._features(features)
        return torch.log_softmax(self.atoms @ x.T, dim=-1)

    def log_probs(self, features=None) -> torch.Tensor:
        """(p,) log pi_j of the fitted mixture."""
        comp = self.component_log_probs(features)
        return torch.logsumexp(comp + self.weights.log()[:, None], 0)

    def probs(self, features=None) -> torch.Tensor:
        """(p,) mixture probabilities pi_j (sum to 1)."""
        return self.log_probs(features).exp()

    def responsibilities(self, features=None) -> torch.Tensor:
        """(p, K) posterior P(component k | Y = j) for every support point."""
        joint = self.component_log_probs(features) + self.weights.log()[:, None]
        return torch.softmax(joint, 0).T

    def distribution(self, features=None):
        """The fitted :class:`~pyro_softmix.SoftmaxMixture` distribution."""
        from .distributions import SoftmaxMixture

        return SoftmaxMixture(self._features(features), self.atoms, self.weights)

    # -- reporting -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"SoftmaxMixtureFit(K={self.num_components}, p={self.num_points}, "
                f"L={self.num_features}, loglik={self.loglik:.6g}, n_iter={self.n_iter}, "
                f"converged={self.converged})")

    def summary(self, max_coords: int = 4) -> str:
        """A short table of the fit."""
        lines = [
            f"Softmax mixture: K={self.num_components}, p={self.num_points}, "
            f"L={self.num_features} (rank {self.rank}), N={self.num_obs:,.0f}"
            + ("" if self.num_groups is None else f" in G={self.num_groups:,} groups"),
            f"log-likelihood {self.loglik:.8g}   BIC {self.bic:.6g}   AIC {self.aic:.6g}",
            f"{'converged' if self.converged else 'NOT converged'} after {self.n_iter} EM "
            f"iterations ({self.seconds:.2f} s, init={self.init})",
            f"{'k':>3} {'weight':>8} {'|atom|':>9}  atom[:{max_coords}]",
        ]
        w = self.weights.detach().cpu().double()
        a = self.atoms.detach().cpu().double()
        for k in range(self.num_components):
            coords = " ".join(f"{v:8.3f}" for v in a[k, :max_coords].tolist())
            lines.append(f"{k:>3} {float(w[k]):8.4f} {float(a[k].norm()):9.4f}  {coords}")
        return "\n".join(lines)

    # -- persistence (no pickle) -----------------------------------------------------------
    def save(self, path: str | os.PathLike, include_features: bool = False) -> None:
        """Save to a ``.npz`` file (arrays plus a JSON header; loadable without pickle).

        Args:
            path: file name; ``.npz`` is appended by NumPy if missing.
            include_features: also store the (p, L) features, so :meth:`probs` works after
                :func:`load_fit` without passing them.
        """
        meta = {
            "format": "pyro-softmix-fit", "version": 1, "loglik": self.loglik,
            "n_iter": self.n_iter, "converged": self.converged, "num_obs": self.num_obs,
            "num_points": self.num_points, "rank": self.rank, "init": self.init,
            "seconds": self.seconds, "dtype": str(self.atoms.dtype).replace("torch.", ""),
            "num_groups": self.num_groups, "prior_scale": self.prior_scale,
            "diverging": list(self.diverging),
        }
        arrays = {
            "weights": self.weights.detach().cpu().numpy(),
            "atoms": self.atoms.detach().cpu().numpy(),
            "history": np.asarray(self.history, dtype=np.float64),
            "meta": np.array(json.dumps(meta)),
        }
        if self.num_groups is not None:
            arrays["group_labels"] = self.group_labels.detach().cpu().numpy()
            arrays["group_responsibilities"] = self.group_responsibilities.detach().cpu().numpy()
        if include_features:
            if self.features is None:
                raise ValueError("include_features=True but this fit holds no features")
            arrays["features"] = self.features.detach().cpu().numpy()
        np.savez(path, **arrays)


def load_fit(path: str | os.PathLike, device=None) -> SoftmaxMixtureFit:
    """Load a fit written by :meth:`SoftmaxMixtureFit.save` (no pickle involved).

    Example:
        >>> fit.save("fit.npz"); again = load_fit("fit.npz")  # doctest: +SKIP
    """
    with np.load(path, allow_pickle=False) as data:
        try:
            meta = json.loads(str(data["meta"]))
        except KeyError:
            raise ValueError(f"{os.fspath(path)!r} is not a pyro-softmix fit file") from None
        if meta.get("format") != "pyro-softmix-fit":
            raise ValueError(f"{os.fspath(path)!r} is not a pyro-softmix fit file")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        feats = torch.from_numpy(data["features"]).to(dev) if "features" in data else None
        grouped = meta.get("num_groups") is not None
        return SoftmaxMixtureFit(
            weights=torch.from_numpy(data["weights"]).to(dev),
            atoms=torch.from_numpy(data["atoms"]).to(dev),
            loglik=float(meta["loglik"]), n_iter=int(meta["n_iter"]),
            converged=bool(meta["converged"]), history=data["history"].tolist(),
            num_obs=float(meta["num_obs"]), num_points=int(meta["num_points"]),
            rank=int(meta["rank"]), init=str(meta["init"]), seconds=float(meta["seconds"]),
            features=feats, num_groups=meta.get("num_groups"),
            prior_scale=meta.get("prior_scale"), diverging=tuple(meta.get("diverging", ())),
            group_labels=torch.from_numpy(data["group_labels"]).to(dev) if grouped else None,
            group_responsibilities=(torch.from_numpy(data["group_responsibilities"]).to(dev)
                                    if grouped else None),
        )


# ----------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------
def _progress_bar(progress: bool | None, total: int, desc: str):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _user_start(init: Any, num_components: int, design: Design, z: torch.Tensor):
    if isinstance(init, Mapping):
        if set(init) < {"weights", "atoms"}:
            raise ValueError("init as a mapping must have keys 'weights' and 'atoms'")
        weights, atoms = init["weights"], init["atoms"]
    else:
        weights, atoms = init.weights, init.atoms
    w, a = check_mixing(weights, atoms, num_components, design.num_features, name="init")
    atoms_z = design.atoms_to_z(a.to(design.from_atoms.device)).to(device=z.device, dtype=z.dtype)
    return atoms_z, w.log().to(device=z.device, dtype=z.dtype)


def _prepare(features, counts, tokens, groups, num_components, dtype, device, chunk_size):
    """Validate the data and build the standardised design and the EM engine."""
    x = check_features(features)
    p = x.shape[0]
    k = check_num_components(num_components, p)
    dtype = resolve_dtype(dtype, as_tensor(features, "features"))
    device = resolve_device(device, x)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    if groups is None:
        n = check_counts(counts, tokens, p)
        grouped = None
    else:
        grouped = check_groups(groups, counts, tokens, p)
    design = standardize(x, chunk_size=chunk_size)
    z = design.transform(x, dtype=dtype, device=device, chunk_size=chunk_size)
    if grouped is None:
        problem = _EMProblem(z, n.to(device), k, chunk_size)
        labels = None
    else:
        gi, pi, values, labels = grouped
        problem = _GroupedEMProblem(z, gi, pi, values, int(labels.shape[0]), k, chunk_size)
    return x, design, z, problem, k, dtype, device, labels


def _check_init(init, num_inits):
    from .warmstart import WARM_START_METHODS

    if isinstance(init, str) and init not in WARM_START_METHODS:
        raise ValueError(f"init must be one of {WARM_START_METHODS} or a start with weights and "
                         f"atoms, got {init!r}")
    if num_inits is not None:
        num_inits = check_positive_int(num_inits, "num_inits")
    return num_inits


#: The race behind ``init="auto"``: the starts run as one batch of SQUAREM cycles (plain EM
#: without acceleration) until every start left is within ``RACE_HANDOVER`` (relative, Aitken) of
#: its own limit; the survivors then each finish on their own (:meth:`_EMProblem.run`, with its
#: Newton endgame) and the best final objective wins. A start is dropped from the race when it
#: is clearly beaten: its limit extrapolated at the slow rate ``RACE_MAX_RATE`` (200 times its
#: last gain) is below the leader's objective; or when it has joined the leader (its atoms,
#: matched to the leader's, within ``RACE_SAME`` of them relative to the largest atom norm, and
#: its weights within ``RACE_SAME``). An Aitken limit at the measured rate is not used to drop:
#: before EM's rate settles (weakly separated mixtures cross saddle regions where the gains stall
#: and then grow again) it is far too low.
RACE_MAX_RATE = 0.995
RACE_HANDOVER = NEWTON_SWITCH
RACE_SAME = 1e-2
RACE_CHECK_EVERY = 2


def _joined(atoms: torch.Tensor, log_weights: torch.Tensor, lead: int) -> list[bool]:
    """For each of S starts (atoms (S, K, r), log-weights (S, K)), whether it sits at the leader's
    point up to a permutation of the components (within ``RACE_SAME``)."""
    ref = atoms[lead]
    dist = torch.cdist(atoms, ref.expand_as(atoms))  # (S, K own, K leader)
    nearest, match = dist.min(1)  # for each leader atom, the closest own atom
    scale = 1.0 + ref.norm(dim=1).max()
    w_gap = (log_weights.exp().gather(1, match) - log_weights[lead].exp()).abs().amax(1)
    close = (nearest.amax(1) <= RACE_SAME * scale) & (w_gap <= RACE_SAME)
    distinct = match.sort(1).values == torch.arange(atoms.shape[1], device=atoms.device)
    return (close & distinct.all(1)).tolist()


def _race(problem: _EMProblem, atoms: torch.Tensor, log_weights: torch.Tensor,
          max_iter: int, bar=None, accelerate: bool = True):
    """Race S starts (atoms (S, K, r), log_weights (S, K)) in one batch for at most about
    ``max_iter`` iterations; see ``RACE_*``. With ``accelerate`` each check follows a SQUAREM
    cycle (:meth:`_EMProblem.cycle`).

    Returns the survivors' atoms (S', K, r) and log-weights (S', K), best objective first, and
    the EM iterations spent (summed over starts).
    """
    s, k, r = atoms.shape
    spent, it = 0, 0
    step_max = [1.0] * s if accelerate else None
    rates = [deque(maxlen=_RATE_WINDOW) for _ in range(s)]
    while s > 1 and it < max_iter:
        batch = problem.with_starts(s)
        st = batch.start(atoms.reshape(s * k, r), log_weights.reshape(s * k))
        keep = None
        while keep is None and it < max_iter:
            st, objs, gains, _ = batch.cycle(st, RACE_CHECK_EVERY, step_max)
            it += RACE_CHECK_EVERY
            spent += s * RACE_CHECK_EVERY
            if bar is not None:
                bar.update(s * RACE_CHECK_EVERY)
            obj = [-math.inf if math.isnan(v) else v for v in objs[-1]]
            pairs = list(zip(*gains[-2:], strict=True))
            order = sorted(range(s), key=obj.__getitem__, reverse=True)
            lead = order[0]
            bound = [_remaining_gap(g, RACE_MAX_RATE, RACE_MAX_RATE) for g in pairs]
            joined = _joined(st.atoms.view(s, k, r), st.log_weights.view(s, k), lead)
            alive = [i for i in order
                     if i == lead or (obj[i] + bound[i] >= obj[lead] and not joined[i])]
            rate = [_cycle_rate(q, g) if accelerate else 0.0 for q, g in zip(rates, pairs,
                                                                              strict=True)]
            if len(alive) < s:
                keep = alive
            if all(_remaining_gap(pairs[i], rate=rate[i]) <= RACE_HANDOVER * abs(obj[i])
                   for i in alive):
                keep, it = alive, max_iter  # hand the survivors over
        if keep is None:  # out of iterations: the leader alone goes on
            keep = [lead]
        rates = [rates[i] for i in keep]
        if step_max is not None:
            step_max = [step_max[i] for i in keep]
        index = torch.tensor(keep, device=atoms.device)
        atoms = st.atoms.view(s, k, r)[index]
        log_weights = st.log_weights.view(s, k)[index]
        s = atoms.shape[0]
    return atoms, log_weights, spent


def _auto_start(problem: _EMProblem, mom, k: int, num_inits: int | None,
                gen: torch.Generator, max_iter: int = 1000, progress: bool | None = False,
                accelerate: bool = True):
    """The ``"auto"`` start: ``num_inits`` design-calibrated random starts in all r directions
    (:func:`~pyro_softmix.warmstart.calibrated_atoms`), raced in one batch.

    Neither the tensor start nor M2's top eigenspace is used: where the moments are noisy (real
    embeddings, or r not small against the effective number of support points) both point away
    from the atoms, and a start led there ends at a worse optimum; see ``docs/warmstarts.md``.

    Returns the race's survivors, best first: atoms (S', K, r) and log_weights (S', K); and the
    start-iterations spent in the race.
    """
    from .warmstart import calibrated_atoms

    n = num_inits or AUTO_NUM_INITS
    atoms = calibrated_atoms(mom, k, n, gen)  # on problem.z's device, in its dtype
    log_w = torch.full((n, k), -math.log(k), dtype=atoms.dtype, device=atoms.device)
    if n == 1:
        return atoms, log_w, 0
    bar = _progress_bar(progress, None, "EM starts")
    try:
        return _race(problem, atoms, log_w, max_iter, bar, accelerate)
    finally:
        if bar is not None:
            bar.close()


def _choose_start(problem, design, z, k, init, num_inits, max_iter, seed, progress,
                  accelerate: bool = True):
    """(atoms_z (S, K, r), log_weights (S, K), label): the starts of the final EM runs, best
    first (S > 1 only when a race left several survivors)."""
    from .moments import _standardised_moments
    from .warmstart import _moment_start

    if not isinstance(init, str):
        atoms_z, log_w = _user_start(init, k, design, z)
        return atoms_z[None], log_w[None], "given"
    gen = make_generator(seed)
    mom = _standardised_moments(z, problem.counts64, design)
    if init == "auto":
        atoms_z, log_w, spent = _auto_start(problem, mom, k, num_inits, gen, max_iter, progress,
                                            accelerate)
        n = num_inits or AUTO_NUM_INITS
        return atoms_z, log_w, ("auto" if n == 1 else _race_label("auto", n, spent, atoms_z))
    n = num_inits or 1
    starts = [_moment_start(mom, k, init, gen) for _ in range(n)]
    log_w = torch.stack([w for w, _ in starts]).log().to(z)
    atoms = torch.stack([a for _, a in starts]).to(z)
    if n == 1:
        return atoms, log_w, init
    atoms_z, log_w, spent = _race(problem, atoms, log_w, max_iter, accelerate=accelerate)
    return atoms_z, log_w, _race_label(init, n, spent, atoms_z)


def _race_label(init: str, n: int, spent: int, survivors: torch.Tensor) -> str:
    left = survivors.shape[0]
    return (f"{init} (race of {n} starts, {spent} start-iterations"
            + (f", {left} finished" if left > 1 else "") + ")")


def _finish(problem: _EMProblem, starts_z: torch.Tensor, starts_w: torch.Tensor, max_iter: int,
            tol: float, bar=None, accelerate: bool = True) -> _Run:
    """Run each start (S, K, r) to convergence (:meth:`_EMProblem.run`) and keep the best.

    The workspace then holds the winner's softmax (its state is restored when a later run
    overwrote it).
    """
    runs = [problem.run(a, w, max_iter, tol, bar, accelerate)
            for a, w in zip(starts_z, starts_w, strict=True)]
    best = max(runs, key=lambda run: run.history[-1])  # the first of equals
    if best is not runs[-1]:
        best.state = problem.start(best.state.atoms, best.state.log_weights)
    return best


def _make_fit(problem, design, x, atoms_z, log_w, history, converged, label, labels,
              start_time, dtype, device, loglik=None, prior_scale=None, diverging=()
              ) -> SoftmaxMixtureFit:
    atoms = design.atoms_from_z(atoms_z.to(torch.float64).to(design.to_atoms.device))
    group_resp = None
    if isinstance(problem, _GroupedEMProblem):
        group_resp = problem.responsibilities(atoms_z, log_w).to(device=device, dtype=dtype)
    return SoftmaxMixtureFit(
        weights=log_w.exp().to(device=device, dtype=dtype),
        atoms=atoms.to(device=device, dtype=dtype),
        loglik=history[-1] if loglik is None else loglik, n_iter=len(history) - 1,
        converged=converged, history=history,
        num_obs=problem.total, num_points=x.shape[0], rank=design.rank, init=label,
        seconds=time.perf_counter() - start_time, features=x,
        num_groups=None if labels is None else int(labels.shape[0]),
        group_labels=labels, group_responsibilities=group_resp, prior_scale=prior_scale,
        diverging=tuple(diverging),
    )


def fit_em(features, counts=None, tokens=None, num_components: int = 3, init: Any = "auto",
           num_inits: int | None = None, max_iter: int = 1000, tol: float | None = None,
           device=None, dtype=None, seed=None, progress: bool | None = None,
           chunk_size: int | None = None, groups=None, prior_scale: float | None = None,
           accelerate: bool = True) -> SoftmaxMixtureFit:
    """Maximum-likelihood (or MAP) fit of a softmax mixture by EM on counts.

    The model: P(Y = j) = sum_k alpha_k softmax(X theta_k)_j for support points j = 0..p-1.

    Args:
        features: (p, L) features X of the support points (tensor or array; not modified).
        counts: (p,) nonnegative counts n_j (may be fractional weights). Or:
        tokens: (N,) integer draws in [0, p). Exactly one of ``counts``/``tokens`` (or neither
            when ``groups`` is a count matrix).
        num_components: K >= 1.
        init: ``"auto"`` (random starts at a scale calibrated on the design, raced; see
            :func:`~pyro_softmix.warm_start`), one of the moment methods ``"projection"``,
            ``"tensor"``, ``"subspace"``, ``"random"``, or a
            start: a mapping with ``"weights"`` (K,) and ``"atoms"`` (K, L), or any object with
            ``.weights`` and ``.atoms`` (a previous fit, a :class:`~pyro_softmix.WarmStart`).
        num_inits: number of starts (default 1; 4 for ``"auto"``). Several starts run as one
            batch in a race that drops the starts that are clearly beaten or have joined the
            leader; each survivor is then run to convergence and the best is kept.
        max_iter: EM iterations (M-steps) at most for each run after the race.
        tol: stop when the estimated distance to the limit, (l* - l_t) / abs(l_t), is at most
            ``tol`` (default 1e-10 in float64, 1e-9 in float32). The distance is extrapolated
            (Aitken) from the last two increases of the EM surrogate, which are computed from
            gradients and so stay accurate in float32; a slow stretch does not stop EM early.
        device: where to compute (default: the features' device).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the features' floating dtype).
        seed: int or ``torch.Generator`` for the random starts (same seed, same result).
        progress: show a progress bar (default: only when stderr is a terminal).
        chunk_size: rows per chunk for the Hessian products and the standardisation pass
            (default: about 4 MB of temporaries per chunk on a CPU, 256 MB on a GPU).
        groups: grouped data, where all draws of one group come from one component (a panel of
            choices by one person, a document from one topic): either a (N,) integer group id
            per token (with ``tokens``), or a (G, p) count matrix (alone). The log-likelihood is
            then sum_g log sum_k alpha_k prod_j q_k(j)^{n_gj}.
        prior_scale: if given, a MAP fit under the Normal prior on the atoms that
            :class:`~pyro_softmix.SoftmaxMixtureModel` uses, Normal(0, prior_scale / sd(X[:, l]))
            per coordinate (``prior_scale`` is in logit units per standard deviation of a
            feature). The remedy when the MLE lies at infinity (see ``diverging``).
        accelerate: run EM in SQUAREM cycles (two EM steps, then an extrapolation along them
            that is kept only when it raises the objective), which cuts the iterations of slow
            EM runs several-fold; ``False`` gives plain EM. Either way the objective never
            decreases.

    Returns:
        :class:`SoftmaxMixtureFit` with ``weights`` (K,), ``atoms`` (K, L), ``loglik`` and more
        (with ``groups``: ``num_groups``, ``group_labels`` and ``group_responsibilities``).

    Warns:
        ConvergenceWarning: if ``max_iter`` was reached first.
        IdentifiabilityWarning: if the centred features have rank below L.
        DivergenceWarning: if some atoms were still growing along a flat ridge of the objective.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=500, num_features=3, num_components=2,
        ...                     num_obs=20_000, seed=0)
        >>> fit = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
        >>> fit.weights.shape, fit.atoms.shape
        ((2,), (2, 3))
    """
    start_time = time.perf_counter()
    max_iter = check_positive_int(max_iter, "max_iter")
    num_inits = _check_init(init, num_inits)
    if not isinstance(accelerate, bool):
        raise TypeError(f"accelerate must be True or False, got {accelerate!r}")
    x, design, z, problem, k, dtype, device, labels = _prepare(
        features, counts, tokens, groups, num_components, dtype, device, chunk_size)
    tol = _default_tol(dtype) if tol is None else check_positive_float(tol, "tol", True)
    prior_scale = _set_prior(problem, x, design, prior_scale)
    starts_z, starts_w, label = _choose_start(problem, design, z, k, init, num_inits, max_iter,
                                              seed, progress, accelerate)
    bar = _progress_bar(progress, max_iter * starts_z.shape[0], "EM")
    try:
        run = _finish(problem, starts_z, starts_w, max_iter, tol, bar, accelerate)
    finally:
        if bar is not None:
            bar.close()
    history, norms = run.history, run.norms
    if not run.converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (estimated relative gap "
            f"{run.gap / abs(history[-1]):.2e} > tol={tol:.1e}); "
            "increase max_iter or continue with init=fit",
            ConvergenceWarning, stacklevel=2,
        )
    # After EM the workspace holds softmax(z @ atoms_z.T, 0) for the final atoms.
    # Under a prior the objective is coercive: no atom can run off to infinity.
    diverging = () if prior_scale is not None else _diverging(norms, history,
                                                              problem.workspace.q)
    if diverging:
        lengths = ", ".join(f"{norms[-1][k]:.3g}" for k in diverging)
        warnings.warn(
            f"the atoms of components {list(diverging)} keep growing (norms {lengths} in "
            "standardised units) while the objective barely changes: EM is heading to infinity, "
            "with a component concentrating on a few support points. This is a spurious optimum "
            "(try other starts, num_inits=) or the MLE is at infinity; refit with prior_scale= "
            "for a MAP estimate", DivergenceWarning, stacklevel=2)
    return _make_fit(problem, design, x, run.state.atoms, run.state.log_weights, history,
                     run.converged, label, labels, start_time, dtype, device,
                     float(run.state.loglik[0]), prior_scale, diverging)


def _set_prior(problem: _EMProblem, x: torch.Tensor, design: Design,
               prior_scale: float | None) -> float | None:
    """Check ``prior_scale`` and, if given, make ``problem`` a MAP-EM problem under the atoms'
    Normal(0, prior_scale / sd(X[:, l])) prior; returns the checked scale."""
    if prior_scale is None:
        return None
    prior_scale = check_positive_float(prior_scale, "prior_scale")
    problem.penalty = _prior_precision(x, design, prior_scale).to(problem.z)
    return prior_scale


def _prior_precision(x: torch.Tensor, design: Design, prior_scale: float) -> torch.Tensor:
    """(r, r) precision in standardised coordinates of the atoms' prior N(0, diag(s / sd_l)^2).

    With theta = A t (``design.to_atoms``), sum_l sd_l^2 theta_l^2 / s^2 = t^T A^T D A t / s^2.
    """
    sd = _feature_scales(x.to(torch.float64)).to(design.to_atoms.device)
    a = design.to_atoms.to(torch.float64)
    return (a.T * sd**2) @ a / prior_scale**2
