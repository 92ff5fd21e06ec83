"""A CNN trained with a synthetic gradient after every conv block, each block's step run by the fused ops.

The conv layer step is the linear one fed a different operand: with the block's input unfolded (im2col, rows
``B*H*W``, columns ``C_in*k*k``) and its maps as channels-last rows ``[B*H*W, C]``, the convolution is
:func:`~fastdni.ops.dni_forward`'s GEMM, its weight gradient is :func:`~fastdni.ops.dni_update_`'s (the optimizer
in its epilogue) and ``BatchNorm2d`` is :func:`~fastdni.ops.batch_norm_act` over those rows. ATen does what the ops
do not: the unfold, ``dx`` (``convolution_backward``, no unfolded ``dx`` in memory) and the max pooling.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._checks import check_context, check_context_presence, check_int, check_positive, check_tensor
from ..reference import context_term
from ..reference.activations import activate, activation_derivative_from_output, check_activation
from .decoupled import DecoupledTrainer, LossFunction, OptimizerFactory, StepResult, default_optimizer, step_optimizer
from .fused import normalise, step_batch_norm, step_on_delta
from .synthetic_gradient import ConvSyntheticGradient

#: Why an MLP conv SG (hidden convolutions) runs on autograd: see :func:`conv_sg_fusion_blocker`.
MLP_CONV_SG = ("an MLP conv SG: the ops run an MLP SG as dense layers over one set of rows, but a conv SG's second "
               "convolution reads its hidden map at neighbouring positions (an unfold between the layers), and "
               "sg_regression_ backpropagates through the whole MLP inside one op, with no point to put the fold in")


def unfold_rows(x: Tensor, kernel_size: int) -> Tensor:
    """``x`` ``[B, C, H, W]`` unfolded for a "same" convolution: ``[B*H*W, C*k*k]``, one row per output position
    (``(b, y, x)`` order, as :func:`map_rows`), columns in a conv weight's ``(C, ky, kx)`` order."""
    batch, _, height, width = x.shape
    columns = F.unfold(x, kernel_size, padding=kernel_size // 2)  # [B, C*k*k, H*W]
    return columns.transpose(1, 2).reshape(batch * height * width, -1)


def map_rows(x: Tensor) -> Tensor:
    """A map ``[B, C, H, W]`` as channels-last rows ``[B*H*W, C]`` (a view where ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def rows_map(rows: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Channels-last rows ``[B*H*W, C]`` as a map ``[B, C, H, W]`` (a view, channels-last strides)."""
    return rows.view(batch, height, width, -1).permute(0, 3, 1, 2)


def conv_sg_fusion_blocker(sg: ConvSyntheticGradient) -> Optional[str]:
    """Why the ops cannot run ``sg``'s prediction and regression (it then runs on autograd), or None.

    A linear conv SG (one convolution) is a linear layer over the unfolded map (``[B*H*W, C*k*k]`` rows to ``C``
    columns): its prediction is :func:`~fastdni.ops.dni_forward`'s GEMM with bias, its regression
    :func:`~fastdni.ops.dni_update_` fed the error (the optimizer in the GEMM's epilogue). Not
    ``sg_predict``/``sg_regression_``: their SG maps its input's features to as many (the gradient of its own input),
    where this one reads ``C*k*k`` columns per row to predict ``C``."""
    if len(sg.convs) != 1:
        return MLP_CONV_SG
    if not all(p.requires_grad for p in sg.parameters()):
        return "some SG parameters are frozen (requires_grad=False)"
    return None


class _Block(NamedTuple):
    """What a conv block's training forward keeps for its update."""

    columns: Tensor  #: the unfolded input, ``[B*H*W, C_in*k*k]``
    layer: ops.ForwardResult  #: the GEMM (with the activation where there is no BatchNorm): ``h`` rows ``[B*H*W, C]``
    normed: Optional[ops.BatchNormResult]  #: ``act(BatchNorm(pre))`` rows, with BatchNorm
    activated: Tensor  #: the activation as a map ``[B, C, H, W]`` (channels-last strides)
    pooled: Tensor  #: the block's output, ``[B, C, H/p, W/p]``
    indices: Tensor  #: the max pooling's argmax


class _Pending(NamedTuple):
    """An SG prediction awaiting its target (the gradient of the map it predicted for)."""

    index: int
    map: Tensor  #: the prediction ``M(h, c)`` as a map, like the block's output
    columns: Optional[Tensor]  #: the unfolded SG input of the fused regression, or None where the SG runs on autograd
    context: Optional[Tensor]


class DecoupledCNN(DecoupledTrainer):
    """``[Conv2d -> (BatchNorm2d ->) act -> MaxPool -> conv SG] x len(channels) -> Flatten -> Linear``, stepped by
    :mod:`fastdni.ops`.

    The same training as :class:`DecoupledSequential` over ``nn.Sequential(Conv2d, BatchNorm2d, act, MaxPool2d)``
    blocks (``fastdni.experiments.models.cnn_blocks``) with a :class:`ConvSyntheticGradient` after each, built in the
    same order (the same seed gives the same initial parameters). Per block, in ``mode="dni"``:

    1. forward: the input unfolded (``F.unfold``) to rows ``[B*H*W, C_in*k*k]``; :func:`~fastdni.ops.dni_forward`
       (the convolution as a GEMM with bias; with BatchNorm, identity then :func:`~fastdni.ops.batch_norm_act`
       over the channels-last rows, the running statistics updated); the max pooling (ATen, with its argmax);
    2. the SG predicts the synthetic gradient of the pooled map; ``max_pool2d_with_indices_backward`` takes it to
       the activation;
    3. :func:`~fastdni.ops.batch_norm_act_update_` steps gamma and beta and gives ``dL/dpre``; ``dx`` (the target
       of the SG below) comes from ATen's ``convolution_backward`` on the pre-update weight; then
       :func:`~fastdni.ops.dni_update_` on the unfolded input steps the conv's weight (viewed ``[C_out, C_in*k*k]``)
       and bias, the optimizer in the weight-gradient GEMM's epilogue;
    4. the SG below regresses onto ``dx``.

    The classifier learns from the true gradient of the loss, which is also the top SG's target. A linear conv SG
    (``sg_hidden=()``, cDNI's) runs on the ops: :func:`~fastdni.ops.sg_predict` and
    :func:`~fastdni.ops.sg_regression_` over the unfolded pooled map, its label map a context term
    (:func:`conv_sg_fusion_blocker`). An MLP conv SG (DNI's, ``sg_hidden=(64,)`` in the experiment) runs its
    prediction and regression on autograd and its optimizer's ``step()``: the ops fuse an MLP SG as dense layers over
    one set of rows, which a second convolution is not (``MLP_CONV_SG``). :attr:`sg_fusion_blockers` says, per SG,
    why it is not fused (None: fused).

    Optimizers are ordinary ``torch.optim.Adam``, ``AdamW`` or ``SGD`` objects whose hyper-parameters and state the
    ops use in place (``optimizer_state_dict`` and checkpoints work); block ``i``'s holds the conv's weight and bias
    then gamma and beta (``DecoupledSequential``'s per-block optimizer). ``mode="backprop"`` trains through the same
    forward by autograd. In eval mode the forward is ATen's: ``F.conv2d``, ``F.batch_norm`` with the running
    statistics, the activation, the pooling.

    Args:
        in_channels, channels, image_size, out_features: input channels, each block's output channels, the input's
            ``H`` (and ``W``: an int or ``(H, W)``), the classes.
        kernel_size: of the blocks' "same" convolutions (odd); pool: the max pooling's kernel and stride.
        batch_norm: a ``BatchNorm2d`` between each convolution and its activation; bn_momentum, bn_eps: its own.
        activation: ``"identity"``, ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"leaky_relu"``.
        sg_hidden: hidden channels of every conv SG (``()``: linear); sg_kernel_size: its convolutions' kernel.
        context_features: cDNI: the SGs also see a context (labels ``[B]``, or features ``[B, K]``).
        context_map: the cDNI label term as a map per position (``ConvSyntheticGradient(context_map=(H, W))``),
            else a bias per channel.
        optimizer, sg_optimizer, head_optimizer, mode, sg_loss_weight, gradient_scale, backend: as in
            :class:`DecoupledMLP`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        image_size: Union[int, Sequence[int]],
        out_features: int,
        *,
        kernel_size: int = 5,
        pool: int = 2,
        batch_norm: bool = True,
        activation: str = "relu",
        sg_hidden: Sequence[int] = (),
        sg_kernel_size: int = 5,
        context_features: int = 0,
        context_map: bool = True,
        optimizer: OptimizerFactory = default_optimizer,
        sg_optimizer: Optional[OptimizerFactory] = None,
        head_optimizer: Optional[OptimizerFactory] = None,
        mode: str = "dni",
        sg_loss_weight: float = 1.0,
        gradient_scale: float = 1.0,
        backend: str = "auto",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels: expected at least one conv block (each gets a synthetic gradient)")
        for name, value in (("in_channels", in_channels), ("out_features", out_features), ("pool", pool),
                            *(("channels", c) for c in channels)):
            check_int(name, value, 1)
        for name, value in (("kernel_size", kernel_size), ("sg_kernel_size", sg_kernel_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % 2 == 0:
                raise ValueError(f"{name}: expected an odd int >= 1 (a 'same' convolution), got {value!r}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ValueError(f"image_size: expected an int >= 1 or (H, W), got {image_size!r}")
        self.image_size = size
        check_activation(activation)
        if batch_norm and (not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum <= 1.0):
            raise ValueError(f"bn_momentum: expected a number in [0, 1], got {bn_momentum!r}")
        if batch_norm:
            check_positive("bn_eps", float(bn_eps))
        # Built in cnn_blocks' order (conv, norm per block, then the classifier, then the SGs): the same seed gives
        # DecoupledSequential's initial parameters.
        self.convs, norms, shapes = nn.ModuleList(), nn.ModuleList(), []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            self.convs.append(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2))
            if batch_norm:
                norms.append(nn.BatchNorm2d(c_out, eps=float(bn_eps), momentum=float(bn_momentum)))
            size = (size[0] // pool, size[1] // pool)
            if min(size) < 1:
                raise ValueError(f"image_size: {image_size!r} is pooled to nothing by {len(channels)} blocks of pool {pool}")
            shapes.append((c_out, *size))
        self.norms: Optional[nn.ModuleList] = norms if batch_norm else None
        self.head = nn.Linear(channels[-1] * size[0] * size[1], out_features)
        self.synthetic_gradients = nn.ModuleList(
            ConvSyntheticGradient(c, sg_hidden, kernel_size=sg_kernel_size, context_features=context_features,
                                  context_map=(h, w) if context_map else None) for c, h, w in shapes)
        self.kernel_size, self.pool, self.activation = kernel_size, pool, activation
        self.sg_loss_weight = check_positive("sg_loss_weight", float(sg_loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.mode = mode
        self.optimizers = [optimizer([*conv.parameters(), *(norms[i].parameters() if batch_norm else ())])
                           for i, conv in enumerate(self.convs)]
        self.optimizers.append((head_optimizer or optimizer)(self.head.parameters()))
        self.sg_optimizers = [(sg_optimizer or optimizer)(sg.parameters()) for sg in self.synthetic_gradients]
        #: per SG, why its last training step ran on autograd (None: on the ops); see conv_sg_fusion_blocker
        self.sg_fusion_blockers: list[Optional[str]] = [None] * len(channels)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """The network's output: in training the ops' forward (differentiable: backprop mode trains through it),
        in eval mode ATen's convolution and BatchNorm with the running statistics."""
        self._check_input(x)
        h = x
        for i in range(len(self.convs)):
            h = self._block_forward(i, h).pooled if self.training else self._block_eval(i, h)
        return self.head(h.flatten(1))

    def _check_input(self, x: Tensor) -> None:
        weight = self.convs[0].weight
        check_tensor("x", x, ndim=4, like=weight)
        if x.shape[0] == 0 or x.shape[1] != weight.shape[1] or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"x: expected a batch [B >= 1, {weight.shape[1]}, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got shape {tuple(x.shape)}")

    def _block_forward(self, i: int, x: Tensor) -> _Block:
        """Block ``i`` in training on the ops (differentiable where grad is enabled)."""
        conv = self.convs[i]
        batch, _, height, width = x.shape
        columns = unfold_rows(x, self.kernel_size)
        weight = conv.weight.view(conv.weight.shape[0], -1)
        activation = "identity" if self.norms is not None else self.activation
        layer = ops.dni_forward(columns, weight, conv.bias, activation=activation, backend=self.backend)
        normed = normalise(self.norms[i], layer.h, self.activation, self.backend) if self.norms is not None else None
        activated = rows_map(layer.h if normed is None else normed.h, batch, height, width)
        pooled, indices = F.max_pool2d(activated, self.pool, return_indices=True)
        return _Block(columns, layer, normed, activated, pooled, indices)

    def _block_eval(self, i: int, x: Tensor) -> Tensor:
        conv = self.convs[i]
        y = F.conv2d(x, conv.weight, conv.bias, padding=self.kernel_size // 2)
        if self.norms is not None:
            norm = self.norms[i]
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        return F.max_pool2d(activate(y, self.activation), self.pool)

    # -- the decoupled step -------------------------------------------------------------------------------------

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        self._check_input(x)
        sg_losses: list[Optional[Tensor]] = [None] * len(self.convs)
        below: Optional[_Pending] = None  # the SG under this block, awaiting this block's dx
        h = x.detach()
        with torch.no_grad():
            for i in range(len(self.convs)):
                block = self._block_forward(i, h)
                predicted = self._predict(i, block.pooled, context)
                dx = self._update_block(i, h, block, predicted.map, need_input_grad=below is not None)
                if below is not None:
                    sg_losses[below.index] = self._regress(below, dx)
                below, h = predicted, block.pooled
        h_top = h.requires_grad_()
        output = self.head(h_top.flatten(1))
        loss = loss_fn(output, target)
        loss.backward()  # the true gradient: the classifier's, and the top SG's target
        step_optimizer(self.optimizers[-1])
        with torch.no_grad():
            sg_losses[below.index] = self._regress(below, h_top.grad)
        return StepResult(loss.detach(), output.detach(), tuple(sg_losses))

    def _update_block(self, i: int, x: Tensor, block: _Block, prediction: Tensor, *, need_input_grad: bool) -> Tensor:
        """Step block ``i`` on the synthetic gradient ``prediction / gradient_scale`` of its pooled output; returns
        ``dx`` (empty without ``need_input_grad``)."""
        conv, optimizer = self.convs[i], self.optimizers[i]
        grad_act = torch.ops.aten.max_pool2d_with_indices_backward(
            prediction, block.activated, [self.pool] * 2, [self.pool] * 2, [0, 0], [1, 1], False, block.indices)
        grad_rows = map_rows(grad_act)
        if self.norms is not None:
            delta = step_batch_norm(optimizer, self.norms[i], block.normed, grad_rows, grad_scale=self.gradient_scale,
                                    activation=self.activation, backend=self.backend)
        else:  # dx needs the delta itself; dni_update_ would form it only inside its GEMMs
            layer = block.layer
            delta = grad_rows * activation_derivative_from_output(layer.h, layer.pre, self.activation) / self.gradient_scale
        dx = x.new_empty(0)
        if need_input_grad:  # ATen's data gradient on the pre-update weight: no unfolded dx in memory
            padding = [self.kernel_size // 2] * 2
            dx = torch.ops.aten.convolution_backward(
                rows_map(delta, *block.activated.shape[:1], *block.activated.shape[2:]), x, conv.weight, None,
                [1, 1], padding, [1, 1], False, [0, 0], 1, [True, False, False])[0]
        step_on_delta(optimizer, [conv.weight, conv.bias], block.columns, delta, need_input_grad=False, backend=self.backend)
        return dx

    # -- the conv SGs -------------------------------------------------------------------------------------------

    def _predict(self, i: int, h: Tensor, context: Optional[Tensor]) -> _Pending:
        """SG ``i``'s prediction for the pooled map ``h`` ``[B, C, H, W]``."""
        sg = self.synthetic_gradients[i]
        check_context_presence(context, sg.context_weight is not None)
        if context is not None:
            check_context(context, batch=h.shape[0], features=sg.context_features, like=h)
        self.sg_fusion_blockers[i] = conv_sg_fusion_blocker(sg)
        if self.sg_fusion_blockers[i] is not None:
            with torch.enable_grad():
                return _Pending(i, sg(h, context), None, context)
        conv = sg.convs[0]
        batch, _, height, width = h.shape
        columns = unfold_rows(h, conv.kernel_size[0])
        rows = ops.dni_forward(columns, conv.weight.view(conv.weight.shape[0], -1), conv.bias, activation="identity",
                               backend=self.backend).h
        prediction = rows_map(rows, batch, height, width)
        if context is not None:  # the label term, a gather of U (ConvSyntheticGradient's, per position or channel)
            term = context_term(context, sg.context_weight)
            prediction = prediction + (term.view(prediction.shape) if sg.context_map else term[:, :, None, None])
        return _Pending(i, prediction, columns, context)

    def _regress(self, pending: _Pending, target: Tensor) -> Tensor:
        """Regress SG ``pending.index`` onto ``gradient_scale * target`` and step it; returns its loss
        ``sg_loss_weight * sum ||M - s t||^2 / B`` (``DNI``'s)."""
        sg, optimizer = self.synthetic_gradients[pending.index], self.sg_optimizers[pending.index]
        batch = target.shape[0]
        error = pending.map - self.gradient_scale * target
        loss = self.sg_loss_weight * (error * error).sum() / batch
        scale = 2.0 * self.sg_loss_weight / batch  # d loss / d M = 2 w (M - s t) / B
        if pending.columns is None:  # autograd, as DNI's regression
            with torch.enable_grad():
                pending.map.backward(error * scale)
            step_optimizer(optimizer)
            return loss
        conv = sg.convs[0]
        # dW = scale * error^T columns, db = scale * sum error: dni_update_ with the error as its prediction.
        step_on_delta(optimizer, [conv.weight, conv.bias], pending.columns, map_rows(error) * scale,
                      need_input_grad=False, backend=self.backend)
        if pending.context is not None:
            # U: the label term's gradient (the gather's: an index_add), stepped by the optimizer's own step(),
            # which skips W and b (no .grad: the op stepped them).
            grad = error.sum((2, 3)) if sg.context_map is None else error.reshape(batch, -1)
            grad = grad * scale
            context = pending.context
            sg.context_weight.grad = (grad.T @ context if context.dtype.is_floating_point else
                                      torch.zeros_like(sg.context_weight).index_add_(1, context, grad.T))
            step_optimizer(optimizer)
        return loss

    def extra_repr(self) -> str:
        norm = ", batch_norm=True" if self.norms is not None else ""
        return f"activation={self.activation!r}, mode={self.mode!r}, backend={self.backend!r}{norm}"
