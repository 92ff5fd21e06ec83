"""The recurrent CLI (copy, repeat copy, character-level PTB) end to end at a tiny budget, and its errors."""
import csv
import dataclasses
import json
import math

import pytest
import torch

from fastdni.data.copy_streams import CopyStreams, StreamCurriculum
from fastdni.experiments import recurrent
from fastdni.experiments.recurrent_runs import RunGroup, masked_bce

TINY = ["--steps", "6", "--eval-every", "3", "--hidden", "16", "--batch-size", "4", "--no-progress",
        "--checkpoint-every", "3"]


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_copy_grid_writes_tables_plot_logs_checkpoints(tmp_path, capsys):
    rc = recurrent.main(["copy", "--all", "--truncations", "2", "3", "--seeds", "0", "1", "--out", str(tmp_path), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "copy: max length N reached" in out and "| dni-aux |" in out and "(0/0)" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["truncation"], r["seed"]) for r in rows] == [
        (m, t, s) for m in recurrent.METHODS for t in (2, 3) for s in (0, 1)]
    assert all(r["max_length"] >= 0 and r["final_length"] == r["max_length"] + 1 and r["steps"] == 6
               and len(r["curve"]) == 2 and r["runs_in_group"] == 6 for r in rows)
    assert (tmp_path / "curriculum.png").stat().st_size > 1000
    log = _log(tmp_path / "dni-aux-T2-s1.csv")
    assert [int(r["step"]) for r in log] == [3, 6]
    assert float(log[-1]["sg_loss"]) >= 0 and float(log[-1]["aux_loss"]) >= 0  # both losses ran
    assert -1 <= float(log[-1]["sg_cosine"]) <= 1 or math.isnan(float(log[-1]["sg_cosine"]))
    assert all(r["aux_loss"] == "nan" for r in _log(tmp_path / "dni-T2-s0.csv"))  # no aux loss without aux
    assert 0 <= float(log[-1]["sg_gain"]) <= 1  # calibrated by default
    assert float(_log(tmp_path / "bptt-T2-s0.csv")[-1]["sg_gain"]) >= 0
    assert torch.load(tmp_path / "T3.pt", weights_only=False)["step"] == 6


def test_dni_aux_trains_the_aux_predictor_and_only_for_dni_aux():
    """Through RunGroup.train_window: the aux predictor (zero-initialised, as is the SG, so the first targets
    are 0) moves once the SG has been regressed onto a non-zero target; the other methods' aux rows get no
    gradient."""
    group = RunGroup(["dni", "dni-aux"], [0, 0], 10, 8, 9, aux_weight=0.5)
    sg_opt = torch.optim.Adam(group.sg_parameters(), lr=1e-2)
    streams = CopyStreams(2, 4, max_repeats=4, seed=0)
    state = group.initial_state(4)
    for _ in range(6):
        w = streams.window(2)
        _, state, stats = group.train_window(w.inputs, lambda lg: masked_bce(lg, w.targets, w.mask), state,
                                             resets=w.starts)
        sg_opt.step()
        sg_opt.zero_grad()
    assert group.aux_w[1].abs().sum() > 0 and group.aux_w[0].abs().sum() == 0
    assert float(stats.aux_loss[1]) > 0 and float(stats.aux_loss[0]) == 0


def test_resume_continues_exactly_and_refuses_another_config(tmp_path, capsys):
    args = ["repeat-copy", "--methods", "dni", "bptt", "--seeds", "0", "--truncation", "2", *TINY]
    assert recurrent.main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    # The same 6 steps as 3, then a resumed 3: the checkpoint holds model, optimizers, streams, curriculum.
    half = [a if a != "6" else "3" for a in args]
    assert recurrent.main(half + ["--out", str(tmp_path / "split")]) == 0
    split = torch.load(tmp_path / "split" / "T2.pt", weights_only=False)
    split["config"]["steps"] = 6  # the same run asked to go on to 6 steps
    torch.save(split, tmp_path / "split" / "T2.pt")
    assert recurrent.main(args + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "split" / "results.json").read_text())
    for a, b in zip(whole, resumed):
        assert _log(tmp_path / "whole" / f"{a['method']}-T2-s0.csv")[-1]["sg_loss"] == \
            _log(tmp_path / "split" / f"{b['method']}-T2-s0.csv")[-1]["sg_loss"]
        assert a["curve"] == b["curve"]
    assert recurrent.main(args + ["--out", str(tmp_path / "whole"), "--resume", "--sg-lr", "0.5"]) == 2
    assert "different run" in capsys.readouterr().err
    old = torch.load(tmp_path / "whole" / "T2.pt", weights_only=False)
    del old["format"]  # written before the SG's weights were stored [R, out, in]: refused, not read transposed
    torch.save(old, tmp_path / "whole" / "T2.pt")
    assert recurrent.main(args + ["--out", str(tmp_path / "whole"), "--resume"]) == 2
    assert "format None" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("fastdni.ops", fromlist=["x"]).HAS_CPU_KERNELS, reason="no fastdni._C")
def test_the_sg_runs_on_the_fused_ops_by_default():
    config = recurrent.GroupConfig(task="copy", truncation=2, methods=("dni",), seeds=(0,), steps=1, hidden=4,
                                   batch_size=2, lr=1e-3, sg_lr=1e-2)
    group, optimizers = recurrent.build_group(config, 10, 9)
    assert group.sg_optimizer is optimizers[1]
    group, _ = recurrent.build_group(dataclasses.replace(config, sg_ops=False), 10, 9)
    assert group.sg_optimizer is None


def test_ptb_reports_bits_per_character(tmp_path, capsys):
    rc = recurrent.main(["ptb", "--methods", "bptt", "dni", "--seeds", "0", "--truncation", "3", "--eval-chars", "2000",
                         "--out", str(tmp_path), *TINY])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    # A 50-character vocabulary: an untrained model is near log2(50) = 5.6 bits, never above ~8 or below 0.
    assert len(rows) == 2 and all(0 < r["valid_bpc"] < 8 and 0 < r["test_bpc"] < 8 for r in rows)
    assert rows[0]["characters"] == 6 * 3 * 4
    assert (tmp_path / "valid_bpc.png").exists() and "test BPC" in capsys.readouterr().out


def test_ptb_missing_data_is_named(tmp_path, capsys):
    assert recurrent.main(["ptb", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "--data" in capsys.readouterr().err


def test_evaluate_bpc_of_an_untrained_model_is_near_uniform():
    group = RunGroup(["bptt", "dni"], [0, 1], 20, 8, 20)
    with torch.no_grad():
        group.w_out.zero_()
        group.b_out.zero_()  # uniform predictions: exactly log2(20) bits per character
    ids = torch.randint(0, 20, (400,))
    bpc = recurrent.evaluate_bpc(group, ids, 20, streams=4, chunk=7)
    torch.testing.assert_close(bpc, torch.full((2,), math.log2(20.0)), rtol=1e-5, atol=1e-5)


def test_stream_curriculum_grows_each_run_on_its_own_error():
    c = StreamCurriculum(2, streams=4, channels=8, threshold=0.15, per="bit", window=2)
    current = torch.ones(1, 2, 4, dtype=torch.bool)
    low = torch.tensor([[[0.8] * 4, [8.0] * 4]])  # bits per step: 0.1 per bit for run 0, 1 per bit for run 1
    assert c.update(low, current) is False  # 4 of the 2 x 4 x N=1 scored steps a block needs
    assert c.update(low, current) is True
    assert c.lengths.tolist() == [2, 1] and c.max_length_reached.tolist() == [1, 0]
    torch.testing.assert_close(c.last_error, torch.tensor([0.1, 1.0], dtype=torch.float64))
    per_step = StreamCurriculum(1, streams=4, channels=8, threshold=0.15, per="step", window=1)
    assert per_step.update(torch.full((1, 1, 4), 0.8), current[:, :1]) is False  # 0.8 bits per step > 0.15


@pytest.mark.parametrize("argv, message", [
    (["copy", "--steps", "0"], "--steps"),
    (["copy", "--truncation", "x"], "--truncation"),
    (["copy", "--method", "rtrl"], "--method"),
    (["copy", "--lr", "-1"], "--lr"),
    (["copy", "--aux-weight", "-0.1"], "--aux-weight"),
    (["copy", "--bootstrap", "-1"], "--bootstrap"),
    (["copy", "--error-unit", "sequence"], "--error-unit"),
    (["ptb", "--sg-scale", "0"], "--sg-scale"),
    (["copy", "--sg-lambda", "1.5"], "--sg-lambda"),
    (["tetris"], "task"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        recurrent.parse_args(argv)
    assert message in capsys.readouterr().err


def test_sg_lambda_defaults_by_task_and_window():
    """Copy tasks: two-window SG targets, the second window at full weight (sg_lambda 1) at T <= 3 and at half weight
    above; PTB (one window) and an explicit flag: as given."""
    assert recurrent.parse_args(["copy"]).sg_lambda is None
    assert [recurrent.copy_sg_lambda(t) for t in (1, 2, 3, 4, 5)] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert recurrent.parse_args(["ptb"]).sg_lambda == 0.0
    assert recurrent.parse_args(["repeat-copy", "--sg-lambda", "0.5"]).sg_lambda == 0.5


def test_batchify_rejects_too_many_streams():
    with pytest.raises(ValueError, match="--batch-size"):
        recurrent.batchify(torch.arange(10), 8)


def test_no_calibrate_runs_the_papers_sg(tmp_path, capsys):
    args = ["copy", "--methods", "dni", "--seeds", "0", "--truncation", "2", *TINY, "--out", str(tmp_path)]
    assert recurrent.main(args + ["--no-calibrate"]) == 0
    assert all(float(r["sg_gain"]) == 1.0 for r in _log(tmp_path / "dni-T2-s0.csv"))
    assert json.loads((tmp_path / "results.json").read_text())[0]["config"]["calibrate"] is False
