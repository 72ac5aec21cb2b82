# SPDX-License-Identifier: Apache-2.0
"""Warm starts: the moment methods, the calibrated random starts and the race of starts."""

import math

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.engine import EMProblem
from pyro_softmix.moments import LatentMoments
from pyro_softmix.warmstart import RACE_SAME, joined_leader, projection_start, race, tensor_start

from .helpers import exact_counts, gaussian


class _ExactMoments(LatentMoments):
    """Moments equal to those of a known mixing measure (what the estimators approach)."""

    def __init__(self, atoms, weights, z):
        m2 = (weights[:, None, None] * atoms[:, :, None] * atoms[:, None, :]).sum(0)
        super().__init__(m1=weights @ atoms, m2=m2, design=None, z=z,
                         pihat=torch.full((z.shape[0],), 1 / z.shape[0], dtype=z.dtype))
        self.atoms, self.weights = atoms, weights

    def along(self, directions, max_order):
        s = self.atoms @ (directions / directions.norm())
        return (self.weights * s[None, :] ** torch.arange(max_order + 1.0)[:, None]).sum(1)

    def mixed(self, direction, max_order):
        v = direction / direction.norm()
        s = self.atoms @ v
        return (self.weights * s[None, :] ** torch.arange(max_order + 1.0)[:, None]) @ (
            self.atoms - s[:, None] * v)

    def m3_basis(self, basis):
        y = self.atoms @ basis
        return torch.einsum("k,ka,kb,kc->abc", self.weights, y, y, y)


def _match_error(est, truth):
    perm = torch.cdist(truth, est).argmin(1)
    assert len(set(perm.tolist())) == truth.shape[0]
    return (est[perm] - truth).abs().max(), perm


@pytest.mark.parametrize("k", [2, 3, 4])
def test_projection_mom_is_exact_on_exact_moments(k):
    gen = torch.Generator().manual_seed(k)
    atoms = torch.randn(k, 5, generator=gen, dtype=torch.float64)
    weights = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    mom = _ExactMoments(atoms, weights, 10 * gaussian(100, 5, 0))
    w, a = projection_start(mom, k, torch.Generator().manual_seed(0))
    err, perm = _match_error(a, atoms)
    assert err < 1e-6 and torch.allclose(w[perm], weights, atol=1e-8)


def test_projection_denoises_an_invalid_moment_sequence():
    """Moments no measure has (m2 < m1^2) are projected, giving valid weights and atoms."""
    atoms = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    mom = _ExactMoments(atoms, torch.tensor([0.5, 0.5], dtype=torch.float64), gaussian(100, 2, 0))
    base = mom.along

    def noisy(v, order):
        m = base(v, order).clone()
        m[2] = 0.5 * m[1] ** 2  # variance < 0: invalid
        return m

    mom.along = noisy
    w, a = projection_start(mom, 2, torch.Generator().manual_seed(0))
    assert bool((w > 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    assert bool(torch.isfinite(a).all())


def test_tensor_mom_is_exact_on_exact_moments_and_recovers_separated_atoms():
    gen = torch.Generator().manual_seed(0)
    atoms = 1.5 * torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))[0].T
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w, a = tensor_start(_ExactMoments(atoms, weights, gaussian(10, 5, 0)), 3, gen)
    err, perm = _match_error(a, atoms)
    assert err < 1e-8 and torch.allclose(w[perm], weights, atol=1e-10)
    # Estimated moments: Gaussian design, p = 10^5, exact pi.
    x = gaussian(100_000, 5, 1)
    design = psm.standardize(x)
    z = design.transform(x)
    start = psm.warm_start(x, exact_counts(z, atoms, weights), num_components=3,
                           method="tensor", seed=0)
    err, perm = _match_error(start.atoms_z, atoms)
    assert err < 0.25 and torch.allclose(start.weights[perm], weights, atol=0.1)


@pytest.mark.parametrize("method", ["projection", "tensor", "subspace", "random", "auto"])
def test_every_method_is_seeded_reproducible_and_fits(method):
    d = psm.simulate(num_points=1000, num_features=3, num_components=2, num_obs=100_000,
                     atom_norm=3.0, seed=3, dtype=torch.float64)
    a = psm.warm_start(d.features, d.counts, num_components=2, method=method, seed=5)
    b = psm.warm_start(d.features, d.counts, num_components=2, method=method, seed=5)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.weights, b.weights)
    assert a.atoms.shape == (2, 3) and abs(float(a.weights.sum()) - 1) < 1e-12
    assert math.isfinite(a.loglik)
    if method in ("subspace", "random", "auto"):
        # The seed draws the random starts; "auto"'s race may be won by its seed-free start
        # grown by splits, so its single random start is compared there.
        one = {"num_inits": 1} if method == "auto" else {}
        a1, c = (psm.warm_start(d.features, d.counts, num_components=2, method=method, seed=s,
                                **one) for s in (5, 6))
        assert not torch.equal(a1.atoms, c.atoms)
    f1 = psm.fit_em(d.features, d.counts, num_components=2, init=method, seed=5)
    f2 = psm.fit_em(d.features, d.counts, num_components=2, init=method, seed=5)
    assert torch.equal(f1.atoms, f2.atoms) and f1.converged
    if method == "auto":
        truth = psm.fit_em(d.features, d.counts, num_components=2,
                           init={"weights": d.weights, "atoms": d.atoms})
        assert f1.loglik >= truth.loglik - 1e-6 * abs(truth.loglik)


def test_warm_start_rejects_bad_input():
    d = psm.simulate(num_points=200, num_features=2, num_components=2, num_obs=1000, seed=0)
    with pytest.raises(ValueError, match="method"):
        psm.warm_start(d.features, d.counts, num_components=2, method="moments")
    with pytest.raises(ValueError, match="num_components <= rank"):
        psm.warm_start(d.features, d.counts, num_components=3, method="tensor")
    with pytest.raises(ValueError, match="init"):
        psm.fit_em(d.features, d.counts, num_components=2, init="tensors")
    with pytest.raises(ValueError, match="counts"):
        psm.latent_moments(d.features, -d.counts)
    mom = psm.latent_moments(d.features, d.counts)
    with pytest.raises(ValueError, match="directions"):
        mom.along(torch.zeros(2), 3)
    with pytest.raises(ValueError, match="last dimension"):
        mom.along(torch.ones(3), 3)


def test_race_keeps_the_start_that_ends_best():
    d = psm.simulate(num_points=3000, num_features=3, num_components=3, num_obs=100_000,
                     atom_norm=2.5, seed=1, dtype=torch.float64)
    design = psm.standardize(d.features)
    z = design.transform(d.features)
    problem = EMProblem(z, d.counts, 3)
    truth_z = design.atoms_to_z(d.atoms)
    gen = torch.Generator().manual_seed(0)
    # Two poor starts (all atoms near one point) and the truth, last in the batch.
    bad = truth_z[0] + 0.01 * torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    atoms = torch.cat([bad, truth_z[None]])
    log_w = torch.cat([torch.full((2, 3), -math.log(3), dtype=torch.float64),
                       d.weights.log()[None]])
    a, lw, spent = race(problem, atoms, log_w, max_iter=1000)
    ref = psm.fit_em(d.features, d.counts, num_components=3,
                     init={"weights": d.weights, "atoms": d.atoms})
    fit = psm.fit_em(d.features, d.counts, num_components=3,
                     init={"weights": lw[0].exp(), "atoms": design.atoms_from_z(a[0])})
    assert abs(fit.loglik - ref.loglik) <= 1e-8 * abs(ref.loglik) and spent > 0


def test_race_keeps_the_better_half_of_its_starts_after_the_halving_point(monkeypatch):
    from pyro_softmix import _race

    d = psm.simulate(num_points=2000, num_features=3, num_components=3, num_obs=100_000,
                     atom_norm=3.0, seed=4, dtype=torch.float64)
    z = psm.standardize(d.features).transform(d.features)
    problem = EMProblem(z, d.counts, 3)
    gen = torch.Generator().manual_seed(1)
    # Starts close to the saddle where all atoms coincide: two are still far from their
    # limits after RACE_HALVE_AT iterations, so the race is not over by then.
    atoms = 0.05 * torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    log_w = torch.full((4, 3), -math.log(3), dtype=torch.float64)
    # Each start alone, by plain EM for RACE_HALVE_AT iterations (the batch runs them side by side).
    cut, ends, alone = _race.RACE_HALVE_AT, [], []
    for a, w in zip(atoms, log_w, strict=True):
        one = problem.with_starts(1)
        st = one.start(a, w)
        for _ in range(cut):
            st, _ = one.iterate(st)
        ends.append(float(one.objective(st)[0]))
        alone.append(st.atoms)
    top = sorted(range(4), key=ends.__getitem__, reverse=True)
    assert ends[top[1]] - ends[top[2]] > 1e-6 * abs(ends[top[0]])  # a clear half
    kept = race(problem, atoms, log_w, max_iter=cut, accelerate=False)[0]
    assert kept.shape[0] == 2
    for got, i in zip(kept, top[:2], strict=True):  # the better two, best first, as they ran
        torch.testing.assert_close(got, alone[i], rtol=1e-9, atol=1e-9)
    # Without the halving, a race cut at the same point hands over its leader alone.
    monkeypatch.setattr(_race, "RACE_HALVE_AT", 10**9)
    assert race(problem, atoms, log_w, max_iter=cut, accelerate=False)[0].shape[0] == 1


def test_joined_matches_components_up_to_a_permutation():
    gen = torch.Generator().manual_seed(0)
    lead = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    tiny = 0.1 * RACE_SAME
    perm = lead[[2, 0, 1]] + tiny * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    moved = lead.clone()
    moved[1] += 3 * RACE_SAME * (1 + lead.norm(dim=1).max())  # one atom too far
    doubled = lead[[0, 0, 2]]  # two own atoms on one of the leader's: not a permutation
    atoms = torch.stack([lead, perm, moved, doubled])
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    log_w = torch.stack([w, w[[2, 0, 1]], w, w]).log()
    assert joined_leader(atoms, log_w, 0) == [True, True, False, False]
    log_w[1] = torch.tensor([0.5, 0.2 + 2 * RACE_SAME, 0.3 - 2 * RACE_SAME]).log()  # weights off
    assert joined_leader(atoms, log_w, 0)[1] is False


def test_race_finishes_its_survivors_and_keeps_the_best():
    # A weakly separated mixture with several local optima: the raced fit must be at least as
    # good as the best of the same starts run one by one to convergence.
    x = torch.randn(3000, 5, generator=torch.Generator().manual_seed(103), dtype=torch.float64)
    d = psm.simulate(features=x, num_components=5, num_obs=100_000, atom_norm=1.0, seed=3,
                     dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    starts = [psm.warm_start(d.features, d.counts, num_components=5, method="random", seed=gen)
              for _ in range(4)]
    alone = [psm.fit_em(d.features, d.counts, num_components=5, init=s).loglik for s in starts]
    best = max(alone)
    assert best - min(alone) > 1e-6 * abs(best)  # the starts do end in different optima (5.6e-6)
    raced = psm.fit_em(d.features, d.counts, num_components=5, init="random", num_inits=4,
                       seed=0)
    assert raced.loglik >= best - 1e-9 * abs(best)
    assert raced.init.startswith("random (race of 4 starts")


@pytest.mark.parametrize("seed", [1, 2])
def test_auto_reaches_the_mle_where_m2s_eigenspace_is_noise(seed):
    # p = 3000 points in L = 128 dimensions, atoms of norm 2: each component's tilted mass sits
    # on about p exp(-|t|^2) ~ 55 points, fewer than L, so M2's top eigenvectors are mostly
    # noise. Starts confined to that span (with the tensor start) ended 1e-2 and 3e-2 below the
    # MLE for these two seeds.
    x = gaussian(3000, 128, seed)
    d = psm.simulate(features=x, num_components=3, num_obs=100_000, atom_norm=2.0, seed=seed,
                     dtype=torch.float64)
    ref = psm.fit_em(d.features, d.counts, num_components=3,
                     init={"weights": d.weights, "atoms": d.atoms})
    fit = psm.fit_em(d.features, d.counts, num_components=3, seed=0)
    assert fit.loglik >= ref.loglik - 1e-8 * abs(ref.loglik)


def test_auto_separates_three_components_on_a_single_feature():
    # With one feature, unit directions are +-1: three atoms at the same distance from the
    # centre would put two at one point, which plain EM never separates (it ended 1e-2 below
    # the MLE). The starts must give every atom its own position.
    x = gaussian(300, 1, 0)
    d = psm.simulate(features=x, weights=torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
                     atoms=torch.tensor([[-3.0], [0.0], [2.5]], dtype=torch.float64),
                     num_obs=100_000, seed=0)
    ref = psm.fit_em(d.features, d.counts, num_components=3, accelerate=False,
                     init={"weights": d.weights, "atoms": d.atoms})
    fit = psm.fit_em(d.features, d.counts, num_components=3, accelerate=False, seed=0)
    assert fit.loglik >= ref.loglik - 1e-8 * abs(ref.loglik)
    assert (torch.cdist(fit.atoms, fit.atoms) + 10 * torch.eye(3)).min() > 1.0


def test_the_default_start_never_forms_m2(monkeypatch):
    # M2 costs p r^2 (2.8 s at p = 10^5, r = 1024 on 2 cores) and "auto" does not use it: it is
    # formed on first access only, which the moment starts do and "auto" must not.
    formed = []
    lazy = LatentMoments.m2
    monkeypatch.setattr(LatentMoments, "m2", property(
        lambda self: formed.append(1) or lazy.fget(self)))
    d = psm.simulate(num_points=500, num_features=3, num_components=2, num_obs=5000, seed=0,
                     dtype=torch.float64)
    psm.fit_em(d.features, d.counts, num_components=2, seed=0)
    psm.warm_start(d.features, d.counts, num_components=2, seed=0)
    assert not formed
    psm.fit_em(d.features, d.counts, num_components=2, init="subspace", seed=0)
    assert formed


