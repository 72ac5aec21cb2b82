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
from .design import Design, standardize
from .solvers import _column_logsumexp, _newton_step, _Workspace

__all__ = ["ConvergenceWarning", "SoftmaxMixtureFit", "fit_em", "load_fit"]

#: EM iterations given to each candidate start under ``init="auto"`` before the best is kept.
AUTO_SHORT_ITER = 20
#: Number of candidate starts under ``init="auto"`` when ``num_inits`` is not given.
AUTO_NUM_INITS = 5


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before its stopping rule was met."""


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-9


# ----------------------------------------------------------------------------------------------
# The engine: works on standardised features z (p, r) and counts n (p,), both on one device.
# ----------------------------------------------------------------------------------------------
class _EMProblem:
    def __init__(self, z: torch.Tensor, counts: torch.Tensor, num_components: int,
                 chunk_size: int | None = None):
        self.z = z
        self.counts = counts.to(z)
        self.counts64 = counts.to(device=z.device, dtype=torch.float64)
        self.total = float(self.counts64.sum())
        # Persistent buffers: the loop then makes no allocation of size p x K.
        self.workspace = _Workspace(z, num_components, chunk_size)
        self.w = z.new_empty(z.shape[0], num_components)
        self.rows = z.new_empty(z.shape[0], 2)
        #: The weights' M-step is alpha_k = weight_sums_k / weight_total (N here; G when grouped).
        self.weight_total = self.total
        self.weight_sums: torch.Tensor | None = None

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Column log-normalisers of fresh logits (and their softmax into the workspace)."""
        return _column_logsumexp(logits, self.workspace.q)

    def e_step(self, logits: torch.Tensor, lse: torch.Tensor, log_weights: torch.Tensor
               ) -> tuple[float, torch.Tensor]:
        """Log-likelihood at (atoms, weights) and the weights w = n r (p, K) for the M-step.

        ``lse`` are the column log-normalisers of ``logits``. The returned w is a buffer of
        this problem, overwritten by the next call.
        """
        joint = torch.sub(logits, lse - log_weights, out=self.w)  # log alpha_k q_k(j)
        top, total = self.rows[:, :1], self.rows[:, 1:]
        torch.amax(joint, 1, keepdim=True, out=top)
        joint.sub_(top).exp_()
        torch.sum(joint, 1, keepdim=True, out=total)
        log_pi = top.add_(total.log())
        w = joint.mul_(total.reciprocal_().mul_(self.counts[:, None]))  # n_j alpha_k q_k(j)/pi_j
        loglik = float(self.counts64 @ log_pi.squeeze(1).to(torch.float64))
        self.weight_sums = w.sum(0)
        return loglik, w

    def m_step(self, w: torch.Tensor, atoms: torch.Tensor, log_weights: torch.Tensor,
               logits: torch.Tensor, lse: torch.Tensor):
        """New (atoms, log_weights, logits, lse) and the increase of the EM surrogate Q.

        The increase is N KL(alpha_new || alpha_old) for the weights plus the quadratic-model
        gain (s - s^2/2) g^T H^{-1} g of each component's Newton step. Both come from gradients,
        not from differences of large sums, so they stay accurate in float32 where the
        log-likelihood itself is resolved only to about 1e-7 relative.
        """
        new_log_weights = torch.log(self.weight_sums / self.weight_total)
        atoms, logits, lse, info = _newton_step(self.z, w, atoms, logits, self.workspace, lse)
        # KL(a || b) to second order, 0.5 sum (a - b)^2 / b: no first-order cancellation.
        a, b = new_log_weights.double().exp(), log_weights.double().exp()
        kl = (0.5 * (a - b) ** 2 / b.clamp_min(1e-300)).sum()
        newton = ((info.step - 0.5 * info.step**2) * info.gain).double().sum()
        return atoms, new_log_weights, logits, lse, float(self.weight_total * kl + newton)

    def run(self, atoms: torch.Tensor, log_weights: torch.Tensor, max_iter: int, tol: float,
            bar=None) -> tuple[torch.Tensor, torch.Tensor, list[float], bool]:
        """Iterate from (atoms, log_weights) until the estimated relative gap is <= tol."""
        logits = self.z @ atoms.T
        lse = self.normalise(logits)
        loglik, w = self.e_step(logits, lse, log_weights)
        history, gains = [loglik], []
        converged = False
        for _ in range(max_iter):
            atoms, log_weights, logits, lse, gain = self.m_step(w, atoms, log_weights, logits,
                                                                lse)
            loglik, w = self.e_step(logits, lse, log_weights)
            history.append(loglik)
            gains.append(gain)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loglik=f"{loglik:.8g}", refresh=False)
            if _remaining_gap(gains) <= tol * abs(loglik):
                converged = True
                break
        self.last_gap = _remaining_gap(gains)
        return atoms, log_weights, history, converged


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
                 chunk_size: int | None = None):
        counts = torch.zeros(z.shape[0], dtype=torch.float64).index_add_(0, point_index, values)
        super().__init__(z, counts, num_components, chunk_size)
        dev = z.device
        self.group_index = group_index.to(dev)
        self.point_index = point_index.to(dev)
        self.values = values.to(device=dev, dtype=z.dtype)[:, None]
        self.num_groups = num_groups
        self.weight_total = float(num_groups)

    def _joint(self, log_q: torch.Tensor) -> torch.Tensor:
        return _group_log_joint(log_q, self.group_index, self.point_index, self.values,
                                self.num_groups)

    def e_step(self, logits, lse, log_weights):
        joint = self._joint(torch.sub(logits, lse, out=self.w)).add_(log_weights)
        group_ll = torch.logsumexp(joint, 1)
        r = joint.sub_(group_ll[:, None]).exp_()  # (G, K) responsibilities
        self.weight_sums = r.sum(0)
        w = self.w.zero_().index_add_(0, self.point_index, r[self.group_index].mul_(self.values))
        return float(group_ll.to(torch.float64).sum()), w

    def responsibilities(self, atoms, log_weights) -> torch.Tensor:
        """(G, K) P(component k | group g) at (atoms, log_weights)."""
        log_q = torch.log_softmax(self.z @ atoms.T, 0)
        return torch.softmax(self._joint(log_q) + log_weights, 1)


#: Largest linear rate assumed by the stopping rule (so the gap estimate is at most 1e4 steps).
_MAX_RATE = 1 - 1e-4


def _remaining_gap(gains: list[float]) -> float:
    """Estimated distance l* - l_t from the last two EM increments (Aitken's extrapolation).

    EM converges linearly, l* - l_t ~ Delta_t / (1 - rho) with rho = Delta_t / Delta_{t-1}, so a
    small step at a slow rate (a stall, rho near 1) does not count as convergence.
    """
    if len(gains) < 2:
        return math.inf
    d1, d0 = gains[-1], gains[-2]
    if d1 <= 0:
        return 0.0
    rate = min(max(d1 / d0, 0.0), _MAX_RATE) if d0 > 0 else _MAX_RATE
    return d1 / (1 - rate)


def _random_starts(z: torch.Tensor, counts: torch.Tensor, num_components: int,
                   num_starts: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random atoms (K, r) in z-coordinates around the first latent moment.

    For a Gaussian design E_pi[z] ~ sum_k alpha_k t_k and E_pi[|z|^2] - r ~ sum_k alpha_k |t_k|^2,
    so the atoms' spread about their mean is about E|z|^2 - r - |E z|^2; starts are drawn at that
    spread (at least 0.5) around E_pi[z]. The draws are made on the CPU in float64, so a seed
    gives the same starts on every device.
    """
    pihat = (counts / counts.sum()).to(z.dtype)
    m1 = (pihat @ z).to(torch.float64).cpu()
    second = float((pihat * torch.linalg.vector_norm(z, dim=1) ** 2).sum())
    r = z.shape[1]
    scale = math.sqrt(max(second - r - float(m1 @ m1), 0.25) / r)
    return [(m1 + scale * torch.randn(num_components, r, generator=generator,
                                      dtype=torch.float64)).to(device=z.device, dtype=z.dtype)
            for _ in range(num_starts)]


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
        n_iter: EM iterations from the chosen start to the solution (under ``init="auto"``
            this includes the short run that selected the start).
        converged: whether the stopping rule was met.
        history: log-likelihood at the chosen start and after every iteration since.
        num_obs: N, the total count.
        num_points: p.  rank: number of identified directions r (= L for full-rank features).
        init: how the final run was started.  seconds: wall time of the whole fit.
        features: the (p, L) features the fit was made on (a reference, not a copy), or None
            after :func:`load_fit` of a file saved without features.
        num_groups, group_labels, group_responsibilities: for grouped data only (else None):
            G, the (G,) group ids in the order used, and (G, K) P(component k | group g).
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
            "num_groups": self.num_groups,
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
    is_start = not isinstance(init, str)
    if not is_start and init not in ("auto", "random"):
        raise ValueError(f"init must be 'auto', 'random' or a start with weights and atoms, "
                         f"got {init!r}")
    if num_inits is not None:
        num_inits = check_positive_int(num_inits, "num_inits")
    return num_inits


def _choose_start(problem, design, z, k, init, num_inits, max_iter, tol, seed, progress):
    """(atoms_z, log_weights, label, prefix): the start of the final EM run."""
    if not isinstance(init, str):
        atoms_z, log_w = _user_start(init, k, design, z)
        return atoms_z, log_w, "given", []
    gen = make_generator(seed)
    n_starts = num_inits or (AUTO_NUM_INITS if init == "auto" else 1)
    uniform = torch.full((k,), -math.log(k), dtype=z.dtype, device=z.device)
    starts = _random_starts(z, problem.counts, k, n_starts, gen)
    label = f"{init} (best of {n_starts})" if n_starts > 1 else init
    if n_starts == 1:
        return starts[0], uniform, label, []
    bar = _progress_bar(progress, n_starts * AUTO_SHORT_ITER, "EM starts")
    best = None
    for s in starts:
        a, lw, hist, _ = problem.run(s, uniform, min(AUTO_SHORT_ITER, max_iter), tol, bar)
        if best is None or hist[-1] > best[0][-1]:
            best = (hist, a, lw)
    if bar is not None:
        bar.close()
    return best[1], best[2], label, best[0][:-1]


def _make_fit(problem, design, x, atoms_z, log_w, history, converged, label, labels,
              start_time, dtype, device) -> SoftmaxMixtureFit:
    atoms = design.atoms_from_z(atoms_z.to(torch.float64).to(design.to_atoms.device))
    group_resp = None
    if isinstance(problem, _GroupedEMProblem):
        group_resp = problem.responsibilities(atoms_z, log_w).to(device=device, dtype=dtype)
    return SoftmaxMixtureFit(
        weights=log_w.exp().to(device=device, dtype=dtype),
        atoms=atoms.to(device=device, dtype=dtype),
        loglik=history[-1], n_iter=len(history) - 1, converged=converged, history=history,
        num_obs=problem.total, num_points=x.shape[0], rank=design.rank, init=label,
        seconds=time.perf_counter() - start_time, features=x,
        num_groups=None if labels is None else int(labels.shape[0]),
        group_labels=labels, group_responsibilities=group_resp,
    )


def fit_em(features, counts=None, tokens=None, num_components: int = 3, init: Any = "auto",
           num_inits: int | None = None, max_iter: int = 1000, tol: float | None = None,
           device=None, dtype=None, seed=None, progress: bool | None = None,
           chunk_size: int | None = None, groups=None) -> SoftmaxMixtureFit:
    """Maximum-likelihood fit of a softmax mixture by EM on counts.

    The model: P(Y = j) = sum_k alpha_k softmax(X theta_k)_j for support points j = 0..p-1.

    Args:
        features: (p, L) features X of the support points (tensor or array; not modified).
        counts: (p,) nonnegative counts n_j (may be fractional weights). Or:
        tokens: (N,) integer draws in [0, p). Exactly one of ``counts``/``tokens`` (or neither
            when ``groups`` is a count matrix).
        num_components: K >= 1.
        init: ``"auto"`` (best of ``num_inits`` random starts after a short EM, default 5),
            ``"random"`` (``num_inits`` random starts, default 1, the best kept), or a start:
            a mapping with ``"weights"`` (K,) and ``"atoms"`` (K, L), or any object with
            ``.weights`` and ``.atoms`` (e.g. a previous fit).
        num_inits: number of random starts (see ``init``).
        max_iter: EM iterations at most after the start is chosen.
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

    Returns:
        :class:`SoftmaxMixtureFit` with ``weights`` (K,), ``atoms`` (K, L), ``loglik`` and more
        (with ``groups``: ``num_groups``, ``group_labels`` and ``group_responsibilities``).

    Warns:
        ConvergenceWarning: if ``max_iter`` was reached first.
        IdentifiabilityWarning: if the centred features have rank below L.

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
    x, design, z, problem, k, dtype, device, labels = _prepare(
        features, counts, tokens, groups, num_components, dtype, device, chunk_size)
    tol = _default_tol(dtype) if tol is None else check_positive_float(tol, "tol", True)

    atoms_z, log_w, label, prefix = _choose_start(problem, design, z, k, init, num_inits,
                                                  max_iter, tol, seed, progress)
    bar = _progress_bar(progress, max_iter, "EM")
    try:
        atoms_z, log_w, history, converged = problem.run(atoms_z, log_w, max_iter, tol, bar)
        history = prefix + history
    finally:
        if bar is not None:
            bar.close()
    if not converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (estimated relative gap "
            f"{problem.last_gap / abs(history[-1]):.2e} > tol={tol:.1e}); "
            "increase max_iter or continue with init=fit",
            ConvergenceWarning, stacklevel=2,
        )
    return _make_fit(problem, design, x, atoms_z, log_w, history, converged, label, labels,
                     start_time, dtype, device)
