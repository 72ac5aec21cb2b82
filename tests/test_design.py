# SPDX-License-Identifier: Apache-2.0
"""Standardisation of the design: moments, identifiability, extreme magnitudes."""

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import IdentifiabilityWarning, standardize


def _scaled_design(p=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 100.0, 0.01, 3.0])
    return torch.randn(p, 4, generator=g) * scales + torch.tensor([7.0, -50.0, 2.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standardized_design_has_zero_mean_identity_covariance(dtype):
    x = _scaled_design().to(dtype)
    d = standardize(x)
    z = d.transform(x, dtype=torch.float64)
    assert d.rank == 4 and d.is_full_rank
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-6)
    assert torch.allclose(z.T @ z / x.shape[0], torch.eye(4), atol=1e-5)


def test_atom_maps_preserve_centred_logits_and_invert():
    x = _scaled_design()
    d = standardize(x)
    z = d.transform(x)
    theta = torch.randn(3, 4)
    theta_z = d.atoms_to_z(theta)
    xc = x - x.mean(0)
    assert torch.allclose(xc @ theta.T, z @ theta_z.T, atol=1e-8)
    assert torch.allclose(d.atoms_from_z(theta_z), theta, atol=1e-8)


def test_chunked_transform_equals_unchunked():
    x = _scaled_design()
    d = standardize(x, chunk_size=37)
    assert torch.allclose(d.transform(x, chunk_size=37), standardize(x).transform(x), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_and_collinear_columns_are_reduced_with_warning(dtype):
    base = _scaled_design()
    x = torch.cat([base, torch.full((400, 1), 3.0), (2 * base[:, 0] - base[:, 3])[:, None]], 1)
    with pytest.warns(IdentifiabilityWarning, match=r"rank 4 < 6.*constant column\(s\) \[4\]"):
        d = standardize(x.to(dtype))
    assert d.rank == 4 and d.constant_columns == (4,)
    z = d.transform(x.to(dtype), dtype=torch.float64)
    assert torch.allclose(z.T @ z / 400, torch.eye(4), atol=1e-4)
    # Any atom maps to the minimum-norm atom with the same centred logits.
    theta = torch.randn(2, 6)
    back = d.atoms_from_z(d.atoms_to_z(theta))
    xc = x - x.mean(0)
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    assert torch.allclose(xc @ back.T, xc @ theta.T, atol=tol * (xc @ theta.T).abs().max())
    min_norm = (torch.linalg.pinv(xc) @ xc @ theta.T).T
    assert torch.allclose(back, min_norm, atol=tol)


def test_all_constant_features_are_rejected():
    with pytest.raises(ValueError, match="every column is constant"):
        standardize(torch.ones(10, 3))


def test_nearly_collinear_but_identified_columns_are_kept():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 1, generator=g)
    x = torch.cat([a, a + 1e-3 * torch.randn(1000, 1, generator=g)], 1)
    assert standardize(x).rank == 2


@pytest.mark.parametrize("scale", [1e160, 1e-160, 1e300, 2.0**-1000])
def test_features_of_extreme_magnitude_fit_like_ordinary_ones(scale):
    """Squares of 1e160 overflow float64: such columns were called constant. Scaled columns
    give the same fit, with atoms scaled back."""
    d = psm.simulate(num_points=300, num_features=3, num_components=2, num_obs=20_000, seed=1)
    ref = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    x = d.features.clone()
    x[:, 1] *= scale  # one column only: the others stay ordinary
    fit = psm.fit_em(x, counts=d.counts, num_components=2, seed=0)
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-12)
    assert torch.allclose(fit.probs(), ref.probs(), atol=1e-12)
    # Both within the stopping rule's tolerance of the same maximum.
    assert torch.allclose(fit.atoms[:, 1] * scale, ref.atoms[:, 1], rtol=1e-4, atol=0)
