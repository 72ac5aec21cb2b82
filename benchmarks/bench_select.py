# SPDX-License-Identifier: Apache-2.0
"""The latent-class toolkit measured: choosing K on a grown path, and standard errors.

1. Choosing K: simulated data with K in {2, 3, 5} (p = 1,000, L = 5, atoms of norm 3 in
   standardised units, N = 10^5), 20 seeds each. ``select_num_components`` over K = 1..8 with
   its defaults (BIC): how often the true K is chosen, and the path's time against one
   ``fit_em`` default fit at K = 8 on the same data, both timed from the call.
2. Coverage: 90% Wald intervals (observed information) over 200 simulated replicates of one
   truth (p = 300, L = 3, K = 3, N = 2 * 10^4), each coordinate's coverage and their mean.
3. Scale: observed-information standard errors at p = 10^5, L = 64, K = 8 (a 520 x 520
   information matrix, formed over the rows in chunks), timed, with the peak resident memory.

Usage:
    python benchmarks/bench_select.py                  # several minutes on 2 cores
    python benchmarks/bench_select.py --quick          # fewer seeds and replicates
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix.plots import match_components

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def choose_k(ks, seeds, k_max: int) -> list[dict]:
    rows = []
    print(f"{'K':>3} {'seeds':>6} {'BIC right':>10} {'chosen':>22} {'path s':>8} "
          f"{'fit K_max s':>12} {'ratio':>7}")
    for k in ks:
        chosen, path_s, single_s = [], 0.0, 0.0
        for seed in seeds:
            data = psm.simulate(num_points=1000, num_features=5, num_components=k,
                                num_obs=100_000, atom_norm=3.0, seed=seed)
            start = time.perf_counter()
            sel = _quiet(psm.select_num_components, data.features, data.counts,
                         num_components=range(1, k_max + 1), seed=seed)
            path_s += time.perf_counter() - start
            start = time.perf_counter()
            _quiet(psm.fit_em, data.features, counts=data.counts, num_components=k_max,
                   seed=seed)
            single_s += time.perf_counter() - start
            chosen.append(sel.best.num_components)
        right = sum(c == k for c in chosen) / len(chosen)
        counts = {c: chosen.count(c) for c in sorted(set(chosen))}
        print(f"{k:>3} {len(seeds):>6} {right:>10.0%} {str(counts):>22} {path_s:>8.2f} "
              f"{single_s:>12.2f} {path_s / single_s:>7.2f}")
        rows.append(dict(true_k=k, seeds=len(seeds), right=right, chosen=chosen,
                         path_seconds=path_s, single_fit_seconds=single_s,
                         ratio=path_s / single_s))
    return rows


def coverage(replicates: int, level: float = 0.9) -> dict:
    truth = psm.simulate(num_points=300, num_features=3, num_components=3, num_obs=1,
                         atom_norm=3.0, seed=100)
    hits_a = torch.zeros(3, 3)
    hits_w = torch.zeros(3)
    crit = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    used = 0
    for rep in range(replicates):
        data = psm.simulate(features=truth.features, weights=truth.weights, atoms=truth.atoms,
                            num_obs=20_000, seed=1000 + rep)
        fit = _quiet(psm.fit_em, data.features, counts=data.counts, num_components=3, seed=rep)
        se = fit.standard_errors(counts=data.counts)
        perm = torch.as_tensor(match_components(fit.atoms, truth.atoms))
        hits_a += ((fit.atoms[perm] - truth.atoms).abs() <= crit * se["atoms"][perm]).double()
        hits_w += ((fit.weights[perm] - truth.weights).abs() <= crit * se["weights"][perm]).double()
        used += 1
    cov_a, cov_w = hits_a / used, hits_w / used
    out = dict(level=level, replicates=used, atoms=cov_a.tolist(), weights=cov_w.tolist(),
               mean=float(torch.cat([cov_a.reshape(-1), cov_w]).mean()),
               min=float(torch.cat([cov_a.reshape(-1), cov_w]).min()),
               max=float(torch.cat([cov_a.reshape(-1), cov_w]).max()))
    print(f"coverage of {level:.0%} Wald intervals over {used} replicates: mean "
          f"{out['mean']:.3f}, per coordinate {out['min']:.3f}..{out['max']:.3f}")
    return out


def scale(num_points: int, dim: int, k: int) -> dict:
    data = psm.simulate(num_points=num_points, num_features=dim, num_components=k,
                        num_obs=10 * num_points, atom_norm=2.0, seed=7)
    # The truth is the point here (no fit needed to time the errors): a fit object at it.
    fit = _quiet(psm.fit_em, data.features, counts=data.counts, num_components=k,
                 init={"weights": data.weights, "atoms": data.atoms}, max_iter=3)
    start = time.perf_counter()
    se = fit.standard_errors(counts=data.counts)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB on Linux
    size = k * dim + k - 1
    print(f"observed SEs at p={num_points:,}, L={dim}, K={k} ({size} coordinates): "
          f"{seconds:.2f} s, peak resident memory {peak:.0f} MB, finite: "
          f"{bool(torch.isfinite(se['atoms']).all())}")
    return dict(p=num_points, L=dim, K=k, coordinates=size, seconds=seconds, peak_mb=peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/bench_select.json")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    print(f"# bench_select on {machine()}; load before: {os.getloadavg()[0]:.2f}")
    seeds = range(5) if args.quick else range(20)
    out = {"choose_k": choose_k((2, 3, 5), seeds, 8),
           "coverage": coverage(40 if args.quick else 200),
           "scale": scale(20_000 if args.quick else 100_000, 64, 8),
           "machine": machine(), "load_after": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(out, handle, indent=2)
    print(f"wrote {args.json}; load after: {out['load_after']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
