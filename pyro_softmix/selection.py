# SPDX-License-Identifier: Apache-2.0
"""Choosing the number of components: a path over K grown from the smaller fits.

:func:`select_num_components` fits K = K_1 < K_2 < ... in order. The first K is fitted by the
default race of starts; each next K starts from the previous fit with one component split in two
(:func:`split_starts`). The split goes where the previous fit explains its data worst: for
component k with EM weights w_jk = n_j r_jk (W_k = sum_j w_jk), the score is
W_k KL(w_k / W_k || q_k), the nats its share of the data loses to its own softmax. The
component is split along the leading eigenvector u of the residual covariance
sum_j (w_jk / W_k - q_k(j)) (z_j - m_k)(z_j - m_k)^T (z the standardised design, m_k its mean
under q_k): the direction in which the data assigned to k spread more than q_k does. Two
components at t_k +- delta u spread their mean by about (sigma^2 delta)^2 along u (sigma^2 the
variance of u.z under q_k), so delta = sqrt(lambda) / sigma^2 with lambda the eigenvalue.

Criteria (n the independent units: N draws, or G groups when grouped; d the free parameters):
BIC = -2 l + d log n, AIC = -2 l + 2 d, CAIC = -2 l + d (log n + 1), sample-size-adjusted BIC
(Sclove 1987) = -2 l + d log((n + 2) / 24), ICL (Biernacki, Celeux and Govaert 2000) = BIC +
2 E with E = -sum_units sum_k r log r the classification entropy. Held-out log-likelihood by
F-fold cross-validation: binomial thinning of the counts (each draw to a fold at random, which
keeps the data O(p)), or folds of groups.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ._checks import (
    check_counts,
    check_features,
    check_groups,
    check_positive_int,
    make_generator,
)
from ._logprob import group_log_joint, mixture_log_probs
from ._split import split_component, split_scores
from .design import standardize
from .em import fit_em
from .results import SoftmaxMixtureFit

__all__ = ["ComponentSelection", "select_num_components", "split_starts"]

CRITERIA = ("bic", "aic", "caic", "sabic", "icl", "cv")
#: Two runs reached the same optimum when their log-likelihoods differ by at most this much
#: (relative) plus one nat per 10^6 units.
SAME_OPTIMUM = 1e-7


@dataclass(repr=False)
class ComponentSelection:
    """Fits over a range of K and the criteria that compare them.

    Attributes:
        fits: one :class:`~pyro_softmix.SoftmaxMixtureFit` per K, in the order of
            ``num_components``.
        rows: one dict per K (the columns of :meth:`table`).
        criterion: the criterion that chose :attr:`best`.
    """

    fits: list[SoftmaxMixtureFit]
    rows: list[dict]
    criterion: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def num_components(self) -> list[int]:
        return [f.num_components for f in self.fits]

    @property
    def best_index(self) -> int:
        values = [row[self.criterion] for row in self.rows]
        if self.criterion == "cv":
            return max(range(len(values)), key=values.__getitem__)
        return min(range(len(values)), key=values.__getitem__)

    @property
    def best(self) -> SoftmaxMixtureFit:
        """The fit the criterion chooses (smallest information criterion, or largest held-out
        log-likelihood for ``"cv"``)."""
        return self.fits[self.best_index]

    def table(self) -> str:
        """The criteria per K as a text table (the chosen K marked with ``*``)."""
        cols = [("K", 3, "d"), ("loglik", 15, ".6f"), ("params", 6, "d"), ("bic", 14, ".3f"),
                ("aic", 14, ".3f"), ("caic", 14, ".3f"), ("sabic", 14, ".3f"),
                ("icl", 14, ".3f"), ("entropy", 10, ".2f"), ("min_weight", 10, ".4f"),
                ("at_best", 7, "s"), ("converged", 9, "s"), ("notes", 18, "s")]
        if "cv" in self.rows[0]:
            cols.append(("cv", 15, ".4f"))
        lines = [" ".join(f"{name:>{width}}" for name, width, _ in cols)]
        for i, row in enumerate(self.rows):
            shown = dict(row, at_best="{}/{}".format(*row["at_best"]),
                         converged="yes" if row["converged"] else "NO")
            lines.append(" ".join(f"{shown[name]:>{width}{fmt}}" for name, width, fmt in cols)
                         + (" *" if i == self.best_index else ""))
        best = "largest" if self.criterion == "cv" else "smallest"
        lines.append(f"chosen by {self.criterion} ({best}): K = {self.best.num_components}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: the criterion, the chosen K, the rows and the seconds."""
        return {"criterion": self.criterion, "best": self.best.num_components,
                "rows": [dict(r, at_best=list(r["at_best"])) for r in self.rows],
                "seconds": self.seconds}

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    def plot(self, path: str | os.PathLike) -> str:
        """Save a plot of the criteria (and the held-out log-likelihood) against K; returns
        the path."""
        from .plots import figure_with_axes

        has_cv = "cv" in self.rows[0]
        fig, axes = figure_with_axes(1, 2 if has_cv else 1, figsize=(10 if has_cv else 6, 4),
                                     layout="constrained", squeeze=False)
        ks = self.num_components
        ax = axes[0, 0]
        for name in ("bic", "aic", "caic", "sabic", "icl"):
            ax.plot(ks, [r[name] for r in self.rows], marker="o", label=name.upper())
        ax.axvline(self.best.num_components, color="0.6", linestyle=":")
        ax.set_xlabel("K (number of components)")
        ax.set_ylabel("criterion (smaller is better)")
        ax.legend()
        if has_cv:
            ax = axes[0, 1]
            ax.plot(ks, [r["cv"] for r in self.rows], marker="o", color="C5")
            ax.set_xlabel("K (number of components)")
            ax.set_ylabel("held-out log-likelihood")
        fig.savefig(path, dpi=110)
        return os.fspath(path)

    def __repr__(self) -> str:
        return (f"ComponentSelection(K={self.num_components}, criterion={self.criterion!r}, "
                f"best={self.best.num_components})")


def select_num_components(features, counts=None, tokens=None, *, groups=None,
                          num_components: Iterable[int] = range(1, 9), criterion: str = "bic",
                          cv: int | None = None, seed=None, num_splits: int = 2,
                          race: str = "first", offset=None, group_features=None,
                          progress: bool | None = False, **fit_options) -> ComponentSelection:
    """Fit K = 1..K_max (or the K given) along a path grown from the smaller fits, and choose K.

    The first K runs :func:`~pyro_softmix.fit_em`'s default race of starts. Each next K starts
    from the previous fit with a component split in two (the ``num_splits`` components that
    explain their data worst, each split along its leading residual direction; see the module
    docstring), and keeps the best of those runs. With ``race="all"`` each K also runs the
    default race as one more start (more robust, about twice the cost).

    Args:
        features: (p, L) features X.
        counts, tokens, groups: the data, as in :func:`~pyro_softmix.fit_em`.
        num_components: the K to fit (increasing integers in [1, p]; default 1..8).
        criterion: ``"bic"`` (default), ``"aic"``, ``"caic"``, ``"sabic"``, ``"icl"`` (all
            smaller is better) or ``"cv"`` (largest held-out log-likelihood; needs ``cv``).
        cv: number of folds F >= 2 for a held-out log-likelihood per K (binomial thinning of
            integer counts, or folds of groups); None (default) skips it.
        seed: for the starts and the folds.
        num_splits: split starts tried per K (each from a different component).
        race: ``"first"`` (the default race at the first K only) or ``"all"``.
        offset: a known (p,) offset of the logits, as in :func:`~pyro_softmix.fit_em`.
        group_features: (G, d) covariates of the groups for class shares softmax(Gamma c_g),
            as in :func:`~pyro_softmix.fit_em` (the folds of ``cv`` take their rows).
        progress: print one line per K.
        fit_options: passed to every :func:`~pyro_softmix.fit_em` call (``dtype``, ``tol``,
            ``prior_scale``, ``max_iter``, ...).

    Returns:
        :class:`ComponentSelection`: ``.fits``, ``.best``, ``.table()``, ``.plot(path)``.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=300, num_features=3, num_components=2,
        ...                     num_obs=20_000, atom_norm=3.0, seed=0)
        >>> sel = psm.select_num_components(data.features, data.counts,
        ...                                 num_components=range(1, 4), seed=0)
        >>> sel.best.num_components
        2
    """
    start = time.perf_counter()
    x = check_features(features)
    ks = _check_ks(num_components, x.shape[0])
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "cv" and cv is None:
        raise ValueError("criterion='cv' needs cv= (the number of folds)")
    if race not in ("first", "all"):
        raise ValueError(f"race must be 'first' or 'all', got {race!r}")
    num_splits = check_positive_int(num_splits, "num_splits")
    for name in ("num_components", "init", "counts", "tokens", "groups", "offset"):
        if name in fit_options:
            raise TypeError(f"select_num_components() got {name}= among the fit options")
    gen = make_generator(seed)
    data = dict(counts=counts, tokens=tokens, groups=groups, offset=offset,
                group_features=group_features)
    folds = None if cv is None else _folds(x.shape[0], cv, counts, tokens, groups, gen)
    fits, rows, prev, shown = [], [], None, set()
    for k in ks:
        runs = []
        # Fits past the true K warn (coinciding components, atoms at infinity): the path
        # expects that, so the warnings become the table's "notes" column instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if prev is None or prev.num_components != k - 1 or race == "all":
                runs.append(fit_em(x, **data, num_components=k, seed=_seed(gen), **fit_options))
            if prev is not None and prev.num_components == k - 1:
                for init in split_starts(prev, counts=counts, tokens=tokens, groups=groups,
                                         num_splits=num_splits):
                    runs.append(fit_em(x, **data, num_components=k, init=init, **fit_options))
        fit = max(runs, key=lambda f: f.loglik)
        units = fit.num_obs if fit.num_groups is None else fit.num_groups
        slack = SAME_OPTIMUM * abs(fit.loglik) + 1e-6 * units
        row = _criteria(fit, counts, tokens, groups)
        row["at_best"] = (sum(f.loglik >= fit.loglik - slack for f in runs), len(runs))
        row["notes"] = _notes(fit, caught, shown)
        if folds is not None:
            row["cv"] = _held_out(x, fit, folds, offset, group_features, fit_options)
        fits.append(fit)
        rows.append(row)
        prev = fit
        if progress:
            print(f"K={k}: loglik {fit.loglik:.8g}, BIC {row['bic']:.8g}"
                  + (f", held-out {row['cv']:.8g}" if "cv" in row else ""), flush=True)
    return ComponentSelection(fits, rows, criterion, time.perf_counter() - start)


def _notes(fit: SoftmaxMixtureFit, caught, shown: set) -> str:
    """The notes of one K: the kept fit's atoms at infinity and convergence, and coinciding
    components in the fits at this K. Those warnings are expected past the true K; any other
    warning (about the data, say) is shown once."""
    from .design import IdentifiabilityWarning
    from .stopping import ConvergenceWarning, DivergenceWarning

    notes = []
    if fit.diverging:
        notes.append("diverging")
    if any(issubclass(w.category, IdentifiabilityWarning) and "coincide" in str(w.message)
           for w in caught):
        notes.append("coincide")
    if not fit.converged:
        notes.append("not-converged")
    for w in caught:
        expected = (issubclass(w.category, ConvergenceWarning | DivergenceWarning)
                    or "coincide" in str(w.message))
        if not expected and str(w.message) not in shown:
            shown.add(str(w.message))
            warnings.warn(w.message, w.category, stacklevel=3)
    return ",".join(notes)


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(2**62, (), generator=gen))


def _check_ks(num_components, num_points: int) -> list[int]:
    if isinstance(num_components, int | str) or not isinstance(num_components, Iterable):
        raise TypeError(f"num_components must be a range or list of integers, got "
                        f"{num_components!r}")
    ks = list(num_components)
    if not ks:
        raise ValueError("num_components is empty: give the K to fit, e.g. range(1, 9)")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise TypeError(f"num_components must hold integers, got {ks!r}")
    if any(b <= a for a, b in zip(ks, ks[1:], strict=False)) or ks[0] < 1:
        raise ValueError(f"num_components must be increasing integers >= 1, got {ks!r}")
    if ks[-1] > num_points:
        raise ValueError(f"num_components goes up to {ks[-1]}, more than the {num_points} "
                         "support points")
    return ks


# ----------------------------------------------------------------------------------------------
# Data forms: pooled counts, grouped triplets, EM weights
# ----------------------------------------------------------------------------------------------
def _pooled(num_points: int, counts, tokens, groups):
    """(counts (p,) float64, triplets or None) of the data as fit_em reads them."""
    if groups is None:
        return check_counts(counts, tokens, num_points).double().cpu(), None
    gi, pi, values, labels = check_groups(groups, counts, tokens, num_points)
    n = torch.zeros(num_points, dtype=torch.float64).index_add_(0, pi, values)
    return n, (gi, pi, values, int(labels.shape[0]))


def _em_weights(fit: SoftmaxMixtureFit, counts, tokens, groups) -> torch.Tensor:
    """(p, K) float64 w_jk = n_j r_jk (grouped: sum_g n_gj r_gk) at the fit."""
    p = fit.num_points
    n, grouped = _pooled(p, counts, tokens, groups)
    if grouped is None:
        return n[:, None] * fit.responsibilities().detach().cpu().double()
    gi, pi, values, _ = grouped
    resp = fit.group_responsibilities.detach().cpu().double()
    return torch.zeros(p, fit.num_components, dtype=torch.float64).index_add_(
        0, pi, resp[gi] * values[:, None])


def split_starts(fit: SoftmaxMixtureFit, *, counts=None, tokens=None, groups=None,
                 num_splits: int = 2) -> list[dict[str, torch.Tensor]]:
    """Starts with K + 1 components from a K-component fit: the ``num_splits`` components with
    the largest score W_k KL(w_k / W_k || q_k), each split in two along its leading residual
    direction (see the module docstring), best first.

    Returns:
        A list of ``{"weights": (K + 1,), "atoms": (K + 1, L)}`` in the fit's dtype, usable as
        ``fit_em(init=...)``.
    """
    if fit.features is None:
        raise ValueError("the fit holds no features (loaded without them): refit, or load a "
                         "file saved with include_features=True")
    x = fit.features.detach().cpu().double()
    w = _em_weights(fit, counts, tokens, groups)  # (p, K)
    log_q = fit.component_log_probs().detach().cpu().double().T  # (p, K)
    design = standardize(x)
    z = design.transform(x, dtype=torch.float64)
    atoms_z = design.atoms_to_z(fit.atoms.detach().cpu().double())
    weights = fit.weights.detach().cpu().double()
    starts = []
    for k in split_scores(w, log_q).argsort(descending=True)[:num_splits].tolist():
        new_z, new_w = split_component(z, w, log_q, atoms_z, weights, k)
        atoms = design.atoms_from_z(new_z)
        starts.append({"weights": new_w.to(fit.weights), "atoms": atoms.to(fit.atoms)})
    return starts


# ----------------------------------------------------------------------------------------------
# Criteria and cross-validation
# ----------------------------------------------------------------------------------------------
def _criteria(fit: SoftmaxMixtureFit, counts, tokens, groups) -> dict:
    n_units = fit.num_obs if fit.num_groups is None else fit.num_groups
    d, ll = fit.num_params, fit.loglik
    if fit.num_groups is None:
        r = fit.responsibilities().detach().cpu().double()
        n, _ = _pooled(fit.num_points, counts, tokens, groups)
        entropy = max(float(-(n[:, None] * torch.xlogy(r, r)).sum()), 0.0) + 0.0
    else:
        r = fit.group_responsibilities.detach().cpu().double()
        entropy = max(float(-torch.xlogy(r, r).sum()), 0.0) + 0.0
    return {"K": fit.num_components, "loglik": ll, "params": d, "bic": fit.bic, "aic": fit.aic,
            "caic": -2 * ll + d * (math.log(n_units) + 1),
            "sabic": -2 * ll + d * math.log((n_units + 2) / 24),
            "icl": fit.bic + 2 * entropy, "entropy": entropy,
            "min_weight": float(fit.weights.min()), "converged": bool(fit.converged),
            "seconds": fit.seconds}


def _folds(num_points: int, num_folds, counts, tokens, groups, gen: torch.Generator):
    """The F training/held-out splits, as lists of (train data kwargs, held-out data)."""
    num_folds = check_positive_int(num_folds, "cv", minimum=2)
    n, grouped = _pooled(num_points, counts, tokens, groups)
    if grouped is None:
        if not bool((n == n.round()).all()):
            raise ValueError("cv= thins the counts draw by draw: counts must be integers")
        total = int(n.sum())
        if total < num_folds:
            raise ValueError(f"cv={num_folds} folds but only {total} draws")
        left, parts = n.clone(), []
        for f in range(num_folds - 1):  # multinomial thinning by successive binomials
            part = torch.binomial(left, torch.full_like(left, 1.0 / (num_folds - f)),
                                  generator=gen)
            parts.append(part)
            left = left - part
        parts.append(left)
        return [({"counts": n - part}, part) for part in parts]
    gi, pi, values, num_groups = grouped
    if num_groups < num_folds:
        raise ValueError(f"cv={num_folds} folds but only {num_groups} groups")
    if not bool((values == values.round()).all()):
        raise ValueError("cv= with groups needs integer counts")
    fold_of = torch.empty(num_groups, dtype=torch.int64)
    fold_of[torch.randperm(num_groups, generator=gen)] = torch.arange(num_groups) % num_folds
    out, reps = [], values.long()
    for f in range(num_folds):
        held = fold_of[gi] == f
        train = ~held
        draws = {"tokens": pi[train].repeat_interleave(reps[train]),
                 "groups": gi[train].repeat_interleave(reps[train])}
        out.append((draws, (gi[held], pi[held], values[held])))
    return out


def _held_out(x: torch.Tensor, fit: SoftmaxMixtureFit, folds, offset, group_features,
              fit_options) -> float:
    """The held-out log-likelihood summed over the folds: each fold scored under the fit to the
    other folds (started from ``fit``, the fit to all the data)."""
    total = 0.0
    for train, held in folds:
        with warnings.catch_warnings():  # a fold's fit is reported through its score
            warnings.simplefilter("ignore")
            covariates = None
            if group_features is not None:  # the rows of the training groups, in id order
                covariates = torch.as_tensor(group_features)[torch.unique(train["groups"])]
            sub = fit_em(x, **train, num_components=fit.num_components, init=fit, offset=offset,
                         group_features=covariates, **fit_options)
        log_q = sub.component_log_probs().detach().cpu().double()  # (K, p)
        log_w = sub.weights.detach().cpu().double().log()
        if isinstance(held, tuple):  # groups: log sum_k w_gk prod_j q_k(j)^n_gj per group
            gi, pi, values = held
            ids, group_ids = torch.unique(gi, return_inverse=True)
            joint = group_log_joint(log_q.T, group_ids, pi, values[:, None], int(ids.shape[0]))
            if group_features is not None:
                shares = sub.group_weights(torch.as_tensor(group_features)[ids])
                log_w = shares.detach().cpu().double().log()
            total += float(torch.logsumexp(joint + log_w, 1).sum())
        else:
            total += float(held @ mixture_log_probs(log_q, log_w.exp()))
    return total
