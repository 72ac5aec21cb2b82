# SPDX-License-Identifier: Apache-2.0
"""SoftmaxMixtureFit: probabilities, reports and the file format."""

import math

import numpy as np
import pytest
import torch

import pyro_softmix as psm

from .helpers import brute_loglik, simulated


@pytest.mark.filterwarnings("ignore::pyro_softmix.ConvergenceWarning")
def test_loglik_and_responsibilities_match_brute_force():
    d = simulated(p=12, L=2, K=3, N=500)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=1, max_iter=30)
    assert fit.loglik == pytest.approx(brute_loglik(d.features, d.counts, fit.atoms,
                                                    fit.weights), rel=1e-12)
    # Responsibilities: alpha_k q_k(j) / pi_j by explicit sums.
    comp = torch.stack([torch.softmax(d.features @ a, 0) for a in fit.atoms], 1)
    joint = comp * fit.weights
    assert torch.allclose(fit.responsibilities(), joint / joint.sum(1, keepdim=True), atol=1e-12)
    assert torch.allclose(fit.probs(), joint.sum(1), atol=1e-14)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    d = simulated()
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    fit.save(tmp_path / "a.npz")
    fit.save(tmp_path / "b.npz", include_features=True)
    a = psm.load_fit(tmp_path / "a.npz")
    b = psm.load_fit(tmp_path / "b.npz")
    for loaded in (a, b):
        assert torch.equal(loaded.atoms, fit.atoms) and torch.equal(loaded.weights, fit.weights)
        assert loaded.loglik == fit.loglik and loaded.history == fit.history
        assert loaded.bic == fit.bic and loaded.converged == fit.converged
    assert torch.allclose(b.probs(), fit.probs())
    with pytest.raises(ValueError, match="pass features="):
        a.probs()
    assert torch.allclose(a.probs(d.features), fit.probs())
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a valid pyro-softmix fit file"):
        psm.load_fit(tmp_path / "other.npz")


def test_summary_and_information_criteria():
    d = simulated()
    fit = psm.fit_em(d.features, counts=d.counts, num_components=3, seed=0)
    k = 2 + 3 * 4
    assert fit.bic == pytest.approx(-2 * fit.loglik + k * math.log(50_000))
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * k)
    text = fit.summary()
    assert "K=3" in text and "converged" in text and f"{fit.loglik:.8g}" in text
    assert repr(fit).startswith("SoftmaxMixtureFit(K=3, p=300, L=4")


def test_files_of_the_earlier_layout_still_load(tmp_path):
    """Fits saved before the shared file format (header written last) load unchanged."""
    import json

    d = simulated(p=100, L=2, K=2, N=2000)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    meta = {"format": "pyro-softmix-fit", "version": 1, "loglik": fit.loglik,
            "n_iter": fit.n_iter, "converged": fit.converged, "num_obs": fit.num_obs,
            "num_points": fit.num_points, "rank": fit.rank, "init": fit.init,
            "seconds": fit.seconds, "dtype": "float64", "num_groups": None,
            "prior_scale": None, "diverging": []}
    np.savez(tmp_path / "old.npz", weights=fit.weights.numpy(), atoms=fit.atoms.numpy(),
             history=np.asarray(fit.history), meta=np.array(json.dumps(meta)))
    old = psm.load_fit(tmp_path / "old.npz")
    assert torch.equal(old.atoms, fit.atoms) and old.history == fit.history
    assert old.init == fit.init and old.converged == fit.converged


def test_one_file_format_and_one_field_list(tmp_path):
    from pyro_softmix.results import FIT_FORMAT, MOE_FORMAT, FileReader

    d = simulated(p=100, L=2, K=2, N=2000)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    fit.save(tmp_path / "fit.npz")
    reader = FileReader(tmp_path / "fit.npz", FIT_FORMAT, "fit")
    meta, arrays = reader.meta, reader.arrays
    record = fit.to_dict()
    for name in fit.SCALAR_FIELDS:  # the header and the summary carry the same fields
        assert meta[name] == record[name]
    assert record["weights"] == fit.weights.tolist() and record["bic"] == fit.bic
    assert set(arrays) == {"weights", "atoms", "history"}
    m = psm.simulate_moe(num_obs=200, num_experts=2, seed=0)
    moe = psm.MixtureOfExperts(2).fit(m.x, m.y, seed=0, init="random", num_inits=1)
    moe.save(tmp_path / "moe.npz")
    reader = FileReader(tmp_path / "moe.npz", MOE_FORMAT, "MoE")
    meta, arrays = reader.meta, reader.arrays
    assert meta["num_experts"] == 2 and torch.equal(torch.from_numpy(arrays["expert_weights"]),
                                                    moe.expert_weights)
    with pytest.raises(ValueError, match="not a valid pyro-softmix MoE file.*format"):
        FileReader(tmp_path / "fit.npz", MOE_FORMAT, "MoE")


def _saved(tmp_path, **arrays_and_meta):
    """A valid fit file, then rewritten with some arrays or header fields replaced."""
    d = simulated(p=60, L=2, K=2, N=2000)
    fit = psm.fit_em(d.features, counts=d.counts, num_components=2, seed=0)
    fit.save(tmp_path / "good.npz", include_features=True)
    return _rewritten(tmp_path / "good.npz", tmp_path / "bad.npz", arrays_and_meta)


def _rewritten(source, target, changes):
    """``source`` written again to ``target`` with arrays (by name) or header fields
    (``meta_`` + name) replaced by ``changes``."""
    import json

    with np.load(source) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    for key, value in changes.items():
        if key.startswith("meta_"):
            meta[key[5:]] = value
        else:
            arrays[key] = value
    np.savez(target, meta=np.array(json.dumps(meta)), **arrays)
    return target


@pytest.mark.parametrize("change,field", [
    (dict(weights=np.array([0.2, 0.3, 0.5])), "array 'weights'"),  # 3 weights, 2 atoms
    (dict(weights=np.array([0.9, 0.9])), "array 'weights'"),  # sums to 1.8
    (dict(weights=np.array([1.5, -0.5])), "array 'weights'"),
    (dict(atoms=np.full((2, 2), np.nan)), "array 'atoms'"),
    (dict(atoms=np.zeros((2, 2), dtype=np.int64)), "array 'atoms'"),
    (dict(history=np.zeros(1)), "array 'history'"),
    (dict(features=np.zeros((5, 2))), "array 'features'"),
    (dict(meta_version=99), "header 'version'"),
    (dict(meta_format="pyro-softmix-moe"), "header 'format'"),
    (dict(meta_n_iter=-1), "field 'n_iter'"),
    (dict(meta_n_iter="3"), "field 'n_iter'"),
    (dict(meta_loglik=None), "field 'loglik'"),
    (dict(meta_rank=7), "field 'rank'"),
    (dict(meta_num_obs=0), "field 'num_obs'"),
    (dict(meta_diverging=[5]), "field 'diverging'"),
    (dict(meta_converged="yes"), "field 'converged'"),
])
def test_every_field_of_a_fit_file_is_checked(tmp_path, change, field):
    path = _saved(tmp_path, **change)
    with pytest.raises(psm.FileFormatError, match=f"bad.npz.*{field}"):
        psm.load_fit(path)


def test_damaged_or_foreign_files_raise_one_error_that_names_them(tmp_path):
    good = _saved(tmp_path)
    data = good.read_bytes()
    cases = {"empty.npz": b"", "truncated.npz": data[: len(data) // 2],
             "random.npz": bytes(range(256)) * 50}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(psm.FileFormatError, match=f"{name}.*cannot be read"):
            psm.load_fit(tmp_path / name)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(psm.FileFormatError, match="array.npy"):
        psm.load_fit(tmp_path / "array.npy")
    np.savez(tmp_path / "pickled.npz", meta=np.array([{"format": "pyro-softmix-fit"}],
                                                     dtype=object))
    with pytest.raises(psm.FileFormatError, match="pickled.npz.*cannot be read"):
        psm.load_fit(tmp_path / "pickled.npz")  # never unpickled
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        psm.load_fit(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="device 'cuda"):
        psm.load_fit(good, device="cuda:7")
    assert psm.load_fit(str(good)[:-4]).num_components == 2  # the suffix savez added


@pytest.mark.parametrize("change,field", [
    (dict(gate_weights=np.ones((2, 3))), "array 'gate_weights'"),  # last row not 0
    (dict(gate_weights=np.zeros((3, 3))), "array 'gate_weights'"),  # wrong K
    (dict(noise_scale=np.array([1.0, -1.0])), "array 'noise_scale'"),
    (dict(expert_weights=np.full((2, 3), np.inf)), "array 'expert_weights'"),
    (dict(meta_version=99), "header 'version'"),
    (dict(meta_expert="quadratic"), "configuration"),
    (dict(meta_method="sgd"), "field 'method'"),
    (dict(meta_n_iter=10**6), "array 'history'"),
])
def test_every_field_of_a_moe_file_is_checked(tmp_path, change, field):
    m = psm.simulate_moe(num_obs=200, num_experts=2, num_features=2, seed=0)
    psm.MixtureOfExperts(2).fit(m.x, m.y, seed=0, num_inits=1).save(tmp_path / "moe.npz")
    _rewritten(tmp_path / "moe.npz", tmp_path / "bad.npz", change)
    with pytest.raises(psm.FileFormatError, match=f"bad.npz.*{field}"):
        psm.load_moe(tmp_path / "bad.npz")


_CHILD = """
import sys, torch, warnings
import pyro_softmix as psm
torch.set_default_dtype(torch.float64)
d = psm.simulate(num_points=2000, num_features=4, num_components=4, num_obs=100_000,
                 atom_norm=1.5, seed=3)
warnings.simplefilter("ignore")
psm.fit_em(d.features, counts=d.counts, num_components=4, init="random", num_inits=3, seed=2,
           accelerate=False, max_iter=20_000, tol=1e-12, checkpoint=sys.argv[1],
           checkpoint_every=0)
"""


@pytest.mark.slow
def test_a_killed_fit_leaves_a_checkpoint_that_resumes_to_the_same_optimum(tmp_path):
    """SIGKILL a fit that checkpoints after every update, at several moments: the file is
    always a complete checkpoint (or absent), and resuming from it reaches the optimum of the
    uninterrupted fit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    d = psm.simulate(num_points=2000, num_features=4, num_components=4, num_obs=100_000,
                     atom_norm=1.5, seed=3)
    kw = dict(num_components=4, accelerate=False, max_iter=20_000, tol=1e-12)
    full = psm.fit_em(d.features, counts=d.counts, init="random", num_inits=3, seed=2, **kw)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    states = []
    for delay in (0.0, 0.3, 0.9):
        path = tmp_path / f"fit-{delay}.npz"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], env=env)
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline and child.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        saved = psm.load_fit(path)  # complete, whatever the moment of the kill
        assert saved.pending is None or saved.pending[1].shape[1:] == (4, 4)
        states.append((saved.converged, saved.n_iter))
    assert not all(converged for converged, _ in states)  # killed mid-fit at least once
    assert len({n for _, n in states}) > 1  # at different moments
    resumed = psm.fit_em(d.features, counts=d.counts, init=saved, **kw)
    assert resumed.init.startswith("given (resumed")
    assert resumed.loglik == pytest.approx(full.loglik, rel=1e-11, abs=0)


def test_checkpoint_options_and_files(tmp_path):
    d = simulated(p=300, L=3, K=3, N=20_000, seed=2)
    kw = dict(num_components=3, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        psm.fit_em(d.features, counts=d.counts, checkpoint=tmp_path / "no" / "c.npz", **kw)
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        psm.fit_em(d.features, counts=d.counts, checkpoint=tmp_path / "d.npz", **kw)
    with pytest.raises(ValueError, match="checkpoint_every"):
        psm.fit_em(d.features, counts=d.counts, checkpoint=tmp_path / "c", checkpoint_every=-1,
                   **kw)
    fit = psm.fit_em(d.features, counts=d.counts, checkpoint=tmp_path / "c", **kw)
    final = psm.load_fit(tmp_path / "c.npz")  # the suffix is added; the end is written
    assert final.converged and final.pending is None and final.loglik == fit.loglik
    again = psm.fit_em(d.features, counts=d.counts, init=final, num_components=3)
    assert again.n_iter <= 2 and again.loglik >= fit.loglik - 1e-9 * abs(fit.loglik)
    assert not list(tmp_path.glob("*.tmp.npz"))  # no temporary file is left behind
