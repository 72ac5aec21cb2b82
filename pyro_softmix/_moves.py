# SPDX-License-Identifier: Apache-2.0
"""The runs of a fit's starts: each start run to convergence (:func:`~pyro_softmix.accelerate.run`),
the moves away from atoms at infinity, the best run kept (:func:`finish`)."""

from __future__ import annotations

import math

import torch

from ._split import merge_and_split, pull_back
from .accelerate import Run, run
from .engine import EMProblem
from .stopping import DIVERGENCE_NORM, atoms_at_infinity, next_run, objective_noise

__all__ = ["finish"]

#: A run made by a move away from an atom at infinity (:func:`finish`) counts only when it ends
#: this much (relative) above the run it was made from: closer, the two reach the same optimum,
#: or the same supremum at infinity.
ESCAPE_MARGIN = 1e-6


def finish(problem: EMProblem, starts_z: torch.Tensor, starts_w: torch.Tensor, max_iter: int,
           tol: float, bar=None, accelerate: bool = True, checkpoint=None, fallback=None) -> Run:
    """Run each start (S, K, r) to convergence (:func:`run`) and keep the best.

    The workspace then holds the winner's softmax (its state is restored when a later run
    overwrote it). ``checkpoint`` (a :class:`~pyro_softmix.results.Checkpoint`) is given the
    current run's state, the starts still to run and the best finished run as they go.

    A run whose atoms run off to infinity along a ridge (without a prior) is given a second
    chance, with at most K - 1 moves in all: a start made from its state with the component of
    the longest such atom merged into its closest neighbour and the worst of the others split
    (:func:`~pyro_softmix._split.merge_and_split`), and if that ends no higher, one with that
    atom pulled back to the others' length (:func:`~pyro_softmix._split.pull_back`), each run
    to convergence beside it. Where neither lifts it above what it is estimated to reach,
    ``fallback`` (if given: a function returning a start's atoms (K, r), log-weights (K,) and a
    description) gives one more start, once per call, run to convergence beside it with K - 1
    moves of its own: at once where no move got above the run's objective, and otherwise only
    if the run, going on, ends on its ridge above every other run. A run on a ridge stops where
    it cannot reach what a finished run reached, and a new run that finds itself on a ridge
    where it cannot reach the objective it was made from stops there.
    """
    runs, moves_left = [], problem.num_components - 1 if problem.penalty is None else 0
    spare = [fallback] if fallback is not None else []

    def escape(st, ridge, objective, bound, within, floor, moves, on_update, first) -> bool:
        """The moves from ``st`` (objective ``objective``, estimated to reach ``bound``, and
        ``within`` in its budget of updates), a run made by ``moves`` from one that had reached
        ``floor``, tried where this is the ``first`` time it is seen on its ridge; True to stop
        that run. The bounds tighten as the run goes on, so a run on its ridge is asked again
        after every cycle whether it can still reach what the finished runs reached."""
        nonlocal moves_left
        margin = ESCAPE_MARGIN * abs(objective)
        if bound < floor or objective <= floor + margin:
            return True  # a moved run no better than where it was made: abandoned
        if not first:
            return max(run.history[-1] for run in runs) > within + margin if runs else False
        if objective >= -objective_noise(problem, objective, tol):
            return False  # a log-likelihood is at most 0: nothing left to gain
        k = max(ridge, key=lambda c: float(st.atoms[c].norm()))
        reached = -math.inf
        for make in (merge_and_split, pull_back):
            if moves_left <= 0:
                break
            moves_left -= 1
            atoms, log_w, move = make(problem, st, k)
            reached = max(reached, new_start(atoms, log_w, moves + (move,), objective, on_update))
            if reached > bound + margin:
                return True
        if reached > objective + margin:  # a move lifted it, if not surely above its bound:
            return False  # the fallback waits for this run's end (attempt)
        return use_spare(bound + margin, on_update)

    def use_spare(above, on_update) -> bool:
        """Run the fallback's start (if not yet run), with moves of its own; whether it ended
        ``above``."""
        nonlocal moves_left
        if not spare:
            return False
        atoms, log_w, move = spare.pop()()  # not made from this run: no floor
        moves_left = problem.num_components - 1
        return new_start(atoms, log_w, (move,), -math.inf, on_update) > above

    def new_start(atoms, log_w, moves, floor, on_update) -> float:
        """Run a new start (:func:`attempt`); the best objective that it and the runs made from
        it reached."""
        before = len(runs)
        attempt(problem.with_starts(1), atoms, log_w, moves, floor, on_update)
        return max(run.history[-1] for run in runs[before:])

    def attempt(prob, atoms, log_w, moves, floor, on_update) -> Run:
        """Run one start (made by ``moves`` from a run that had reached ``floor``), find its
        atoms at infinity, and where it is seen on a ridge as it runs, or ends on one, try the
        moves."""
        calls = []  # (ridge, whether it stopped the run) of each call

        def on_ridge(st, ridge, objective, bound, within):
            stop = escape(st, ridge, objective, bound, within, floor, moves, on_update, not calls)
            calls.append((ridge, stop))
            return stop

        hook = on_ridge if moves or moves_left > 0 or spare else None
        done = run(prob, atoms, log_w, max_iter, tol, bar, accelerate, on_update, hook)
        done.moves = moves
        runs.append(done)
        if calls and calls[-1][1]:  # stopped on its ridge: another run ended above it
            done.diverging = calls[-1][0]
        elif problem.penalty is None:  # (under a prior no atom can run off to infinity)
            done.diverging = atoms_at_infinity(prob, done.state, done.history, done.norms, tol)
            if max(done.norms[-1]) >= DIVERGENCE_NORM:  # the checks ran E-steps in its buffers
                done.state = prob.start(done.state.atoms, done.state.log_weights)
            end = done.history[-1]
            ahead = end > max((run.history[-1] for run in runs[:-1]), default=-math.inf) + (
                ESCAPE_MARGIN * abs(end))
            if done.diverging and hook is not None and not calls:  # ended there: no more to gain
                on_ridge(done.state, done.diverging, end, end, end)
            elif done.diverging and calls and ahead:  # on its ridge, above the runs of its moves
                use_spare(math.inf, on_update)
        return done

    for i, (a, w) in enumerate(zip(starts_z, starts_w, strict=True)):
        next_run(bar, i, len(starts_z), max_iter, "EM")
        on_update = None
        if checkpoint is not None:
            rest_z, rest_w = starts_z[i + 1:], starts_w[i + 1:]
            if runs:  # the best finished run goes on as one more start
                done = max(runs, key=lambda run: run.history[-1]).state
                rest_z = torch.cat([rest_z, done.atoms[None]])
                rest_w = torch.cat([rest_w, done.log_weights[None]])

            def on_update(st, history, rest_z=rest_z, rest_w=rest_w):
                checkpoint.progress(st.atoms, st.log_weights, history, rest_z, rest_w)
        attempt(problem, a, w, (), -math.inf, on_update)
    best = max((run for run in runs if not run.moves), key=lambda run: run.history[-1])
    moved = max(runs, key=lambda run: run.history[-1])  # the first of equals
    if moved.history[-1] > best.history[-1] + ESCAPE_MARGIN * abs(best.history[-1]):
        best = moved
    if best is not runs[-1] or best.moves:  # its state back in problem's buffers
        best.state = problem.start(best.state.atoms, best.state.log_weights)
    return best
