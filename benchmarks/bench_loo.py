# SPDX-License-Identifier: Apache-2.0
"""PSIS-LOO on counts: one column per draw of Y (``az.loo``) against one per support point.

N draws of Y fall on at most p support points, and draws at the same point have the same
log-likelihood column. ``to_arviz(units="draws")`` builds the (draws, N) table that ``az.loo``
reads; ``to_arviz(units="points")`` builds (draws, P) for the P points with a draw, and
``psm.loo`` weights each column by its count, giving the same elpd, se and p. This times both
from the call (conversion included) on the installed ArviZ major, and checks they agree.
The draws are Gaussian perturbations of an EM fit: LOO's cost does not depend on how they
were made.

Usage:
    python benchmarks/bench_loo.py                 # about a minute on 2 cores
    python benchmarks/bench_loo.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix.arviz_bridge import arviz_major

CASES = [(500, 5_000, 200), (2_000, 100_000, 200), (5_000, 1_000_000, 200)]
QUICK = [(500, 5_000, 100), (2_000, 100_000, 100)]


def _draws(fit, num_draws: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, d = fit.atoms.shape
    weights = torch.softmax(fit.weights.log() + 0.02 * torch.randn(1, num_draws, k, generator=g), -1)
    atoms = fit.atoms + 0.02 * torch.randn(1, num_draws, k, d, generator=g)
    return {"weights": weights, "atoms": atoms}


def _timed(loo, draws, units, **data):
    """LOO from the call: the conversion to ArviZ data and ``loo`` on it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        out = loo(psm.to_arviz(draws, units=units, **data))
        return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-draws-columns", type=float, default=5e7,
                        help="skip the draws form above this many table entries")
    parser.add_argument("--json", default="benchmarks/results/bench_loo.json")
    args = parser.parse_args(argv)
    import arviz as az

    torch.set_default_dtype(torch.float64)
    print(f"# bench_loo on {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"ArviZ {az.__version__}, Python {platform.python_version()}; "
          f"load before: {os.getloadavg()[0]:.2f}")
    print(f"{'p':>6} {'N':>9} {'draws':>6} {'points':>7} {'draws form':>11} {'points form':>12}"
          f" {'ratio':>7} {'elpd':>14} {'|diff|':>9}")
    rows = []
    for p, n, s in QUICK if args.quick else CASES:
        data = psm.simulate(num_points=p, num_features=4, num_components=3, num_obs=n, seed=0)
        fit = psm.fit_em(data.features, counts=data.counts, num_components=3, seed=0)
        draws = _draws(fit, s)
        kw = {"features": data.features, "counts": data.counts}
        points, t_points = _timed(psm.loo, draws, "points", **kw)
        row = dict(p=p, N=n, draws=s, points=int((data.counts > 0).sum()),
                   points_seconds=t_points, elpd=points.elpd, arviz_major=arviz_major())
        if s * n <= args.max_draws_columns:
            full, t_full = _timed(az.loo, draws, "draws", **kw)
            elpd_full = float(full.elpd if arviz_major() >= 1 else full.elpd_loo)
            row |= dict(draws_seconds=t_full, elpd_draws=elpd_full,
                        abs_diff=abs(elpd_full - points.elpd), ratio=t_full / t_points)
        rows.append(row)
        full_text = (f"{row['draws_seconds']:10.2f}s" if "draws_seconds" in row
                     else f"{'skipped':>11}")
        print(f"{p:>6} {n:>9} {s:>6} {row['points']:>7} {full_text} {t_points:11.2f}s "
              f"{row.get('ratio', float('nan')):6.1f}x {points.elpd:14.2f} "
              f"{row.get('abs_diff', float('nan')):9.2e}", flush=True)
    print(f"(load after: {os.getloadavg()[0]:.2f})")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
