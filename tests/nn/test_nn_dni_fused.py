"""fastdni.nn.DNI given its SG optimizer: the SG predicted by fastdni.ops.sg_predict and regressed and stepped by
fastdni.ops.sg_regression_ (the fused path) trains exactly as the autograd path with the same optimizer stepped
after each backward; when it falls back to autograd, and why; decouple runs its vector interfaces fused and
steps each SG once; TruncationDNI's boundaries on the same path."""
from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdni.ops as ops
import fastdni.ops.api as api
from fastdni.nn import DNI, ConvSyntheticGradient, SyntheticGradient, TruncationDNI, decouple
from helpers import SmallNet, randomise_
from test_nn_recurrent import HIDDEN, StepCore, initial_state, sequence

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CLASSES = 4
STEPS = 30
BACKENDS = ["auto", "reference"]  # "auto" on CPU: the C++ kernels where built (else the fused path falls back)
OPTIMIZERS = {
    "Adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "AdamW": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    "SGD-nesterov": functools.partial(torch.optim.SGD, lr=0.005, momentum=0.9, nesterov=True, weight_decay=0.01),
}


class Net(nn.Module):
    """A user's model with a DNI on one activation: ``"map"``: a feature map [B, 3, 5, 5] under a linear SG;
    ``"vector"``: a vector [B, 9] under an MLP SG with the labels as context (cDNI); ``"float-context"``: the
    same with a float context."""

    def __init__(self, kind: str, optimizer, backend: str = "auto"):
        super().__init__()
        if kind == "map":
            self.below = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh())
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, CLASSES))
            sg = SyntheticGradient(3 * 5 * 5)
        else:
            self.below = nn.Sequential(nn.Linear(7, 9), nn.Tanh())
            self.head = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, CLASSES))
            sg = SyntheticGradient(9, (6,), context_features=CLASSES if kind == "vector" else 5)
        self.kind = kind
        self.double()
        randomise_(sg.double())  # a zero output layer predicts 0: random, so every term is exercised from step 1
        self.dni = DNI(sg, optimizer=optimizer, backend=backend)

    def batch(self, gen: torch.Generator):
        shape = (6, 2, 5, 5) if self.kind == "map" else (6, 7)
        x = torch.randn(*shape, generator=gen, dtype=F64)
        y = torch.randint(0, CLASSES, (6,), generator=gen)
        context = {"map": None, "vector": y, "float-context": torch.randn(6, 5, generator=gen, dtype=F64)}[self.kind]
        return x, y, context

    def forward(self, x, context):
        return self.head(self.dni(self.below(x), context))


def _train(kind: str, optimizer_name: str, fused: bool, backend: str = "auto", steps: int = STEPS):
    """``steps`` steps of a Net; the SG optimizer given to the DNI (fused) or stepped after each backward (autograd).
    Returns the SG losses, the SG parameters, the model's parameters and the SG optimizer."""
    torch.manual_seed(0)
    net = Net(kind, None, backend)
    sg = net.dni.synthetic_gradient
    sg_opt = OPTIMIZERS[optimizer_name](sg.parameters())
    if fused:
        net.dni.optimizer = sg_opt
    start = [p.detach().clone() for p in sg.parameters()]
    model_opt = torch.optim.SGD([*net.below.parameters(), *net.head.parameters()], lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y, context = net.batch(gen)
        F.cross_entropy(net(x, context), y).backward()
        assert net.dni.fused == fused, net.dni.fusion_blocker(x, context)
        model_opt.step()
        model_opt.zero_grad()
        if fused:
            assert all(p.grad is None for p in sg.parameters()), "the fused step leaves no .grad"
        else:
            sg_opt.step()
            sg_opt.zero_grad()
        losses.append(net.dni.last_sg_loss.detach().clone())
    # Guards the comparison against two idle runs: every SG parameter was stepped.
    assert all(not torch.equal(a, p) for a, p in zip(start, sg.parameters()))
    return (torch.stack(losses), [p.detach().clone() for p in sg.parameters()],
            [p.detach().clone() for p in [*net.below.parameters(), *net.head.parameters()]], sg_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["map", "vector", "float-context"])
def test_fused_equals_autograd_over_steps(kind, optimizer_name, backend):
    """Dozens of steps in fp64: the same SG losses, SG parameters, model parameters and optimizer state."""
    if backend == "auto" and not ops.HAS_CPU_KERNELS:
        pytest.skip("no C++ kernels: 'auto' falls back to autograd (test_fallback_conditions)")
    want_losses, want_sg, want_model, want_opt = _train(kind, optimizer_name, fused=False)
    got_losses, got_sg, got_model, got_opt = _train(kind, optimizer_name, fused=True, backend=backend)
    tol = dict(rtol=1e-10, atol=1e-12)  # 30 steps of rounding-order differences, compounded through the model
    torch.testing.assert_close(got_losses, want_losses, **tol)
    for i, (g, w) in enumerate(zip(got_sg, want_sg)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"SG parameter {i}: {m}", **tol)
    for i, (g, w) in enumerate(zip(got_model, want_model)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"model parameter {i}: {m}", **tol)
    got_state, want_state = got_opt.state_dict()["state"], want_opt.state_dict()["state"]
    assert got_state.keys() == want_state.keys()
    for key in want_state:
        for field in want_state[key]:
            torch.testing.assert_close(got_state[key][field], want_state[key][field], **tol)


def test_a_non_contiguous_activation():
    """h a permuted view (channels last): flattened by a copy, the same training as on the contiguous h."""

    class ChannelsLast(nn.Module):
        def forward(self, h):
            return h.permute(0, 2, 3, 1)  # [B, H, W, C], not contiguous

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        below = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), ChannelsLast()).double()
        head = nn.Sequential(nn.Flatten(), nn.Linear(75, CLASSES)).double()
        sg = randomise_(SyntheticGradient(75).double())
        opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
        dni = DNI(sg, optimizer=opt if fused else None)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            x, y = torch.randn(6, 2, 5, 5, generator=gen, dtype=F64), torch.randint(0, CLASSES, (6,), generator=gen)
            h = below(x)
            assert not h.is_contiguous()
            F.cross_entropy(head(dni(h)), y).backward()
            if not fused:
                opt.step()
                opt.zero_grad()
        assert dni.fused == fused
        results.append([p.detach() for p in [*sg.parameters(), *below.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_optimizer_factory_and_state():
    """A factory is called on the SG's parameters; after n fused steps Adam's step count is n (its state_dict is the
    one copy of the state)."""
    sg = SyntheticGradient(5).double()
    dni = DNI(sg, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    assert isinstance(dni.optimizer, torch.optim.Adam)
    assert {id(p) for p in dni.optimizer.param_groups[0]["params"]} == {id(p) for p in sg.parameters()}
    for _ in range(3):
        h = torch.randn(4, 5, dtype=F64, requires_grad=True)
        dni(h).sum().backward()
    assert dni.fused == ops.HAS_CPU_KERNELS
    if dni.fused:
        assert all(float(s["step"]) == 3 for s in dni.optimizer.state.values())
    assert "optimizer=Adam" in repr(dni)


def test_bad_optimizer_arguments():
    sg = SyntheticGradient(5)
    with pytest.raises(TypeError, match="^optimizer: expected a torch.optim.Optimizer, a factory of one, or None"):
        DNI(sg, optimizer=0.1)
    with pytest.raises(TypeError, match="^optimizer: the factory returned list"):
        DNI(sg, optimizer=list)
    with pytest.raises(ValueError, match="^backend: expected one of"):
        DNI(sg, optimizer=torch.optim.SGD(sg.parameters(), lr=0.1), backend="vulkan")


def test_last_sg_loss_and_divergence_watch_as_autograd():
    """A non-finite target: the same loss value and the same one warning on both paths."""
    seen = []
    for fused in (False, True):
        sg = randomise_(SyntheticGradient(6).double())
        dni = DNI(sg, optimizer=torch.optim.SGD(sg.parameters(), lr=0.1) if fused else None, backend="reference")
        h = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
        target = torch.ones(3, 6, dtype=F64)
        target[1, 2] = float("inf")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dni(h.requires_grad_()).backward(target)
        assert dni.fused == fused
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        seen.append((float(dni.last_sg_loss), messages, dni._regressions))
    assert seen[0][0] == seen[1][0] == float("inf")
    assert seen[0][1] == seen[1][1] and len(seen[0][1]) == 1 and "the SG regression loss is inf" in seen[0][1][0]
    assert seen[0][2] == seen[1][2] == 1


# --- when the interface falls back to autograd --------------------------------------------------------------

class OverridingSG(SyntheticGradient):
    def forward(self, h, context=None):
        return 2 * super().forward(h, context)


def _two_groups(params):
    return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)


def _frozen(sg):
    sg.layers[0].bias.requires_grad_(False)
    return sg


# id: (SG model, optimizer factory, h, the blocker's message pattern); a SyntheticGradient over 12 features
FALLBACKS = {
    "no-optimizer": (lambda: SyntheticGradient(12), None, lambda: torch.randn(3, 12), "^no SG optimizer"),
    "conv-sg": (lambda: ConvSyntheticGradient(3), torch.optim.Adam, lambda: torch.randn(3, 3, 2, 2),
                "^the SG model is a ConvSyntheticGradient"),
    "overridden-forward": (lambda: OverridingSG(12), torch.optim.Adam, lambda: torch.randn(3, 12),
                           "^the SG model is a OverridingSG"),
    "rmsprop": (lambda: SyntheticGradient(12), torch.optim.RMSprop, lambda: torch.randn(3, 12), "^optimizer: .*RMSprop"),
    "amsgrad": (lambda: SyntheticGradient(12), functools.partial(torch.optim.Adam, amsgrad=True),
                lambda: torch.randn(3, 12), "^optimizer: amsgrad=True"),
    "two-param-groups": (lambda: SyntheticGradient(12), lambda params: _two_groups(list(params)),
                         lambda: torch.randn(3, 12), "^optimizer: the parameters of one fused step must share one param group"),
    "frozen": (lambda: _frozen(SyntheticGradient(12)), torch.optim.Adam, lambda: torch.randn(3, 12), "^some SG parameters"),
    "float16-on-cpu": (lambda: SyntheticGradient(12).half(), torch.optim.Adam, lambda: torch.randn(3, 12).half(),
                       "^the CPU kernels take float32 or float64"),
    "dtype-mismatch": (lambda: SyntheticGradient(12), torch.optim.Adam, lambda: torch.randn(3, 12, dtype=F64),
                       r"^h \(torch.float64"),
    "features-mismatch": (lambda: SyntheticGradient(12), torch.optim.Adam, lambda: torch.randn(3, 2, 5),
                          r"^h of shape \(3, 2, 5\) does not have the SG's 12 features"),
}


@pytest.mark.parametrize("key", FALLBACKS)
def test_fallback_conditions(key):
    make_sg, optimizer, make_h, pattern = FALLBACKS[key]
    sg = make_sg()
    dni = DNI(sg, optimizer=optimizer)
    h = make_h()
    reason = dni.fusion_blocker(h)
    assert reason is not None and re.search(pattern, reason), reason
    if key in ("dtype-mismatch", "features-mismatch"):  # autograd's own error, as without an optimizer
        with pytest.raises(ValueError if key == "features-mismatch" else TypeError, match="^h: expected"):
            dni(h.requires_grad_())
        return
    if key == "float16-on-cpu":
        return  # autograd in fp16 on the CPU: beside the point here
    out = dni(h.requires_grad_())
    assert not dni.fused
    out.backward(torch.ones_like(h))
    trainable = [p for p in sg.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), "the fallback is autograd: the SG parameters get .grad"


def test_fallback_without_the_cpu_kernels(monkeypatch):
    monkeypatch.setattr(api, "HAS_CPU_KERNELS", False)
    sg = SyntheticGradient(4)
    dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters()))
    assert dni.fusion_blocker(torch.randn(2, 4)).startswith("no compiled CPU kernels")
    # backend="reference" runs the ops' reference on any device: fused, for what it is worth (tests)
    assert DNI(sg, optimizer=dni.optimizer, backend="reference").fusion_blocker(torch.randn(2, 4)) is None


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ extension fastdni._C is not built")
def test_fused_on_cpu_for_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        sg = SyntheticGradient(4).to(dtype)
        assert DNI(sg, optimizer=torch.optim.Adam(sg.parameters())).fusion_blocker(torch.randn(2, 4, dtype=dtype)) is None


# --- the kept fusion verdict: reused while nothing it reads changes, checked again when something does -----------

def _fused_dni(backend: str = "reference") -> DNI:
    sg = randomise_(SyntheticGradient(12))
    return DNI(sg, optimizer=torch.optim.Adam(sg.parameters(), lr=1e-2), backend=backend)


def _train_call(dni: DNI, h: torch.Tensor) -> None:
    dni(h.clone().requires_grad_()).sum().backward()


def test_the_fused_verdict_is_kept_while_nothing_it_reads_changes():
    dni = _fused_dni()
    assert dni.fusion_blocker(torch.randn(3, 12)) is None
    plan = dni._fused_plan
    # another batch size, the same 12 features as a map, a hyper-parameter the ops read at every step: no new check
    dni.optimizer.param_groups[0]["lr"] = 0.5
    for h in (torch.randn(5, 12), torch.randn(3, 3, 4)):
        assert dni.fusion_blocker(h) is None and dni._fused_plan is plan
    _train_call(dni, torch.randn(3, 3, 4))  # the regression reads the flattened [3, 12]: the same plan
    assert dni.fused and dni._fused_plan is plan


def _replace_weight(dni: DNI) -> None:
    layer = dni.synthetic_gradient.layers[0]
    layer.weight = nn.Parameter(layer.weight.detach().clone())  # not in the optimizer


def _set_option(name: str):
    return lambda dni: dni.optimizer.param_groups[0].__setitem__(name, True)


# id: (what the user changes after a fused call, the blocker's message pattern; None: still fused)
INVALIDATIONS = {
    "frozen": (lambda dni: dni.synthetic_gradient.layers[0].bias.requires_grad_(False), "^some SG parameters are frozen"),
    "parameter-replaced": (_replace_weight, "^optimizer: a parameter of the fused step is not in this optimizer"),
    "optimizer-swapped": (lambda dni: setattr(dni, "optimizer", torch.optim.RMSprop(dni.synthetic_gradient.parameters())),
                          "^optimizer: .*RMSprop"),
    "amsgrad-set": (_set_option("amsgrad"), "^optimizer: amsgrad=True"),
    "maximize-set": (_set_option("maximize"), "^optimizer: maximize=True"),
    "group-added": (lambda dni: dni.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]}),
                    None),  # checked again, and still fused (the SG's parameters share their own group)
    "parameter-left-the-group": (lambda dni: dni.optimizer.param_groups[0]["params"].__setitem__(
        0, nn.Parameter(torch.zeros(1))), "^optimizer: a parameter of the fused step is not in this optimizer"),
    "sg-to-float64": (lambda dni: dni.synthetic_gradient.double(), r"^h \(torch.float32, cpu\) is not like the SG's"),
}


@pytest.mark.parametrize("change", INVALIDATIONS)
def test_the_fused_verdict_is_checked_again_when_what_it_reads_changes(change):
    make_change, pattern = INVALIDATIONS[change]
    dni = _fused_dni()
    h = torch.randn(3, 12)
    _train_call(dni, h)
    assert dni.fused
    plan = dni._fused_plan
    make_change(dni)
    if pattern is None:
        assert dni.fusion_blocker(h) is None and dni._fused_plan is not plan
        return
    reason = dni.fusion_blocker(h)
    assert reason is not None and re.search(pattern, reason), reason
    assert dni._fused_plan is None
    if change == "sg-to-float64":  # autograd on a float32 h: the SG's own dtype error (test_fallback_conditions)
        return
    _train_call(dni, h)  # the training call takes the autograd path
    assert not dni.fused
    assert all(p.grad is not None for p in dni.synthetic_gradient.parameters() if p.requires_grad)


def test_unfreezing_fuses_again():
    dni = _fused_dni()
    h = torch.randn(3, 12)
    bias = dni.synthetic_gradient.layers[0].bias
    assert dni.fusion_blocker(h) is None
    bias.requires_grad_(False)
    assert dni.fusion_blocker(h).startswith("some SG parameters are frozen")
    bias.requires_grad_(True)
    assert dni.fusion_blocker(h) is None


def test_the_fused_verdict_follows_hs_dtype_and_device():
    dni = _fused_dni()
    assert dni.fusion_blocker(torch.randn(3, 12)) is None
    assert dni.fusion_blocker(torch.randn(3, 12, dtype=F64)).startswith("h (torch.float64, cpu) is not like")
    assert dni.fusion_blocker(torch.randn(3, 12, device="meta")).startswith("h (torch.float32, meta) is not like")
    assert dni.fusion_blocker(torch.randn(3, 2)).startswith("h of shape (3, 2) does not have")
    assert dni.fusion_blocker(torch.randn(12)).startswith("h of shape (12,) does not have")
    assert dni.fusion_blocker(torch.randn(3, 12)) is None
    sg = SyntheticGradient(1)  # one feature: a 1-d h [B] has as many per row, and still cannot fuse
    one = DNI(sg, optimizer=torch.optim.Adam(sg.parameters()), backend="reference")
    assert one.fusion_blocker(torch.randn(3, 1)) is None
    assert one.fusion_blocker(torch.randn(3)).startswith("h of shape (3,) does not have")


def test_a_swapped_fusable_optimizer_steps_the_sg():
    dni = _fused_dni()
    h = torch.randn(3, 12)
    _train_call(dni, h)
    old, params = dni.optimizer, list(dni.synthetic_gradient.parameters())
    dni.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _train_call(dni, h)
    assert dni.fused
    assert all(float(old.state[p]["step"]) == 1 for p in params), "the old optimizer was not stepped again"
    assert all(dni.optimizer.state[p]["momentum_buffer"] is not None for p in params)


def test_an_option_set_between_the_prediction_and_its_regression_raises():
    """The regression checks the kept verdict again: an option the ops cannot run raises there (as before the verdict
    was kept), and the next call falls back."""
    dni = _fused_dni()
    out = dni(torch.randn(3, 12, requires_grad=True))
    assert dni.fused
    dni.optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        out.sum().backward()
    assert dni.fusion_blocker(torch.randn(3, 12)).startswith("optimizer: amsgrad=True")


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ extension fastdni._C is not built")
def test_the_direct_op_calls_only_on_the_cpp_kernels_and_without_context():
    h = torch.randn(3, 12)
    for backend, context_features, direct in (("auto", 0, True), ("cpu", 0, True), ("reference", 0, False),
                                              ("auto", 4, False)):
        sg = SyntheticGradient(12, context_features=context_features)
        dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters()), backend=backend)
        assert dni.fusion_blocker(h) is None
        assert dni._fused_plan.direct == direct, (backend, context_features)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_dni_follows_a_parameter_frozen_between_segments(backend):
    if backend == "auto" and not ops.HAS_CPU_KERNELS:
        pytest.skip("no C++ kernels: 'auto' falls back to autograd")
    torch.manual_seed(0)
    core = randomise_(StepCore(), 0.5)
    sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
    boundary = TruncationDNI(sg, optimizer=torch.optim.Adam(sg.parameters(), lr=1e-2), backend=backend)
    inputs, targets = sequence(6)
    state, fused = initial_state(), []
    for start in (0, 3):
        state = boundary.begin_segment(state)
        fused.append(boundary.fused)
        loss, state, _ = core(inputs[start:start + 3], targets[start:start + 3], state)
        boundary.end_segment(loss, state)
        sg.layers[0].bias.requires_grad_(False)
    assert fused == [True, False]
    assert sg.layers[0].weight.grad is not None and sg.layers[0].bias.grad is None  # the second regression: autograd


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_calibrated_truncation_dni_is_fused_as_on_autograd(backend):
    """calibrate=True: the gain's running moments come from the regression on either path; 8 segments in fp64 give
    the same gains, SG and core parameters."""
    if backend == "auto" and not ops.HAS_CPU_KERNELS:
        pytest.skip("no C++ kernels: 'auto' falls back to autograd")
    inputs, targets = sequence(24)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        core = randomise_(StepCore(), 0.5)
        sg = randomise_(SyntheticGradient(2 * HIDDEN).double(), 0.2)
        sg_opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
        boundary = TruncationDNI(sg, calibrate=True, optimizer=sg_opt if fused else None, backend=backend)
        boundary.calibration.copy_(torch.tensor([0.5, 1.0]))  # a gain of 1/2 measured before: every segment scaled
        core_opt = torch.optim.SGD(core.parameters(), lr=0.1)
        state, gains = initial_state(), []
        for start in range(0, 24, 3):
            state = boundary.begin_segment(state)
            assert boundary.fused == fused
            loss, state, _ = core(inputs[start:start + 3], targets[start:start + 3], state)
            boundary.end_segment(loss, state)
            for opt in [core_opt] + ([] if fused else [sg_opt]):
                opt.step()
                opt.zero_grad()
            gains.append(boundary.sg_gain())
        results.append((torch.stack(gains), [p.detach().clone() for p in [*sg.parameters(), *core.parameters()]]))
    (want_gains, want), (got_gains, got) = results
    assert 0 < float(want_gains.min()) and float(want_gains.max()) < 1 and len(set(want_gains.tolist())) > 1
    torch.testing.assert_close(got_gains, want_gains, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_calibration_gain_of_truncation_dni():
    """The gain is <M, t> / <M, M> over the regressions seen (decay 0: the last one), clamped to [0, 1]; 0 before any,
    1 without calibrate; bad decays are named."""
    sg = randomise_(SyntheticGradient(6).double(), 0.5)
    boundary = TruncationDNI(sg, calibrate=True, calibration_decay=0.0)
    assert float(boundary.sg_gain()) == 0.0
    assert float(TruncationDNI(sg, calibrate=False).sg_gain()) == 1.0
    frozen = SyntheticGradient(6).double().requires_grad_(False)  # never regressed: used as is
    assert float(TruncationDNI(frozen).sg_gain()) == 1.0
    prediction = torch.randn(5, 6, dtype=F64)
    noise = torch.randn(5, 6, dtype=F64)
    noise -= prediction * (noise * prediction).sum() / prediction.pow(2).sum()  # orthogonal to the prediction
    for scale, gain in ((0.3, 0.3), (2.0, 1.0), (-1.0, 0.0)):
        boundary._observe_regression(prediction, scale * prediction + noise)
        assert float(boundary.sg_gain()) == pytest.approx(gain, abs=1e-12)
    with pytest.raises(ValueError, match="^calibration_decay"):
        TruncationDNI(sg, calibrate=True, calibration_decay=1.0)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_an_inplace_change_of_h_before_the_gradient_arrives_is_an_error(fused):
    """The regression reads h: changed in place after the interface ran, it is the same error on both paths (the
    interface's output is a view of h made in a custom Function, whose base torch does not let change)."""
    sg = randomise_(SyntheticGradient(4).double())
    dni = DNI(sg, optimizer=torch.optim.SGD(sg.parameters(), lr=0.1) if fused else None, backend="reference")
    h = torch.randn(3, 4, dtype=F64)
    out = dni(h)
    assert dni.fused == fused
    h.mul_(2)
    with pytest.raises(RuntimeError, match="is a view and its base or another view of its base has been modified inplace"):
        out.sum().backward()


def test_an_empty_batch_passes_through_without_a_step():
    sg = randomise_(SyntheticGradient(4).double())
    opt = torch.optim.Adam(sg.parameters())
    before = [p.detach().clone() for p in sg.parameters()]
    h = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    assert DNI(sg, optimizer=opt)(h) is h
    assert not opt.state and all(torch.equal(a, p) for a, p in zip(before, sg.parameters()))


# --- decouple: fused interfaces by default, each SG stepped once ------------------------------------------

def test_decouple_fuses_vector_interfaces_and_steps_each_sg_once():
    torch.manual_seed(0)
    model = SmallNet().double()
    sgs = decouple(model, at=["conv", "fc"])
    gen = torch.Generator().manual_seed(0)
    steps = 3
    for _ in range(steps):
        x, y = torch.randn(5, 1, 6, 6, generator=gen, dtype=F64), torch.randint(0, 4, (5,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        sgs.step()
    fc, conv = sgs.interfaces["fc"], sgs.interfaces["conv"]
    assert fc.optimizer is sgs.optimizers["fc"] and conv.optimizer is sgs.optimizers["conv"]
    assert fc.fused == ops.HAS_CPU_KERNELS and not conv.fused  # a ConvSyntheticGradient trains by autograd
    for key in ("fc", "conv"):  # one Adam step per regression, whichever path took it
        counts = {float(s["step"]) for s in sgs.optimizers[key].state.values()}
        assert counts == {float(steps)}, (key, counts)
    assert all(p.grad is None for p in sgs.parameters())


def test_decouple_keeps_an_interfaces_own_optimizer():
    model = SmallNet().double()
    made = {}

    def interface(sg):
        made["opt"] = torch.optim.SGD(sg.parameters(), lr=0.5)
        return DNI(sg, optimizer=made["opt"])

    sgs = decouple(model, at=["fc"], interface=interface)
    model(torch.randn(2, 1, 6, 6, dtype=F64)).sum().backward()
    assert sgs.optimizers["fc"] is made["opt"] is sgs.interfaces["fc"].optimizer


def test_decouple_fused_equals_decouple_autograd():
    """decouple's default (fused where it can) == the same interfaces on autograd with decouple's optimizers
    stepped after each backward, over several steps: the model and the SG parameters."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = SmallNet().double()
        kwargs = {} if fused else dict(interface=lambda sg: _AutogradDNI(sg))
        sgs = decouple(model, at=["conv", "fc"], **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(3)
        for _ in range(8):
            x, y = torch.randn(5, 1, 6, 6, generator=gen, dtype=F64), torch.randint(0, 4, (5,), generator=gen)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sgs.step()
        assert sgs.interfaces["fc"].fused == (fused and ops.HAS_CPU_KERNELS)
        results.append([p.detach().clone() for p in [*model.parameters(), *sgs.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _AutogradDNI(DNI):
    """A DNI that never fuses (an optimizer is handed to it, but it reports a blocker)."""

    def fusion_blocker(self, h, context=None):
        return "autograd on purpose"


def test_deepcopy_keeps_working():
    """A DNI holding an optimizer is copied with it (copy.deepcopy of a model, as in the decouple tests)."""
    sg = SyntheticGradient(4)
    dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters()))
    twin = copy.deepcopy(dni)
    assert isinstance(twin.optimizer, torch.optim.Adam)
    assert {id(p) for p in twin.optimizer.param_groups[0]["params"]} == {id(p) for p in twin.synthetic_gradient.parameters()}


# --- TruncationDNI: the same fused path at truncated-BPTT boundaries ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bootstrap, aux", [(1.0, False), (0.5, True)], ids=["dni", "discounted-aux"])
@pytest.mark.parametrize("sg_hidden", [(), (6,)], ids=["linear-sg", "mlp-sg"])
@pytest.mark.parametrize("sg_lambda", [0.0, 0.8], ids=["one-segment", "lambda"])
def test_truncation_dni_fused_equals_autograd(sg_lambda, sg_hidden, bootstrap, aux, backend):
    """Two sequences of three segments each (an LSTMCell, its state [B, 2H] at every boundary): with its SG optimizer
    the boundary regresses and steps its SG in the fused ops, and trains the core, the SG and the aux predictor as
    autograd with the optimizer stepped after each segment; the bootstrap correction (bootstrap != sg_scale) and
    DNI+Aux included; with sg_lambda, each regression one segment late, the last two at the final segment."""
    if backend == "auto" and not ops.HAS_CPU_KERNELS:
        pytest.skip("no C++ kernels: 'auto' falls back to autograd")
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        core = randomise_(StepCore(), 0.5)
        sg = randomise_(SyntheticGradient(2 * HIDDEN, sg_hidden).double(), 0.2)
        aux_predictor = randomise_(nn.Linear(HIDDEN, 2 * HIDDEN).double(), 0.2) if aux else None
        start_sg = [p.detach().clone() for p in sg.parameters()]
        sg_opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
        boundary = TruncationDNI(sg, gradient_scale=4.0, bootstrap=bootstrap, aux_predictor=aux_predictor, aux_weight=0.3,
                                 optimizer=sg_opt if fused else None, backend=backend, sg_lambda=sg_lambda)
        model_opt = torch.optim.SGD([*core.parameters(), *(aux_predictor.parameters() if aux else ())], lr=0.05)
        losses = []
        for _ in range(2):
            inputs, targets = sequence(9)
            state = initial_state()
            for start in (0, 3, 6):
                state = boundary.begin_segment(state)
                assert boundary.fused == fused or sg_lambda  # with sg_lambda: set where M regresses, one segment late
                loss, state, outputs = core(inputs[start:start + 3], targets[start:start + 3], state)
                boundary.end_segment(loss, state, aux_inputs=outputs if aux else None, final=start == 6,
                                     segment=lambda s, x=inputs[start:start + 3], y=targets[start:start + 3]: core(x, y, s)[1])
                assert boundary.fused == fused or boundary.last_sg_loss is None
                model_opt.step()
                model_opt.zero_grad()
                if not fused:
                    sg_opt.step()
                    sg_opt.zero_grad()
                if boundary.last_sg_loss is not None:
                    losses.append(float(boundary.last_sg_loss))
        assert all(p.grad is None for p in sg.parameters())
        assert all(not torch.equal(a, p) for a, p in zip(start_sg, sg.parameters())), "an SG parameter was never stepped"
        runs.append((losses, [p.detach().clone() for p in [*sg.parameters(), *core.parameters()]]))
    (want_losses, want), (got_losses, got) = runs
    assert len(got_losses) == len(want_losses) == (5 if sg_lambda else 6)
    torch.testing.assert_close(torch.tensor(got_losses, dtype=F64), torch.tensor(want_losses, dtype=F64), rtol=1e-10, atol=1e-12)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"parameter {i}: {m}")


def test_fused_backend_blocker_per_device_and_dtype(monkeypatch):
    """Which (backend, device, dtype) the fused path takes: no GPU needed, the rule is on the arguments."""
    from fastdni.ops import _triton

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    blocker = ops.fused_backend_blocker
    assert blocker("auto", cuda, torch.float64).startswith("the CUDA kernels take float32, bfloat16 or float16")
    assert blocker("auto", torch.device("meta"), torch.float32) == "no fused kernels for meta tensors"
    assert blocker("cpu", cpu, torch.float16).startswith(
        "the CPU kernels take float32 or float64" if ops.HAS_CPU_KERNELS else "backend: 'cpu' needs the compiled extension")
    assert blocker("reference", cuda, torch.float64) is None
    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    assert blocker("auto", cuda, torch.bfloat16) is None
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    assert blocker("triton", cpu, torch.float32).startswith("backend: 'triton' runs on CUDA tensors")
    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    monkeypatch.setattr(api, "HAS_CUDA_KERNELS", False)
    assert blocker("auto", cuda, torch.float32).startswith("no CUDA kernels")
    assert blocker("triton", cuda, torch.float32).startswith("backend: 'triton' needs the triton package")


def test_a_compiled_model_runs_the_fused_path():
    """torch.compile of a model decoupled by decouple: its vector interface still runs fused (the SG optimizer's
    param group untouched by Dynamo), and trains as eager."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = SmallNet().double()
        sgs = decouple(model, at=["conv", "fc"])
        run = torch.compile(model, backend="aot_eager") if compiled else model
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            x, y = torch.randn(5, 1, 6, 6, generator=gen, dtype=F64), torch.randint(0, 4, (5,), generator=gen)
            F.cross_entropy(run(x), y).backward()
            sgs.step()
        assert sgs.interfaces["fc"].fused == ops.HAS_CPU_KERNELS
        assert not any(g.get("capturable") for o in sgs.optimizers.values() for g in o.param_groups)  # left as given
        runs.append([p.detach().clone() for p in [*model.parameters(), *sgs.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_context_errors_are_the_autograd_paths(fused):
    """A context the SG does not take, or none where it needs one: the same ValueError on both paths."""
    for context_features, context, pattern in ((0, torch.tensor([0, 1, 2]), "^context: the SG model takes no context"),
                                               (3, None, "^context: the SG model is conditioned")):
        sg = SyntheticGradient(4, context_features=context_features).double()
        dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters()) if fused else None, backend="reference")
        h = torch.randn(3, 4, dtype=F64)
        assert (dni.fusion_blocker(h, context) is None) == fused
        with pytest.raises(ValueError, match=pattern):
            dni(h, context)
