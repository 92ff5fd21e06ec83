"""fastdni.reference SG model: prediction vs an nn.Linear stack, regression vs autograd, init, checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastdni.reference import SGParams, SGRegression, context_term, init_sg_params, sg_predict, sg_regression

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
HIDDEN = [(), (16,), (12, 10)]
HIDDEN_IDS = ["linear", "mlp1", "mlp2"]
CONTEXTS = [None, "float", "labels"]


def random_sg_params(features, hidden=(), context_features=0, *, dtype=F64, scale=0.5) -> SGParams:
    """SG parameters with every entry random (init_sg_params zeroes the output layer)."""
    sizes = [features, *hidden, features]
    weights = tuple(torch.randn(o, i, dtype=dtype) * scale for i, o in zip(sizes[:-1], sizes[1:]))
    biases = tuple(torch.randn(o, dtype=dtype) * scale for o in sizes[1:])
    context_weight = torch.randn(sizes[1], context_features, dtype=dtype) * scale if context_features else None
    return SGParams(weights, biases, context_weight)


def random_sg_inputs(hidden, context_kind, batch, features, classes, dtype=F64) -> tuple[SGParams, torch.Tensor]:
    """Random SG parameters (a context weight of ``classes`` columns where ``context_kind``) and ``h [batch, features]``."""
    params = random_sg_params(features, hidden, classes if context_kind else 0, dtype=dtype)
    return params, torch.randn(batch, features, dtype=dtype)


def make_context(kind, batch, classes, dtype=F64):
    if kind is None:
        return None
    labels = torch.randint(0, classes, (batch,))
    labels[:2] = labels[0]  # a repeated label: the label gradient must accumulate
    return labels if kind == "labels" else torch.randn(batch, classes, dtype=dtype)


def explicit_model(h, params: SGParams, context):
    """M(h, c) written with F.linear; labels enter through a one-hot float input."""
    a = h
    last = len(params.weights) - 1
    for i, (w, b) in enumerate(zip(params.weights, params.biases)):
        a = F.linear(a, w, b)
        if i == 0 and context is not None:
            c = context if context.dtype.is_floating_point else F.one_hot(context, params.context_weight.shape[1]).to(h.dtype)
            a = a + F.linear(c, params.context_weight)
        if i < last:
            a = torch.relu(a)
    return a


def explicit_loss(h, params, target, context):
    """mean_b ||M(h_b, c_b) - t_b||^2."""
    return ((explicit_model(h, params, context) - target) ** 2).sum(dim=1).mean()


def linear_stack(params: SGParams) -> nn.ModuleList:
    """The SG as torch modules: nn.Linear per layer (+ a bias-free nn.Linear for the context)."""
    layers = nn.ModuleList()
    for w, b in zip(params.weights, params.biases):
        layer = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        layers.append(layer)
    if params.context_weight is not None:
        u = params.context_weight
        layers.append(nn.Linear(u.shape[1], u.shape[0], bias=False, dtype=u.dtype))
        with torch.no_grad():
            layers[-1].weight.copy_(u)
    return layers


def autograd_regression(h, params: SGParams, target, context):
    leaves = SGParams(
        tuple(w.clone().requires_grad_() for w in params.weights),
        tuple(b.clone().requires_grad_() for b in params.biases),
        None if params.context_weight is None else params.context_weight.clone().requires_grad_(),
    )
    loss = explicit_loss(h, leaves, target, context)
    flat = [*leaves.weights, *leaves.biases] + ([leaves.context_weight] if context is not None else [])
    grads = torch.autograd.grad(loss, flat)
    n = len(params.weights)
    return loss.detach(), SGParams(grads[:n], grads[n : 2 * n], grads[2 * n] if context is not None else None)


@pytest.mark.parametrize("context_kind", CONTEXTS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=HIDDEN_IDS)
def test_sg_predict_matches_linear_stack(hidden, context_kind, dtype, check_close):
    batch, features, classes = 9, 14, 5
    params, h = random_sg_inputs(hidden, context_kind, batch, features, classes, dtype)
    context = make_context(context_kind, batch, classes, dtype)
    stack = linear_stack(params)
    with torch.no_grad():
        a = stack[0](h)
        if context is not None:
            c = context if context_kind == "float" else F.one_hot(context, classes).to(dtype)
            a = a + stack[-1](c)
        for layer in stack[1 : len(params.weights)]:
            a = layer(torch.relu(a))
    prediction = sg_predict(h, params, context)
    assert prediction.shape == h.shape and prediction.dtype == dtype
    check_close(prediction, a)


@pytest.mark.parametrize("context_kind", CONTEXTS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=HIDDEN_IDS)
def test_sg_regression_matches_autograd(hidden, context_kind, dtype, check_close):
    batch, features, classes = 11, 13, 4
    params, h = random_sg_inputs(hidden, context_kind, batch, features, classes, dtype)
    target = torch.randn(batch, features, dtype=dtype)
    context = make_context(context_kind, batch, classes, dtype)

    result = sg_regression(h, params, target, context)
    assert isinstance(result, SGRegression)
    loss, grads = autograd_regression(h, params, target, context)
    check_close(result.loss, loss)
    assert result.loss.dim() == 0
    check_close(result.prediction, sg_predict(h, params, context))
    check_close(result.grads.weights, grads.weights)
    check_close(result.grads.biases, grads.biases)
    check_close(result.grads.context_weight, grads.context_weight)
    for g, p in zip((*result.grads.weights, *result.grads.biases), (*params.weights, *params.biases)):
        assert g.shape == p.shape
    if context is not None:
        assert result.grads.context_weight.shape == params.context_weight.shape


def test_sg_regression_loss_is_batch_mean_of_squared_norms():
    params = random_sg_params(3)
    h = torch.randn(4, 3, dtype=F64)
    target = torch.randn(4, 3, dtype=F64)
    error = sg_predict(h, params) - target
    expected = sum(float(error[b] @ error[b]) for b in range(4)) / 4
    assert sg_regression(h, params, target).loss.item() == pytest.approx(expected, rel=1e-14)
    # A perfect target gives zero loss and zero gradients.
    exact = sg_regression(h, params, sg_predict(h, params))
    assert exact.loss.item() == 0.0
    assert all(not g.any() for g in (*exact.grads.weights, *exact.grads.biases))


@pytest.mark.parametrize("hidden", HIDDEN, ids=HIDDEN_IDS)
def test_label_context_equals_one_hot_context(hidden, check_close):
    batch, features, classes = 10, 8, 6
    params = random_sg_params(features, hidden, classes)
    h = torch.randn(batch, features, dtype=F64)
    target = torch.randn(batch, features, dtype=F64)
    labels = torch.tensor([0, 5, 5, 2, 0, 0, 3, 5, 1, 2])  # class 4 absent: its column gets no gradient
    one_hot = F.one_hot(labels, classes).to(F64)
    check_close(sg_predict(h, params, labels), sg_predict(h, params, one_hot))
    by_label = sg_regression(h, params, target, labels)
    by_one_hot = sg_regression(h, params, target, one_hot)
    check_close(by_label.loss, by_one_hot.loss)
    check_close(by_label.grads, by_one_hot.grads)
    assert not by_label.grads.context_weight[:, 4].any() and by_label.grads.context_weight[:, 5].abs().sum() > 0
    # int32 labels are accepted too
    check_close(sg_regression(h, params, target, labels.int()).grads, by_label.grads)


def test_context_term():
    u = torch.randn(5, 3, dtype=F64)
    c = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(context_term(c, u), c @ u.T, rtol=0, atol=0)
    y = torch.tensor([2, 0, 2, 1])
    assert torch.equal(context_term(y, u), torch.stack([u[:, 2], u[:, 0], u[:, 2], u[:, 1]]))


def test_relu_mask_at_exact_zero_matches_autograd(check_close):
    """Hidden pre-activations that are exactly 0 pass no gradient (autograd's relu convention)."""
    params = random_sg_params(4, (3,))
    params = SGParams(params.weights, (torch.zeros(3, dtype=F64), params.biases[1]), None)
    h = torch.zeros(5, 4, dtype=F64)
    h[:2] = torch.randn(2, 4, dtype=F64)  # rows 2..4 have a_1 == 0 exactly
    target = torch.randn(5, 4, dtype=F64)
    result = sg_regression(h, params, target)
    _, grads = autograd_regression(h, params, target, None)
    check_close(result.grads, grads)


@pytest.mark.parametrize("context_features", [0, 3])
@pytest.mark.parametrize("hidden", HIDDEN, ids=HIDDEN_IDS)
def test_init_sg_params(hidden, context_features):
    features = 10
    gen = torch.Generator().manual_seed(7)
    params = init_sg_params(features, hidden, context_features, dtype=F64, generator=gen)
    sizes = [features, *hidden, features]
    assert [tuple(w.shape) for w in params.weights] == list(zip(sizes[1:], sizes[:-1]))
    assert [tuple(b.shape) for b in params.biases] == [(s,) for s in sizes[1:]]
    assert all(t.dtype == F64 for t in (*params.weights, *params.biases))
    assert not params.weights[-1].any() and not params.biases[-1].any()
    for fan_in, w, b in zip(sizes[:-2], params.weights[:-1], params.biases[:-1]):
        bound = fan_in**-0.5
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert w.abs().min() > 0 and w.std() > bound / 4  # really random, not zero
    if context_features:
        u = params.context_weight
        assert u.shape == (sizes[1], context_features) and u.dtype == F64
        if hidden:
            assert 0 < u.abs().max() <= (features + context_features) ** -0.5
        else:  # part of the zero-initialised output layer of a linear SG
            assert not u.any()
    else:
        assert params.context_weight is None
    # M predicts zero until it has learned, whatever h and c.
    h = torch.randn(6, features, dtype=F64) * 10
    context = torch.randint(0, context_features, (6,)) if context_features else None
    assert not sg_predict(h, params, context).any()


def test_init_sg_params_generator_and_dtype():
    a = init_sg_params(6, (5,), 2, generator=torch.Generator().manual_seed(3))
    b = init_sg_params(6, (5,), 2, generator=torch.Generator().manual_seed(3))
    c = init_sg_params(6, (5,), 2, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip((*a.weights, *a.biases, a.context_weight), (*b.weights, *b.biases, b.context_weight)))
    assert not torch.equal(a.weights[0], c.weights[0])
    assert a.weights[0].dtype == torch.float32  # default dtype
    meta = init_sg_params(6, (5,), 2, device="meta")
    assert all(t.device.type == "meta" for t in (*meta.weights, *meta.biases, meta.context_weight))


@settings(max_examples=30)
@given(
    batch=st.integers(1, 5),
    features=st.integers(1, 6),
    hidden=st.lists(st.integers(1, 5), max_size=2),
    context_kind=st.sampled_from(CONTEXTS),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_sg_regression_property_matches_autograd(batch, features, hidden, context_kind, classes, seed):
    torch.manual_seed(seed)
    params, h = random_sg_inputs(tuple(hidden), context_kind, batch, features, classes)
    target = torch.randn(batch, features, dtype=F64)
    context = None
    if context_kind == "labels":
        context = torch.randint(0, classes, (batch,))
    elif context_kind == "float":
        context = torch.randn(batch, classes, dtype=F64)
    result = sg_regression(h, params, target, context)
    loss, grads = autograd_regression(h, params, target, context)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.loss, loss, **tol)
    torch.testing.assert_close(result.prediction, explicit_model(h, params, context), **tol)
    for a, e in zip((*result.grads.weights, *result.grads.biases), (*grads.weights, *grads.biases)):
        torch.testing.assert_close(a, e, **tol)
    if context is None:
        assert result.grads.context_weight is None
    else:
        torch.testing.assert_close(result.grads.context_weight, grads.context_weight, **tol)


def test_sg_functions_do_not_modify_their_arguments():
    params = random_sg_params(5, (4,), 3)
    h, target, labels = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    tensors = [*params.weights, *params.biases, params.context_weight, h, target, labels]
    saved = [t.clone() for t in tensors]
    sg_regression(h, params, target, labels)
    assert all(torch.equal(t, s) for t, s in zip(tensors, saved))


def test_sg_argument_errors():
    features, classes = 5, 3
    params = random_sg_params(features, (4,), classes)
    plain = random_sg_params(features, (4,))
    h = torch.randn(6, features, dtype=F64)
    labels = torch.randint(0, classes, (6,))
    with pytest.raises(ValueError, match="^h: expected a 2-d tensor"):
        sg_predict(h.reshape(6, 5, 1), plain)
    with pytest.raises(ValueError, match="^params: expected as many weights as biases .* got 0 weights"):
        sg_predict(h, SGParams((), ()))
    with pytest.raises(ValueError, match="^params: expected as many weights as biases .* got 2 weights and 1 biases"):
        sg_predict(h, SGParams(plain.weights, plain.biases[:1]))
    with pytest.raises(ValueError, match=r"^params.weights\[0\]: expected shape \(\*, 5\), got \(4, 4\)"):
        sg_predict(h, SGParams((torch.zeros(4, 4, dtype=F64), plain.weights[1]), plain.biases))
    with pytest.raises(ValueError, match=r"^params.weights\[1\]: expected shape \(5, 4\), got \(4, 4\)"):
        sg_predict(h, SGParams((plain.weights[0], torch.zeros(4, 4, dtype=F64)), plain.biases))
    with pytest.raises(ValueError, match=r"^params.biases\[1\]: expected shape \(5,\), got \(4,\)"):
        sg_predict(h, SGParams(plain.weights, (plain.biases[0], torch.zeros(4, dtype=F64))))
    with pytest.raises(TypeError, match=r"^params.weights\[0\]: expected dtype torch.float32, got torch.float64"):
        sg_predict(h.float(), plain)
    with pytest.raises(ValueError, match="^context: the SG model is conditioned .* but none was given"):
        sg_predict(h, params)
    with pytest.raises(ValueError, match=r"^context: the SG model takes no context \(context_features=0\)"):
        sg_predict(h, plain, labels)
    with pytest.raises(ValueError, match=r"^context: labels must lie in \[0, 3\), got values in \[0, 3\]"):
        sg_predict(h, params, torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"^context: labels must lie in \[0, 3\), got values in \[-1, 2\]"):
        sg_predict(h, params, torch.tensor([0, 1, 2, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"^context: integer labels must be int32/int64 of shape \(6,\), got \(5,\)"):
        sg_predict(h, params, labels[:5])
    with pytest.raises(ValueError, match=r"^context: integer labels .* got \(6, 1\)"):
        sg_predict(h, params, labels[:, None])
    for bad_dtype in (torch.bool, torch.uint8, torch.int8, torch.int16):
        # uint8 would silently index as a boolean mask; all of these are refused by name
        with pytest.raises(ValueError, match=f"^context: integer labels .* of dtype {bad_dtype}"):
            sg_predict(h, params, torch.ones(6, dtype=bad_dtype))
    with pytest.raises(ValueError, match=r"^context: expected shape \(6, 3\), got \(6, 4\)"):
        sg_predict(h, params, torch.randn(6, 4, dtype=F64))
    with pytest.raises(TypeError, match="^context: expected dtype torch.float64, got torch.float32"):
        sg_predict(h, params, torch.randn(6, classes))
    with pytest.raises(ValueError, match="^context: expected device cpu, got meta"):
        sg_predict(h, params, labels.to("meta"))
    with pytest.raises(TypeError, match="^context: expected a torch.Tensor, got list"):
        sg_predict(h, params, labels.tolist())
    with pytest.raises(ValueError, match=r"^params.context_weight: expected shape \(4, \*\), got \(3, 3\)"):
        sg_predict(h, SGParams(params.weights, params.biases, torch.zeros(3, 3, dtype=F64)), labels)
    with pytest.raises(ValueError, match=r"^target: expected shape \(6, 5\), got \(6, 4\)"):
        sg_regression(h, plain, torch.zeros(6, 4, dtype=F64))
    with pytest.raises(TypeError, match="^target: expected dtype torch.float64"):
        sg_regression(h, plain, torch.zeros(6, 5))
