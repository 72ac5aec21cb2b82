# SPDX-License-Identifier: Apache-2.0
"""Test set-up in the manner of Pyro's: float64, fixed seeds, validation on, clean param store."""

import numpy as np
import pyro
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(autouse=True)
def _setup():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 (seed code that uses the global NumPy generator)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    torch.set_default_dtype(old)
