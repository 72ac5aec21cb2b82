# SPDX-License-Identifier: Apache-2.0
"""The race of starts: S starts of EM in one batch, the clearly beaten ones dropped early.

Used by ``init="auto"`` (:func:`~pyro_softmix.warmstart.auto_start`) and by several starts of any
method (``num_inits``).
"""

from __future__ import annotations

import torch

from .accelerate import NEWTON_SWITCH, squarem_cycle
from .engine import EMProblem
from .stopping import StoppingRule, check_finite

__all__ = ["RACE_HALVE_AT", "RACE_HANDOVER", "RACE_SAME", "joined_leader", "race", "race_label"]

#: The race behind ``init="auto"``: the starts run as one batch of SQUAREM cycles (plain EM
#: without acceleration) until every start left is within ``RACE_HANDOVER`` (relative, Aitken) of
#: its own limit; the survivors then each finish on their own (:func:`~pyro_softmix.accelerate.run`, with its
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
#: Where the M-steps are Hessian-free (large r), several survivors race on until each is within
#: RACE_SPLIT times RACE_HANDOVER of its limit: their cheaper, better M-steps met the handover
#: gap while the starts were still apart (SmolLM2, K = 2: all 4 starts after 8 iterations each,
#: and each then ran its own finish).
RACE_SPLIT = 0.1
#: After this many iterations the race keeps the better half of the starts still in it (the
#: higher objectives, at least one), once (successive halving). Where the race runs that long the
#: starts are well separated and most head for one optimum; the weakly separated mixtures whose
#: starts end in distinct optima a few nats apart are within the handover gap after 2 iterations
#: and are all handed over before it (``docs/warmstarts.md``).
RACE_HALVE_AT = 8


def joined_leader(atoms: torch.Tensor, log_weights: torch.Tensor, lead: int) -> list[bool]:
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


def race(problem: EMProblem, atoms: torch.Tensor, log_weights: torch.Tensor,
          max_iter: int, bar=None, accelerate: bool = True):
    """Race S starts (atoms (S, K, r), log_weights (S, K)) in one batch for at most about
    ``max_iter`` iterations; see ``RACE_*``. The starts that are clearly beaten or have joined
    the leader are dropped at every check, and the worse half once, at ``RACE_HALVE_AT``. With
    ``accelerate`` each check follows a SQUAREM cycle
    (:func:`~pyro_softmix.accelerate.squarem_cycle`).

    Returns the survivors' atoms (S', K, r) and log-weights (S', K), best objective first, and
    the EM iterations spent (summed over starts).
    """
    s, k, r = atoms.shape
    spent, it = 0, 0
    step_max = [1.0] * s if accelerate else None
    rules = [StoppingRule(RACE_HANDOVER) for _ in range(s)]
    factor, halved = None, False
    while s > 1 and it < max_iter:
        batch = problem.with_starts(s)
        batch.factor = factor  # the survivors' preconditioner (Hessian-free M-steps)
        st = batch.start(atoms.reshape(s * k, r), log_weights.reshape(s * k))
        keep = None
        while keep is None and it < max_iter:
            st, objs, gains, _ = squarem_cycle(batch, st, RACE_CHECK_EVERY, step_max)
            it += RACE_CHECK_EVERY
            spent += s * RACE_CHECK_EVERY
            if bar is not None:
                bar.update(s * RACE_CHECK_EVERY)
            obj = objs[-1]
            check_finite(obj, "the objective of a raced start")
            for rule, pair in zip(rules, zip(*gains[-2:], strict=True), strict=True):
                rule.record(list(pair), cycle=accelerate)
            order = sorted(range(s), key=obj.__getitem__, reverse=True)
            lead = order[0]
            bound = [rule.bound(RACE_MAX_RATE) for rule in rules]
            joined = joined_leader(st.atoms.view(s, k, r), st.log_weights.view(s, k), lead)
            alive = [i for i in order
                     if i == lead or (obj[i] + bound[i] >= obj[lead] and not joined[i])]
            if not halved and it >= RACE_HALVE_AT:
                halved, alive = True, alive[:(len(alive) + 1) // 2]
            if len(alive) < s:
                keep = alive
            tight = RACE_SPLIT if len(alive) > 1 and problem.hessian_free else 1.0
            if all(rules[i].converged(obj[i], tight) for i in alive):
                keep, it = alive, max_iter  # hand the survivors over
        if keep is None:  # out of iterations: the leader alone goes on
            keep = [lead]
        rules = [rules[i] for i in keep]
        if step_max is not None:
            step_max = [step_max[i] for i in keep]
        index = torch.tensor(keep, device=atoms.device)
        if batch.factor is not None:
            factor = batch.factor[(index[:, None] * k + torch.arange(k, device=index.device)
                                   ).reshape(-1)]
        atoms = st.atoms.view(s, k, r)[index]
        log_weights = st.log_weights.view(s, k)[index]
        s = atoms.shape[0]
    return atoms, log_weights, spent


def race_label(init: str, n: int, spent: int, survivors: torch.Tensor) -> str:
    left = survivors.shape[0]
    return (f"{init} (race of {n} starts, {spent} start-iterations"
            + (f", {left} finished" if left > 1 else "") + ")")
