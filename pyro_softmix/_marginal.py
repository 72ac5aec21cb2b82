# SPDX-License-Identifier: Apache-2.0
"""Gradient and Hessian of the marginal log-likelihood of a softmax mixture (for Newton steps).

Parameters: atoms t_k (K, r) and weight logits eta (K,) with alpha = softmax(eta); eta_K is held
fixed (softmax ignores a common shift), so there are K r + K - 1 free coordinates. With
u_jk = eta_k - lse(eta) + z_j . t_k - c_k (c_k the column log-normaliser), responsibilities
r_jk = softmax_k(u_j), w = n r, W_k = sum_j w_jk, q_k = softmax(z t_k), m_k = z^T q_k and
l = sum_j n_j logsumexp_k u_jk:

    grad_t_k  = z^T w_k - W_k m_k,              grad_eta = W - N alpha,
    Hessian   = sum_j n_j J_j^T (diag r_j - r_j r_j^T) J_j + sum_jk w_jk d^2 u_jk,

where row k of J_j is a_jk = (z_j - m_k in block t_k, e_k - alpha in the eta block). Writing
b_j = sum_k r_jk a_jk, the first sum is sum_jk w_jk a_jk a_jk^T - sum_j n_j b_j b_j^T, and
d^2 u_jk is -Cov_{q_k}(z) in block t_k and -(diag alpha - alpha alpha^T) in the eta block. So

    H_{t_k t_k}   = sum_j (w_jk - W_k q_jk) z_j z_j^T - m_k g_k^T - g_k m_k^T - [B^T B]_{kk}
    H_{t_k eta}   = g_k (e_k - alpha)^T - [B^T B]_{k eta}
    H_{eta eta}   = sum_k W_k (e_k - alpha)(e_k - alpha)^T - N (diag alpha - alpha alpha^T)
                    - [B^T B]_{eta eta}

with B the (p, K r + K) matrix of rows sqrt(n_j) b_j (rows with n_j = 0 drop out). Building
B^T B costs p (K r + K)^2, about K times one EM iteration's Hessians: worth it near the optimum,
where Newton converges quadratically and EM only linearly.
"""

from __future__ import annotations

import torch

from ._cg import cholesky_apply, factor_blocks
from ._chunks import column_sums, ordered_dot, row_product, rows_per_chunk, weighted_sums
from ._gram import heavy_cov, weighted_gram

#: From this many coordinates K r + K on, the Hessian's products over the rows of a float64
#: problem are formed in float32 chunks of at most _MIXED_CHUNK_ROWS rows, summed in float64.
_MIXED_MIN_DIM = 32
_MIXED_CHUNK_ROWS = 4096


def marginal_gradient(z: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                       log_weights: torch.Tensor):
    """(D,) float64 gradient of l, and the pieces the Hessian reuses (g_t, m, W, alpha)."""
    total_w = column_sums(w)  # W (K,)
    alpha = log_weights.exp()
    mean_q = weighted_sums(q, z)  # (K, r)
    g_t = weighted_sums(w, z) - total_w[:, None] * mean_q  # (K, r)
    g_eta = total_w - total_w.sum() * alpha
    grad = torch.cat([g_t.reshape(-1), g_eta]).double()[:-1]  # eta_K is fixed
    return grad, (g_t, mean_q, total_w, alpha)


def mixed_precision(z: torch.Tensor, num_components: int) -> bool:
    """Whether :func:`marginal_hessian` forms its products in float32 (unless ``precise``)."""
    return z.dtype == torch.float64 and num_components * (z.shape[1] + 1) >= _MIXED_MIN_DIM


def marginal_hessian(z: torch.Tensor, counts: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                     pieces, support: torch.Tensor | None = None, precise: bool = False,
                     chunk_size: int | None = None) -> torch.Tensor:
    """(D, D) float64 Hessian of l, D = K r + K - 1, coordinates ordered
    (t_1, ..., t_K, eta_1 .. eta_{K-1}).

    Args:
        z: (p, r) standardised features.  counts: (p,) n.
        q: (p, K) softmax(z @ atoms.T, 0).  w: (p, K) n_j r_jk from the E-step.
        pieces: the second output of :func:`marginal_gradient` at the same point.
        support: indices of the rows with n_j > 0 (computed if None).
        precise: form every product in z's dtype (no mixed precision).
        chunk_size: rows per chunk of the products over the rows (default: the device's
            budget, :mod:`pyro_softmix._chunks`; at most ``_MIXED_CHUNK_ROWS`` in mixed
            precision, where each chunk's float32 sum must stay accurate).
    """
    g_t, mean_q, total_w, alpha = pieces
    p, r = z.shape
    k = q.shape[1]
    n_total = total_w.sum()
    dim = k * r + k
    h = z.new_zeros(dim, dim)
    # For a float64 problem with enough coordinates the two products over the p rows (the
    # block-diagonal Grams and B^T B, most of the cost) run in float32 per chunk and are summed
    # in float64 (mixed precision: about 2x faster on CPUs; Newton steps need far less than
    # float32 accuracy from the Hessian, and the gradient stays float64).
    mixed = not precise and mixed_precision(z, k)
    btype = torch.float32 if mixed else z.dtype
    # Block diagonal: sum_j (w_jk - W_k q_jk) z_j z_j^T - m_k g_k^T - g_k m_k^T.

    def rows(num_rows: int, row_bytes: int) -> int:
        chunk = rows_per_chunk(num_rows, row_bytes, z.device, chunk_size)
        return min(chunk, _MIXED_CHUNK_ROWS) if mixed else chunk

    gram = weighted_gram(z, w - total_w * q, chunk_size=rows(p, k * r * z.element_size()),
                         compute_dtype=btype)
    gram = gram - mean_q[:, :, None] * g_t[:, None, :] - g_t[:, :, None] * mean_q[:, None, :]
    h[:k * r, :k * r] = torch.block_diag(*gram)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    e_minus = eye - alpha  # row c: e_c - alpha
    # Cross t_k / eta: g_k (e_k - alpha)^T.
    h[:k * r, k * r:] = (g_t[:, :, None] * e_minus[:, None, :]).reshape(k * r, k)
    h[k * r:, :k * r] = h[:k * r, k * r:].T
    h[k * r:, k * r:] = (e_minus.T * total_w) @ e_minus - n_total * (torch.diag(alpha)
                                                                     - alpha[:, None] * alpha)
    # - B^T B, chunked over the rows with n_j > 0.
    # The rows of B are written in place into one buffer: building them from temporaries
    # cost as much as the product itself.
    support = torch.nonzero(counts > 0).squeeze(1) if support is None else support
    chunk = rows(support.shape[0], dim * z.element_size())
    buffer = z.new_empty(chunk, dim, dtype=btype)
    product = z.new_empty(dim, dim, dtype=btype)
    mean = mean_q.to(btype)
    weights = alpha.to(btype)
    for s in range(0, support.shape[0], chunk):
        idx = support[s:s + chunk]
        c = idx.shape[0]
        b = buffer[:c]
        root_n = counts[idx].sqrt()[:, None].to(btype)
        scaled = w[idx].to(btype).div_(root_n)  # sqrt(n_j) r_jk
        b_t = b[:, :k * r].view(c, k, r)
        torch.sub(z[idx].to(btype)[:, None, :], mean, out=b_t).mul_(scaled[:, :, None])
        torch.mul(weights, root_n, out=b[:, k * r:]).neg_().add_(scaled)
        h.sub_(row_product(b, b, out=product))
    return h.double()[:-1, :-1]  # eta_K is fixed


def marginal_hvp(z: torch.Tensor, counts: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                 pieces):
    """v -> H v for the Hessian H of :func:`marginal_hessian` at one point, without forming H:
    each product is two passes over the features, z @ v_t.T and a (K, p)(p, r) product, plus
    O(p K) work (Hessian-free). What does not depend on v is computed once, here.

    With A = z v_t^T (p, K), e = (v_eta, 0) and c_jk = A_jk - m_k . v_k + e_k - alpha . e,
    the formula of the module docstring gives (s_j = sum_k r_jk c_jk):

        (H v)_t_k = z^T [(w_k - W_k q_k) A_k - w_k s] - m_k g_k.v_k - g_k m_k.v_k
                    + g_k (e_k - alpha . e) + m_k sum_j w_jk s_j
        (H v)_eta = (I - 1 alpha^T)(g.v) + [E^T diag(W) E - N (diag alpha - alpha alpha^T)] e
                    - sum_j s_j (w_j - n_j alpha)

    Args: as :func:`marginal_hessian`. Returns: a function of a (D,) vector in the same
    coordinates, giving (D,) in z's dtype.
    """
    g_t, mean_q, total_w, alpha = pieces
    k, r = mean_q.shape
    resp = w / counts.clamp_min(torch.finfo(z.dtype).tiny)[:, None]  # r_jk (0 where n_j = 0)
    spread = w - total_w * q  # w_jk - W_k q_jk
    e_minus = torch.eye(k, dtype=z.dtype, device=z.device) - alpha
    eta_block = (e_minus.T * total_w) @ e_minus - total_w.sum() * (torch.diag(alpha)
                                                                   - alpha[:, None] * alpha)

    def times(v: torch.Tensor) -> torch.Tensor:
        v_t = v[:k * r].view(k, r).to(z.dtype)
        e = torch.cat([v[k * r:].to(z.dtype), v.new_zeros(1, dtype=z.dtype)])
        a = z @ v_t.T  # (p, K)
        mv = (mean_q * v_t).sum(1)  # m_k . v_k
        gv = (g_t * v_t).sum(1)  # g_k . v_k
        ea = e - alpha @ e  # e_k - alpha . e
        s = (resp * (a - mv + ea)).sum(1)  # (p,)
        ws = w * s[:, None]
        out_t = weighted_sums((spread * a).sub_(ws), z)
        ws_total = column_sums(ws)
        out_t += (ws_total - gv)[:, None] * mean_q + (ea - mv)[:, None] * g_t
        out_eta = (gv - alpha * gv.sum()) + eta_block @ e
        out_eta -= ws_total - alpha * ordered_dot(counts, s)
        return torch.cat([out_t.reshape(-1), out_eta[:-1]])

    return times


def neg_hessian_times(problem, st, pieces, pen: torch.Tensor | None,
                      narrow: torch.Tensor | None):
    """v -> -H v (float64) at ``st``, an EM state of the one-start ``problem`` (``pen``: the
    prior's precision or None), for the Newton-CG finish: two passes over z, or over
    ``narrow``, the float32 design a float64 twin was made from (2.5x faster at p = 49,152,
    r = 576, K = 4: enough for the loose solves' steps; convergence is certified in float64)."""
    k, r = problem.num_components, problem.z.shape[1]
    z = problem.z if narrow is None else narrow
    q, w = problem.workspace.q.to(z.dtype), st.w.to(z.dtype)
    hess_times = marginal_hvp(z, problem.counts.to(z.dtype), q, w,
                              tuple(x.to(z.dtype) for x in pieces))
    pen = None if pen is None else pen.to(z.dtype)

    def times(v):
        out = -hess_times(v).double()
        if pen is not None:
            out[:k * r] += (v[:k * r].view(k, r).to(z.dtype) @ pen).reshape(-1).double()
        return out

    return times


def em_preconditioner(problem, st, pieces, pen: torch.Tensor | None):
    """v -> P^-1 v (float64) for the Newton-CG finish's preconditioner, the block-diagonal
    complete-data information P at ``st`` (see :func:`~pyro_softmix.accelerate.newton_cg_finish`)."""
    _, mean_q, total_w, alpha = pieces
    k, r = mean_q.shape
    cov = heavy_cov(problem.z, problem.workspace.q, chunk_size=problem.chunk_size)
    blocks = total_w[:, None, None].to(cov) * cov
    if pen is not None:
        blocks = blocks + pen.to(cov)
    a = alpha.double()
    info_eta = float(total_w.sum()) * (torch.diag(a) - a[:, None] * a)[:-1, :-1]
    # The ridge: float32 rounding of each block (its covariances come from the compute dtype).
    chol_t, chol_eta = factor_blocks(blocks.double(), 1e-7), factor_blocks(info_eta[None])[0]

    def apply(v):
        out_t = cholesky_apply(chol_t, v[:k * r].view(k, r)).reshape(-1)
        out_eta = cholesky_apply(chol_eta[None], v[None, k * r:])[0]
        return torch.cat([out_t, out_eta])

    return apply
