# SPDX-License-Identifier: Apache-2.0
"""The GPU check: CPU/GPU agreement of a fit, one EM iteration against its floors, a fit at scale.

Run by ``benchmarks/gpu_check.sh`` (which installs carried wheels and runs the CUDA tests
first); runs on a CPU too (``--device cpu --quick``), to check the script itself.

1. Agreement: the same float64 fit (p = 20,000, L = 32, K = 4, N = 10^6, seed 0) on the CPU and
   on the device: weights, atoms, log-likelihood, iterations.
2. One iteration at p = 10^6, L = 1,024, K = 16 in float32 (one start): its time against two
   floors measured on the same device, the time to read X twice (the logits, then the
   gradient's products) at the device's copy bandwidth, and the (p x L)(L x K) products'
   flops at its float32 matrix-product rate; and the explicit M-step covariances' share
   (p L^2 K flops, formed every few iterations).
3. A default ``fit_em`` of p = 10^6, L = 1,024, K = 16 (float32, N = 10^8), timed from the call,
   against the truth's log-likelihood; peak device memory.

Usage:
    python benchmarks/gpu_check.py --json gpu_check.json              # on a GPU, a few minutes
    python benchmarks/gpu_check.py --device cpu --quick               # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

import pyro_softmix as psm
from pyro_softmix.engine import prepare

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_em import machine  # noqa: E402


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def mixture_data(p: int, dim: int, k: int, n: int, device, dtype, seed: int = 0):
    """A Gaussian design on the device, atoms of norm 2, Dirichlet(5) weights, N draws."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p, dim, generator=gen, device=device, dtype=dtype)
    atoms = torch.randn(k, dim, generator=gen, device=device, dtype=torch.float64)
    atoms = 2.0 * atoms / atoms.norm(dim=1, keepdim=True)
    weights = torch.distributions.Dirichlet(torch.full((k,), 5.0, dtype=torch.float64)).sample()
    weights = weights.to(device)
    probs = (weights[:, None] * torch.softmax(atoms @ x.double().T, 1)).sum(0)
    counts = torch.zeros(p, dtype=torch.float64, device=device)
    left, block = n, 10**7
    while left > 0:  # draws in blocks bound the index tensor's memory
        m = min(left, block)
        counts += torch.bincount(torch.multinomial(probs, m, replacement=True, generator=gen),
                                 minlength=p).double()
        left -= m
    truth = float(counts @ probs.log())
    return x, counts, weights, atoms, truth


def agreement(device, p: int, dim: int, k: int, n: int) -> dict:
    data = psm.simulate(num_points=p, num_features=dim, num_components=k, num_obs=n, seed=0,
                        dtype=torch.float64)
    fits = {}
    for where in ("cpu", device):
        start = time.perf_counter()
        fits[where] = psm.fit_em(data.features, counts=data.counts, num_components=k, seed=0,
                                 device=where, dtype=torch.float64)
        fits[where].seconds = time.perf_counter() - start
    a, b = fits["cpu"], fits[device]
    out = dict(p=p, L=dim, K=k, N=n, cpu_seconds=a.seconds, device_seconds=b.seconds,
               cpu_iters=a.n_iter, device_iters=b.n_iter,
               max_weight_diff=float((a.weights - b.weights.cpu()).abs().max()),
               max_atom_diff=float((a.atoms - b.atoms.cpu()).abs().max()),
               loglik_rel_diff=abs(a.loglik - b.loglik) / abs(a.loglik))
    print(f"agreement (p={p:,}, L={dim}, K={k}, float64): weights {out['max_weight_diff']:.2e}, "
          f"atoms {out['max_atom_diff']:.2e}, loglik {out['loglik_rel_diff']:.2e} relative; "
          f"iterations {a.n_iter} (cpu) / {b.n_iter} ({device}); {a.seconds:.2f} s / "
          f"{b.seconds:.2f} s")
    return out


def floors(device, p: int, dim: int, k: int) -> dict:
    dtype = torch.float32
    x, counts, weights, atoms, _ = mixture_data(p, dim, k, 10 * p, device, dtype)
    setup = prepare(x, counts, None, None, k, dtype, device, None)
    problem = setup.problem
    gen = torch.Generator(device="cpu").manual_seed(1)
    start_atoms = (0.5 * torch.randn(k, setup.z.shape[1], generator=gen)).to(setup.z)
    state = problem.start(start_atoms, torch.full((k,), -math.log(k), device=device,
                                                  dtype=dtype))
    reuse = problem.cov_reuse

    def iterations():
        nonlocal state
        for _ in range(reuse):  # one covariance and the steps that reuse it
            state, _ = problem.iterate(state)

    per_iter = _timed(iterations, device, repeats=2) / reuse
    big = torch.empty(p, dim, device=device, dtype=dtype)
    copy_s = _timed(lambda: big.copy_(setup.z), device)
    bandwidth = 2 * big.numel() * big.element_size() / copy_s  # bytes read + written per s
    n = 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    gemm_rate = 2 * n**3 / _timed(lambda: a @ a, device)
    read_floor = 2 * big.numel() * big.element_size() / bandwidth
    gemm_floor = 2 * 2 * p * dim * k / gemm_rate
    cov_s = 2 * p * dim * dim * k / gemm_rate / reuse
    out = dict(p=p, L=dim, K=k, seconds_per_iteration=per_iter, bandwidth_bytes_per_s=bandwidth,
               gemm_flops_per_s=gemm_rate, read_floor=read_floor, gemm_floor=gemm_floor,
               covariance_floor_per_iteration=cov_s, ratio_to_floor=per_iter / max(read_floor,
                                                                                   gemm_floor))
    print(f"one iteration (p={p:,}, L={dim}, K={k}, float32): {per_iter * 1e3:.1f} ms; floors: "
          f"read X twice {read_floor * 1e3:.2f} ms ({bandwidth / 1e9:.0f} GB/s), products "
          f"{gemm_floor * 1e3:.2f} ms ({gemm_rate / 1e12:.1f} TFLOP/s); ratio "
          f"{out['ratio_to_floor']:.1f}x; the covariances' floor alone {cov_s * 1e3:.1f} ms "
          f"per iteration (formed every {reuse})")
    return out


def full_fit(device, p: int, dim: int, k: int, n: int, max_iter: int) -> dict:
    x, counts, weights, atoms, truth = mixture_data(p, dim, k, n, device, torch.float32, seed=2)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = psm.fit_em(x, counts=counts, num_components=k, seed=0, max_iter=max_iter)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**30
            if torch.device(device).type == "cuda" else math.nan)
    out = dict(p=p, L=dim, K=k, N=n, seconds=seconds, n_iter=fit.n_iter,
               converged=fit.converged, loglik=fit.loglik, truth_loglik=truth,
               init=fit.init, peak_gib=peak, warnings=[str(w.message)[:200] for w in caught])
    print(f"fit_em defaults (p={p:,}, L={dim}, K={k}, N={n:.0e}, float32): {seconds:.1f} s, "
          f"{fit.n_iter} iterations, converged {fit.converged}; loglik {fit.loglik:.10g} vs the "
          f"truth's {truth:.10g}; peak device memory {peak:.1f} GiB; start: {fit.init}")
    for w in out["warnings"]:
        print("  warning:", w)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a dry run)")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--json", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args(argv)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick for a dry run")
        return 2
    print(f"# gpu_check on {machine(device)}; load {os.getloadavg()[0]:.2f}")
    sizes = dict(agree=(2_000, 8, 3, 100_000), floor=(20_000, 128, 4),
                 fit=(20_000, 128, 4, 10**6)) if args.quick else dict(
        agree=(20_000, 32, 4, 10**6), floor=(10**6, 1024, 16), fit=(10**6, 1024, 16, 10**8))
    out = {"machine": machine(device), "device": device}
    for name, fn in (("agreement", lambda: agreement(device, *sizes["agree"])),
                     ("iteration", lambda: floors(device, *sizes["floor"])),
                     ("full_fit", lambda: full_fit(device, *sizes["fit"], args.max_iter))):
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 (report and go on to the next check)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(out, handle, indent=2)
    print(f"wrote {args.json}")
    return 0 if all("error" not in v for v in out.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
