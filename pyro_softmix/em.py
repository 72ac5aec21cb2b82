# SPDX-License-Identifier: Apache-2.0
"""``fit_em``: maximum-likelihood (or MAP) fit of a softmax mixture by EM on counts.

The steps live in their own modules, in the order the data flow through them: the checks and
the standardised design (:mod:`~pyro_softmix.engine`'s ``prepare``), the starts
(:mod:`~pyro_softmix.warmstart`), the accelerated runs (:mod:`~pyro_softmix.accelerate`), the
stopping rule and divergence check (:mod:`~pyro_softmix.stopping`) and the result
(:mod:`~pyro_softmix.results`).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from ._checks import check_positive_float, check_positive_int, check_seed, keyword_options, warn_user
from ._chunks import thread_budget
from ._moves import finish
from .accelerate import run as run_em
from .design import IdentifiabilityWarning
from .engine import prepare
from .membership import check_group_features, fit_membership
from .results import Checkpoint, SoftmaxMixtureFit, make_fit, save_atomically
from .stopping import (
    GRADIENT_TOL,
    ConvergenceWarning,
    DivergenceWarning,
    default_tol,
    objective_noise,
    progress_bar,
)
from .warmstart import check_init, choose_start, one_component_fit, tempered_grown_start

__all__ = ["fit_em"]

#: EM iterations at most per run after the race (``fit_em``'s ``max_iter``).
DEFAULT_MAX_ITER = 1000


@keyword_options
def fit_em(features, counts=None, tokens=None, *, num_components: int = 3, init: Any = "auto",
           num_inits: int | None = None, max_iter: int = DEFAULT_MAX_ITER,
           tol: float | None = None, device=None, dtype=None, seed=None,
           progress: bool | None = None, chunk_size: int | None = None, groups=None,
           prior_scale: float | None = None, accelerate: bool = True, checkpoint=None,
           checkpoint_every: float = 60.0, num_threads: int | None = None, offset=None,
           group_features=None) -> SoftmaxMixtureFit:
    """Maximum-likelihood (or MAP) fit of a softmax mixture by EM on counts.

    The model: P(Y = j) = sum_k alpha_k softmax(X theta_k + b)_j for support points
    j = 0..p-1, with b a known offset (zero unless ``offset`` is given).

    Args:
        features: (p, L) features X of the support points (tensor or array; not modified).
        counts: (p,) nonnegative counts n_j (may be fractional weights). Or:
        tokens: (N,) integer draws in [0, p). Exactly one of ``counts``/``tokens`` (or neither
            when ``groups`` is a count matrix).
        num_components: K >= 1.
        init: ``"auto"`` (random starts at a scale calibrated on the design and one start
            grown from the one-component fit by splits, raced; see
            :func:`~pyro_softmix.warm_start`; where the moves away from an atom at infinity do
            not lift a run, the start of ``"tempered"`` grown alone is run beside it, and a fit
            that ends unconverged after moves without having tried it is run once more from it,
            the higher of the two kept), ``"tempered"`` (as ``"auto"``, one random start
            replaced by one grown on the counts raised to the power 0.5: for components that put
            most of their mass on a few points, such as a language model's contexts), one of the
            moment methods ``"projection"``, ``"tensor"``, ``"subspace"``, ``"random"``, or a
            start: a mapping with ``"weights"`` (K,) and ``"atoms"`` (K, L), or any object with
            ``.weights`` and ``.atoms`` (a previous fit, a :class:`~pyro_softmix.WarmStart`).
        num_inits: number of starts (default 1; 4 for ``"auto"`` and ``"tempered"``). Several
            starts run as one batch in a race that drops the starts that are clearly beaten or
            have joined the leader; each survivor is then run to convergence and the best is
            kept.
        max_iter: EM iterations (M-steps) at most for each run after the race.
        tol: stop when the estimated distance to the limit, (l* - l_t) / abs(l_t), is at most
            ``tol`` (default 1e-10 in float64, 1e-9 in float32). The distance is extrapolated
            (Aitken) from the last two increases of the EM surrogate, which are computed from
            gradients and so stay accurate in float32; a slow stretch does not stop EM early.
        device: where to compute (default: the features' device).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the features' floating dtype).
            A float64 fit of a large design (``engine.FLOAT32_SEARCH_BYTES``) searches in
            float32, then goes on in float64 from where that search ends (docs: EM,
            precision).
        seed: for the random starts: an int, a ``torch.Generator``, or None (default:
            drawn from torch's global random state). The same seed gives the same fit.
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
        checkpoint: a file (``.npz``) to write the fit in progress to, every
            ``checkpoint_every`` seconds during the final runs and once at the end. Each write
            replaces the file atomically (a killed process leaves the previous checkpoint),
            and ``fit_em(..., init=psm.load_fit(checkpoint))`` goes on from it to the optimum
            the uninterrupted fit would reach (``softmix fit --resume``).
        checkpoint_every: seconds between checkpoints (0: after every update).
        num_threads: CPU threads for the fit (the caller's torch setting is restored after).
            Default: one for small problems (p L K below 300,000 multiply-adds), else the
            caller's setting less the cores other programs keep busy right now. The result
            does not depend on the thread count (sums add in an order fixed by the data).
        offset: (p,) known offset b added to every component's logits: a language model's
            output bias, a known alternative-specific term in discrete choice, or the log of
            the proposal in sampled-softmax data. A constant offset changes nothing; b = X c
            shifts every atom by -c. The fit keeps it (``fit.offset``) for its probabilities.
        group_features: with ``groups``, (G, d) covariates of the groups (rows in the order of
            the sorted group ids, ``fit.group_labels``; include a column of ones for an
            intercept): group g's class shares are softmax(Gamma c_g) instead of one set of
            weights (see :mod:`pyro_softmix.membership`). The fit then has
            ``membership_coef`` Gamma (K, d) (last row 0) and ``group_weights(C)``; its
            ``weights`` are the shares averaged over the groups.

    Returns:
        :class:`SoftmaxMixtureFit` with ``weights`` (K,), ``atoms`` (K, L), ``loglik`` and more
        (with ``groups``: ``num_groups``, ``group_labels`` and ``group_responsibilities``).

    Warns:
        ConvergenceWarning: if ``max_iter`` was reached first.
        IdentifiabilityWarning: if the centred features have rank below L, or if fitted
            components coincide (num_components is then more than the data support).
        DivergenceWarning: if some atoms were still growing along a flat ridge of the objective.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=500, num_features=3, num_components=2,
        ...                     num_obs=20_000, seed=0)
        >>> fit = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
        >>> tuple(fit.weights.shape), tuple(fit.atoms.shape), fit.converged
        ((2,), (2, 3), True)
    """
    start_time = time.perf_counter()
    if tol is not None:
        tol = check_positive_float(tol, "tol", allow_zero=True)
    if num_threads is not None:
        num_threads = check_positive_int(num_threads, "num_threads")
    shape = getattr(features, "shape", None)
    work = math.prod(shape) * num_components if shape is not None and isinstance(
        num_components, int) else math.inf
    with thread_budget(work, num_threads, device):
        return _fit(start_time, features, counts, tokens, groups, num_components, init,
                    num_inits, max_iter, tol, device, dtype, seed, progress, chunk_size,
                    prior_scale, accelerate, checkpoint, checkpoint_every, offset,
                    group_features)


def _fit(start_time, features, counts, tokens, groups, num_components, init, num_inits,
         max_iter, tol, device, dtype, seed, progress, chunk_size, prior_scale, accelerate,
         checkpoint, checkpoint_every, offset, group_features) -> SoftmaxMixtureFit:
    """fit_em's work, on the threads it chose."""
    setup, starts_z, starts_w, label = prepare_fit(
        features, counts, tokens, groups, num_components=num_components, init=init,
        num_inits=num_inits, max_iter=max_iter, dtype=dtype, device=device, seed=seed,
        progress=progress, chunk_size=chunk_size, prior_scale=prior_scale, accelerate=accelerate,
        offset=offset, group_features=group_features, float32_search=True)
    tol = default_tol(setup.dtype) if tol is None else tol
    search = setup.search or setup  # the float32 twin of a large float64 design
    # The search finds the optimum, to float32's tolerance; its last digits come in float64.
    search_tol = tol if search is setup else max(tol, default_tol(search.dtype))
    saver = None
    if checkpoint is not None:
        every = check_positive_float(checkpoint_every, "checkpoint_every", allow_zero=True)
        saver = Checkpoint(checkpoint, every, setup, start_time)
    # The tempered start rescues trapped "auto" fits (no atom runs off to infinity under a prior).
    rescue = (isinstance(init, str) and init == "auto" and setup.num_components > 1
              and setup.problem.penalty is None)
    used = []  # the iterations the fallback's start took, once finish asked for it
    fallback = _tempered_start(search, max_iter, used) if rescue else None
    run = _finish(search, starts_z, starts_w, max_iter, search_tol, progress, accelerate, saver,
                  fallback)
    label += _then(run.moves)
    if rescue and not used and _trapped(run):
        run, label = _refit_tempered(search, run, label, max_iter, search_tol, progress,
                                     accelerate, saver)
    if search is not setup:
        run, label = _widen(setup, search, run, label, max_iter, tol)
    converged, diverging = _verify(setup, run, tol, max_iter)
    if setup.group_features is not None:
        atoms, gamma, log_shares, more, converged = fit_membership(
            setup.problem, run.state.atoms, run.state.log_weights, setup.group_features,
            max_iter, tol)
        log_w = torch.logsumexp(log_shares, 0) - math.log(log_shares.shape[0])
        fit = make_fit(setup, atoms, log_w, run.history + more[1:], converged, label,
                       start_time, more[-1], diverging, membership=(gamma, log_shares))
    else:
        fit = make_fit(setup, run.state.atoms, run.state.log_weights, run.history, converged,
                       label, start_time, float(run.state.loglik[0]), diverging)
    if saver is not None:
        save_atomically(fit, saver.path)
    return fit


def _widen(setup, search, run, label: str, max_iter: int, tol: float):
    """A run made on ``search``, the float32 twin of ``setup``'s float64 design
    (``engine.FLOAT32_SEARCH_BYTES``), carried to that design: where it converged with every
    atom finite, EM and Newton steps from its end to ``tol`` there (its history then goes on
    with theirs); else its end, its last objective evaluated there. Returns the run and its
    label."""
    problem = setup.problem
    atoms = run.state.atoms.double()
    log_w = torch.log_softmax(run.state.log_weights.double(), 0)
    spent = len(run.history) - 1
    if run.converged and not run.diverging and spent < max_iter:
        more = run_em(problem, atoms, log_w, max_iter - spent, tol)
        more.history = run.history[:-1] + more.history
        more.norms = run.norms[:-1] + more.norms
        more.moves = run.moves
        return more, f"{label}; searched in float32, then {len(more.history) - 1 - spent} " \
                     "float64 updates"
    state = problem.start(atoms, log_w)
    history = run.history[:-1] + [float(problem.objective(state)[0])]
    return replace(run, state=state, history=history), f"{label}; searched in float32"


def _finish(setup, starts_z, starts_w, max_iter, tol, progress, accelerate, saver,
            fallback=None):
    bar = progress_bar(progress, max_iter, "EM")
    try:
        return finish(setup.problem, starts_z, starts_w, max_iter, tol, bar, accelerate, saver,
                      fallback)
    finally:
        if bar is not None:
            bar.close()


def _then(moves: tuple[str, ...]) -> str:
    """The part of a fit's label that names the moves that led to its run (none: empty)."""
    return f"; then {'; '.join(moves)}" if moves else ""


def _trapped(run) -> bool:
    """Whether a run shows the trap of peaked components: it used up ``max_iter`` after moves
    away from atoms at infinity, or with atoms at infinity (see ``docs/warmstarts.md``)."""
    return not run.converged and bool(run.moves or run.diverging)


def _tempered_start(setup, max_iter: int, used: list):
    """The start :func:`~pyro_softmix._moves.finish` is given for a run seen on a ridge that no
    move lifts: the one grown on tempered counts
    (:func:`~pyro_softmix.warmstart.tempered_grown_start`), made when asked (``used`` then
    holds the EM iterations it took)."""
    def make():
        atoms, log_w, spent = tempered_grown_start(setup.problem, one_component_fit(setup)[0],
                                                   max_iter)
        used.append(spent)
        return atoms, log_w, f"a run from the start grown on tempered counts ({spent} iterations)"
    return make


def _refit_tempered(setup, run, label, max_iter, tol, progress, accelerate, saver):
    """One more run, from the start grown on tempered counts
    (:func:`~pyro_softmix.warmstart.tempered_grown_start`), for a run that :func:`_trapped`
    finds trapped; returns the run kept (the new one where it ends higher) and its label."""
    atoms, log_w, made = _tempered_start(setup, max_iter, [])()
    other = _finish(setup, atoms[None], log_w[None], max_iter, tol, progress, accelerate, saver)
    if other.history[-1] > run.history[-1]:
        return other, f"{label}; not converged, so {made}{_then(other.moves)}"
    run.state = setup.problem.start(run.state.atoms, run.state.log_weights)  # its buffers back
    return run, f"{label}; a run from the start grown on tempered counts ended lower"


def _verify(setup, run, tol: float, max_iter: int) -> tuple[bool, tuple[int, ...]]:
    """Whether the run may report convergence, and the components at infinity (warning about
    each problem found).

    Convergence needs, besides the stopping rule, an objective at least the trivial fit's (the
    one-component fit, :func:`~pyro_softmix.warmstart.one_component_fit`) and a gradient that
    vanishes (:data:`~pyro_softmix.stopping.GRADIENT_TOL`). The atoms at infinity are those
    :func:`~pyro_softmix._moves.finish` found (:func:`~pyro_softmix.stopping.atoms_at_infinity`).
    """
    problem, history, state = setup.problem, run.history, run.state
    converged = run.converged
    if not converged:
        warn_user(
            f"EM did not converge in max_iter={max_iter} iterations (estimated relative gap "
            f"{run.gap / max(abs(history[-1]), 1e-300):.2e} > tol={tol:.1e}); "
            "increase max_iter or continue with init=fit", ConvergenceWarning)
    objective = history[-1]
    noise = objective_noise(problem, objective, tol)
    if converged:
        _, reference = one_component_fit(setup)
        gradient = problem.relative_gradient(state.atoms, state.log_weights)
        why, advice = [], []
        if objective < reference - noise:
            why.append(f"its objective {objective:.10g} is below a one-component fit's "
                       f"({reference:.10g})")
            advice.append("the start was poor: refit with init='auto' (or more num_inits)")
        if gradient > GRADIENT_TOL:
            why.append(f"the objective's gradient is not zero there (relative norm "
                       f"{gradient:.2e} > {GRADIENT_TOL:g})")
            advice.append("EM stopped early: continue with init=fit and a smaller tol")
        if why:
            converged = False
            warn_user(f"EM's stopping rule was met, but not at a maximum: {'; '.join(why)}; "
                      f"{'; '.join(advice)}", ConvergenceWarning)
    diverging = run.diverging  # (none under a prior: the objective is then coercive)
    if diverging:
        lengths = state.atoms.norm(dim=1).tolist()
        shown = ", ".join(f"{lengths[k]:.3g}" for k in diverging)
        warn_user(
            f"the atoms of components {list(diverging)} go to infinity (norms {shown} in "
            "standardised units): each such component puts its mass on a face of the design's "
            "convex hull (a few extreme support points), where the likelihood keeps rising "
            "toward a supremum. This is a spurious optimum (try other starts: "
            "init='tempered' for peaked components, num_inits=, or init= with atoms near the "
            "expected ones, such as known contexts' hidden states) or "
            "the MLE is at infinity; refit with prior_scale= for a MAP estimate", DivergenceWarning)
    _warn_coinciding(state.atoms[[k for k in range(state.atoms.shape[0]) if k not in diverging]])
    return converged, diverging


#: Atoms closer than this (relative to their length, at least 1, in standardised units) are
#: the same component: sampling error alone puts distinct fitted components much further apart.
COINCIDE_TOL = 1e-3


def _warn_coinciding(atoms: torch.Tensor) -> None:
    """Warn when some fitted components coincide: the fit is then a mixture of fewer distinct
    components, and num_components is more than the data support."""
    k = atoms.shape[0]
    if k < 2:
        return
    scale = atoms.norm(dim=1).clamp(min=1.0)
    close = (torch.cdist(atoms, atoms) <= COINCIDE_TOL * torch.maximum(scale[:, None], scale)
             ).cpu().tolist()
    groups, seen = [], set()
    for i in range(k):  # each component not yet grouped, with every one close to it
        if i not in seen:
            groups.append([j for j in range(k) if close[i][j]])
            seen.update(groups[-1])
    if len(groups) < k:
        shown = "; ".join(str(g) for g in groups if len(g) > 1)
        warn_user(f"fitted components coincide ({shown}): the fit is a mixture of {len(groups)} "
                  f"distinct component(s), so num_components={k} is more than these data "
                  "support; refit with fewer components (compare fit.bic)", IdentifiabilityWarning)


def prepare_fit(features, counts, tokens, groups, *, num_components, init, num_inits, max_iter,
                dtype, device, seed, progress, chunk_size, prior_scale=None, accelerate=True,
                offset=None, group_features=None, float32_search=False):
    """What every EM fit does before its final runs (:func:`fit_em`, :class:`~pyro_softmix.EM`):
    check the options and the data, standardise, build the engine, and choose the starts
    (with ``float32_search``, on :meth:`~pyro_softmix.engine.Setup.float32_twin` where there is
    one, kept as ``setup.search``: the starts are then in float32).

    Returns ``(setup, starts_z, starts_w, label)``: the :class:`~pyro_softmix.engine.Setup`,
    the starts' atoms (S, K, r) and log-weights (S, K), best first, and the start's label.
    """
    max_iter = check_positive_int(max_iter, "max_iter")
    num_inits = check_init(init, num_inits)
    check_seed(seed)
    if not isinstance(accelerate, bool):
        raise TypeError(f"accelerate must be True or False, got {accelerate!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    setup = prepare(features, counts, tokens, groups, num_components, dtype, device, chunk_size,
                    prior_scale, offset)
    num_groups = None if setup.group_labels is None else int(setup.group_labels.shape[0])
    setup.group_features = check_group_features(group_features, num_groups)
    if float32_search and accelerate:
        setup.search = setup.float32_twin()
    starts_z, starts_w, label = choose_start(setup.search or setup, init, num_inits, max_iter,
                                             seed, progress, accelerate)
    return setup, starts_z, starts_w, label
