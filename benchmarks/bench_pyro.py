# SPDX-License-Identifier: Apache-2.0
"""EM against Pyro's own inference, side by side in one run.

Sections (all on the machine this runs on; the header says which):
  speed     time for EM (``fit_em`` defaults) to reach the MLE against Pyro SVI (AutoDelta +
            Adam on the collapsed model, best learning rate of a grid, the same random start)
            to reach the MLE's log-likelihood within 1e-4 (and 1e-6) relative;
            p = 10,000, L = 16, K = 4, N = 10^6. Also a plot of the gap against wall time.
  nuts      NUTS from EM on the collapsed model against the enumerated per-draw model,
            effective samples (minimum over parameters, after relabelling) per second;
            p = 500, L = 4, K = 3, N = 10^4.
  coverage  repeated seeds at p = 500, L = 4, K = 3, N = 20,000: NUTS from EM (collapsed),
            max split R-hat after relabelling, how often the 90% intervals cover the truth,
            how often the posterior means lie inside EM's 90% Wald intervals.

Usage:
    python benchmarks/bench_pyro.py                       # everything (about 20 min, 2 cores)
    python benchmarks/bench_pyro.py --sections speed nuts
    python benchmarks/bench_pyro.py --quick               # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import pyro
import torch

import pyro_softmix as psm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine as _machine  # noqa: E402
from bench_em import random_starts  # noqa: E402


def machine() -> str:
    return f"{_machine()}, pyro {pyro.__version__}"


def _loglik(features, counts, weights, atoms) -> float:
    comp = torch.log_softmax(atoms @ features.T, -1)
    return float((counts * torch.logsumexp(comp + weights.log()[:, None], 0)).sum())


def _random_start(features, counts, k, seed):
    design = psm.standardize(features)
    z = design.transform(features)
    atoms_z = random_starts(z, counts, k, 1, torch.Generator().manual_seed(seed))[0]
    return {"weights": torch.full((k,), 1.0 / k), "atoms": design.atoms_from_z(atoms_z)}


# ----------------------------------------------------------------------------------------------
def bench_speed(quick: bool, out_dir: str) -> dict:
    p, L, K, N = (2_000, 8, 3, 100_000) if quick else (10_000, 16, 4, 1_000_000)
    lrs = (0.01, 0.05) if quick else (0.003, 0.01, 0.03, 0.1)
    budget = 5.0 if quick else 45.0  # seconds of SVI per run
    data = psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=N,
                        atom_norm=2.0, seed=0)
    x, counts = data.features, data.counts.double()
    fit = psm.fit_em(x, counts=counts, num_components=K, seed=0)
    mle = fit.loglik
    start = _random_start(x, counts, K, seed=0)
    same = psm.fit_em(x, counts=counts, num_components=K, init=start)
    # EM from the same start: time to 1e-4 / 1e-6 / 1e-8 from its history (iterations are
    # about equally expensive, so time is prorated over iterations).
    per_iter = same.seconds / max(same.n_iter, 1)
    best = max(mle, same.loglik)

    def em_time(rel):
        for i, ll in enumerate(same.history):
            if best - ll <= rel * abs(best):
                return i * per_iter
        return math.inf

    rows = [dict(method="EM (fit_em defaults: 5 starts)", seconds_to_mle=fit.seconds,
                 loglik=fit.loglik, iterations=fit.n_iter)]
    rows.append(dict(method="EM (same start as SVI)", t_1e4=em_time(1e-4), t_1e6=em_time(1e-6),
                     t_1e8=em_time(1e-8), loglik=same.loglik, iterations=same.n_iter))
    curves = {"EM (same start)": [(i * per_iter, best - ll) for i, ll in
                                  enumerate(same.history)]}
    sm = psm.SoftmaxMixtureModel(x, K)
    sm.set_data(counts=counts)
    kwargs = sm.model_kwargs(collapsed=True)
    targets = (1e-4, 1e-6, 1e-8)

    def run_svi(init_fn, lr):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = pyro.infer.autoguide.AutoDelta(sm.model, init_loc_fn=init_fn)
        svi = pyro.infer.SVI(sm.model, guide, pyro.optim.Adam({"lr": lr}),
                             pyro.infer.Trace_ELBO())
        elapsed, steps, curve = 0.0, 0, []
        hit = dict.fromkeys(targets, math.inf)
        while elapsed < budget and hit[1e-8] == math.inf:
            t = time.perf_counter()
            for _ in range(25):
                svi.step(**kwargs)
            elapsed += time.perf_counter() - t
            steps += 25
            with torch.no_grad():
                med = guide.median(**kwargs)
            gap = best - _loglik(x, counts, med["weights"], med["atoms"])
            curve.append((elapsed, gap))
            for rel in targets:
                if hit[rel] == math.inf and gap <= rel * abs(best):
                    hit[rel] = elapsed
        return hit, steps, elapsed, curve

    for label, init_fn in (("same start", psm.init_to_em(start)),
                           ("Pyro default init", pyro.infer.autoguide.init_to_median)):
        for lr in lrs:
            hit, steps, elapsed, curve = run_svi(init_fn, lr)
            rows.append(dict(method=f"SVI AutoDelta lr={lr} ({label})", t_1e4=hit[1e-4],
                             t_1e6=hit[1e-6], t_1e8=hit[1e-8], steps=steps,
                             final_gap=curve[-1][1], seconds_per_step=elapsed / steps,
                             init=label))
            if label == "same start":
                curves[f"SVI lr={lr}"] = curve
    em_same = rows[1]
    ratios = {}
    for label in ("same start", "Pyro default init"):
        svi_rows = [r for r in rows if r.get("init") == label]
        for rel in targets:
            key = f"t_{rel:.0e}".replace("-0", "")
            best_svi = min(r[key] for r in svi_rows)
            ratios[f"{label}: best SVI to {rel:g} / EM (same start) to 1e-8"] = (
                best_svi / em_same["t_1e8"])
            ratios[f"{label}: best SVI to {rel:g} / EM (fit_em defaults)"] = (
                best_svi / fit.seconds)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        t, g = zip(*curve, strict=True)
        ax.semilogy(t, [max(v, 1e-3) for v in g], label=name)
    ax.axhline(1e-4 * abs(best), color="k", lw=0.6, ls="--", label="1e-4 relative")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("log-likelihood gap to the MLE (nats)")
    ax.set_title(f"p={p}, L={L}, K={K}, N={N:.0e}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot = os.path.join(out_dir, "bench_pyro_speed.png")
    fig.savefig(plot, dpi=90)
    plt.close(fig)

    print(f"\n== speed: p={p}, L={L}, K={K}, N={N:.0e}; MLE loglik {mle:.6f}")
    print(f"{'method':<44} {'to 1e-4':>9} {'to 1e-6':>9} {'to 1e-8':>9} {'s/step':>8}")
    for r in rows:
        if "seconds_to_mle" in r:
            print(f"{r['method']:<44} {r['seconds_to_mle']:9.2f} (full fit, {r['iterations']} "
                  "iterations)")
        else:
            print(f"{r['method']:<44} {r['t_1e4']:9.2f} {r['t_1e6']:9.2f} "
                  f"{r.get('t_1e8', math.nan):9.2f} {r.get('seconds_per_step', math.nan):8.4f}")
    for name, value in ratios.items():
        print(f"  {name:<62} {value:8.1f}x")
    print(f"(plot: {plot})")
    return dict(p=p, L=L, K=K, N=N, mle=mle, rows=rows, ratios=ratios, plot=plot)


# ----------------------------------------------------------------------------------------------
def _min_ess_rate(sm, **opts):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains")
        sm.fit_mcmc(**opts)
    rows = psm.posterior_summary(sm.mcmc, reference=sm.em_fit)
    ess = min(r["ess"] for r in rows)
    return ess, sm.mcmc_seconds, max(r["r_hat"] for r in rows)


def bench_nuts(quick: bool) -> dict:
    N = 2_000 if quick else 10_000
    warm, draws = (30, 30) if quick else (200, 300)
    data = psm.simulate(num_points=500, num_features=4, num_components=3, num_obs=N,
                        atom_norm=3.0, seed=0, return_tokens=True)
    out = {}
    for collapsed in (True, False):
        sm = psm.SoftmaxMixtureModel(data.features, 3)
        sm.fit_em(tokens=data.tokens, seed=0)
        ess, sec, rhat = _min_ess_rate(sm, num_samples=draws, warmup_steps=warm,
                                       collapsed=collapsed, seed=0)
        out["collapsed" if collapsed else "enumerated"] = dict(min_ess=ess, seconds=sec,
                                                               ess_per_second=ess / sec,
                                                               max_r_hat=rhat)
    ratio = out["collapsed"]["ess_per_second"] / out["enumerated"]["ess_per_second"]
    print(f"\n== NUTS from EM: p=500, L=4, K=3, N={N}, {warm} warm-up + {draws} draws, 1 chain")
    print(f"{'model':<12} {'min ESS':>8} {'seconds':>8} {'ESS/s':>8} {'max R-hat':>10}")
    for name, r in out.items():
        print(f"{name:<12} {r['min_ess']:8.1f} {r['seconds']:8.1f} {r['ess_per_second']:8.2f} "
              f"{r['max_r_hat']:10.4f}")
    print(f"collapsed / enumerated ESS per second = {ratio:.1f}x")
    return dict(N=N, warmup=warm, draws=draws, models=out, ratio=ratio)


# ----------------------------------------------------------------------------------------------
def bench_coverage(quick: bool, seeds: int) -> dict:
    warm, draws, chains = (30, 40, 1) if quick else (300, 500, 2)
    level = 0.9
    per_seed = []
    for seed in range(seeds):
        data = psm.simulate(num_points=500, num_features=4, num_components=3, num_obs=20_000,
                            atom_norm=3.0, seed=1000 + seed)
        sm = psm.SoftmaxMixtureModel(data.features, 3)
        fit = sm.fit_em(counts=data.counts, seed=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="num_chains")
            sm.fit_mcmc(num_samples=draws, warmup_steps=warm, num_chains=chains, seed=seed)
        rows = psm.posterior_summary(sm.mcmc, reference=fit, level=level)
        truth = psm.relabel_samples({"weights": data.weights[None], "atoms": data.atoms[None]},
                                    fit)
        flat = {f"weights[{k}]": float(truth["weights"][0, k]) for k in range(3)}
        flat |= {f"atoms[{k},{j}]": float(truth["atoms"][0, k, j])
                 for k in range(3) for j in range(4)}
        ci = psm.fisher_intervals(fit, counts=data.counts, level=level)
        em_lo = {f"weights[{k}]": float(ci["weights"][k, 0]) for k in range(3)}
        em_hi = {f"weights[{k}]": float(ci["weights"][k, 1]) for k in range(3)}
        for k in range(3):
            for j in range(4):
                em_lo[f"atoms[{k},{j}]"] = float(ci["atoms"][k, j, 0])
                em_hi[f"atoms[{k},{j}]"] = float(ci["atoms"][k, j, 1])
        covered = [r["lo"] <= flat[r["name"]] <= r["hi"] for r in rows]
        em_covered = [em_lo[n] <= flat[n] <= em_hi[n] for n in flat]
        inside = [em_lo[r["name"]] <= r["mean"] <= em_hi[r["name"]] for r in rows]
        per_seed.append(dict(seed=seed, max_r_hat=max(r["r_hat"] for r in rows),
                             min_ess=min(r["ess"] for r in rows), covered=sum(covered),
                             em_covered=sum(em_covered), means_inside_em=sum(inside),
                             params=len(rows), seconds=sm.mcmc_seconds))
        s = per_seed[-1]
        print(f"  seed {seed}: max R-hat {s['max_r_hat']:.4f}, min ESS {s['min_ess']:.0f}, "
              f"NUTS covers {s['covered']}/{s['params']}, EM Wald covers "
              f"{s['em_covered']}/{s['params']}, means inside EM intervals "
              f"{s['means_inside_em']}/{s['params']} ({s['seconds']:.0f} s)", flush=True)
    total = sum(s["params"] for s in per_seed)
    summary = dict(
        seeds=seeds, chains=chains, warmup=warm, draws=draws, level=level,
        nuts_coverage=sum(s["covered"] for s in per_seed) / total,
        em_wald_coverage=sum(s["em_covered"] for s in per_seed) / total,
        means_inside_em=sum(s["means_inside_em"] for s in per_seed) / total,
        max_r_hat=max(s["max_r_hat"] for s in per_seed),
        seeds_with_r_hat_below_1_01=sum(s["max_r_hat"] < 1.01 for s in per_seed),
        per_seed=per_seed)
    se = math.sqrt(level * (1 - level) / total)
    print(f"\n== coverage over {seeds} seeds x 14 parameters ({chains} chains x {draws} draws): "
          f"NUTS {summary['nuts_coverage']:.3f} (nominal {level}, binomial se {se:.3f}), "
          f"EM Wald {summary['em_wald_coverage']:.3f}; posterior means inside EM intervals "
          f"{summary['means_inside_em']:.3f}; max R-hat {summary['max_r_hat']:.4f} "
          f"({summary['seeds_with_r_hat_below_1_01']}/{seeds} seeds below 1.01)")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["speed", "nuts", "coverage"],
                    choices=["speed", "nuts", "coverage"])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--seeds", type=int, default=None, help="coverage seeds (default 20)")
    ap.add_argument("--json", default=None, help="output file (default: "
                    "benchmarks/results/bench_pyro.json)")
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    info = machine()
    print(f"machine: {info}")
    result = {"machine": info, "quick": args.quick}
    if "speed" in args.sections:
        result["speed"] = bench_speed(args.quick, out_dir)
    if "nuts" in args.sections:
        result["nuts"] = bench_nuts(args.quick)
    if "coverage" in args.sections:
        result["coverage"] = bench_coverage(args.quick, args.seeds or (2 if args.quick else 20))
    path = args.json or os.path.join(out_dir, "bench_pyro.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
