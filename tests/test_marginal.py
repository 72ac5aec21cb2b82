# SPDX-License-Identifier: Apache-2.0
"""The marginal log-likelihood's exact gradient and Hessian (the Newton finish's model)."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.engine import EMProblem

from .helpers import hessian_case, simulated


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_marginal_gradient_and_hessian_match_autograd(dtype):
    from pyro_softmix._marginal import marginal_gradient, marginal_hessian

    d = simulated(p=30, L=2, K=3, N=500, seed=1, norm=2.0)
    counts = d.counts.double()
    counts[:5] = 0  # rows without draws drop out of the Hessian
    z = psm.standardize(d.features).transform(d.features)
    k, r = 3, 2
    atoms = torch.randn(k, r, generator=torch.Generator().manual_seed(0))
    eta = torch.tensor([0.3, -0.2, 0.0])

    def loglik(theta):
        t = theta[:k * r].view(k, r)
        log_w = torch.log_softmax(torch.cat([theta[k * r:], torch.zeros(1)]), 0)
        return counts @ torch.logsumexp(torch.log_softmax(z @ t.T, 0) + log_w, 1)

    theta = torch.cat([atoms.reshape(-1), eta[:-1]])
    grad_ref = torch.autograd.functional.jacobian(loglik, theta)
    hess_ref = torch.autograd.functional.hessian(loglik, theta)
    problem = EMProblem(z.to(dtype), counts, k)
    st = problem.start(atoms.to(dtype), torch.log_softmax(eta, 0).to(dtype))
    grad, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    hess = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    # Measured (relative to the largest Hessian entry): 7e-16 in float64, 9e-7 in float32.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(hess_ref.abs().max())
    assert torch.allclose(grad, grad_ref, atol=tol * scale, rtol=0)
    assert torch.allclose(hess, hess_ref, atol=tol * scale, rtol=0)


def test_marginal_hessian_is_the_same_in_chunks():
    """B^T B accumulated over chunks of rows (the last one shorter) equals one pass."""
    from pyro_softmix._marginal import marginal_gradient, marginal_hessian

    d = simulated(p=1000, L=4, K=3, N=5000, seed=2, norm=2.0)
    z = psm.standardize(d.features).transform(d.features)
    problem = EMProblem(z, d.counts, 3)
    atoms = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    st = problem.start(atoms, torch.tensor([0.2, 0.3, 0.5]).log())
    w_before = st.w.clone()
    _, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    whole = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    support = int((d.counts > 0).sum())
    assert support % 100 != 0
    chunked = marginal_hessian(problem.z, problem.counts, problem.workspace.q, st.w, pieces,
                               chunk_size=100)
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-12 * float(whole.abs().max()))
    assert torch.equal(st.w, w_before)  # the E-step weights are read, not written


def test_mixed_precision_hessian_is_float32_accurate_and_precise_on_request(monkeypatch):
    """The Hessian's products over the rows of a float64 problem run in float32 chunks summed
    in float64: within float32 accuracy of the float64 Hessian, in one chunk or many;
    ``precise=True`` gives the all-float64 Hessian."""
    from pyro_softmix import _marginal
    from pyro_softmix._marginal import marginal_hessian, mixed_precision

    problem, st, pieces = hessian_case()
    args = (problem.z, problem.counts, problem.workspace.q, st.w, pieces)
    assert mixed_precision(problem.z, 3) and not mixed_precision(problem.z.float(), 3)
    mixed = marginal_hessian(*args)
    precise = marginal_hessian(*args, precise=True)
    monkeypatch.setattr(_marginal, "_MIXED_CHUNK_ROWS", 700)  # several chunks, a short last one
    chunked = marginal_hessian(*args)
    monkeypatch.setattr(_marginal, "_MIXED_MIN_DIM", 10**9)
    assert torch.equal(marginal_hessian(*args), precise)
    scale = float(precise.abs().max())
    for h in (mixed, chunked):
        err = float((h - precise).abs().max()) / scale
        # Measured: 2e-7 relative (float32 rounding, not zero: the products did run in float32).
        assert 0 < err <= 1e-5
