"""The paper's MNIST table command end to end at a tiny budget: cells, table, JSON, resume, argument errors."""
import json

import pytest
import torch

from fastdni.experiments import mnist_table

TINY = ["--steps", "2", "--eval-every", "1", "--no-progress", "--checkpoint-every", "0", "--threads", "1"]


@pytest.fixture
def keep_threads():
    """--threads sets torch's process-wide thread count: give the later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_table_runs_the_chosen_cells_and_resume_skips_finished_ones(tmp_path, capsys, keep_threads):
    out = ["--out", str(tmp_path)]
    assert mnist_table.main(TINY + out + ["--cells", "fcn3-backprop", "fcn4-cdni"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert list(rows) == ["fcn3-backprop", "fcn4-cdni"]
    assert all(0 <= r["test_error"] <= 100 and r["steps"] == 2 and len(r["curve"]) == 2 for r in rows.values())
    assert rows["fcn4-cdni"]["config"]["hidden_layers"] == 4 and rows["fcn4-cdni"]["config"]["model"] == "fcn-bn"
    table = (tmp_path / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| method | FCN 3 | FCN 4 | FCN 5 | FCN 6 | CNN |"
    backprop = next(line for line in lines if line.startswith("| backprop (ours) |"))
    assert [c.strip() for c in backprop.strip("|").split("|")][1:] == [f"{rows['fcn3-backprop']['test_error']:.2f}"] + ["not run"] * 4
    assert "| cdni (paper) | " + " | ".join([mnist_table.PAPER_MISSING] * 5) + " |" in lines
    assert "2 training steps per cell" in table and torch.get_num_threads() == 1
    first = (tmp_path / "fcn3-backprop" / "result.json").stat().st_mtime_ns
    capsys.readouterr()

    # resume: the two finished cells are taken as they are, only the new one trains; the table holds all three
    assert mnist_table.main(TINY + out + ["--cells", "fcn3-*", "fcn4-cdni", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "fcn3-backprop: done before" in printed and "fcn4-cdni: done before" in printed
    assert "fcn3-dni: test error" in printed and "fcn3-cdni: test error" in printed
    assert (tmp_path / "fcn3-backprop" / "result.json").stat().st_mtime_ns == first
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["fcn3-backprop", "fcn3-dni", "fcn3-cdni", "fcn4-cdni"]

    # a finished cell of another budget is not silently mixed in
    assert mnist_table.main(["--steps", "3"] + TINY[2:] + out + ["--cells", "fcn3-backprop", "--resume"]) == 2
    assert "different run" in capsys.readouterr().err


def test_cells_are_the_papers_grid():
    assert len(mnist_table.CELLS) == 15 and mnist_table.CELLS[0] == "fcn3-backprop" and mnist_table.CELLS[-1] == "cnn-cdni"
    assert mnist_table.cell_config(mnist_table.parse_args(["--cells", "cnn-dni"]), "cnn-dni").model == "cnn"
    config = mnist_table.cell_config(mnist_table.parse_args([]), "fcn6-dni")
    assert (config.model, config.hidden_layers, config.steps, config.sg_hidden, config.sg_targets) == ("fcn-bn", 6, 4680, (), None)


@pytest.mark.parametrize("argv, message", [
    (["--cells", "fcn7-dni"], "--cells"),
    (["--steps", "0"], "--steps"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
])
def test_table_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        mnist_table.parse_args(argv)
    assert message in capsys.readouterr().err
