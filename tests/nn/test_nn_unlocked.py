"""Layers updated at random rates, and the complete unlock (synthetic inputs and gradients)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.experiments.models import fcn_blocks, synthetic_gradients
from fastdni.nn import DecoupledSequential, ForwardUnlockedSequential, RandomRateSequential


def parts(context: bool = True):
    blocks = fcn_blocks(hidden_layers=3, width=16, in_features=12)
    sgs = synthetic_gradients(blocks, (12,), (), context_features=10 if context else 0)
    for sg in sgs:
        with torch.no_grad():
            for p in sg.parameters():
                p.normal_(0, 0.1)
    return blocks, sgs


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def test_random_rates_of_one_equal_decoupled_sequential(single_thread):
    blocks, sgs = parts()
    reference = DecoupledSequential(copy.deepcopy(blocks), copy.deepcopy(sgs), gradient_scale=8.0)
    model = RandomRateSequential(blocks, sgs, update_probabilities=[1.0] * 4, gradient_scale=8.0)
    for x, y in batches(3):
        reference.train_step(x, y, F.cross_entropy, context=y)
        model.train_step(x, y, F.cross_entropy, context=y)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, msg=name)
    assert model.update_counts == [3, 3, 3, 3]


def test_a_rarely_updated_block_and_its_sg_stay_put_while_the_others_train(single_thread):
    blocks, sgs = parts()
    model = RandomRateSequential(blocks, sgs, update_probabilities=[1.0, 1e-9, 1.0, 0.5], gradient_scale=8.0, seed=3)
    before = copy.deepcopy(model)
    for x, y in batches(6):
        model.train_step(x, y, F.cross_entropy, context=y)
    unchanged = lambda m, b: all(torch.equal(p, q) for p, q in zip(m.parameters(), b.parameters()))
    assert unchanged(model.blocks[1], before.blocks[1]) and unchanged(model.interfaces[1], before.interfaces[1])
    assert not unchanged(model.blocks[0], before.blocks[0]) and not unchanged(model.blocks[2], before.blocks[2])
    assert model.update_counts[:3] == [6, 0, 6] and 0 < model.update_counts[3] < 6
    with pytest.raises(ValueError, match="update_probabilities"):
        RandomRateSequential(*parts(), update_probabilities=[1.0, 0.0, 1.0, 1.0])


def synthetic_inputs():
    return [nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3)]


def test_complete_unlock_block_update_does_not_depend_on_the_blocks_below(single_thread):
    """Block 2 trains on I(x) and its SG: changing blocks 0 and 1 changes nothing in its first update."""
    torch.manual_seed(0)
    model = ForwardUnlockedSequential(*parts(), synthetic_inputs(), gradient_scale=8.0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in list(other.blocks[0].parameters()) + list(other.blocks[1].parameters()):
            p.add_(torch.randn_like(p))
    (x, y), = batches(1)
    model.train_step(x, y, F.cross_entropy, context=y)
    other.train_step(x, y, F.cross_entropy, context=y)
    for a, b in zip(model.blocks[2].parameters(), other.blocks[2].parameters()):
        torch.testing.assert_close(a, b)
    # ... while the synthetic-input models' targets (the real activations) did change.
    assert not torch.equal(model.synthetic_inputs[1][0].weight, other.synthetic_inputs[1][0].weight)


def test_complete_unlock_learns_its_synthetic_inputs(single_thread):
    torch.manual_seed(0)
    model = ForwardUnlockedSequential(*parts(), synthetic_inputs(), gradient_scale=8.0,
                                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    (x, y), = batches(1)
    losses = []
    for _ in range(30):
        model.train_step(x, y, F.cross_entropy, context=y)
        losses.append([float(v) for v in model.input_losses])
    assert all(last < 0.5 * first for first, last in zip(losses[0], losses[-1])), (losses[0], losses[-1])
    with pytest.raises(ValueError, match="synthetic_inputs: expected one per block but the first"):
        ForwardUnlockedSequential(*parts(), synthetic_inputs()[:2])
