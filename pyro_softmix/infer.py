# SPDX-License-Identifier: Apache-2.0
"""EM inside Pyro: an inference object shaped like ``pyro.infer.SVI``, and init strategies.

:class:`EM` runs the EM of :func:`~pyro_softmix.fit_em` one iteration per :meth:`EM.step` and
keeps its point estimate in Pyro's param store through an :class:`~pyro.infer.autoguide.AutoDelta`
guide, so ``Predictive(model, guide=em.guide)`` and ``em.guide.median()`` work as after SVI.

:func:`init_to_em` starts autoguides and ``NUTS`` at an EM solution. ``MCMC`` also accepts
starting points directly through ``initial_params``, which must be *unconstrained*: see
:func:`em_initial_params`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)

from ._checks import check_positive_float, check_positive_int, check_seed, seed_global
from ._chunks import thread_budget
from ._moves import finish
from .em import DEFAULT_MAX_ITER, prepare_fit
from .results import SoftmaxMixtureFit, make_fit
from .stopping import StoppingRule, default_tol, progress_bar, show_progress
from .warmstart import check_init

__all__ = ["EM", "em_initial_params", "init_to_em"]


def _em_values(fit) -> dict[str, torch.Tensor]:
    if isinstance(fit, Mapping):
        if not {"weights", "atoms"} <= set(fit):
            raise ValueError("init_to_em: a mapping needs keys 'weights' and 'atoms'")
        return {"weights": torch.as_tensor(fit["weights"]), "atoms": torch.as_tensor(fit["atoms"])}
    if not (hasattr(fit, "weights") and hasattr(fit, "atoms")):
        raise TypeError(f"init_to_em needs a fit (with .weights and .atoms) or a mapping, got "
                        f"{type(fit).__name__}")
    values = {"weights": fit.weights.detach(), "atoms": fit.atoms.detach()}
    gamma = getattr(fit, "membership_coef", None)
    if gamma is not None:  # the site holds the K - 1 free rows
        values["membership_coef"] = gamma.detach()[:-1]
    return values


def _init_to_em(site, values, fallback):
    ref = fallback(site)
    value = values.get(site["name"])
    if value is None:
        return ref
    if value.shape != ref.shape:
        raise ValueError(f"init_to_em: site {site['name']!r} has shape {tuple(ref.shape)} in the "
                         f"model but {tuple(value.shape)} in the fit")
    # A copy: a guide's parameter starts from this tensor and is then updated in place, which
    # must not change the fit it came from.
    return value.to(ref).clone()


def init_to_em(fit, *, fallback=init_to_median):
    """Init strategy that sets ``"weights"`` and ``"atoms"`` (and ``"membership_coef"``, the
    first K - 1 rows, for a fit with group covariates) to an EM solution.

    For autoguides (``init_loc_fn=``) and ``NUTS``/``HMC`` (``init_strategy=``). Values are
    *constrained* (weights on the simplex), cast to the model's dtype and device; other latent
    sites use ``fallback``.

    Args:
        fit: a :class:`~pyro_softmix.SoftmaxMixtureFit` (or anything with ``.weights`` (K,)
            and ``.atoms`` (K, L)), or a mapping with those keys.
        fallback: strategy for the other sites (default ``init_to_median``).

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=100, num_features=2, num_components=2,
        ...                     num_obs=2000, seed=0)
        >>> sm = psm.SoftmaxMixtureModel(data.features, num_components=2)
        >>> fit = sm.fit_em(counts=data.counts, seed=0)
        >>> kernel = NUTS(sm.model, init_strategy=init_to_em(fit))
        >>> guide = AutoNormal(sm.model, init_loc_fn=init_to_em(fit))
        >>> _ = guide(counts=data.counts)  # sets the guide up, at the EM fit
        >>> median = guide.median()
        >>> bool(torch.allclose(median["atoms"], fit.atoms, atol=1e-5))
        True
    """
    return functools.partial(_init_to_em, values=_em_values(fit), fallback=fallback)


def em_initial_params(fit, num_chains: int = 1) -> dict[str, torch.Tensor]:
    """The EM solution as *unconstrained* ``MCMC(initial_params=...)``.

    ``MCMC`` works on the unconstrained space, so the weights go through the inverse of
    ``biject_to(simplex)`` (stick-breaking); atoms are unconstrained already. With
    ``num_chains > 1`` a leading chain dimension is added (same start for every chain).
    """
    values = _em_values(fit)
    w = torch.distributions.biject_to(constraints.simplex).inv(values["weights"])
    out = {"weights": w, "atoms": values["atoms"].clone()}
    if "membership_coef" in values:  # class shares on covariates: no "weights" site
        out = {"atoms": out["atoms"], "membership_coef": values["membership_coef"].clone()}
    if num_chains > 1:
        out = {k: v.expand((num_chains,) + v.shape).clone() for k, v in out.items()}
    return out


_GUIDES = {"normal": AutoNormal, "lowrank": AutoLowRankMultivariateNormal,
           "mvn": AutoMultivariateNormal, "delta": AutoDelta}


def check_svi_options(guide, num_steps, lr, seed) -> int:
    """Check SVI's options before any work is done; returns ``num_steps``."""
    if isinstance(guide, str) and guide not in _GUIDES:
        raise ValueError(f"guide must be one of {sorted(_GUIDES)} or an AutoGuide, got {guide!r}")
    if not isinstance(guide, str) and not callable(guide):
        raise TypeError(f"guide must be a name or a guide, got {type(guide).__name__}")
    check_positive_float(lr, "lr")
    check_seed(seed)
    return check_positive_int(num_steps, "num_steps")


def check_nuts_options(num_samples, warmup_steps, num_chains, seed) -> tuple[int, int, int]:
    """Check NUTS's options before any work is done."""
    check_seed(seed)
    return (check_positive_int(num_samples, "num_samples"),
            check_positive_int(warmup_steps, "warmup_steps", minimum=0),
            check_positive_int(num_chains, "num_chains"))


def run_svi(model, strategy, guide, num_steps: int, lr: float, *, enumerated: bool,
            num_particles: int = 1, init_scale: float = 0.01, seed=None,
            progress: bool | None = None, work: float = math.inf):
    """Adam SVI on ``model`` with an autoguide started by ``strategy``; returns (guide, losses).

    ``guide`` is a name in ``_GUIDES`` (built over the model with ``"assignment"`` hidden) or a
    ready guide; ``enumerated`` selects ``TraceEnum_ELBO`` (the assignment summed out by
    enumeration) instead of ``Trace_ELBO``. ``work`` (multiply-adds per evaluation of the
    model) sets the threads (:func:`~pyro_softmix._chunks.choose_threads`).
    """
    num_steps = check_svi_options(guide, num_steps, lr, seed)
    seed_global(seed)
    if isinstance(guide, str):
        cls = _GUIDES[guide]
        kw = {} if cls is AutoDelta else {"init_scale": init_scale}
        guide = cls(poutine.block(model, hide=["assignment"]), init_loc_fn=strategy, **kw)
    loss = (TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles) if enumerated
            else Trace_ELBO(num_particles=num_particles))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss)
    losses = []
    bar = progress_bar(progress, num_steps, "SVI")
    with thread_budget(work):
        for _ in range(num_steps):
            losses.append(float(svi.step()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.6g}", refresh=False)
    if bar is not None:
        bar.close()
    return guide, losses


def run_nuts(model, strategy, num_samples: int, warmup_steps: int, num_chains: int, *,
             seed=None, progress: bool | None = None, work: float = math.inf,
             **nuts_options) -> MCMC:
    """NUTS on ``model`` started by ``strategy``; returns the run ``MCMC`` object (``work`` as
    in :func:`run_svi`; Pyro's progress bar shows when ``progress`` is True, or is None and
    stderr is a terminal)."""
    num_samples, warmup_steps, num_chains = check_nuts_options(num_samples, warmup_steps,
                                                               num_chains, seed)
    seed_global(seed)
    nuts_options.setdefault("max_plate_nesting", 1)
    kernel = NUTS(model, init_strategy=strategy, **nuts_options)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                num_chains=num_chains, disable_progbar=not show_progress(progress))
    with thread_budget(work):
        mcmc.run()
    return mcmc


def _mixture_object(model):
    """The SoftmaxMixtureModel behind ``model`` (the object or its bound ``.model``)."""
    obj = model if hasattr(model, "num_components") else getattr(model, "__self__", None)
    if obj is None or not hasattr(obj, "features") or not hasattr(obj, "num_components"):
        raise TypeError("EM needs a SoftmaxMixtureModel or its .model method, got "
                        f"{type(model).__name__}")
    return obj


class EM:
    """Expectation-maximisation with the loop shape of :class:`pyro.infer.SVI`.

    Each :meth:`step` runs one EM iteration (the first also chooses the start, see ``init``)
    and returns the loss, the negative log-likelihood -sum_j n_j log pi_j after the step; the
    loss never increases from one step to the next. The current estimate lives in the param
    store through :attr:`guide`, an :class:`~pyro.infer.autoguide.AutoDelta` over the
    ``"weights"`` and ``"atoms"`` sites, so code written for SVI keeps working::

        em = EM(sm.model)                     # instead of SVI(sm.model, guide, Adam(...), ELBO)
        for _ in range(200):
            loss = em.step(counts=counts)
        pred = Predictive(sm.model, guide=em.guide, num_samples=10)(num_obs=1000)

    EM maximises the likelihood; the model's priors are not used. Subsampling arguments are
    ignored (EM uses all the data, which costs O(p K L) per step on counts).

    Args:
        model: a :class:`~pyro_softmix.SoftmaxMixtureModel` or its ``.model`` method.
        guide: an ``AutoDelta`` to write the estimates into (default: a new one).
        init, num_inits, seed: how the first step starts (as in :func:`~pyro_softmix.fit_em`).
        tol: the stopping rule's tolerance, exposed as :attr:`converged`.
        dtype, device, chunk_size: as in :func:`~pyro_softmix.fit_em`.
    """

    def __init__(self, model, guide: AutoDelta | None = None, *, init: Any = "auto",
                 num_inits: int | None = None, seed=None, tol: float | None = None, dtype=None,
                 device=None, chunk_size: int | None = None):
        self.mixture = _mixture_object(model)
        if guide is not None and not isinstance(guide, AutoDelta):
            raise TypeError(f"guide must be an AutoDelta (EM gives point estimates), got "
                            f"{type(guide).__name__}")
        self.guide = guide
        self._options = dict(init=init, num_inits=check_init(init, num_inits), seed=seed,
                             tol=None if tol is None else check_positive_float(tol, "tol", True),
                             dtype=dtype, device=device, chunk_size=chunk_size)
        self._state = None
        self._data_key = None
        self._rule: StoppingRule | None = None
        self.history: list[float] = []

    # -- set-up ----------------------------------------------------------------------------
    def _setup(self, tokens, counts, groups):
        o = self._options
        start = time.perf_counter()
        init = o["init"] if self._state is None else self.fit  # new data: continue from here
        setup, atoms_z, log_w, label = prepare_fit(
            self.mixture.features, counts, tokens, groups,
            num_components=self.mixture.num_components, init=init, num_inits=o["num_inits"],
            max_iter=DEFAULT_MAX_ITER, dtype=o["dtype"], device=o["device"], seed=o["seed"],
            progress=False, chunk_size=o["chunk_size"],
            offset=getattr(self.mixture, "offset", None))
        tol = default_tol(setup.dtype) if o["tol"] is None else o["tol"]
        if atoms_z.shape[0] > 1:  # a race left several survivors: keep the best after EM
            em = finish(setup.problem, atoms_z, log_w, DEFAULT_MAX_ITER, tol).state
        else:
            em = setup.problem.start(atoms_z[0], log_w[0])
        self._state = dict(setup=setup, em=em, label=label, start=start)
        self.history = [float(em.loglik[0])]
        self._rule = StoppingRule(tol)
        self._write_guide(tokens, counts, groups)

    def _write_guide(self, tokens, counts, groups):
        s = self._state
        design = s["setup"].design
        atoms = design.atoms_from_z(s["em"].atoms.to(torch.float64).to(
            design.to_atoms.device))
        values = {"weights": s["em"].log_weights.exp(), "atoms": atoms}
        if self.guide is None:
            model = poutine.block(self.mixture.model, hide=["assignment"])
            self.guide = AutoDelta(model, init_loc_fn=init_to_em(values))
        if self.guide.prototype_trace is None:
            self.guide(tokens=tokens, counts=counts, groups=groups)
        store = pyro.get_param_store()
        for name, value in values.items():
            full = self.guide._pyro_get_fullname(name)
            if full not in store:
                raise ValueError(f"the guide has no parameter for site {name!r}")
            store[full] = value.to(store[full])

    def _ensure_setup(self, tokens, counts, groups) -> None:
        """Set up on first use, and again (from the current estimate) when the data change."""
        key = tuple(None if v is None else (id(v), tuple(getattr(v, "shape", ())))
                    for v in (tokens, counts, groups))
        if self._state is None or key != self._data_key:
            self._setup(tokens, counts, groups)
            self._data_key = key

    # -- the SVI-shaped interface ----------------------------------------------------------
    def step(self, tokens=None, counts=None, groups=None, **kwargs) -> float:
        """One EM iteration on the data; returns the negative log-likelihood after it.

        The data are given as to :meth:`SoftmaxMixtureModel.model`; the same objects should be
        passed every step (new data restart the engine from the current estimate).
        """
        self._ensure_setup(tokens, counts, groups)
        s = self._state
        s["em"], gain = s["setup"].problem.iterate(s["em"])
        loglik, gain = torch.cat([s["em"].loglik, gain]).tolist()
        self.history.append(loglik)
        self._rule.record(gain)
        self._write_guide(tokens, counts, groups)
        return -loglik

    def evaluate_loss(self, tokens=None, counts=None, groups=None, **kwargs) -> float:
        """The current negative log-likelihood (sets up on first use, no iteration)."""
        self._ensure_setup(tokens, counts, groups)
        return -self.history[-1]

    @property
    def converged(self) -> bool:
        """Whether the stopping rule of :func:`~pyro_softmix.fit_em` is met."""
        if self._state is None:
            return False
        # A race's best survivor is already converged: the steps from it have gains at rounding
        # level, which the rule reads as a stationary point.
        return self._rule.converged(self.history[-1])

    @property
    def fit(self) -> SoftmaxMixtureFit:
        """The current estimate as a :class:`~pyro_softmix.SoftmaxMixtureFit`."""
        if self._state is None:
            raise RuntimeError("EM has not been stepped yet: call step(...) first")
        s = self._state
        return make_fit(s["setup"], s["em"].atoms, s["em"].log_weights, list(self.history),
                        self.converged, s["label"], s["start"])
