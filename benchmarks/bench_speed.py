# SPDX-License-Identifier: Apache-2.0
"""Time to the MLE: pyro-softmix's EM against gradient methods, side by side in one run.

For each regime it simulates N draws, draws ONE random start (atoms at the scale the latent
second moment implies, equal weights) and runs every method, each timed from its call:

  default   ``fit_em`` with its defaults (``init="auto"``: the race of starts, its start grown
            by splits and its Newton finish, all on the clock);
  single    ``fit_em(init=start)``: the same EM from the gradient methods' random start;
  plain EM  ``fit_em(init=start, accelerate=False)``;
  Adam      Adam on the marginal log-likelihood (full batch, standardised features, log-weights
            through a softmax), best learning rate of a grid;
  SVI       Pyro SVI, AutoDelta guide + Adam on the collapsed counts model (the user's
            features; the default priors are negligible at this N), best learning rate of a grid;
  L-BFGS    torch.optim.LBFGS (strong Wolfe line search) on the marginal log-likelihood.

The MLE is the best log-likelihood any method (or a long EM run from the truth) reaches. For
each method it reports the wall time until the log-likelihood is first within 1e-6 and 1e-8
(relative) of it (for the default, the best start's, its race included), the ratio of the best
gradient method (Adam, SVI or L-BFGS) to the default, and the race's cost: the default's time
over the single start's, and a profile of the default: the fastest of ``--repeats`` more fits,
timed by phase. Gradient methods get a time budget; "inf" means not reached within it.
Every method is run ``--repeats`` times at its chosen setting (Adam and SVI: the best learning
rate of the grid) and its fastest run kept, as timings on a shared machine vary. A plot shows
the gap against wall time.

Regimes: easy (K=3, |t|=2, L=20), many (K=8), weak (|t|=1), K=8 at L=64, large L (L=256), large
p (p=10^5; 10^6 with --huge), GloVe 50-d and MiniLM (PCA to 50, and all 384 dimensions) designs
(skipped if not installed).

Usage:
    python benchmarks/bench_speed.py                    # all regimes (about 30 min on 2 cores)
    python benchmarks/bench_speed.py --quick            # smoke run
    python benchmarks/bench_speed.py --regimes easy,weak --budget 30
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
from pyro_softmix import accelerate, em, warmstart
from pyro_softmix.engine import EMProblem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine, random_starts  # noqa: E402
from bench_init import _design  # noqa: E402

TARGETS = (1e-6, 1e-8)
#: name: (design, p, L, K, |t|)
REGIMES = {
    "easy": ("gaussian", 10_000, 20, 3, 2.0),
    "many": ("gaussian", 10_000, 20, 8, 2.0),
    "weak": ("gaussian", 10_000, 20, 3, 1.0),
    "many_64": ("gaussian", 10_000, 64, 8, 2.0),
    "large_L": ("gaussian", 10_000, 256, 3, 2.0),
    "large_p": ("gaussian", 100_000, 20, 3, 2.0),
    "huge_p": ("gaussian", 1_000_000, 20, 3, 2.0),
    "glove": ("glove", 10_000, 50, 3, 2.0),
    "minilm": ("minilm", 10_000, 50, 3, 2.0),
    "minilm_384": ("minilm", 10_000, 384, 3, 2.0),
}
QUICK = {"easy": ("gaussian", 2_000, 8, 3, 2.0), "weak": ("gaussian", 2_000, 8, 3, 1.0)}
ADAM_LR = (0.01, 0.03, 0.1, 0.3)
SVI_LR = (0.003, 0.01, 0.03, 0.1)


class _Trace:
    """(seconds, log-likelihood) pairs; ``hit`` gives the first time within each target."""

    def __init__(self):
        self.start = time.perf_counter()
        self.points: list[tuple[float, float]] = []
        self.fit, self.seconds = None, 0.0  # set by the EM runs

    def add(self, loglik: float, elapsed: float | None = None):
        t = time.perf_counter() - self.start if elapsed is None else elapsed
        self.points.append((t, loglik))

    def add_best(self, loglik: float, elapsed: float | None = None):
        """Add the best log-likelihood so far (an EM fit returns its best start's)."""
        self.add(max(loglik, self.points[-1][1]) if self.points else loglik, elapsed)

    def hits(self, best: float) -> dict:
        out = {}
        for rel in TARGETS:
            out[rel] = next((t for t, ll in self.points if best - ll <= rel * abs(best)),
                            math.inf)
        return out


def _run_em(data, k, start, accelerate_em: bool, max_iter: int, seed: int = 0) -> _Trace:
    """fit_em from ``start`` (a start, or ``"auto"``), recording the objective after every EM
    cycle (in a race, the best start's) and every accepted Newton step."""
    trace = _Trace()
    original = accelerate.squarem_cycle
    original_method = accelerate._newton_method  # the full-Hessian or Newton-CG finish
    original_objective = EMProblem.objective

    def recording(problem, st, num_steps=2, step_max=None):
        out = original(problem, st, num_steps, step_max)
        if problem.num_components == k:  # not the smaller fits of the start grown by splits
            trace.add_best(max(out[1][-1]))
        return out

    def recording_newton(original_newton, problem, st, obj, tol, max_steps):
        evaluated = []  # (seconds, objective) of every trial point, accepted or not

        def objective(self, state):
            value = original_objective(self, state)
            evaluated.append((time.perf_counter() - trace.start, float(value[0])))
            return value

        EMProblem.objective = objective
        try:
            out = original_newton(problem, st, obj, tol, max_steps)
        finally:
            EMProblem.objective = original_objective
        trials = iter(evaluated)
        for value in out[1]:  # each accepted step, stamped when its objective was known
            trace.add_best(value, next((t for t, v in trials if v == value), None))
        return out

    def recording_method(problem):
        finish = original_method(problem)
        return lambda *args: recording_newton(finish, *args)

    accelerate.squarem_cycle = recording
    accelerate._newton_method = recording_method
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace.start = time.perf_counter()
            fit = psm.fit_em(data.features, counts=data.counts, num_components=k, init=start,
                             max_iter=max_iter, accelerate=accelerate_em, seed=seed)
            trace.seconds = time.perf_counter() - trace.start
    finally:
        accelerate.squarem_cycle = original
        accelerate._newton_method = original_method
    trace.fit = fit
    return trace


#: The phases of a default fit that the profile times: (module, function, label). Each is timed
#: without the phases it calls (the tempered fallback's grown start counts as a grown start).
PHASES = ((em, "prepare", "set-up"), (warmstart, "standardised_moments", "moments"),
          (warmstart, "one_component_fit", "1-comp"), (warmstart, "calibrated_atoms", "calib"),
          (warmstart, "grown_start", "grown"), (warmstart, "race", "race"),
          (em, "finish", "final"))


def profile_default(data, k: int, seed: int, repeats: int) -> dict:
    """Seconds per phase of ``fit_em``'s defaults (``PHASES``, and ``other``: the rest of the
    call), from the fastest of ``repeats`` fits, run apart from the timed ones; with the fit's
    ``total`` seconds and ``init`` label."""
    spent: dict[str, float] = {}
    inner = 0.0  # time of the timed phases called by the phase now running

    def timed(function, label):
        def wrapper(*args, **kwargs):
            nonlocal inner
            outer, inner = inner, 0.0
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                spent[label] = spent.get(label, 0.0) + took - inner
                inner = outer + took
        return wrapper

    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in PHASES]
    best = None
    try:
        for (mod, name, function), (_, _, label) in zip(originals, PHASES, strict=True):
            setattr(mod, name, timed(function, label))
        for _ in range(repeats):
            spent.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                fit = psm.fit_em(data.features, counts=data.counts, num_components=k, seed=seed)
                total = time.perf_counter() - t0
            if best is None or total < best["total"]:
                best = {label: spent.get(label, 0.0) for _, _, label in PHASES}
                best.update(other=total - sum(best.values()), total=total, init=fit.init)
    finally:
        for mod, name, function in originals:
            setattr(mod, name, function)
    return best


def _marginal_loglik(z, counts, atoms, log_w):
    log_q = torch.log_softmax(z @ atoms.T, 0)
    return counts @ torch.logsumexp(log_q + torch.log_softmax(log_w, 0), 1)


def gradient_closure(z, counts, atoms0, lr, method):
    """The parameters (atoms from ``atoms0``, equal weights), the optimiser (Adam at ``lr``, or
    L-BFGS with strong Wolfe line search, 20 iterations per step) and the closure of the
    negative mean marginal log-likelihood: the gradient baselines of the benchmarks."""
    atoms = atoms0.clone().requires_grad_(True)
    log_w = torch.zeros(atoms0.shape[0], dtype=z.dtype, requires_grad=True)
    total = float(counts.sum())
    if method == "adam":
        opt = torch.optim.Adam([atoms, log_w], lr=lr)
    else:
        opt = torch.optim.LBFGS([atoms, log_w], lr=1.0, max_iter=20, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=0,
                                tolerance_change=0)

    def closure():
        opt.zero_grad()
        loss = -_marginal_loglik(z, counts, atoms, log_w) / total
        loss.backward()
        return loss

    return atoms, log_w, opt, closure


def _run_torch(z, counts, atoms0, lr, budget, best, method) -> _Trace:
    """Adam or L-BFGS on the marginal log-likelihood in standardised coordinates."""
    _, _, opt, closure = gradient_closure(z, counts, atoms0, lr, method)
    total = float(counts.sum())

    def advance():
        for _ in range(20 if method == "adam" else 1):
            loss = opt.step(closure)
        return -loss.item() * total  # a host sync per 20 Adam steps (or one L-BFGS call)

    return _timed_run(advance, budget, best)


def _timed_run(advance, budget: float, best: float, evaluate=None) -> _Trace:
    """Call ``advance`` (timed) until the budget is spent or the MLE is reached; the
    log-likelihood is what it returns, or ``evaluate()`` (off the clock) when given."""
    trace, elapsed = _Trace(), 0.0
    while elapsed < budget:
        t = time.perf_counter()
        ll = advance()
        elapsed += time.perf_counter() - t
        if evaluate is not None:
            ll = evaluate()
        if not math.isfinite(ll):
            break
        trace.add(ll, elapsed)
        if best - ll <= TARGETS[-1] * abs(best) / 10:
            break
    return trace


def _run_svi(data, k, start, lr, budget, best) -> _Trace:
    x, counts = data.features, data.counts.double()
    sm = psm.SoftmaxMixtureModel(x, k)
    sm.set_data(counts=counts)
    kwargs = sm.model_kwargs(collapsed=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = pyro.infer.autoguide.AutoDelta(sm.model, init_loc_fn=psm.init_to_em(start))
    svi = pyro.infer.SVI(sm.model, guide, pyro.optim.Adam({"lr": lr}), pyro.infer.Trace_ELBO())

    def advance():
        for _ in range(20):
            svi.step(**kwargs)

    def evaluate():
        with torch.no_grad():
            med = guide.median(**kwargs)
            return float(_marginal_loglik(x.double(), counts, med["atoms"].double(),
                                          med["weights"].double().log()))

    return _timed_run(advance, budget, best, evaluate)


def run_regime(name, spec, args, tables) -> dict:
    design, p, dims, k, norm = spec
    x = _design(design, p, dims, args.seed, tables)
    data = psm.simulate(features=x, num_components=k, num_obs=args.num_obs, atom_norm=norm,
                        seed=args.seed, dtype=torch.float64)
    std = psm.standardize(data.features, warn=False)
    z = std.transform(data.features)
    counts = data.counts.double()
    gen = torch.Generator().manual_seed(args.seed)
    atoms_z = random_starts(z, counts, k, 1, gen)[0]
    start = {"weights": torch.full((k,), 1.0 / k, dtype=torch.float64),
             "atoms": std.atoms_from_z(atoms_z)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth = psm.fit_em(data.features, counts=data.counts, num_components=k,
                           init={"weights": data.weights, "atoms": data.atoms}, tol=1e-13,
                           max_iter=20_000)
    em_runs = {"default": lambda: _run_em(data, k, "auto", True, args.max_iter, args.seed),
               "single": lambda: _run_em(data, k, start, True, args.max_iter),
               "plain EM": lambda: _run_em(data, k, start, False, args.max_iter)}
    traces = {m: run() for m, run in em_runs.items()}
    finals = [truth.loglik] + [t.fit.loglik for t in traces.values()]
    best = max(finals)
    budget = min(args.budget, max(10.0, 25 * traces["default"].seconds))
    runs = {f"Adam lr={lr}": (lambda lr=lr: _run_torch(z, counts, atoms_z, lr, budget, best,
                                                       "adam")) for lr in ADAM_LR}
    runs.update({f"SVI lr={lr}": (lambda lr=lr: _run_svi(data, k, start, lr, budget, best))
                 for lr in SVI_LR})
    runs["L-BFGS"] = lambda: _run_torch(z, counts, atoms_z, None, budget, best, "lbfgs")
    grad = {m: run() for m, run in runs.items()}
    for t in grad.values():
        finals.append(max((ll for _, ll in t.points), default=-math.inf))
    best = max(finals)
    traces.update(grad)
    # Timings on a shared machine vary from run to run: the EM runs, L-BFGS and the best
    # learning rate of Adam and of SVI are each run --repeats times in all, fastest kept.
    runs.update(em_runs)
    chosen = list(em_runs) + ["L-BFGS"] + [
        min((m for m in traces if m.startswith(fam)), key=lambda m: _speed(traces[m], best))
        for fam in ("Adam", "SVI")]
    for m in chosen:
        for _ in range(args.repeats - 1):
            again = runs[m]()
            if _speed(again, best) < _speed(traces[m], best):
                traces[m] = again
    rows = {m: {str(rel): v for rel, v in t.hits(best).items()} for m, t in traces.items()}
    row = dict(regime=name, design=design, p=p, L=x.shape[1], K=k, norm=norm,
               N=args.num_obs, best_loglik=best, budget=budget, times=rows,
               default_iter=traces["default"].fit.n_iter, default_init=traces["default"].fit.init,
               single_iter=traces["single"].fit.n_iter,
               plain_iter=traces["plain EM"].fit.n_iter,
               profile=profile_default(data, k, args.seed, args.repeats),
               curves={m: t.points for m, t in traces.items()})
    for rel in TARGETS:
        key = str(rel)
        best_of = {fam: min(v[key] for m, v in rows.items() if m.startswith(fam))
                   for fam in ("Adam", "SVI")}
        default = rows["default"][key]
        best_of["L-BFGS"] = rows["L-BFGS"][key]
        row[f"best_gradient_{rel:g}"] = min(best_of.values())
        row[f"ratio_{rel:g}"] = row[f"best_gradient_{rel:g}"] / default
        row[f"ratio_race_{rel:g}"] = default / rows["single"][key]
        row[f"ratio_plain_{rel:g}"] = rows["plain EM"][key] / default
        row[f"ratio_lbfgs_{rel:g}"] = rows["L-BFGS"][key] / default
        row[f"best_adam_{rel:g}"] = best_of["Adam"]
        row[f"best_svi_{rel:g}"] = best_of["SVI"]
    return row


def _speed(trace: _Trace, best: float) -> tuple[float, ...]:
    """Sort key: the times to the targets, tightest first."""
    hits = trace.hits(best)
    return tuple(hits[rel] for rel in reversed(TARGETS))


def _fmt(v: float) -> str:
    return "     inf" if math.isinf(v) else f"{v:8.2f}"


def print_table(rows):
    print(f"\n{'regime':<10} {'p':>8} {'L':>4} {'K':>3} {'|t|':>4} {'target':>7} "
          f"{'default':>8} {'single':>8} {'plainEM':>8} {'Adam':>8} {'SVI':>8} {'L-BFGS':>8} "
          f"{'grad/def':>9} {'def/single':>10} {'plain/def':>9}")
    for r in rows:
        for rel in TARGETS:
            key = str(rel)
            t = r["times"]
            print(f"{r['regime']:<10} {r['p']:>8} {r['L']:>4} {r['K']:>3} {r['norm']:>4.1f} "
                  f"{rel:>7.0e} {_fmt(t['default'][key])} {_fmt(t['single'][key])} "
                  f"{_fmt(t['plain EM'][key])} "
                  f"{_fmt(r[f'best_adam_{rel:g}'])} {_fmt(r[f'best_svi_{rel:g}'])} "
                  f"{_fmt(t['L-BFGS'][key])} {r[f'ratio_{rel:g}']:8.1f}x "
                  f"{r[f'ratio_race_{rel:g}']:9.2f}x {r[f'ratio_plain_{rel:g}']:8.1f}x")
    print("(seconds from the call to the MLE's log-likelihood within the target, relative; "
          "default: fit_em's defaults, race included; single: fit_em from the gradient "
          "methods' random start; Adam/SVI: best learning rate; grad/def = best of Adam, SVI "
          "and L-BFGS over default)")


def print_profile(rows):
    """Where the default's time goes, against what a 5x lead on the best gradient method allows
    (best gradient / 5, to 1e-8) and what one EM start from the shared random start takes."""
    labels = [label for _, _, label in PHASES] + ["other"]
    print(f"\n{'regime':<10} {'total':>6} " + " ".join(f"{label:>7}" for label in labels)
          + f" {'single':>7} {'grad/5':>7}  start")
    for r in rows:
        prof, key = r["profile"], str(TARGETS[-1])
        grad = r[f"best_gradient_{TARGETS[-1]:g}"]
        print(f"{r['regime']:<10} {prof['total']:6.2f} "
              + " ".join(f"{prof[label]:7.3f}" for label in labels)
              + f" {r['times']['single'][key]:7.3f} {grad / 5:7.3f}  {prof['init']}")
    print("(seconds of the fastest default fit run apart, by phase, each without the phases it "
          "calls; single: one EM start to 1e-8; grad/5: the best gradient method's time to "
          "1e-8 over 5)")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * (
        (n + cols - 1) // cols)), squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        best = r["best_loglik"]
        for m, pts in r["curves"].items():
            fam = m.split(" lr=")[0]
            if " lr=" in m and r["times"][m][str(TARGETS[0])] != min(
                    r["times"][o][str(TARGETS[0])] for o in r["curves"] if o.startswith(fam)):
                continue  # only the best learning rate of each family
            if pts:
                t, ll = zip(*pts, strict=True)
                ax.semilogy(t, [max((best - v) / abs(best), 1e-12) for v in ll], label=m)
        ax.axhline(1e-8, color="k", lw=0.6, ls="--")
        ax.set_title(f"{r['regime']}: p={r['p']}, L={r['L']}, K={r['K']}", fontsize=9)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative gap to the MLE")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--huge", action="store_true", help="also p = 10^6")
    ap.add_argument("--regimes", default=None, help="comma-separated subset of the regimes")
    ap.add_argument("--num-obs", type=int, default=1_000_000)
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds per gradient run at most (also capped at 25x the default)")
    ap.add_argument("--max-iter", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each method (its best learning rate), the fastest kept")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    regimes = dict(QUICK) if args.quick else {
        k: v for k, v in REGIMES.items() if args.huge or k != "huge_p"}
    if args.quick:
        args.budget, args.num_obs = 3.0, 100_000
    if args.regimes:
        regimes = {k: REGIMES.get(k, QUICK.get(k)) for k in args.regimes.split(",")}
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine(torch.device('cpu'))}")
    rows, tables = [], {}
    for name, spec in regimes.items():
        try:
            row = run_regime(name, spec, args, tables)
        except ImportError as e:  # an embedding package is not installed
            print(f"skip {name}: {e}")
            continue
        rows.append(row)
        print_table([row])
    print_table(rows)
    print_profile(rows)
    stem = os.path.join(args.out, "bench_speed" + ("_quick" if args.quick else ""))
    plot(rows, stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(dict(machine=machine(torch.device("cpu")), args=vars(args), rows=rows), f,
                  indent=1)
    print(f"(json: {stem}.json, plot: {stem}.png)")


if __name__ == "__main__":
    main()
