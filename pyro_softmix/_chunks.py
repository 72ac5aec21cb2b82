# SPDX-License-Identifier: Apache-2.0
"""The compute budget: rows per chunk for every loop over the support points (one memory
budget per device), and the threads a fit runs on.

A loop over the p rows that needs a (rows, width) temporary takes
``rows_per_chunk(p, width * itemsize, device, chunk_size)`` rows at a time: the user's
``chunk_size`` when given, else as many rows as fit ``CHUNK_BYTES`` of that device (never fewer
than ``MIN_ROWS``). On a CPU a few megabytes stay in cache and avoid page faults from large
allocations; on a GPU large chunks keep the device busy.
"""

from __future__ import annotations

import contextlib
import os

import torch

#: Bytes of one chunk's temporary, per device type (others: as "cuda").
CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}
#: Fewest rows per chunk under the budget (a chunk of a few rows wastes the matrix units).
MIN_ROWS = 64


def rows_per_chunk(num_rows: int, row_bytes: int, device: torch.device | str,
                   chunk_size: int | None = None) -> int:
    """Rows per chunk for a loop over ``num_rows`` rows whose temporary takes ``row_bytes``
    bytes per row on ``device``; ``chunk_size`` (the user's) overrides the budget."""
    if chunk_size is None:
        budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cuda"])
        chunk_size = max(MIN_ROWS, budget // max(1, row_bytes))
    return max(1, min(int(chunk_size), num_rows))


#: :func:`row_product` sums over at most ``SPLIT_BLOCKS`` fixed blocks of rows, each of at
#: least ``SPLIT_ROWS`` rows, and more than two only while their outputs take at most
#: ``SPLIT_OUT_BYTES``.
SPLIT_ROWS = 64
SPLIT_BLOCKS = 16
SPLIT_OUT_BYTES = 2**22


def weighted_sums(weights: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(K, r) ``weights.T @ z`` for (p, K) weights and (p, r) features, K weighted sums over
    the rows (:func:`row_product`); (r,) for (p,) weights."""
    if weights.dim() == 1:
        return row_product(weights[:, None], z)[0]
    return row_product(weights, z)


def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a 1-D tensor, added in an order that does not depend on the thread count.

    torch splits a reduction to one number between its threads, so the last bits of
    ``x.sum()`` and of a dot product ``a @ b`` change with ``torch.get_num_threads()`` (and a
    float32 fit that reads them can take another path). Here the entries are summed in
    ``SPLIT_BLOCKS`` fixed row blocks (one reduction with several outputs, which torch shares
    out by output), then in order.

    Example:
        >>> float(ordered_sum(torch.arange(100.0)))
        4950.0
    """
    n = x.shape[0]
    head = n - n % SPLIT_BLOCKS
    return x[:head].reshape(SPLIT_BLOCKS, -1).sum(1).sum() + x[head:].sum()


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """(K,) sums over dim 0 of a (p, K) tensor, in an order that does not depend on the thread
    count (torch shares a reduction with several outputs out by output, but splits one with a
    single output between its threads: K = 1 goes through :func:`ordered_sum`)."""
    return x.sum(0) if x.shape[1] > 1 else ordered_sum(x[:, 0])[None]


#: :func:`column_max` folds rows in halves down to this many, where a row of the (p, K) input
#: takes at most ``FOLD_MAX_ROW_BYTES`` and not a multiple of ``FOLD_FAST_ROW_BYTES``.
FOLD_ROWS = 64
FOLD_MAX_ROW_BYTES = 256
FOLD_FAST_ROW_BYTES = 128


def column_max(x: torch.Tensor) -> torch.Tensor:
    """(K,) maxima over dim 0 of a (p, K) tensor: ``x.amax(0)``, exactly.

    On a CPU (torch 2.13) that reduction was slow unless a row's bytes were a multiple of 128:
    at p = 10^5, 0.26 ms per column (3.1 ms for K = 12, float64). Folding the rows in halves
    by elementwise maxima reads them once (0.25 ms for K = 12), and a maximum is exact, so
    the result is the same. Wide rows (more than 256 bytes) and other devices keep ``amax``.
    """
    p, k = x.shape
    row = k * x.element_size()
    if (x.device.type != "cpu" or k == 1 or p <= 2 * FOLD_ROWS or row > FOLD_MAX_ROW_BYTES
            or row % FOLD_FAST_ROW_BYTES == 0):
        return x.amax(0)
    y = x
    while y.shape[0] > FOLD_ROWS:  # the first fold into a new half, the others in place
        n, half = y.shape[0], y.shape[0] // 2
        top = torch.maximum(y[:half], y[half:2 * half], out=None if y is x else y[:half])
        if n % 2:
            torch.maximum(top[0], y[n - 1], out=top[0])
        y = top
    return y.amax(0)


def ordered_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b for 1-D tensors (in their common dtype), by :func:`ordered_sum`."""
    return ordered_sum(a * b)


def row_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """(m, n) ``a.T @ b`` for (c, m) and (c, n) (into ``out`` if given): a sum over the c rows,
    added in an order that depends on c alone, so with the same bits on any thread count.

    MKL shares a product between its threads in parts that depend on the thread count and on
    the CPU, and where it cuts the sum over the rows, its last bits change with both (float32
    and float64; on AVX-512 CPUs from a few hundred rows, small and large outputs alike). So
    on a CPU the rows are cut into fixed blocks (their number depends on the shapes alone:
    see ``SPLIT_*``; the rows left over are added on one thread), multiplied as one batched
    product on at most as many threads as blocks (:func:`batch_threads`) and summed in order.
    That is as fast as one product on one thread, and 1.2-2x faster on 2 cores (weighted sums
    at p = 5,000..400,000, r = 5..1,024, K = 4..64, float32 and float64). Fewer than two
    blocks' rows: one product on one thread.

    Example:
        >>> a, b = torch.ones(10_000, 2), torch.ones(10_000, 3)
        >>> row_product(a, b).tolist()[0]
        [10000.0, 10000.0, 10000.0]
    """
    c, m, n = a.shape[0], a.shape[1], b.shape[1]
    if a.device.type != "cpu":
        return torch.mm(a.T, b, out=out)
    fit = max(2, SPLIT_OUT_BYTES // max(1, m * n * a.element_size()))
    blocks = min(SPLIT_BLOCKS, c // SPLIT_ROWS, fit)
    if blocks < 2:
        with one_thread():
            return torch.mm(a.T, b, out=out)
    rows = c // blocks
    head = blocks * rows
    with batch_threads(blocks):
        parts = torch.bmm(a[:head].reshape(blocks, rows, m).transpose(1, 2),
                          b[:head].reshape(blocks, rows, n))
    total = torch.sum(parts, 0, out=out)
    if head < c:
        with one_thread():
            total.addmm_(a[head:].T, b[head:])
    return total


@contextlib.contextmanager
def batch_threads(batch: int):
    """Run the block on at most ``batch`` threads: a batched product of ``batch`` independent
    products then has the bits it has on one thread (MKL gives each product one thread; with
    more threads than products it cuts some products' sums, and their last bits change with
    the thread count: seen on AVX-512 CPUs, float32 and float64)."""
    before = torch.get_num_threads()
    if before > batch:
        torch.set_num_threads(max(1, batch))
    try:
        yield
    finally:
        if before > batch:
            torch.set_num_threads(before)


def one_thread():
    """Run the block on one thread (``with one_thread():``): dense factorisations (MKL's
    Cholesky, eigh and QR of a few hundred rows) give other last bits on another thread count,
    which a float32 fit can turn into another path. They are small beside a pass over the
    data."""
    return batch_threads(1)


#: Problems with fewer multiply-adds per pass over the data than this (p r K for a softmax
#: mixture, n d K for a mixture of experts) run on one thread: their operations are too small
#: to share, and a second thread then only adds overhead (idle) or waits for a core (loaded).
SMALL_WORK = 300_000


def busy_cores(samples: int = 5) -> int:
    """Runnable threads of other programs, now: the kernel's count of runnable tasks less this
    process's own (its thread pool spins for a while after each parallel operation); the
    median of a few reads, 0 where the system does not report it (not Linux)."""
    reads = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                total = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        reads.append(total - _own_running())
    return max(0, sorted(reads)[len(reads) // 2])


def _own_running() -> int:
    """This process's threads that are running or runnable (at least 1: the caller)."""
    running = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(1, running)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(work: float, num_threads: int | None = None, device=None) -> int:
    """Threads for a fit of ``work`` multiply-adds per pass: ``num_threads`` if given; one for
    small problems; else the caller's torch setting, less the cores other programs keep busy
    (on a loaded machine, threads beyond the free cores wait for one and slow every
    operation down: 2.4-5x measured on 2 cores beside one busy process)."""
    if num_threads is not None:
        return num_threads
    if device is not None:
        try:
            on_cpu = torch.device(device).type == "cpu"
        except (RuntimeError, TypeError, ValueError):  # the fit's checks report a bad device
            on_cpu = True
        if not on_cpu:
            return torch.get_num_threads()  # the work is on the device
    if work < SMALL_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), usable_cores() - busy_cores()))


@contextlib.contextmanager
def thread_budget(work: float, num_threads: int | None = None, device=None):
    """Run the block on :func:`choose_threads` threads, and give the caller back its own
    torch thread count afterwards."""
    before = torch.get_num_threads()
    threads = choose_threads(work, num_threads, device)
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
