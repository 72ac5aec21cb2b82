# SPDX-License-Identifier: Apache-2.0
"""The softmax mixture as Pyro distributions: over the support points {0, ..., p-1}
(:class:`SoftmaxMixture`), and over count vectors (:class:`MixtureCounts`)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import Categorical
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from ._checks import as_tensor, check_features, check_offset
from ._logprob import component_log_probs, log_weights, mixture_log_probs

__all__ = ["MixtureCounts", "SoftmaxMixture"]


class SoftmaxMixture(Categorical):
    r"""Mixture of K softmax (multinomial-logit) distributions over p support points.

    .. math::
        P(Y = j) = \sum_k w_k \, \mathrm{softmax}(X \theta_k + b)_j, \qquad j = 0, \dots, p - 1.

    The component assignment is marginalised, so :meth:`log_prob` is the marginal log-probability
    and the distribution is a :class:`pyro.distributions.Categorical` over the support points:
    sampling, ``enumerate_support`` and Pyro's enumeration machinery work unchanged, and
    gradients flow to ``atoms`` and ``weights``.

    Args:
        features: (p, L) support-point features X (shared by every batch member).
        atoms: (..., K, L) component atoms theta.
        weights: (..., K) mixture weights on the simplex.
        offset: (p,) known offset b of every component's logits (default: none, b = 0).
        validate_args: check the arguments (Pyro's/torch's global default if None).

    Shapes: ``batch_shape`` is the broadcast of ``atoms.shape[:-2]`` and ``weights.shape[:-1]``;
    ``event_shape`` is ``()``.

    Example:
        >>> import torch
        >>> x = torch.randn(10, 2)
        >>> d = SoftmaxMixture(x, torch.randn(3, 2), torch.tensor([0.2, 0.3, 0.5]))
        >>> d.log_prob(torch.tensor([0, 9])).shape
        torch.Size([2])
    """

    arg_constraints = {"atoms": constraints.real, "weights": constraints.simplex}
    has_enumerate_support = True

    def __init__(self, features, atoms, weights, offset=None, validate_args=None):
        if not isinstance(features, torch.Tensor):
            features = check_features(features)
        elif validate_args is not False:
            check_features(features)  # raises on bad shape or values; keeps the autograd graph
        # Tensors are kept as they are (the autograd graph flows through them), once checked.
        atoms = atoms if isinstance(atoms, torch.Tensor) else as_tensor(atoms, "atoms")
        weights = weights if isinstance(weights, torch.Tensor) else as_tensor(weights, "weights")
        for value, name in ((atoms, "atoms"), (weights, "weights")):
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must be real numbers, got dtype {value.dtype}")
        if atoms.dim() < 2 or atoms.shape[-1] != features.shape[-1]:
            raise ValueError(f"atoms must have shape (..., K, {features.shape[-1]}) to match "
                             f"features, got {tuple(atoms.shape)}")
        if weights.dim() < 1 or weights.shape[-1] != atoms.shape[-2]:
            raise ValueError(f"weights must have shape (..., {atoms.shape[-2]}) to match atoms' "
                             f"K={atoms.shape[-2]}, got {tuple(weights.shape)}")
        dtype = torch.promote_types(atoms.dtype, weights.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        self.features = features.to(dtype)
        self.offset = check_offset(offset, features.shape[0], like=self.features)
        batch_shape = torch.broadcast_shapes(atoms.shape[:-2], weights.shape[:-1])
        k = atoms.shape[-2]
        self.atoms = atoms.to(dtype).expand(batch_shape + atoms.shape[-2:])
        self.weights = weights.to(dtype).expand(batch_shape + (k,))
        super().__init__(logits=self._mixture_logits(), validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.atoms.shape[-2]

    def component_logits(self) -> torch.Tensor:
        """(..., K, p) normalised log-probabilities log q_k(j) of each component."""
        return component_log_probs(self.features, self.atoms, self.offset)

    def _mixture_logits(self) -> torch.Tensor:
        return mixture_log_probs(self.component_logits(), self.weights)

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q_k(value) for every component: shape ``value.shape + (K,)``.

        ``value`` must broadcast with ``batch_shape`` like an argument of :meth:`log_prob`.
        """
        if self._validate_args:
            self._validate_sample(value)
        comp = self.component_logits().movedim(-2, -1)  # (..., p, K)
        value = value.long()
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        comp = comp.expand(shape + comp.shape[-2:])
        idx = value.expand(shape)[..., None, None].expand(shape + (1, comp.shape[-1]))
        return comp.gather(-2, idx).squeeze(-2)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SoftmaxMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.features, new.offset = self.features, self.offset
        new.atoms = self.atoms.expand(batch_shape + self.atoms.shape[-2:])
        new.weights = self.weights.expand(batch_shape + self.weights.shape[-1:])
        Categorical.__init__(new, logits=self.logits.expand(batch_shape + self.logits.shape[-1:]),
                             validate_args=False)
        new._validate_args = self._validate_args
        return new


class MixtureCounts(TorchDistribution):
    r"""Likelihood of a count vector (or of G count vectors) under a softmax mixture.

    Ungrouped (``grouped=False``): counts n (..., p) with
    :math:`\log p(n) = \sum_j n_j \log \pi_j`, :math:`\pi = \sum_k w_k q_k`.
    Grouped: each of G count vectors comes from one component,
    :math:`\log p(n_g) = \log \sum_k w_k \prod_j q_k(j)^{n_{gj}}`.

    The multinomial coefficient is left out (it does not depend on the parameters), so the value
    equals the marginal log-likelihood of the underlying draws and matches
    :func:`enumerated_model` exactly. :meth:`sample` draws multinomial counts with
    ``total_count`` draws (rounded to an integer).

    Args:
        component_logits: (K, p) normalised log q_k(j) (leading batch dims allowed: (..., K, p)).
        weights: (..., K) mixture weights.
        total_count: N (ungrouped) or (G,) draws per group (grouped).
        grouped: see above.
        group_weights: grouped only: ``weights`` are (..., G, K), one set of class shares
            per group (class membership on group covariates).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.nonnegative, 1)

    def __init__(self, component_logits: torch.Tensor, weights: torch.Tensor, total_count,
                 grouped: bool = False, validate_args=None, group_weights: bool = False):
        self.component_logits = component_logits
        self.weights = weights
        self.grouped = grouped
        self.group_weights = group_weights and grouped
        self.total_count = torch.as_tensor(total_count, dtype=component_logits.dtype,
                                           device=component_logits.device)
        p = component_logits.shape[-1]
        if self.group_weights:
            batch = torch.broadcast_shapes(component_logits.shape[:-2] + (1,), weights.shape[:-1],
                                           self.total_count.shape)
        else:
            batch = torch.broadcast_shapes(component_logits.shape[:-2], weights.shape[:-1])
            if grouped:
                batch = torch.broadcast_shapes(batch + (1,), self.total_count.shape)
        super().__init__(batch, torch.Size([p]), validate_args=validate_args)

    def mixture_logits(self) -> torch.Tensor:
        """(..., p) log pi_j."""
        return mixture_log_probs(self.component_logits, self.weights)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if not self.grouped:
            return (value * self.mixture_logits()).sum(-1)
        # (..., G, p) x (..., K, p) -> (..., G, K)
        per_comp = value @ self.component_logits.transpose(-1, -2)
        lw = log_weights(self.weights)
        return torch.logsumexp(per_comp + (lw if self.group_weights else lw[..., None, :]), -1)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            if self.grouped:
                w = self.weights if self.group_weights else self.weights[..., None, :]
                k = dist.Categorical(w.expand(shape + self.weights.shape[-1:])).sample()
                logits = Vindex(self.component_logits.unsqueeze(-3))[..., k, :]
            else:
                logits = self.mixture_logits().expand(shape + self.event_shape)
            total = self.total_count.expand(shape).round().long()
            out = torch.zeros(shape + self.event_shape, dtype=logits.dtype, device=logits.device)
            flat_logits = logits.reshape(-1, logits.shape[-1])
            flat_out = out.reshape(-1, out.shape[-1])
            for i, n in enumerate(total.reshape(-1).tolist()):
                draws = torch.multinomial(flat_logits[i].softmax(-1), int(n), replacement=True)
                flat_out[i] = torch.bincount(draws, minlength=out.shape[-1]).to(out.dtype)
            return flat_out.reshape(out.shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MixtureCounts, _instance)
        batch_shape = torch.Size(batch_shape)
        new.component_logits = self.component_logits
        new.weights = self.weights
        new.grouped, new.group_weights = self.grouped, self.group_weights
        new.total_count = self.total_count.expand(batch_shape) if self.grouped else self.total_count
        super(MixtureCounts, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new
