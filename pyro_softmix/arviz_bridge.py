# SPDX-License-Identifier: Apache-2.0
"""Posterior draws as ArviZ data, for ArviZ 0.x and 1.x, and LOO on counts.

ArviZ is imported lazily. Both majors are supported; where they differ:

================================  ==================================  ==================================
                                  ArviZ 0.x (0.23, Python 3.11)       ArviZ 1.x (Python 3.12+)
================================  ==================================  ==================================
container                         ``InferenceData``                   ``xarray.DataTree``
``from_dict``                     ``from_dict(posterior=..., ...)``   ``from_dict({"posterior": ...})``
``az.loo``, ``az.compare``        yes                                 yes (needs 25+ draws)
``az.compare``'s ``elpd_diff``    positive for worse models           negative for worse models
``az.loo``'s ``se``               ``sqrt(n var(elpd_i))``             with ``var``'s ``ddof=1``
``az.summary`` intervals          ``hdi_3%``, ``hdi_97%``             ``eti89_lb``, ``eti89_ub``
``az.ess`` tail                   5% and 95% quantiles                11% and 89% quantiles
``az.waic``                       yes                                 no (use ``az.loo``)
``az.from_pyro``                  yes (drops enumerated sites'        no Pyro converter: use
                                  log-likelihood)                     :func:`to_arviz`
plots                             ``az.plot_*`` (matplotlib)          ``arviz_plots`` via ``az.plot_*``
saving (``to_netcdf``)            built in                            ``pip install h5netcdf``
                                                                      (the ``[arviz]`` extra)
================================  ==================================  ==================================
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .diagnostics import chain_samples, pointwise_counts, pointwise_log_likelihood

__all__ = ["LooResult", "loo", "to_arviz"]


def arviz_major() -> int:
    import arviz as az

    return int(az.__version__.split(".")[0])


def to_arviz(samples, *, features=None, tokens=None, counts=None, groups=None,
             num_chains: int | None = None, reference=None, log_likelihood: bool = True,
             units: str = "auto", max_size: int = 50_000_000, var_names=("weights", "atoms"),
             offset=None):
    """Posterior draws as ArviZ data (``InferenceData`` in ArviZ 0.x, ``DataTree`` in 1.x).

    Args:
        samples: a Pyro ``MCMC`` (draws grouped by chain) or a dict of draws, either
            (chains, draws, ...) or, with ``num_chains``, flat (chains * draws, ...).
        features, tokens / counts / groups: the data, to add the marginal pointwise
            ``log_likelihood`` (see :func:`~pyro_softmix.diagnostics.pointwise_log_likelihood`).
            Omit ``features`` or pass ``log_likelihood=False`` to skip it.
        num_chains: see ``samples``; for a dict without it, a single chain is assumed.
        reference: relabel the draws against this fit first (see :func:`relabel_samples`).
        units: the log-likelihood's columns: ``"draws"`` (one per draw of Y, or per group:
            what ``az.loo`` and ``az.compare`` read), ``"points"`` (one per support point with
            a draw, its count in ``constant_data["obs_count"]``: read it with
            :func:`~pyro_softmix.loo`, which gives the same result as ``"draws"`` at P/N of
            the cost), or ``"auto"`` (default): ``"draws"`` when draws x N is at most
            ``max_size`` values, else ``"points"``.
        max_size: the largest log-likelihood table (draws x units) to build.
        var_names: the sites to convert.
        offset: the (p,) known offset of the logits, if the model has one.

    Returns:
        ArviZ data with groups ``posterior`` (dims ``component``, ``feature``) and, when
        requested, ``log_likelihood`` (variable ``obs``, dim ``obs_id``). Save it with
        ``.to_netcdf(path)`` (ArviZ 1.x needs ``h5netcdf``: ``pip install "pyro-softmix[arviz]"``).

    Example:
        >>> import pyro_softmix as psm
        >>> import torch
        >>> draws = {"weights": torch.full((2, 30, 2), 0.5), "atoms": torch.zeros(2, 30, 2, 3)}
        >>> x = torch.randn(10, 3)
        >>> data = psm.to_arviz(draws, features=x, counts=torch.arange(10.0))
        >>> sorted(data.posterior.data_vars), tuple(data.log_likelihood["obs"].shape)
        (['atoms', 'weights'], (2, 30, 45))
    """
    import arviz as az

    if units not in ("auto", "draws", "points"):
        raise ValueError(f"units must be 'auto', 'draws' or 'points', got {units!r}")
    samples = chain_samples(samples, num_chains, reference, var_names)
    posterior = {k: v.detach().cpu().numpy() for k, v in samples.items()}
    dims = {"weights": ["component"], "atoms": ["component", "feature"]}
    out: dict[str, dict[str, np.ndarray]] = {"posterior": posterior}
    coords = {}
    if log_likelihood and features is not None:
        c, d = posterior["weights"].shape[:2]
        support = n = None
        if groups is None and units != "draws":
            support, n = pointwise_counts(torch.as_tensor(features).shape[0], counts=counts,
                                          tokens=tokens)
        if units == "auto":
            units = "draws" if n is None or c * d * float(n.sum()) <= max_size else "points"
        atoms = samples["atoms"].reshape(c * d, *samples["atoms"].shape[-2:])
        ll = pointwise_log_likelihood(features, atoms, samples["weights"].reshape(c * d, -1),
                                      tokens=tokens, counts=counts, groups=groups, units=units,
                                      max_size=max_size, offset=offset)
        out["log_likelihood"] = {"obs": ll.reshape(c, d, -1).numpy()}
        dims["obs"] = ["obs_id"]
        if units == "points":
            out["constant_data"] = {"obs_count": n.numpy()}
            dims["obs_count"] = ["obs_id"]
            coords["obs_id"] = support.numpy()
    if arviz_major() >= 1:
        return az.from_dict(out, dims=dims, coords=coords or None)
    return az.from_dict(**out, dims=dims, coords=coords or None)


@dataclass
class LooResult:
    """Pareto-smoothed importance-sampling LOO over the draws of Y (or the groups).

    Attributes:
        elpd: expected log pointwise predictive density (the sum over units).
        se: its standard error (ArviZ's convention of the installed major).
        p: the effective number of parameters (lppd - elpd).
        num_units: units left out one at a time (N draws, or G groups).
        pareto_k: (units or points,) Pareto k of each column (the draws at one support point
            share one).
        counts: (points,) each column's number of draws, or None (one per column).
        warning: whether some Pareto k exceeds ArviZ's threshold for reliable estimates.
        arviz: ArviZ's own result (over the columns).
    """

    elpd: float
    se: float
    p: float
    num_units: float
    pareto_k: np.ndarray
    counts: np.ndarray | None
    warning: bool
    arviz: object

    def __str__(self) -> str:
        bad = int((self.pareto_k > 0.7).sum())
        return (f"LOO over {self.num_units:,.0f} units: elpd {self.elpd:.2f} (se {self.se:.2f}), "
                f"p {self.p:.2f}; Pareto k > 0.7 in {bad} of {self.pareto_k.size} columns")


def loo(data, **loo_options) -> LooResult:
    """PSIS-LOO of ArviZ data from :func:`to_arviz`, in either units, on either ArviZ major.

    With ``units="points"`` every draw at a support point has the same log-likelihood column,
    so ArviZ runs on the P columns and each column's pointwise results count as many times as
    it has draws: the same ``elpd``, ``se`` and ``p`` as ``az.loo`` on the N columns of
    ``units="draws"``, at P/N of the cost (N = 10^6 draws rarely have more than 10^4 distinct
    points). ``loo_options`` go to ``az.loo``.

    Example:
        >>> import pyro_softmix as psm
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> draws = {"weights": torch.softmax(torch.randn(1, 40, 2, generator=g), -1),
        ...          "atoms": torch.randn(1, 40, 2, 3, generator=g)}
        >>> x, n = torch.randn(10, 3, generator=g), torch.arange(10.0)
        >>> a = psm.loo(psm.to_arviz(draws, features=x, counts=n, units="draws"))
        >>> b = psm.loo(psm.to_arviz(draws, features=x, counts=n, units="points"))
        >>> abs(a.elpd - b.elpd) < 1e-9, a.num_units == b.num_units == 45
        (True, True)
    """
    import arviz as az
    from scipy.special import logsumexp

    major = arviz_major()
    with warnings.catch_warnings():  # ArviZ's Pareto-k warning: reported in ``warning``
        warnings.simplefilter("ignore", UserWarning)
        res = az.loo(data, pointwise=True, **loo_options)
    if major >= 1:
        elpd_i, pareto_k = res.elpd_i.values.reshape(-1), res.pareto_k.values.reshape(-1)
        warning = bool(res.warning)
    else:
        elpd_i, pareto_k = res.loo_i.values.reshape(-1), res.pareto_k.values.reshape(-1)
        warning = bool(res.warning)
    ll = data.log_likelihood["obs"]
    ll = ll.transpose(*[d for d in ll.dims if d != "obs_id"], "obs_id").values
    ll = ll.reshape(-1, ll.shape[-1])
    lppd_i = logsumexp(ll, axis=0) - math.log(ll.shape[0])
    counts = None
    if "constant_data" in data.children if major >= 1 else hasattr(data, "constant_data"):
        constant = data["constant_data"] if major >= 1 else data.constant_data
        if "obs_count" in constant:
            counts = np.asarray(constant["obs_count"].values, dtype=np.float64).reshape(-1)
    n = np.ones_like(elpd_i) if counts is None else counts
    units = float(n.sum())
    elpd = float(n @ elpd_i)
    spread = float(n @ (elpd_i - elpd / units) ** 2)  # sum over units of squared deviations
    se = math.sqrt(spread * (units / (units - 1) if major >= 1 else 1.0))
    return LooResult(elpd=elpd, se=se, p=float(n @ lppd_i) - elpd, num_units=units,
                     pareto_k=pareto_k, counts=counts, warning=warning, arviz=res)
