# SPDX-License-Identifier: Apache-2.0
"""The softmix command: its commands, files, errors in one line, exit statuses."""

import json
import subprocess
import sys

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
    assert code == 2 and "no such file" in capsys.readouterr().err
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


def _data_files(tmp_path, p=60, L=2, N=3000, seed=0):
    d = psm.simulate(num_points=p, num_features=L, num_components=2, num_obs=N, seed=seed,
                     return_tokens=True)
    np.save(tmp_path / "x.npy", d.features.numpy())
    np.save(tmp_path / "n.npy", d.counts.numpy())
    np.save(tmp_path / "t.npy", d.tokens.numpy())
    return d


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_files_and_options_give_one_line_naming_them(tmp_path, capsys):
    _data_files(tmp_path)
    x, n = tmp_path / "x.npy", tmp_path / "n.npy"
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    (tmp_path / "ragged.csv").write_text("1,2\n3,4\n5\n")
    (tmp_path / "words.csv").write_text("a,b\nc,d\n")
    fit_file = tmp_path / "fit.npz"
    psm.fit_em(np.load(x), counts=np.load(n), num_components=2, seed=0).save(fit_file)
    (tmp_path / "truncated.npz").write_bytes(fit_file.read_bytes()[:200])
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickle payload
    cases = [
        (["fit", x, "--counts", n, "-k", 2, "--out", tmp_path / "afile"], "--out", "is a file"),
        (["fit", x, "--counts", n, "-k", 2, "--out", tmp_path / "afile" / "sub"], "--out",
         "cannot create"),
        (["fit", tmp_path / "empty.npy", "--counts", n, "-k", 2, "--out", tmp_path / "o"],
         "empty.npy", "cannot be read"),
        (["fit", tmp_path, "--counts", n, "-k", 2, "--out", tmp_path / "o"], "FEATURES",
         "is a folder"),
        (["fit", tmp_path / "garbage.npy", "--counts", n, "-k", 2, "--out", tmp_path / "o"],
         "garbage.npy", "cannot be read"),
        (["fit", x, "--counts", tmp_path / "ragged.csv", "-k", 2, "--out", tmp_path / "o"],
         "ragged.csv", "ragged: row 3"),
        (["fit", x, "--counts", tmp_path / "words.csv", "-k", 2, "--out", tmp_path / "o"],
         "words.csv", "non-numeric"),
        (["fit", x, "--counts", n, "-k", 2, "--init-from", tmp_path / "truncated.npz",
          "--out", tmp_path / "o"], "truncated.npz", "cannot be read"),
        (["fit", tmp_path / "module.pt", "--counts", n, "-k", 2, "--out", tmp_path / "o"],
         "module.pt", "cannot be read"),
        (["fit", x, "--counts", n, "-k", 2, "--init", "kmeans", "--out", tmp_path / "o"],
         "--init", "must be one of"),
        (["fit", x, "--counts", n, "-k", 2, "--device", "nonsense", "--out", tmp_path / "o"],
         "device", "not a valid"),
        (["fit", x, "-k", 2, "--out", tmp_path / "o"], "--counts", "pass --counts"),
        (["fit", x, "--counts", n, "-k", 2, "--prior-scale", "-1", "--out", tmp_path / "o"],
         "prior_scale", "must be > 0"),
    ]
    for argv, names, what in cases:
        code, _, err = _run(capsys, *argv)
        line = _one_error_line(err)
        assert code == 2 and line.startswith("softmix fit: error:"), line
        assert names in line and what in line, line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_outputs_are_checked_before_the_fit_runs(tmp_path, capsys, monkeypatch):
    import pyro_softmix.em

    _data_files(tmp_path)
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(pyro_softmix.em, "fit_em", lambda *a, **k: ran.append(1))
    code, _, err = _run(capsys, "fit", tmp_path / "x.npy", "--counts", tmp_path / "n.npy",
                        "-k", 2, "--out", tmp_path / "afile")
    assert code == 2 and not ran and "--out" in err


def test_ctrl_c_exits_130_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import pyro_softmix.plots

    _data_files(tmp_path)

    def interrupted(*args, **kwargs):  # Ctrl-C while the outputs are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(pyro_softmix.plots, "plot_convergence", interrupted)
    code, _, err = _run(capsys, "fit", tmp_path / "x.npy", "--counts", tmp_path / "n.npy",
                        "-k", 2, "--quiet", "--out", tmp_path / "o")
    assert code == 130 and "interrupted" in _one_error_line(err)
    assert list((tmp_path / "o").iterdir()) == []  # not even the fit.npz written before


def test_exit_status_3_when_the_fit_did_not_converge_and_warnings_in_one_line(tmp_path,
                                                                              capsys):
    _data_files(tmp_path)
    code, out, err = _run(capsys, "fit", tmp_path / "x.npy", "--counts", tmp_path / "n.npy",
                          "-k", 2, "--max-iter", 1, "--init", "random", "--quiet",
                          "--out", tmp_path / "o")
    assert code == 3 and "NOT converged" in out
    line = _one_error_line(err)
    assert line.startswith("softmix fit: warning: EM did not converge") and ".py" not in line
    assert "--max-iter" in line and "--resume or --init-from" in line
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["converged"] is False


def test_every_fit_option_a_warning_suggests_exists(tmp_path, capsys):
    d = _data_files(tmp_path)
    groups = np.arange(d.tokens.shape[0]) // 30
    np.save(tmp_path / "g.npy", groups)
    base = ["fit", tmp_path / "x.npy", "-k", 2, "--quiet"]
    code, _, _ = _run(capsys, *base, "--counts", tmp_path / "n.npy", "--prior-scale", 2.0,
                      "--out", tmp_path / "map")
    assert code == 0 and psm.load_fit(tmp_path / "map" / "fit.npz").prior_scale == 2.0
    code, _, _ = _run(capsys, *base, "--tokens", tmp_path / "t.npy", "--groups",
                      tmp_path / "g.npy", "--out", tmp_path / "grouped")
    assert code == 0 and psm.load_fit(tmp_path / "grouped" / "fit.npz").num_groups == 100
    code, _, _ = _run(capsys, *base, "--counts", tmp_path / "n.npy", "--init-from",
                      tmp_path / "map" / "fit.npz", "--checkpoint", tmp_path / "ck.npz",
                      "--out", tmp_path / "again")
    assert code == 0 and psm.load_fit(tmp_path / "ck.npz").converged
    code, _, _ = _run(capsys, *base, "--counts", tmp_path / "n.npy", "--resume",
                      tmp_path / "ck.npz", "--out", tmp_path / "resumed")
    resumed = psm.load_fit(tmp_path / "resumed" / "fit.npz")
    assert code == 0 and resumed.init == "given" and resumed.n_iter <= 3


def test_csv_with_a_header_row_is_read(tmp_path):
    (tmp_path / "x.csv").write_text("f1,f2\n1.5,2\n3,4\n")
    assert load_array(tmp_path / "x.csv", "features").tolist() == [[1.5, 2.0], [3.0, 4.0]]
    (tmp_path / "n.csv").write_text("count\n3\n0\n")
    counts = load_array(tmp_path / "n.csv", "counts")
    assert counts.tolist() == [3, 0] and counts.dtype.kind == "i"


def test_draws_passed_as_counts_are_flagged(tmp_path, capsys):
    d = _data_files(tmp_path, p=60, N=60)
    np.save(tmp_path / "t60.npy", d.tokens.numpy())  # N == p: the shapes agree
    _, _, err = _run(capsys, "fit", tmp_path / "x.npy", "--counts", tmp_path / "t60.npy",
                     "-k", 2, "--quiet", "--out", tmp_path / "o")
    assert "looks like draws" in err and "--tokens" in err
    _, _, err = _run(capsys, "fit", tmp_path / "x.npy", "--counts", tmp_path / "n.npy", "-k", 2,
                     "--quiet", "--out", tmp_path / "o2")
    assert "looks like draws" not in err  # real counts


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from pyro_softmix.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'numpy', 'pyro'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]") and "softmix 0.1.0" in out.stdout


def test_torch_and_the_package_load_before_the_output_folder_exists(tmp_path):
    """When the output folder appears (the Ctrl-C test interrupts one second later), torch
    and the package are loaded: the interrupt lands in the work, not in torch's import."""
    code = ("import sys\nfrom pyro_softmix import cli\n"
            "def outputs(*a, **k):\n"
            "    print(sorted({'torch', 'pyro_softmix.em', 'pyro_softmix.plots'} & set(sys.modules)))\n"
            "    raise SystemExit(0)\n"
            f"cli.Outputs = outputs\ncli.main(['simulate', '--out', {str(tmp_path / 'o')!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['pyro_softmix.em', 'pyro_softmix.plots', 'torch']"


def test_warnings_are_one_line_each_but_not_resource_warnings(capsys):
    import warnings

    from pyro_softmix.cli import _one_line_warnings

    with _one_line_warnings("softmix fit"):
        warnings.warn("a file left open", ResourceWarning, stacklevel=1)
        warnings.warn("two\n  lines", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "softmix fit: warning: two lines\n"


@pytest.mark.slow
def test_a_real_ctrl_c_exits_130_with_one_line(tmp_path):
    """SIGINT to a running ``softmix fit``: one line on stderr, status 130, no outputs."""
    import os
    import signal
    import time

    d = psm.simulate(num_points=20_000, num_features=16, num_components=6, num_obs=10**6,
                     seed=0)
    np.save(tmp_path / "x.npy", d.features.numpy())
    np.save(tmp_path / "n.npy", d.counts.numpy())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "pyro_softmix.cli", "fit", str(tmp_path / "x.npy"), "--counts",
         str(tmp_path / "n.npy"), "-k", "6", "--quiet", "--no-accelerate", "--max-iter",
         "100000", "--tol", "0", "--out", str(tmp_path / "o")],
        stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl-C as at a terminal: a shell starts background jobs with SIGINT ignored, and
        # Python then keeps it ignored (so would a test run from such a job).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60  # wait until the fit runs: the output folder exists by then
    while not (tmp_path / "o").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=60)[1]
    # The program ends by SIGINT after its message, as shells expect (they show status 130).
    assert child.returncode == -signal.SIGINT, err
    assert _one_error_line(err) == "softmix fit: interrupted; nothing was written"
    assert list((tmp_path / "o").iterdir()) == []


def test_the_commands_start_methods_are_the_packages():
    from pyro_softmix.cli import START_METHODS
    from pyro_softmix.warmstart import WARM_START_METHODS

    assert START_METHODS == WARM_START_METHODS
