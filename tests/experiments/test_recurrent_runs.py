"""The stacked-runs engine equals per-run TruncationDNI training (fp64), and its stream data and diagnostic."""
import pytest
import torch
from torch import nn

from fastdni.data.copy_streams import CopyStreams
from fastdni.experiments.recurrent_runs import RunGroup, masked_bce
from fastdni.nn import SyntheticGradient, TruncationDNI, sg_alignment

F64 = torch.float64
IN, HIDDEN, OUT, BATCH = 9, 6, 8, 5


def per_run_reference(method, seed, sg_scale, aux_weight, bootstrap, sg_hidden=0, calibrate=False, sg_lambda=0.0):
    """The per-run model of the experiments (nn.LSTM + readout), with the boundary of its method."""
    torch.manual_seed(seed)
    lstm, readout = nn.LSTM(IN, HIDDEN).double(), nn.Linear(HIDDEN, OUT).double()
    boundary = None
    if method != "bptt":
        aux = None
        if method == "dni-aux":
            aux = nn.Linear(HIDDEN, 2 * HIDDEN).double()
            nn.init.zeros_(aux.weight)
            nn.init.zeros_(aux.bias)
        sg = SyntheticGradient(2 * HIDDEN, hidden=(sg_hidden,) if sg_hidden else ()).double()
        boundary = TruncationDNI(sg, batch_dim=1, aux_predictor=aux,
                                 aux_weight=aux_weight, sg_scale=sg_scale, gradient_scale=BATCH, bootstrap=bootstrap,
                                 calibrate=calibrate, sg_lambda=sg_lambda)
    return lstm, readout, boundary


@pytest.mark.parametrize("bootstrap, sg_hidden, calibrate, sg_lambda, final",
                         [(1.0, 0, False, 0.0, False), (0.1, 0, False, 0.0, False), (0.5, 0, False, 0.0, False),
                          (1.0, 7, False, 0.0, False), (0.5, 0, True, 0.0, False), (0.5, 0, True, 0.7, False),
                          (1.0, 7, False, 1.0, True)])
def test_stacked_runs_equal_per_run_truncation_dni(bootstrap, sg_hidden, calibrate, sg_lambda, final):
    methods, seeds = ["bptt", "dni", "dni-aux"], [0, 1, 2]
    group = RunGroup(methods, seeds, IN, HIDDEN, OUT, sg_scale=0.1, aux_weight=0.3, bootstrap=bootstrap,
                     sg_hidden=sg_hidden, calibrate=calibrate, sg_lambda=sg_lambda).double()
    # Give the zero-initialised SG and aux predictor non-zero weights so that every term is exercised.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in group.sg_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=F64))
    refs = [per_run_reference(m, s, 0.1, 0.3, bootstrap, sg_hidden, calibrate, sg_lambda)
            for m, s in zip(methods, seeds)]
    sg_layers = [("sg_w1", "sg_b1"), ("sg_w", "sg_b")] if sg_hidden else [("sg_w", "sg_b")]
    for r, (_, _, boundary) in enumerate(refs):
        if boundary is not None:
            with torch.no_grad():
                for layer, (w, b) in zip(boundary.synthetic_gradient.layers, sg_layers):
                    layer.weight.copy_(getattr(group, w)[r])
                    layer.bias.copy_(getattr(group, b)[r, 0])
                if calibrate:  # a measured gain of 1/2 to start from, so that every window's SG is scaled
                    group.calibration[r] = boundary.calibration.copy_(torch.tensor([0.5, 1.0], dtype=F64))
                if boundary.aux_predictor is not None:
                    boundary.aux_predictor.weight.copy_(group.aux_w[r].t())
                    boundary.aux_predictor.bias.copy_(group.aux_b[r, 0])
    streams = CopyStreams(len(methods), BATCH, bits=OUT, seed=3)
    streams.set_lengths(torch.tensor([2, 3, 2]))
    windows = [streams.window(3) for _ in range(4)]
    state = tuple(s.double() for s in group.initial_state(BATCH))
    for i, w in enumerate(windows):
        x = w.inputs.double()
        _, state, stats = group.train_window(x, lambda logits: masked_bce(logits, w.targets.double(), w.mask), state,
                                             final=final and i == len(windows) - 1)
    ref_states = [(torch.zeros(1, BATCH, HIDDEN, dtype=F64),) * 2 for _ in refs]
    for r, (lstm, readout, boundary) in enumerate(refs):
        st = ref_states[r]
        for i, w in enumerate(windows):
            st = boundary.begin_segment(st) if boundary is not None else tuple(s.detach() for s in st)
            x = w.inputs[:, r].double()
            out, st = lstm(x, st)
            logits = readout(out)
            loss = masked_bce(logits[:, None], w.targets[:, r, None].double(), w.mask[:, r, None])[0]
            if boundary is None:
                loss.backward()
            else:
                boundary.end_segment(loss, st, aux_inputs=out if boundary.aux_predictor is not None else None,
                                     final=final and i == len(windows) - 1,
                                     segment=lambda s, x=x: lstm(x, s)[1])
        # Gradients accumulated over the 4 windows (no step in between) must agree.
        pairs = [(group.w_ih.grad[r], lstm.weight_ih_l0.grad.t()), (group.w_hh.grad[r], lstm.weight_hh_l0.grad.t()),
                 (group.b_ih.grad[r, 0], lstm.bias_ih_l0.grad), (group.w_out.grad[r], readout.weight.grad.t()),
                 (group.b_out.grad[r, 0], readout.bias.grad)]
        if boundary is not None:
            for layer, (w, b) in zip(boundary.synthetic_gradient.layers, sg_layers):
                pairs += [(getattr(group, w).grad[r], layer.weight.grad), (getattr(group, b).grad[r, 0], layer.bias.grad)]
            torch.testing.assert_close(stats.sg_loss[r], boundary.last_sg_loss, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(group.sg_gain()[r], boundary.sg_gain(), rtol=1e-10, atol=1e-12)
            assert not calibrate or 0.1 < float(boundary.sg_gain()) < 1  # calibrated: a gain between its bounds
            if boundary.aux_predictor is not None:
                pairs += [(group.aux_w.grad[r], boundary.aux_predictor.weight.grad.t())]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_streams_lay_out_copy_episodes_and_fork_sees_the_same_future():
    s = CopyStreams(2, 3, bits=4, seed=0, max_offset=0)
    s.set_lengths(torch.tensor([2, 3]))
    w0 = s.window(1)  # the first episodes were drawn at length 1 before set_lengths: 3 steps
    twin = s.fork()
    a, b = s.window(20), twin.window(20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    x = torch.cat([w0.inputs, a.inputs])[:, 0, 0]
    y = torch.cat([w0.targets, a.targets])[:, 0, 0]
    m = torch.cat([w0.mask, a.mask])[:, 0, 0]
    # Run 0: one episode of N=1 (3 steps), then N=2 (5 steps): read, delimiter, write.
    assert m.tolist()[:8] == [False, False, True, False, False, False, True, True]
    assert x[1, 4] == 1 and x[5, 4] == 1 and x[:, 4].sum() >= 3
    torch.testing.assert_close(y[2], x[0, :4])
    torch.testing.assert_close(y[6:8], x[3:5, :4])
    assert bool(a.current[:, 1].any()) and not bool(w0.current.any())


def test_repeat_copy_streams_repeat_and_mark_the_end():
    s = CopyStreams(1, 2, bits=3, max_repeats=3, seed=1, max_offset=0)
    s.set_lengths(torch.tensor([2]))
    s.window(3)  # the first episode (N=1) ends within 1 + 1 + R + 1 <= 6 steps; drain it
    while int(s.position[0, 0]) != 0:
        s.window(1)
    w = s.window(12)
    r = int(s.repeats[0, 0]) if int(s.position[0, 0]) > 0 else None
    x, y, m = w.inputs[:, 0, 0], w.targets[:, 0, 0], w.mask[:, 0, 0]
    repeats = round(float(x[2, 4]) * 3)
    total = 2 + 1 + 2 * repeats + 1
    assert m[:3].sum() == 0 and m[3:total].all()
    for k in range(repeats):
        torch.testing.assert_close(y[3 + 2 * k : 5 + 2 * k, :3], x[0:2, :3])
    assert y[total - 1, 3] == 1 and y[: total - 1, 3].sum() == 0
    del r


def test_alignment_of_a_perfect_sg_is_one_and_matches_the_library_diagnostic():
    torch.manual_seed(0)
    group = RunGroup(["dni"], [0], IN, HIDDEN, OUT, calibrate=False).double()
    streams = CopyStreams(1, BATCH, bits=OUT, seed=2)
    state = tuple(s.double() + 0.1 for s in group.initial_state(BATCH))
    future = streams.window(6)

    def future_loss(st):
        logits, _, _ = group(future.inputs.double(), st)
        return masked_bce(logits, future.targets.double(), future.mask)

    cos0, ratio0 = group.alignment(state, future_loss)
    assert torch.isnan(cos0).all() and ratio0[0] == 0  # a zero SG: no direction, no norm
    # Make the SG a perfect (linear) predictor of the dropped gradient at exactly this state: it then aligns.
    h = state[0].detach().requires_grad_()
    c = state[1].detach().requires_grad_()
    dh, dc = torch.autograd.grad(future_loss((h, c)).sum(), (h, c))
    with torch.no_grad():
        group.sg_b.copy_(0)
        group.sg_w.zero_()
        group.sg_b[0] = 0
        target = BATCH * torch.cat([dh, dc], -1)[0]  # [B, 2H]
        group.sg_b[0, 0] = target.mean(0)
    cos, ratio = group.alignment(state, future_loss)
    assert cos[0] > 0.5 and ratio[0] > 0

    # The library's diagnostic on TruncationDNI agrees with the engine's on the same SG and future.
    sg = SyntheticGradient(2 * HIDDEN).double()
    with torch.no_grad():
        sg.layers[0].weight.copy_(group.sg_w[0])
        sg.layers[0].bias.copy_(group.sg_b[0, 0])
    boundary = TruncationDNI(sg, gradient_scale=BATCH, calibrate=False)  # the group's run is not calibrated
    lib = sg_alignment(boundary, (state[0][0], state[1][0]),
                       lambda st: future_loss((st[0][None], st[1][None]))[0])
    assert lib.cosine == pytest.approx(float(cos[0]), rel=1e-10)
    assert lib.norm_ratio == pytest.approx(float(ratio[0]), rel=1e-10)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _run_script(path, args, capsys, monkeypatch):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_sweep_script_runs_variants_and_the_oracle(capsys, monkeypatch):
    """The sweep behind docs/recurrent.md's settings: variants side by side, the oracle SG (a perfect M) among them."""
    out = _run_script(ROOT / "scripts" / "recurrent_sweep.py",
                      ["--runs", "bptt", "dni:0.1:1", "oracle", "--steps", "200", "--every", "100", "--hidden", "8",
                       "--batch-size", "4"], capsys, monkeypatch)
    assert out.count("length [") == 2 and "max length reached [" in out


@pytest.mark.skipif(not __import__("fastdni.ops", fromlist=["x"]).HAS_CPU_KERNELS, reason="no fastdni._C")
def test_recurrent_runs_benchmark_prints_its_ratio_table(capsys, monkeypatch):
    out = _run_script(ROOT / "benchmarks" / "bench_recurrent_runs.py",
                      ["--runs", "2", "--hidden", "8", "--batch-size", "4", "--windows", "2", "--repeats", "1"],
                      capsys, monkeypatch)
    assert "| sg_scale | bootstrap | separate | separate fused | stacked | stacked fused | stacked fused vs separate |" in out
    assert out.count("x |") == 4


def test_forget_bias_shifts_only_the_forget_gate_of_its_run():
    plain = RunGroup(["bptt", "dni"], [0, 1], IN, HIDDEN, OUT)
    shifted = RunGroup(["bptt", "dni"], [0, 1], IN, HIDDEN, OUT, forget_bias=[0.0, 1.0])
    delta = shifted.b_ih.detach() - plain.b_ih.detach()  # [R, 1, 4H], gates i, f, g, o
    assert delta[0].abs().max() == 0
    torch.testing.assert_close(delta[1, 0, HIDDEN : 2 * HIDDEN], torch.ones(HIDDEN))
    assert delta[1, 0, :HIDDEN].abs().max() == 0 and delta[1, 0, 2 * HIDDEN :].abs().max() == 0


def test_rls_solver_fits_a_linear_target_and_leaves_adam_runs_alone():
    group = RunGroup(["dni", "dni"], [0, 0], IN, HIDDEN, OUT, sg_solver=["adam", "rls"], rls_decay=1.0,
                     rls_ridge=1e-9, rls_every=4).double()
    gen = torch.Generator().manual_seed(0)
    true_w = torch.randn(2 * HIDDEN, 2 * HIDDEN, generator=gen, dtype=F64)
    true_b = torch.randn(1, 2 * HIDDEN, generator=gen, dtype=F64)
    for _ in range(8):
        start = torch.randn(1, 40, 2 * HIDDEN, generator=gen, dtype=F64).expand(2, -1, -1)
        loss = group._regress(start, start @ true_w + true_b)
    torch.testing.assert_close(group.sg_w[1].detach(), true_w.t())
    torch.testing.assert_close(group.sg_b[1].detach(), true_b)
    assert loss[1] < 1e-12 < loss[0]
    # The adam run got its usual regression gradient; the rls run none (its Adam step is zero).
    assert group.sg_w.grad[0].abs().max() > 0 and group.sg_w.grad[1].abs().max() == 0
    with pytest.raises(ValueError, match="sg_solver"):
        RunGroup(["dni"], [0], IN, HIDDEN, OUT, sg_solver="sgd")


def test_bad_sg_lambda_is_named():
    for bad in (1.5, -0.1, [0.5, 0.5]):  # above 1, negative, one value too many for one run
        with pytest.raises(ValueError, match="sg_lambda"):
            RunGroup(["dni"], [0], IN, HIDDEN, OUT, sg_lambda=bad)


def test_copy_streams_follow_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        window = CopyStreams(2, 3, seed=0).window(6)
    finally:
        torch.set_default_dtype(old)
    assert window.inputs.dtype == window.targets.dtype == torch.float64 and window.inputs.abs().sum() > 0


FUSED_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not __import__("fastdni.ops", fromlist=["HAS_CPU_KERNELS"]).HAS_CPU_KERNELS, reason="no fastdni._C"))]


def _train(group, optimizers, windows, lengths, same_data=False):
    """``windows`` windows of 3 steps on copy streams of ``lengths`` (fixed; ``same_data``: every run the first
    run's streams), both optimizers stepped after each."""
    streams = CopyStreams(1 if same_data else group.runs, BATCH, bits=OUT, seed=4)
    streams.set_lengths(torch.tensor(lengths[:1] if same_data else lengths))
    state = tuple(s.double() for s in group.initial_state(BATCH))
    losses = []
    for _ in range(windows):
        w = streams.window(3)
        if same_data:
            w = type(w)(*(t.expand(t.shape[0], group.runs, *t.shape[2:]) if t.dim() >= 3 else t for t in w))
        _, state, stats = group.train_window(w.inputs.double(), lambda lg: masked_bce(lg, w.targets.double(), w.mask),
                                             state, resets=w.starts)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(torch.stack([stats.loss, stats.sg_loss]))
    return torch.stack(losses)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("sg_hidden, calibrate", [(0, False), (7, False), (0, True)], ids=["linear", "mlp", "calibrated"])
def test_fused_sg_trains_as_the_autograd_sg(backend, sg_hidden, calibrate):
    """use_fused_sg (the experiments' default): 300 windows of every method give the same learning curve (task and
    SG losses per window) and parameters as the SG stepped by torch.optim.Adam on autograd-style gradients (fp64)."""
    groups, optimizers = [], []
    for fused in (False, True):
        group = RunGroup(["bptt", "dni", "dni-aux"], [0, 1, 2], IN, HIDDEN, OUT, sg_scale=1.0, aux_weight=0.3,
                         sg_hidden=sg_hidden, calibrate=calibrate).double()
        opts = [torch.optim.Adam(group.core_parameters(), lr=1e-2), torch.optim.Adam(group.sg_parameters(), lr=1e-2)]
        if fused:
            assert group.use_fused_sg(opts[1], backend) is None
        groups.append(group)
        optimizers.append(opts)
    curves = [_train(g, o, 300, [2, 3, 2]) for g, o in zip(groups, optimizers)]
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-9, atol=1e-12)
    assert groups[1].sg_w.grad is None and float(groups[1].sg_w.detach().abs().max()) > 0  # stepped by the op, not by .grad
    for a, b in zip(groups[0].parameters(), groups[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    sg_state = [optimizers[k][1].state[groups[k].sg_w] for k in (0, 1)]
    assert float(sg_state[1]["step"]) == float(sg_state[0]["step"]) == 300
    torch.testing.assert_close(sg_state[1]["exp_avg_sq"], sg_state[0]["exp_avg_sq"], rtol=1e-9, atol=1e-15)


def test_use_fused_sg_says_why_it_cannot():
    group = RunGroup(["dni"], [0], IN, HIDDEN, OUT, sg_solver="rls")
    assert "rls" in group.use_fused_sg(torch.optim.Adam(group.sg_parameters()))
    group = RunGroup(["dni"], [0], IN, HIDDEN, OUT)
    assert "optimizer" in group.use_fused_sg(torch.optim.RMSprop(group.sg_parameters()))
    assert "amsgrad" in group.use_fused_sg(torch.optim.Adam(group.sg_parameters(), amsgrad=True))
    assert group.sg_optimizer is None


def test_calibration_gain_is_the_least_squares_scale_of_the_targets_on_the_predictions():
    group = RunGroup(["dni", "dni", "dni"], [0, 0, 0], IN, HIDDEN, OUT, calibrate=[True, True, False],
                     calibration_decay=0.0).double()
    assert group.sg_gain().tolist() == [0.0, 0.0, 1.0]  # nothing measured yet: a calibrated run starts as BPTT
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        group.sg_w.copy_(torch.randn(group.sg_w.shape, generator=gen, dtype=F64))
    start = torch.randn(3, 40, 2 * HIDDEN, generator=gen, dtype=F64)
    prediction = group.predict(start)
    noise = torch.randn(prediction.shape, generator=gen, dtype=F64)
    # noise orthogonal to each run's prediction: the least-squares scale is then exactly 0.4 (run 0), 0 (run 1:
    # the target opposes the prediction, clamped) and 1 for the uncalibrated run whatever its targets
    noise -= prediction * (noise * prediction).sum((1, 2), keepdim=True) / prediction.pow(2).sum((1, 2), keepdim=True)
    target = prediction * torch.tensor([0.4, -2.0, 0.4], dtype=F64)[:, None, None] + noise
    group._regress(start, target)
    torch.testing.assert_close(group.sg_gain(), torch.tensor([0.4, 0.0, 1.0], dtype=F64))


def test_a_calibrated_run_with_gain_zero_trains_its_core_as_bptt():
    """A gain of 0 (an SG that predicts nothing of its targets) hands the segment no synthetic gradient: the core's
    gradients are truncated BPTT's exactly, though the SG itself is non-zero."""
    group = RunGroup(["bptt", "dni", "dni"], [0, 0, 0], IN, HIDDEN, OUT, sg_scale=1.0, calibrate=[False, True, False],
                     calibration_decay=1.0 - 1e-12).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        group.sg_w.copy_(0.3 * torch.randn(group.sg_w.shape, generator=gen, dtype=F64))
        group.calibration[1] = torch.tensor([-1.0, 1.0], dtype=F64)  # a negative <M, t>: gain 0
    _train(group, [], 4, [2], same_data=True)
    for p in group.core_parameters():
        torch.testing.assert_close(p.grad[1], p.grad[0], rtol=1e-12, atol=1e-14)
    assert (group.w_hh.grad[2] - group.w_hh.grad[0]).abs().max() > 1e-6  # the uncalibrated DNI run's SG reaches its core
