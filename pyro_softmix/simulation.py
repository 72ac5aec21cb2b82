# SPDX-License-Identifier: Apache-2.0
"""Seeded synthetic softmax-mixture data with the truth kept for comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_features,
    check_mixing,
    check_num_components,
    check_offset,
    check_positive_float,
    check_positive_int,
    make_generator,
    resolve_dtype,
)
from ._logprob import component_log_probs
from .design import standardize

__all__ = ["SimulatedData", "SimulatedMoE", "simulate", "simulate_moe"]


@dataclass
class SimulatedData:
    """A synthetic data set and the truth that generated it.

    Attributes:
        features: (p, L) design.
        weights: (K,) true weights.
        atoms: (K, L) true atoms.
        probs: (p,) true mixture probabilities.
        counts: (p,) int64 counts, summing to N.
        tokens: (N,) int64 draws, or None when not requested.
        assignments: (N,) int64 true components of the draws, or None.
    """

    features: torch.Tensor
    weights: torch.Tensor
    atoms: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    tokens: torch.Tensor | None = None
    assignments: torch.Tensor | None = None

    @property
    def num_obs(self) -> int:
        return int(self.counts.sum())


def simulate(num_points: int = 2000, num_features: int = 5, num_components: int = 3,
             num_obs: int = 100_000, *, atom_norm: float = 2.0, concentration: float = 5.0,
             features=None, weights=None, atoms=None, return_tokens: bool = False,
             seed=None, dtype=None, offset=None) -> SimulatedData:
    """Simulate draws from a softmax mixture.

    By default the design is Gaussian (rows i.i.d. N(0, I_L)), the weights are drawn from a
    symmetric Dirichlet(``concentration``), and each atom is a uniformly random direction whose
    length in *standardised* coordinates is ``atom_norm`` (so the separation of the components
    does not depend on the scale of the features).

    Args:
        num_points: p (ignored when ``features`` is given).
        num_features: L (ignored when ``features`` is given).
        num_components: K (ignored when ``atoms`` is given).
        num_obs: N, the number of draws.
        atom_norm: length of the random atoms in standardised coordinates.
        concentration: Dirichlet concentration of the random weights (large = near uniform).
        features: (p, L) design to use instead of a Gaussian one.
        weights: (K,) true weights to use.
        atoms: (K, L) true atoms to use.
        return_tokens: also return the (N,) draws and their true components.
        seed: an int, a ``torch.Generator``, or None (drawn from torch's global random
            state); the same seed gives the same data.
        dtype: floating dtype of the returned tensors (default ``torch.get_default_dtype()``).
        offset: (p,) known offset b of every component's logits, softmax(X theta_k + b)
            (default: none; as in :func:`~pyro_softmix.fit_em`).

    Returns:
        :class:`SimulatedData`.

    Example:
        >>> data = simulate(num_points=100, num_features=2, num_components=2, num_obs=1000,
        ...                 seed=0)
        >>> int(data.counts.sum()), tuple(data.atoms.shape)
        (1000, (2, 2))
    """
    gen = make_generator(seed)
    num_obs = check_positive_int(num_obs, "num_obs")
    atom_norm = check_positive_float(atom_norm, "atom_norm", allow_zero=True)
    concentration = check_positive_float(concentration, "concentration")
    if features is None:
        p = check_positive_int(num_points, "num_points", minimum=2)
        L = check_positive_int(num_features, "num_features")
        x = torch.randn(p, L, generator=gen, dtype=torch.float64)
        dtype = resolve_dtype(dtype, torch.empty(0))
    else:
        x = check_features(features)
        dtype = resolve_dtype(dtype, x)
        x = x.to(torch.float64).cpu()
        p, L = x.shape
    if atoms is None:
        k = check_num_components(num_components, p)
        design = standardize(x)
        dirs = torch.randn(k, design.rank, generator=gen, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        atoms64 = design.atoms_from_z(atom_norm * dirs)
    else:
        atoms64 = None
    if weights is None:
        k = num_components if atoms is None else torch.as_tensor(atoms).shape[0]
        k = check_num_components(k, p)
        # Dirichlet via normalised Gamma variates (torch's samplers take no generator).
        g = _gamma(torch.full((k,), concentration, dtype=torch.float64), gen)
        weights = g / g.sum()
    w64, a64 = check_mixing(weights, atoms64 if atoms is None else atoms, None, L, name="true")
    logits = component_log_probs(x, a64, check_offset(offset, p, like=x))  # (K, p)
    probs = (w64[:, None] * logits.exp()).sum(0)
    out = SimulatedData(features=x.to(dtype), weights=w64.to(dtype), atoms=a64.to(dtype),
                        probs=probs.to(dtype), counts=torch.zeros(p, dtype=torch.int64))
    # The counts are drawn the same way with or without tokens (same seed, same counts); the
    # tokens are then the counted draws in a random order, and each draw's component is drawn
    # from its posterior given the draw (the same joint law as drawing the component first).
    out.counts = _multinomial_counts(probs, num_obs, gen)
    if return_tokens:
        order = torch.randperm(num_obs, generator=gen)
        tokens = torch.repeat_interleave(torch.arange(p), out.counts)[order]
        posterior = (w64[:, None] * logits.exp()).T / probs[:, None]  # (p, K)
        out.tokens = tokens
        out.assignments = torch.multinomial(posterior[tokens], 1, generator=gen)[:, 0]
    return out


def _gamma(concentration: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma(a, 1) variates from a generator (Marsaglia and Tsang 2000; boosted for a < 1)."""
    out = torch.empty_like(concentration)
    for i, a in enumerate(concentration.tolist()):
        boost = 1.0
        if a < 1:
            boost = float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1 / a)
            a = a + 1
        d = a - 1 / 3
        c = 1 / math.sqrt(9 * d)
        while True:
            x = float(torch.randn((), generator=gen, dtype=torch.float64))
            v = (1 + c * x) ** 3
            if v <= 0:
                continue
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if u > 0 and math.log(u) < 0.5 * x * x + d * (1 - v + math.log(v)):
                out[i] = d * v * boost
                break
    return out


def _multinomial_counts(probs: torch.Tensor, num_obs: int, gen: torch.Generator,
                        block: int = 2**24) -> torch.Tensor:
    """Multinomial(num_obs, probs) counts, drawing in blocks to bound memory."""
    counts = torch.zeros(probs.shape[0], dtype=torch.int64)
    left = num_obs
    while left > 0:
        m = min(left, block)
        draws = torch.multinomial(probs, m, replacement=True, generator=gen)
        counts += torch.bincount(draws, minlength=probs.shape[0])
        left -= m
    return counts


@dataclass
class SimulatedMoE:
    """Synthetic mixture-of-experts data and its truth (see :func:`simulate_moe`).

    Attributes:
        x: (n, d) features (used by the gate and the experts).
        y: (n,) targets.
        assignments: (n,) true experts.
        gate_weights: (K, d + 1) true gate (intercept last, last row 0).
        expert_weights: (K, d + 1) true experts (intercept last).
        noise_scale: (K,) true noise scales (linear experts), else None.
    """

    x: torch.Tensor
    y: torch.Tensor
    assignments: torch.Tensor
    gate_weights: torch.Tensor
    expert_weights: torch.Tensor
    noise_scale: torch.Tensor | None

    def truth(self) -> dict[str, torch.Tensor | None]:
        """The true parameters as a mapping, usable as ``MixtureOfExperts.fit(init=...)``."""
        return {"gate_weights": self.gate_weights, "expert_weights": self.expert_weights,
                "noise_scale": self.noise_scale}


def simulate_moe(num_obs: int = 2000, num_features: int = 4, num_experts: int = 3, *,
                 expert: str = "linear", snr: float = 4.0, gate_scale: float = 2.0,
                 seed=None, dtype=None) -> SimulatedMoE:
    """Simulate a mixture of experts with x ~ N(0, I_d) and a softmax gate.

    Gate rows are N(0, gate_scale^2 I) (last row 0; intercepts 0). Each expert's coefficient
    vector is a uniformly random direction scaled to norm ``snr`` (its intercept is 0), so the
    expert means have standard deviation ``snr``: linear experts add N(0, 1) noise (signal-to-
    noise ratio ``snr``), logistic experts have logits of scale ``snr``.

    Example:
        >>> data = simulate_moe(num_obs=500, num_experts=2, expert="logistic", seed=0)
        >>> data.x.shape, sorted(set(data.y.tolist()))
        (torch.Size([500, 4]), [0.0, 1.0])
    """
    n = check_positive_int(num_obs, "num_obs", minimum=2)
    d = check_positive_int(num_features, "num_features")
    k = check_positive_int(num_experts, "num_experts")
    if expert not in ("linear", "logistic"):
        raise ValueError(f"expert must be 'linear' or 'logistic', got {expert!r}")
    snr = check_positive_float(snr, "snr")
    gate_scale = check_positive_float(gate_scale, "gate_scale", allow_zero=True)
    gen = make_generator(seed)
    dtype = resolve_dtype(dtype, torch.empty(0))
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    gate = gate_scale * torch.randn(k, d, generator=gen, dtype=torch.float64)
    gate = torch.cat([gate - gate[-1:], torch.zeros(k, 1, dtype=torch.float64)], 1)
    directions = torch.randn(k, d, generator=gen, dtype=torch.float64)
    experts = snr * directions / directions.norm(dim=1, keepdim=True)
    experts = torch.cat([experts, torch.zeros(k, 1, dtype=torch.float64)], 1)
    xi = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    z = torch.multinomial(torch.softmax(xi @ gate.T, 1), 1, generator=gen)[:, 0]
    eta = (xi * experts[z]).sum(1)
    if expert == "linear":
        scale = torch.ones(k, dtype=torch.float64)
        y = eta + torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        scale = None
        y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(eta)).double()
    return SimulatedMoE(x=x.to(dtype), y=y.to(dtype), assignments=z, gate_weights=gate.to(dtype),
                        expert_weights=experts.to(dtype),
                        noise_scale=None if scale is None else scale.to(dtype))
