# SPDX-License-Identifier: Apache-2.0
"""pyro-softmix: large softmax mixtures in Pyro.

P(Y = j) = sum_k alpha_k softmax(X theta_k)_j over p support points with known features X.
Fit by EM on counts (:func:`fit_em`), use as a Pyro distribution (:class:`SoftmaxMixture`).
"""

from .design import Design, IdentifiabilityWarning, standardize
from .distributions import SoftmaxMixture
from .em import ConvergenceWarning, SoftmaxMixtureFit, fit_em, load_fit
from .simulate import SimulatedData, simulate
from .solvers import fit_softmax_regression, softmax_regression_step

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "Design",
    "IdentifiabilityWarning",
    "SimulatedData",
    "SoftmaxMixture",
    "SoftmaxMixtureFit",
    "fit_em",
    "fit_softmax_regression",
    "load_fit",
    "simulate",
    "softmax_regression_step",
    "standardize",
]
