"""The in-process asynchronous MNIST CLI (random update rates, complete unlock) at a tiny budget, and its errors."""
import json

import pytest

from fastdni.experiments import unlocked


def test_every_mode_runs_and_writes_results(tmp_path, capsys):
    rc = unlocked.main(["--steps", "4", "--eval-every", "2", "--batch-size", "32", "--width", "16", "--input-hidden", "16",
                        "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in rows] == list(unlocked.MODES)
    assert all(0 <= r["test_error"] <= 100 and len(r["curve"]) == 2 for r in rows)
    rates = next(r for r in rows if r["mode"] == "random-rates")
    assert all(0.2 <= p <= 1 for p in rates["update_probabilities"])
    assert all(0 <= n <= 4 for n in rates["updates_per_block"])  # each block updated on at most every step
    assert (tmp_path / "test_error.png").exists() and "| complete-unlock |" in capsys.readouterr().out


def test_missing_data_is_named(tmp_path, capsys):
    assert unlocked.main(["--data", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "missing dataset file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--min-rate", "0"], "--min-rate"),
                                           (["--input-hidden", "0"], "--input-hidden")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        unlocked.parse_args(argv)
    assert message in capsys.readouterr().err
