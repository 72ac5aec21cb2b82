# SPDX-License-Identifier: Apache-2.0
"""One chunk budget per device, honoured by every chunked loop, the Newton Hessian included."""

import math

import pytest
import torch

import pyro_softmix as psm
from pyro_softmix._chunks import (
    CHUNK_BYTES,
    MIN_ROWS,
    SPLIT_BLOCKS,
    SPLIT_ROWS,
    column_max,
    column_sums,
    ordered_dot,
    ordered_sum,
    row_product,
    rows_per_chunk,
    thread_budget,
    weighted_sums,
)

from .helpers import best_permutation, simulated


def test_rows_per_chunk_follows_the_device_budget_and_the_users_chunk_size():
    row = 1024  # bytes per row
    assert rows_per_chunk(10**7, row, "cpu") == CHUNK_BYTES["cpu"] // row
    assert rows_per_chunk(10**7, row, torch.device("cuda", 0)) == CHUNK_BYTES["cuda"] // row
    assert rows_per_chunk(10**7, row, "meta") == CHUNK_BYTES["cuda"] // row  # others: as cuda
    assert rows_per_chunk(100, row, "cpu") == 100  # never more rows than there are
    assert rows_per_chunk(10**7, 10**9, "cpu") == MIN_ROWS  # never fewer than MIN_ROWS
    assert rows_per_chunk(10**7, row, "cpu", chunk_size=7) == 7  # the user's choice wins
    assert rows_per_chunk(5, row, "cpu", chunk_size=7) == 5


def test_the_users_chunk_size_reaches_every_chunked_loop(monkeypatch):
    """fit_em(chunk_size=c): the standardisation, the M-step's Grams and the Newton finish's
    Hessian all run in chunks of c rows, and give the fit of one pass."""
    from pyro_softmix import _gram, _marginal, accelerate, design

    d = simulated(p=700, L=3, K=2, N=50_000, seed=0)
    seen = []
    rows = _marginal.rows_per_chunk

    def recording(num_rows, row_bytes, device, chunk_size=None):
        seen.append(chunk_size)
        return rows(num_rows, row_bytes, device, chunk_size)

    for module in (_marginal, design, _gram):
        monkeypatch.setattr(module, "rows_per_chunk", recording)
    hessians = []
    hessian = accelerate.marginal_hessian
    monkeypatch.setattr(accelerate, "marginal_hessian",
                        lambda *a, **kw: hessians.append(kw["chunk_size"]) or hessian(*a, **kw))
    kw = dict(num_components=2, seed=0, tol=1e-13)
    chunked = psm.fit_em(d.features, counts=d.counts, chunk_size=64, **kw)
    assert hessians and set(hessians) == {64}  # the Newton finish ran, in chunks of 64 rows
    assert set(seen) == {64}
    seen.clear()
    whole = psm.fit_em(d.features, counts=d.counts, **kw)
    assert None in seen and 64 not in seen
    assert chunked.loglik == pytest.approx(whole.loglik, rel=1e-12, abs=0)
    perm = list(best_permutation(chunked.atoms, whole.atoms))  # the race may swap labels
    assert torch.allclose(chunked.atoms[perm], whole.atoms, atol=1e-5)


def test_thread_count_follows_the_problem_and_the_machine(monkeypatch):
    from pyro_softmix import _chunks

    before = torch.get_num_threads()
    monkeypatch.setattr(_chunks, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(_chunks, "busy_cores", lambda samples=5: 0)
    assert _chunks.choose_threads(_chunks.SMALL_WORK - 1) == 1  # small: one thread
    assert _chunks.choose_threads(1e9) == 8  # large, idle: the caller's threads
    monkeypatch.setattr(_chunks, "busy_cores", lambda samples=5: 5)
    assert _chunks.choose_threads(1e9) == 3  # large, 5 cores busy elsewhere
    monkeypatch.setattr(_chunks, "busy_cores", lambda samples=5: 50)
    assert _chunks.choose_threads(1e9) == 1
    assert _chunks.choose_threads(10, num_threads=6) == 6  # the caller's explicit choice
    assert _chunks.choose_threads(10, device="cuda") == 8  # work on a GPU: threads untouched
    monkeypatch.undo()
    assert torch.get_num_threads() == before


def test_a_fit_runs_on_its_threads_and_gives_the_callers_back(monkeypatch):
    """Small fits run on one thread whatever the caller set, so their results do not depend
    on it (float32 fits at p = 2000 used to differ by 1e-4 between 1 and 2 threads)."""
    import pyro_softmix._moves as moves

    seen = []
    run = moves.run
    monkeypatch.setattr(moves, "run", lambda *a, **k: seen.append(
        torch.get_num_threads()) or run(*a, **k))
    d = simulated(p=2000, L=10, K=3, N=100_000, seed=0)
    fits = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fits.append(psm.fit_em(d.features.float(), counts=d.counts, num_components=3,
                                   seed=0))
            assert torch.get_num_threads() == threads  # given back
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1}
    assert torch.equal(fits[0].atoms, fits[1].atoms) and fits[0].history == fits[1].history
    with pytest.raises(RuntimeError):  # given back on errors too
        with thread_budget(1, num_threads=1):
            raise RuntimeError
    assert torch.get_num_threads() == before


def _on_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [SPLIT_BLOCKS * SPLIT_ROWS - 1, SPLIT_BLOCKS * SPLIT_ROWS,
                                  SPLIT_BLOCKS * SPLIT_ROWS + 5, 3 * SPLIT_BLOCKS * SPLIT_ROWS + 2])
def test_weighted_sums_in_row_blocks_are_the_product_on_any_thread_count(rows):
    """weights.T @ z, run as row blocks (the rows left over included): the same sums, in
    float64 to rounding, for non-contiguous features too, and bit for bit the same numbers on
    1 to 4 threads (float32, where the order of the additions shows); (p,) weights give the
    row of their column."""
    g = torch.Generator().manual_seed(rows)
    w = torch.rand(rows, 3, generator=g, dtype=torch.float64)
    for z in (torch.randn(rows, 7, generator=g, dtype=torch.float64),
              torch.randn(rows, 14, generator=g, dtype=torch.float64)[:, ::2]):
        exact = (w.T.unsqueeze(-1) * z.unsqueeze(0)).sum(1)  # no matrix product
        for threads in (1, 2, 3):
            got = _on_threads(threads, lambda z=z: weighted_sums(w, z))
            torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
        one = weighted_sums(w[:, 1], z)  # (p,) weights: one row
        assert one.shape == exact[1].shape
        torch.testing.assert_close(one, exact[1], rtol=1e-12, atol=1e-12)
    w32, z32 = w.float(), torch.randn(rows, 40, generator=g, dtype=torch.float32)
    outs = [_on_threads(t, lambda: weighted_sums(w32, z32)) for t in (1, 2, 3, 4)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("n", [0, 5, SPLIT_BLOCKS, 100_003, 2_000_000])
def test_ordered_sums_are_the_sums_on_any_thread_count(n):
    """ordered_sum, ordered_dot and column_sums (one column and several) match float64 sums
    to float32 rounding, and give the same bits on 1, 2 and 3 threads, where torch's own sum
    and dot products of 2,000,000 float32 numbers do not (checked below, so that the test can
    fail)."""
    g = torch.Generator().manual_seed(n)
    a, b = (torch.rand(n, generator=g, dtype=torch.float32) for _ in range(2))
    m = torch.rand(n, 3, generator=g, dtype=torch.float32)
    cases = {"sum": lambda: ordered_sum(a), "dot": lambda: ordered_dot(a, b),
             "col1": lambda: column_sums(m[:, :1]), "cols": lambda: column_sums(m)}
    exact = {"sum": a.double().sum(), "dot": a.double() @ b.double(),
             "col1": m[:, :1].double().sum(0), "cols": m.double().sum(0)}
    for name, fn in cases.items():
        outs = [_on_threads(t, fn) for t in (1, 2, 3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name
        torch.testing.assert_close(outs[0].double(), exact[name], rtol=1e-5, atol=1e-6)
    if n == 2_000_000:  # torch's own reductions to one number do depend on the threads
        plain = [_on_threads(t, lambda: (a.sum(), a @ b)) for t in (1, 2, 3)]
        assert any(not torch.equal(plain[0][0], o[0]) or not torch.equal(plain[0][1], o[1])
                   for o in plain[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [1, 129, 130, 1_001, 65_537])
@pytest.mark.parametrize("k", [1, 3, 12, 16, 48])
def test_column_max_is_amax(p, k, dtype, monkeypatch):
    """column_max folds rows in halves for narrow rows (3 and 12 columns here; 16 float64 and
    48 float64 columns keep amax) and is exactly x.amax(0), for odd and even row counts, with
    the maximum in the last row, and with NaN and -inf entries (NaN propagates as in amax). A
    fold that skipped the last row of an odd count, or a half, fails; so does one that folded
    but dropped rows beyond FOLD_ROWS (checked by moving the maximum to every position)."""
    from pyro_softmix import _chunks

    called = []
    real = torch.maximum
    monkeypatch.setattr(_chunks.torch, "maximum", lambda *a, **kw: called.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(p * k)
    x = torch.randn(p, k, generator=g, dtype=dtype)
    before = x.clone()
    assert torch.equal(column_max(x), x.amax(0)) and torch.equal(x, before)  # x not folded
    row = k * x.element_size()
    folds = p > 2 * _chunks.FOLD_ROWS and k > 1 and row <= 256 and row % 128
    assert bool(called) == bool(folds)
    for i in sorted({0, p // 2, p - 1, max(p - 2, 0)}):
        y = x.clone()
        y[i, k - 1] = 100.0
        if p > 1:
            y[(i + 1) % p, 0] = -math.inf
        assert torch.equal(column_max(y), y.amax(0)) and column_max(y)[k - 1] == 100.0
    y = x.clone()
    y[p - 1, 0] = math.nan
    assert torch.equal(column_max(y).isnan(), y.amax(0).isnan()) and column_max(y)[0].isnan()


def test_row_products_are_the_products_with_the_same_bits_on_any_thread_count():
    """row_product(a, b) is a.T @ b to float32 rounding (also written into ``out``), with the
    same bits on 1, 2 and 3 threads, where torch's own product varies (checked below): small
    outputs over long sums (a Hessian's chunks), a weighted sum of rows, sums over more rows
    than two blocks, large outputs over many rows, and a large output over few rows."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4000, 20, 20), (1500, 39, 39), (900, 39, 39), (2048, 12, 36), (9000, 100, 100),
              (9000, 1, 3), (20_001, 4, 64), (2000, 200, 200), (9000, 300, 300), (300, 200, 200)]
    varies = False
    for c, m, n in shapes:  # small outputs; long sums in blocks; a large output over few rows
        a, b = (torch.randn(c, d, generator=g, dtype=torch.float32) for d in (m, n))
        outs = [_on_threads(t, lambda a=a, b=b: row_product(a, b)) for t in (1, 2, 3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), (c, m, n)
        torch.testing.assert_close(outs[0].double(), a.double().T @ b.double(), rtol=1e-4,
                                   atol=1e-4 * c ** 0.5)
        buffer = torch.empty(m, n, dtype=torch.float32)
        assert row_product(a, b, out=buffer) is buffer and torch.equal(buffer, outs[0])
        plain = [_on_threads(t, lambda a=a, b=b: a.T @ b) for t in (1, 2, 3)]
        varies |= any(not torch.equal(plain[0], o) for o in plain[1:])
    assert varies  # so that the test can fail


@pytest.mark.parametrize("L, dtype", [(12, torch.float32), (60, torch.float32), (12, torch.float64)])
def test_a_large_fit_takes_the_same_path_on_any_thread_count(L, dtype):
    """Above the one-thread size a fit runs on the caller's threads, and its path (every
    update's objective, the race, the moves, the result) is the same bit for bit on 1, 2 and
    3 threads. At L = 60 this is the Hessian-free Newton finish; before the reductions were
    made order-stable, a float32 fit of this kind took 93 updates on one thread and 638 on
    two."""
    d = simulated(p=9000, L=L, K=3, N=20_000, seed=1)
    fits = [psm.fit_em(d.features.to(dtype), counts=d.counts, num_components=3, seed=0,
                       num_threads=t) for t in (1, 2, 3)]
    for fit in fits[1:]:
        assert fit.history == fits[0].history and fit.init == fits[0].init
        assert torch.equal(fit.atoms, fits[0].atoms) and torch.equal(fit.weights, fits[0].weights)
