# SPDX-License-Identifier: Apache-2.0
"""Mixtures of experts (MoE) fitted by EM, with gradient baselines and a Pyro model.

A softmax gate routes input i to expert k; the expert is a linear-Gaussian or a logistic model::

    P(z_i = k | x_i)  = softmax(V g_i)_k            (V: (K, d_g), last row fixed at 0)
    y_i | z_i = k     ~ Normal(b_k . x_i, s_k^2)   ("linear")   or
                        Bernoulli(sigmoid(b_k . x_i))   ("logistic")

with gate features g_i and expert features x_i (the same by default, an intercept column added
to both). EM alternates responsibilities r_ik = P(z_i = k | x_i, y_i) (log space) with an M-step
that is a weighted regression per expert (closed-form weighted least squares, or damped-Newton
IRLS for logistic experts, batched over experts) and a multinomial logit for the gate fitted to
the soft labels r (damped Newton, :func:`~pyro_softmix.solvers.fit_multinomial_logit`).

Fruytier, Mokhtari and Sanghavi (2024, "Learning mixtures of experts with EM: a mirror descent
perspective", arXiv:2411.06056) show that this EM is (projected) mirror descent with unit step
on the log-likelihood, whose mirror map is the log-partition function of the complete-data
(y, z) exponential family, so its Bregman divergence is a KL divergence; this is why EM needs
no step size and beats gradient descent. ``tests/test_moe.py`` checks the identity numerically.

``method="gd"`` and ``method="adam"`` fit the same (penalised) log-likelihood by full-batch
gradient steps, from the same starting points, for comparison.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from ._checks import (
    as_tensor,
    check_positive_float,
    check_positive_int,
    keyword_options,
    make_generator,
    resolve_device,
    resolve_dtype,
    warn_user,
)
from ._chunks import thread_budget
from .moe_em import fit_starts, log_joint, public_params, start_params
from .results import MOE_FORMAT, FileReader, write_npz
from .stopping import ConvergenceWarning, NumericalError, default_tol

__all__ = ["MixtureOfExperts", "load_moe"]

EXPERTS = ("linear", "logistic")
NOISE = ("expert", "shared")
METHODS = ("em", "gd", "adam")
#: Default learning rates of the gradient baselines (on the mean log-likelihood).
DEFAULT_LR = {"gd": 0.5, "adam": 0.05}


def _matrix(value, name: str, rows: int | None = None) -> torch.Tensor:
    t = as_tensor(value, name)
    if t.dim() == 1 and rows is not None:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape (num_obs, num_features), got shape "
                         f"{tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per observation), got {t.shape[0]}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column")
    if t.dtype == torch.bool:
        t = t.to(torch.get_default_dtype())
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or infinite values (first bad row: {bad})")
    return t


def _design_matrices(spec, x, gate_x, dtype=None, device=None, new_fit: bool = False):
    """Expert and gate design matrices (with intercepts), as new tensors; checked against
    the fitted shapes unless ``new_fit``."""
    xe = _matrix(x, "x")
    xg = xe if gate_x is None else _matrix(gate_x, "gate_x", rows=xe.shape[0])
    fitted = spec.fitted and not new_fit
    if dtype is None and fitted:
        dtype = spec.expert_weights.dtype
    dtype = resolve_dtype(dtype, xe)
    device = resolve_device(device, spec.expert_weights if fitted else xe)
    out = []
    for t in (xe, xg):
        t = t.to(device=device, dtype=dtype)
        if spec.intercept:
            t = torch.cat([t, t.new_ones(t.shape[0], 1)], 1)
        out.append(t)
    if fitted:
        extra = 1 if spec.intercept else 0
        for t, w, name in ((out[0], spec.expert_weights, "x"),
                           (out[1], spec.gate_weights, "gate_x")):
            if t.shape[1] != w.shape[1]:
                raise ValueError(f"{name} must have {w.shape[1] - extra} columns (as when "
                                 f"fitted), got {t.shape[1] - extra}")
    return out[0], out[1]


def _check_targets(expert: str, y, n: int, like: torch.Tensor) -> torch.Tensor:
    """Targets (n,) in ``like``'s dtype and device; 0/1 for logistic experts."""
    t = as_tensor(y, "y")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.shape != (n,):
        raise ValueError(f"y must have shape ({n},) (one target per row of x), got "
                         f"{tuple(t.shape)}")
    t = t.to(like)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("y contains NaN or infinite values")
    if expert == "logistic" and not bool(((t == 0) | (t == 1)).all()):
        bad = sorted({float(v) for v in t[(t != 0) & (t != 1)][:5].tolist()})
        raise ValueError(f"y must contain only 0 and 1 for logistic experts, got values such "
                         f"as {bad}")
    return t


class MixtureOfExperts:
    """A mixture of linear or logistic experts with a softmax gate, fitted by EM.

    In the manner of scikit-learn: configure, then :meth:`fit` (which returns ``self``); the
    estimates are plain attributes. :meth:`model` is the same MoE as a Pyro model (sites
    ``"gate_weights"``, ``"expert_weights"``, ``"noise_scale"``, ``"assignment"``, ``"obs"``)
    for SVI or NUTS started at the EM solution (:meth:`fit_svi`, :meth:`fit_mcmc`).

    Args:
        num_experts: K.
        expert: ``"linear"`` (Gaussian noise) or ``"logistic"`` (0/1 targets).
        noise: linear experts only: a noise scale per expert (``"expert"``) or one for all
            (``"shared"``).
        intercept: add a column of ones to the expert and gate features.
        l2: ridge penalty on all coefficients (gate and experts, a Normal(0, 1/l2) prior each);
            every method then maximises the penalised log-likelihood. Needed when the data
            are (nearly) separable, where the maximum-likelihood estimate is at infinity.
        min_noise: linear experts: floor on each noise scale, as a fraction of sd(y); keeps
            the likelihood bounded when an expert collapses onto a few points.
        prior_scale: scale of the Pyro model's Normal priors on the coefficients and of its
            HalfNormal prior on the noise scales (for standardised features and targets).

    Attributes (after :meth:`fit`):
        gate_weights: (K, d_g) gate coefficients, last row 0 (intercept last when added).
        expert_weights: (K, d_x) expert coefficients (intercept last when added).
        noise_scale: (K,) noise standard deviations (linear experts), else None.
        loglik: log-likelihood sum_i log p(y_i | x_i) at the estimate.
        objective: loglik minus the ridge penalty (what the methods maximise).
        history: objective per iteration (index 0: the start).
        times: seconds since the call at each entry of ``history``.
        n_iter: iterations run.
        converged: whether the stopping rule was met.
        seconds: wall time of the fit.
        method: the method used (``"em"``, ``"gd"`` or ``"adam"``).
        init: how the kept run was started.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate_moe(num_obs=2000, num_experts=3, seed=0)
        >>> moe = psm.MixtureOfExperts(3).fit(data.x, data.y, seed=0)
        >>> tuple(moe.predict(data.x[:5]).shape), moe.converged
        ((5,), True)
    """

    def __init__(self, num_experts: int, expert: str = "linear", *, noise: str = "expert",
                 intercept: bool = True, l2: float = 0.0, min_noise: float = 1e-3,
                 prior_scale: float = 5.0):
        self.num_experts = check_positive_int(num_experts, "num_experts")
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        if noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
        self.expert, self.noise, self.intercept = expert, noise, bool(intercept)
        self.l2 = check_positive_float(l2, "l2", allow_zero=True)
        self.min_noise = check_positive_float(min_noise, "min_noise", allow_zero=True)
        self.prior_scale = check_positive_float(prior_scale, "prior_scale")
        self.gate_weights: torch.Tensor | None = None
        self.expert_weights = self.noise_scale = self.gate_weights
        self.loglik = self.objective = math.nan
        self.history: list[float] = []
        self.times: list[float] = []
        self.n_iter, self.converged, self.seconds = 0, False, 0.0
        self.method, self.init, self.num_obs = None, None, 0
        self.guide = self.svi_losses = self.mcmc = None

    def __repr__(self) -> str:
        state = (f"loglik={self.loglik:.6g}, n_iter={self.n_iter}, method={self.method!r}"
                 if self.fitted else "not fitted")
        return (f"MixtureOfExperts(num_experts={self.num_experts}, expert={self.expert!r}, "
                f"{state})")

    # -- data ------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.expert_weights is not None

    def _data(self, x, y, gate_x, dtype=None, device=None, *, new_fit: bool = False):
        xe, xg = _design_matrices(self, x, gate_x, dtype, device, new_fit)
        if xe.shape[0] < 2:
            raise ValueError(f"x must have at least 2 rows (observations), got {xe.shape[0]}")
        return xe, xg, _check_targets(self.expert, y, xe.shape[0], xe)

    # -- parameters ------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise ValueError("this MixtureOfExperts is not fitted: call fit(...) first")
        out = {"gate": self.gate_weights, "experts": self.expert_weights}
        if self.expert == "linear":
            out["scale"] = self.noise_scale
        return out

    def initial_params(self, x, y, gate_x=None, *, init: str = "random", seed=None,
                       dtype=None) -> dict[str, torch.Tensor]:
        """A starting point (``gate_weights``, ``expert_weights``, ``noise_scale``), to pass as
        ``fit(init=...)`` so that several methods start from the same place.

        Args:
            init: ``"random"``: gate near uniform, experts at the pooled regression plus noise
                at the scale of the data; ``"kmeans"``: k-means on (x, y), then one M-step from
                the clusters.
            seed: int, generator or None.
        """
        xe, xg, yt = self._data(x, y, gate_x, dtype, new_fit=True)
        return public_params(start_params(self, init, xe, xg, yt, make_generator(seed)))

    # -- fitting ---------------------------------------------------------------------------
    @keyword_options
    def fit(self, x, y, gate_x=None, *, method: str = "em", init: Any = "auto",
            num_inits: int = 4, max_iter: int | None = None, tol: float | None = None,
            m_steps: int = 1, lr: float | None = None, seed=None, dtype=None, device=None,
            progress: bool | None = None, warn: bool = True,
            num_threads: int | None = None) -> MixtureOfExperts:
        """Maximum-likelihood (or ridge-penalised) fit; returns ``self``.

        Args:
            x: (n, d_x) expert features.
            y: (n,) targets (0/1 for logistic experts).
            gate_x: (n, d_g) gate features (default: ``x``).
            method: ``"em"`` (default), or the baselines ``"gd"`` / ``"adam"`` (full-batch
                gradient ascent on the mean log-likelihood with learning rate ``lr``).
            init: ``"auto"`` (one k-means start and ``num_inits - 1`` random starts, each run
                to convergence, best objective kept), ``"random"``, ``"kmeans"``, a fitted
                MixtureOfExperts, or a mapping as returned by :meth:`initial_params`.
            max_iter: iterations per start (default 1000 for EM, 20000 for gradients).
            tol: stop when the estimated remaining increase of the objective (Aitken, from the
                last two increments) is below ``tol * |objective|`` (default
                :func:`~pyro_softmix.stopping.default_tol`: 1e-10 in float64, 1e-9 in float32).
            m_steps: Newton steps per EM iteration for the iterative M-step parts (logistic
                experts, the gate). A full Newton step is tried first; if the log-likelihood
                falls, the iteration is redone with damped steps that increase Q, so EM is
                monotone.
            seed: for the random starts: an int, a ``torch.Generator``, or None (default:
                drawn from torch's global random state). The same seed gives the same fit.
            dtype: ``"float32"``/``"float64"`` (default: x's if floating, else the default).
            progress: a tqdm bar (default: when stderr is a terminal).
            warn: warn (``ConvergenceWarning``) when ``max_iter`` is reached.
            num_threads: CPU threads (default: as :func:`~pyro_softmix.fit_em` chooses).

        Example:
            >>> import pyro_softmix as psm
            >>> data = psm.simulate_moe(num_obs=1000, num_experts=2, expert="logistic", seed=1)
            >>> moe = MixtureOfExperts(2, "logistic").fit(data.x, data.y, seed=0)
            >>> tuple(moe.predict_proba(data.x[:3]).shape)
            (3, 2)
        """
        begin = time.perf_counter()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        num_inits = check_positive_int(num_inits, "num_inits")
        m_steps = check_positive_int(m_steps, "m_steps")
        if num_threads is not None:
            num_threads = check_positive_int(num_threads, "num_threads")
        if max_iter is None:
            max_iter = 1000 if method == "em" else 20000
        max_iter = check_positive_int(max_iter, "max_iter")
        xe, xg, yt = self._data(x, y, gate_x, dtype, device, new_fit=True)
        if tol is None:
            tol = default_tol(xe.dtype)
        tol = check_positive_float(tol, "tol", allow_zero=True)
        if method != "em":
            lr = check_positive_float(DEFAULT_LR[method] if lr is None else lr, "lr")
        with thread_budget(self._work(xe), num_threads, xe.device):
            label, (params, history, times, converged) = fit_starts(
                self, xe, xg, yt, init, num_inits, make_generator(seed), method, max_iter, tol,
                m_steps, lr, progress)
        self.gate_weights = params["gate"].detach()
        self.expert_weights = params["experts"].detach()
        self.noise_scale = params["scale"].detach() if "scale" in params else None
        with torch.no_grad():
            self.loglik = float(torch.logsumexp(log_joint(self, params, xe, xg, yt), 1).sum())
        self.objective = history[-1]
        self.history, self.times = history, times
        self.n_iter, self.converged = len(history) - 1, converged
        self.seconds = time.perf_counter() - begin
        self.method, self.init, self.num_obs = method, label, xe.shape[0]
        if not math.isfinite(self.objective):
            raise NumericalError(f"{method} diverged (objective {self.objective}); "
                                 "lower lr= or standardise the features")
        if warn and not converged:
            warn_user(f"MoE {method} stopped at max_iter={max_iter} before converging "
                      f"(last increase {history[-1] - history[-2]:.3g})", ConvergenceWarning)
        return self

    # -- using a fit -----------------------------------------------------------------------
    def gate_probs(self, x, gate_x=None) -> torch.Tensor:
        """(n, K) gate probabilities P(z = k | x)."""
        _, xg = _design_matrices(self, x, gate_x)
        return torch.softmax(xg @ self._params()["gate"].T, 1)

    def expert_predictions(self, x, gate_x=None) -> torch.Tensor:
        """(n, K) each expert's mean (linear) or P(y = 1) (logistic)."""
        xe, _ = _design_matrices(self, x, gate_x)
        eta = xe @ self._params()["experts"].T
        return eta if self.expert == "linear" else torch.sigmoid(eta)

    def predict_proba(self, x, gate_x=None, *, gate: bool = False) -> torch.Tensor:
        """Class probabilities of the mixture, (n, 2) for y in {0, 1} (logistic experts), or
        with ``gate=True`` the (n, K) gate probabilities (either kind of expert)."""
        if gate:
            return self.gate_probs(x, gate_x)
        if self.expert != "logistic":
            raise ValueError("predict_proba needs logistic experts; for linear experts use "
                             "predict (the mean), log_prob, or predict_proba(gate=True)")
        xe, xg = _design_matrices(self, x, gate_x)
        p = self._params()
        p1 = (torch.softmax(xg @ p["gate"].T, 1) * torch.sigmoid(xe @ p["experts"].T)).sum(1)
        return torch.stack([1 - p1, p1], 1)

    def predict(self, x, gate_x=None) -> torch.Tensor:
        """(n,) mixture mean E[y | x] (linear experts) or the more probable label (logistic)."""
        if self.expert == "logistic":
            return (self.predict_proba(x, gate_x)[:, 1] > 0.5).long()
        xe, xg = _design_matrices(self, x, gate_x)
        p = self._params()
        return (torch.softmax(xg @ p["gate"].T, 1) * (xe @ p["experts"].T)).sum(1)

    def log_prob(self, x, y, gate_x=None) -> torch.Tensor:
        """(n,) log p(y_i | x_i) at the estimate."""
        xe, xg, yt = self._data(x, y, gate_x)
        return torch.logsumexp(log_joint(self, self._params(), xe, xg, yt), 1)

    def log_likelihood(self, x, y, gate_x=None) -> float:
        """sum_i log p(y_i | x_i) at the estimate (e.g. on held-out data)."""
        return float(self.log_prob(x, y, gate_x).sum())

    def responsibilities(self, x, y, gate_x=None) -> torch.Tensor:
        """(n, K) P(z_i = k | x_i, y_i) at the estimate."""
        xe, xg, yt = self._data(x, y, gate_x)
        return torch.softmax(log_joint(self, self._params(), xe, xg, yt), 1)

    @property
    def num_params(self) -> int:
        self._params()
        k = self.num_experts
        count = (k - 1) * self.gate_weights.shape[1] + k * self.expert_weights.shape[1]
        if self.expert == "linear":
            count += k if self.noise == "expert" else 1
        return count

    @property
    def bic(self) -> float:
        """-2 loglik + num_params log n (lower is better)."""
        return -2 * self.loglik + self.num_params * math.log(self.num_obs)

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.num_params

    # -- persistence (no pickle) -----------------------------------------------------------
    _CONFIG = ("num_experts", "expert", "noise", "intercept", "l2", "min_noise", "prior_scale")
    _STATE = ("loglik", "objective", "n_iter", "converged", "seconds", "method", "init",
              "num_obs")

    def save(self, path: str | os.PathLike) -> None:
        """Save the configuration and estimates to ``.npz`` (arrays plus a JSON header; the
        package's one file format, see :func:`~pyro_softmix.results.write_npz`)."""
        params = self._params()
        meta = {k: getattr(self, k) for k in self._CONFIG + self._STATE}
        arrays = dict(public_params(params), times=np.asarray(self.times, dtype=np.float64),
                      history=np.asarray(self.history, dtype=np.float64))
        write_npz(path, MOE_FORMAT, meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MixtureOfExperts:
        """Load what :meth:`save` wrote (see :func:`load_moe`)."""
        return load_moe(path)

    # -- Pyro ------------------------------------------------------------------------------
    def model(self, x, y=None, gate_x=None, *, collapsed: bool = False,
              subsample_size: int | None = None):
        """The MoE as a Pyro model (composable; call inside your own model).

        Sites: ``gate_weights`` (K-1, d_g) ~ Normal(0, prior_scale) (the last gate row is 0),
        ``expert_weights`` (K, d_x) ~ Normal(0, prior_scale), ``noise_scale`` (K,) or (1,)
        ~ HalfNormal(prior_scale) for linear experts; in plate ``"data"`` (which takes
        ``subsample_size``) ``assignment`` ~ Categorical(gate), enumerated in parallel, and
        ``obs``. With ``collapsed=True`` the assignment is summed out inside ``obs``
        (``MixtureSameFamily``): no discrete site, the fast choice for NUTS.
        """
        xe, xg = _design_matrices(self, x, gate_x, self._model_dtype(x))
        yt = None if y is None else _check_targets(self.expert, y, xe.shape[0], xe)
        return moe_model(self, xe, xg, yt, collapsed=collapsed, subsample_size=subsample_size)

    def _work(self, x) -> float:
        """Multiply-adds of one pass over the data (for the thread count)."""
        shape = getattr(x, "shape", None)
        return math.prod(shape) * self.num_experts if shape is not None else math.inf

    def _model_dtype(self, x):
        if self.fitted:
            return self.expert_weights.dtype
        t = as_tensor(x, "x")
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.get_default_dtype()

    def init_values(self) -> dict[str, torch.Tensor]:
        """The EM estimate as constrained values of the Pyro model's sites (for
        ``init_to_value``)."""
        p = self._params()
        out = {"expert_weights": p["experts"]}
        if self.num_experts > 1:
            out["gate_weights"] = p["gate"][:-1]
        if self.expert == "linear":
            out["noise_scale"] = p["scale"] if self.noise == "expert" else p["scale"][:1]
        return out

    def init_strategy(self):
        """``init_to_value`` at the EM estimate (other sites: ``init_to_median``)."""
        from pyro.infer.autoguide import init_to_value

        return init_to_value(values=self.init_values())

    def _bound(self, x, y, gate_x, collapsed, subsample_size=None):
        def bound():
            return self.model(x, y, gate_x, collapsed=collapsed, subsample_size=subsample_size)
        return bound

    @keyword_options
    def fit_svi(self, x, y, gate_x=None, *, guide: str = "normal", num_steps: int = 1000,
                lr: float = 0.01, collapsed: bool = True, subsample_size: int | None = None,
                init_scale: float = 0.01, seed=None, progress: bool | None = None
                ) -> list[float]:
        """SVI started at the EM estimate (fit first); returns the losses (-ELBO).

        ``guide`` is ``"normal"``, ``"lowrank"``, ``"mvn"`` or ``"delta"`` (see
        :meth:`pyro_softmix.SoftmaxMixtureModel.fit_svi`); the guide is kept as :attr:`guide`.
        """
        from .infer import run_svi

        self._params()
        model = self._bound(x, y, gate_x, bool(collapsed), subsample_size)
        self.guide, self.svi_losses = run_svi(model, self.init_strategy(), guide, num_steps, lr,
                                              enumerated=not collapsed, init_scale=init_scale,
                                              seed=seed, progress=progress,
                                              work=self._work(x))
        return self.svi_losses

    @keyword_options
    def fit_mcmc(self, x, y, gate_x=None, *, num_samples: int = 500, warmup_steps: int = 500,
                 num_chains: int = 1, collapsed: bool = True, seed=None,
                 progress: bool | None = None, **nuts_options):
        """NUTS started at the EM estimate (fit first); returns (and keeps as :attr:`mcmc`)
        the ``MCMC`` object. ``nuts_options`` go to ``NUTS``."""
        from .infer import run_nuts

        self._params()
        model = self._bound(x, y, gate_x, bool(collapsed))
        self.mcmc = run_nuts(model, self.init_strategy(), num_samples, warmup_steps, num_chains,
                             seed=seed, progress=progress, work=self._work(x),
                             **nuts_options)
        return self.mcmc


def moe_model(spec, xe: torch.Tensor, xg: torch.Tensor, y: torch.Tensor | None, *,
              collapsed: bool = False, subsample_size: int | None = None):
    """The Pyro model of :meth:`MixtureOfExperts.model` on checked design matrices (with their
    intercept columns) and targets (None: generate)."""
    n, k = xe.shape[0], spec.num_experts
    loc = xe.new_zeros(())
    scale = xe.new_tensor(spec.prior_scale)
    experts = pyro.sample("expert_weights",
                          dist.Normal(loc, scale).expand([k, xe.shape[1]]).to_event(2))
    if k > 1:
        gate = pyro.sample("gate_weights",
                           dist.Normal(loc, scale).expand([k - 1, xg.shape[1]]).to_event(2))
        gate = torch.cat([gate, gate.new_zeros(1, xg.shape[1])])
    else:
        gate = xg.new_zeros(1, xg.shape[1])
    noise = None
    if spec.expert == "linear":
        size = k if spec.noise == "expert" else 1
        noise = pyro.sample("noise_scale", dist.HalfNormal(scale).expand([size]).to_event(1))
    with pyro.plate("data", n, subsample_size=subsample_size) as idx:
        logits = xg[idx] @ gate.T
        eta = xe[idx] @ experts.T
        obs = None if y is None else y[idx]
        if collapsed:
            comp = (dist.Normal(eta, noise.expand(k)) if noise is not None
                    else dist.Bernoulli(logits=eta))
            return pyro.sample("obs", dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                                             comp), obs=obs)
        z = pyro.sample("assignment", dist.Categorical(logits=logits),
                        infer={"enumerate": "parallel"})
        mean = Vindex(eta)[torch.arange(eta.shape[0], device=eta.device), z]
        if noise is not None:
            sd = Vindex(noise.expand(k))[z]
            return pyro.sample("obs", dist.Normal(mean, sd), obs=obs)
        return pyro.sample("obs", dist.Bernoulli(logits=mean), obs=obs)


def load_moe(path: str | os.PathLike) -> MixtureOfExperts:
    """Load a :class:`MixtureOfExperts` written by :meth:`MixtureOfExperts.save`.

    Every field is checked (see :func:`~pyro_softmix.load_fit`): a damaged or foreign file
    raises :class:`~pyro_softmix.FileFormatError` naming the file and the field.
    """
    f = FileReader(path, MOE_FORMAT, "MoE")
    config = {k: f.meta.get(k) for k in MixtureOfExperts._CONFIG}
    try:
        obj = MixtureOfExperts(**config)
    except (TypeError, ValueError) as e:
        raise f.error("the configuration", f"is invalid ({e})") from None
    for k, kind in zip(MixtureOfExperts._STATE, (float, float, int, bool, float, str, str, int),
                       strict=True):
        setattr(obj, k, f.value(k, kind if kind is not float else (float, int)))
    if obj.method not in METHODS:
        raise f.error("field 'method'", f"must be one of {METHODS}, got {obj.method!r}")
    k = obj.num_experts
    experts = f.array("expert_weights", (k, None))
    gate = f.array("gate_weights", (k, None))
    if (gate[-1] != 0).any():
        raise f.error("array 'gate_weights'", "must have a last row of zeros")
    if obj.expert == "linear":
        noise = f.array("noise_scale", (k,))
        if (noise <= 0).any():
            raise f.error("array 'noise_scale'", "must be positive")
        obj.noise_scale = torch.from_numpy(noise)
    obj.gate_weights, obj.expert_weights = torch.from_numpy(gate), torch.from_numpy(experts)
    obj.history = f.array("history", (obj.n_iter + 1,), finite=False).tolist()
    obj.times = f.array("times", (obj.n_iter + 1,)).tolist()
    return obj
