# SPDX-License-Identifier: Apache-2.0
"""The ``softmix`` command: ``demo``, ``fit`` and ``simulate``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARRAY_FORMATS = ("npy", "npz", "csv", "pt")

DEMO = {"num_points": 20_000, "num_features": 32, "num_components": 4, "num_obs": 1_000_000}
DEMO_QUICK = {"num_points": 2_000, "num_features": 8, "num_components": 3, "num_obs": 100_000}


# ---------------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------------
def load_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read an array from ``.npy``, ``.npz`` (``key`` or its only array), ``.csv``/``.txt`` or
    ``.pt`` (a tensor, or a dict of tensors with ``key``)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            if key is not None and key in names:
                return data[key]
            if len(names) == 1:
                return data[names[0]]
            raise ValueError(f"{str(path)!r} holds arrays {names}; expected one named {key!r}")
    if suffix in (".csv", ".txt"):
        delimiter = "," if suffix == ".csv" else None
        arr = np.loadtxt(path, delimiter=delimiter, ndmin=1)
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)) and key in ("counts", "tokens"):
            arr = arr.astype(np.int64)
        return arr
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if key in obj:
                obj = obj[key]
            elif len(obj) == 1:
                obj = next(iter(obj.values()))
            else:
                raise ValueError(f"{str(path)!r} holds {list(obj)}; expected one named {key!r}")
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{str(path)!r} does not hold a tensor")
        return obj.numpy()
    raise ValueError(f"unsupported file type {suffix!r} for {str(path)!r}: "
                     "use .npy, .npz, .csv, .txt or .pt")


def save_array(path: str | os.PathLike, array, key: str) -> Path:
    """Write ``array`` in the format given by the suffix of ``path``."""
    path = Path(path)
    arr = torch.as_tensor(array).detach().cpu().numpy()
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, arr)
    elif suffix == ".npz":
        np.savez(path, **{key: arr})
    elif suffix == ".csv":
        fmt = "%d" if arr.dtype.kind in "iu" else "%.17g"
        np.savetxt(path, arr, delimiter=",", fmt=fmt)
    elif suffix == ".pt":
        torch.save({key: torch.from_numpy(arr)}, path)
    else:
        raise ValueError(f"unsupported format {suffix!r}")
    return path


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def _cmd_simulate(args) -> int:
    from .simulation import simulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = simulate(args.num_points, args.num_features, args.num_components, args.num_obs,
                    atom_norm=args.atom_norm, return_tokens=args.tokens, seed=args.seed,
                    dtype=torch.float64)
    ext = args.format
    written = [save_array(out / f"features.{ext}", data.features, "features"),
               save_array(out / f"counts.{ext}", data.counts, "counts")]
    if args.tokens:
        written.append(save_array(out / f"tokens.{ext}", data.tokens, "tokens"))
    truth = {"weights": data.weights.tolist(), "atoms": data.atoms.tolist(),
             "num_obs": data.num_obs, "seed": args.seed}
    _write_json(out / "truth.json", truth)
    written.append(out / "truth.json")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_fit(args) -> int:
    from .em import fit_em
    from .plots import plot_convergence
    from .results import load_fit

    features = load_array(args.features, "features")
    counts = load_array(args.counts, "counts") if args.counts else None
    tokens = load_array(args.tokens, "tokens") if args.tokens else None
    init = args.init
    if init not in ("auto", "random"):
        if not Path(init).is_file():
            raise ValueError(f"--init must be 'auto', 'random' or a fit file, got {init!r} "
                             "(no such file)")
        init = load_fit(init)
    fit = fit_em(features, counts=counts, tokens=tokens, num_components=args.num_components,
                 init=init, num_inits=args.num_inits, max_iter=args.max_iter, tol=args.tol,
                 device=args.device, dtype=args.dtype, seed=args.seed,
                 progress=False if args.quiet else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit.save(out / "fit.npz")
    _write_json(out / "summary.json", fit.to_dict())
    plot_convergence(fit, out / "convergence.png")
    print(fit.summary())
    print(f"wrote {out / 'fit.npz'}, {out / 'summary.json'}, {out / 'convergence.png'}")
    return 0


def _cmd_demo(args) -> int:
    from .em import fit_em
    from .plots import match_components, plot_convergence, plot_recovery
    from .simulation import simulate

    cfg = DEMO_QUICK if args.quick else DEMO
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    print(f"Simulating a softmax mixture: p={cfg['num_points']:,} support points, "
          f"L={cfg['num_features']} features, K={cfg['num_components']} components, "
          f"N={cfg['num_obs']:,} draws (seed {args.seed})")
    data = simulate(**cfg, atom_norm=2.0, seed=args.seed, dtype=dtype)
    t0 = time.perf_counter()
    fit = fit_em(data.features, counts=data.counts, num_components=cfg["num_components"],
                 seed=args.seed, device=args.device, progress=False if args.quiet else None)
    seconds = time.perf_counter() - t0
    truth_ll = float((data.counts.double() * data.probs.double().log()).sum())
    perm = match_components(fit.atoms, data.atoms)
    est_w = fit.weights.cpu().double()[perm]
    est_a = fit.atoms.cpu().double()[perm]
    true_a = data.atoms.double()
    rel_err = ((est_a - true_a).norm(dim=1) / true_a.norm(dim=1)).tolist()
    print()
    print(f"{'component':>9} {'true weight':>12} {'est. weight':>12} {'atom rel. error':>16}")
    for k in range(cfg["num_components"]):
        print(f"{k:>9} {float(data.weights[k]):12.4f} {float(est_w[k]):12.4f} "
              f"{rel_err[k]:16.4f}")
    print()
    print(f"log-likelihood: fit {fit.loglik:.8g}, truth {truth_ll:.8g} "
          f"(fit - truth = {fit.loglik - truth_ll:+.3f})")
    print(f"EM: {fit.n_iter} iterations, converged={fit.converged}, {seconds:.2f} s "
          f"({fit.init}, {str(dtype).replace('torch.', '')}, {fit.atoms.device})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit.save(out / "fit.npz")
    summary = fit.to_dict() | {"true_weights": data.weights.tolist(),
                                   "true_atoms": data.atoms.tolist(),
                                   "truth_loglik": truth_ll, "atom_rel_error": rel_err}
    _write_json(out / "summary.json", summary)
    plot_convergence(fit, out / "convergence.png")
    plot_recovery(fit, data.weights, data.atoms, out / "recovery.png")
    print(f"Results in {out.resolve()}/: fit.npz, summary.json, convergence.png, recovery.png")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmix",
        description="Fit large softmax mixtures P(Y=j) = sum_k alpha_k softmax(X theta_k)_j by "
                    "EM on counts.",
        epilog="Run 'softmix COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="simulate a realistic problem, fit it, print a table and save plots",
        description="Simulate a softmax mixture (p=20,000, L=32, K=4, N=10^6; --quick: p=2,000, "
                    "L=8, K=3, N=10^5), fit it by EM, print true vs estimated weights and atom "
                    "errors, and save fit.npz, summary.json, convergence.png and recovery.png.")
    demo.add_argument("--quick", action="store_true", help="a small problem (a few seconds)")
    demo.add_argument("--out", default="softmix-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    demo.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                      help="floating precision (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    fit = sub.add_parser(
        "fit", help="fit a softmax mixture to counts or tokens",
        description="Fit a softmax mixture by EM. Files may be .npy, .npz, .csv, .txt or .pt. "
                    "Writes OUT/fit.npz (load with pyro_softmix.load_fit), OUT/summary.json and "
                    "OUT/convergence.png.")
    fit.add_argument("features", help="(p, L) feature matrix of the support points")
    data = fit.add_mutually_exclusive_group(required=True)
    data.add_argument("--counts", help="(p,) counts per support point")
    data.add_argument("--tokens", help="(N,) integer draws in [0, p)")
    fit.add_argument("-k", "--num-components", type=int, required=True,
                     help="number of mixture components K")
    fit.add_argument("--init", default="auto",
                     help="'auto' (default), 'random', or a fit.npz file to start from")
    fit.add_argument("--num-inits", type=int, default=None, help="number of random starts")
    fit.add_argument("--max-iter", type=int, default=1000, help="EM iterations at most "
                     "(default: %(default)s)")
    fit.add_argument("--tol", type=float, default=None,
                     help="relative log-likelihood change to stop at (default: 1e-10 in "
                          "float64, 1e-9 in float32)")
    fit.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    fit.add_argument("--dtype", choices=["float32", "float64"], default=None,
                     help="floating precision (default: that of the features)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    fit.add_argument("--out", default="softmix-fit", help="output folder (default: %(default)s)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_cmd_fit)

    sim = sub.add_parser(
        "simulate", help="write a synthetic data set and its truth",
        description="Simulate a softmax mixture with a Gaussian design and write "
                    "OUT/features.EXT, OUT/counts.EXT (and OUT/tokens.EXT) and OUT/truth.json.")
    sim.add_argument("--num-points", "-p", type=int, default=2000,
                     help="support points p (default: %(default)s)")
    sim.add_argument("--num-features", "-L", type=int, default=5,
                     help="features L (default: %(default)s)")
    sim.add_argument("-k", "--num-components", type=int, default=3,
                     help="components K (default: %(default)s)")
    sim.add_argument("--num-obs", "-N", type=int, default=100_000,
                     help="draws N (default: %(default)s)")
    sim.add_argument("--atom-norm", type=float, default=2.0,
                     help="atom length in standardised coordinates (default: %(default)s)")
    sim.add_argument("--tokens", action="store_true", help="also write the (N,) draws")
    sim.add_argument("--format", choices=ARRAY_FORMATS, default="npy",
                     help="file format (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sim.add_argument("--out", default="softmix-data", help="output folder (default: %(default)s)")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"softmix {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
