# SPDX-License-Identifier: Apache-2.0
"""Latent (Hermite) moments of the mixing measure, estimated from counts.

If the standardised design points z_j were draws from N(0, I), tilting them by softmax(z . t)
would give N(t, I), whose Hermite moments are the powers of t (Bing, Bunea, Niles-Weed and
Wegkamp, 2024). Hence, with pihat = n / N and the probabilists' Hermite polynomials He_m,

    M1 = sum_j pihat_j z_j                                  ~ sum_k alpha_k t_k
    M2 = sum_j pihat_j (z_j z_j^T - I)                      ~ sum_k alpha_k t_k t_k^T
    M3(a, b, c) = sum_j pihat_j [(z.a)(z.b)(z.c) - (z.a)(b.c) - (z.b)(a.c) - (z.c)(a.b)]
                                                            ~ sum_k alpha_k (t_k.a)(t_k.b)(t_k.c)
    along a unit v:   sum_j pihat_j He_m(z_j . v)           ~ sum_k alpha_k (t_k . v)^m.

The atoms t_k here are in standardised coordinates (``design.atoms_to_z``). The approximation
error has a sampling part O(N^-1/2) and a design part that shrinks like p^-1/2 for a Gaussian
design but grows quickly with ||t_k||; real designs add a bias. Third and higher moments are only
ever contracted with given vectors, never formed as r^3 tensors.
"""

from __future__ import annotations

import torch

from ._checks import as_tensor, check_counts, check_features, resolve_device, resolve_dtype
from ._chunks import ordered_sum, weighted_sums
from ._gram import weighted_gram
from .design import Design, standardize

__all__ = ["LatentMoments", "hermite", "latent_moments"]


def hermite(x: torch.Tensor, max_order: int) -> torch.Tensor:
    """Probabilists' Hermite polynomials He_0..He_max_order at x: shape ``(max_order + 1, *x.shape)``.

    He_0 = 1, He_1 = x, He_{m+1} = x He_m - m He_{m-1}; E[He_m(X)] = mu^m for X ~ N(mu, 1).
    """
    out = [torch.ones_like(x), x]
    for m in range(1, max_order):
        out.append(x * out[m] - m * out[m - 1])
    return torch.stack(out[:max_order + 1])


def _unit_rows(v: torch.Tensor, name: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if bool((norms == 0).any()) or not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite and nonzero")
    return v / norms


class LatentMoments:
    """Latent moments of a softmax mixture in standardised coordinates.

    Attributes:
        m1: (r,) first moment, about sum_k alpha_k t_k.
        m2: (r, r) second Hermite moment, about sum_k alpha_k t_k t_k^T (computed on first
            access when not given: it costs p r^2, and the default start does not use it).
        design: the :class:`~pyro_softmix.design.Design` (maps atoms to and from z coordinates).
        z: (p, r) standardised features.  pihat: (p,) empirical frequencies.

    Higher moments are contractions: :meth:`m3`, :meth:`m3_basis`, :meth:`along`, :meth:`mixed`.
    """

    def __init__(self, m1: torch.Tensor, m2: torch.Tensor | None, design: Design,
                 z: torch.Tensor, pihat: torch.Tensor, chunk_size: int | None = None,
                 offset: torch.Tensor | None = None):
        self.m1, self._m2, self.design, self.z, self.pihat = m1, m2, design, z, pihat
        #: (p,) known offset of the logits (None: none). The moments above do not use it: they
        #: assume the uniform base measure (see ``warmstart.moment_start`` for the starts).
        self.offset = offset
        #: What the offset moves a component by (r,), computed once by the starts.
        self._offset_shift: torch.Tensor | None = None
        #: Rows per chunk of the passes over the support points (None: the device's budget).
        self.chunk_size = chunk_size
        #: Eigendecomposition of M2 (float64, CPU), computed once on first use by the starts.
        self._m2_eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def m2(self) -> torch.Tensor:
        if self._m2 is None:
            m2 = weighted_gram(self.z, self.pihat[:, None], self.chunk_size)[0]  # no (p, r) temporary
            eye = torch.eye(self.z.shape[1], dtype=self.z.dtype, device=self.z.device)
            self._m2 = 0.5 * (m2 + m2.T) - eye
        return self._m2

    def __repr__(self) -> str:
        return (f"LatentMoments(rank={self.m1.shape[0]}, num_points={self.z.shape[0]}, "
                f"|m1|={float(self.m1.norm()):.3g}, trace(m2)={float(self.m2.trace()):.3g})")

    def _vectors(self, v, name: str) -> torch.Tensor:
        v = as_tensor(v, name).to(self.z)
        if v.shape[-1] != self.z.shape[1]:
            raise ValueError(f"{name} must have last dimension {self.z.shape[1]} (the design's "
                             f"rank), got shape {tuple(v.shape)}")
        return v

    def m3(self, a, b, c) -> torch.Tensor:
        """M3(a, b, c) for batches of vectors a, b, c of shape (..., r) (broadcast): shape (...)."""
        a, b, c = (self._vectors(v, n) for v, n in ((a, "a"), (b, "b"), (c, "c")))
        a, b, c = torch.broadcast_tensors(a, b, c)
        batch = a.shape[:-1]
        a, b, c = (v.reshape(-1, v.shape[-1]) for v in (a, b, c))
        za, zb, zc = self.z @ a.T, self.z @ b.T, self.z @ c.T  # (p, B)
        raw = weighted_sums(self.pihat, za * zb * zc)
        m1 = self.m1
        corr = (a @ m1) * (b * c).sum(-1) + (b @ m1) * (a * c).sum(-1) + (c @ m1) * (a * b).sum(-1)
        return (raw - corr).reshape(batch)

    def m3_basis(self, basis) -> torch.Tensor:
        """The third moment in a basis: T_abc = M3(u_a, u_b, u_c) for the k columns of ``basis``.

        Args:
            basis: (r, k) matrix U.
        Returns:
            (k, k, k) symmetric tensor, computed in O(p r k + p k^3) without any r^3 tensor.
        """
        u = self._vectors(as_tensor(basis, "basis").T, "basis").T
        y = self.z @ u  # (p, k)
        raw = torch.einsum("j,ja,jb,jc->abc", self.pihat, y, y, y)
        mu, gram = u.T @ self.m1, u.T @ u
        corr = (mu[:, None, None] * gram[None] + mu[None, :, None] * gram[:, None, :]
                + mu[None, None, :] * gram[:, :, None])
        return raw - corr

    def along(self, directions, max_order: int) -> torch.Tensor:
        """One-dimensional moments sum_j pihat_j He_m(z_j . v), m = 0..max_order.

        Args:
            directions: (r,) or (B, r) directions (normalised to unit length).
            max_order: highest order m.
        Returns:
            (max_order + 1,) or (B, max_order + 1); about sum_k alpha_k (t_k . v)^m.
        """
        v = _unit_rows(self._vectors(directions, "directions"), "directions")
        s = self.z @ v.mT if v.dim() == 2 else self.z @ v  # (p, B) or (p,)
        he = hermite(s, max_order).movedim(1, 0)  # (p, M + 1) or (p, M + 1, B)
        sums = weighted_sums(self.pihat, he.reshape(he.shape[0], -1))
        return sums.view(he.shape[1:]).movedim(0, -1)

    def mixed(self, direction, max_order: int) -> torch.Tensor:
        """Mixed moments B_m = sum_j pihat_j He_m(z_j . v) P z_j, m = 0..max_order.

        P projects onto the complement of the unit direction v; B_m is about
        sum_k alpha_k (t_k . v)^m P t_k (the Hermite moment of order m along v and 1 across it).

        Returns:
            (max_order + 1, r).
        """
        v = _unit_rows(self._vectors(direction, "direction"), "direction")
        s = self.z @ v
        perp = self.z - s[:, None] * v
        return weighted_sums(hermite(s, max_order).T * self.pihat[:, None], perp)


def latent_moments(features, counts=None, tokens=None, *, design: Design | None = None,
                   dtype=None, device=None) -> LatentMoments:
    """Estimate the latent moments of a softmax mixture's mixing measure from counts.

    Args:
        features: (p, L) features of the support points (not modified).
        counts: (p,) nonnegative counts; or ``tokens``: (N,) draws in [0, p).
        design: a precomputed :func:`~pyro_softmix.standardize` of ``features``.
        dtype, device: where and in which precision to compute (default: the features').

    Returns:
        :class:`LatentMoments` in standardised coordinates (rank r <= L).

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=20_000, num_features=3, num_components=2, seed=0)
        >>> mom = psm.latent_moments(data.features, data.counts)
        >>> tuple(mom.m1.shape), tuple(mom.m2.shape), tuple(mom.along(mom.m1, 3).shape)
        ((3,), (3, 3), (4,))
    """
    x = check_features(features)
    dtype = resolve_dtype(dtype, as_tensor(features, "features"))
    device = resolve_device(device, x)
    n = check_counts(counts, tokens, x.shape[0])
    if design is None:
        design = standardize(x)
    z = design.transform(x, dtype=dtype, device=device)
    return standardised_moments(z, n.to(device=device, dtype=torch.float64), design)


def standardised_moments(z: torch.Tensor, counts: torch.Tensor, design: Design,
                         chunk_size: int | None = None,
                         offset: torch.Tensor | None = None) -> LatentMoments:
    """M1 (and M2 when first read) from standardised features z (p, r) and float64 counts (p,)
    on z's device (``offset``: the engine's (p,) offset, kept for the starts)."""
    pihat = (counts / ordered_sum(counts)).to(z.dtype)
    return LatentMoments(m1=weighted_sums(pihat, z), m2=None, design=design, z=z, pihat=pihat,
                         chunk_size=chunk_size, offset=offset)
