# SPDX-License-Identifier: Apache-2.0
import json

import numpy as np
import pytest
import torch

import pyro_softmix as psm
from pyro_softmix.cli import load_array, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "fit", "simulate"):
        assert cmd in out
    for cmd, flag in (("fit", "--num-components"), ("demo", "--quick"), ("simulate", "--tokens")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert flag in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv", "pt"])
def test_simulate_then_fit_round_trip(tmp_path, fmt, capsys):
    data = tmp_path / "data"
    assert main(["simulate", "-p", "300", "-L", "4", "-k", "2", "-N", "20000", "--tokens", "--atom-norm", "3",
                 "--format", fmt, "--seed", "1", "--out", str(data)]) == 0
    truth = json.loads((data / "truth.json").read_text())
    counts = load_array(data / f"counts.{fmt}", "counts")
    assert counts.sum() == 20000 and counts.dtype.kind in "iu"
    out = tmp_path / "fit"
    assert main(["fit", str(data / f"features.{fmt}"), "--counts", str(data / f"counts.{fmt}"),
                 "-k", "2", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fit = psm.load_fit(out / "fit.npz")
    assert summary["loglik"] == fit.loglik and (out / "convergence.png").stat().st_size > 0
    x = torch.as_tensor(load_array(data / f"features.{fmt}"))
    ref = psm.fit_em(x, counts=torch.as_tensor(counts), num_components=2, seed=0)
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-12)
    assert np.allclose(sorted(summary["weights"]), sorted(truth["weights"]), atol=0.05)
    out2 = tmp_path / "fit2"
    assert main(["fit", str(data / f"features.{fmt}"), "--tokens", str(data / f"tokens.{fmt}"),
                 "-k", "2", "--quiet", "--out", str(out2), "--init", str(out / "fit.npz")]) == 0
    again = psm.load_fit(out2 / "fit.npz")
    assert again.loglik == pytest.approx(fit.loglik, rel=1e-9)


def test_fit_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(10, 2)))
    np.save(tmp_path / "n.npy", -np.ones(10))
    code = main(["fit", str(tmp_path / "x.npy"), "--counts", str(tmp_path / "n.npy"), "-k", "2",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "counts must be nonnegative" in capsys.readouterr().err
    code = main(["fit", str(tmp_path / "missing.npy"), "--counts", str(tmp_path / "n.npy"),
                 "-k", "2"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "n.npy", np.ones(10))
    code = main(["fit", str(tmp_path / "x.npy"), "--counts", str(tmp_path / "n.npy"), "-k", "2",
                 "--init", str(tmp_path / "nofit.npz"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--init must be" in capsys.readouterr().err
    code = main(["fit", str(tmp_path / "x.npy"), "--counts", str(tmp_path / "n.npy"), "-k", "0",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "num_components" in capsys.readouterr().err


def test_demo_quick_writes_results(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "true weight" in out and "atom rel. error" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["converged"] and max(summary["atom_rel_error"]) < 0.1
    assert summary["loglik"] >= summary["truth_loglik"]  # the MLE beats the truth in-sample
    for name in ("convergence.png", "recovery.png", "fit.npz"):
        assert (tmp_path / name).stat().st_size > 0
