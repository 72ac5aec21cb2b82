# SPDX-License-Identifier: Apache-2.0
"""The device paths: each test runs on the CPU and, where there is one, on a CUDA device, and
compares with the CPU's float64 result (``benchmarks/gpu_check.sh`` runs the CUDA ones)."""

import math

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.engine import prepare

from .conftest import DEVICES


@pytest.fixture(scope="module")
def data():
    return psm.simulate(num_points=800, num_features=6, num_components=3, num_obs=100_000,
                        atom_norm=2.5, seed=3, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_one_em_iteration_matches_the_cpu(data, device):
    """The same start, one iteration (M-step, E-step) on both: the same state in float64."""
    states = []
    for where in ("cpu", device):
        setup = prepare(data.features, data.counts, None, None, 3, torch.float64, where, None)
        gen = torch.Generator().manual_seed(0)
        atoms = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(where)
        log_w = torch.full((3,), -math.log(3), dtype=torch.float64, device=where)
        st, gain = setup.problem.iterate(setup.problem.start(atoms, log_w))
        states.append((st.atoms.cpu(), st.log_weights.cpu(), float(st.loglik[0]),
                       float(gain[0])))
    (a0, w0, l0, g0), (a1, w1, l1, g1) = states
    assert torch.allclose(a0, a1, atol=1e-10) and torch.allclose(w0, w1, atol=1e-12)
    assert l1 == pytest.approx(l0, rel=1e-12) and g1 == pytest.approx(g0, rel=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_with_offset_on_the_device(data, device):
    b = 0.3 * torch.randn(800, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0, offset=b)
    dev = psm.fit_em(data.features.to(device), counts=data.counts.to(device), num_components=3,
                     seed=0, offset=b.to(device))
    assert dev.atoms.device.type == torch.device(device).type
    assert dev.loglik == pytest.approx(cpu.loglik, rel=1e-10)
    assert torch.allclose(dev.weights.cpu(), cpu.weights, atol=1e-6)
    # Standard errors of a device fit (computed on the CPU in float64).
    se_dev = dev.standard_errors(counts=data.counts.to(device))
    se_cpu = cpu.standard_errors(counts=data.counts)
    assert torch.allclose(se_dev["atoms"], se_cpu["atoms"], rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_fit_on_the_device_reaches_the_float64_optimum(data, device):
    ref = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0)
    fit = psm.fit_em(data.features.float().to(device), counts=data.counts.to(device),
                     num_components=3, seed=0)
    assert fit.weights.dtype == torch.float32
    # float32 resolves the log-likelihood to about 1e-7 relative.
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_distribution_on_the_device(data, device):
    d = psm.SoftmaxMixture(data.features.to(device), data.atoms.to(device),
                           data.weights.to(device))
    ref = psm.SoftmaxMixture(data.features, data.atoms, data.weights)
    values = torch.arange(800)
    assert torch.allclose(d.log_prob(values.to(device)).cpu(), ref.log_prob(values), atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_newton_cg_fit_on_the_device_matches_the_cpu(data, device, monkeypatch):
    """The Hessian-free finish (forced here: HESSIAN_FREE_RATIO = 0) on the device reaches the
    optimum of the CPU's full-Hessian fit."""
    from pyro_softmix import accelerate

    ref = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0, tol=1e-12)
    used = []
    cg = accelerate.newton_cg_finish
    monkeypatch.setattr(accelerate, "newton_cg_finish", lambda *a: used.append(1) or cg(*a))
    monkeypatch.setattr(accelerate, "HESSIAN_FREE_RATIO", 0)
    fit = psm.fit_em(data.features.to(device), counts=data.counts.to(device), num_components=3,
                     seed=0, tol=1e-12)
    assert used and fit.converged
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-10)
    perm = torch.cdist(fit.weights.cpu()[:, None], ref.weights[:, None]).argmin(1)  # labels
    assert torch.allclose(fit.weights.cpu(), ref.weights[perm], atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_free_m_steps_on_the_device_match_the_cpu(data, device, monkeypatch):
    """Hessian-free M-steps (forced here: HESSIAN_FREE_RANK = 1) on the device reach the
    optimum of the CPU's explicit M-steps."""
    from pyro_softmix import engine

    ref = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0, tol=1e-12)
    monkeypatch.setattr(engine, "HESSIAN_FREE_RANK", 1)
    fit = psm.fit_em(data.features.to(device), counts=data.counts.to(device), num_components=3,
                     seed=0, tol=1e-12)
    assert fit.converged
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-10)
    perm = torch.cdist(fit.weights.cpu()[:, None], ref.weights[:, None]).argmin(1)
    assert torch.allclose(fit.weights.cpu(), ref.weights[perm], atol=1e-6)
