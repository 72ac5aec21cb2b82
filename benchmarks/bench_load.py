# SPDX-License-Identifier: Apache-2.0
"""Fits beside a busy process: the default thread count against one and all threads.

On a shared machine, torch's intra-op threads that find no free core wait for one, and every
small operation of a fit then waits too. For each problem size and each condition (idle, and
beside one CPU-bound competitor process), this times ``fit_em`` (and a mixture-of-experts fit)
with the default thread choice, with one thread and with every core, in one run, and reports
the default's time over the best of the three.

Usage:
    python benchmarks/bench_load.py                  # a few minutes on 2 cores
    python benchmarks/bench_load.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix._chunks import choose_threads, usable_cores

SIZES = [(200, 5, 3), (2_000, 10, 3), (10_000, 20, 3), (50_000, 32, 4), (200_000, 32, 8)]
QUICK = [(200, 5, 3), (10_000, 20, 3), (50_000, 32, 4)]
COMPETITOR = ("import numpy as np\nx = np.random.rand(400, 400)\n"
              "while True:\n    x = (x @ x) / 400\n")


def _competitor():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cases(sizes):
    for p, L, K in sizes:
        d = psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=100_000,
                         seed=0, dtype=torch.float64)
        yield (f"fit_em p={p} L={L} K={K}", p * L * K,
               lambda threads, d=d, K=K: psm.fit_em(d.features, counts=d.counts,
                                                    num_components=K, seed=0,
                                                    num_threads=threads))
    m = psm.simulate_moe(num_obs=4000, num_features=4, num_experts=3, seed=0,
                         dtype=torch.float64)
    yield ("MoE n=4000 K=3", 4000 * 5 * 3,
           lambda threads: psm.MixtureOfExperts(3).fit(m.x, m.y, seed=0, num_threads=threads))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/bench_load.json")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    cores = usable_cores()
    modes = {"default": None, "1 thread": 1, f"{cores} threads": cores}
    sizes = QUICK if args.quick else SIZES
    rows = []
    print(f"# bench_load on {platform.system()} {platform.machine()}, {cores} cores, torch "
          f"{torch.__version__}, Python {platform.python_version()}; "
          f"load before: {os.getloadavg()[0]:.2f}")
    print(f"{'case':<28} {'condition':<9} " + " ".join(f"{m:>11}" for m in modes)
          + f" {'default/best':>13} {'chose':>6}")
    for condition in ("idle", "loaded"):
        competitor = _competitor() if condition == "loaded" else None
        try:
            time.sleep(0.5)
            for name, work, run in _cases(sizes):
                chose = choose_threads(work)
                times = {m: _time(lambda t=t, run=run: run(t), args.repeats)
                         for m, t in modes.items()}
                ratio = times["default"] / min(times.values())
                rows.append(dict(case=name, condition=condition, work=work, seconds=times,
                                 default_over_best=ratio, threads_chosen=chose))
                print(f"{name:<28} {condition:<9} "
                      + " ".join(f"{times[m]:10.3f}s" for m in modes)
                      + f" {ratio:12.2f}x {chose:>6}", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
    worst = max(r["default_over_best"] for r in rows)
    print(f"\nworst default/best: {worst:.2f}x (load after: {os.getloadavg()[0]:.2f})")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "cores": cores, "rows": rows,
                   "worst_default_over_best": worst}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
