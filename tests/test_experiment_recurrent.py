"""The recurrent CLI (copy, repeat copy, character-level PTB) end to end at a tiny budget, and its errors."""
import csv
import json

import pytest
import torch

from fastdni.experiments import recurrent

TINY = ["--steps", "6", "--eval-every", "3", "--hidden", "16", "--batch-size", "4", "--no-progress", "--checkpoint-every", "3"]


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_copy_grid_writes_table_plot_logs_checkpoints(tmp_path, capsys):
    rc = recurrent.main(["copy", "--all", "--truncations", "2", "3", "--out", str(tmp_path), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "copy: max length N reached" in out and "| dni-aux |" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["truncation"]) for r in rows] == [
        (m, t) for m in recurrent.METHODS for t in (2, 3)]
    assert all(r["max_length"] >= 0 and r["final_length"] == r["max_length"] + 1 and r["steps"] == 6 and len(r["curve"]) == 2 for r in rows)
    assert (tmp_path / "curriculum.png").stat().st_size > 1000
    log = _log(tmp_path / "dni-aux-T2.csv")
    assert [int(r["step"]) for r in log] == [3, 6]
    assert float(log[-1]["sg_loss"]) >= 0 and float(log[-1]["aux_loss"]) >= 0  # both losses ran
    assert all(r["aux_loss"] == "nan" for r in _log(tmp_path / "dni-T2.csv"))  # no aux loss without aux
    assert torch.load(tmp_path / "bptt-T3.pt", weights_only=False)["step"] == 6


def test_dni_aux_trains_the_aux_predictor():
    """Repeat-copy sequences through Learner.train_sequence: the aux predictor (zero-initialised, as is the SG's
    output layer, so the first targets are 0) moves once the SG has been regressed onto a non-zero target."""
    config = recurrent.RunConfig(task="repeat-copy", method="dni-aux", truncation=2, steps=1, hidden=8, batch_size=4,
                                 lr=1e-2, sg_lr=1e-2)
    task = recurrent.RepeatCopyTask(config.bits, config.max_repeats, seed=0)
    learner = recurrent.Learner(config, task.input_channels, task.output_channels)
    before = [p.detach().clone() for p in learner.boundary.aux_predictor.parameters()]
    for _ in range(2):
        batch = task.batch(4, 5)
        learner.train_sequence(batch.inputs, lambda w, logits: recurrent.copy_loss(batch, w, logits),
                               learner.model.initial_state(4), episode_ends=True)
    assert all(not torch.equal(a, p) for a, p in zip(before, learner.boundary.aux_predictor.parameters()))
    assert float(learner.boundary.last_aux_loss) > 0


def test_resume_continues_and_refuses_another_config(tmp_path, capsys):
    args = ["repeat-copy", "--method", "dni", "--truncation", "2", "--out", str(tmp_path), *TINY]
    assert recurrent.main(args) == 0
    first = json.loads((tmp_path / "results.json").read_text())[0]
    assert recurrent.main(args + ["--resume"]) == 0  # finished: nothing left to run, the same result
    assert json.loads((tmp_path / "results.json").read_text())[0]["curve"] == first["curve"]
    assert recurrent.main(args + ["--resume", "--sg-lr", "0.5"]) == 2
    assert "different run" in capsys.readouterr().err


def test_ptb_reports_bits_per_character(tmp_path, capsys):
    rc = recurrent.main(["ptb", "--method", "dni", "--truncation", "3", "--seq-len", "12", "--eval-chars", "2000",
                         "--out", str(tmp_path), *TINY])
    assert rc == 0
    row = json.loads((tmp_path / "results.json").read_text())[0]
    # A 50-character vocabulary: an untrained model is near log2(50) = 5.6 bits, never above ~8 or below 0.
    assert 0 < row["valid_bpc"] < 8 and 0 < row["test_bpc"] < 8
    assert (tmp_path / "valid_bpc.png").exists() and "test BPC" in capsys.readouterr().out


def test_ptb_missing_data_is_named(tmp_path, capsys):
    assert recurrent.main(["ptb", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "--data" in capsys.readouterr().err


def test_evaluate_bpc_of_an_untrained_model_is_near_uniform():
    model = recurrent.LSTMModel(20, 8, 20)
    torch.nn.init.zeros_(model.readout.weight)
    torch.nn.init.zeros_(model.readout.bias)  # uniform predictions: exactly log2(20) bits per character
    ids = torch.randint(0, 20, (400,))
    assert recurrent.evaluate_bpc(model, ids, 20, streams=4, chunk=7) == pytest.approx(torch.log2(torch.tensor(20.)).item())


@pytest.mark.parametrize("argv, message", [
    (["copy", "--steps", "0"], "--steps"),
    (["copy", "--truncation", "x"], "--truncation"),
    (["copy", "--method", "rtrl"], "--method"),
    (["copy", "--lr", "-1"], "--lr"),
    (["copy", "--aux-weight", "-0.1"], "--aux-weight"),
    (["ptb", "--gradient-scale", "0"], "--gradient-scale"),
    (["tetris"], "task"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        recurrent.parse_args(argv)
    assert message in capsys.readouterr().err


def test_batchify_rejects_too_many_streams():
    with pytest.raises(ValueError, match="--batch-size"):
        recurrent.batchify(torch.arange(10), 8)
