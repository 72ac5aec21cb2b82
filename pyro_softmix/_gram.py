# SPDX-License-Identifier: Apache-2.0
"""Weighted Gram and covariance matrices of the support points' features, chunked over the rows
(the p r^2 K part of an M-step, and of the information matrices)."""

from __future__ import annotations

import torch

from ._chunks import batch_threads, column_sums, ordered_sum, row_product, rows_per_chunk, weighted_sums

__all__ = ["HEAVY_DENSE", "PRECONDITIONER_TAIL", "gram_chunk_rows", "heavy_cov", "weighted_cov",
           "weighted_gram"]

#: Mass of each column of q that the covariances of a preconditioner may leave out (:func:`heavy_cov`).
PRECONDITIONER_TAIL = 1e-2
#: Share of a column's rows kept above which :func:`heavy_cov` takes all its rows.
HEAVY_DENSE = 0.5


def gram_chunk_rows(features: torch.Tensor, num_components: int,
                    chunk_size: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Rows per chunk of the (chunk, K, r) temporaries of :func:`weighted_gram` and
    :func:`weighted_cov`, in ``dtype`` (default: the features'), under the one budget of
    :mod:`pyro_softmix._chunks`."""
    row_bytes = num_components * features.shape[1] * (dtype or features.dtype).itemsize
    return rows_per_chunk(features.shape[0], row_bytes, features.device, chunk_size)


def weighted_gram(features: torch.Tensor, probs: torch.Tensor, chunk_size: int | None = None,
                   buffer: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j probs_jk z_j z_j^T for every k, chunked over j.

    Each chunk is one (r x c)(c x K r) matrix product into a single accumulator, with the
    (c, K, r) product of weights and features written into ``buffer`` when given, so a call
    makes no large allocation. With ``compute_dtype`` (float32 for float64 features) each
    chunk's product is computed in that dtype and summed in the features' dtype.

    Args:
        features: (p, r).  probs: (p, K) nonnegative.
        buffer: optional (chunk, K, r) scratch tensor (its length sets the chunk).
    Returns:
        (K, r, r) symmetric positive semidefinite matrices.
    """
    p, r = features.shape
    k = probs.shape[1]
    chunk = buffer.shape[0] if buffer is not None else gram_chunk_rows(features, k, chunk_size)
    acc = features.new_zeros(r, k * r)
    cast = compute_dtype is not None and compute_dtype != features.dtype
    product = features.new_empty(r, k * r, dtype=compute_dtype or features.dtype)
    for s in range(0, p, chunk):
        zc = features[s:s + chunk]
        pc = probs[s:s + chunk]
        if cast:
            zc, pc = zc.to(compute_dtype), pc.to(compute_dtype)
        c = zc.shape[0]
        out = buffer[:c] if buffer is not None else None
        weighted = torch.mul(zc.unsqueeze(1), pc.unsqueeze(-1), out=out)
        acc.add_(row_product(zc, weighted.view(c, k * r), out=product))
    return acc.view(r, k, r).transpose(0, 1).contiguous()


def weighted_cov(features: torch.Tensor, probs: torch.Tensor, mean: torch.Tensor,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
                 chunk_size: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j probs_jk (z_j - m_k)(z_j - m_k)^T for every k (the covariances of z under the
    columns of ``probs`` when they sum to 1, with ``mean`` (K, r) their means), chunked over j.

    Centred before the products, so no m m^T is subtracted afterwards: in float32 that
    difference loses every digit of a covariance much smaller than |m|^2 (a component
    concentrated on a few support points far out). Each chunk's K products run in the
    features' dtype, or in ``compute_dtype`` (float32 for float64 features: 2.5-3.5x faster
    on CPUs, for preconditioners), and are summed in float64.

    Args:
        features: (p, r).  probs: (p, K) nonnegative.  mean: (K, r).
        buffers: two (chunk, K, r) scratch tensors in the compute dtype (their length sets
            the chunk).
    Returns:
        (K, r, r) symmetric positive semidefinite matrices in the features' dtype.
    """
    p, r = features.shape
    k = probs.shape[1]
    dtype = compute_dtype or features.dtype
    if buffers is None:
        chunk = gram_chunk_rows(features, k, chunk_size, dtype)
        buffers = (features.new_empty(chunk, k, r, dtype=dtype),
                   features.new_empty(chunk, k, r, dtype=dtype))
    centred_all, weighted_all = buffers
    chunk = centred_all.shape[0]
    acc = torch.zeros(k, r, r, dtype=torch.float64, device=features.device)
    mean = mean.to(dtype)
    for s in range(0, p, chunk):
        zc = features[s:s + chunk].to(dtype)
        c = zc.shape[0]
        centred = torch.sub(zc.unsqueeze(1), mean, out=centred_all[:c])  # (c, K, r)
        weighted = torch.mul(centred, probs[s:s + chunk].to(dtype).unsqueeze(-1),
                             out=weighted_all[:c])
        if k == 1:  # (the same bits on any thread count: see row_product)
            acc[0] += row_product(centred[:, 0], weighted[:, 0])
        else:
            with batch_threads(k):
                acc += torch.bmm(centred.permute(1, 2, 0), weighted.transpose(0, 1))
    return acc.to(features.dtype)


def heavy_cov(features: torch.Tensor, probs: torch.Tensor, tail: float = PRECONDITIONER_TAIL,
              chunk_size: int | None = None) -> torch.Tensor:
    """Covariances (K, r, r) of standardised features z (z^T z / p = I) under each column of
    ``probs`` (columns summing to 1), from the rows where probs_jk >= tail / p only: the rows
    left out hold a mass delta_k <= ``tail`` of the column (each row less than tail / p). The
    kept weights are renormalised, and the left-out mass enters as delta_k I, the share of the
    design's covariance it would carry if spread like the design. That keeps the matrix
    positive definite where the kept rows span less than r dimensions (a column on one row).

    For preconditioners, which need not be exact: a peaked column (a language model's
    next-token distribution: 1% of its mass on the last 88-99.7% of SmolLM2's tokens) costs
    m_k r^2 for its m_k kept rows instead of p r^2. The kept rows are gathered in chunks,
    two passes (the mean, then the centred products summed in float64). A column with more
    than ``HEAVY_DENSE`` of its rows kept (a random start's flat softmax) takes all its rows
    instead, its exact covariance, in one batched pass with the other such columns, its
    products in float32 (:func:`weighted_cov`): gathering nearly every row cost 1.6-6.5x more,
    and float64 products 2.5-3.5x more.

    Args:
        features: (p, r).  probs: (p, K) nonnegative, columns summing to 1.
    Returns:
        (K, r, r) symmetric positive semidefinite matrices in the features' dtype.
    """
    p, r = features.shape
    heavy = probs >= tail / p
    dense = heavy.sum(0) > HEAVY_DENSE * p
    out = features.new_empty(probs.shape[1], r, r)
    if bool(dense.any()):
        q = probs[:, dense]
        q = q / column_sums(q).clamp_min(torch.finfo(q.dtype).tiny)
        out[dense] = weighted_cov(features, q, weighted_sums(q, features), chunk_size=chunk_size,
                                  compute_dtype=torch.float32)
    chunk = rows_per_chunk(p, 2 * r * features.element_size(), features.device, chunk_size)
    for c in (~dense).nonzero().squeeze(1).tolist():
        col = probs[:, c]
        idx = torch.nonzero(heavy[:, c]).squeeze(1)
        w = col[idx]
        kept = ordered_sum(w)
        w = w / kept.clamp_min(torch.finfo(w.dtype).tiny)
        mean = features.new_zeros(r)
        for s in range(0, idx.numel(), chunk):
            mean += weighted_sums(w[s:s + chunk], features[idx[s:s + chunk]])
        acc = torch.zeros(r, r, dtype=torch.float64, device=features.device)
        for s in range(0, idx.numel(), chunk):
            centred = features[idx[s:s + chunk]] - mean
            acc += row_product(centred, centred * w[s:s + chunk, None]).double()
        acc.diagonal().add_((ordered_sum(col) - kept).clamp_min(0.0).double())
        out[c] = acc.to(features.dtype)
    return out
