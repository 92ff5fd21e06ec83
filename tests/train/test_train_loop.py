"""Training loop: deterministic batches, atomic checkpoints, and resume equal to an uninterrupted run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import DecoupledSequential, SyntheticGradient
from fastdni.train import BatchOrder, CheckpointError, load_checkpoint, save_checkpoint, train

CONFIG = {"name": "tiny"}


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def _model(mode="dni"):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 3)]
    return DecoupledSequential(blocks, [SyntheticGradient(16, (8,), context_features=3)], mode=mode, gradient_scale=16)


def _train(model, steps, path, **kw):
    return train(model, _data(), _data(40, 1), steps=steps, batch_size=16, seed=3, eval_every=4, use_context=True,
                 checkpoint_path=path, checkpoint_every=5, run_config=CONFIG, progress=False, lr_schedule="cosine", **kw)


def test_batch_order_is_a_function_of_step():
    a, b = BatchOrder(50, 8, seed=1), BatchOrder(50, 8, seed=1)
    first = [a(s) for s in range(14)]
    assert all(torch.equal(first[s], b(s)) for s in reversed(range(14)))  # any access order
    assert sorted(torch.cat(first[:6]).tolist()) == sorted(set(torch.cat(first[:6]).tolist()))  # no repeats in an epoch
    assert not torch.equal(first[0], first[6])  # epochs reshuffle
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(5, 8, seed=0)


def test_resume_gives_the_same_next_steps(tmp_path):
    full = _model()
    full_result = _train(full, 20, tmp_path / "full.pt")

    interrupted = _model()
    calls = {"n": 0}

    def dies_after_12_steps(out, y):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return F.cross_entropy(out, y)

    with pytest.raises(KeyboardInterrupt):
        _train(interrupted, 20, tmp_path / "run.pt", loss_fn=dies_after_12_steps)
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 10

    resumed = _model()  # a fresh process: new model, state from the checkpoint
    result = _train(resumed, 20, tmp_path / "run.pt", resume=True)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    untimed = lambda history: [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]
    assert untimed(result.history) == untimed(full_result.history)


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    _train(_model(), 5, tmp_path / "run.pt")
    with pytest.raises(CheckpointError, match="different run"):
        train(_model(), _data(), _data(40, 1), steps=10, batch_size=16, seed=3, eval_every=5, use_context=True,
              checkpoint_path=tmp_path / "run.pt", resume=True, run_config={"name": "other"}, progress=False)


def test_resume_refuses_a_checkpoint_of_another_model_kind(tmp_path):
    """Same run config, another model (an fcn-bn checkpoint of DecoupledSequential, now that fcn-bn builds a
    DecoupledMLP): a CheckpointError naming the model, not a raw load_state_dict error."""
    from fastdni.nn import DecoupledMLP

    _train(_model(), 5, tmp_path / "run.pt")
    torch.manual_seed(0)
    other = DecoupledMLP(12, (16,), 3, sg_hidden=(8,), context_features=3, gradient_scale=16, batch_norm=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint: its model state does not fit this DecoupledMLP"):
        _train(other, 10, tmp_path / "run.pt", resume=True)


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_bad_arguments():
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(_model(), _data(), _data(), steps=2, batch_size=16, seed=0, eval_every=1, resume=True)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(_model(), _data(), _data(), steps=2, batch_size=16, seed=0, eval_every=1, lr_schedule="step")
