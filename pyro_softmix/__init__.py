# SPDX-License-Identifier: Apache-2.0
"""pyro-softmix: large softmax mixtures in Pyro.

P(Y = j) = sum_k alpha_k softmax(X theta_k)_j over p support points with known features X.
Fit by EM on counts (:func:`fit_em`), use as a Pyro distribution (:class:`SoftmaxMixture`) or
as a Pyro model with EM, SVI and NUTS inference (:class:`SoftmaxMixtureModel`). Mixtures of
experts with a softmax gate, fitted by EM: :class:`MixtureOfExperts`.

The names below are imported on first use (``import pyro_softmix`` itself loads neither torch
nor Pyro), so the ``softmix`` command answers ``--help`` at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_HOMES = {
    "ConvergenceWarning": "stopping", "DivergenceWarning": "stopping",
    "NumericalError": "stopping", "StartWarning": "stopping",
    "Design": "design", "IdentifiabilityWarning": "design", "standardize": "design",
    "FitComparison": "diagnostics", "compare_fits": "diagnostics",
    "fisher_intervals": "diagnostics", "plot_diagnostics": "diagnostics",
    "posterior_summary": "diagnostics", "relabel_samples": "diagnostics",
    "to_arviz": "arviz_bridge", "loo": "arviz_bridge", "LooResult": "arviz_bridge",
    "SoftmaxMixture": "distributions",
    "fit_em": "em",
    "EM": "infer", "em_initial_params": "infer", "init_to_em": "infer",
    "SoftmaxMixtureModel": "mixture_model",
    "MixtureOfExperts": "moe", "load_moe": "moe",
    "LatentMoments": "moments", "latent_moments": "moments",
    "FileFormatError": "results", "SoftmaxMixtureFit": "results", "load_fit": "results",
    "SimulatedData": "simulation", "SimulatedMoE": "simulation", "simulate": "simulation",
    "simulate_moe": "simulation",
    "fit_logistic_regression": "solvers", "fit_multinomial_logit": "solvers",
    "fit_softmax_regression": "solvers", "softmax_regression_step": "solvers",
    "weighted_least_squares": "solvers",
    "WarmStart": "warmstart", "warm_start": "warmstart",
    "ComponentSelection": "selection", "select_num_components": "selection",
}
#: Submodules reachable as attributes (``psm.models``, ...).
_MODULES = {"datasets", "models", "moe", "moe_em", "plots", "diagnostics", "infer", "engine",
            "arviz_bridge",
            "accelerate", "stopping", "results", "warmstart", "solvers", "design", "moments",
            "distributions", "simulation", "mixture_model", "em", "cli", "selection",
            "uncertainty", "membership"}

__all__ = sorted(_HOMES) + ["datasets", "models", "moe"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'pyro_softmix' has no attribute {name!r}")
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | _MODULES)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import datasets, models, moe  # noqa: F401
    from .arviz_bridge import LooResult, loo, to_arviz  # noqa: F401
    from .design import Design, IdentifiabilityWarning, standardize  # noqa: F401
    from .diagnostics import (  # noqa: F401
        FitComparison,
        compare_fits,
        fisher_intervals,
        plot_diagnostics,
        posterior_summary,
        relabel_samples,
    )
    from .distributions import SoftmaxMixture  # noqa: F401
    from .em import fit_em  # noqa: F401
    from .infer import EM, em_initial_params, init_to_em  # noqa: F401
    from .mixture_model import SoftmaxMixtureModel  # noqa: F401
    from .moe import MixtureOfExperts, load_moe  # noqa: F401
    from .moments import LatentMoments, latent_moments  # noqa: F401
    from .results import FileFormatError, SoftmaxMixtureFit, load_fit  # noqa: F401
    from .selection import ComponentSelection, select_num_components  # noqa: F401
    from .simulation import SimulatedData, SimulatedMoE, simulate, simulate_moe  # noqa: F401
    from .solvers import (  # noqa: F401
        fit_logistic_regression,
        fit_multinomial_logit,
        fit_softmax_regression,
        softmax_regression_step,
        weighted_least_squares,
    )
    from .stopping import (  # noqa: F401
        ConvergenceWarning,
        DivergenceWarning,
        NumericalError,
        StartWarning,
    )
    from .warmstart import WarmStart, warm_start  # noqa: F401
