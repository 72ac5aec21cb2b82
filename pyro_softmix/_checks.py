# SPDX-License-Identifier: Apache-2.0
"""Argument checking and conversion shared by the public entry points.

Every function here returns a *new* tensor (or a read-only view that is never written to), so
nothing the user passed in is modified, and raises ``ValueError``/``TypeError`` naming the
argument when the input is unusable.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import random
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._chunks import rows_per_chunk

ArrayLike = torch.Tensor | np.ndarray


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn``, attributed to the first caller outside the package (so the warning
    points at the user's line, however deep inside the package it was raised)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def keyword_options(fn: Callable) -> Callable:
    """Decorator: the data go by position, every option by keyword.

    A call with more positional arguments than the function's positional parameters raises a
    ``TypeError`` that names the keyword each extra argument must be passed as (the
    keyword-only parameters, in order of the signature).
    """
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    options = [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    data = ", ".join(n for n in names if n != "self")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if len(args) > len(names):
            extra = args[len(names):]
            named = [f"{key}={value!r}" for key, value in zip(options, extra, strict=False)]
            if len(extra) > len(options):
                named.append("the rest by name" if named else "each by its name")
            raise TypeError(f"{fn.__qualname__}() takes {data} by position and its options by "
                            f"keyword only: got {len(extra)} more positional argument(s); pass "
                            + ", ".join(named))
        return fn(*args, **kwargs)
    return wrapper


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Convert a tensor or array-like to a real tensor, without copying when possible.

    Accepts tensors, NumPy arrays (any byte order; ``longdouble`` becomes float64; read-only
    arrays are wrapped, never written to), nested lists, numbers, and objects with a
    ``to_numpy()`` method (pandas DataFrames and Series). Complex, string and object data are
    refused with a ``TypeError`` naming ``name``.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor ({x.dtype}): pass "
                            "its real part (x.real) if that is what you mean")
        return x.detach()
    if not isinstance(x, np.ndarray) and callable(getattr(x, "to_numpy", None)):
        x = x.to_numpy()  # pandas
    if isinstance(x, np.ndarray | np.generic | list | tuple | numbers.Number):
        try:
            arr = np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name} must be a rectangular array: {e}") from None
        if arr.dtype == object:
            raise TypeError(f"{name} must be numeric, got an array of Python objects")
        if arr.dtype.kind == "c":
            raise TypeError(f"{name} must be real, got complex dtype {arr.dtype}")
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # longdouble: torch has none
            arr = arr.astype(np.float64)
        arr = np.ascontiguousarray(arr)
        if arr.flags.writeable:
            return torch.from_numpy(arr)
        with warnings.catch_warnings():  # read-only: wrapped, and never written to
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32,
           "double": torch.float64}


def resolve_dtype(dtype: Any, like: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: ``dtype`` if given (``torch.float32``/``torch.float64``, their
    names, or the NumPy ones), else ``like``'s when it is float32 or float64, float32 for
    half-precision inputs, and the default dtype for integer inputs."""
    if dtype is None:
        if like.dtype in (torch.float32, torch.float64):
            return like.dtype
        return torch.float32 if like.is_floating_point() else torch.get_default_dtype()
    if not isinstance(dtype, str | torch.dtype):
        try:
            dtype = np.dtype(dtype).name  # np.float32, np.dtype("float64"), ...
        except TypeError:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got "
                            f"{type(dtype).__name__}") from None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def resolve_device(device: Any, like: torch.Tensor | None = None) -> torch.device:
    """The device to compute on: ``device`` if given (checked to exist and work here), else
    ``like``'s (the CPU without ``like``)."""
    if device is None:
        return like.device if like is not None else torch.device("cpu")
    if not isinstance(device, str | torch.device | int):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a "
                        f"torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available")
    try:
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001 (an absent backend raises several kinds of error)
        raise ValueError(f"device {str(device)!r} is not available here: "
                         f"{str(e).splitlines()[0]}") from None
    return device


def check_features(features: Any) -> torch.Tensor:
    """Features as a finite floating (p, L) tensor with p >= 2."""
    x = as_tensor(features, "features")
    if x.dim() != 2:
        raise ValueError(
            f"features must be 2-D with shape (num_points, num_features), got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"features must have at least 2 rows (support points), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError("features must have at least one column")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    # Chunk by chunk: isfinite of the whole (p, L) table would make temporaries larger than
    # the table itself (|x| and two masks), at vocabulary scale gigabytes.
    rows = rows_per_chunk(x.shape[0], x.shape[1] * x.element_size(), x.device)
    for s in range(0, x.shape[0], rows):
        finite = torch.isfinite(x[s:s + rows])
        if not bool(finite.all()):
            bad = s + int((~finite).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"features contains NaN or infinite values (first bad row: {bad})")
    return x


def check_counts(counts: Any, tokens: Any, num_points: int) -> torch.Tensor:
    """Counts (p,) from exactly one of ``counts`` or ``tokens``; nonnegative, finite, not all 0."""
    if isinstance(tokens, int | float) and not isinstance(tokens, bool):
        # f(features, counts, 3): the third positional argument is tokens, not num_components.
        raise TypeError(f"tokens must be an array of draws, got the number {tokens!r}; pass "
                        "num_components= by keyword")
    if (counts is None) == (tokens is None):
        raise ValueError("pass exactly one of counts= (shape (num_points,)) or tokens= (shape (N,))")
    if tokens is not None:
        t = as_tensor(tokens, "tokens")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"tokens must be 1-D with shape (N,), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError("tokens is empty: need at least one observation")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_points:
            raise ValueError(
                f"tokens must lie in [0, {num_points - 1}] (one per row of features), "
                f"got values in [{lo}, {hi}]"
            )
        return torch.bincount(t.to(torch.int64).cpu(), minlength=num_points).to(t.device)
    n = as_tensor(counts, "counts")
    if n.dtype == torch.bool:
        raise TypeError(f"counts must be a real numeric array, got dtype {n.dtype}")
    if n.dim() != 1 or n.shape[0] != num_points:
        raise ValueError(
            f"counts must have shape ({num_points},) (one per row of features), "
            f"got shape {tuple(n.shape)}"
        )
    if n.is_floating_point() and not bool(torch.isfinite(n).all()):
        raise ValueError("counts contains NaN or infinite values")
    if bool((n < 0).any()):
        raise ValueError(f"counts must be nonnegative, got minimum {float(n.min())}")
    if not bool((n > 0).any()):
        raise ValueError("counts are all zero: there is nothing to fit")
    return n


def check_offset(offset: Any, num_points: int, like: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
    """A known per-point offset b (p,) added to every component's logits, or None.

    Returned detached and finite, in the dtype and on the device of ``like`` if given, else in
    its own floating dtype (float64 for integer input); -inf
    entries (points a proposal never draws) are refused: drop those rows from the features."""
    if offset is None:
        return None
    b = as_tensor(offset, "offset")
    if b.dtype == torch.bool:
        raise TypeError(f"offset must be a real numeric array, got dtype {b.dtype}")
    if b.dim() != 1 or b.shape[0] != num_points:
        raise ValueError(f"offset must have shape ({num_points},) (one per row of features), "
                         f"got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        b = b.double()
    if not bool(torch.isfinite(b).all()):
        raise ValueError("offset contains NaN or infinite values (a point with offset -inf can "
                         "never be drawn: drop its row from features and counts instead)")
    return b if like is None else b.to(like)


def check_num_components(num_components: Any, num_points: int) -> int:
    if isinstance(num_components, bool) or not isinstance(num_components, numbers.Integral):
        raise TypeError(f"num_components must be an int, got {type(num_components).__name__}")
    k = int(num_components)
    if k < 1 or k > num_points:
        raise ValueError(f"num_components must be in [1, num_points={num_points}], got {k}")
    return k


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(value: Any, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return v


def check_mixing(weights: Any, atoms: Any, num_components: int | None, num_features: int,
                 name: str = "init") -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (K,) on the simplex and atoms (K, L), both finite."""
    w = as_tensor(weights, f"{name} weights")
    a = as_tensor(atoms, f"{name} atoms")
    if a.dim() != 2 or a.shape[1] != num_features:
        raise ValueError(f"{name} atoms must have shape (K, {num_features}), got {tuple(a.shape)}")
    k = a.shape[0] if num_components is None else num_components
    if a.shape[0] != k:
        raise ValueError(f"{name} atoms must have {k} rows (num_components), got {a.shape[0]}")
    if w.dim() != 1 or w.shape[0] != k:
        raise ValueError(f"{name} weights must have shape ({k},), got {tuple(w.shape)}")
    w = w.to(torch.float64)
    a = a.to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} atoms contains NaN or infinite values")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} weights must be finite and nonnegative")
    if abs(float(w.sum()) - 1.0) > 1e-5:
        raise ValueError(f"{name} weights must sum to 1, got {float(w.sum()):.6g}")
    return w / w.sum(), a


#: The seed convention of every random function here (its ``seed`` argument): None (drawn
#: from torch's global random state, so ``torch.manual_seed`` or ``pyro.set_rng_seed`` make it
#: reproducible; Pyro's inference then uses that state as it is), an int in [0, 2**64), or a
#: ``torch.Generator`` (drawn from, so advanced). The same seed gives the same result on the
#: same device and dtype.
SEED_DOC = "None, an int in [0, 2**64) or a torch.Generator"


def check_seed(seed: Any, name: str = "seed") -> int | torch.Generator | None:
    """``seed`` checked against the package's one seed convention (:data:`SEED_DOC`)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be {SEED_DOC}, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"{name} must be {SEED_DOC}, got {seed}")
    return int(seed)


def make_generator(seed: Any) -> torch.Generator:
    """A CPU generator from a seed (see :func:`check_seed`); a generator is returned as is."""
    seed = check_seed(seed)
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:  # from the global state, as NumPy-based libraries draw from np.random
        seed = int(torch.randint(2**62, ()))
    g.manual_seed(seed)
    return g


def seed_global(seed: Any) -> None:
    """Seed the global random states that Pyro's inference draws from (torch, Python's
    ``random``, NumPy), as ``pyro.set_rng_seed`` does; None leaves them as they are."""
    seed = check_seed(seed)
    if seed is None:
        return
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(2**62, (), generator=seed))
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (NumPy's global state, which Pyro seeds too)


def check_groups(groups: Any, counts: Any, tokens: Any, num_points: int):
    """Grouped data as sparse triplets (group, point, count).

    ``groups`` is either a (N,) integer group id per token (with ``tokens``), or a (G, p) count
    matrix (then ``counts`` and ``tokens`` must be None). Returns ``(group_index, point_index,
    values, labels)``: int64 (nnz,), int64 (nnz,), float64 (nnz,) on the CPU, and the (G,) sorted
    distinct group ids (``arange(G)`` for a count matrix). Empty groups are impossible by
    construction for ids and are rejected for a matrix.
    """
    g = as_tensor(groups, "groups")
    if g.dim() == 2:
        if counts is not None or tokens is not None:
            raise ValueError("groups given as a (G, num_points) count matrix takes no counts= or "
                             "tokens=; pass group ids per token with tokens= instead")
        if g.shape[1] != num_points:
            raise ValueError(f"groups as a count matrix must have shape (G, {num_points}), "
                             f"got {tuple(g.shape)}")
        if g.dtype == torch.bool:
            raise TypeError(f"groups as a count matrix must be real numeric, got dtype {g.dtype}")
        g = g.to(torch.float64).cpu()
        if not bool(torch.isfinite(g).all()):
            raise ValueError("groups (count matrix) contains NaN or infinite values")
        if bool((g < 0).any()):
            raise ValueError(f"groups (count matrix) must be nonnegative, got minimum {float(g.min())}")
        empty = (g.sum(1) <= 0).nonzero()
        if empty.numel():
            raise ValueError(f"groups (count matrix) has {empty.numel()} empty rows (first: row "
                             f"{int(empty[0, 0])}): every group needs at least one observation")
        gi, pi = g.nonzero(as_tuple=True)
        return gi, pi, g[gi, pi], torch.arange(g.shape[0])
    if g.dim() != 1:
        raise ValueError(f"groups must be a (N,) id per token or a (G, num_points) count matrix, "
                         f"got shape {tuple(g.shape)}")
    if tokens is None:
        raise ValueError("groups given as ids per observation needs tokens= (shape (N,)), "
                         "not counts=")
    if g.is_floating_point() or g.dtype == torch.bool:
        raise TypeError(f"groups ids must be integers, got dtype {g.dtype}")
    check_counts(None, tokens, num_points)  # validates the tokens
    tok = as_tensor(tokens, "tokens").to(torch.int64).cpu()
    if g.shape[0] != tok.shape[0]:
        raise ValueError(f"groups must have one id per token: got {g.shape[0]} ids for "
                         f"{tok.shape[0]} tokens")
    labels, inverse = torch.unique(g.to(torch.int64).cpu(), return_inverse=True)
    pair = inverse * num_points + tok
    keys, values = torch.unique(pair, return_counts=True)
    return keys // num_points, keys % num_points, values.to(torch.float64), labels
