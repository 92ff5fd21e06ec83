"""fastdni.nn.DecoupledSequential: oracle == backprop, update order, SG targets, cDNI, conv, modes, state."""
from __future__ import annotations

import copy
import math
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import ConvSyntheticGradient, DecoupledSequential, StepResult, SyntheticGradient
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CLASSES = 3


def mlp_blocks() -> list[nn.Module]:
    return [
        nn.Sequential(nn.Linear(6, 10), nn.Tanh()).double(),
        nn.Sequential(nn.Linear(10, 8), nn.ReLU()).double(),
        nn.Linear(8, CLASSES).double(),
    ]


def batches(n_steps: int, batch: int = 16):
    return [(torch.randn(batch, 6, dtype=F64), torch.randint(0, CLASSES, (batch,))) for _ in range(n_steps)]


def params_of(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def assert_all_equal(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or dict(rtol=0, atol=0)))


OPTIMIZERS = {
    "sgd_nesterov": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, foreach=False),
    "sgd_momentum_wd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-3, foreach=False),
    "adam": functools.partial(torch.optim.Adam, lr=0.01, foreach=False),
    "adamw": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.05, foreach=False),
}


class CurrentBatch:
    target = None


class OracleSG(nn.Module):
    """A parameterless SG model that returns the true dL/dh: it runs the blocks above (with their
    current parameters) and the loss, and differentiates w.r.t. h. The blocks are kept in a tuple
    so that they are not registered as submodules (the SG must have no parameters)."""

    def __init__(self, blocks_above, loss_fn, batch: CurrentBatch, scale: float = 1.0):
        super().__init__()
        self.blocks_above = tuple(blocks_above)
        self.loss_fn, self.batch, self.scale = loss_fn, batch, scale

    def forward(self, h):
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            out = h
            for block in self.blocks_above:
                out = block(out)
            (grad,) = torch.autograd.grad(self.loss_fn(out, self.batch.target), h)
        return grad * self.scale if self.scale != 1.0 else grad


@pytest.mark.parametrize(
    "optimizer, gradient_scale", [(name, 1.0) for name in OPTIMIZERS] + [("sgd_nesterov", 16.0), ("adam", 16.0)]
)
def test_oracle_sgs_train_exactly_like_backprop(optimizer, gradient_scale):
    """With SGs that return the true gradient (times the scale: a power of two, so that dividing
    it out is exact) DNI training is backprop training, bit for bit in fp64."""
    factory = OPTIMIZERS[optimizer]
    blocks = mlp_blocks()
    reference = nn.Sequential(*copy.deepcopy(blocks))
    ref_opt = factory(reference.parameters())
    current = CurrentBatch()
    oracles = [OracleSG(blocks[i + 1 :], F.cross_entropy, current, gradient_scale) for i in range(len(blocks) - 1)]
    model = DecoupledSequential(blocks, oracles, optimizer=factory, gradient_scale=gradient_scale)
    assert model.sg_optimizers == [None, None]
    for x, y in batches(4):
        current.target = y
        result = model.train_step(x, y, F.cross_entropy)
        ref_opt.zero_grad()
        ref_out = reference(x)
        ref_loss = F.cross_entropy(ref_out, y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=0, atol=0)
        torch.testing.assert_close(result.output, ref_out.detach(), rtol=0, atol=0)
        assert_all_equal(params_of(model.blocks), params_of(reference))
    assert not torch.equal(params_of(model.blocks)[0], params_of(copy.deepcopy(mlp_blocks()))[0])


def test_backprop_mode_is_ordinary_backprop_and_leaves_the_sgs_alone():
    factory = OPTIMIZERS["adam"]
    blocks = mlp_blocks()
    reference = nn.Sequential(*copy.deepcopy(blocks))
    ref_opt = factory(reference.parameters())
    sgs = [randomise_(SyntheticGradient(10).double()), randomise_(SyntheticGradient(8, (4,)).double())]
    sg_before = params_of(sgs)
    model = DecoupledSequential(blocks, sgs, optimizer=factory, mode="backprop")
    for x, y in batches(3):
        result = model.train_step(x, y, F.cross_entropy)
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        assert result.sg_losses == ()
        torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=0, atol=0)
        assert_all_equal(params_of(model.blocks), params_of(reference))
    assert_all_equal(params_of(sgs), sg_before)
    assert all(p.grad is None for p in model.parameters())
    # switching to dni afterwards is allowed since SGs were given
    model.mode = "dni"
    assert len(model.train_step(*batches(1)[0], F.cross_entropy).sg_losses) == 2


def test_backprop_mode_without_sgs():
    model = DecoupledSequential(mlp_blocks(), mode="backprop", optimizer=OPTIMIZERS["sgd_nesterov"])
    assert model.interfaces is None and model.sg_optimizers == []
    x, y = batches(1)[0]
    before = F.cross_entropy(model(x), y).item()
    for _ in range(20):
        model.train_step(x, y, F.cross_entropy)
    assert F.cross_entropy(model(x), y).item() < before
    with pytest.raises(ValueError, match="^mode: 'dni' needs synthetic_gradients"):
        model.mode = "dni"


def test_each_block_is_updated_before_the_next_one_runs():
    blocks = mlp_blocks()
    sgs = [randomise_(SyntheticGradient(10, (6,)).double()), randomise_(SyntheticGradient(8).double())]
    model = DecoupledSequential(blocks, sgs, optimizer=OPTIMIZERS["sgd_nesterov"], sg_targets="bootstrap")
    before = [params_of([b]) for b in blocks]
    sg_before = [params_of([s]) for s in sgs]
    seen = []

    def hook(index, module, args):
        changed = [not all(torch.equal(a, b) for a, b in zip(params_of([blk]), before[j])) for j, blk in enumerate(blocks)]
        sg_changed = [not all(torch.equal(a, b) for a, b in zip(params_of([s]), sg_before[j])) for j, s in enumerate(sgs)]
        seen.append((index, changed, sg_changed))

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(functools.partial(hook, i))
    x, y = batches(1)[0]
    model.train_step(x, y, F.cross_entropy)
    # When block i runs, exactly blocks 0..i-1 have been updated, and SGs 0..i-2 (SG i-1 is
    # regressed onto the gradient that block i sends back, so it steps after block i).
    assert seen == [
        (0, [False, False, False], [False, False]),
        (1, [True, False, False], [False, False]),
        (2, [True, True, False], [True, False]),
    ]
    assert all(not all(torch.equal(a, b) for a, b in zip(params_of([m]), p)) for m, p in zip([*blocks, *sgs], [*before, *sg_before]))
    assert all(p.grad is None for p in model.parameters())  # every optimizer stepped and zeroed


def random_sgs_and_batch(context: bool):
    """The two random SG models of mlp_blocks' interfaces (with the label as context for cDNI) and a batch."""
    classes = CLASSES if context else 0
    sgs = [
        randomise_(SyntheticGradient(10, (7,), context_features=classes).double()),
        randomise_(SyntheticGradient(8, context_features=classes).double()),
    ]
    x, y = batches(1)[0]
    return sgs, x, y, (y if context else None)


def true_interface_gradients(blocks, x, y):
    """dL/dh at the output of every block but the last, by plain backprop."""
    outputs, h = [], x
    for block in blocks:
        h = block(h)
        outputs.append(h)
    return list(torch.autograd.grad(F.cross_entropy(h, y), outputs[:-1]))


def manual_dni_step(blocks, sgs, x, y, context, lr, sg_loss_weight, scale, true_targets=False):
    """One DNI step of DecoupledSequential, by hand with autograd, for plain SGD (``true_targets``: every SG
    regressed onto the true gradient, ``sg_targets="true"``)."""
    true = true_interface_gradients(blocks, x, y) if true_targets else None

    def sg_of(i, h):
        return sgs[i](h) if context is None else sgs[i](h, context)

    def sg_grads(i, h, target):
        loss = sg_loss_weight * (sg_of(i, h.detach()) - target).pow(2).sum(1).mean()
        return loss.detach(), torch.autograd.grad(loss, list(sgs[i].parameters()))

    inputs, block_grads, targets = [x], [], []
    for i, block in enumerate(blocks):
        h_in = inputs[-1].detach().requires_grad_()
        out = block(h_in)
        if i < len(blocks) - 1:
            grad_out = sg_of(i, out.detach()).detach() / scale
        else:
            loss = F.cross_entropy(out, y)
            (grad_out,) = torch.autograd.grad(loss, out, retain_graph=True)
        grads = torch.autograd.grad(out, [h_in, *block.parameters()], grad_out)
        block_grads.append(grads[1:])
        if i > 0:
            targets.append(grads[0])  # the gradient sent back to SG i-1: bootstrapped or true
        inputs.append(out.detach())
    if true is not None:
        targets = true
    sg_results = [sg_grads(i, inputs[i + 1], scale * targets[i]) for i in range(len(sgs))]
    with torch.no_grad():
        expected_blocks = [p - lr * g for block, gs in zip(blocks, block_grads) for p, g in zip(block.parameters(), gs)]
        expected_sgs = [p - lr * g for sg, (_, gs) in zip(sgs, sg_results) for p, g in zip(sg.parameters(), gs)]
    return loss.detach(), expected_blocks, expected_sgs, [loss for loss, _ in sg_results], targets


@pytest.mark.parametrize("gradient_scale", [1.0, 16.0])
@pytest.mark.parametrize("context", [False, True], ids=["dni", "cdni"])
def test_one_dni_step_against_manual_computation(context, gradient_scale, check_close):
    lr, weight = 0.1, 0.5
    blocks = mlp_blocks()
    sgs, x, y, c = random_sgs_and_batch(context)
    context_before = [s.context_weight.detach().clone() for s in sgs] if context else []
    loss, expected_blocks, expected_sgs, sg_losses, targets = manual_dni_step(
        copy.deepcopy(blocks), copy.deepcopy(sgs), x, y, c, lr, weight, gradient_scale
    )
    # the top target is the true gradient, the lower one a bootstrapped (different) one
    h = x
    for block in blocks[:2]:
        h = block(h).detach()
    h.requires_grad_()
    (true_top,) = torch.autograd.grad(F.cross_entropy(blocks[2](h), y), h)
    check_close(targets[1], true_top)
    assert targets[0].shape == (16, 10) and targets[0].abs().max() > 0

    sgd = functools.partial(torch.optim.SGD, lr=lr)
    model = DecoupledSequential(blocks, sgs, optimizer=sgd, sg_loss_weight=weight, gradient_scale=gradient_scale,
                                sg_targets="bootstrap")
    assert [(i.loss_weight, i.gradient_scale) for i in model.interfaces] == [(weight, gradient_scale)] * 2
    result = model.train_step(x, y, F.cross_entropy, context=c)
    assert isinstance(result, StepResult)
    check_close(result.loss, loss)
    check_close(params_of(model.blocks), expected_blocks)
    check_close(params_of(sgs), expected_sgs)
    assert len(result.sg_losses) == 2
    check_close(list(result.sg_losses), sg_losses)
    if context:  # the label context weights were trained too (their expected values are above)
        for sg, before in zip(sgs, context_before):
            assert not torch.equal(sg.context_weight.detach(), before)


@pytest.mark.parametrize("context", [False, True], ids=["dni", "cdni"])
def test_true_sg_targets_regress_every_sg_onto_the_true_gradient(context, check_close):
    lr, weight, scale = 0.1, 0.5, 16.0
    blocks = [nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh()).double(), *mlp_blocks()[1:]]
    sgs, x, y, c = random_sgs_and_batch(context)
    loss, expected_blocks, expected_sgs, sg_losses, _ = manual_dni_step(
        copy.deepcopy(blocks), copy.deepcopy(sgs), x, y, c, lr, weight, scale, true_targets=True)
    _, bootstrap_blocks, bootstrap_sgs, _, _ = manual_dni_step(
        copy.deepcopy(blocks), copy.deepcopy(sgs), x, y, c, lr, weight, scale)
    model = DecoupledSequential(blocks, sgs, optimizer=functools.partial(torch.optim.SGD, lr=lr), sg_loss_weight=weight,
                                gradient_scale=scale, sg_targets="true")
    expected_running = 0.9 * blocks[0][1].running_mean + 0.1 * blocks[0][0](x).mean(0).detach()
    result = model.train_step(x, y, F.cross_entropy, context=c)
    check_close(result.loss, loss)
    check_close(params_of(model.blocks), expected_blocks)  # the blocks learn from their SGs, as with bootstrapping
    check_close(params_of(model.blocks), bootstrap_blocks)
    check_close(params_of(sgs), expected_sgs)
    check_close(list(result.sg_losses), sg_losses)
    # the bottom SG's true target differs from its bootstrapped one; the top one's is the same
    assert not torch.allclose(params_of([sgs[0]])[0], bootstrap_sgs[0])
    # one forward per step: the BatchNorm's running statistics moved once
    check_close(blocks[0][1].running_mean, expected_running)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="sg_targets"):
        DecoupledSequential(mlp_blocks(), None, sg_targets="oracle")


def test_cdni_trains_with_label_context():
    torch.manual_seed(3)
    blocks = [
        nn.Sequential(nn.Linear(6, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, CLASSES),
    ]
    sgs = [SyntheticGradient(16, (16,), context_features=CLASSES), SyntheticGradient(16, context_features=CLASSES)]
    context_before = [s.context_weight.detach().clone() for s in sgs]
    model = DecoupledSequential(blocks, sgs, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    proj = torch.randn(6, CLASSES)
    x = torch.randn(256, 6)
    y = (x @ proj).argmax(1)
    losses = []
    for _ in range(150):
        idx = torch.randint(0, 256, (32,))
        result = model.train_step(x[idx], y[idx], F.cross_entropy, context=y[idx])
        losses.append(result.loss.item())
        assert all(torch.isfinite(loss) for loss in result.sg_losses)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    for sg, before in zip(sgs, context_before):
        assert not torch.equal(sg.context_weight.detach(), before)  # the label context is learned
    with pytest.raises(ValueError, match="^context: the SG model is conditioned"):
        model.train_step(x[:4], y[:4], F.cross_entropy)


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def test_conv_blocks_with_conv_sgs_reduce_the_loss():
    torch.manual_seed(4)
    n, size = 256, 8
    y = torch.randint(0, 2, (n,))
    x = torch.randn(n, 1, size, size) * 0.5
    x[y == 1, :, :, : size // 2] += 1.0  # class 1: bright left half
    x[y == 0, :, :, size // 2 :] += 1.0  # class 0: bright right half
    blocks = [conv_block(1, 4), conv_block(4, 4), nn.Sequential(nn.Flatten(), nn.Linear(4 * size * size, 2))]
    sgs = [ConvSyntheticGradient(4, (4,), 3, context_features=2), ConvSyntheticGradient(4, (), 3, context_features=2)]
    lower_before = params_of(blocks[:2])
    model = DecoupledSequential(blocks, sgs, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    losses = []
    for _ in range(60):
        idx = torch.randint(0, n, (32,))
        losses.append(model.train_step(x[idx], y[idx], F.cross_entropy, context=y[idx]).loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert not all(torch.equal(a, b) for a, b in zip(params_of(blocks[:2]), lower_before))  # SGs drive the lower blocks
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_optimizer_state_dict_round_trip():
    def build(seed):
        torch.manual_seed(seed)
        blocks = [nn.Sequential(nn.Linear(6, 10), nn.Tanh()).double(), nn.ReLU(), nn.Linear(10, CLASSES).double()]
        sgs = [randomise_(SyntheticGradient(10, (5,)).double()), randomise_(SyntheticGradient(10).double())]
        return DecoupledSequential(
            blocks, sgs, optimizer=OPTIMIZERS["adam"], sg_optimizer=OPTIMIZERS["sgd_nesterov"]
        )

    data = batches(5)
    a = build(0)
    for x, y in data[:3]:
        a.train_step(x, y, F.cross_entropy)
    state = a.optimizer_state_dict()
    assert set(state) == {"blocks", "synthetic_gradients"}
    assert state["blocks"][1] is None and state["blocks"][0]["state"][0]["step"] == 3
    assert len(state["synthetic_gradients"]) == 2 and "momentum_buffer" in state["synthetic_gradients"][0]["state"][0]
    assert isinstance(a.optimizers[0], torch.optim.Adam) and isinstance(a.sg_optimizers[0], torch.optim.SGD)

    b = build(1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    b.load_optimizer_state_dict(copy.deepcopy(state))
    fresh = build(1)
    fresh.load_state_dict(copy.deepcopy(a.state_dict()))  # same weights, but no optimizer state
    for x, y in data[3:]:
        a.train_step(x, y, F.cross_entropy)
        b.train_step(x, y, F.cross_entropy)
        fresh.train_step(x, y, F.cross_entropy)
    assert_all_equal(params_of([b]), params_of([a]))
    assert not all(torch.equal(p, q) for p, q in zip(params_of([fresh]), params_of([a])))

    with pytest.raises(ValueError, match="^state: expected 3 optimizer states under 'blocks'"):
        b.load_optimizer_state_dict({"synthetic_gradients": state["synthetic_gradients"]})
    with pytest.raises(ValueError, match="^state: expected 2 optimizer states under 'synthetic_gradients'"):
        b.load_optimizer_state_dict({"blocks": state["blocks"], "synthetic_gradients": state["synthetic_gradients"][:1]})


def test_default_optimizer_and_plain_forward(check_close):
    blocks = mlp_blocks()
    model = DecoupledSequential(blocks, [SyntheticGradient(10).double(), SyntheticGradient(8).double()])
    assert model.mode == "dni"
    for opt in (*model.optimizers, *model.sg_optimizers):
        assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    x = torch.randn(4, 6, dtype=F64)
    check_close(model(x), blocks[2](blocks[1](blocks[0](x))))
    assert [(i.loss_weight, i.gradient_scale) for i in model.interfaces] == [(1.0, 1.0)] * 2


@pytest.mark.parametrize("container", ["sequential", "fused"])
def test_head_optimizer_builds_the_last_blocks_optimizer(container):
    """The classifier learns from the true gradient; its optimizer can differ from the blocks' under SGs."""
    slow, fast = functools.partial(torch.optim.Adam, lr=1e-4), functools.partial(torch.optim.SGD, lr=0.5)
    if container == "sequential":
        model = DecoupledSequential(mlp_blocks(), [SyntheticGradient(10).double(), SyntheticGradient(8).double()],
                                    optimizer=slow, head_optimizer=fast)
        head = model.blocks[-1]
    else:
        from fastdni.nn import DecoupledMLP
        model = DecoupledMLP(6, (10, 8), 3, optimizer=slow, head_optimizer=fast)
        head = model.layers[-1]
    *below, top = model.optimizers
    assert isinstance(top, torch.optim.SGD) and top.defaults["lr"] == 0.5
    assert {p for g in top.param_groups for p in g["params"]} == set(head.parameters())
    assert all(isinstance(o, torch.optim.Adam) and o.defaults["lr"] == 1e-4 for o in below)
    assert all(isinstance(o, torch.optim.Adam) and o.defaults["lr"] == 1e-4 for o in model.sg_optimizers)


def test_step_result_and_zero_initialised_sgs():
    blocks = mlp_blocks()
    model = DecoupledSequential(blocks, [SyntheticGradient(10, (4,)).double(), SyntheticGradient(8).double()])
    before = [params_of([b]) for b in blocks]
    x, y = batches(1)[0]
    result = model.train_step(x, y, F.cross_entropy)
    assert result.output.shape == (16, CLASSES)
    assert not result.loss.requires_grad and not result.output.requires_grad
    assert all(loss.dim() == 0 and not loss.requires_grad for loss in result.sg_losses)
    assert result.sg_losses[1] > 0  # the top SG predicted 0 for a non-zero true gradient
    # Zero-initialised SGs predict 0, so on the first step (Adam) the lower blocks do not move.
    after = [params_of([b]) for b in blocks]
    assert_all_equal(after[0], before[0])
    assert_all_equal(after[1], before[1])
    assert not torch.equal(after[2][0], before[2][0])


def test_decoupled_sequential_argument_errors():
    sgs = [SyntheticGradient(10), SyntheticGradient(8)]
    with pytest.raises(ValueError, match=r"^synthetic_gradients: expected one SG model per block but the last \(2\), got 3"):
        DecoupledSequential(mlp_blocks(), sgs + [SyntheticGradient(3)])
    with pytest.raises(ValueError, match=r"^synthetic_gradients: .* got 1"):
        DecoupledSequential(mlp_blocks(), sgs[:1])
    with pytest.raises(ValueError, match=r"^mode: expected one of \('dni', 'backprop'\), got 'sgd'"):
        DecoupledSequential(mlp_blocks(), sgs, mode="sgd")
    with pytest.raises(ValueError, match="^mode: 'dni' needs synthetic_gradients"):
        DecoupledSequential(mlp_blocks())
    with pytest.raises(ValueError, match="^blocks: expected a non-empty sequence of nn.Module"):
        DecoupledSequential([], mode="backprop")
    with pytest.raises(ValueError, match="^blocks: expected a non-empty sequence of nn.Module"):
        DecoupledSequential([nn.Linear(2, 2), torch.relu], [SyntheticGradient(2)])
    with pytest.raises(ValueError, match="^loss_weight: expected a number > 0"):
        DecoupledSequential(mlp_blocks(), sgs, sg_loss_weight=0.0)
    with pytest.raises(ValueError, match="^gradient_scale: expected a number > 0"):
        DecoupledSequential(mlp_blocks(), sgs, gradient_scale=-1.0)
    model = DecoupledSequential(mlp_blocks(), sgs)
    with pytest.raises(ValueError, match="^mode: expected one of"):
        model.mode = "DNI"
    assert model.mode == "dni"


def test_sg_alignment_against_the_true_gradient(check_close):
    """An oracle SG (the true gradient times the scale) aligns exactly; a fresh, zero-initialised SG predicts
    nothing (nan cosine, ratio 0); a half-and-half SG sits in between. Nothing is accumulated or stepped and
    BatchNorm's running statistics stay as they were."""
    blocks = [nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU()).double(),
              nn.Sequential(nn.Linear(10, 8), nn.ReLU()).double(), nn.Linear(8, CLASSES).double()]
    current = CurrentBatch()
    x, y = batches(1)[0]
    current.target = y
    model = DecoupledSequential(blocks, [OracleSG(blocks[1:], F.cross_entropy, current, 16.0),
                                         SyntheticGradient(8).double()], gradient_scale=16.0)
    buffers = [b.clone() for b in model.buffers()]
    oracle, fresh = model.sg_alignment(x, y, F.cross_entropy)
    assert abs(oracle.cosine - 1) < 1e-12 and abs(oracle.norm_ratio - 1) < 1e-12 and oracle.dropped_norm > 0
    assert math.isnan(fresh.cosine) and fresh.norm_ratio == 0
    assert all(p.grad is None for p in model.parameters())
    assert_all_equal(list(model.buffers()), buffers)
    assert model.training

    # The top SG fitted to a mix: half the true gradient, half a fixed other direction of the same norm.
    h = blocks[1](blocks[0](x)).detach().requires_grad_()
    (true,) = torch.autograd.grad(F.cross_entropy(blocks[2](h), y), h)
    other = torch.randn_like(true)
    other = other - (other * true).sum() / true.square().sum() * true  # orthogonal to the true gradient
    other = other * true.norm() / other.norm()

    class Fixed(nn.Module):
        def forward(self, h):
            return 16.0 * (true + other) / 2

    model.interfaces[1].synthetic_gradient = Fixed()
    model.eval()
    _, mixed = model.sg_alignment(x, y, F.cross_entropy)
    check_close(torch.tensor(mixed.cosine, dtype=F64), torch.tensor(0.5 ** 0.5, dtype=F64))
    check_close(torch.tensor(mixed.norm_ratio, dtype=F64), torch.tensor(0.5 ** 0.5, dtype=F64))
    assert not model.training  # the mode is restored
    with pytest.raises(ValueError, match="^sg_alignment: the model has no synthetic gradients"):
        DecoupledSequential(mlp_blocks(), None, mode="backprop").sg_alignment(x, y, F.cross_entropy)


def test_sg_alignment_on_feature_maps():
    """Conv blocks: the alignment is reduced over every dim of a [B, C, H, W] map (a perfect SG gives 1)."""
    blocks = [nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()).double(),
              nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, CLASSES)).double()]
    current = CurrentBatch()
    x, y = torch.randn(4, 1, 5, 5, dtype=F64), torch.randint(0, CLASSES, (4,))
    current.target = y
    model = DecoupledSequential(blocks, [OracleSG(blocks[1:], F.cross_entropy, current, 4.0)], gradient_scale=4.0)
    (alignment,) = model.sg_alignment(x, y, F.cross_entropy)
    assert abs(alignment.cosine - 1) < 1e-12 and abs(alignment.norm_ratio - 1) < 1e-12
