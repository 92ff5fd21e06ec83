"""A decoupled model split into pipeline stages: the math of the stages, the wire format, the checks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.distributed import DecoupledStage, EmulatedCost, Kind, Message, WireError, split_stages, stage_bounds
from fastdni.distributed.wire import HEADER_SIZE, MAGIC, check_tensor_spec, decode_header, encode_header
from fastdni.experiments.models import fcn_blocks, synthetic_gradients
from fastdni.nn import DecoupledSequential


def small_model(context: bool) -> DecoupledSequential:
    blocks = fcn_blocks(hidden_layers=3, width=16, in_features=12)
    sgs = synthetic_gradients(blocks, (12,), (), context_features=10 if context else 0)
    for sg in sgs:  # a fresh SG predicts zero: random ones make every term of the step count
        with torch.no_grad():
            for p in sg.parameters():
                p.normal_(0, 0.1)
    return DecoupledSequential(blocks, sgs, gradient_scale=8.0, sg_targets="bootstrap")


@pytest.mark.parametrize("context", [False, True])
def test_stages_with_immediate_targets_equal_decoupled_sequential(context, single_thread):
    """Four stages, each target applied as soon as it exists: the same updates as the one-process step."""
    torch.manual_seed(0)
    reference = small_model(context)
    stages = split_stages(copy.deepcopy(reference), 4, max_staleness=0, use_context=context)
    for step in range(3):
        x, y = torch.randn(8, 12), torch.randint(0, 10, (8,))
        reference.train_step(x, y, F.cross_entropy, context=y if context else None)
        h = x
        for k, stage in enumerate(stages):
            result = stage.train_micro_batch(step, h, y, F.cross_entropy)
            if k > 0:
                assert stages[k - 1].apply_target(step, result.input_grad)
            h = result.output
    split = nn.ModuleList(s.modules() for s in stages)
    expected = dict(reference.named_parameters())
    got = {}
    for k, s in enumerate(stages):
        for name, p in s.blocks.named_parameters():
            got[f"blocks.{k}.{name.split('.', 1)[1]}"] = p
        if s.interface is not None:
            for name, p in s.interface.named_parameters():
                got[f"interfaces.{k}.{name}"] = p
    assert set(got) == set(expected) and len(list(split.parameters())) == len(expected)
    for name, p in expected.items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert all(s.staleness == [0, 0, 0] for s in stages[:-1])


def test_targets_older_than_max_staleness_are_dropped_and_counted(single_thread):
    stage = split_stages(small_model(False), 2, max_staleness=2)[0]
    outputs = [stage.train_micro_batch(i, torch.randn(8, 12), torch.zeros(8, dtype=torch.long), F.cross_entropy)
               for i in range(4)]
    target = torch.zeros_like(outputs[0].output)
    assert not stage.apply_target(0, target)  # 3 micro-batches trained since: forgotten
    assert stage.apply_target(1, target) and stage.apply_target(3, target)
    assert stage.staleness == [2, 0]
    assert not stage.apply_target(1, target)  # applied once only
    assert stage.dropped == 2
    stage.train_micro_batch(4, torch.randn(8, 12), torch.zeros(8, dtype=torch.long), F.cross_entropy)
    with pytest.raises(ValueError, match=r"target: expected torch.float32\[8, 16\] for micro-batch 4"):
        stage.apply_target(4, torch.zeros(8, 3))


def test_stage_state_round_trip(single_thread):
    model = small_model(True)
    stage = split_stages(model, 2, use_context=True)[1]
    stage.train_micro_batch(0, torch.randn(8, 16), torch.zeros(8, dtype=torch.long), F.cross_entropy)
    other = split_stages(copy.deepcopy(model), 2, use_context=True)[1]
    other.load_state_dict(stage.state_dict())
    assert other.steps == 1
    for a, b in zip(stage.modules().state_dict().values(), other.modules().state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="state: saved for blocks"):
        split_stages(copy.deepcopy(model), 2)[0].load_state_dict(stage.state_dict())


def test_stage_bounds_and_bad_arguments():
    assert stage_bounds(5, 2) == [(0, 3), (3, 5)]
    assert stage_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="num_stages"):
        stage_bounds(3, 4)
    with pytest.raises(ValueError, match="model: expected a DecoupledSequential with synthetic"):
        DecoupledStage(DecoupledSequential([nn.Linear(2, 2)], mode="backprop"), 0, 1, max_staleness=1, use_context=False)
    with pytest.raises(ValueError, match="max_staleness"):
        split_stages(small_model(False), 2, max_staleness=-1)


def test_header_round_trip_and_corruption():
    message = Message(Kind.TRAIN, 17, (torch.zeros(3, 4, 5), torch.zeros(3, dtype=torch.long)))
    header = encode_header(message)
    assert header.shape == (HEADER_SIZE,)
    kind, micro_batch, specs = decode_header(header, "test")
    assert (kind, micro_batch) == (Kind.TRAIN, 17)
    assert specs == [(torch.float32, (3, 4, 5)), (torch.int64, (3,))]
    bad = header.clone()
    bad[0] = MAGIC + 1
    with pytest.raises(WireError, match="not a fastdni header"):
        decode_header(bad, "test")
    bad = header.clone()
    bad[1] = 99
    with pytest.raises(WireError, match="unknown message kind 99"):
        decode_header(bad, "test")
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_header(Message(Kind.GRAD, 0, (torch.zeros(2, dtype=torch.complex64),)))


def test_tensor_spec_errors_name_sender_shape_and_dtype():
    x = torch.zeros(4, 16)
    check_tensor_spec("activation", x, torch.float32, (16,), "from rank 0")
    with pytest.raises(WireError, match=r"from rank 0: activation has shape \[4, 16\], expected \[batch, 32\]"):
        check_tensor_spec("activation", x, torch.float32, (32,), "from rank 0")
    with pytest.raises(WireError, match="from rank 0: activation has dtype torch.float64, expected torch.float32"):
        check_tensor_spec("activation", x.double(), torch.float32, (16,), "from rank 0")


def test_emulated_cost_sleeps_in_training_only():
    import time

    block = EmulatedCost(nn.Linear(3, 3), 0.05, 0.05)
    x = torch.randn(2, 3)
    started = time.perf_counter()
    block(x).sum().backward()
    assert time.perf_counter() - started >= 0.1
    block.eval()
    started = time.perf_counter()
    block(x)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(ValueError, match="forward_seconds"):
        EmulatedCost(nn.Linear(3, 3), -1, 0)
