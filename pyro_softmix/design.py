# SPDX-License-Identifier: Apache-2.0
"""Design standardisation and identifiability.

Softmax probabilities ignore a common shift of the logits, so only the centred features matter.
With mu the mean of the rows and S their (unweighted, 1/p) covariance, the standardised design is

    z_j = W^T (x_j - mu),     W = D^{-1} V_r Lambda_r^{-1/2}       (L x r)

where D = diag(column standard deviations) makes the check scale-free and (V_r, Lambda_r) are
the eigenpairs of the correlation matrix D^{-1} S D^{-1} above a rank tolerance. Then
(1/p) sum_j z_j = 0 and (1/p) sum_j z_j z_j^T = I_r, and z_j is a rotation of S^{-1/2}(x_j - mu)
when the features have full rank.

Atoms map between the two coordinate systems by x_j . theta = z_j . theta_z + const:

    theta = A theta_z          A = P W   (P projects out the non-identifiable directions)
    theta_z = W^T S theta

When the centred features have rank r < L (a constant column, or collinear columns), only the
r-dimensional part of theta is identified. The fit then runs on the r standardised coordinates,
a warning says so, and atoms are reported as the minimum-norm representative: the unique atom
with no component along the null space of S, which gives exactly the same probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_features, warn_user
from ._chunks import column_sums, one_thread, row_product, rows_per_chunk


class IdentifiabilityWarning(UserWarning):
    """The features do not identify every coordinate of the atoms."""


@dataclass(frozen=True)
class Design:
    """Standardisation of a feature matrix (all maps in float64 on the features' device).

    Attributes:
        mean: (L,) column means mu.
        whiten: (L, r) matrix W with z_j = W^T (x_j - mu).
        to_atoms: (L, r) matrix A with theta = A theta_z (minimum-norm representative).
        from_atoms: (L, r) matrix with theta_z = from_atoms^T theta.
        rank: r, the number of identifiable directions.
        num_features: L.
        constant_columns: indices of columns with zero variance.
    """

    mean: torch.Tensor
    whiten: torch.Tensor
    to_atoms: torch.Tensor
    from_atoms: torch.Tensor
    rank: int
    num_features: int
    constant_columns: tuple[int, ...]

    @property
    def is_full_rank(self) -> bool:
        return self.rank == self.num_features

    def atoms_to_z(self, atoms: torch.Tensor) -> torch.Tensor:
        """(..., L) atoms in feature coordinates -> (..., r) standardised coordinates."""
        m = self.from_atoms.to(device=atoms.device, dtype=atoms.dtype)
        with one_thread():  # (MKL's small float64 products vary with the thread count)
            return atoms @ m

    def atoms_from_z(self, atoms_z: torch.Tensor) -> torch.Tensor:
        """(..., r) standardised atoms -> (..., L) minimum-norm atoms in feature coordinates."""
        m = self.to_atoms.to(device=atoms_z.device, dtype=atoms_z.dtype)
        with one_thread():
            return atoms_z @ m.T

    def transform(self, features: torch.Tensor, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None,
                  chunk_size: int | None = None) -> torch.Tensor:
        """Standardised features z (p, r), computed chunk-wise in float64, returned in ``dtype``."""
        dtype = dtype or features.dtype
        device = torch.device(device) if device is not None else features.device
        p = features.shape[0]
        out = torch.empty(p, self.rank, dtype=dtype, device=device)
        chunk = rows_per_chunk(p, features.shape[1] * 8, features.device, chunk_size)
        mean = self.mean.to(features.device)
        whiten = self.whiten.to(features.device)
        for s in range(0, p, chunk):
            xc = features[s:s + chunk].to(torch.float64) - mean
            out[s:s + chunk] = (xc @ whiten).to(device=device, dtype=dtype)
        return out


def feature_scales(features: torch.Tensor) -> torch.Tensor:
    """(L,) standard deviation of every column, 1 for constant columns (the unit of the atoms'
    default prior)."""
    unit = column_units(features, features.shape[0]).to(features.dtype)
    sd = (features / unit).std(0) * unit
    return torch.where(sd > 0, sd, torch.ones_like(sd))


def column_units(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(L,) float64 powers of two that bring columns of extreme magnitude (largest entry beyond
    2^+-300) to about 1, and 1 for every other column (so ordinary designs are untouched to
    the bit)."""
    top = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        top = torch.maximum(top, x[s:s + chunk].abs().amax(0).to(torch.float64))
    extreme = (top > 2.0**300) | ((top < 2.0**-300) & (top > 0))
    power = torch.where(extreme, torch.round(torch.log2(torch.where(top > 0, top, 1.0))), 0.0)
    return torch.exp2(power)


def _rank_tolerance(dtype: torch.dtype, num_features: int) -> float:
    return 100.0 * num_features * torch.finfo(dtype).eps


def standardize(features, *, warn: bool = True, chunk_size: int | None = None) -> Design:
    """Standardise a design and find its identifiable part.

    Args:
        features: (p, L) tensor or array of support-point features.
        warn: emit an :class:`IdentifiabilityWarning` when the rank is below L.
        chunk_size: rows per chunk for the float64 moment pass (default: memory-bounded).

    Returns:
        A :class:`Design`.

    Raises:
        ValueError: if every column is constant (no atom is identified).

    Example:
        >>> import torch
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> d = standardize(x)
        >>> z = d.transform(x)
        >>> bool(torch.allclose(z.T @ z / 100, torch.eye(3, dtype=torch.float64)))
        True
    """
    x = check_features(features)
    p, L = x.shape
    chunk = rows_per_chunk(p, L * 8, x.device, chunk_size)
    # Columns of extreme magnitude (beyond 2^+-300) are scaled by a power of two first, so
    # their squares do not overflow; everything below is then in scaled units, exactly.
    unit = column_units(x, chunk)
    # Two passes in float64 (mean, then centred second moment) for accuracy on shifted data.
    total = torch.zeros(L, dtype=torch.float64, device=x.device)
    for s in range(0, p, chunk):
        total += column_sums(x[s:s + chunk].to(torch.float64) / unit)
    mean = total / p
    cov = torch.zeros(L, L, dtype=torch.float64, device=x.device)
    for s in range(0, p, chunk):
        xc = x[s:s + chunk].to(torch.float64) / unit - mean
        cov += row_product(xc, xc)
    cov /= p
    std = cov.diagonal().clamp_min(0).sqrt()
    rms = (std**2 + mean**2).sqrt()
    # A column is constant when its spread is at rounding level relative to its size. Half
    # precision inputs are computed in float32, so they get float32's tolerances.
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    constant = std <= 100 * torch.finfo(work_dtype).eps * rms
    scale = torch.where(constant, torch.ones_like(std), std)
    tol = _rank_tolerance(work_dtype, L)
    corr = cov / scale[:, None] / scale[None, :]
    corr[constant, :] = 0
    corr[:, constant] = 0
    with one_thread():
        evals, evecs = torch.linalg.eigh(corr)
    keep = evals > tol
    r = int(keep.sum())
    if r == 0:
        raise ValueError("features has no varying column: every column is constant, so the "
                         "softmax probabilities cannot depend on the atoms")
    v_r, lam_r = evecs[:, keep], evals[keep]
    whiten = (v_r / scale[:, None]) * lam_r.rsqrt()
    # theta_z = W^T S theta. Any theta = W theta_z + n with n in null(S) has the same logits;
    # the minimum-norm one removes the component along null(S) = D^{-1} (null eigenvectors),
    # which includes the constant columns (their rows of corr are zero). Back from scaled
    # units: x = unit * x_scaled, so W = W_scaled / unit and S W = unit * (S_scaled W_scaled).
    from_atoms = (cov @ whiten) * unit[:, None]
    whiten = whiten / unit[:, None]
    mean = mean * unit
    null = evecs[:, ~keep] / (scale * unit)[:, None]
    to_atoms = whiten
    if null.shape[1] > 0:
        with one_thread():
            q, _ = torch.linalg.qr(null)
        to_atoms = whiten - q @ (q.T @ whiten)
    const_idx = tuple(int(i) for i in constant.nonzero().flatten())
    if r < L and warn:
        what = []
        if const_idx:
            what.append(f"constant column(s) {list(const_idx)}")
        if L - r > len(const_idx):
            what.append(f"{L - r - len(const_idx)} collinear direction(s)")
        warn_user(
            f"features has rank {r} < {L} after centring ({' and '.join(what)}): only an "
            f"{r}-dimensional part of each atom is identified. Fitting on that part; atoms are "
            "reported as the minimum-norm representative (same probabilities).", IdentifiabilityWarning)
    return Design(mean=mean, whiten=whiten, to_atoms=to_atoms, from_atoms=from_atoms, rank=r,
                  num_features=L, constant_columns=const_idx)
