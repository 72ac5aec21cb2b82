# SPDX-License-Identifier: Apache-2.0
"""Cost of one EM iteration against the matrix products it cannot avoid, and of a full fit.

For each (p, L, K) on the device it runs on, in one run:
  - ``bare``: the logits product Z @ T^T (p x L x K) plus the Hessian products, K batched
    (L x p)(p x L) products on precomputed operands (p x L^2 x K flops);
  - ``iter``: one full EM iteration with an explicit M-step (E-step, weights, one damped
    Newton M-step with its covariances formed);
  - ``ratio`` = iter / bare;
  - ``fit``: a full fit from one random start (skipped for the largest problems).

With ``--large-L`` it times the Hessian-free iteration that ``fit_em`` runs from rank
``engine.HESSIAN_FREE_RANK`` on, at L = 128 .. 1,024: one iteration in its steady state (its
preconditioner formed three iterations earlier) against the passes over the features it runs,
counted as it runs: forward products z @ T^T (p x L)(L x K) (the logits of the E-step
and of the line search's trials, one per CG iteration) and backward products (K x p)(p x L)
(the gradient, one per CG iteration). ``ratio`` prices every pass at the forward product's
time; ``/floor`` prices each at its own time alone. On a CPU the backward product is the
slower one. Also the explicit iteration (covariances formed) on the same state.

Usage:
    python benchmarks/bench_em.py                 # the sweep (a few minutes on 2 CPU cores)
    python benchmarks/bench_em.py --quick         # a small smoke run
    python benchmarks/bench_em.py --large-L       # the Hessian-free iteration, L = 128 .. 1,024
    python benchmarks/bench_em.py --device cuda --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix._chunks import weighted_sums
from pyro_softmix.engine import EMProblem
from pyro_softmix.moments import standardised_moments
from pyro_softmix.warmstart import random_atoms

BASE = (100_000, 64, 8)
SWEEP = [(1_000, 64, 8), (10_000, 64, 8), BASE, (1_000_000, 64, 8),
         (100_000, 8, 8), (100_000, 256, 8), (100_000, 64, 2), (100_000, 64, 16)]
QUICK = [(1_000, 8, 2), (10_000, 32, 4)]
DEMO = (20_000, 32, 4)
LARGE_L = [(100_000, L, 4) for L in (128, 256, 512, 1024)]
#: Skip the full fit above this many flops per iteration (p L^2 K).
FIT_FLOP_LIMIT = 2e10


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, repeats):
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_starts(z: torch.Tensor, counts: torch.Tensor, num_components: int,
                  num_starts: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``num_starts`` random atoms (K, r) at the scale M2 implies (as ``init="random"``), the
    shared start of the benchmarks' side-by-side runs."""
    mom = standardised_moments(z, counts.to(device=z.device, dtype=torch.float64), None)
    return list(random_atoms(mom, num_components, num_starts, generator).to(z).unbind())


def machine(device=None) -> str:
    cpu = platform.processor() or platform.machine()
    text = (f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if device is not None and torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def bench_one(p, L, K, device, dtype, repeats, seed=0):
    data = psm.simulate(num_points=p, num_features=L, num_components=K,
                        num_obs=max(10 * p, 1_000_000), atom_norm=2.0, seed=seed,
                        dtype=torch.float32)
    design = psm.standardize(data.features, warn=False)
    z = design.transform(data.features, dtype=dtype, device=device)
    problem = EMProblem(z, data.counts.to(device), K)
    problem.hessian_free = False  # the explicit iteration (fit_em's is Hessian-free from r = 16)
    problem.cov_reuse = 1  # and its covariances formed every time
    gen = torch.Generator().manual_seed(seed)
    atoms = random_starts(z, problem.counts, K, 1, gen)[0]
    log_w = torch.full((K,), -float(torch.log(torch.tensor(K))), dtype=dtype, device=device)
    logits = z @ atoms.T
    lse = problem.normalise(logits)
    _, w = problem.e_step(logits, lse, log_w)
    w = w.clone()  # e_step returns a buffer that one_iter's own E-step overwrites
    q0 = problem.workspace.q.clone()  # the softmax of `logits`, restored before each repeat

    # Bare products: the logits product and the Hessian products (K batched (L x p)(p x L)
    # products on precomputed operands, in one piece: no chunking, no weighting).
    y = torch.randn(K, p, L, dtype=dtype, device=device)

    def bare_logits():
        return z @ atoms.T

    def bare_hessian():
        return y.transpose(1, 2) @ y

    def one_iter():
        problem.workspace.q.copy_(q0)  # a p x K copy: an upper bound on the bookkeeping
        a, lw, lg, lse_new, _ = problem.m_step(w, atoms, log_w, logits, lse)
        problem.e_step(lg, lse_new, lw)

    t_logits = _timeit(bare_logits, device, repeats)
    t_hess = _timeit(bare_hessian, device, repeats)
    t_iter = _timeit(one_iter, device, repeats)
    row = {"p": p, "L": L, "K": K, "logits_s": t_logits, "hessian_s": t_hess,
           "bare_s": t_logits + t_hess, "iter_s": t_iter, "ratio": t_iter / (t_logits + t_hess)}
    if p * L * L * K <= FIT_FLOP_LIMIT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", psm.ConvergenceWarning)
            t = time.perf_counter()
            fit = psm.fit_em(data.features, counts=data.counts, num_components=K, init="random",
                             seed=seed, device=device, dtype=dtype, max_iter=300, progress=False)
            _sync(device)
            row |= {"fit_s": time.perf_counter() - t, "fit_iter": fit.n_iter,
                    "fit_converged": fit.converged}
    return row


class _Passes(torch.overrides.TorchFunctionMode):
    """Records the products over the features z (p, L) run inside it, as (kind, width)
    pairs: ("forward", K) for z @ T^T (p x L)(L x K), ("backward", K) for (K x p)(p x L)
    (or that product split into row blocks)."""

    def __init__(self, z):
        super().__init__()
        self.shape, self.passes = tuple(z.shape), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mats = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("mm", "matmul", "__matmul__", "addmm", "bmm") and len(mats) >= 2:
            a, b = mats[-2:]
            p, L = self.shape
            if tuple(a.shape) == (p, L) and b.dim() == 2:
                self.passes.append(("forward", b.shape[1]))
            elif (b.dim() == 2 and tuple(b.shape) == (p, L)) or (
                    b.dim() == 3 and b.shape[2] == L and b.shape[0] * b.shape[1] > p // 2):
                self.passes.append(("backward", a.shape[-2]))
        return func(*args, **(kwargs or {}))


def bench_hessian_free(p, L, K, device, dtype, repeats, seed=0):
    """One Hessian-free EM iteration in its steady state against the products over the
    features it runs (each timed alone), and one explicit iteration (covariances formed) from
    the same state."""
    data = psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=1_000_000,
                        atom_norm=2.0, seed=seed, dtype=torch.float32)
    z = psm.standardize(data.features, warn=False).transform(data.features, dtype=dtype,
                                                             device=device)
    problem = EMProblem(z, data.counts.to(device), K)
    problem.hessian_free = True
    atoms = random_starts(z, problem.counts, K, 1, torch.Generator().manual_seed(seed))[0]
    st = problem.start(atoms, torch.full((K,), -math.log(K), dtype=dtype, device=device))
    for _ in range(3):  # the first forms the preconditioner
        st, _ = problem.iterate(st)
    chol, q0 = problem.factor.clone(), problem.workspace.q.clone()

    def one_iter(hessian_free=True):
        problem.workspace.q.copy_(q0)
        problem.factor.copy_(chol)
        problem.hessian_free = hessian_free
        problem.iterate(st)

    t_iter = _timeit(one_iter, device, repeats)
    with _Passes(z) as counter:
        one_iter()
    passes = counter.passes
    problem.cov_reuse = 1
    t_explicit = _timeit(lambda: one_iter(False), device, repeats)
    gen = torch.Generator(device=device).manual_seed(seed)
    alone = {}
    for kind, width in sorted(set(passes)) or [("forward", K), ("backward", K)]:
        if kind == "forward":
            t = torch.randn(width, L, dtype=dtype, device=device, generator=gen)
            alone[kind, width] = _timeit(lambda t=t: z @ t.T, device, repeats)
        else:
            u = torch.randn(p, width, dtype=dtype, device=device, generator=gen)
            alone[kind, width] = _timeit(lambda u=u: weighted_sums(u, z), device, repeats)
    t_product = alone.get(("forward", K)) or _timeit(lambda: z @ st.atoms.T, device, repeats)
    floor = sum(alone[k] for k in passes)
    n_fwd = sum(kind == "forward" for kind, _ in passes)
    return {"p": p, "L": L, "K": K, "product_s": t_product,
            "backward_s": alone.get(("backward", K)), "forward_passes": n_fwd,
            "backward_passes": len(passes) - n_fwd, "floor_s": floor, "iter_s": t_iter,
            "per_pass_s": t_iter / len(passes) if passes else math.nan,
            "ratio": t_iter / (len(passes) * t_product) if passes else math.nan,
            "ratio_floor": t_iter / floor if passes else math.nan,
            "explicit_s": t_explicit, "speedup": t_explicit / t_iter}


def _large_l(device, dtype, repeats) -> list[dict]:
    print(f"{'p':>7} {'L':>5} {'K':>3} {'fwd ms':>7} {'bwd ms':>7} {'passes':>7} "
          f"{'floor ms':>9} {'iter ms':>8} {'ms/pass':>8} {'ratio':>6} {'/floor':>7} "
          f"{'explicit ms':>12} {'speed-up':>9}")
    rows = []
    for p, L, K in LARGE_L:
        row = bench_hessian_free(p, L, K, device, dtype, repeats)
        rows.append(row)
        bwd = row["backward_s"]
        print(f"{p:>7} {L:>5} {K:>3} {1e3 * row['product_s']:7.2f} "
              f"{1e3 * bwd if bwd else math.nan:7.2f} "
              f"{row['forward_passes']:>3d}+{row['backward_passes']:<3d} "
              f"{1e3 * row['floor_s']:9.2f} {1e3 * row['iter_s']:8.2f} "
              f"{1e3 * row['per_pass_s']:8.2f} {row['ratio']:6.2f} "
              f"{row['ratio_floor']:7.2f} {1e3 * row['explicit_s']:12.2f} "
              f"{row['speedup']:9.2f}", flush=True)
    first, last = rows[0], rows[-1]
    print(f"L {first['L']} -> {last['L']} ({last['L'] / first['L']:g}x): iteration "
          f"{last['iter_s'] / first['iter_s']:.1f}x, per pass "
          f"{last['per_pass_s'] / first['per_pass_s']:.1f}x, forward product "
          f"{last['product_s'] / first['product_s']:.1f}x")
    return rows


def bench_demo(device, repeats):
    """The `softmix demo` problem, as the command runs it (float64, init='auto')."""
    p, L, K = DEMO
    data = psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=1_000_000,
                        atom_norm=2.0, seed=0, dtype=torch.float64)
    times, fit = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        fit = psm.fit_em(data.features, counts=data.counts, num_components=K, seed=0,
                         device=device, progress=False)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"p": p, "L": L, "K": K, "fit_s": statistics.median(times), "fit_iter": fit.n_iter,
            "fit_converged": fit.converged}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small problems only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-L", action="store_true", help="the Hessian-free iteration only")
    ap.add_argument("--json", default=None, help="output file (default: "
                    "benchmarks/results/bench_em-DEVICE-DTYPE.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    configs = QUICK if args.quick else SWEEP
    info = machine(device)
    print(f"# bench_em on {info}; {args.dtype}, median of {args.repeats}; load "
          f"{os.getloadavg()[0]:.2f}")
    if args.large_L:
        rows = _large_l(device, dtype, args.repeats)
        path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                         f"bench_em_large_L-{device.type}-{args.dtype}.json")
        with open(path, "w") as f:
            json.dump({"machine": info, "dtype": args.dtype, "device": str(device),
                       "load": os.getloadavg()[0], "rows": rows}, f, indent=2)
        print(f"wrote {path}")
        return 0
    header = (f"{'p':>9} {'L':>4} {'K':>3} {'logits ms':>10} {'hessian ms':>11} {'bare ms':>9} "
              f"{'iter ms':>9} {'ratio':>6} {'fit s':>7} {'iters':>6}")
    print(header)
    rows = []
    for p, L, K in configs:
        row = bench_one(p, L, K, device, dtype, args.repeats)
        rows.append(row)
        fit_s = f"{row['fit_s']:7.2f}" if "fit_s" in row else f"{'-':>7}"
        iters = f"{row['fit_iter']:6d}" if "fit_iter" in row else f"{'-':>6}"
        print(f"{p:>9} {L:>4} {K:>3} {1e3 * row['logits_s']:10.2f} {1e3 * row['hessian_s']:11.2f} "
              f"{1e3 * row['bare_s']:9.2f} {1e3 * row['iter_s']:9.2f} {row['ratio']:6.2f} "
              f"{fit_s} {iters}", flush=True)
    demo = None if args.quick else bench_demo(device, 1)
    if demo:
        print(f"demo problem (p={demo['p']}, L={demo['L']}, K={demo['K']}, N=1e6, float64, "
              f"init='auto'): {demo['fit_s']:.2f} s, {demo['fit_iter']} iterations")
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     f"bench_em-{device.type}-{args.dtype}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, "dtype": args.dtype, "device": str(device), "rows": rows,
                   "demo": demo}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
