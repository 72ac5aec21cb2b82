# SPDX-License-Identifier: Apache-2.0
"""The ``softmix`` command: ``demo``, ``fit``, ``select`` and ``simulate``.

Every failure ends with one line on stderr that names the file or option and what is wrong,
never a traceback; the exit status says how it ended (:data:`EXIT_CODES`). Outputs are written
under temporary names and renamed once all are complete, so an interrupted or failed command
leaves no output that looks complete. torch is imported only once a command runs, so
``softmix --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_NOT_CONVERGED = 3
EXIT_INTERRUPTED = 130
#: The exit statuses, as documented in ``docs/cli.md`` and ``softmix --help``.
EXIT_CODES = {EXIT_OK: "success", EXIT_INTERNAL: "an internal error (a bug: please report it)",
              EXIT_INPUT: "bad input or options (a one-line message names them)",
              EXIT_NOT_CONVERGED: "the fit was written but did not converge",
              EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing was written"}

ARRAY_FORMATS = ("npy", "npz", "csv", "pt")
#: warmstart.WARM_START_METHODS, spelled out so that --help need not import torch (a test
#: checks that the two agree).
START_METHODS = ("auto", "tempered", "projection", "tensor", "subspace", "random")
DEMO = {"num_points": 20_000, "num_features": 32, "num_components": 4, "num_obs": 1_000_000}
DEMO_QUICK = {"num_points": 2_000, "num_features": 8, "num_components": 3, "num_obs": 100_000}


class CommandError(Exception):
    """A bad file or option: reported in one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def load_array(path: str | os.PathLike, key: str | None = None, option: str | None = None):
    """Read an array (NumPy) from ``.npy``, ``.npz`` (``key`` or its only array), ``.csv`` /
    ``.txt`` (a header row is detected and skipped) or ``.pt`` (a tensor, or a dict of tensors
    with ``key``; loaded without running code). Errors name ``option`` and the file."""
    import numpy as np

    where = f"{option or key or 'file'} {str(path)!r}"
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{where}: no such file")
    if path.is_dir():
        raise CommandError(f"{where} is a folder, not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                names = list(data.keys())
                if key is not None and key in names:
                    arr = data[key]
                elif len(names) == 1:
                    arr = data[names[0]]
                else:
                    raise CommandError(f"{where} holds arrays {names}; expected one named "
                                       f"{key!r}")
        elif suffix in (".csv", ".txt"):
            arr = _read_text(path, "," if suffix == ".csv" else None, where)
        elif suffix == ".pt":
            arr = _read_torch(path, key, where)
        else:
            raise CommandError(f"{where}: unsupported file type {suffix!r}; use .npy, .npz, "
                               ".csv, .txt or .pt")
    except CommandError:
        raise
    except Exception as e:  # noqa: BLE001 (NumPy and torch fail in many ways on bad files)
        raise CommandError(f"{where}: cannot be read ({type(e).__name__}: "
                           f"{_one_line(e)})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise CommandError(f"{where} does not hold a numeric array")
    if arr.size == 0:
        raise CommandError(f"{where} is empty")
    if key in ("counts", "tokens", "groups") and arr.dtype.kind == "f" and np.all(
            arr == np.round(arr)):
        arr = arr.astype(np.int64)
    return arr


def _read_text(path: Path, delimiter: str | None, where: str):
    """A numeric table from CSV or whitespace-separated text; a first row that is not numeric
    is a header and is skipped."""
    import numpy as np

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise CommandError(f"{where} is empty")
    first = lines[0].split(delimiter)
    try:
        [float(v) for v in first]
        body = lines
    except ValueError:
        body = lines[1:]  # a header row, as spreadsheets write
        if not body:
            raise CommandError(f"{where} has a header row and no data") from None
    widths = {len(line.split(delimiter)) for line in body}
    if len(widths) > 1:
        counts = [len(line.split(delimiter)) for line in body]
        row = next(i for i, c in enumerate(counts) if c != counts[0])
        raise CommandError(f"{where} is ragged: row {row + 1 + (body is not lines)} has "
                           f"{counts[row]} values, the first data row {counts[0]}")
    try:
        return np.loadtxt(body, delimiter=delimiter, ndmin=1)
    except ValueError as e:
        raise CommandError(f"{where} holds non-numeric values ({_one_line(e)})") from None


def _read_torch(path: Path, key: str | None, where: str):
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs code
    if isinstance(obj, dict):
        if key in obj:
            obj = obj[key]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise CommandError(f"{where} holds {list(obj)}; expected one named {key!r}")
    if not isinstance(obj, torch.Tensor):
        raise CommandError(f"{where} does not hold a tensor")
    return obj.numpy()


def save_array(path: str | os.PathLike, array, key: str) -> Path:
    """Write ``array`` in the format given by the suffix of ``path``."""
    import numpy as np
    import torch

    path = Path(path)
    arr = torch.as_tensor(array).detach().cpu().numpy()
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "wb") as f:  # np.save on a name would append .npy to a temporary name
            np.save(f, arr)
    elif suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **{key: arr})
    elif suffix == ".csv":
        fmt = "%d" if arr.dtype.kind in "iu" else "%.17g"
        np.savetxt(path, arr, delimiter=",", fmt=fmt)
    elif suffix == ".pt":
        torch.save({key: torch.from_numpy(arr)}, path)
    else:
        raise CommandError(f"unsupported format {suffix!r}")
    return path


class Outputs:
    """The output folder (``--out``), checked before any work, and files written under
    temporary names, renamed into place only when all are written (``commit``)."""

    def __init__(self, folder: str, option: str = "--out"):
        self.folder = Path(folder)
        where = f"{option} {folder!r}"
        if self.folder.exists() and not self.folder.is_dir():
            raise CommandError(f"{where} is a file, not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CommandError(f"{where}: cannot create the folder ({e.strerror or e})") from None
        if not os.access(self.folder, os.W_OK):
            raise CommandError(f"{where}: the folder is not writable")
        self.pending: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        """A temporary path for output ``name`` (same suffix, so writers keep the format)."""
        final = self.folder / name
        tmp = self.folder / f".{final.stem}.{os.getpid()}.tmp{final.suffix}"
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        done, self.pending = [final for _, final in self.pending], []
        return done

    def discard(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending = []


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def _cmd_simulate(args, out: Outputs) -> int:
    import torch

    from .simulation import simulate

    data = simulate(args.num_points, args.num_features, args.num_components, args.num_obs,
                    atom_norm=args.atom_norm, return_tokens=args.tokens, seed=args.seed,
                    dtype=torch.float64)
    ext = args.format
    save_array(out.path(f"features.{ext}"), data.features, "features")
    save_array(out.path(f"counts.{ext}"), data.counts, "counts")
    if args.tokens:
        save_array(out.path(f"tokens.{ext}"), data.tokens, "tokens")
    truth = {"weights": data.weights.tolist(), "atoms": data.atoms.tolist(),
             "num_obs": data.num_obs, "seed": args.seed}
    _write_json(out.path("truth.json"), truth)
    print("wrote " + ", ".join(str(p) for p in out.commit()))
    return EXIT_OK


def _fit_data(args) -> dict:
    """The fit's data from the files: features, and counts, tokens and groups as given."""
    features = load_array(args.features, "features", "FEATURES")
    data = {"features": features}
    if args.counts:
        counts = load_array(args.counts, "counts", "--counts")
        _warn_if_tokens(counts, features.shape[0], args.counts)
        data["counts"] = counts
    if args.tokens:
        data["tokens"] = load_array(args.tokens, "tokens", "--tokens")
    if args.groups:
        data["groups"] = load_array(args.groups, "groups", "--groups")
    if args.offset:
        data["offset"] = load_array(args.offset, "offset", "--offset")
    if not (args.counts or args.tokens or (args.groups and data["groups"].ndim == 2)):
        raise CommandError("pass --counts or --tokens (or --groups with a (G, p) count matrix)")
    return data


def _warn_if_tokens(counts, num_points: int, path: str) -> None:
    """Counts that look like p draws (ids in [0, p), many distinct, averaging far more than a
    count of about 1 per point would) passed as counts: a warning, since shapes agree."""
    import numpy as np

    p = num_points
    if (counts.ndim == 1 and counts.dtype.kind in "iu" and counts.shape[0] == p
            and counts.min() >= 0 and counts.max() < p and counts.mean() >= p / 3
            and np.unique(counts).size >= 0.3 * p):
        warnings.warn(f"--counts {path!r} looks like draws (integers in [0, {p}) with many "
                      "distinct values), not counts per support point: if these are draws, "
                      "pass them with --tokens", UserWarning, stacklevel=2)


def _cmd_fit(args, out: Outputs) -> int:
    from .em import fit_em
    from .plots import plot_convergence
    from .results import load_fit

    data = _fit_data(args)
    init, checkpoint = args.init, args.checkpoint
    if args.resume:
        init = load_fit(args.resume)
        checkpoint = checkpoint or args.resume
    elif args.init_from:
        init = load_fit(args.init_from)
    elif init not in START_METHODS:
        if not Path(init).is_file():
            raise CommandError(f"--init must be one of {', '.join(START_METHODS)} or a fit file, "
                               f"got {init!r} (no such file)")
        init = load_fit(init)
    fit = fit_em(**data, num_components=args.num_components, init=init,
                 num_inits=args.num_inits, max_iter=args.max_iter, tol=args.tol,
                 device=args.device, dtype=args.dtype, seed=args.seed,
                 progress=False if args.quiet else None, chunk_size=args.chunk_size,
                 prior_scale=args.prior_scale, accelerate=not args.no_accelerate,
                 checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    fit.save(out.path("fit.npz"))
    plot_convergence(fit, out.path("convergence.png"))
    _write_json(out.path("summary.json"), fit.to_dict())  # last: the outputs are complete
    written = out.commit()
    print(fit.summary())
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


def _cmd_select(args, out: Outputs) -> int:
    from .selection import select_num_components

    data = _fit_data(args)
    features = data.pop("features")
    sel = select_num_components(features, **data, num_components=range(args.k_min,
                                                                       args.k_max + 1),
                                criterion=args.criterion, cv=args.cv, seed=args.seed,
                                prior_scale=args.prior_scale, dtype=args.dtype,
                                progress=not args.quiet)
    sel.best.save(out.path("fit.npz"))
    sel.plot(out.path("selection.png"))
    sel.save_json(out.path("selection.json"))  # last: the outputs are complete
    written = out.commit()
    print(sel.table())
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _cmd_demo(args, out: Outputs) -> int:
    import torch

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
    perm = match_components(fit.atoms, data.atoms)  # estimate k goes with true component k
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
    fit.save(out.path("fit.npz"))
    plot_convergence(fit, out.path("convergence.png"))
    plot_recovery(fit, data.weights, data.atoms, out.path("recovery.png"))
    summary = fit.to_dict() | {
        "weights": est_w.tolist(), "atoms": est_a.tolist(), "matched_to_truth": True,
        "true_weights": data.weights.tolist(), "true_atoms": data.atoms.tolist(),
        "truth_loglik": truth_ll, "atom_rel_error": rel_err}
    _write_json(out.path("summary.json"), summary)
    out.commit()
    print(f"Results in {out.folder.resolve()}/: fit.npz, summary.json, convergence.png, "
          "recovery.png")
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


# ---------------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------------
def _version() -> str:
    from . import __version__

    return __version__


def _data_arguments(command) -> None:
    """The data options of ``fit`` and ``select`` (read by :func:`_fit_data`)."""
    command.add_argument("features", help="(p, L) feature matrix of the support points")
    data = command.add_mutually_exclusive_group()
    data.add_argument("--counts", help="(p,) counts per support point")
    data.add_argument("--tokens", help="(N,) integer draws in [0, p)")
    command.add_argument("--groups", help="grouped data: (N,) group id per token (with "
                         "--tokens), or alone a (G, p) count matrix; each group comes from one "
                         "component")
    command.add_argument("--offset", metavar="FILE", help="(p,) known offset of every "
                         "component's logits (an output bias, a known alternative-specific "
                         "term, the log of a sampling proposal)")


def build_parser() -> argparse.ArgumentParser:
    codes = "; ".join(f"{k}: {v}" for k, v in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="softmix",
        description="Fit large softmax mixtures P(Y=j) = sum_k alpha_k softmax(X theta_k)_j by "
                    "EM on counts.",
        epilog=f"Run 'softmix COMMAND --help' for the options of each command. Exit status: "
               f"{codes}.")
    parser.add_argument("--version", action="version", version=f"softmix {_version()}")
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
        description="Fit a softmax mixture by EM. Files may be .npy, .npz, .csv (a header row is "
                    "skipped), .txt or .pt. Writes OUT/fit.npz (load with "
                    "pyro_softmix.load_fit), OUT/summary.json and OUT/convergence.png; exits 3 "
                    "when the fit did not converge.")
    _data_arguments(fit)
    fit.add_argument("-k", "--num-components", type=int, required=True,
                     help="number of mixture components K")
    fit.add_argument("--init", default="auto",
                     help=f"start: {', '.join(START_METHODS)} (default: auto), or a fit file")
    fit.add_argument("--init-from", metavar="FIT", help="start from a previous fit (fit.npz)")
    fit.add_argument("--resume", metavar="CHECKPOINT",
                     help="go on from a checkpoint (and keep checkpointing into it)")
    fit.add_argument("--num-inits", type=int, default=None, help="number of starts to race")
    fit.add_argument("--max-iter", type=int, default=1000, help="EM iterations at most "
                     "(default: %(default)s)")
    fit.add_argument("--tol", type=float, default=None,
                     help="relative gap to the maximum to stop at (default: 1e-10 in float64, "
                          "1e-9 in float32)")
    fit.add_argument("--prior-scale", type=float, default=None,
                     help="MAP fit under a Normal prior of this scale on the atoms (the remedy "
                          "for atoms at infinity)")
    fit.add_argument("--no-accelerate", action="store_true", help="plain EM (no SQUAREM or "
                     "Newton finish)")
    fit.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of the "
                     "passes over the support points")
    fit.add_argument("--checkpoint", metavar="FILE", help="write the fit in progress to FILE")
    fit.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                     help="seconds between checkpoints (default: %(default)s)")
    fit.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    fit.add_argument("--dtype", choices=["float32", "float64"], default=None,
                     help="floating precision (default: that of the features)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    fit.add_argument("--out", default="softmix-fit", help="output folder (default: %(default)s)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_cmd_fit)

    sel = sub.add_parser(
        "select", help="fit K = 1..K_max along a grown path and choose K",
        description="Fit K = 1..K_max (each K from the previous fit with a component split), "
                    "print the criteria per K (BIC, AIC, CAIC, sample-size-adjusted BIC, ICL, "
                    "held-out log-likelihood with --cv) and save OUT/selection.json, "
                    "OUT/selection.png and the chosen fit as OUT/fit.npz.")
    _data_arguments(sel)
    sel.add_argument("--k-max", type=int, default=8, help="largest K (default: %(default)s)")
    sel.add_argument("--k-min", type=int, default=1, help="smallest K (default: %(default)s)")
    sel.add_argument("--criterion", default="bic", choices=["bic", "aic", "caic", "sabic",
                     "icl", "cv"], help="how K is chosen (default: %(default)s)")
    sel.add_argument("--cv", type=int, default=None, metavar="FOLDS",
                     help="folds for a held-out log-likelihood per K")
    sel.add_argument("--prior-scale", type=float, default=None,
                     help="MAP fits under a Normal prior of this scale on the atoms")
    sel.add_argument("--dtype", choices=["float32", "float64"], default=None,
                     help="floating precision (default: that of the features)")
    sel.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sel.add_argument("--out", default="softmix-select", help="output folder (default: "
                     "%(default)s)")
    sel.add_argument("--quiet", action="store_true", help="no line per K")
    sel.set_defaults(func=_cmd_select)

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


#: Python spellings in the package's messages, and the options of this command.
_SPELLINGS = (("prior_scale=", "--prior-scale"), ("num_inits=", "--num-inits"),
              ("max_iter=", "--max-iter"), ("continue with init=fit", "go on with --resume or "
              "--init-from"), ("init='auto'", "--init auto"), ("pass a better init", "pass a "
              "better --init"))


def _one_line(message) -> str:
    text = " ".join(str(message).split())
    for python, option in _SPELLINGS:
        text = text.replace(python, option)
    return text


@contextlib.contextmanager
def _one_line_warnings(prefix: str):
    """Warnings as one line each, ``PREFIX: warning: ...`` (no source line)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FutureWarning)
        # (Python's own default: a file that an interrupted import left open is not news.)
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"softmix {args.command}"
    out = None
    try:
        with _one_line_warnings(prefix):
            # torch and the package load before the output folder exists, so that a Ctrl-C
            # after it lands in the work, not in torch's import (measured: an interrupted
            # import's open file then added a ResourceWarning to the one line).
            from . import em, plots, selection, simulation  # noqa: F401
            out = Outputs(args.out)  # checked before any work
            return args.func(args, out)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, ValueError, TypeError, OSError) as e:
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 (a bug: one line, and the traceback on request)
        if os.environ.get("SOFTMIX_TRACEBACK"):
            raise
        print(f"{prefix}: internal error: {type(e).__name__}: {_one_line(e)} (set "
              "SOFTMIX_TRACEBACK=1 to see where)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if out is not None:
            out.discard()


def run() -> None:
    """The ``softmix`` program: :func:`main`, then its exit status. After Ctrl-C the process
    ends by SIGINT, the way shells expect of an interrupted program: they report status 130,
    and a shell loop running the command stops too."""
    code = main()
    if code == EXIT_INTERRUPTED and os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    run()
