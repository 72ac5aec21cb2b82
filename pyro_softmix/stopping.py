# SPDX-License-Identifier: Apache-2.0
"""When to stop: the stopping rule, the divergence check, the warnings and progress bars.

EM, the race of starts, :class:`~pyro_softmix.EM` and the mixtures of experts all stop by the
rule here: an Aitken estimate of the remaining gain of the objective from the last two
increments, against ``tol`` times the objective (default :func:`default_tol`).
"""

from __future__ import annotations

import math
import sys
from collections import deque

import numpy as np
import torch

from .solvers import column_logsumexp

__all__ = ["ConvergenceWarning", "DivergenceWarning", "NumericalError", "StartWarning",
           "default_tol"]

#: A fit reports convergence only where the objective's gradient, per unit of data (see
#: :meth:`~pyro_softmix.engine.EMProblem.relative_gradient`), is at most this (converged fits
#: measure 1e-9 to 1e-7 in float64 and up to 1e-5 in float32).
GRADIENT_TOL = 1e-3


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before its stopping rule was met."""


class DivergenceWarning(UserWarning):
    """Some atoms keep growing while the objective barely changes: the MLE may be at infinity."""


class StartWarning(UserWarning):
    """A given start was worse than a one-component fit and was repaired (its atoms were
    moved toward that fit's)."""


class NumericalError(ValueError, FloatingPointError):
    """The objective, a gradient or a Hessian became NaN or infinite: the fit stops with this
    instead of returning a result (causes: counts or features beyond the dtype's range,
    float32 where float64 is needed)."""


def check_finite(values, what: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` if any of ``values`` is NaN or infinite."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise NumericalError(
            f"{what} became {bad[0]}: the fit cannot go on. Causes: counts or features beyond "
            "the range of the dtype (use dtype=torch.float64, or rescale), or atoms so long "
            "that every softmax underflows (use prior_scale=)")


#: A support point holds part of a component's mass when its softmax probability is at least
#: this fraction of the component's largest one.
ACTIVE_MASS = 1e-12
#: Largest p r for which the face test solves its linear program (7 s at p = 10^5, r = 50).
FACE_TEST_SIZE = 2_000_000


def on_a_face(z: torch.Tensor, probs: torch.Tensor, floor: float = 0.0) -> bool:
    """Whether the support points that carry a component's mass (softmax ``probs`` (p,)) lie
    on a face of the convex hull of the standardised design ``z`` (p, r): some direction u has
    them all at one height z.u and every other point below it. (Then pushing the atom out
    along u raises the likelihood forever: the component is at infinity.) A single point is
    always such a face (the atom's direction exposes it); for several points this is a linear
    program, solved only for p r <= FACE_TEST_SIZE (else False). The points that carry the
    mass are those with at least ``ACTIVE_MASS`` of the largest probability and at least
    ``floor``."""
    top = float(probs.max())
    active = (probs >= min(top, max(ACTIVE_MASS * top, floor))).nonzero().flatten()
    if active.numel() == 1:
        return True
    p, r = z.shape
    if active.numel() > r + 1 or p * r > FACE_TEST_SIZE:
        return False
    from scipy.optimize import linprog

    zz = z.detach().double().cpu().numpy()
    idx = active.cpu().numpy()
    rest = np.setdiff1d(np.arange(p), idx)
    base = zz[idx[0]]
    result = linprog(np.zeros(r), A_ub=zz[rest] - base, b_ub=-np.ones(rest.shape[0]),
                     A_eq=zz[idx[1:]] - base, b_eq=np.zeros(idx.shape[0] - 1),
                     bounds=[(None, None)] * r, method="highs")
    return result.status == 0


def at_infinity(norms: list[float], objective: float, doubled: list[float], noise: float
                ) -> tuple[int, ...]:
    """Components whose atom is long and whose objective does not fall when the atom is
    doubled (``doubled[k]``: the objective with atom k at twice its length, NaN if not
    evaluated): the ray from the origin through the atom is a recession direction, so the
    component's mass sits on a face of the design's convex hull and the supremum is at
    infinity. ``noise`` is the objective's resolution."""
    return tuple(k for k, (n, v) in enumerate(zip(norms, doubled, strict=True))
                 if n >= DIVERGENCE_NORM and math.isfinite(v) and v >= objective - noise)


#: An atom whose norm (standardised coordinates) grew by ``_DIVERGENCE_GROWTH`` (relative) over the
#: last ``_DIVERGENCE_WINDOW`` updates while the objective changed by at most
#: ``_DIVERGENCE_FLAT`` (relative), and which is long (``DIVERGENCE_NORM``) or whose component
#: puts at least ``_DIVERGENCE_MASS`` on a single support point, is reported as heading to infinity.
#: So is a long atom whose norm grew by ``_RIDGE_GROWTH`` (relative) over the final stretch of the
#: run in which the objective stayed within ``_RIDGE_FLAT`` (relative) of its final value: on a
#: ridge towards a face of the design's convex hull (a component concentrating on a few support
#: points) Newton steps can push an atom far out while the objective's last digits settle, and the
#: growth over the last few updates then falls below any threshold.
DIVERGENCE_NORM = 10.0
_DIVERGENCE_MASS = 0.99
_DIVERGENCE_GROWTH = 1e-5
_DIVERGENCE_WINDOW = 3
_DIVERGENCE_FLAT = 1e-4
_RIDGE_GROWTH = 0.1
_RIDGE_FLAT = 1e-6


def find_diverging(norm_history: list, history: list[float], probs: torch.Tensor
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
             if a >= DIVERGENCE_NORM and a >= (1 + _RIDGE_GROWTH) * b}
    # The short view: still growing over the last updates, and long or on one point.
    w = _DIVERGENCE_WINDOW
    if len(history) > w and abs(history[-1] - history[-1 - w]) <= _DIVERGENCE_FLAT * abs(
            history[-1]):
        growing = [k for k, (a, b) in enumerate(zip(now, norm_history[-1 - w], strict=True))
                   if k not in found and a >= (1 + _DIVERGENCE_GROWTH) * b]
        if growing:
            top_mass = probs[:, growing].amax(0).tolist()
            found.update(k for k, mass in zip(growing, top_mass, strict=True)
                         if now[k] >= DIVERGENCE_NORM or mass >= _DIVERGENCE_MASS)
    return tuple(sorted(found))


#: :func:`budget_gain` averages the objective's rate over the last this many updates.
BUDGET_WINDOW = 20


def budget_gain(history: list[float], remaining: int) -> float:
    """The gain of ``remaining`` more updates at the objective's mean rate over its last
    ``BUDGET_WINDOW`` updates: a bound on what a run whose gains shrink (as along a ridge) can
    still gain within its budget of updates (inf before its first update)."""
    w = min(BUDGET_WINDOW, len(history) - 1)
    return remaining * max(history[-1] - history[-1 - w], 0.0) / w if w > 0 else math.inf


def objective_noise(problem, objective: float, tol: float) -> float:
    """The resolution of an objective near ``objective`` at tolerance ``tol``."""
    return (tol * max(abs(objective), problem.total)
            + 64 * torch.finfo(problem.z.dtype).eps * problem.total)


def atoms_at_infinity(problem, state, history: list[float],
                      norms: list[list[float]], tol: float) -> tuple[int, ...]:
    """The components of one start's final ``state`` whose atoms go to infinity: found on the
    path (norms that keep growing on a flat stretch, :func:`~pyro_softmix.stopping.find_diverging`;
    the workspace must hold the state's softmax) or at the end (a long atom whose objective
    does not fall when it is doubled, or whose mass sits on a face of the hull; a race may have
    carried it there before the run began). The checks at the end run E-steps in ``problem``'s
    buffers: the state must be restarted after them where it is used again.
    """
    path = find_diverging(norms, history, problem.workspace.q)
    lengths = state.atoms.norm(dim=1).tolist()
    long = [k for k, length in enumerate(lengths) if length >= DIVERGENCE_NORM]
    if not long:
        return path
    doubled = []
    for k, length in enumerate(lengths):  # the objective with atom k at twice its length
        atoms = state.atoms.clone()
        atoms[k] *= 2
        doubled.append(float(problem.objective(problem.start(atoms, state.log_weights))[0])
                       if length >= DIVERGENCE_NORM else math.nan)
    face = set(at_infinity(lengths, history[-1], doubled,
                           objective_noise(problem, history[-1], tol)))
    probs = problem.logits(state.atoms[long])
    column_logsumexp(probs, probs)  # (their softmax, in place)
    # A point whose share of component k is below tol |objective| / (N alpha_k) changes the
    # objective by less than the stopping rule resolves: the run stops before it empties.
    floors = tol * abs(history[-1]) / (
        problem.total * state.log_weights[long].exp().double().clamp_min(1e-300))
    face |= {k for k, col, floor in zip(long, probs.T, floors.tolist(), strict=True)
             if on_a_face(problem.z, col, floor)}
    return tuple(sorted(set(path) | face))


def default_tol(dtype: torch.dtype) -> float:
    """The default tolerance of the stopping rule: 1e-10 in float64, 1e-9 in float32."""
    return 1e-10 if dtype == torch.float64 else 1e-9


#: Largest linear rate assumed by the stopping rule (so the gap estimate is at most 1e4 steps).
MAX_RATE = 1 - 1e-4
#: A gain at most this fraction of the tolerance (times |objective|) is at rounding level: from a
#: converged start (a race's survivor, K = 1) the gains then rise and fall at random, and only
#: this floor lets the stopping rule see the stationary point.
NOISE_GAIN = 1e-3


def remaining_gap(gains, max_rate: float = MAX_RATE, rate: float = 0.0,
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


#: Cycles over which an accelerated run keeps its largest observed EM rate (see remaining_gap).
RATE_WINDOW = 8


class StoppingRule:
    """The stopping rule of every iterative fit here: EM (plain and accelerated), the race of
    starts, :class:`~pyro_softmix.EM` and the mixtures of experts.

    It records the increments ("gains") of the objective, in order, and stops when the
    Aitken estimate of the remaining gain (:func:`remaining_gap`) is at most ``tol`` times
    the objective's magnitude.

    - ``monotone`` methods (EM) never lose objective: a last gain at or below rounding level
      (``NOISE_GAIN`` times the limit) is a stationary point, whatever the trend. For other
      methods (gradient ascent) a gain at or below 0 is an overshoot and never convergence.
    - Accelerated EM records its SQUAREM cycles' two EM gains with ``cycle=True``: the largest
      rate of the last ``RATE_WINDOW`` cycles is then a lower bound on the rate used (right
      after an extrapolation the two increments can decay fast although EM is slow there).

    Args:
        tol: relative tolerance (default :func:`default_tol` of the computation's dtype).
        monotone: see above.
    """

    def __init__(self, tol: float, *, monotone: bool = True):
        self.tol = tol
        self.monotone = monotone
        self.gains: deque[float] = deque(maxlen=2)  # the rule reads the last two only
        self.rates: deque[float] = deque(maxlen=RATE_WINDOW)
        self.rate = 0.0

    def record(self, gains, *, cycle: bool = False) -> None:
        """Append gains (a number or a sequence, in order); ``cycle``: the last two are the EM
        steps of one SQUAREM cycle."""
        self.gains.extend(gains if isinstance(gains, list | tuple) else [gains])
        if cycle:
            self.rate = cycle_rate(self.rates, self.gains)

    def reset(self) -> None:
        """Forget the gains (after steps of another kind, e.g. Newton steps); keep the rates."""
        self.gains.clear()

    def gap(self, objective: float) -> float:
        """The estimated remaining gain of the objective (0: stationary; inf: unknown)."""
        noise = NOISE_GAIN * self.tol * abs(objective) if self.monotone else 0.0
        return remaining_gap(self.gains, rate=self.rate, noise=noise)

    def bound(self, rate: float) -> float:
        """The remaining gain if the method went on at the linear ``rate`` (a pessimistic
        extrapolation of the last gain; 0 after a gain at or below 0)."""
        return remaining_gap(self.gains, max_rate=rate, rate=rate)

    def converged(self, objective: float, scale: float = 1.0) -> bool:
        """Whether the estimated remaining gain is within ``scale`` times ``tol`` times
        ``|objective|``."""
        gap = self.gap(objective)
        return gap <= scale * self.tol * abs(objective) and (self.monotone or gap > 0)


def cycle_rate(rates: deque, gains) -> float:
    """Record the rate d1 / d0 of a cycle's two EM increments; the largest in the window."""
    d0, d1 = gains[-2], gains[-1]
    rates.append(d1 / d0 if d0 > 0 and d1 > 0 else 0.0)
    return max(rates)


def show_progress(progress: bool | None) -> bool:
    """The package's progress convention: shown when ``progress`` is True, or when it is None
    and stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def progress_bar(progress: bool | None, total: int | None, desc: str):
    """A tqdm bar, or None (see :func:`show_progress`)."""
    if not show_progress(progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def next_run(bar, index: int, count: int, total: int, desc: str) -> None:
    """Restart ``bar`` (if any) for run ``index`` of ``count``, from 0 to ``total`` updates
    (a bar over all runs would show an ETA for the worst case of every run)."""
    if bar is None:
        return
    bar.reset(total=total)
    if count > 1:
        bar.set_description(f"{desc} run {index + 1}/{count}")
