# SPDX-License-Identifier: Apache-2.0
"""The softmax mixture as Pyro models.

Two model functions share the sample sites ``"weights"`` (K,), ``"atoms"`` (K, L) and ``"obs"``:

* :func:`enumerated_model`: one ``"assignment"`` per observation (or per group), marked for
  parallel enumeration inside a data plate, so ``TraceEnum_ELBO``, ``infer_discrete`` and
  ``NUTS`` sum it out exactly (``max_plate_nesting=1``);
* :func:`collapsed_model`: the assignment already summed out and the data reduced to counts,
  so its cost is O(p K L) whatever N is.

On the same values both give the same log joint density: sum_j n_j log pi_j (ungrouped) or
sum_g log sum_k alpha_k prod_j q_k(j)^{n_gj} (grouped), plus the priors. Neither includes the
multinomial coefficient, which does not depend on the parameters.

Both compose inside a user's model: pass ``weights=`` / ``atoms=`` values computed there (e.g.
atoms that are a regression on covariates) or ``atoms_prior=`` a distribution whose parameters
were sampled there (a hierarchical prior).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from ._checks import (
    as_tensor,
    check_counts,
    check_features,
    check_groups,
    check_num_components,
    check_offset,
)
from ._logprob import component_log_probs
from .design import feature_scales
from .distributions import MixtureCounts
from .membership import check_group_features

__all__ = ["MixtureCounts", "collapsed_model", "default_atoms_prior", "enumerated_model",
           "pad_groups"]


# ----------------------------------------------------------------------------------------------
# Priors
# ----------------------------------------------------------------------------------------------
def default_atoms_prior(features: torch.Tensor, num_components: int, prior_scale: float = 5.0):
    """Normal(0, prior_scale / sd(X[:, l])) on every atom coordinate, event shape (K, L).

    The scale is per feature so that ``prior_scale`` is in units of the logit change per
    standard deviation of that feature: invariant to rescaling a column of X.
    """
    scale = prior_scale / feature_scales(features)
    return dist.Normal(torch.zeros_like(scale), scale).expand(
        (num_components, features.shape[1])).to_event(2)


def _as_atoms_prior(prior, k: int, l_dim: int):
    if not isinstance(prior, torch.distributions.Distribution):
        raise TypeError(f"atoms_prior must be a distribution, got {type(prior).__name__}")
    d = prior
    try:
        if d.event_dim == 0:
            d = d.expand(torch.broadcast_shapes(d.batch_shape, (k, l_dim))).to_event(2)
        elif d.event_dim == 1:
            d = d.expand(torch.broadcast_shapes(d.batch_shape, (k,))).to_event(1)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"atoms_prior must broadcast to shape ({k}, {l_dim}): {e}") from None
    if d.batch_shape != () or d.event_shape != (k, l_dim):
        raise ValueError(f"atoms_prior must have batch_shape + event_shape ({k}, {l_dim}), got "
                         f"{tuple(d.batch_shape)} + {tuple(d.event_shape)}")
    return d


def _global_sites(features, k, weights, atoms, weights_prior, atoms_prior, concentration,
                  prior_scale, shared_weights: bool = True):
    """Sample (or take) the weights and atoms; returns them (weights None when the class
    shares depend on group covariates instead, ``shared_weights=False``)."""
    if weights is None and shared_weights:
        if weights_prior is None:
            conc = torch.full((k,), float(concentration), dtype=features.dtype,
                              device=features.device)
            weights_prior = dist.Dirichlet(conc)
        weights = pyro.sample("weights", weights_prior)
    if atoms is None:
        prior = (default_atoms_prior(features, k, prior_scale) if atoms_prior is None
                 else _as_atoms_prior(atoms_prior, k, features.shape[1]))
        atoms = pyro.sample("atoms", prior)
    if atoms.shape[-2:] != (k, features.shape[1]):
        raise ValueError(f"atoms must have shape (..., {k}, {features.shape[1]}), "
                         f"got {tuple(atoms.shape)}")
    if weights is not None and weights.shape[-1] != k:
        raise ValueError(f"weights must have shape (..., {k}), got {tuple(weights.shape)}")
    return weights, atoms


def _membership(group_features, num_groups, k, membership_coef, prior_scale, like, validate):
    """The class-membership coefficients Gamma (..., K, d) (last row 0) of covariates (G, d):
    the ``"membership_coef"`` site (K - 1, d) ~ Normal(0, prior_scale), or a given value
    ((K, d) or (K - 1, d)). Returns (covariates, Gamma), or (None, None) without covariates."""
    if group_features is None:
        return None, None
    if validate:
        group_features = check_group_features(group_features, num_groups)
    c = group_features.to(like)
    d = c.shape[-1]
    if membership_coef is None:
        prior = dist.Normal(like.new_zeros(()), float(prior_scale)).expand((k - 1, d))
        membership_coef = pyro.sample("membership_coef", prior.to_event(2))
    free = membership_coef[..., :k - 1, :]
    if free.shape[-2:] != (k - 1, d):
        raise ValueError(f"membership_coef must have shape (..., {k - 1}, {d}), got "
                         f"{tuple(membership_coef.shape)}")
    gamma = torch.cat([free, free.new_zeros(free.shape[:-2] + (1, d))], -2)
    return c, gamma


def _component_logits(features, atoms, offset, validate: bool):
    """(..., K, p) log softmax(X atoms_k + offset) (the offset checked when ``validate``)."""
    if offset is not None and validate:
        offset = check_offset(offset, features.shape[0], like=features)
    return component_log_probs(features, atoms, offset)


# ----------------------------------------------------------------------------------------------
# Data preparation (done once by SoftmaxMixtureModel; by the functions on every call)
# ----------------------------------------------------------------------------------------------
def pad_groups(tokens, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with a group id each -> a (G, T) matrix padded with -1, and the (G,) group ids.

    Row g holds the tokens of the g-th smallest group id in their original order; T is the size
    of the largest group. This is the grouped input of :func:`enumerated_model`.

    Example:
        >>> pad_groups(torch.tensor([3, 1, 2]), torch.tensor([7, 5, 7]))[0]
        tensor([[ 1, -1],
                [ 3,  2]])
    """
    t = as_tensor(tokens, "tokens").to(torch.int64)
    g = as_tensor(groups, "groups")
    if g.dim() != 1 or g.shape != t.shape:
        raise ValueError(f"groups must be a (N,) id per token like tokens {tuple(t.shape)}, got "
                         f"shape {tuple(g.shape)}")
    if g.is_floating_point() or g.dtype == torch.bool:
        raise TypeError(f"groups ids must be integers, got dtype {g.dtype}")
    labels, inverse, sizes = torch.unique(g.to(torch.int64), return_inverse=True,
                                          return_counts=True)
    order = torch.sort(inverse, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(t.shape[0], device=t.device) - starts[inverse[order]]
    out = torch.full((labels.shape[0], int(sizes.max())), -1, dtype=torch.int64, device=t.device)
    out[inverse[order], position] = t[order]
    return out, labels


def count_matrix(groups, counts, tokens, like: torch.Tensor) -> torch.Tensor:
    """Checked grouped data as a dense (G, p) count matrix with ``like``'s dtype and device."""
    p = like.shape[0]
    gi, pi, values, labels = check_groups(groups, counts, tokens, p)
    matrix = torch.zeros(int(labels.shape[0]), p, dtype=like.dtype)
    matrix[gi, pi] = values.to(like.dtype)
    return matrix.to(like.device)


def expand_counts(counts, groups, p: int):
    """Whole counts (p,) or a (G, p) count matrix -> tokens (N,) and group ids (or None)."""
    if groups is not None:
        m = as_tensor(groups, "groups")
        if m.is_floating_point() and not bool((m == m.round()).all()):
            raise ValueError("groups must hold whole counts here (one draw per count)")
        m = m.long().cpu()
        gi, pi = m.nonzero(as_tuple=True)
        reps = m[gi, pi]
        return torch.repeat_interleave(pi, reps), torch.repeat_interleave(gi, reps)
    n = check_counts(counts, None, p)
    if n.is_floating_point() and not bool((n == n.round()).all()):
        raise ValueError("counts must be whole numbers here (one draw per count)")
    return torch.repeat_interleave(torch.arange(p), n.long().cpu()), None


def _check_tokens(tokens, p: int) -> torch.Tensor:
    t = as_tensor(tokens, "tokens")
    if t.dim() == 2:  # padded groups
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got dtype {t.dtype}")
        if bool((t >= p).any()) or bool((t < -1).any()):
            raise ValueError(f"padded tokens must lie in [0, {p - 1}] or be -1 (padding)")
        if not bool((t >= 0).any(1).all()):
            raise ValueError("padded tokens have an empty group (a row of only -1)")
        return t.long()
    check_counts(None, t, p)
    return t.long()


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------
def enumerated_model(features, num_components: int, tokens=None, *, groups=None,
                     num_obs: int | None = None, weights=None, atoms=None, weights_prior=None,
                     atoms_prior=None, concentration: float = 1.0, prior_scale: float = 5.0,
                     subsample_size: int | None = None, validate: bool = True,
                     offset=None, group_features=None, membership_coef=None) -> torch.Tensor:
    """The per-observation softmax mixture with an enumerated ``"assignment"`` site.

    ::

        weights ~ Dirichlet(concentration)                      (K,)
        atoms   ~ atoms_prior (default: default_atoms_prior)     (K, L)
        for i in plate("data", N, subsample_size):
            assignment[i] ~ Categorical(weights)                 enumerated in parallel
            obs[i] ~ Categorical(log_softmax(X atoms[assignment[i]] + offset))

    Grouped data (``groups=`` ids per token, or ``tokens`` already padded to (G, T) with -1 by
    :func:`pad_groups`): the plate is ``"groups"`` over G, one assignment per group, and
    ``"obs"`` holds each group's (T,) tokens as one event (padding masked out).

    Run it with ``TraceEnum_ELBO(max_plate_nesting=1)``, ``infer_discrete(first_available_dim=-2)``
    or ``NUTS(..., max_plate_nesting=1)``; guides must hide ``"assignment"``
    (e.g. ``AutoNormal(poutine.block(model, hide=["assignment"]))``).

    Args:
        features: (p, L) tensor X.
        num_components: K.
        tokens: (N,) observed draws in [0, p), or (G, T) padded groups, or None (then
            ``num_obs`` draws are generated).
        groups: (N,) group id per token (optional).
        num_obs: N when ``tokens`` is None (prior predictive).
        weights, atoms: values to use instead of sampling these sites (composition).
        weights_prior, atoms_prior: distributions replacing the defaults; ``atoms_prior`` may
            have any batch shape that broadcasts to (K, L).
        concentration: Dirichlet concentration of the default weights prior.
        prior_scale: scale of the default atoms prior (see :func:`default_atoms_prior`).
        subsample_size: minibatch size of the data plate (for SVI).
        validate: check the data (turn off inside tight loops once checked).
        offset: (p,) known offset b of every component's logits (as in
            :func:`~pyro_softmix.fit_em`; default none).
        group_features: grouped data only: (G, d) covariates of the groups. Group g's
            assignment is then Categorical(softmax(Gamma c_g)) with Gamma's first K - 1 rows the
            ``"membership_coef"`` site ~ Normal(0, prior_scale) (last row 0), instead of the
            shared ``"weights"`` (see :mod:`pyro_softmix.membership`).
        membership_coef: a value for Gamma ((K, d) or (K - 1, d)) instead of the site.

    Returns:
        The observed (or generated) ``"obs"`` values of the plate's (sub)sample.

    Example:
        >>> x = torch.randn(50, 2)
        >>> elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        >>> def model():
        ...     enumerated_model(x, 2, torch.tensor([0, 3, 3]), weights=torch.tensor([0.4, 0.6]),
        ...                      atoms=torch.zeros(2, 2))
        >>> def guide():
        ...     pass
        >>> round(-elbo.loss(model, guide) / 3, 4) == round(-math.log(50), 4)  # uniform over 50
        True
    """
    features = check_features(features) if validate else features
    k = check_num_components(num_components, features.shape[0]) if validate else num_components
    p = features.shape[0]
    if groups is not None:
        if tokens is None:
            raise ValueError("groups= needs tokens= (one group id per token)")
        tokens, _ = pad_groups(tokens, groups)
    elif tokens is not None and validate:
        tokens = _check_tokens(tokens, p)
    grouped = tokens is not None and tokens.dim() == 2
    if group_features is not None and not grouped:
        raise ValueError("group_features= needs grouped data (groups=, or padded (G, T) tokens)")
    weights, atoms = _global_sites(features, k, weights, atoms, weights_prior, atoms_prior,
                                   concentration, prior_scale, group_features is None)
    comp = _component_logits(features, atoms, offset, validate)  # (..., K, p)
    if grouped:
        num_groups, width = tokens.shape
        c, gamma = _membership(group_features, num_groups, k, membership_coef, prior_scale,
                               features, validate)
        with pyro.plate("groups", num_groups, subsample_size=subsample_size) as idx:
            prior = (dist.Categorical(weights) if gamma is None
                     else dist.Categorical(logits=c[idx] @ gamma.transpose(-1, -2)))
            z = pyro.sample("assignment", prior, infer={"enumerate": "parallel"})
            logits = Vindex(comp)[..., z, :]  # (..., Gs or 1, p)
            toks = tokens[idx]
            batch = torch.broadcast_shapes(logits.shape[:-1], toks.shape[:1])
            obs_dist = (dist.Categorical(logits=logits.unsqueeze(-2))
                        .expand(batch + (width,)).mask(toks >= 0).to_event(1))
            return pyro.sample("obs", obs_dist, obs=toks.clamp_min(0))
    if tokens is None and num_obs is None:
        raise ValueError("pass tokens= (observed data) or num_obs= (to generate data)")
    size = tokens.shape[0] if tokens is not None else int(num_obs)
    with pyro.plate("data", size, subsample_size=subsample_size) as idx:
        z = pyro.sample("assignment", dist.Categorical(weights), infer={"enumerate": "parallel"})
        obs = None if tokens is None else tokens[idx]
        return pyro.sample("obs", dist.Categorical(logits=Vindex(comp)[..., z, :]), obs=obs)


def collapsed_model(features, num_components: int, counts=None, *, tokens=None, groups=None,
                    num_obs: float | None = None, weights=None, atoms=None, weights_prior=None,
                    atoms_prior=None, concentration: float = 1.0, prior_scale: float = 5.0,
                    subsample_size: int | None = None, validate: bool = True,
                    offset=None, group_features=None, membership_coef=None) -> torch.Tensor:
    """The softmax mixture on counts, with the assignment summed out (no discrete site).

    ::

        weights ~ Dirichlet(concentration);  atoms ~ atoms_prior
        obs ~ MixtureCounts(q(atoms), weights, N)                       counts (p,)

    or, for grouped data, ``obs[g] ~ MixtureCounts(..., grouped=True)`` in plate ``"groups"``
    over the rows of a (G, p) count matrix. Same posterior as :func:`enumerated_model` on the
    same data; the cost per evaluation is O(p K L) (plus O(G p K) grouped) instead of O(N K).

    Args:
        features: (p, L) tensor X.
        num_components: K.
        counts: (p,) counts; or ``tokens`` (N,) (counted here); or ``groups``: a (G, p) count
            matrix alone, or (N,) group ids with ``tokens``. None of them: generate ``num_obs``
            draws.
        others: as in :func:`enumerated_model` (``offset``, ``group_features`` and
            ``membership_coef`` too); ``subsample_size`` applies to groups.

    Returns:
        The observed (or generated) counts.
    """
    features = check_features(features) if validate else features
    k = check_num_components(num_components, features.shape[0]) if validate else num_components
    p = features.shape[0]
    matrix = None
    if groups is not None and not validate and groups.dim() == 2:
        matrix = groups  # a checked (G, p) count matrix
    elif groups is not None:
        matrix = count_matrix(groups, counts, tokens, features)
    elif counts is not None or tokens is not None:
        counts = check_counts(counts, tokens, p) if validate else counts
        counts = counts.to(device=features.device, dtype=features.dtype)
    elif num_obs is None:
        raise ValueError("pass counts=, tokens= or groups= (observed data) or num_obs= "
                         "(to generate data)")
    if group_features is not None and matrix is None:
        raise ValueError("group_features= needs grouped data (groups=)")
    weights, atoms = _global_sites(features, k, weights, atoms, weights_prior, atoms_prior,
                                   concentration, prior_scale, group_features is None)
    comp = _component_logits(features, atoms, offset, validate)
    if matrix is not None:
        c, gamma = _membership(group_features, matrix.shape[0], k, membership_coef,
                               prior_scale, features, validate)
        with pyro.plate("groups", matrix.shape[0], subsample_size=subsample_size) as idx:
            rows = matrix[idx]
            shares = (weights if gamma is None
                      else torch.softmax(c[idx] @ gamma.transpose(-1, -2), -1))
            return pyro.sample("obs", MixtureCounts(comp, shares, rows.sum(-1), grouped=True,
                                                    group_weights=gamma is not None), obs=rows)
    total = float(counts.sum()) if counts is not None else float(num_obs)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"num_obs must be positive, got {num_obs}")
    return pyro.sample("obs", MixtureCounts(comp, weights, total), obs=counts)

