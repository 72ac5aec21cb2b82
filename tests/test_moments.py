# SPDX-License-Identifier: Apache-2.0
"""Latent (Hermite) moments of the mixing measure."""

import torch

import pyro_softmix as psm
from pyro_softmix.moments import hermite

from .helpers import exact_counts, gaussian


def _moment_errors(p, seed):
    x = gaussian(p, 3, seed)
    design = psm.standardize(x)
    z = design.transform(x)
    t = torch.tensor([[0.8, 0.0, 0.3], [-0.5, 0.6, 0.0]], dtype=torch.float64)
    a = torch.tensor([0.4, 0.6], dtype=torch.float64)
    mom = psm.latent_moments(x, exact_counts(z, t, a))
    v = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    s = t @ v
    errors = [
        (mom.m1 - a @ t).norm(),
        (mom.m2 - (a[:, None, None] * t[:, :, None] * t[:, None, :]).sum(0)).norm(),
        (mom.m3(v, v, u) - (a * s * s * (t @ u)).sum()).abs(),
        (mom.along(v, 4) - (a * s[None, :] ** torch.arange(5.0)[:, None]).sum(1)).norm(),
        (mom.mixed(v, 2) - (a * s[None, :] ** torch.arange(3.0)[:, None]) @
         (t - s[:, None] * v)).norm(),
    ]
    return torch.stack(errors)


def test_hermite_polynomials_have_gaussian_moments():
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    he = hermite(x, 4)
    assert torch.allclose(he[2], x**2 - 1) and torch.allclose(he[3], x**3 - 3 * x)
    assert torch.allclose(he[4], x**4 - 6 * x**2 + 3)
    # E He_m(X) = mu^m for X ~ N(mu, 1), by Gauss-Hermite quadrature (exact for polynomials).
    import numpy as np

    nodes, w = np.polynomial.hermite_e.hermegauss(20)
    mu = 0.7
    vals = hermite(torch.from_numpy(nodes + mu), 5) @ torch.from_numpy(w / w.sum())
    assert torch.allclose(vals, mu ** torch.arange(6.0, dtype=torch.float64), atol=1e-12)


def test_moment_estimators_are_unbiased_in_the_limit():
    """With exact pi, the design error falls like p^-1/2: 10x more points, ~3x smaller error.

    Over 6 seeds the measured ratios are 0.32-0.54 (expected 1/sqrt(10) = 0.32); a biased
    estimator would stay near 1.
    """
    small = torch.stack([_moment_errors(20_000, s) for s in range(6)]).mean(0)
    large = torch.stack([_moment_errors(200_000, s) for s in range(6)]).mean(0)
    assert bool((large < 0.6 * small).all()), (small, large)
    assert bool((large < 0.05).all())


def test_m3_basis_matches_pointwise_contractions():
    x = gaussian(500, 4, 0)
    counts = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mom = psm.latent_moments(x, counts)
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = mom.m3_basis(u)
    idx = torch.cartesian_prod(*[torch.arange(3)] * 3)
    direct = mom.m3(u.T[idx[:, 0]], u.T[idx[:, 1]], u.T[idx[:, 2]]).view(3, 3, 3)
    assert torch.allclose(t, direct, atol=1e-12)
    assert torch.allclose(t, t.permute(1, 0, 2)) and torch.allclose(t, t.permute(2, 1, 0))


def test_one_dimensional_moments_are_the_weighted_sums_with_the_same_bits_on_any_thread_count():
    """along() is sum_j pihat_j He_m(z_j . v) (float64, to rounding) for one and for several
    directions, and in float32 it has the same bits on 1, 2 and 3 threads (a sum over 9,000
    rows, which MKL's own product cuts by thread on some CPUs)."""
    d = psm.simulate(num_points=9000, num_features=6, num_components=3, num_obs=10**5, seed=0,
                     dtype=torch.float64)
    mom = psm.latent_moments(d.features, d.counts)
    v = torch.randn(5, mom.z.shape[1], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    u = v / v.norm(dim=1, keepdim=True)
    he = hermite(mom.z @ u.T, 4)  # (5 orders, p, 5 directions)
    exact = (mom.pihat[None, :, None] * he).sum(1).T  # no matrix product
    torch.testing.assert_close(mom.along(v, 4), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mom.along(v[2], 4), exact[2], rtol=1e-12, atol=1e-12)
    low = psm.latent_moments(d.features.float(), d.counts)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(low.along(v.float(), 4))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
