"""Copy / repeat-copy generators, their bits-per-step error and the paper's curriculum."""
import math

import pytest
import torch

from fastdni.data.copy_tasks import CopyTask, Curriculum, RepeatCopyTask, bits_per_step


def test_copy_layout():
    b = CopyTask(bits=8, seed=1).batch(batch_size=5, length=4)
    assert b.inputs.shape == (9, 5, 9) and b.targets.shape == (9, 5, 8) and b.mask.shape == (9, 5)
    pattern = b.inputs[:4, :, :8]
    assert set(pattern.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(b.inputs[4, :, 8], torch.ones(5)) and b.inputs[:, :, 8].sum() == 5  # one delimiter
    assert b.inputs[5:].abs().sum() == 0  # nothing to see while answering
    assert torch.equal(b.targets[5:], pattern) and b.targets[:5].abs().sum() == 0
    assert b.mask[5:].all() and not b.mask[:5].any()


def test_repeat_copy_layout():
    task = RepeatCopyTask(bits=3, max_repeats=4, seed=2)
    b = task.batch(batch_size=2, length=3, repeats=3)
    steps = 3 + 1 + 9 + 1
    assert b.inputs.shape == (steps, 2, 5) and b.targets.shape == (steps, 2, 4)
    pattern = b.inputs[:3, :, :3]
    assert torch.equal(b.inputs[3, :, 4], torch.full((2,), 0.75))  # R / max_repeats
    assert torch.equal(b.targets[4:13, :, :3], pattern.repeat(3, 1, 1))
    assert torch.equal(b.targets[13, :, 3], torch.ones(2)) and b.targets[:13, :, 3].sum() == 0  # end marker
    assert b.mask[4:].all() and not b.mask[:4].any()
    sampled = {task.batch(1, 1).inputs.shape[0] - 3 for _ in range(60)}  # T - 3 = R for N = 1
    assert sampled == {1, 2, 3, 4}


def test_generation_is_seeded_and_resumable():
    a, b = CopyTask(seed=7), CopyTask(seed=7)
    assert torch.equal(a.batch(3, 5).inputs, b.batch(3, 5).inputs)
    state = a.state_dict()
    first = a.batch(3, 5).inputs
    a.load_state_dict(state)
    assert torch.equal(a.batch(3, 5).inputs, first)
    assert not torch.equal(CopyTask(seed=8).batch(3, 5).inputs, CopyTask(seed=7).batch(3, 5).inputs)


def test_bits_per_step():
    b = CopyTask(bits=8).batch(4, 6)
    assert bits_per_step(torch.zeros_like(b.targets), b).item() == pytest.approx(8.0)  # 1 bit per channel
    confident = (b.targets * 2 - 1) * 30
    assert bits_per_step(confident, b).item() < 1e-6
    wrong_outside_mask = confident.clone()
    wrong_outside_mask[~b.mask] = 30.0  # steps that are not scored do not count
    assert bits_per_step(wrong_outside_mask, b).item() < 1e-6
    with pytest.raises(ValueError, match="logits"):
        bits_per_step(torch.zeros(2, 2, 2), b)


def test_curriculum_lengthens_below_threshold_only():
    c = Curriculum(start_length=1, threshold=0.15, window=3)
    assert not any(c.update(e) for e in (0.2, 0.1, 0.16, 0.2))  # window averages 0.153, 0.153: not below
    assert c.length == 1 and c.max_length_reached == 0
    c = Curriculum(window=3)
    assert [c.update(e) for e in (0.3, 0.1, 0.1, 0.1)] == [False, False, False, True]  # 0.167, then 0.1
    assert c.length == 2 and c.max_length_reached == 1
    assert [c.update(e) for e in (0.1, 0.1)] == [False, False]  # the window starts afresh at a new length
    state = c.state_dict()
    resumed = Curriculum(window=3)
    resumed.load_state_dict(state)
    assert resumed.update(0.1) and c.update(0.1) and resumed.length == c.length == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_length=0), "start_length"), (dict(window=0), "window"), (dict(threshold=0.0), "threshold")])
def test_curriculum_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Curriculum(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        CopyTask().batch(2, 0)
    with pytest.raises(ValueError, match="bits"):
        CopyTask(bits=0)
    with pytest.raises(ValueError, match="repeats"):
        RepeatCopyTask(max_repeats=2).batch(2, 2, repeats=3)
    with pytest.raises(ValueError, match="error_bits_per_step"):
        Curriculum().update(math.nan)
