"""TruncationDNI: with a perfect SG, truncated BPTT gives the full-BPTT gradient; bootstrapped targets; states."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import SyntheticGradient, TruncationDNI, flatten_state, unflatten_state
from helpers import randomise_

F64 = torch.float64
HIDDEN, FEATURES, BATCH = 5, 3, 4


class Core(nn.Module):
    """An LSTMCell with a linear readout; ``forward`` runs a segment and returns (summed loss, final state)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(FEATURES, HIDDEN).double()
        self.readout = nn.Linear(HIDDEN, 2).double()

    def forward(self, inputs, targets, state):
        loss = inputs.new_zeros(())
        for x, y in zip(inputs, targets):
            state = self.cell(x, state)
            loss = loss + F.mse_loss(self.readout(state[0]), y, reduction="sum")
        return loss, state


class FutureGradientOracle(nn.Module):
    """A perfect SG: ``scale * d(loss of the rest of the sequence)/d state`` with the current parameters."""

    def __init__(self, core, scale):
        super().__init__()
        self.core, self.scale, self.remaining = [core], scale, None  # a list: not a submodule

    def forward(self, flat):
        inputs, targets = self.remaining
        if len(inputs) == 0:
            return torch.zeros_like(flat)
        with torch.enable_grad():  # TruncationDNI asks for its prediction under no_grad
            leaf = flat.detach().requires_grad_()
            loss, _ = self.core[0](inputs, targets, unflatten_state(leaf, (flat[:, :HIDDEN], flat[:, HIDDEN:])))
            return self.scale * torch.autograd.grad(loss, leaf)[0]


def sequence(length=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(length, BATCH, FEATURES, generator=g, dtype=F64), torch.randn(length, BATCH, 2, generator=g, dtype=F64)


def initial_state():
    return torch.zeros(BATCH, HIDDEN, dtype=F64), torch.zeros(BATCH, HIDDEN, dtype=F64)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_perfect_sg_gives_the_full_bptt_gradient(window):
    inputs, targets = sequence()
    core = randomise_(Core(), 0.5)
    full_loss, _ = core(inputs, targets, initial_state())
    full = torch.autograd.grad(full_loss, list(core.parameters()))

    oracle = FutureGradientOracle(core, scale=4.0)
    boundary = TruncationDNI(oracle, gradient_scale=4.0)
    state = initial_state()
    for start in range(0, len(inputs), window):
        seg = slice(start, start + window)
        state = boundary.begin_segment(state)
        loss, state = core(inputs[seg], targets[seg], state)
        oracle.remaining = (inputs[start + window :], targets[start + window :])
        boundary.end_segment(loss, state)
    for got, want in zip([p.grad for p in core.parameters()], full):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plain_truncation_differs_from_full_bptt():
    """The control: without the synthetic gradient (M = 0) truncation loses the gradient beyond each window."""
    inputs, targets = sequence()
    core = randomise_(Core(), 0.5)
    full = torch.autograd.grad(core(inputs, targets, initial_state())[0], list(core.parameters()))
    boundary = TruncationDNI(SyntheticGradient(2 * HIDDEN).double())  # zero-initialised: predicts 0
    state = initial_state()
    for start in range(0, 12, 3):
        state = boundary.begin_segment(state)
        loss, state = core(inputs[start : start + 3], targets[start : start + 3], state)
        boundary.end_segment(loss, state)
    assert not torch.allclose(core.cell.weight_hh.grad, full[1])


def test_sg_is_regressed_onto_the_bootstrapped_target():
    inputs, targets = sequence(6)
    core = randomise_(Core(), 0.5)
    sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
    boundary = TruncationDNI(sg, gradient_scale=2.0, loss_weight=0.5)
    state = boundary.begin_segment(initial_state())
    loss, s1 = core(inputs[:3], targets[:3], state)
    boundary.end_segment(loss, s1)
    sg.zero_grad()

    state = boundary.begin_segment(s1)
    loss, s2 = core(inputs[3:], targets[3:], state)
    synthetic = boundary.end_segment(loss, s2)

    # The target for M(s1): segment 2's true gradient plus M(s2) / scale pushed back through it.
    leaf = flatten_state(s1).detach().requires_grad_()
    loss_again, s2_again = core(inputs[3:], targets[3:], unflatten_state(leaf, s1))
    surrogate = loss_again + (flatten_state(s2_again) * synthetic).sum()
    target = torch.autograd.grad(surrogate, leaf)[0]
    prediction = sg(leaf.detach())
    explicit = 0.5 * (prediction - 2.0 * target).pow(2).sum(1).mean()
    expected = torch.autograd.grad(explicit, list(sg.parameters()))
    for got, want in zip([p.grad for p in sg.parameters()], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boundary.last_sg_loss, explicit.detach(), rtol=1e-12, atol=1e-12)


def test_nn_lstm_states_with_batch_on_dim_1():
    lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=2).double()
    sg = randomise_(SyntheticGradient(2 * 2 * HIDDEN).double(), 0.1)
    boundary = TruncationDNI(sg, batch_dim=1)
    state = (torch.zeros(2, BATCH, HIDDEN, dtype=F64), torch.zeros(2, BATCH, HIDDEN, dtype=F64))
    flat = flatten_state(state, batch_dim=1)
    assert flat.shape == (BATCH, 4 * HIDDEN)
    roundtrip = unflatten_state(flatten_state((state[0] + 1, state[1] - 1), 1), state, 1)
    assert torch.equal(roundtrip[0], state[0] + 1) and torch.equal(roundtrip[1], state[1] - 1)
    inputs, _ = sequence(6)
    for start in (0, 3):
        state = boundary.begin_segment(state)
        out, state = lstm(inputs[start : start + 3], state)
        boundary.end_segment(out.pow(2).mean(), state)
    assert all(p.grad is not None for p in lstm.parameters()) and sg.layers[0].weight.grad is not None


def test_eval_mode_is_the_identity():
    boundary = TruncationDNI(SyntheticGradient(2 * HIDDEN).double()).eval()
    state = initial_state()
    assert boundary.begin_segment(state) is state


def test_bad_inputs_are_named():
    boundary = TruncationDNI(SyntheticGradient(2 * HIDDEN).double())
    with pytest.raises(ValueError, match="state: tensors disagree on the batch size"):
        flatten_state((torch.zeros(4, 5), torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="batch_dim=2 is out of range"):
        flatten_state(torch.zeros(4, 5), batch_dim=2)
    with pytest.raises(TypeError, match="state"):
        flatten_state(())
    with pytest.raises(ValueError, match="h: expected shape"):
        boundary.begin_segment(torch.zeros(BATCH, 3, dtype=F64))  # 3 features, the SG model has 10
    with pytest.raises(ValueError, match="synthetic_gradient: returned shape"):
        TruncationDNI(nn.Linear(2 * HIDDEN, 3).double()).begin_segment(initial_state())
    with pytest.raises(ValueError, match="loss: expected a scalar"):
        boundary.end_segment(torch.zeros(3, dtype=F64), initial_state())
    with pytest.raises(ValueError, match="gradient_scale"):
        TruncationDNI(SyntheticGradient(4), gradient_scale=0)
