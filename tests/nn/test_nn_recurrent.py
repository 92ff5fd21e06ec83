"""TruncationDNI: with a perfect SG, truncated BPTT gives the full-BPTT gradient; bootstrapped targets; states."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import SyntheticGradient, TruncationDNI, flatten_state, sg_alignment, truncation_windows, unflatten_state
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


@pytest.mark.parametrize("sg_lambda", [0.6, 1.0])
def test_sg_lambda_regresses_onto_the_two_segment_return(sg_lambda):
    """fp64: with sg_lambda, M at a boundary a is regressed one segment late onto the gradient of
    L_ab + (1 - lambda) <beta(b), b> + lambda (L_bc + <beta(c), c>), beta = bootstrap * M / scale: the
    lambda-return over the two segments that follow a (with lambda = 1, their true gradient plus the bootstrap)."""
    inputs, targets = sequence(6)
    core = randomise_(Core(), 0.5)
    sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
    boundary = TruncationDNI(sg, gradient_scale=2.0, loss_weight=0.5, sg_scale=0.25, bootstrap=0.5, calibrate=False,
                             sg_lambda=sg_lambda)
    start = (torch.randn(BATCH, HIDDEN, dtype=F64), torch.randn(BATCH, HIDDEN, dtype=F64))
    state = boundary.begin_segment(start)
    loss, s1 = core(inputs[:3], targets[:3], state)
    boundary.end_segment(loss, s1, segment=lambda s: core(inputs[:3], targets[:3], s)[1])
    assert all(p.grad is None for p in sg.parameters())  # a's regression waits for the next segment
    state = boundary.begin_segment(s1)
    loss, s2 = core(inputs[3:], targets[3:], state)
    boundary.end_segment(loss, s2, segment=lambda s: core(inputs[3:], targets[3:], s)[1])

    leaf = flatten_state(start).detach().requires_grad_()
    loss_ab, b = core(inputs[:3], targets[:3], unflatten_state(leaf, start))
    loss_bc, c = core(inputs[3:], targets[3:], b)
    beta = lambda s: 0.5 * sg(flatten_state(s).detach()).detach() / 2.0  # noqa: E731
    surrogate = (loss_ab + (1 - sg_lambda) * (flatten_state(b) * beta(b)).sum()
                 + sg_lambda * (loss_bc + (flatten_state(c) * beta(c)).sum()))
    target = torch.autograd.grad(surrogate, leaf)[0]
    explicit = 0.5 * (sg(leaf.detach()) - 2.0 * target).pow(2).sum(1).mean()
    expected = torch.autograd.grad(explicit, list(sg.parameters()))
    for got, want in zip([p.grad for p in sg.parameters()], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boundary.last_sg_loss, explicit.detach(), rtol=1e-12, atol=1e-12)


def test_sg_lambda_needs_the_segment_and_flushes_at_a_final_segment():
    inputs, targets = sequence(3)
    core = randomise_(Core(), 0.5)
    sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
    boundary = TruncationDNI(sg, calibrate=False, sg_lambda=1.0)
    start = (torch.randn(BATCH, HIDDEN, dtype=F64), torch.randn(BATCH, HIDDEN, dtype=F64))
    loss, end = core(inputs, targets, boundary.begin_segment(start))
    with pytest.raises(ValueError, match="segment"):
        boundary.end_segment(loss, end)
    with pytest.raises(ValueError, match="sg_lambda"):
        TruncationDNI(sg, sg_lambda=1.5)
    # A final segment: nothing follows, so M at its start is regressed at once onto the segment's own gradient.
    loss, end = core(inputs, targets, boundary.begin_segment(start))
    boundary.end_segment(loss, end, final=True, segment=lambda s: core(inputs, targets, s)[1])
    leaf = flatten_state(start).detach().requires_grad_()
    target = torch.autograd.grad(core(inputs, targets, unflatten_state(leaf, start))[0], leaf)[0]
    explicit = (sg(leaf.detach()) - target).pow(2).sum(1).mean()
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
    # cuDNN's LSTM takes only contiguous hx and cx (a strided slice of the flat state raised on CUDA)
    assert all(part.is_contiguous() for part in roundtrip)
    assert all(part.is_contiguous() for part in boundary.begin_segment(state))
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


# DNI+Aux, final segments, the output scaling and the truncation windows.


class StepCore(Core):
    """:class:`Core` that also returns every step's hidden output (the DNI+Aux inputs)."""

    def forward(self, inputs, targets, state):
        loss, outputs = inputs.new_zeros(()), []
        for x, y in zip(inputs, targets):
            state = self.cell(x, state)
            outputs.append(state[0])
            loss = loss + F.mse_loss(self.readout(state[0]), y, reduction="sum")
        return loss, state, outputs


def aux_boundary(aux_weight, seed=1, **kwargs):
    torch.manual_seed(seed)
    sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
    aux = randomise_(nn.Linear(HIDDEN, 2 * HIDDEN).double(), 0.2)
    return TruncationDNI(sg, aux_predictor=aux, aux_weight=aux_weight, **{"calibrate": False, **kwargs})


def train_segments(core, boundary, windows=((0, 3), (3, 6), (6, 8)), aux=True):
    """Two or more segments of truncated BPTT; the last one ``final``. Returns the synthetic gradients."""
    inputs, targets = sequence(8)
    state, given = initial_state(), []
    for i, (start, stop) in enumerate(windows):
        state = boundary.begin_segment(state)
        loss, state, outputs = core(inputs[start:stop], targets[start:stop], state)
        given.append(boundary.end_segment(loss, state, aux_inputs=outputs if aux else None, final=i == len(windows) - 1))
    return given


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_aux_loss_reaches_the_core_and_not_the_sg_target():
    """The aux loss reaches the aux predictor and the core (they differ from plain DNI, aux_weight=0), but not the
    SG model's regression target at the next boundary: the SG's gradients are plain DNI's, unless
    ``aux_in_target=True``, where they differ."""
    results = {}
    for weight, in_target in ((0.0, False), (0.7, False), (0.7, True)):
        torch.manual_seed(0)
        core = randomise_(StepCore(), 0.5)
        boundary = aux_boundary(weight, aux_in_target=in_target)
        train_segments(core, boundary)
        results[weight, in_target] = grads(core), grads(boundary.synthetic_gradient), grads(boundary.aux_predictor), boundary
    (core0, sg0, aux0, plain), (core1, sg1, aux1, with_aux) = results[0.0, False], results[0.7, False]
    assert all(g is None for g in aux0) and plain.last_aux_loss is None
    assert all(g is not None and g.abs().sum() > 0 for g in aux1) and float(with_aux.last_aux_loss) > 0
    assert not all(torch.allclose(a, b) for a, b in zip(core0, core1))
    for a, b in zip(sg0, sg1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sg_in_target = results[0.7, True][1]
    assert not all(torch.allclose(a, b) for a, b in zip(sg0, sg_in_target))


def test_aux_weight_zero_is_exactly_dni():
    runs = []
    for boundary_args in (dict(aux_weight=0.0), None):
        torch.manual_seed(0)
        core = randomise_(StepCore(), 0.5)
        if boundary_args is None:  # plain DNI: the same SG model, no aux predictor
            boundary = aux_boundary(0.0)
            boundary.aux_predictor = None
        else:
            boundary = aux_boundary(**boundary_args)
        given = train_segments(core, boundary, aux=boundary.aux_predictor is not None)
        runs.append((grads(core), grads(boundary.synthetic_gradient), given, boundary.last_sg_loss))
    (core_a, sg_a, given_a, loss_a), (core_b, sg_b, given_b, loss_b) = runs
    for a, b in zip(core_a + sg_a + given_a, core_b + sg_b + given_b):
        assert torch.equal(a, b)
    assert torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("aux_in_target", [False, True])
@pytest.mark.parametrize("bootstrap", [0.25, 1.0, 0.6, 0.0])
def test_aux_gradients_match_the_explicit_objective(bootstrap, aux_in_target):
    """One non-final segment in fp64: core, aux predictor and SG gradients equal those of the written-out
    objective loss + <s_end, sg_scale M(s_end)/scale> + w mean_{j,b} ||P(o_j) - M(s_end)||^2, and the SG at the
    start boundary is regressed onto the gradient of that objective with the bootstrap weight in place of
    sg_scale (the core learns from sg_scale * M; M's target bootstraps from bootstrap * M), without the aux term
    unless ``aux_in_target``."""
    inputs, targets = sequence(4)
    core = randomise_(StepCore(), 0.5)
    boundary = aux_boundary(0.3, gradient_scale=2.0, sg_scale=0.25, loss_weight=0.5, bootstrap=bootstrap,
                            aux_in_target=aux_in_target)
    sg, aux = boundary.synthetic_gradient, boundary.aux_predictor
    start = (torch.randn(BATCH, HIDDEN, dtype=F64), torch.randn(BATCH, HIDDEN, dtype=F64))
    loss, s_end, outputs = core(inputs, targets, boundary.begin_segment(start))
    given = boundary.end_segment(loss, s_end, aux_inputs=outputs)

    leaf = flatten_state(start).detach().requires_grad_()
    loss2, s_end2, outputs2 = core(inputs, targets, unflatten_state(leaf, start))
    flat_end = flatten_state(s_end2)
    m_end = sg(flat_end.detach()).detach()
    torch.testing.assert_close(given, 0.25 * m_end / 2.0, rtol=1e-12, atol=1e-12)
    predictions = aux(torch.stack(outputs2).reshape(-1, HIDDEN)).view(len(outputs2), BATCH, -1)
    aux_loss = 0.3 * (predictions - m_end).pow(2).sum() / (len(outputs2) * BATCH)
    objective = loss2 + (flat_end * (0.25 * m_end / 2.0)).sum() + aux_loss
    params = list(core.parameters()) + list(aux.parameters())
    *want, _ = torch.autograd.grad(objective, params + [leaf], retain_graph=True)
    target_objective = objective if aux_in_target else objective - aux_loss
    (arriving,) = torch.autograd.grad(target_objective + (flat_end * ((bootstrap - 0.25) * m_end / 2.0)).sum(), leaf)
    for got, expected in zip([p.grad for p in params], want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boundary.last_aux_loss, aux_loss.detach(), rtol=1e-12, atol=1e-12)
    regression = 0.5 * (sg(leaf.detach()) - 2.0 * arriving).pow(2).sum(1).mean()
    for got, expected in zip([p.grad for p in sg.parameters()], torch.autograd.grad(regression, list(sg.parameters()))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_final_segment_gets_no_synthetic_gradient_and_a_zero_aux_target():
    """Nothing lies beyond a final segment: its gradient is its loss plus the aux loss towards 0."""
    inputs, targets = sequence(3)
    core = randomise_(StepCore(), 0.5)
    boundary = aux_boundary(0.5)
    loss, state, outputs = core(inputs, targets, boundary.begin_segment(initial_state()))
    given = boundary.end_segment(loss, state, aux_inputs=outputs, final=True)
    assert torch.equal(given, torch.zeros_like(given))

    loss2, _, outputs2 = core(inputs, targets, initial_state())
    aux_loss = 0.5 * boundary.aux_predictor(torch.stack(outputs2).reshape(-1, HIDDEN)).pow(2).sum() / (3 * BATCH)
    torch.testing.assert_close(boundary.last_aux_loss, aux_loss.detach(), rtol=1e-12, atol=1e-12)
    task_only = torch.autograd.grad(loss2, list(core.cell.parameters()), retain_graph=True)
    for got, expected, plain in zip([p.grad for p in core.cell.parameters()],
                                    torch.autograd.grad(loss2 + aux_loss, list(core.cell.parameters())), task_only):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, plain)  # the aux loss did reach the LSTM cell


def test_dni_aux_with_nn_lstm_outputs():
    lstm = nn.LSTM(FEATURES, HIDDEN).double()
    boundary = TruncationDNI(randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.1), batch_dim=1,
                             aux_predictor=nn.Linear(HIDDEN, 2 * HIDDEN).double())
    state = (torch.zeros(1, BATCH, HIDDEN, dtype=F64), torch.zeros(1, BATCH, HIDDEN, dtype=F64))
    inputs, _ = sequence(6)
    for window in truncation_windows(6, 4):
        state = boundary.begin_segment(state)
        out, state = lstm(inputs[window], state)
        boundary.end_segment(out.pow(2).mean(), state, aux_inputs=out)  # out: [steps, B, H], time-major
    assert boundary.aux_predictor.weight.grad.abs().sum() > 0 and float(boundary.last_aux_loss) > 0


def test_truncation_windows():
    assert truncation_windows(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert truncation_windows(2, 5) == [slice(0, 2)]
    with pytest.raises(ValueError, match="truncation: expected an int >= 1, got 0"):
        truncation_windows(5, 0)
    with pytest.raises(ValueError, match="steps: expected a sequence of at least 1 step, got 0"):
        truncation_windows(0, 3)


def test_bad_aux_inputs_are_named():
    inputs, targets = sequence(3)
    core = StepCore()
    boundary = aux_boundary(0.5)
    loss, state, outputs = core(inputs, targets, initial_state())
    with pytest.raises(ValueError, match="aux_inputs: this boundary is DNI\\+Aux"):
        boundary.end_segment(loss, state)
    with pytest.raises(ValueError, match="aux_inputs: empty"):
        boundary.end_segment(loss, state, aux_inputs=[])
    with pytest.raises(ValueError, match="aux_inputs: empty"):
        boundary.end_segment(loss, state, aux_inputs=torch.zeros(0, BATCH, HIDDEN, dtype=F64))
    with pytest.raises(ValueError, match="aux_inputs: batch size 3 .* differs from the state's 4"):
        boundary.end_segment(loss, state, aux_inputs=torch.zeros(2, 3, HIDDEN, dtype=F64))
    with pytest.raises(ValueError, match="aux_inputs: the steps' outputs differ in shape"):
        boundary.end_segment(loss, state, aux_inputs=[outputs[0], outputs[1][:, :2]])
    with pytest.raises(TypeError, match="aux_inputs: expected torch.float64 on cpu, got torch.float32"):
        boundary.end_segment(loss, state, aux_inputs=[o.float() for o in outputs])
    with pytest.raises(ValueError, match="aux_predictor: returned shape"):
        TruncationDNI(SyntheticGradient(2 * HIDDEN).double(), aux_predictor=nn.Linear(HIDDEN, 3).double()).end_segment(
            loss, state, aux_inputs=outputs)
    with pytest.raises(ValueError, match="aux_inputs: given, but this boundary has no aux_predictor"):
        TruncationDNI(SyntheticGradient(2 * HIDDEN).double()).end_segment(loss, state, aux_inputs=outputs)
    with pytest.raises(ValueError, match="h: expected shape"):  # the end state must fit the SG model too
        boundary.end_segment(loss, (state[0][:, :3], state[1][:, :3]), aux_inputs=outputs)
    with pytest.raises(ValueError, match="aux_weight"):
        TruncationDNI(SyntheticGradient(4), aux_weight=-1)
    with pytest.raises(ValueError, match="sg_scale"):
        TruncationDNI(SyntheticGradient(4), sg_scale=0)


@pytest.mark.parametrize("calibrate", [False, True])
def test_sg_alignment_rises_when_the_future_gradient_is_predictable(calibrate):
    """A frozen tanh RNN whose only loss is at the end of each episode, 6 steps after the middle boundary:
    the gradient truncation drops there is a smooth function of the state (the future inputs are noise
    independent of it), so a linear SG regressed by TruncationDNI learns it: the diagnostic's cosine goes
    from undefined (M = 0) to well above 0, and the norm ratio towards 1 (the paper's SG). Calibrated, the
    direction is the same and the norm is the gain's share of it (< 1: the zero-state boundary's bootstrapped
    targets are the calibrated prediction, a discounted future)."""
    torch.manual_seed(0)
    cell = nn.RNNCell(3, 8).double().requires_grad_(False)
    readout = nn.Linear(8, 2).double().requires_grad_(False)
    boundary = TruncationDNI(SyntheticGradient(8).double(), gradient_scale=32, calibrate=calibrate)
    optimizer = torch.optim.Adam(boundary.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(1)

    def run(state, inputs):
        for x in inputs:
            state = cell(x, state)
        return state

    def episode():
        return torch.randn(12, 32, 3, generator=gen, dtype=F64), torch.randn(32, 2, generator=gen, dtype=F64)

    def end_loss(state, inputs, y):
        return 0.5 * (readout(run(state, inputs)) - y).pow(2).sum() / 32

    def middle_alignment():
        inputs, y = episode()
        with torch.no_grad():
            middle = run(torch.zeros(32, 8, dtype=F64), inputs[:6])
        return sg_alignment(boundary, middle, lambda s: end_loss(s, inputs[6:], y * 0))

    before = middle_alignment()
    for _ in range(300):
        inputs, y = episode()
        y = y * 0  # the target: 0, so the future gradient depends on the state alone (and the noise ahead)
        state = boundary.begin_segment(torch.zeros(32, 8, dtype=F64))
        middle = run(state, inputs[:6])
        boundary.end_segment(None, middle)
        state = boundary.begin_segment(middle)
        boundary.end_segment(end_loss(state, inputs[6:], y), run(state, inputs[6:]), final=True)
        optimizer.step()
        optimizer.zero_grad()
    after = middle_alignment()
    assert math.isnan(before.cosine) and before.norm_ratio == 0
    assert after.cosine > 0.6 and (0.1 if calibrate else 0.3) < after.norm_ratio < (1.0 if calibrate else 1.5)
