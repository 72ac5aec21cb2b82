# SPDX-License-Identifier: Apache-2.0
"""Mixtures of experts: EM against gradient descent and Adam, from the same starts.

Synthetic section: data from :func:`pyro_softmix.simulate_moe` (x ~ N(0, I_4), softmax gate)
with linear or logistic experts, K in {2, 3, 5} and signal-to-noise ratios high / medium / low
(expert coefficient norm 8 / 2 / 0.5 for unit noise). Logistic experts get a small ridge
(``--logistic-l2``, default 0.01) for every method: without it an expert that owns a separable
subset of the data has its maximum-likelihood coefficients at infinity. Per data set and seed
all methods start from one random start. EM runs to its stopping rule; full-batch gradient
descent and Adam run over a learning-rate grid on the mean log-likelihood. The target is EM's
final log-likelihood l_EM: a method reaches it when l >= l_EM - 1e-6 |l_EM|. Per method, the
best-tuned learning rate is the one that reaches the target soonest (or, if none does, ends
highest). Reported: iterations and seconds to the target, final log-likelihood, and parameter
errors against the truth (relative Frobenius error of the expert coefficients, after matching
experts).

Real section: scikit-learn's bundled breast-cancer data (logistic experts, accuracy) and
diabetes data (linear experts, RMSE), standardised, split 70/30, a small ridge; held-out
log-likelihood for EM, the best-tuned Adam and GD, each with the same starts.

Usage:
    python benchmarks/bench_moe.py                 # all sections (about 15 min on 2 CPU cores)
    python benchmarks/bench_moe.py --quick         # smoke run
    python benchmarks/bench_moe.py --sections real --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import numpy as np
import torch

import pyro_softmix as psm
from pyro_softmix.plots import match_components

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402

SNR = {"high": 8.0, "medium": 2.0, "low": 0.5}
KS = (2, 3, 5)
LR = {"gd": (0.1, 0.3, 1.0, 3.0), "adam": (0.01, 0.03, 0.1, 0.3)}
REL = 1e-6
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _reach(history, times, target):
    """(iterations, seconds) until history first reaches target, or (None, None)."""
    h = np.asarray(history)
    hit = np.nonzero(h >= target - REL * abs(target))[0]
    if hit.size == 0:
        return None, None
    return int(hit[0]), float(times[hit[0]])


def _expert_error(moe, truth):
    perm = match_components(moe.expert_weights, truth)
    est = moe.expert_weights[perm]
    return float((est - truth).norm() / truth.norm())


def _run(moe, x, y, start, method, lr=None, max_iter=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", psm.ConvergenceWarning)
        try:
            return moe.fit(x, y, init=start, method=method, lr=lr, max_iter=max_iter,
                           progress=False)
        except FloatingPointError:
            return None


def _best(runs, target):
    """The run (lr, moe) reaching the target soonest, else the one ending highest."""
    def key(item):
        moe = item[1]
        it, sec = _reach(moe.history, moe.times, target)
        return (0, sec, 0.0) if sec is not None else (1, 0.0, -moe.objective)
    ok = [r for r in runs if r[1] is not None]
    return min(ok, key=key) if ok else (None, None)


def compare(x, y, start, make, target=None, grad_iter=5000, truth=None):
    """EM, best GD and best Adam from ``start``; one row per method."""
    em = _run(make(), x, y, start, "em")
    target = em.objective if target is None else target
    rows = []
    for method in ("em", "gd", "adam"):
        if method == "em":
            lr, moe = None, em
        else:
            runs = [(lr, _run(make(), x, y, start, method, lr, grad_iter)) for lr in LR[method]]
            lr, moe = _best(runs, target)
            if moe is None:
                rows.append({"method": method, "lr": None, "diverged": True})
                continue
        it, sec = _reach(moe.history, moe.times, target)
        row = {"method": method, "lr": lr, "iters": it, "seconds": sec,
               "final": moe.objective, "n_iter": moe.n_iter,
               "sec_per_iter": moe.times[-1] / max(moe.n_iter, 1),
               "history": moe.history, "times": moe.times, "model": moe}
        if truth is not None:
            row["expert_error"] = _expert_error(moe, truth)
        rows.append(row)
    return rows


def synthetic(seeds, experts, ks, snrs, num_obs, grad_iter, logistic_l2=0.01):
    out = []
    for expert in experts:
        for k in ks:
            for snr_name in snrs:
                for seed in range(seeds):
                    data = psm.simulate_moe(num_obs=num_obs, num_features=4, num_experts=k,
                                            expert=expert, snr=SNR[snr_name], seed=seed)

                    l2 = logistic_l2 if expert == "logistic" else 0.0

                    def make(expert=expert, k=k, l2=l2):
                        return psm.MixtureOfExperts(k, expert, l2=l2)
                    start = make().initial_params(data.x, data.y, init="random", seed=seed)
                    rows = compare(data.x, data.y, start, make, grad_iter=grad_iter,
                                   truth=data.expert_weights)
                    for r in rows:
                        r.update(expert=expert, K=k, snr=snr_name, seed=seed)
                        r.pop("model", None)
                    out.extend(rows)
                    em, gd, adam = rows
                    print(f"{expert:8s} K={k} snr={snr_name:6s} seed={seed}: "
                          + "  ".join(_cell(r) for r in rows), flush=True)
    return out


def _cell(r):
    if r.get("diverged"):
        return f"{r['method']}: diverged"
    it = "-" if r["iters"] is None else r["iters"]
    sec = "-" if r["seconds"] is None else f"{r['seconds']:.3f}s"
    err = f" err {r['expert_error']:.3f}" if "expert_error" in r else ""
    lr = "" if r["lr"] is None else f" lr={r['lr']}"
    return f"{r['method']}{lr}: {it} it {sec}{err}"


def summarise(rows):
    """Per (expert, K, snr): medians over seeds of ratios gradient/EM, and success counts."""
    table = []
    keys = sorted({(r["expert"], r["K"], r["snr"]) for r in rows},
                  key=lambda t: (t[0], t[1], list(SNR).index(t[2])))
    for expert, k, snr in keys:
        group = [r for r in rows if (r["expert"], r["K"], r["snr"]) == (expert, k, snr)]
        em = {r["seed"]: r for r in group if r["method"] == "em"}
        top = {seed: max(r["final"] for r in group if r["seed"] == seed and not r.get("diverged"))
               for seed in em}

        def at_best(rows, top=top):
            return sum(1 for r in rows if not r.get("diverged")
                       and r["final"] >= top[r["seed"]] - REL * abs(top[r["seed"]]))
        line = {"expert": expert, "K": k, "snr": snr, "seeds": len(em),
                "em_at_best": f"{at_best(em.values())}/{len(em)}",
                "em_iters": float(np.median([r["iters"] for r in em.values()])),
                "em_seconds": float(np.median([r["seconds"] for r in em.values()])),
                "em_error": float(np.median([r["expert_error"] for r in em.values()]))}
        for method in ("gd", "adam"):
            mine = [r for r in group if r["method"] == method]
            reached = [r for r in mine if not r.get("diverged") and r["iters"] is not None]
            it_ratio = [r["iters"] / max(em[r["seed"]]["iters"], 1) for r in reached]
            t_ratio = [r["seconds"] / max(em[r["seed"]]["seconds"], 1e-9) for r in reached]
            line[f"{method}_reached"] = f"{len(reached)}/{len(mine)}"
            line[f"{method}_at_best"] = f"{at_best(mine)}/{len(mine)}"
            line[f"{method}_iter_ratio"] = float(np.median(it_ratio)) if it_ratio else math.inf
            line[f"{method}_time_ratio"] = float(np.median(t_ratio)) if t_ratio else math.inf
            errs = [r["expert_error"] for r in mine if not r.get("diverged")]
            line[f"{method}_error"] = float(np.median(errs)) if errs else math.nan
        table.append(line)
    return table


def print_table(table):
    head = (f"{'expert':8s} {'K':>2s} {'snr':6s} {'EM it':>6s} {'EM s':>7s} {'EM err':>7s} "
            f"{'best':>4s} | {'GD hit':>6s} {'it x':>6s} {'time x':>7s} {'err':>6s} {'best':>4s} | "
            f"{'Adam hit':>8s} {'it x':>6s} {'time x':>7s} {'err':>6s} {'best':>4s}")
    print(head)
    print("-" * len(head))
    for t in table:
        print(f"{t['expert']:8s} {t['K']:>2d} {t['snr']:6s} {t['em_iters']:>6.0f} "
              f"{t['em_seconds']:>7.3f} {t['em_error']:>7.3f} {t['em_at_best']:>4s} | "
              f"{t['gd_reached']:>6s} {t['gd_iter_ratio']:>6.1f} {t['gd_time_ratio']:>7.1f} "
              f"{t['gd_error']:>6.3f} {t['gd_at_best']:>4s} | {t['adam_reached']:>8s} "
              f"{t['adam_iter_ratio']:>6.1f} {t['adam_time_ratio']:>7.1f} {t['adam_error']:>6.3f} "
              f"{t['adam_at_best']:>4s}")
    print("it x / time x: median over seeds of (iterations / seconds to reach within 1e-6 of "
          "EM's final log-likelihood) divided by EM's, over the runs that reached it (hit); "
          "err: median relative error of the experts; best: runs ending within 1e-6 of the "
          "best final log-likelihood of the three methods.")


def plot(rows, path, expert="linear", k=3, seed=0):
    """Relative log-likelihood gap against iteration (top) and seconds (bottom), per SNR."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, len(SNR), squeeze=False)
    colours = {"em": "C0", "gd": "C1", "adam": "C2"}
    for col, snr in enumerate(SNR):
        group = [r for r in rows if (r["expert"], r["K"], r["snr"], r["seed"]) ==
                 (expert, k, snr, seed) and not r.get("diverged")]
        if not group:
            continue
        best = max(max(r["history"]) for r in group)
        for r in group:
            gap = np.maximum((best - np.asarray(r["history"])) / abs(best), 1e-16)
            label = r["method"].upper() + ("" if r["lr"] is None else f" (lr {r['lr']})")
            axes[0, col].semilogy(gap, color=colours[r["method"]], label=label)
            axes[1, col].semilogy(r["times"], gap, color=colours[r["method"]], label=label)
        axes[0, col].set_title(f"{expert} experts, K={k}, SNR {snr} ({SNR[snr]:g})")
        axes[0, col].set_xlabel("iteration")
        axes[1, col].set_xlabel("seconds")
        axes[0, col].set_xscale("symlog", linthresh=10)
        for ax in axes[:, col]:
            ax.axhline(REL, color="grey", lw=0.5, ls="--")
            ax.set_ylim(1e-14, 1)
            ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("relative log-likelihood gap")
    axes[1, 0].set_ylabel("relative log-likelihood gap")
    fig.savefig(path, dpi=110)
    return path


def real(seeds, ks, grad_iter):
    """Held-out log-likelihood and accuracy / RMSE on two scikit-learn data sets."""
    try:
        from sklearn.datasets import load_breast_cancer, load_diabetes
    except ImportError:
        print("real section skipped: pip install scikit-learn", flush=True)
        return []
    out = []
    sets = {"breast_cancer": (load_breast_cancer, "logistic"),
            "diabetes": (load_diabetes, "linear")}
    for name, (loader, expert) in sets.items():
        x_all, y_all = loader(return_X_y=True)
        x_all = torch.as_tensor(x_all, dtype=torch.float64)
        y_all = torch.as_tensor(y_all, dtype=torch.float64)
        for seed in range(seeds):
            perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
            cut = int(0.7 * len(y_all))
            tr, te = perm[:cut], perm[cut:]
            mean, sd = x_all[tr].mean(0), x_all[tr].std(0)
            xtr, xte = (x_all[tr] - mean) / sd, (x_all[te] - mean) / sd
            ytr, yte = y_all[tr], y_all[te]
            if expert == "linear":
                ym, ys = ytr.mean(), ytr.std()
                ytr, yte = (ytr - ym) / ys, (yte - ym) / ys
            for k in ks:
                def make(expert=expert, k=k):
                    return psm.MixtureOfExperts(k, expert, l2=1.0)
                start = make().initial_params(xtr, ytr, init="random", seed=seed)
                rows = compare(xtr, ytr, start, make, grad_iter=grad_iter)
                for r in rows:
                    moe = r.pop("model", None)
                    r.update(data=name, expert=expert, K=k, seed=seed, n_train=len(tr))
                    if moe is None:
                        continue
                    r["test_loglik_per_obs"] = moe.log_likelihood(xte, yte) / len(te)
                    if expert == "logistic":
                        r["test_accuracy"] = float((moe.predict(xte) == yte.long()).double().mean())
                    else:
                        r["test_rmse"] = float(((moe.predict(xte) - yte) ** 2).mean().sqrt())
                    r.pop("history"), r.pop("times")
                out.extend(rows)
                print(f"{name:13s} K={k} seed={seed}: " + "  ".join(
                    f"{r['method']}: {_cell(r)} test ll {r.get('test_loglik_per_obs', math.nan):.4f} "
                    + (f"acc {r['test_accuracy']:.3f}" if "test_accuracy" in r
                       else f"rmse {r.get('test_rmse', math.nan):.3f}") for r in rows), flush=True)
    return out


def summarise_real(rows):
    table = []
    for key in sorted({(r["data"], r["K"]) for r in rows}):
        group = [r for r in rows if (r["data"], r["K"]) == key and not r.get("diverged")]
        line = {"data": key[0], "K": key[1]}
        for m in ("em", "gd", "adam"):
            mine = [r for r in group if r["method"] == m]
            line[f"{m}_test_ll"] = float(np.mean([r["test_loglik_per_obs"] for r in mine]))
            metric = "test_accuracy" if "test_accuracy" in mine[0] else "test_rmse"
            line[f"{m}_{metric}"] = float(np.mean([r[metric] for r in mine]))
            line[f"{m}_seconds"] = float(np.median([r["seconds"] if r["seconds"] is not None
                                                    else math.inf for r in mine]))
            line[f"{m}_reached"] = f"{sum(r['iters'] is not None for r in mine)}/{len(mine)}"
        table.append(line)
    for line in table:
        print(json.dumps(line))
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--sections", nargs="+", default=["synthetic", "real"],
                    choices=["synthetic", "real"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--experts", nargs="+", default=["linear", "logistic"])
    ap.add_argument("--num-obs", type=int, default=2000)
    ap.add_argument("--grad-iter", type=int, default=5000)
    ap.add_argument("--logistic-l2", type=float, default=0.01,
                    help="ridge for logistic experts (their MLE is often at infinity)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "bench_moe.json"))
    ap.add_argument("--summarise", metavar="JSON", default=None,
                    help="print the tables and plots of an earlier run's JSON, run nothing")
    args = ap.parse_args(argv)
    if args.summarise:
        with open(args.summarise) as fh:
            old = json.load(fh)
        if "synthetic" in old:
            rows = old["synthetic"]["runs"]
            print_table(summarise(rows))
            for expert in sorted({r["expert"] for r in rows}):
                path = os.path.join(os.path.dirname(os.path.abspath(args.summarise)),
                                    f"bench_moe_{expert}.png")
                print("plot:", plot(rows, path, expert=expert,
                                    k=3 if any(r["K"] == 3 for r in rows) else rows[0]["K"]))
        if old.get("real", {}).get("runs"):
            summarise_real(old["real"]["runs"])
        return
    torch.set_default_dtype(torch.float64)
    ks, snrs, seeds, grad_iter = KS, list(SNR), args.seeds, args.grad_iter
    if args.quick:
        ks, seeds, grad_iter = (2,), 1, 500
    print(machine(), flush=True)
    result = {"machine": machine(), "rel": REL, "lr_grid": LR, "snr": SNR}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    if "synthetic" in args.sections:
        rows = synthetic(seeds, args.experts, ks, snrs, args.num_obs, grad_iter, args.logistic_l2)
        table = summarise(rows)
        print_table(table)
        for expert in args.experts:
            k = 3 if 3 in ks else ks[0]
            path = os.path.join(os.path.dirname(os.path.abspath(args.json)),
                                f"bench_moe_{expert}.png")
            print("plot:", plot(rows, path, expert=expert, k=k))
        result["synthetic"] = {"table": table, "runs": rows}
    if "real" in args.sections:
        rows = real(seeds, (2, 3) if not args.quick else (2,), grad_iter)
        result["real"] = {"table": summarise_real(rows) if rows else [], "runs": rows}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    print("wrote", args.json)


if __name__ == "__main__":
    main()
