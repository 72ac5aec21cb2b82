# SPDX-License-Identifier: Apache-2.0
"""Posterior diagnostics: relabelling, ArviZ conversion, intervals, plots, EM-vs-SVI-vs-NUTS.

The mixture's likelihood is invariant to permuting the components, so draws from different
chains (or from one chain that switched labels) must be aligned before any per-component
summary: :func:`relabel_samples` matches each draw's atoms to a reference (usually the EM fit).

ArviZ is imported lazily; :func:`to_arviz` works with ArviZ 0.x (``InferenceData``) and 1.x
(``DataTree``). Summaries and plots here use only NumPy, Pyro and matplotlib, so they do not
depend on the ArviZ version.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from ._checks import check_counts, check_groups, check_offset, seed_global
from ._logprob import component_log_probs, group_log_joint, log_weights, mixture_log_probs
from ._matching import match_components
from .models import expand_counts
from .plots import figure_with_axes

__all__ = ["FitComparison", "compare_fits", "fisher_intervals", "plot_diagnostics",
           "posterior_summary", "relabel_samples"]


# ----------------------------------------------------------------------------------------------
# Relabelling
# ----------------------------------------------------------------------------------------------
def _reference_atoms(reference) -> torch.Tensor:
    if isinstance(reference, torch.Tensor | np.ndarray):
        return torch.as_tensor(reference, dtype=torch.float64)
    if isinstance(reference, Mapping):
        return torch.as_tensor(reference["atoms"], dtype=torch.float64)
    if hasattr(reference, "atoms"):
        return reference.atoms.detach().cpu().to(torch.float64)
    raise TypeError(f"reference must be a fit, a mapping with 'atoms' or a (K, L) tensor, got "
                    f"{type(reference).__name__}")


def relabel_samples(samples: Mapping[str, Any], reference, *, return_permutations: bool = False):
    """Undo label switching: permute each draw's components to match ``reference``.

    For every draw, the permutation minimising ``sum_k ||atoms[perm[k]] - ref_k||^2`` is found
    (Hungarian algorithm) and applied to ``"atoms"`` (..., K, L), ``"weights"`` (..., K) and,
    when present, to the labels in ``"assignment"`` (..., N). Other sites are copied unchanged;
    the input is not modified.

    Args:
        samples: dict of draws with any leading shape (draws,) or (chains, draws).
        reference: a fit, a mapping with ``"atoms"``, or a (K, L) tensor of atoms.
        return_permutations: also return the (..., K) permutations applied
            (``new[..., k, :] = old[..., perm[k], :]``).

    Example:
        >>> import torch
        >>> ref = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
        >>> draws = {"atoms": ref[[1, 0]].expand(4, 2, 2), "weights": torch.tensor([0.7, 0.3]).expand(4, 2)}
        >>> relabel_samples(draws, ref)["weights"][0]
        tensor([0.3000, 0.7000])
    """
    if "atoms" not in samples:
        raise ValueError("samples must contain 'atoms' (..., K, L)")
    atoms = torch.as_tensor(samples["atoms"])
    ref = _reference_atoms(reference)
    if atoms.dim() < 2 or atoms.shape[-2:] != ref.shape:
        raise ValueError(f"samples['atoms'] must have shape (..., {ref.shape[0]}, {ref.shape[1]})"
                         f" to match the reference, got {tuple(atoms.shape)}")
    lead = atoms.shape[:-2]
    k = ref.shape[0]
    perm = match_components(atoms, ref)
    out = dict(samples)
    dev = atoms.device
    p_dev = perm.to(dev)
    out["atoms"] = torch.gather(atoms, -2, p_dev[..., None].expand(atoms.shape))
    if "weights" in samples:
        w = torch.as_tensor(samples["weights"])
        out["weights"] = torch.gather(w, -1, p_dev.to(w.device).expand(w.shape))
    if "assignment" in samples:
        z = torch.as_tensor(samples["assignment"])
        inverse = torch.argsort(p_dev, dim=-1)  # old label c -> new label inverse[c]
        zl = z.long()
        inv = inverse.to(z.device)
        inv = inv.reshape(inv.shape[:-1] + (1,) * (zl.dim() - len(lead)) + (k,))
        out["assignment"] = torch.gather(inv.expand(zl.shape + (k,)), -1, zl[..., None])[..., 0]
    return (out, perm) if return_permutations else out


# ----------------------------------------------------------------------------------------------
# Pointwise log-likelihood and ArviZ
# ----------------------------------------------------------------------------------------------
def pointwise_log_likelihood(features, atoms, weights, *, tokens=None, counts=None, groups=None,
                             units: str = "draws", max_size: int = 50_000_000,
                             offset=None) -> torch.Tensor:
    """Marginal log-likelihood of each observation unit for S draws of the parameters.

    Units:

    - ``"draws"`` (default): one column per draw of Y (``tokens``, or ``counts`` expanded to
      draws), (S, N); for grouped data one column per group, (S, G):
      log sum_k w_k prod_j q_k(j)^{n_gj}. Summed over units it is the log-likelihood EM
      maximises; this is what ``arviz.loo`` needs.
    - ``"points"``: one column per support point with a draw, (S, P): log pi_j, the
      log-likelihood of *one* draw at point j. Every draw at j has this same column, so
      N columns collapse to P; :func:`pointwise_counts` gives each column's number of draws
      (the weights that :func:`~pyro_softmix.loo` uses). Not for grouped data.

    ``offset`` (p,) is the known offset of the logits, as in :func:`~pyro_softmix.fit_em`.

    Raises:
        ValueError: if S x units exceeds ``max_size`` (thin the draws, use ``units="points"``,
        or raise the limit).
    """
    if units not in ("draws", "points"):
        raise ValueError(f"units must be 'draws' or 'points', got {units!r}")
    x = torch.as_tensor(features, dtype=torch.float64)
    b = check_offset(offset, x.shape[0], like=x)
    atoms = torch.as_tensor(atoms).to(torch.float64).reshape(-1, *atoms.shape[-2:])
    weights = torch.as_tensor(weights).to(torch.float64).reshape(-1, weights.shape[-1])
    if units == "points":
        if groups is not None:
            raise ValueError("units='points' is for ungrouped data: a group's draws are not "
                             "independent given the parameters")
        support = pointwise_counts(x.shape[0], counts=counts, tokens=tokens)[0]

        def unit_loglik(a, w):
            return mixture_log_probs(component_log_probs(x, a, b), w)[support]
        num_units = support.shape[0]
    else:
        unit_loglik, num_units = _unit_loglik(x, counts, tokens, groups, per_draw=True,
                                              offset=b)
    if atoms.shape[0] * num_units > max_size:
        hint = "" if units == "points" or groups is not None else ", use units='points'"
        raise ValueError(f"{atoms.shape[0]} draws x {num_units} units exceeds max_size="
                         f"{max_size}: thin the draws{hint} or raise max_size")
    return torch.stack([unit_loglik(a, w) for a, w in zip(atoms, weights, strict=True)])


def pointwise_counts(num_points: int, *, counts=None, tokens=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The support points with at least one draw, (P,) int64, and their counts (P,)."""
    n = check_counts(counts, tokens, num_points).to(torch.float64).cpu()
    support = (n > 0).nonzero().flatten()
    return support, n[support]


# ----------------------------------------------------------------------------------------------
# Summaries and plots (ArviZ-independent)
# ----------------------------------------------------------------------------------------------
def _flat_params(samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """(chains, draws) scalars named like weights[0], atoms[1,2]."""
    out = {}
    for name in ("weights", "atoms"):
        v = torch.as_tensor(samples[name]).detach().cpu().to(torch.float64)
        tail = v.shape[2:]
        flat = v.reshape(v.shape[:2] + (-1,))
        for i, idx in enumerate(np.ndindex(*tail)):
            out[f"{name}[{','.join(map(str, idx))}]"] = flat[..., i]
    return out


def chain_samples(samples, num_chains, reference, names=("weights", "atoms")
                   ) -> dict[str, torch.Tensor]:
    """Draws of ``names`` as (chains, draws, ...) tensors, relabelled against ``reference``.

    ``samples`` is an MCMC object (grouped by chain), a dict of (chains, draws, ...) draws, a
    dict of (draws, ...) draws (one chain), or flat (chains * draws, ...) with ``num_chains``.
    """
    if hasattr(samples, "get_samples"):
        samples, num_chains = samples.get_samples(group_by_chain=True), None
    elif not isinstance(samples, Mapping):
        raise TypeError(f"samples must be an MCMC object or a dict, got {type(samples).__name__}")
    missing = {"weights", "atoms"} - set(samples)
    if missing:
        raise ValueError(f"samples lacks the sites {sorted(missing)}")
    samples = {k: torch.as_tensor(v) for k, v in samples.items() if k in names}
    if num_chains is not None:
        samples = {k: v.reshape((num_chains, v.shape[0] // num_chains) + v.shape[1:])
                   for k, v in samples.items()}
    elif samples["weights"].dim() == 1:
        raise ValueError("samples['weights'] must be (chains, draws, K) or (draws, K)")
    elif samples["atoms"].dim() == 3:  # (draws, K, L): one chain
        samples = {k: v.unsqueeze(0) for k, v in samples.items()}
    if reference is not None:
        samples = relabel_samples(samples, reference)
    return samples


def forest_figure(flat: dict[str, torch.Tensor], reference=None, level: float = 0.9):
    """The forest plot of :func:`plot_diagnostics`: one panel for the weights and one for the
    atoms, each interval drawn relative to its centre (the reference's value, or the posterior
    median), which the labels give, so that intervals of very different scales stay visible."""
    from matplotlib.ticker import MaxNLocator

    ref = None
    if reference is not None and hasattr(reference, "weights"):
        ref = _flat_params({"weights": reference.weights.detach().cpu()[None, None],
                            "atoms": reference.atoms.detach().cpu()[None, None]})
    q = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=torch.float64)
    groups = [[n for n in flat if n.startswith(kind)] for kind in ("weights", "atoms")]
    groups = [g for g in groups if g]
    sizes = [len(g) for g in groups]
    fig, axes = figure_with_axes(len(groups), 1,
                                 figsize=(6.5, 0.28 * sum(sizes) + 1.2 * len(groups)),
                                 squeeze=False, gridspec_kw={"height_ratios": sizes})
    for ax, names in zip(axes[:, 0], groups, strict=True):
        labels = []
        for i, name in enumerate(names):
            lo, mid, hi = torch.quantile(flat[name].reshape(-1), q).tolist()
            centre = float(ref[name].reshape(-1)[0]) if ref is not None else mid
            ax.plot([lo - centre, hi - centre], [i, i], color="C0")
            ax.plot(mid - centre, i, "o", color="C0", ms=4)
            labels.append(f"{name} = {centre:.4g}")
        if ref is not None:
            ax.axvline(0.0, color="C3", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        centre_name = "the reference (red line)" if ref is not None else "the posterior median"
        ax.set_xlabel(f"difference from {centre_name}", fontsize=8)
    axes[0, 0].set_title(f"{100 * level:g}% intervals and medians", fontsize=10)
    fig.tight_layout()
    return fig


def posterior_summary(samples: Mapping[str, Any], *, num_chains: int | None = None,
                      level: float = 0.9, reference=None) -> list[dict[str, float]]:
    """Mean, sd, central ``level`` interval, split R-hat and ESS of every scalar parameter.

    Args:
        samples: dict of (chains, draws, ...) draws, or flat with ``num_chains``, or an MCMC.
        reference: relabel first against this fit.

    Returns:
        One dict per scalar (``name``, ``mean``, ``sd``, ``lo``, ``hi``, ``r_hat``, ``ess``).
    """
    samples = chain_samples(samples, num_chains, reference)
    rows = []
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    for name, v in _flat_params(samples).items():
        lo, hi = torch.quantile(v.reshape(-1), q).tolist()
        ok = v.shape[1] >= 4
        rows.append(dict(
            name=name, mean=float(v.mean()), sd=float(v.std()), lo=lo, hi=hi,
            r_hat=float(split_gelman_rubin(v, 0, 1)) if ok else math.nan,
            ess=float(effective_sample_size(v, 0, 1)) if ok else math.nan))
    return rows


def format_summary(rows: list[dict[str, float]], level: float = 0.9) -> str:
    """A text table of :func:`posterior_summary` rows."""
    pct = f"{100 * level:g}%"
    lines = [f"{'param':<12} {'mean':>9} {'sd':>8} {pct + ' lo':>9} {pct + ' hi':>9} "
             f"{'r_hat':>7} {'ess':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<12} {r['mean']:9.4f} {r['sd']:8.4f} {r['lo']:9.4f} "
                     f"{r['hi']:9.4f} {r['r_hat']:7.4f} {r['ess']:8.1f}")
    return "\n".join(lines)


def plot_diagnostics(samples, out_dir: str | os.PathLike, *, num_chains: int | None = None,
                     reference=None, level: float = 0.9, max_pairs: int = 4) -> dict[str, str]:
    """Trace, forest and pair plots of the weights and atoms, saved as PNG files.

    Args:
        samples: as for :func:`posterior_summary`.
        out_dir: folder for ``trace.png``, ``forest.png``, ``pair.png`` (created if needed).
        reference: relabel first, and mark these values (e.g. the EM fit) on the forest plot.
        max_pairs: at most this many parameters in the pair plot.

    Returns:
        ``{"trace": path, "forest": path, "pair": path}``.
    """
    samples = chain_samples(samples, num_chains, reference)
    flat = _flat_params(samples)
    names = list(flat)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}

    fig, axes = figure_with_axes(len(names), 2, figsize=(9, 1.4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        v = flat[name].numpy()
        for c in range(v.shape[0]):
            axes[row, 0].plot(v[c], lw=0.6)
            axes[row, 1].hist(v[c], bins=30, histtype="step", density=True)
        axes[row, 0].set_ylabel(name, fontsize=8)
    axes[0, 0].set_title("trace (one line per chain)")
    axes[0, 1].set_title("marginal density")
    fig.tight_layout()
    paths["trace"] = os.path.join(out_dir, "trace.png")
    fig.savefig(paths["trace"], dpi=90)

    fig = forest_figure(flat, reference, level)
    paths["forest"] = os.path.join(out_dir, "forest.png")
    fig.savefig(paths["forest"], dpi=90)

    chosen = names[:max_pairs]
    m = len(chosen)
    fig, axes = figure_with_axes(m, m, figsize=(2 * m, 2 * m), squeeze=False)
    for i, a in enumerate(chosen):
        for j, b in enumerate(chosen):
            ax = axes[i, j]
            if i == j:
                ax.hist(flat[a].reshape(-1).numpy(), bins=30)
            else:
                ax.plot(flat[b].reshape(-1).numpy(), flat[a].reshape(-1).numpy(), ".", ms=1,
                        alpha=0.4)
            if i == m - 1:
                ax.set_xlabel(b, fontsize=7)
            if j == 0:
                ax.set_ylabel(a, fontsize=7)
    fig.tight_layout()
    paths["pair"] = os.path.join(out_dir, "pair.png")
    fig.savefig(paths["pair"], dpi=90)
    return paths


# ----------------------------------------------------------------------------------------------
# Intervals for the EM estimate and the comparison
# ----------------------------------------------------------------------------------------------
def _unit_loglik(features, counts=None, tokens=None, groups=None, per_draw: bool = False,
                 offset=None):
    """A differentiable ``f(atoms, weights)`` -> log-likelihood per unit, and the unit count.

    Units are groups (grouped data), else draws of Y when ``per_draw`` (counts are expanded),
    else support points weighted by their counts (the cheap form for the total). ``offset``:
    the logits' known (p,) offset, or None.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    p = x.shape[0]
    offset = check_offset(offset, p, like=x)
    if groups is not None:
        gi, pi, values, labels = check_groups(groups, counts, tokens, p)
        g, values = int(labels.shape[0]), values[:, None]

        def grouped(atoms, weights):
            log_q = component_log_probs(x, atoms, offset).T  # (p, K)
            joint = group_log_joint(log_q, gi, pi, values, g)
            return torch.logsumexp(joint + log_weights(weights), -1)
        return grouped, g

    def log_pi(atoms, weights):
        return mixture_log_probs(component_log_probs(x, atoms, offset), weights)
    if per_draw:
        tok = (torch.as_tensor(tokens).long().cpu() if tokens is not None
               else expand_counts(counts, None, p)[0])
        check_counts(None, tok, p)
        return (lambda atoms, weights: log_pi(atoms, weights)[tok]), int(tok.shape[0])
    n = check_counts(counts, tokens, p).to(torch.float64)
    return (lambda atoms, weights: n * log_pi(atoms, weights)), p


def fisher_intervals(fit, *, counts=None, tokens=None, groups=None, features=None,
                     level: float = 0.9) -> dict[str, torch.Tensor]:
    """Wald intervals for an EM fit from the observed information
    (:func:`~pyro_softmix.uncertainty.standard_errors` with ``kind="observed"``: the
    closed-form Hessian in the identified coordinates, so non-identified directions of
    rank-deficient features get no spurious variance; a fit's offset is used).

    Returns:
        ``{"weights": (K, 2), "atoms": (K, L, 2), "weights_se": (K,), "atoms_se": (K, L)}``
        with interval columns (lo, hi), in float64 on the CPU.
    """
    from .uncertainty import standard_errors

    se = standard_errors(fit, "observed", counts=counts, tokens=tokens, groups=groups,
                         features=features)
    a0 = fit.atoms.detach().cpu().to(torch.float64)
    w0 = fit.weights.detach().cpu().to(torch.float64)
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    a_se, w_se = se["atoms"], se["weights"]
    return {"atoms": torch.stack([a0 - z * a_se, a0 + z * a_se], -1),
            "weights": torch.stack([w0 - z * w_se, w0 + z * w_se], -1),
            "atoms_se": a_se, "weights_se": w_se}


@dataclass
class FitComparison:
    """Side-by-side results of several fits of one softmax mixture.

    Attributes:
        methods: method names in order (e.g. ``["EM", "SVI (AutoNormal)", "NUTS"]``).
        metrics: per method: ``loglik`` at its point estimate, ``elbo`` (SVI) and ``seconds``.
        params: per method, per scalar parameter name: (estimate, lo, hi).
        level: the interval level.
    """

    methods: list[str]
    metrics: dict[str, dict[str, float]]
    params: dict[str, dict[str, tuple[float, float, float]]]
    level: float = 0.9
    truth: dict[str, float] | None = field(default=None)

    def table(self) -> str:
        """Metrics and parameter estimates with intervals, as text."""
        lines = [f"{'method':<22} {'loglik':>14} {'ELBO':>14} {'seconds':>9}"]
        for m in self.methods:
            r = self.metrics[m]
            elbo = r.get("elbo", math.nan)
            lines.append(f"{m:<22} {r['loglik']:14.4f} {elbo:14.4f} {r['seconds']:9.2f}")
        lines.append("")
        head = f"{'param':<12}" + "".join(f" {m[:24]:>26}" for m in self.methods)
        if self.truth:
            head += f" {'truth':>9}"
        lines.append(head + f"   ({100 * self.level:g}% intervals)")
        for name in self.params[self.methods[0]]:
            row = f"{name:<12}"
            for m in self.methods:
                est, lo, hi = self.params[m][name]
                row += f" {est:8.3f} [{lo:7.3f},{hi:7.3f}]"
            if self.truth:
                row += f" {self.truth.get(name, math.nan):9.3f}"
            lines.append(row)
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> str:
        """Forest plot: each parameter's estimate and interval per method (and the truth)."""
        names = list(self.params[self.methods[0]])
        fig, ax = figure_with_axes(figsize=(7, 0.35 * len(names) + 1.2))
        offsets = np.linspace(-0.25, 0.25, len(self.methods))
        for off, m in zip(offsets, self.methods, strict=True):
            est = [self.params[m][n][0] for n in names]
            lo = [self.params[m][n][1] for n in names]
            hi = [self.params[m][n][2] for n in names]
            ys = np.arange(len(names)) + off
            ax.errorbar(est, ys, xerr=[np.subtract(est, lo), np.subtract(hi, est)], fmt="o",
                        ms=3, lw=1, label=m)
        if self.truth:
            ax.plot([self.truth.get(n, np.nan) for n in names], np.arange(len(names)), "k|",
                    ms=12, label="truth")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        ax.set_title(f"estimates with {100 * self.level:g}% intervals")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        return os.fspath(path)


def _point_params(weights, atoms) -> dict[str, float]:
    flat = _flat_params({"weights": weights[None, None], "atoms": atoms[None, None]})
    return {k: float(v.reshape(-1)[0]) for k, v in flat.items()}


def _draw_params(weights, atoms, level) -> dict[str, tuple[float, float, float]]:
    flat = _flat_params({"weights": weights[None], "atoms": atoms[None]})
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    for name, v in flat.items():
        lo, hi = torch.quantile(v.reshape(-1), q).tolist()
        out[name] = (float(v.mean()), lo, hi)
    return out


def compare_fits(model, *, level: float = 0.9, num_samples: int = 1000, truth=None,
                 seed=None) -> FitComparison:
    """EM vs SVI vs NUTS on the same data, from a :class:`~pyro_softmix.SoftmaxMixtureModel`.

    Uses whatever the model has fitted (``fit_em``, ``fit_svi``, ``fit_mcmc``): EM's estimate with
    Wald intervals (:func:`fisher_intervals`); SVI's guide median with intervals from
    ``num_samples`` guide draws and its final ELBO (mean of the last 10% of steps); NUTS's
    posterior mean and central intervals. All are relabelled against EM. ``loglik`` is the
    log-likelihood at each point estimate.

    Args:
        model: a SoftmaxMixtureModel with at least one fit.
        truth: optional simulated truth (with ``.weights``, ``.atoms``) to show alongside.

    Returns:
        :class:`FitComparison` (``.table()``, ``.plot(path)``).
    """
    if model.em_fit is None:
        raise ValueError("compare_fits needs the model's EM fit: call model.fit_em(...) first")
    data = model.data_kwargs()
    em = model.em_fit
    unit_loglik, _ = _unit_loglik(model.features.detach().cpu().to(torch.float64), **data,
                                  offset=model.offset)

    def loglik(weights, atoms) -> float:  # permutation invariant: no relabelling needed
        return float(unit_loglik(atoms.detach().cpu().double(),
                                 weights.detach().cpu().double()).sum())

    methods, metrics, params = ["EM"], {}, {}
    ci = fisher_intervals(em, level=level, **data)
    metrics["EM"] = {"loglik": em.loglik, "seconds": em.seconds}
    est = _point_params(em.weights.cpu().double(), em.atoms.cpu().double())
    lo = _point_params(ci["weights"][:, 0], ci["atoms"][..., 0])
    hi = _point_params(ci["weights"][:, 1], ci["atoms"][..., 1])
    params["EM"] = {k: (est[k], lo[k], hi[k]) for k in est}

    if model.guide is not None:
        seed_global(seed)
        draws = model.posterior_samples("svi", num_samples)  # relabelled against EM
        med = model.guide.median(**model.model_kwargs())
        name = f"SVI ({type(model.guide).__name__})"
        methods.append(name)
        losses = model.svi_losses or [math.nan]
        tail = losses[-max(1, len(losses) // 10):]
        metrics[name] = {"loglik": loglik(med["weights"], med["atoms"]),
                         "elbo": -float(np.mean(tail)), "seconds": model.svi_seconds}
        params[name] = _draw_params(draws["weights"].cpu().double(),
                                    draws["atoms"].cpu().double(), level)

    if model.mcmc is not None:
        draws = model.posterior_samples("mcmc")
        w, a = draws["weights"].cpu().double(), draws["atoms"].cpu().double()
        methods.append("NUTS")
        metrics["NUTS"] = {"loglik": loglik(w.mean(0), a.mean(0)), "seconds": model.mcmc_seconds}
        params["NUTS"] = _draw_params(w, a, level)

    truth_params = None
    if truth is not None:
        t = relabel_samples({"weights": torch.as_tensor(truth.weights).double()[None],
                             "atoms": torch.as_tensor(truth.atoms).double()[None]}, em)
        truth_params = _point_params(t["weights"][0], t["atoms"][0])
    return FitComparison(methods, metrics, params, level, truth_params)
