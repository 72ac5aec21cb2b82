# SPDX-License-Identifier: Apache-2.0
"""Rows per chunk for every loop over the support points: one memory budget per device.

A loop over the p rows that needs a (rows, width) temporary takes
``rows_per_chunk(p, width * itemsize, device, chunk_size)`` rows at a time: the user's
``chunk_size`` when given, else as many rows as fit ``CHUNK_BYTES`` of that device (never fewer
than ``MIN_ROWS``). On a CPU a few megabytes stay in cache and avoid page faults from large
allocations; on a GPU large chunks keep the device busy.
"""

from __future__ import annotations

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
