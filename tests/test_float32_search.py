# SPDX-License-Identifier: Apache-2.0
"""A float64 fit of a large design searches in float32 (``engine.FLOAT32_SEARCH_BYTES``): it is
the float32 fit of the rounded design, then carried to the float64 optimum."""

import math

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix import engine

from .helpers import simulated


def _data():
    d = simulated(p=2000, L=20, K=3, N=200_000, seed=3, norm=2.5)
    x32 = d.features.float()
    return x32.double(), x32, d.counts  # float64 features that float32 holds exactly


def _size(x):
    return x.shape[0] * x.shape[1] * 8  # its standardised design's bytes (full rank)


def _loglik(x, counts, fit):
    """The log-likelihood of the fit's parameters on the float64 features x, from scratch (a
    float32 fit's weights sum to 1 only to float32 rounding: normalised in float64, since
    N (sum - 1) is a few thousandths of a nat at N = 200,000)."""
    log_q = torch.log_softmax(x @ fit.atoms.double().T, 0)  # (p, K)
    weights = fit.weights.double() / fit.weights.double().sum()
    return float(counts.double() @ torch.logsumexp(log_q + weights.log(), 1))


def test_float64_fit_is_the_float32_fit_then_float64_steps(monkeypatch):
    x64, x32, counts = _data()
    monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", _size(x64))  # at the threshold: search
    f32 = psm.fit_em(x32, counts=counts, num_components=3, seed=1)
    f64 = psm.fit_em(x64, counts=counts, num_components=3, seed=1)
    assert f64.atoms.dtype == torch.float64 and f64.converged
    assert f64.init.startswith(f32.init + "; searched in float32, then ")
    # The same path, bit for bit, up to the float32 fit's last entry (its objective in float32).
    n = len(f32.history) - 1
    assert f64.history[:n] == f32.history[:n]
    # The float64 steps end at the float64 design's optimum: EM from there gains nothing.
    monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", 2**62)
    more = psm.fit_em(x64, counts=counts, num_components=3, init=f64)
    assert more.loglik - f64.loglik <= 1e-9 * abs(f64.loglik)
    assert f64.loglik == pytest.approx(_loglik(x64, counts, f64), rel=1e-12)
    assert f64.loglik >= _loglik(x64, counts, f32) - 1e-9 * abs(f64.loglik)
    # ... which is the float32 fit's to float32 accuracy.
    assert torch.allclose(f64.atoms, f32.atoms.double(), atol=1e-4, rtol=0)
    assert torch.allclose(f64.weights, f32.weights.double(), atol=1e-5, rtol=0)


def test_search_reaches_the_float64_fit_optimum_with_prior_and_offset(monkeypatch):
    d = simulated(p=2000, L=20, K=3, N=200_000, seed=3, norm=2.5)
    x64, counts = d.features, d.counts  # not float32 numbers: the rounded design is new
    offset = torch.linspace(-0.5, 0.5, x64.shape[0], dtype=torch.float64)
    fits = {}
    for limit in (0, 2**62):
        monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", limit)
        fits[limit] = psm.fit_em(x64, counts=counts, num_components=3, seed=0, offset=offset,
                                 prior_scale=3.0, tol=1e-13)  # (the search itself: to 1e-9)
    searched, plain = fits[0], fits[2**62]
    assert "searched in float32" in searched.init and "float32" not in plain.init
    assert searched.converged and plain.converged
    assert searched.loglik == pytest.approx(plain.loglik, rel=1e-12)
    order = torch.cdist(searched.atoms, plain.atoms).argmin(1)
    # Both to 1e-13 (4e-7 and 8e-8 apart here), the search from a design rounded to float32.
    assert torch.allclose(searched.atoms, plain.atoms[order], atol=5e-6, rtol=0)
    assert torch.allclose(searched.weights, plain.weights[order], atol=1e-6, rtol=0)


def test_an_unfinished_search_is_reported_on_the_float64_design(monkeypatch):
    x64, _, counts = _data()
    monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", 0)
    with pytest.warns(psm.ConvergenceWarning):
        fit = psm.fit_em(x64, counts=counts, num_components=3, seed=0, init="random",
                         max_iter=3)
    assert not fit.converged and fit.n_iter == 3
    assert fit.init.endswith("; searched in float32")
    assert fit.loglik == pytest.approx(_loglik(x64, counts, fit), rel=1e-12)


@pytest.mark.parametrize("case", ["below", "float32", "grouped", "plain EM"])
def test_search_is_chosen_by_size_dtype_and_options(monkeypatch, case):
    x64, x32, counts = _data()
    limit = _size(x64) + (1 if case == "below" else 0)
    monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", limit)
    kwargs = dict(num_components=2, seed=0, max_iter=50)
    x, data = (x32 if case == "float32" else x64), (counts, None, None)
    if case == "grouped":
        tokens = torch.multinomial(counts / counts.sum(), 2000, replacement=True,
                                   generator=torch.Generator().manual_seed(0))
        data = (None, tokens, torch.arange(2000) % 5)
    fit = psm.fit_em(x, counts=data[0], tokens=data[1], groups=data[2],
                     accelerate=case != "plain EM", **kwargs)
    assert "float32" not in fit.init
    # The set-up has a twin in all but the first three cases; plain EM does not use it.
    setup = engine.prepare(x, *data, 2, None, None, None)
    assert (setup.float32_twin() is None) == (case != "plain EM")


def test_the_float64_set_up_takes_its_one_component_fit_from_the_search(monkeypatch):
    """The trivial fit of _verify, for any start: t_1 found once, on the float32 search, and its
    objective on the float64 design."""
    from pyro_softmix.em import prepare_fit
    from pyro_softmix.warmstart import one_component_fit

    x64, _, counts = _data()
    monkeypatch.setattr(engine, "FLOAT32_SEARCH_BYTES", 0)
    setup, *_ = prepare_fit(x64, counts, None, None, num_components=3, init="random",
                            num_inits=None, max_iter=10, dtype=None, device=None, seed=0,
                            progress=False, chunk_size=None, float32_search=True)
    assert setup.search is not None and setup.search.centre is None  # not asked yet
    centre, reference = one_component_fit(setup)
    assert centre.dtype == torch.float64
    assert torch.equal(centre, setup.search.centre.double())
    st = setup.problem.start(centre.expand(3, -1).contiguous(),
                             torch.full((3,), -math.log(3), dtype=torch.float64))
    assert reference == float(setup.problem.objective(st)[0])
