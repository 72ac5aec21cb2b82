# SPDX-License-Identifier: Apache-2.0
"""Plots of a fit, saved to files (matplotlib, imported lazily, no display needed)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ._matching import match_components as _match

__all__ = ["match_components", "plot_convergence", "plot_recovery"]


def match_components(atoms: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Permutation ``perm`` so that ``atoms[perm[k]]`` is the estimate of ``reference[k]``.

    Minimises the total squared Euclidean distance (Hungarian algorithm; the package's one
    matcher, also used by :func:`~pyro_softmix.relabel_samples`).

    Args:
        atoms: (K, L) estimated atoms.
        reference: (K, L) atoms to match against.
    Returns:
        (K,) int array.
    """
    a, b = torch.as_tensor(atoms), torch.as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"atoms {tuple(a.shape)} and reference {tuple(b.shape)} must match")
    return _match(a, b).numpy()


def figure_with_axes(nrows: int = 1, ncols: int = 1, **kwargs):
    """A matplotlib figure and its axes for a file, without pyplot (the user's backend and open
    figures are left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def convergence_figure(fit):
    """The figure of :func:`plot_convergence` (returned, not saved)."""
    from matplotlib.ticker import MaxNLocator

    h = np.asarray(fit.history, dtype=np.float64)
    it = np.arange(h.size)
    fig, (ax1, ax2) = figure_with_axes(1, 2, figsize=(9, 3.6), layout="constrained")
    ax1.plot(it, h, marker="o", ms=3, lw=1)
    ax1.set_ylabel("log-likelihood")
    ax1.set_title("objective after each update", fontsize=10)
    gap = np.maximum(h.max() - h, 0.0)
    positive = gap > 0
    ax2.semilogy(it[positive], gap[positive], marker="o", ms=3, lw=1)
    ax2.set_ylabel("gap to the final log-likelihood")
    ax2.set_title("gap (the final point, 0, is off the log scale)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("update (0: the chosen start)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, max(h.size - 0.5, 1.5))
        ax.grid(True, which="both", alpha=0.3)
    status = "converged" if fit.converged else "not converged"
    fig.suptitle(f"EM {status} after {fit.n_iter} updates (start: {fit.init})", fontsize=9)
    return fig


def plot_convergence(fit, path: str | os.PathLike) -> str:
    """Save the log-likelihood after every update of the kept run, and its gap to the final
    value (log scale), against the update number (0: the chosen start).

    Returns the path written.
    """
    fig = convergence_figure(fit)
    fig.savefig(path, dpi=120)
    return os.fspath(path)


def plot_recovery(fit, true_weights, true_atoms, path: str | os.PathLike) -> str:
    """Save a two-panel recovery plot: estimated vs true atom coordinates, and weights.

    Components are matched to the truth by :func:`match_components`. Returns the path written.
    """
    tw = torch.as_tensor(true_weights).detach().cpu().double().numpy()
    ta = torch.as_tensor(true_atoms).detach().cpu().double()
    perm = match_components(fit.atoms, ta)
    ea = fit.atoms.detach().cpu().double()[perm].numpy()
    ew = fit.weights.detach().cpu().double()[perm].numpy()
    ta = ta.numpy()
    fig, (ax1, ax2) = figure_with_axes(1, 2, figsize=(9, 3.8), layout="constrained")
    for k in range(ta.shape[0]):
        ax1.scatter(ta[k], ea[k], s=12, label=f"component {k}")
    lo, hi = float(min(ta.min(), ea.min())), float(max(ta.max(), ea.max()))
    ax1.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("true atom coordinate")
    ax1.set_ylabel("estimated atom coordinate")
    ax1.set_title("atoms", fontsize=10)
    if ta.shape[0] <= 10:
        ax1.legend(fontsize=7)
    idx = np.arange(tw.size)
    ax2.bar(idx - 0.2, tw, width=0.4, label="true")
    ax2.bar(idx + 0.2, ew, width=0.4, label="estimated")
    ax2.set_xticks(idx)
    ax2.set_xlabel("component")
    ax2.set_ylabel("weight")
    ax2.set_title("weights", fontsize=10)
    ax2.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return os.fspath(path)
