# SPDX-License-Identifier: Apache-2.0
"""The result of a fit: :class:`SoftmaxMixtureFit`, and its file format (npz + JSON, no pickle)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ._checks import check_features, check_groups, resolve_device
from ._logprob import (
    component_log_probs,
    group_log_joint,
    log_weights,
    mixture_log_probs,
    posterior,
)
from .engine import GroupedEMProblem, Setup

__all__ = ["FileFormatError", "SoftmaxMixtureFit", "load_fit"]


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
        num_points: p, the number of support points.
        rank: the number of identified directions r (= L for full-rank features).
        init: how the final run was started.
        seconds: wall time of the whole fit.
        features: the (p, L) features the fit was made on (a reference, not a copy), or None
            after :func:`load_fit` of a file saved without features.
        num_groups: for grouped data, G (else None).
        group_labels: for grouped data, the (G,) group ids in the order used (else None).
        group_responsibilities: for grouped data, (G, K) P(component k | group g) (else None).
        prior_scale: the scale of the Normal prior on the atoms for a MAP fit (None: MLE).
        diverging: components whose atoms were still growing along a flat ridge of the
            objective when EM stopped (the MLE is then at infinity; refit with ``prior_scale``).
        offset: the (p,) known offset b of the logits the fit was made with (None: none);
            every probability of the fit is then of softmax(X theta_k + b).
        membership_coef: for grouped data with ``group_features``, Gamma (K, d), last row 0:
            group g's class shares are softmax(Gamma c_g) (see :meth:`group_weights`); else
            None.
        pending: for a checkpoint of an unfinished fit (``fit_em(checkpoint=...)``): the
            starts still to run after this one, and the best finished run, as weights (S, K)
            and atoms (S, K, L); ``fit_em(init=fit)`` runs them too, so a resumed fit ends
            where the uninterrupted one would. None for a finished fit.
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
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    offset: torch.Tensor | None = None
    membership_coef: torch.Tensor | None = None

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.atoms.shape[1])

    @property
    def num_params(self) -> int:
        """The number of free parameters, K - 1 weights (or (K - 1) d membership coefficients)
        plus K r identified atom coordinates."""
        k = self.num_components
        d = 1 if self.membership_coef is None else int(self.membership_coef.shape[1])
        return (k - 1) * d + k * self.rank

    @property
    def bic(self) -> float:
        """The Bayesian information criterion -2 loglik + num_params log(n), with n the number
        of independent units (N draws, or G groups for grouped data); smaller is better."""
        units = self.num_obs if self.num_groups is None else self.num_groups
        return -2.0 * self.loglik + self.num_params * math.log(units)

    @property
    def aic(self) -> float:
        """The Akaike information criterion -2 loglik + 2 num_params; smaller is better."""
        return -2.0 * self.loglik + 2.0 * self.num_params

    def _features(self, features) -> torch.Tensor:
        x = self.features if features is None else check_features(features)
        if x is None:
            raise ValueError("this fit holds no features (it was loaded from a file saved "
                             "without them): pass features=")
        if x.shape[1] != self.num_features:
            raise ValueError(f"features must have {self.num_features} columns, got {x.shape[1]}")
        if self.offset is not None and x.shape[0] != self.offset.shape[0]:
            raise ValueError(f"features must have {self.offset.shape[0]} rows, one per entry of "
                             f"the fit's offset, got {x.shape[0]}")
        return x.to(device=self.atoms.device, dtype=self.atoms.dtype)

    def _offset(self) -> torch.Tensor | None:
        return None if self.offset is None else self.offset.to(self.atoms)

    def component_log_probs(self, features=None) -> torch.Tensor:
        """(K, p) log q_k(j) = log softmax(X theta_k + b)_j (b the fit's offset, if any)."""
        x = self._features(features)
        return component_log_probs(x, self.atoms, self._offset())

    def log_probs(self, features=None) -> torch.Tensor:
        """(p,) log pi_j of the fitted mixture."""
        comp = self.component_log_probs(features)
        return mixture_log_probs(comp, self.weights)

    def probs(self, features=None) -> torch.Tensor:
        """(p,) mixture probabilities pi_j (sum to 1)."""
        return self.log_probs(features).exp()

    def responsibilities(self, features=None) -> torch.Tensor:
        """(p, K) posterior P(component k | Y = j) for every support point."""
        return posterior(self.component_log_probs(features), self.weights)

    # -- groups -----------------------------------------------------------------------------
    def group_weights(self, group_features=None) -> torch.Tensor:
        """(G, K) class shares of groups: softmax(Gamma c_g) for covariates ``group_features``
        (G, d) of a fit with ``membership_coef``; for a fit without covariates, the weights
        (K,) (``group_features`` must then be None)."""
        if self.membership_coef is None:
            if group_features is not None:
                raise ValueError("this fit has no class-membership covariates: "
                                 "group_features must be None")
            return self.weights
        from .membership import check_group_features

        if group_features is None:
            raise ValueError("this fit's class shares depend on covariates: pass "
                             "group_features (G, d)")
        gamma = self.membership_coef
        c = check_group_features(group_features, None, any_rows=True)
        if c.shape[1] != gamma.shape[1]:
            raise ValueError(f"group_features must have {gamma.shape[1]} columns (as in the "
                             f"fit), got {c.shape[1]}")
        return torch.softmax(c.to(gamma) @ gamma.T, 1)

    def group_posterior(self, groups, tokens=None, *, group_features=None, features=None
                        ) -> torch.Tensor:
        """(G, K) P(component k | group g) for groups given like ``fit_em``'s ``groups``: a
        (G, p) count matrix, or (N,) group ids with ``tokens`` (rows in the order of the
        sorted ids); new groups need not be the fitted ones. ``group_features`` (G, d): their
        covariates, for a fit with ``membership_coef``."""
        x = self._features(features)
        gi, pi, values, labels = check_groups(groups, None, tokens, x.shape[0])
        log_q = self.component_log_probs(x).T  # (p, K)
        dev = log_q.device
        joint = group_log_joint(log_q, gi.to(dev), pi.to(dev), values.to(log_q)[:, None],
                                int(labels.shape[0]))
        prior = self.group_weights(group_features)
        if self.membership_coef is not None and prior.shape[0] != labels.shape[0]:
            raise ValueError(f"group_features must have one row per group "
                             f"({labels.shape[0]}), got {prior.shape[0]}")
        return torch.softmax(joint + log_weights(prior), -1)

    def predict_groups(self, groups, tokens=None, *, group_features=None, features=None
                       ) -> torch.Tensor:
        """(G,) the most probable component of each group (see :meth:`group_posterior`)."""
        return self.group_posterior(groups, tokens, group_features=group_features,
                                    features=features).argmax(-1)

    def standard_errors(self, kind: str = "observed", **data) -> dict[str, torch.Tensor]:
        """Standard errors of the weights (K,) and atoms (K, L): ``kind`` is ``"observed"``,
        ``"sandwich"`` or ``"bootstrap"``; ``data`` are the fit's data (``counts=``,
        ``tokens=``, ``groups=``). See :func:`pyro_softmix.uncertainty.standard_errors`."""
        from .uncertainty import standard_errors

        return standard_errors(self, kind, **data)

    def coefficient_table(self, kind: str = "observed", *, level: float = 0.95, **data):
        """Weights and atoms with standard errors, z and Wald intervals (a
        :class:`~pyro_softmix.uncertainty.CoefficientTable`; print it for the table)."""
        from .uncertainty import coefficient_table

        return coefficient_table(self, kind, level=level, **data)

    def distribution(self, features=None):
        """The fitted :class:`~pyro_softmix.SoftmaxMixture` distribution."""
        from .distributions import SoftmaxMixture

        return SoftmaxMixture(self._features(features), self.atoms, self.weights,
                              offset=self._offset())

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
            + ("" if self.num_groups is None else f" in G={self.num_groups:,} groups")
            + ("" if self.membership_coef is None else
               f", class shares on {self.membership_coef.shape[1]} group covariate(s)"),
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

    # -- reporting as data ------------------------------------------------------------------
    #: The scalar fields of a fit, as saved in a file's header and reported by to_dict().
    SCALAR_FIELDS = ("loglik", "n_iter", "converged", "num_obs", "num_points", "rank", "init",
                     "seconds", "num_groups", "prior_scale", "diverging")

    def _scalars(self) -> dict:
        """The scalar fields, JSON-ready."""
        out = {name: getattr(self, name) for name in self.SCALAR_FIELDS}
        out["diverging"] = list(self.diverging)
        return out

    def to_dict(self) -> dict:
        """The fit as JSON-ready data: its scalar fields, K, L, BIC, AIC, and the weights (K,)
        and atoms (K, L) as nested lists."""
        return {"num_components": self.num_components, "num_features": self.num_features,
                **self._scalars(), "bic": self.bic, "aic": self.aic,
                "weights": self.weights.tolist(), "atoms": self.atoms.tolist()}

    # -- persistence (no pickle) -----------------------------------------------------------
    def save(self, path: str | os.PathLike, include_features: bool = False) -> None:
        """Save to a ``.npz`` file (arrays plus a JSON header; loadable without pickle).

        Args:
            path: file name; ``.npz`` is appended by NumPy if missing.
            include_features: also store the (p, L) features, so :meth:`probs` works after
                :func:`load_fit` without passing them.
        """
        meta = self._scalars() | {"dtype": str(self.atoms.dtype).replace("torch.", "")}
        arrays = {"weights": self.weights, "atoms": self.atoms,
                  "history": np.asarray(self.history, dtype=np.float64)}
        if self.num_groups is not None:
            arrays["group_labels"] = self.group_labels
            arrays["group_responsibilities"] = self.group_responsibilities
        if include_features:
            if self.features is None:
                raise ValueError("include_features=True but this fit holds no features")
            arrays["features"] = self.features
        if self.pending is not None:
            arrays["pending_weights"], arrays["pending_atoms"] = self.pending
        if self.offset is not None:
            arrays["offset"] = self.offset
        if self.membership_coef is not None:
            arrays["membership_coef"] = self.membership_coef
        write_npz(path, FIT_FORMAT, meta, arrays)


#: The format tags in the JSON header of the package's files, and the version written.
FIT_FORMAT = "pyro-softmix-fit"
MOE_FORMAT = "pyro-softmix-moe"
FORMAT_VERSION = 1


class FileFormatError(ValueError):
    """A file is not a valid pyro-softmix file (a fit or a mixture of experts): the message
    names the file and the field that is missing or wrong. Files are never unpickled."""


def write_npz(path: str | os.PathLike, kind: str, meta: dict, arrays: dict) -> None:
    """The package's one file format: an ``.npz`` of arrays plus a JSON header ``meta`` that
    carries ``format`` (``kind``) and ``version`` (no pickle anywhere).

    ``arrays`` maps names to tensors or arrays (moved to the CPU); ``meta`` must be
    JSON-serialisable.
    """
    header = {"format": kind, "version": FORMAT_VERSION, **meta}
    data = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in arrays.items()}
    np.savez(path, meta=np.array(json.dumps(header)), **data)


class FileReader:
    """Reads a file of :func:`write_npz` with format ``kind`` and checks every field it hands
    out (type, shape, finiteness), raising :class:`FileFormatError` that names the file and the
    field. A missing file raises ``FileNotFoundError`` (an ``OSError``) with its path; a path
    without its ``.npz`` suffix is found too (``np.savez`` adds it)."""

    def __init__(self, path: str | os.PathLike, kind: str, what: str):
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".npz"):
            path += ".npz"
        self.path, self.what = path, what
        try:
            with open(path, "rb") as handle:  # ours to close, also when NumPy fails midway
                data = np.load(handle, allow_pickle=False)
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                with data:
                    arrays = {k: data[k] for k in data.files}
        except OSError as e:
            if isinstance(e, FileNotFoundError | IsADirectoryError | PermissionError):
                raise
            raise self.error("the file", f"cannot be read ({e})") from None
        except Exception as e:  # noqa: BLE001 (zip, EOF, pickle and format errors of NumPy)
            raise self.error("the file", f"cannot be read ({type(e).__name__}: {e})") from None
        try:
            self.meta = json.loads(str(arrays.pop("meta")))
        except (KeyError, ValueError) as e:
            raise self.error("header 'meta'", f"is missing or not JSON ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != kind:
            raise self.error("header 'format'", f"is not {kind!r}")
        version = self.meta.get("version")
        if version != FORMAT_VERSION:
            raise self.error("header 'version'", f"is {version!r}; this pyro-softmix reads "
                             f"version {FORMAT_VERSION} (was the file written by a newer one?)")
        self.arrays = arrays

    def error(self, field: str, problem: str) -> FileFormatError:
        return FileFormatError(f"{self.path!r} is not a valid pyro-softmix {self.what} file: "
                               f"{field} {problem}")

    def value(self, name: str, kind, *, optional: bool = False, check=None, default=None):
        """Header field ``name`` of type ``kind`` (int, float, bool, str, or a tuple of them);
        ``check(value)`` returns a problem or None."""
        if name not in self.meta or (optional and self.meta[name] is None):
            if optional:
                return default
            raise self.error(f"field {name!r}", "is missing")
        v = self.meta[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(isinstance(v, k) and not (k in (int, float) and isinstance(v, bool))
                 for k in kinds)
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise self.error(f"field {name!r}", f"must be {' or '.join(k.__name__ for k in kinds)}"
                             f" (finite), got {v!r}")
        problem = None if check is None else check(v)
        if problem:
            raise self.error(f"field {name!r}", problem)
        return float(v) if kinds == (float,) or kinds == (float, int) else v

    def array(self, name: str, shape: tuple, *, kinds: str = "f", optional: bool = False,
              finite: bool = True) -> np.ndarray | None:
        """Array ``name`` with ``shape`` (None: any length) and a dtype kind in ``kinds``."""
        if name not in self.arrays:
            if optional:
                return None
            raise self.error(f"array {name!r}", "is missing")
        a = self.arrays[name]
        if a.dtype.kind not in kinds or a.ndim != len(shape) or any(
                want is not None and have != want for have, want in zip(a.shape, shape,
                                                                          strict=True)):
            want = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
            raise self.error(f"array {name!r}", f"must have shape {want} and a "
                             f"{'float' if kinds == 'f' else 'integer'} dtype, got "
                             f"{a.dtype}{a.shape}")
        if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise self.error(f"array {name!r}", "contains NaN or infinite values")
        return a

    def distribution(self, name: str, a: np.ndarray, axis: int = -1) -> None:
        """Check that ``a`` is nonnegative and sums to 1 along ``axis``."""
        tol = 1e-5 if a.dtype == np.float32 else 1e-9
        if (a < 0).any() or not np.allclose(a.sum(axis), 1.0, rtol=0, atol=tol * a.shape[axis]):
            raise self.error(f"array {name!r}", "must be nonnegative and sum to 1")


def load_fit(path: str | os.PathLike, device=None) -> SoftmaxMixtureFit:
    """Load a fit written by :meth:`SoftmaxMixtureFit.save` (no pickle involved).

    Every field is checked (type, shape, finiteness, weights on the simplex, the format's
    version): a damaged or foreign file raises :class:`FileFormatError` naming the file and
    the field, a missing one ``FileNotFoundError``.

    Example:
        >>> import os, tempfile
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=200, num_features=2, num_components=2,
        ...                     num_obs=5000, seed=0)
        >>> fit = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "fit.npz")
        >>> fit.save(path)
        >>> again = psm.load_fit(path)
        >>> bool((again.atoms == fit.atoms).all()), again.loglik == fit.loglik
        (True, True)
    """
    dev = resolve_device(device)
    f = FileReader(path, FIT_FORMAT, "fit")
    atoms = f.array("atoms", (None, None))
    k, L = atoms.shape
    if k < 1 or L < 1:
        raise f.error("array 'atoms'", f"must have at least one row and column, got {atoms.shape}")
    weights = f.array("weights", (k,))
    f.distribution("weights", weights)
    if weights.dtype != atoms.dtype:
        raise f.error("array 'weights'", f"has dtype {weights.dtype}, atoms {atoms.dtype}")
    n_iter = f.value("n_iter", int, check=lambda v: None if v >= 0 else "must be >= 0")
    history = f.array("history", (n_iter + 1,))
    num_points = f.value("num_points", int, check=lambda v: None if v >= 2 else "must be >= 2")
    rank = f.value("rank", int, check=lambda v: None if 1 <= v <= L else f"must be in [1, {L}]")
    num_groups = f.value("num_groups", int, optional=True,
                         check=lambda v: None if v >= 1 else "must be >= 1")
    features = f.array("features", (num_points, L), optional=True)
    offset = f.array("offset", (num_points,), optional=True)
    membership = f.array("membership_coef", (k, None), optional=True)
    labels = resp = pending = None
    pending_w = f.array("pending_weights", (None, k), optional=True)
    if pending_w is not None:
        pending = (pending_w, f.array("pending_atoms", (pending_w.shape[0], k, L)))
        f.distribution("pending_weights", pending_w)
    if num_groups is not None:
        labels = f.array("group_labels", (num_groups,), kinds="iu")
        resp = f.array("group_responsibilities", (num_groups, k))
        f.distribution("group_responsibilities", resp)

    def tensor(a):
        return None if a is None else torch.from_numpy(a).to(dev)

    return SoftmaxMixtureFit(
        weights=tensor(weights), atoms=tensor(atoms),
        loglik=f.value("loglik", (float, int)), n_iter=n_iter,
        converged=f.value("converged", bool), history=history.tolist(),
        num_obs=f.value("num_obs", (float, int), check=lambda v: None if v > 0 else "must be > 0"),
        num_points=num_points, rank=rank, init=f.value("init", str),
        seconds=f.value("seconds", (float, int), check=lambda v: None if v >= 0 else "must be >= 0"),
        features=tensor(features), num_groups=num_groups,
        prior_scale=f.value("prior_scale", (float, int), optional=True,
                            check=lambda v: None if v > 0 else "must be > 0"),
        diverging=tuple(f.value("diverging", list, optional=True, default=[],
                                check=lambda v: None if all(isinstance(i, int) and 0 <= i < k
                                                            for i in v)
                                else f"must list component indices in [0, {k})")),
        group_labels=tensor(labels), group_responsibilities=tensor(resp),
        pending=None if pending is None else tuple(map(tensor, pending)),
        offset=tensor(offset), membership_coef=tensor(membership),
    )


def make_fit(setup: Setup, atoms_z: torch.Tensor, log_w: torch.Tensor, history: list[float],
             converged: bool, label: str, start_time: float, loglik: float | None = None,
             diverging=(), membership=None) -> SoftmaxMixtureFit:
    """The fit at standardised atoms (K, r) and log-weights (K,), reported in the features'
    coordinates, dtype and device; ``membership``: (Gamma (K, d), log shares (G, K)) of a fit
    with group covariates."""
    design, dtype, device = setup.design, setup.dtype, setup.device
    atoms = design.atoms_from_z(atoms_z.to(torch.float64).to(design.to_atoms.device))
    group_resp = None
    if isinstance(setup.problem, GroupedEMProblem):
        prior = log_w if membership is None else membership[1]
        group_resp = setup.problem.responsibilities(atoms_z, prior).to(device=device, dtype=dtype)
    labels = setup.group_labels
    return SoftmaxMixtureFit(
        weights=log_w.exp().to(device=device, dtype=dtype),
        atoms=atoms.to(device=device, dtype=dtype),
        loglik=history[-1] if loglik is None else loglik, n_iter=len(history) - 1,
        converged=converged, history=history,
        num_obs=setup.problem.total, num_points=setup.features.shape[0], rank=design.rank,
        init=label, seconds=time.perf_counter() - start_time, features=setup.features,
        num_groups=None if labels is None else int(labels.shape[0]),
        group_labels=labels, group_responsibilities=group_resp,
        prior_scale=setup.prior_scale, diverging=tuple(diverging),
        offset=None if setup.offset is None else setup.offset.to(device=device, dtype=dtype),
        membership_coef=None if membership is None else membership[0].to(device=device,
                                                                          dtype=dtype),
    )


class Checkpoint:
    """Writes a fit in progress to ``path`` (``.npz``) at most every ``every`` seconds, so an
    interrupted fit can go on with ``fit_em(init=psm.load_fit(path))``.

    Each write goes to a temporary file in the same folder, flushed to disk, then renamed
    over ``path``: a process killed at any moment leaves the previous complete checkpoint (or
    none), never a partial one.
    """

    def __init__(self, path: str | os.PathLike, every: float, setup: Setup, start_time: float):
        path = os.fspath(path)
        self.path = path if path.endswith(".npz") else path + ".npz"
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint {self.path!r}: folder {folder!r} does not exist")
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"checkpoint {self.path!r} is a folder")
        self.every, self.setup, self.start_time = every, setup, start_time
        self.last = time.perf_counter()

    def progress(self, atoms_z, log_w, history, pending_z, pending_w) -> None:
        """Write the state (atoms (K, r), log-weights (K,), objective history) and the starts
        still to run (S, K, r), (S, K) if ``every`` seconds have passed since the last write."""
        if time.perf_counter() - self.last >= self.every:
            self.write(atoms_z, log_w, history, pending_z, pending_w, False)

    def write(self, atoms_z, log_w, history, pending_z=None, pending_w=None,
              converged: bool = False, label: str = "checkpoint") -> SoftmaxMixtureFit:
        fit = make_fit(self.setup, atoms_z, log_w, list(history), converged, label,
                       self.start_time)
        if pending_z is not None and pending_z.shape[0] > 0:
            to = self.setup.design.to_atoms
            atoms = self.setup.design.atoms_from_z(pending_z.to(torch.float64).to(to.device))
            fit.pending = (pending_w.exp().to(fit.weights), atoms.to(fit.atoms))
        save_atomically(fit, self.path)
        self.last = time.perf_counter()
        return fit


def save_atomically(fit: SoftmaxMixtureFit, path: str) -> None:
    """``fit.save(path)`` through a temporary file in the same folder, synced, then renamed."""
    tmp = f"{path[:-4]}.{os.getpid()}.tmp.npz"
    try:
        fit.save(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
