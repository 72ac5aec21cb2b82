# SPDX-License-Identifier: Apache-2.0
"""pyro-softmix: large softmax mixtures in Pyro.

P(Y = j) = sum_k alpha_k softmax(X theta_k)_j over p support points with known features X.
Fit by EM on counts (:func:`fit_em`), use as a Pyro distribution (:class:`SoftmaxMixture`) or
as a Pyro model with EM, SVI and NUTS inference (:class:`SoftmaxMixtureModel`). Mixtures of
experts with a softmax gate, fitted by EM: :class:`MixtureOfExperts`.
"""

from . import datasets, models, moe
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
from .em import fit_em
from .infer import EM, em_initial_params, init_to_em
from .mixture_model import SoftmaxMixtureModel
from .moe import MixtureOfExperts, load_moe
from .moments import LatentMoments, latent_moments
from .results import FileFormatError, SoftmaxMixtureFit, load_fit
from .simulate import SimulatedData, SimulatedMoE, simulate, simulate_moe
from .solvers import (
    fit_logistic_regression,
    fit_multinomial_logit,
    fit_softmax_regression,
    softmax_regression_step,
    weighted_least_squares,
)
from .stopping import ConvergenceWarning, DivergenceWarning, NumericalError, StartWarning
from .warmstart import WarmStart, warm_start

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "Design",
    "DivergenceWarning",
    "EM",
    "FileFormatError",
    "FitComparison",
    "IdentifiabilityWarning",
    "LatentMoments",
    "MixtureOfExperts",
    "NumericalError",
    "SimulatedData",
    "SimulatedMoE",
    "SoftmaxMixture",
    "SoftmaxMixtureFit",
    "SoftmaxMixtureModel",
    "StartWarning",
    "WarmStart",
    "compare_fits",
    "datasets",
    "em_initial_params",
    "fisher_intervals",
    "fit_em",
    "fit_logistic_regression",
    "fit_multinomial_logit",
    "fit_softmax_regression",
    "init_to_em",
    "latent_moments",
    "load_fit",
    "load_moe",
    "models",
    "moe",
    "plot_diagnostics",
    "posterior_summary",
    "relabel_samples",
    "simulate",
    "simulate_moe",
    "softmax_regression_step",
    "standardize",
    "to_arviz",
    "warm_start",
    "weighted_least_squares",
]
