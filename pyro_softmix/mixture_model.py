# SPDX-License-Identifier: Apache-2.0
"""``SoftmaxMixtureModel``: the Pyro model object that owns its inference (EM, SVI, NUTS)."""

from __future__ import annotations

import time
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, Predictive, infer_discrete
from pyro.infer.autoguide import AutoGuide

from ._checks import (
    as_tensor,
    check_counts,
    check_features,
    check_num_components,
    check_offset,
    check_positive_float,
    keyword_options,
    resolve_dtype,
)
from ._logprob import component_log_probs, log_weights
from .em import fit_em
from .infer import check_nuts_options, check_svi_options, init_to_em, run_nuts, run_svi
from .membership import check_group_features
from .models import collapsed_model, count_matrix, enumerated_model, expand_counts, pad_groups
from .results import SoftmaxMixtureFit

__all__ = ["SoftmaxMixtureModel"]


def _data_forms(x: torch.Tensor, tokens, counts, groups, group_features) -> dict[str, Any]:
    """The data checked once, as given and in the forms each model needs (counts or a count
    matrix for the collapsed model, tokens or padded groups for the enumerated one)."""
    if groups is None:
        if group_features is not None:
            raise ValueError("group_features= needs grouped data (groups=)")
        n = check_counts(counts, tokens, x.shape[0])
        tok = None if tokens is None else as_tensor(tokens, "tokens").long()
        return dict(given=dict(tokens=tokens, counts=counts, groups=None),
                    collapsed={"counts": n.to(device=x.device, dtype=x.dtype)},
                    enumerated=None if tok is None else {"tokens": tok})
    matrix = count_matrix(groups, counts, tokens, x)
    padded = None if tokens is None else pad_groups(tokens, groups)[0]
    extra = {}
    if group_features is not None:
        extra["group_features"] = check_group_features(group_features, matrix.shape[0]).to(x)
    return dict(given=dict(tokens=tokens, counts=counts, groups=groups, **extra),
                collapsed={"groups": matrix, **extra},
                enumerated=None if padded is None else {"tokens": padded, **extra})


class SoftmaxMixtureModel:
    """A softmax mixture as a Pyro model, with EM, SVI and NUTS fitting (one data set at a time).

    The model (site names ``"weights"``, ``"atoms"``, ``"assignment"``, ``"obs"``)::

        weights ~ Dirichlet(concentration * ones(K));   atoms ~ atoms_prior  (K, L)
        obs: draws from sum_k weights_k softmax(X atoms_k + b)   (assignment enumerated or summed)

    In the style of ``pyro.contrib.epidemiology.CompartmentalModel``: the fit methods take the
    data once, remember it, and keep their results as attributes (:attr:`em_fit`,
    :attr:`guide` and :attr:`svi_losses`, :attr:`mcmc`), which :meth:`predictive`,
    :meth:`to_arviz` and :func:`~pyro_softmix.compare_fits` then use.

    Args:
        features: (p, L) support-point features X.
        num_components: K.
        concentration: Dirichlet concentration of the weights prior (1: uniform on the simplex).
        prior_scale: scale of the default Normal prior on the atoms, per unit standard
            deviation of each feature (see :func:`~pyro_softmix.models.default_atoms_prior`).
        atoms_prior, weights_prior: distributions replacing the defaults.
        dtype: float dtype of the model (default: the features' dtype if float64/float32).
        offset: (p,) known offset b of every component's logits (default: none); every fit,
            model and diagnostic of this object uses it.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=200, num_features=2, num_components=2,
        ...                     num_obs=500, seed=0)
        >>> sm = psm.SoftmaxMixtureModel(data.features, num_components=2)
        >>> fit = sm.fit_em(counts=data.counts, seed=0)                 # point estimate
        >>> mcmc = sm.fit_mcmc(num_samples=30, warmup_steps=30, seed=0) # NUTS from EM
        >>> idata = sm.to_arviz()                                       # ArviZ diagnostics
        >>> sorted(idata.posterior.data_vars)
        ['atoms', 'weights']
    """

    def __init__(self, features, num_components: int, *, concentration: float = 1.0,
                 prior_scale: float = 5.0, atoms_prior=None, weights_prior=None, dtype=None,
                 offset=None):
        x = check_features(features)
        x = x.to(resolve_dtype(dtype, x))
        self.features = x
        self.offset = check_offset(offset, x.shape[0], like=x)
        self.num_components = check_num_components(num_components, x.shape[0])
        self.concentration = check_positive_float(concentration, "concentration")
        self.prior_scale = check_positive_float(prior_scale, "prior_scale")
        self.atoms_prior = atoms_prior
        self.weights_prior = weights_prior
        self.em_fit: SoftmaxMixtureFit | None = None
        self.guide: AutoGuide | None = None
        self.svi_losses: list[float] | None = None
        self.svi_seconds = 0.0
        self.mcmc: MCMC | None = None
        self.mcmc_seconds = 0.0
        self._data: dict[str, Any] | None = None
        self._collapsed = True

    # -- the model -------------------------------------------------------------------------
    def _priors(self) -> dict[str, Any]:
        return dict(weights_prior=self.weights_prior, atoms_prior=self.atoms_prior,
                    concentration=self.concentration, prior_scale=self.prior_scale,
                    offset=self.offset)

    def model(self, tokens=None, counts=None, groups=None, *, num_obs=None,
              subsample_size: int | None = None, collapsed: bool | None = None,
              validate: bool = True, group_features=None):
        """The Pyro model on the given data (composable; see :mod:`pyro_softmix.models`).

        Args:
            tokens: (N,) draws, or (G, T) padded groups; counts: (p,) counts; groups: (N,) ids
                with ``tokens`` or a (G, p) count matrix. None of them: generate ``num_obs``.
            collapsed: use :func:`~pyro_softmix.models.collapsed_model` (default when the data
                are counts) or :func:`~pyro_softmix.models.enumerated_model` (default for
                tokens and for generation).
            subsample_size: minibatch size of the data plate (enumerated) or groups plate.
            group_features: (G, d) covariates of the groups: class shares softmax(Gamma c_g)
                (a ``"membership_coef"`` site) instead of shared ``"weights"``.
        """
        if collapsed is None:
            collapsed = tokens is None and (counts is not None or groups is not None)
        if collapsed:
            return collapsed_model(self.features, self.num_components, counts, tokens=tokens,
                                   groups=groups, num_obs=num_obs, subsample_size=subsample_size,
                                   validate=validate, group_features=group_features,
                                   **self._priors())
        if counts is not None or (groups is not None and as_tensor(groups, "groups").dim() == 2):
            tokens, groups = expand_counts(counts, groups, self.features.shape[0])
        return enumerated_model(self.features, self.num_components, tokens, groups=groups,
                                num_obs=num_obs, subsample_size=subsample_size,
                                validate=validate, group_features=group_features,
                                **self._priors())

    # -- data ------------------------------------------------------------------------------
    def set_data(self, tokens=None, counts=None, groups=None, group_features=None) -> None:
        """Give the model its data (done by the fit methods); drops results of earlier data.

        Validates once, and keeps the forms each model needs (counts or a count matrix for
        the collapsed model, tokens or padded groups for the enumerated one; see
        :meth:`model_kwargs`). With no arguments, keeps the current data.
        """
        if tokens is None and counts is None and groups is None:
            if group_features is not None:
                raise ValueError("group_features= comes with the grouped data (groups=)")
            if self._data is None:
                raise ValueError("no data: pass tokens=, counts= or groups=")
            return
        self._data = _data_forms(self.features, tokens, counts, groups, group_features)
        self.em_fit = None  # new data: earlier fits no longer apply
        self.guide, self.svi_losses, self.mcmc = None, None, None

    def data_kwargs(self) -> dict[str, Any]:
        """The current data as ``tokens``/``counts``/``groups`` keywords (as given)."""
        if self._data is None:
            raise ValueError("no data yet: call a fit method with data first")
        return {k: v for k, v in self._data["given"].items() if v is not None}

    def model_kwargs(self, collapsed: bool | None = None) -> dict[str, Any]:
        """Keywords for :meth:`model` on the current (checked) data."""
        if self._data is None:
            raise ValueError("no data yet: call a fit method with data first")
        collapsed = self._collapsed if collapsed is None else collapsed
        if collapsed:
            return dict(self._data["collapsed"], collapsed=True, validate=False)
        enum = self._data["enumerated"]
        if enum is None:  # counts only: expand them into draws
            c = self._data["collapsed"]
            tokens, groups = expand_counts(c.get("counts"), c.get("groups"),
                                            self.features.shape[0])
            enum = {"tokens": tokens if groups is None else pad_groups(tokens, groups)[0]}
            if "group_features" in c:
                enum["group_features"] = c["group_features"]
            self._data["enumerated"] = enum
        return dict(enum, collapsed=False, validate=False)

    def _bound_model(self, collapsed: bool, subsample_size=None):
        kwargs = self.model_kwargs(collapsed)
        if subsample_size is not None:
            kwargs["subsample_size"] = subsample_size

        def bound():
            return self.model(**kwargs)
        return bound

    # -- inference -------------------------------------------------------------------------
    @keyword_options
    def fit_em(self, tokens=None, counts=None, groups=None, **options) -> SoftmaxMixtureFit:
        """Maximum-likelihood fit by EM (:func:`~pyro_softmix.fit_em`); stored as :attr:`em_fit`.

        ``options`` go to :func:`~pyro_softmix.fit_em` (``init``, ``seed``, ``max_iter``, ...);
        ``group_features`` (G, d) are covariates of the groups (class membership on them).
        """
        self.set_data(tokens, counts, groups, options.pop("group_features", None))
        if "offset" in options:
            raise TypeError("fit_em() got offset=: the model's offset is set when it is made "
                            "(SoftmaxMixtureModel(..., offset=b))")
        self.em_fit = fit_em(self.features, num_components=self.num_components,
                             **self.data_kwargs(), offset=self.offset, **options)
        return self.em_fit

    def _init_strategy(self, init, em_options):
        if isinstance(init, str):
            if init != "em":
                raise ValueError(f"init must be 'em' or a fit/mapping with weights and atoms, "
                                 f"got {init!r}")
            if self.em_fit is None:
                self.fit_em(**(em_options or {}))
            return init_to_em(self.em_fit)
        return init_to_em(init)

    @keyword_options
    def fit_svi(self, tokens=None, counts=None, groups=None, *, init: Any = "em",
                guide: str | AutoGuide = "normal", num_steps: int = 1000, lr: float = 0.01,
                collapsed: bool = True, subsample_size: int | None = None,
                num_particles: int = 1, init_scale: float = 0.01, seed=None,
                progress: bool | None = None, em_options: dict | None = None,
                group_features=None) -> list[float]:
        """Variational fit by SVI, started at the EM solution; returns the losses (-ELBO).

        Args:
            init: ``"em"`` (the stored EM fit, fitted first if missing) or a fit/mapping.
            guide: ``"normal"`` (AutoNormal), ``"lowrank"`` (AutoLowRankMultivariateNormal),
                ``"mvn"`` (AutoMultivariateNormal), ``"delta"`` (AutoDelta, MAP), or an autoguide
                built over ``poutine.block(model, hide=["assignment"])``.
            num_steps, lr: Adam steps and learning rate.
            collapsed: the collapsed model (exact, O(p K L) per step; default) or the enumerated
                one with ``TraceEnum_ELBO`` (O(N K), minibatches by ``subsample_size``).
            init_scale: initial scale of the Normal guides around the EM solution.
            seed: seeds Pyro's global random state (an int or a ``torch.Generator``); None
                (default) leaves it as it is.

        The guide and the losses are stored as :attr:`guide` and :attr:`svi_losses`.
        """
        check_svi_options(guide, num_steps, lr, seed)  # before EM runs
        self.set_data(tokens, counts, groups, group_features)
        start = time.perf_counter()
        strategy = self._init_strategy(init, em_options)
        self._collapsed = bool(collapsed)
        model = self._bound_model(self._collapsed, subsample_size)
        guide, losses = run_svi(model, strategy, guide, num_steps, lr,
                                 enumerated=not self._collapsed, num_particles=num_particles,
                                init_scale=init_scale, seed=seed, progress=progress,
                                work=self._work())
        self.guide, self.svi_losses = guide, losses
        self.svi_seconds = time.perf_counter() - start
        return losses

    @keyword_options
    def fit_mcmc(self, tokens=None, counts=None, groups=None, *, init: Any = "em",
                 num_samples: int = 500, warmup_steps: int = 500, num_chains: int = 1,
                 collapsed: bool = True, seed=None, progress: bool | None = None,
                 em_options: dict | None = None, group_features=None, **nuts_options) -> MCMC:
        """NUTS started at the EM solution; returns (and stores as :attr:`mcmc`) the ``MCMC``.

        Args:
            init: ``"em"`` or a fit/mapping (see :meth:`fit_svi`).
            collapsed: sample the collapsed model (default; cost independent of N) or the
                enumerated one (the assignment summed out by Pyro's enumeration).
            num_chains: chains; Pyro runs them in parallel processes when CPUs allow.
            progress: Pyro's progress bar (default: shown when stderr is a terminal).
            nuts_options: passed to ``NUTS`` (``target_accept_prob``, ``max_tree_depth``, ...).
        """
        check_nuts_options(num_samples, warmup_steps, num_chains, seed)  # before EM runs
        self.set_data(tokens, counts, groups, group_features)
        start = time.perf_counter()
        strategy = self._init_strategy(init, em_options)
        self._collapsed = bool(collapsed)
        mcmc = run_nuts(self._bound_model(self._collapsed), strategy, num_samples, warmup_steps,
                        num_chains, seed=seed, progress=progress, work=self._work(),
                        **nuts_options)
        self.mcmc = mcmc
        self.mcmc_seconds = time.perf_counter() - start
        return mcmc

    def _work(self) -> float:
        """Multiply-adds of one evaluation of the collapsed model (for the thread count)."""
        return float(self.features.numel() * self.num_components)

    # -- after fitting ---------------------------------------------------------------------
    def _params(self, params) -> dict[str, torch.Tensor]:
        if params is None:
            if self.em_fit is None:
                raise ValueError("no EM fit: call fit_em(...) or pass params=")
            params = self.em_fit
        if hasattr(params, "weights"):
            params = {"weights": params.weights, "atoms": params.atoms}
        return {k: torch.as_tensor(params[k]).to(self.features) for k in ("weights", "atoms")}

    def infer_assignments(self, tokens=None, groups=None, *, params=None, sample: bool = False,
                          temperature: int = 1):
        """Posterior component of each observation (or group) at given parameter values.

        Args:
            tokens, groups: the observations (default: the stored data, which must be tokens).
            params: a fit or mapping with ``weights`` and ``atoms`` (default: :attr:`em_fit`).
            sample: False: return (N, K) (or (G, K)) responsibilities P(assignment | obs).
                True: return assignments drawn by Pyro's ``infer_discrete`` (temperature 1) or
                the MAP assignment (``temperature=0``).
        """
        if tokens is None:
            enum = self.model_kwargs(collapsed=False)
            tok = enum["tokens"]
        else:
            tok = as_tensor(tokens, "tokens").long()
            if groups is not None:
                tok = pad_groups(tok, groups)[0]
            elif tok.dim() == 1:
                check_counts(None, tok, self.features.shape[0])
        values = self._params(params)
        if not sample:
            comp = component_log_probs(self.features, values["atoms"], self.offset)  # (K, p)
            log_w = log_weights(values["weights"])
            if tok.dim() == 2:
                per = torch.where(tok[..., None] >= 0, comp.T[tok.clamp_min(0)], 0.0).sum(1)
                return torch.softmax(per + log_w, -1)
            return torch.softmax(comp.T[tok] + log_w, -1)
        conditioned = poutine.condition(self.model, data=values)
        discrete = infer_discrete(conditioned, first_available_dim=-2, temperature=temperature)
        trace = poutine.trace(discrete).get_trace(tokens=tok, collapsed=False, validate=False)
        return trace.nodes["assignment"]["value"]

    def posterior_samples(self, source: str = "auto", num_samples: int = 1000,
                          relabel: bool = True) -> dict[str, torch.Tensor]:
        """Draws of ``weights`` and ``atoms`` from NUTS, the SVI guide or (repeated) EM.

        ``source="auto"`` prefers NUTS, then SVI, then EM. Draws are relabelled against the
        EM fit when there is one.
        """
        if source == "auto":
            source = "mcmc" if self.mcmc is not None else "svi" if self.guide is not None else "em"
        if source == "mcmc":
            if self.mcmc is None:
                raise ValueError("no MCMC run: call fit_mcmc(...) first")
            s = self.mcmc.get_samples()
            out = {"weights": s["weights"], "atoms": s["atoms"]}
        elif source == "svi":
            if self.guide is None:
                raise ValueError("no SVI guide: call fit_svi(...) first")
            with torch.no_grad():
                draws = [self.guide(**self.model_kwargs()) for _ in range(num_samples)]
            out = {k: torch.stack([d[k] for d in draws]) for k in ("weights", "atoms")}
        elif source == "em":
            v = self._params(None)
            out = {k: v[k].expand((num_samples,) + v[k].shape) for k in v}
        else:
            raise ValueError(f"source must be 'auto', 'mcmc', 'svi' or 'em', got {source!r}")
        if relabel and self.em_fit is not None and source != "em":
            from .diagnostics import relabel_samples

            out = relabel_samples(out, self.em_fit)
        return out

    def predictive(self, num_samples: int = 100, *, source: str = "auto",
                   num_obs: float | None = None, collapsed: bool = True) -> dict[str, torch.Tensor]:
        """Posterior predictive draws: ``obs`` (counts, or tokens with ``collapsed=False``).

        Parameter draws come from :meth:`posterior_samples` (``source``); ``num_obs`` defaults
        to the size of the stored data (N).
        """
        draws = self.posterior_samples(source, num_samples)
        n = draws["weights"].shape[0]
        if num_obs is None:
            if self._data is None:
                raise ValueError("pass num_obs= (no stored data)")
            c = self._data["collapsed"]
            num_obs = float((c["counts"] if "counts" in c else c["groups"]).sum())
        pred = Predictive(self.model, posterior_samples=draws, num_samples=n,
                          return_sites=["weights", "atoms", "obs"])
        kw = {"num_obs": num_obs, "collapsed": collapsed}
        if not collapsed:
            kw["num_obs"] = int(round(num_obs))
        return pred(**kw)

    def to_arviz(self, *, log_likelihood: bool = True, units: str = "auto",
                 max_size: int = 50_000_000):
        """The NUTS draws as ArviZ data, relabelled against EM, with the pointwise
        log-likelihood (see :func:`pyro_softmix.to_arviz` for ``units`` and ``max_size``;
        :func:`pyro_softmix.loo` reads either form)."""
        from .arviz_bridge import to_arviz

        if self.mcmc is None:
            raise ValueError("no MCMC run: call fit_mcmc(...) first")
        data = self.data_kwargs() if log_likelihood else {}
        return to_arviz(self.mcmc, features=self.features if log_likelihood else None,
                        reference=self.em_fit, log_likelihood=log_likelihood, units=units,
                        max_size=max_size, offset=self.offset, **data)

