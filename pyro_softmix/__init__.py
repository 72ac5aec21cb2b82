# SPDX-License-Identifier: Apache-2.0
"""pyro-softmix: large softmax mixtures in Pyro.

P(Y = j) = sum_k alpha_k softmax(X theta_k)_j over p support points with known features X.
Fit by EM on counts (:func:`fit_em`), use as a Pyro distribution (:class:`SoftmaxMixture`) or
as a Pyro model with EM, SVI and NUTS inference (:class:`SoftmaxMixtureModel`).
"""

from . import models
from .design import Design, IdentifiabilityWarning, standardize
from .diagnostics import (
    FitComparison,
    compare_fits,
    fisher_intervals,
    plot_diagnostics,
    posterior_summary,
    relabel_samples,
    to_arviz,
)
from .distributions import SoftmaxMixture
from .em import ConvergenceWarning, SoftmaxMixtureFit, fit_em, load_fit
from .infer import EM, em_initial_params, init_to_em
from .mixture_model import SoftmaxMixtureModel
from .simulate import SimulatedData, simulate
from .solvers import fit_softmax_regression, softmax_regression_step

__version__ = "0.1.0"

__all__ = [
    "EM",
    "ConvergenceWarning",
    "Design",
    "FitComparison",
    "IdentifiabilityWarning",
    "SimulatedData",
    "SoftmaxMixture",
    "SoftmaxMixtureFit",
    "SoftmaxMixtureModel",
    "compare_fits",
    "em_initial_params",
    "fisher_intervals",
    "fit_em",
    "fit_softmax_regression",
    "init_to_em",
    "load_fit",
    "models",
    "plot_diagnostics",
    "posterior_summary",
    "relabel_samples",
    "simulate",
    "softmax_regression_step",
    "standardize",
    "to_arviz",
]
