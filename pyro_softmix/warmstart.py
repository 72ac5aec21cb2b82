# SPDX-License-Identifier: Apache-2.0
"""Warm starts for EM from the latent moments (see :mod:`pyro_softmix.moments`).

All methods work in standardised coordinates and return atoms in the user's coordinates.

- ``"projection"``: the method of moments of Bing, Bunea, Niles-Weed and Wegkamp (2024). The 1-D
  moments of order 1..2K-1 along a direction v are projected onto the set of valid moment
  sequences of distributions on an interval (denoising, as in Wu and Yang's denoised method of
  moments), a K-point Gauss quadrature of the projected sequence gives the weights and the atoms'
  coordinates along v, and a Vandermonde solve on the mixed moments of order <= K-1 along v and 1
  across it gives the other coordinates. Consistent, and exact on exact moments, but the high
  orders are noisy: in practice it is useful for K = 2 only.
- ``"tensor"`` (K <= r): whiten with the top-K eigenpairs of M2, contract M3 into the K x K x K
  whitened tensor and diagonalise it (Jennrich's simultaneous diagonalisation, with the best
  separated of several random contractions). Third moments only, so it degrades gradually in K.
- ``"subspace"``: random atoms in the span of M2's top-K eigenvectors at the scale M2 implies.
- ``"random"``: random atoms in all r directions at the scale M2 implies.
- ``"auto"``: see :func:`warm_start`.
- ``"tempered"``: ``"auto"`` with one random start replaced by a start grown on tempered counts
  (:func:`tempered_grown_start`), for components that put most of their mass on a few points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import check_positive_int, keyword_options, make_generator, warn_user
from ._chunks import one_thread, ordered_dot, weighted_sums
from ._race import RACE_HANDOVER, RACE_SAME, joined_leader, race, race_label  # noqa: F401
from ._split import split_worst
from .accelerate import run
from .engine import EM_MAX_STEP, EMProblem, Setup, prepare, user_start
from .moments import LatentMoments, standardised_moments
from .solvers import column_logsumexp, fit_softmax_regression, offset_logits
from .stopping import StartWarning, progress_bar

__all__ = ["WarmStart", "warm_start", "WARM_START_METHODS"]

WARM_START_METHODS = ("auto", "tempered", "projection", "tensor", "subspace", "random")
#: Number of candidate starts under ``init="auto"`` when ``num_inits`` is not given.
AUTO_NUM_INITS = 4


@dataclass(repr=False)
class WarmStart:
    """A starting point for EM.

    Attributes:
        weights: (K,) mixture weights (sum to 1).
        atoms: (K, L) atoms in the user's feature coordinates.
        method: the method that produced it.
        atoms_z: (K, r) the atoms in standardised coordinates.
        loglik: log-likelihood at the start (None when not computed).
    """

    weights: torch.Tensor
    atoms: torch.Tensor
    method: str
    atoms_z: torch.Tensor
    loglik: float | None = None

    def __repr__(self) -> str:
        return (f"WarmStart(method={self.method!r}, K={self.weights.shape[0]}, "
                f"L={self.atoms.shape[1]})")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the methods (all in float64 on the CPU: the matrices are at most r x r)
# ----------------------------------------------------------------------------------------------
def _top_eigen(mom: LatentMoments, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of M2 (values descending (k,), vectors (r, k)); M2 is decomposed once
    per moments object (a start of several kinds, or several starts, reuse it)."""
    if mom._m2_eigh is None:
        with one_thread():
            vals, vecs = torch.linalg.eigh(mom.m2.double().cpu())
        mom._m2_eigh = vals.flip(0), vecs.flip(1)
    vals, vecs = mom._m2_eigh
    return vals[:k], vecs[:, :k]


def _spread(mom: LatentMoments) -> float:
    """Mean squared distance of the atoms from their mean implied by M2: trace M2 - |M1|^2."""
    m1 = mom.m1.double()
    return float(mom.m2.double().trace() - m1 @ m1)


def _gaussian_draws(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _offsets(r: int, num_components: int, num_starts: int, gen: torch.Generator,
             basis: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(S, K, r) standard Gaussian offsets, within the span of ``basis`` (r, d) if given, and d.

    Drawn on the CPU in float64, so a seed gives the same starts on every device.
    """
    if basis is None:
        return _gaussian_draws((num_starts, num_components, r), gen), r
    d = basis.shape[1]
    return _gaussian_draws((num_starts, num_components, d), gen) @ basis.T, d


def random_atoms(mom: LatentMoments, num_components: int, num_starts: int,
                 gen: torch.Generator, basis: torch.Tensor | None = None) -> torch.Tensor:
    """(S, K, r) random atoms around M1 at the spread M2 implies, within ``basis`` (r, d) if given."""
    noise, d = _offsets(mom.m1.shape[0], num_components, num_starts, gen, basis)
    return mom.m1.double().cpu() + math.sqrt(max(_spread(mom), 0.25) / d) * noise


# ----------------------------------------------------------------------------------------------
# Projection MoM (1-D moments, denoising, Gauss quadrature, Vandermonde)
# ----------------------------------------------------------------------------------------------
_GRID = 1001


def _denoise_moments(moments: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Project m_1..m_d onto the moment sequences of distributions on [-radius, radius].

    The moment set is the convex hull of the curve x -> (x, x^2, ..., x^d); on a fine grid the
    projection is a least-squares problem over the simplex, solved here as a nonnegative least
    squares with a heavily weighted sum-to-one row. Moments are rescaled by radius^m first so all
    orders count alike. Returns the grid and the projected measure's weights on it.
    """
    from scipy.optimize import nnls

    d = moments.shape[0]
    grid = np.linspace(-1.0, 1.0, _GRID)
    powers = np.arange(1, d + 1)
    target = moments / radius ** powers
    design = grid[None, :] ** powers[:, None]
    penalty = 1e3
    a = np.vstack([design, penalty * np.ones((1, _GRID))])
    b = np.concatenate([target, [penalty]])
    w, _ = nnls(a, b, maxiter=50 * _GRID)
    w = w / w.sum()
    return grid * radius, w


def _quadrature_from_moments(moments: np.ndarray, k: int, radius: float
                             ) -> tuple[np.ndarray, np.ndarray] | None:
    """The K-point measure with moments m_0..m_{2K-1} (Prony / Hankel), or None if there is no
    valid one (complex or repeated nodes, nodes outside [-radius, radius], weights <= 0)."""
    hankel = np.array([[moments[i + j] for j in range(k)] for i in range(k)])
    try:
        coef = np.linalg.solve(hankel, -moments[k:2 * k])
    except np.linalg.LinAlgError:
        return None
    nodes = np.roots(np.concatenate([[1.0], coef[::-1]]))
    if np.abs(nodes.imag).max() > 1e-9 * max(1.0, np.abs(nodes).max()):
        return None
    nodes = np.sort(nodes.real)
    if np.abs(nodes).max() > radius or (k > 1 and np.diff(nodes).min() <= 1e-9 * radius):
        return None
    vander = nodes[None, :] ** np.arange(k)[:, None]
    weights = np.linalg.solve(vander, moments[:k])
    if weights.min() <= 0:
        return None
    return nodes, weights


def _gauss_quadrature(nodes: np.ndarray, weights: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """K-point Gauss quadrature of a discrete measure (Stieltjes procedure, Golub-Welsch).

    The result matches the measure's moments of order 0..2K-1. If the measure has fewer than K
    support points, only that many nodes are returned.
    """
    keep = weights > 0
    x, w = nodes[keep], weights[keep]
    alpha, beta = [], []
    p_prev, p_cur = np.zeros_like(x), np.ones_like(x)
    norm_prev = 1.0
    for j in range(k):
        norm = float(w @ (p_cur * p_cur))
        if norm <= 1e-14 * norm_prev:
            break
        a = float(w @ (x * p_cur * p_cur)) / norm
        alpha.append(a)
        if j > 0:
            beta.append(norm / norm_prev)
        p_next = (x - a) * p_cur - (beta[-1] if j > 0 else 0.0) * p_prev
        p_prev, p_cur, norm_prev = p_cur, p_next, norm
    n = len(alpha)
    jacobi = np.diag(alpha) + np.diag(np.sqrt(beta[:n - 1]), 1) + np.diag(np.sqrt(beta[:n - 1]), -1)
    vals, vecs = np.linalg.eigh(jacobi)
    return vals, vecs[0] ** 2 * float(w.sum())


def projection_start(mom: LatentMoments, k: int, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (K,), atoms_z (K, r)) by the projection method of moments."""
    r = mom.m1.shape[0]
    # A random direction in the span of the atoms (M2's top eigenvectors): the atoms'
    # projections on it are then distinct with probability one.
    _, basis = _top_eigen(mom, min(k, r))
    v = basis @ _gaussian_draws((basis.shape[1],), gen)
    v = (v / v.norm()).to(mom.z)
    one_d = mom.along(v, 2 * k - 1).double().cpu().numpy()
    s = (mom.z @ v).double()
    radius = float(s.abs().max())
    direct = _quadrature_from_moments(one_d, k, radius)
    if direct is not None:  # a valid moment sequence is its own projection
        nodes, weights = direct
    else:
        grid, w = _denoise_moments(one_d[1:], radius)
        nodes, weights = _gauss_quadrature(grid, w, k)
    if nodes.shape[0] < k:  # a degenerate projection: split the heaviest node
        extra = k - nodes.shape[0]
        nodes = np.concatenate([nodes, nodes[np.argmax(weights)] + 1e-3 * np.arange(1, extra + 1)])
        weights = np.concatenate([weights, np.full(extra, 1e-3)])
    weights = np.clip(weights, 1e-6, None)
    weights = weights / weights.sum()
    # Coordinates across v: sum_k alpha_k s_k^m P t_k = B_m for m = 0..K-1 (Vandermonde in s).
    mixed = mom.mixed(v, k - 1).double().cpu().numpy()  # (K, r)
    vander = weights[None, :] * nodes[None, :] ** np.arange(k)[:, None]  # (K, K)
    perp, *_ = np.linalg.lstsq(vander, mixed, rcond=None)
    atoms = torch.from_numpy(perp) + torch.from_numpy(nodes)[:, None] * v.double().cpu()
    return torch.from_numpy(weights), atoms


# ----------------------------------------------------------------------------------------------
# Tensor MoM (whitening, Jennrich)
# ----------------------------------------------------------------------------------------------
_JENNRICH_TRIES = 16


def tensor_start(mom: LatentMoments, k: int, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (K,), atoms_z (K, r)) from the whitened third moment."""
    r = mom.m1.shape[0]
    if k > r:
        raise ValueError(f"method='tensor' needs num_components <= rank of the features ({r}), "
                         f"got {k}; use 'subspace' or 'random'")
    vals, vecs = _top_eigen(mom, k)
    vals = vals.clamp_min(1e-3 * max(float(vals[0]), 1e-3))
    whiten = vecs / vals.sqrt()  # (r, K): W^T M2 W = I
    tensor = mom.m3_basis(whiten.to(mom.z)).double().cpu()  # sum_k alpha_k^-1/2 v_k^(x)3
    # Jennrich: T(., ., eta) = V diag(alpha^-1/2 V^T eta) V^T with V orthonormal. Keep the random
    # contraction whose eigenvalues are best separated (the eigenvectors are then most stable).
    best, best_gap = None, -1.0
    for _ in range(_JENNRICH_TRIES):
        eta = _gaussian_draws((k,), gen)
        eta = eta / eta.norm()
        mat = torch.einsum("abc,c->ab", tensor, eta)
        ev, vec = torch.linalg.eigh(0.5 * (mat + mat.T))
        gap = float(ev.diff().min()) if k > 1 else 1.0
        if gap > best_gap:
            best, best_gap = vec, gap
    v = best.T  # (K, K) rows v_k
    scale = torch.einsum("abc,ka,kb,kc->k", tensor, v, v, v)  # alpha_k^-1/2, up to sign
    sign = torch.where(scale < 0, -1.0, 1.0).to(scale)
    v, scale = v * sign[:, None], (scale * sign).clamp_min(1e-3)
    weights = scale ** -2
    weights = weights / weights.sum()
    atoms = (v * vals.sqrt()) @ vecs.T * scale[:, None]  # t_k = U Lambda^1/2 v_k alpha_k^-1/2
    return weights, atoms


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def moment_start(mom: LatentMoments, k: int, method: str, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (K,), atoms_z (K, r)) in float64 on the CPU for the moment-based methods.

    The latent moments assume the uniform base measure over the support points. With an
    offset b the base is softmax(b): the atoms are then estimated as without it and shifted by
    :func:`offset_shift`, which is exact when b = X c (every atom moves by -c) and otherwise
    corrects the atoms' common part to first order."""
    if method == "projection":
        weights, atoms = projection_start(mom, k, gen)
    elif method == "tensor":
        weights, atoms = tensor_start(mom, k, gen)
    else:
        basis = None
        if method == "subspace":
            _, basis = _top_eigen(mom, min(k, mom.m1.shape[0]))
        atoms = random_atoms(mom, k, 1, gen, basis)[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if mom.offset is not None:
        atoms = atoms + offset_shift(mom)
    return weights, atoms


def offset_shift(mom: LatentMoments) -> torch.Tensor:
    """(r,) float64 CPU: the one-component fit with the offset minus the one without it (what
    the offset moves a component by). Computed once per moments object."""
    if mom._offset_shift is None:
        with_offset = _tilted_centre(mom).double().cpu()
        without = fit_softmax_regression(mom.z, mom.pihat[:, None], max_steps=50,
                                         chunk_size=mom.chunk_size).atoms[0].double().cpu()
        mom._offset_shift = with_offset - without
    return mom._offset_shift


@keyword_options
def warm_start(features, counts=None, tokens=None, *, num_components: int = 3,
               method: str = "auto", seed=None, dtype=None, device=None,
               num_inits: int | None = None, prior_scale: float | None = None,
               offset=None) -> WarmStart:
    """A starting point for EM from the latent moments of the counts.

    Args:
        features: (p, L) features of the support points (not modified).
        counts: (p,) nonnegative counts; or ``tokens``: (N,) draws in [0, p).
        num_components: K.
        method: ``"projection"``, ``"tensor"``, ``"subspace"``, ``"random"`` (see the module
            docstring) or ``"auto"``: the start that :func:`~pyro_softmix.fit_em` uses by default,
            found by a short batched EM race over many starts (see :ref:`warm-starts`): the
            race's leader (``fit_em(init="auto")`` also runs the race's other survivors to
            convergence and keeps the best); or ``"tempered"``: ``"auto"`` with one of its
            random starts replaced by a start grown on the counts raised to the power
            ``GROWN_TEMPER`` = 0.5, for components with peaked distributions.
        seed: int or ``torch.Generator`` (same seed, same start).
        dtype, device: precision and device of the computation.
        num_inits: for ``"auto"`` and ``"tempered"``, the number of raced starts (as in
            :func:`~pyro_softmix.fit_em`).
        prior_scale: for ``"auto"`` and ``"tempered"``, race on the MAP objective of
            ``fit_em(prior_scale=...)``.
        offset: (p,) known term of every component's logits, as in :func:`~pyro_softmix.fit_em`.
            The moment methods assume a uniform base measure; with an offset their atoms are
            shifted by the difference of the one-component fits with and without it (exact
            when the offset is X c: every atom then moves by -c).

    Returns:
        :class:`WarmStart` with ``weights`` (K,) and ``atoms`` (K, L), usable as
        ``fit_em(init=start)``.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=5000, num_features=4, num_components=2, seed=0)
        >>> start = psm.warm_start(data.features, data.counts, num_components=2,
        ...                        method="tensor", seed=0)
        >>> tuple(start.weights.shape), tuple(start.atoms.shape)
        ((2,), (2, 4))
    """
    if not isinstance(method, str) or method not in WARM_START_METHODS:
        raise ValueError(f"method must be one of {WARM_START_METHODS}, got {method!r}")
    if method not in ("auto", "tempered") and (num_inits is not None or prior_scale is not None):
        raise ValueError("num_inits and prior_scale apply to method='auto' or 'tempered' only, "
                         f"not {method!r}")
    if num_inits is not None:
        num_inits = check_positive_int(num_inits, "num_inits")
    setup = prepare(features, counts, tokens, None, num_components, dtype, device, None,
                    prior_scale, offset)
    problem, design, z, k = setup.problem, setup.design, setup.z, setup.num_components
    mom = standardised_moments(z, problem.counts64, design, offset=problem.offset)
    gen = make_generator(seed)
    if method in ("auto", "tempered"):
        atoms_z, log_w, _ = auto_start(problem, mom, k, num_inits, gen,
                                       one_component_fit(setup)[0], tempered=method == "tempered")
        weights = log_w[0].exp().double().cpu()  # the race's leader
        atoms_z = atoms_z[0].double().cpu()
    else:
        weights, atoms_z = moment_start(mom, k, method, gen)
    atoms = design.atoms_from_z(atoms_z.to(design.to_atoms.device))
    loglik = float(problem.start(atoms_z.to(z), weights.log().to(z)).loglik[0])
    like = dict(device=setup.device, dtype=setup.dtype)
    return WarmStart(weights=weights.to(**like), atoms=atoms.to(**like), method=method,
                     atoms_z=atoms_z.to(**like), loglik=loglik)


# ----------------------------------------------------------------------------------------------
# Design-aware random starts
# ----------------------------------------------------------------------------------------------
def _tilted_centre(mom: LatentMoments) -> torch.Tensor:
    """The one-component MLE t_1 (r,): the tilt whose softmax mean matches M1 on this design."""
    res = fit_softmax_regression(mom.z, mom.pihat[:, None], max_steps=50,
                                 chunk_size=mom.chunk_size, offset=mom.offset,
                                 max_step=EM_MAX_STEP)
    return res.atoms[0]


def one_component_fit(setup: Setup) -> tuple[torch.Tensor, float]:
    """The trivial fit every fit must beat: the one-component MLE t_1 (r,) in standardised
    coordinates, and the objective of a K-component mixture with every atom at t_1 (the
    one-component log-likelihood, less the prior's penalty of K such atoms). Computed once per
    set-up and kept on it; one that searches in float32 (``setup.search``) takes t_1 from there."""
    if setup.centre is None:
        problem, k = setup.problem, setup.num_components
        if setup.search is not None:
            centre = one_component_fit(setup.search)[0].to(problem.z)
        else:
            centre = _tilted_centre(standardised_moments(
                setup.z, problem.counts64, setup.design, problem.chunk_size, problem.offset))
        log_w = torch.full((k,), -math.log(k), dtype=centre.dtype, device=centre.device)
        st = problem.start(centre.expand(k, -1).contiguous(), log_w)
        setup.centre, setup.reference = centre, float(problem.objective(st)[0])
    return setup.centre, setup.reference


#: A component whose softmax puts at least this much mass on one support point is saturated.
SATURATED = 1 - 1e-6


def repair_start(setup: Setup, atoms_z: torch.Tensor, log_w: torch.Tensor
                 ) -> tuple[torch.Tensor, str]:
    """A given start (atoms (K, r), log-weights (K,)), moved toward the one-component fit
    where it is worse than the uniform distribution over the support points (all atoms at 0)
    and some component's softmax is saturated (all its mass on one point): its atoms are then
    far from the data, where EM barely moves. The atoms become t_1 + s (t_k - t_1), t_1 the
    one-component fit, with the largest s in 1/2, 1/4, ... whose objective beats the uniform
    distribution's. Returns the atoms and the start's label; warns
    (:class:`~pyro_softmix.StartWarning`) when it moved them."""
    problem = setup.problem

    def objective(atoms):
        return float(problem.objective(problem.start(atoms, log_w))[0])

    value = objective(atoms_z)
    saturated = bool((problem.workspace.q.amax(0) >= SATURATED).any())
    uniform = objective(torch.zeros_like(atoms_z))
    if math.isfinite(value) and (value >= uniform or not saturated):
        return atoms_z, "given"
    centre, _ = one_component_fit(setup)
    for i in range(1, 61):
        moved = centre + 2.0**-i * (atoms_z - centre)
        if (v := objective(moved)) >= uniform:
            warn_user(
                f"the start's objective ({value:.6g}) is below the uniform distribution's "
                f"({uniform:.6g}): its atoms are far from the data, where EM barely moves. "
                f"They were moved toward the one-component fit, to 2^-{i} of their distance "
                f"(objective {v:.6g}); pass a better init or use init='auto'", StartWarning)
            return moved, f"given (moved toward the one-component fit, scale 2^-{i})"
    raise ValueError(f"init: the start's objective ({value:.6g}) is below the uniform "
                     f"distribution's ({uniform:.6g}) and moving it toward a one-component fit "
                     "does not help; use init='auto'")


def _mixture_spread(z: torch.Tensor, dist2: torch.Tensor, atoms: torch.Tensor,
                    offset: torch.Tensor | None = None) -> float:
    """Mean over starts of sum_j pi(j) dist2_j for the equal-weight mixtures of atoms (S, K, r)."""
    s, k, r = atoms.shape
    pi = offset_logits(z, atoms.reshape(s * k, r), offset)
    column_logsumexp(pi, pi)  # (the softmax, in place)
    return float(weighted_sums(dist2, pi).view(s, k).mean(1).mean())  # (each start's mixture)


#: Bisection steps for the calibrated scale: sigma to within 3% (ample for a random start).
_CALIBRATION_STEPS = 7


def calibrated_atoms(mom: LatentMoments, num_components: int, num_starts: int,
                     gen: torch.Generator, centre: torch.Tensor) -> torch.Tensor | None:
    """(S, K, r) random atoms around the one-component MLE, in all r directions, at a
    design-aware distance; on the device and in the dtype of ``mom.z``. None where no scale
    fits: the data are more concentrated than the one-component fit itself (a mixture of
    peaked components, such as a language model's next-token distributions), and random atoms
    near it start EM at the saddle where all atoms coincide.

    The scale sigma is set so that the equal-weight mixtures of the starts spread their mass
    over the design as much as the data do: sum_j pi_sigma(j) |z_j - M1|^2 equals
    sum_j pihat_j |z_j - M1|^2 (bisection on log sigma). Unlike the scale from M2 this uses the
    design's own tilting (its empirical moment generating function), so it stays right on
    heavy-tailed, non-Gaussian designs.
    """
    z = mom.z
    r = mom.m1.shape[0]
    if r == 1:
        # On a line the unit directions are +-1, so with K >= 3 atoms of a start would coincide,
        # a fixed point of EM. One offset per stratum of [-1, 1] instead, shifted at random.
        shift = torch.rand((num_starts, 1), generator=gen, dtype=torch.float64)
        strata = torch.arange(num_components, dtype=torch.float64)
        noise = (2 * (strata + shift) / num_components - 1)[..., None]
    else:
        # Unit directions: every atom starts at the same distance sigma from the centre
        # (Gaussian offsets in few dimensions would put some atoms far out, where a component
        # can lock onto a single extreme support point).
        noise = _gaussian_draws((num_starts, num_components, r), gen)
        noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    noise = noise.to(z)
    centre = centre.to(z)
    dist2 = ((z - mom.m1) ** 2).sum(1)  # (p,)
    target = float(ordered_dot(mom.pihat, dist2))
    lo, hi = math.log(1e-2), math.log(1e1)
    if _mixture_spread(z, dist2, centre + math.exp(lo) * noise, mom.offset) >= target:
        return None  # the data are more concentrated than the one-component fit
    for _ in range(_CALIBRATION_STEPS):
        mid = 0.5 * (lo + hi)
        if _mixture_spread(z, dist2, centre + math.exp(mid) * noise, mom.offset) < target:
            lo = mid
        else:
            hi = mid
    return centre + math.exp(0.5 * (lo + hi)) * noise


# ----------------------------------------------------------------------------------------------
# The race of starts (the "auto" start, and several starts of any method)
# ----------------------------------------------------------------------------------------------
def check_init(init, num_inits):
    """``init`` is a start method's name, a mapping with ``weights`` and ``atoms``, or an object
    with those attributes (a fit, a warm start); returns the checked ``num_inits``."""
    if isinstance(init, str):
        if init not in WARM_START_METHODS:
            raise ValueError(f"init must be one of {WARM_START_METHODS} or a start with weights "
                             f"and atoms, got {init!r}")
    elif isinstance(init, Mapping):
        missing = sorted({"weights", "atoms"} - set(init))
        if missing:
            raise ValueError(f"init as a mapping needs the keys 'weights' and 'atoms'; it has "
                             f"{sorted(map(str, init))}, missing {missing}")
    elif not (hasattr(init, "weights") and hasattr(init, "atoms")):
        raise TypeError(f"init must be one of {WARM_START_METHODS}, a mapping with 'weights' "
                        f"and 'atoms', or a fit; got {type(init).__name__}")
    if num_inits is not None:
        num_inits = check_positive_int(num_inits, "num_inits")
    return num_inits


#: Relative gap to which the intermediate fits of :func:`grown_start` are run: the next split
#: needs their components, not their last digits.
GROWN_TOL = 1e-5
#: EM iterations at most per intermediate number of components of :func:`grown_start`.
GROWN_MAX_ITER = 40
#: Power gamma of the counts on which ``init="tempered"`` grows its start
#: (:func:`tempered_grown_start`).
GROWN_TEMPER = 0.5


def grown_start(problem: EMProblem, centre: torch.Tensor, max_iter: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K = ``problem.num_components`` atoms (K, r) and log-weights (K,) grown from the
    one-component fit ``centre`` (r,) by K - 1 splits of the worst component, with EM to
    ``GROWN_TOL`` (at most ``GROWN_MAX_ITER`` iterations) on each intermediate number of
    components; and the EM iterations spent. With K = 2 it costs one E-step and one
    covariance."""
    last = problem.num_components
    st = problem.with_starts(1, 1).start(centre[None], centre.new_zeros(1))
    atoms, log_w, spent = st.atoms, st.log_weights, 0
    for k in range(1, last):
        atoms, weights, _ = split_worst(problem, st)
        log_w = weights.log()
        if k + 1 == last:
            break
        grown = problem.with_starts(1, k + 1)
        if spent < max_iter:  # the run's final state is the next split's E-step
            done = run(grown, atoms, log_w, min(GROWN_MAX_ITER, max_iter - spent), GROWN_TOL)
            st, spent = done.state, spent + len(done.history) - 1
        else:
            st = grown.start(atoms, log_w)
    return atoms, log_w, spent


def tempered_grown_start(problem: EMProblem, centre: torch.Tensor, max_iter: int,
                         gamma: float = GROWN_TEMPER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`grown_start` on the tempered counts n_j^gamma, its atoms divided by gamma.

    A softmax raised to the power gamma is the softmax of gamma times its atom, so tempering
    flattens every component's peaks. On data whose components put most of their mass on a few
    points (a language model's peaked contexts), the plain grown start sends its heavy components
    off to faces of the points' hull, where each holds the top points of several components; on
    the tempered counts those faces pay less, and the components stay finite. For grouped data
    the counts are those summed over groups.
    """
    offset = None if problem.offset is None else gamma * problem.offset
    penalty = None if problem.penalty is None else problem.penalty / gamma ** 2
    tempered = EMProblem(problem.z, problem.counts64 ** gamma, problem.num_components,
                         problem.chunk_size, 1, penalty, offset)
    tempered._wide = problem._wide  # shares the float64 copy of z (EMProblem.precise)
    one = run(tempered.with_starts(1, 1), (gamma * centre)[None], centre.new_zeros(1),
              GROWN_MAX_ITER, GROWN_TOL)
    atoms, log_w, spent = grown_start(tempered, one.state.atoms[0], max_iter)
    return atoms / gamma, log_w, spent + len(one.history) - 1


def auto_start(problem: EMProblem, mom, k: int, num_inits: int | None,
               gen: torch.Generator, centre: torch.Tensor, max_iter: int = 1000,
               progress: bool | None = False, accelerate: bool = True,
               tempered: bool = False):
    """The ``"auto"`` start: ``num_inits`` starts raced in one batch, all design-calibrated
    random starts in all r directions (:func:`calibrated_atoms`) but the last, which is grown
    from the one-component fit by splits (:func:`grown_start`). With
    K = 1 it is the one-component fit ``centre`` (the MLE); where the data are more
    concentrated than random starts can be, the grown start alone; with ``num_inits=1``, one
    random start. With ``tempered`` (``init="tempered"``) the last random start is replaced by
    one grown on tempered counts (:func:`tempered_grown_start`), which then always takes part.

    Neither the tensor start nor M2's top eigenspace is used: where the moments are noisy (real
    embeddings, or r not small against the effective number of support points) both point away
    from the atoms, and a start led there ends at a worse optimum; see ``docs/warmstarts.md``.

    Returns the starts to finish, best first: atoms (S', K, r) and log_weights (S', K); and
    the start's label.
    """
    name = "tempered" if tempered else "auto"
    centre = centre.to(mom.z)  # the one-component fit (one_component_fit)
    if k == 1:
        return centre[None, None], centre.new_zeros(1, 1), f"{name} (the one-component fit)"
    n = num_inits or AUTO_NUM_INITS
    if tempered and n == 1:
        atoms, log_w, spent = tempered_grown_start(problem, centre, max_iter)
        return atoms[None], log_w[None], f"tempered (grown by splits, {spent} iterations)"
    atoms = calibrated_atoms(mom, k, n, gen, centre)  # on problem.z's device, in its dtype
    if n > 1 or atoms is None:
        grown, grown_w, spent = grown_start(problem, centre, max_iter)
        if atoms is None:
            if not tempered:
                return grown[None], grown_w[None], f"auto (grown by splits, {spent} iterations)"
            n, atoms = 2, grown.new_empty(2, *grown.shape)  # no random start: the grown two
    log_w = torch.full((n, k), -math.log(k), dtype=atoms.dtype, device=atoms.device)
    if n == 1:
        return atoms, log_w, "auto"
    atoms[-1], log_w[-1] = grown, grown_w  # one start grown by splits, the others random
    if tempered:  # and one grown on tempered counts
        atoms[-2], log_w[-2], _ = tempered_grown_start(problem, centre, max_iter)
    bar = progress_bar(progress, None, "EM starts")
    try:
        atoms, log_w, spent = race(problem, atoms, log_w, max_iter, bar, accelerate)
    finally:
        if bar is not None:
            bar.close()
    return atoms, log_w, race_label(name, n, spent, atoms)


def choose_start(setup: Setup, init, num_inits, max_iter, seed, progress,
                 accelerate: bool = True):
    """(atoms_z (S, K, r), log_weights (S, K), label): the starts of the final EM runs, best
    first (S > 1 only when a race left several survivors)."""
    problem, design, z, k = setup.problem, setup.design, setup.z, setup.num_components
    if not isinstance(init, str):
        atoms_z, log_w = user_start(init, k, design, z)
        atoms_z, label = repair_start(setup, atoms_z, log_w)
        pending = getattr(init, "pending", None)
        if pending is None:
            return atoms_z[None], log_w[None], label
        # A checkpoint: its state, then the starts it had still to run and its best run.
        more = [user_start({"weights": w, "atoms": a}, k, design, z)
                for w, a in zip(*pending, strict=True)]
        atoms = torch.stack([atoms_z] + [a for a, _ in more])
        log_ws = torch.stack([log_w] + [w for _, w in more])
        return atoms, log_ws, "given (resumed from a checkpoint)"
    gen = make_generator(seed)
    mom = standardised_moments(z, problem.counts64, design, problem.chunk_size, problem.offset)
    if init in ("auto", "tempered"):
        centre, _ = one_component_fit(setup)
        return auto_start(problem, mom, k, num_inits, gen, centre, max_iter, progress,
                          accelerate, tempered=init == "tempered")
    n = num_inits or 1
    starts = [moment_start(mom, k, init, gen) for _ in range(n)]
    log_w = torch.stack([w for w, _ in starts]).log().to(z)
    atoms = torch.stack([a for _, a in starts]).to(z)
    if n == 1:
        return atoms, log_w, init
    atoms_z, log_w, spent = race(problem, atoms, log_w, max_iter, accelerate=accelerate)
    return atoms_z, log_w, race_label(init, n, spent, atoms_z)
