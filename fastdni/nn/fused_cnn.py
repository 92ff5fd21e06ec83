"""A CNN trained with a synthetic gradient after every conv block, each block's step run by the fused ops.

The conv layer's weight step is the linear one fed a different operand: with the block's input unfolded (im2col,
rows ``B*H*W``, columns ``k*k*C_in``) and its maps as channels-last rows ``[B*H*W, C]``, the weight gradient is
:func:`~fastdni.ops.dni_update_`'s GEMM (the optimizer in its epilogue) and ``BatchNorm2d`` is
:func:`~fastdni.ops.batch_norm_act` / :func:`~fastdni.ops.batch_norm_act_update_` over those rows. ATen does what
it does faster than a GEMM over an unfolded copy: the convolution's forward and ``dx`` (oneDNN's direct
convolutions; ``convolution_backward``) and the max pooling.

The conv weights are kept channels-last (``memory_format=torch.channels_last``: ``[C_out, k, k, C_in]`` in memory),
so that the weight, and its optimizer state, viewed ``[C_out, k*k*C_in]`` is the GEMM's operand in place, and the
unfold copies runs of ``k*C_in`` contiguous values (:func:`unfold_rows`). By default (``weight_grad="aten"``) the
weight gradient comes from ATen too: on the CPU measured here oneDNN's direct kernel computes it at about 2.4x the
rate of MKL's GEMM over the unfolded copy, which more than pays for the optimizer's separate pass
(docs/performance.md); ``weight_grad="gemm"`` runs the fused GEMM above.
"""
from __future__ import annotations

import math
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


def unfold_rows(x: Tensor, kernel_size: int, workspace: Optional["Workspace"] = None) -> Tensor:
    """``x`` ``[B, C, H, W]`` unfolded for a "same" convolution: ``[B*H*W, k*k*C]``, one row per output position
    (``(b, y, x)`` order, as :func:`map_rows`), columns in ``(ky, kx, c)`` order (:func:`weight_rows`'), copied from a
    channels-last zero-padded map in runs of ``k*C`` contiguous values (``F.unfold``'s ``(c, ky, kx)`` order, then
    transposed to rows, costs 3x as much). With a ``workspace``, written into memory kept between calls."""
    batch, channels, height, width = x.shape
    pad = kernel_size // 2
    shape = (batch, height + 2 * pad, width + 2 * pad, channels)
    padded = x.new_zeros(shape) if workspace is None else workspace.get("padded", shape, x).zero_()
    padded[:, pad:pad + height, pad:pad + width] = x.permute(0, 2, 3, 1)
    s_b, s_h, s_w, _ = padded.stride()
    windows = padded.as_strided((batch, height, width, kernel_size, kernel_size * channels), (s_b, s_h, s_w, s_h, 1))
    rows = (batch * height * width, kernel_size * kernel_size * channels)
    if workspace is None:
        return windows.reshape(rows)
    out = workspace.get("columns", rows, x)
    out.view(windows.shape).copy_(windows)
    return out


class Workspace:
    """Scratch tensors kept between steps, one flat buffer per name, grown as needed (not module state).

    The unfolded operand is the step's largest tensor (40 MB at B=64 for the CNN's second block): a fresh allocation of
    that size is a fresh mapping on the CPU, whose first-touch page faults cost more than the copy itself (measured
    16 ms against 1.4 ms into kept memory, one thread)."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def weight_rows(weight: Tensor) -> Tensor:
    """A channels-last conv weight ``[C_out, C_in, k, k]`` (or its optimizer state) as the GEMM's ``[C_out, k*k*C_in]``:
    a view, so that the ops' in-place steps land in it (:func:`channels_last_`)."""
    return weight.permute(0, 2, 3, 1).view(weight.shape[0], -1)


def channels_last_(weight: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``weight`` and its optimizer state in channels-last layout, in place (values unchanged; a no-op once they are:
    a state loaded from a checkpoint, or a weight assigned anew, may come contiguous)."""
    if not weight.is_contiguous(memory_format=torch.channels_last):
        weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    state = optimizer.state.get(weight, {})
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == weight.shape and \
                not value.is_contiguous(memory_format=torch.channels_last):
            state[key] = value.contiguous(memory_format=torch.channels_last)


def map_rows(x: Tensor) -> Tensor:
    """A map ``[B, C, H, W]`` as channels-last rows ``[B*H*W, C]`` (a view where ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def channels_last_input(x: Tensor) -> Tensor:
    """``x`` ``[B, C, H, W]`` in channels-last memory with channels-last strides, also for ``C = 1``.

    For one channel ``contiguous(memory_format=torch.channels_last)`` keeps the plain strides (both layouts are
    the same memory), and ATen's convolution then returns a plain map: the block's rows (:func:`map_rows`) and its
    ``convolution_backward`` would each copy it to channels-last (5 ms of a 76 ms DNI step on MNIST at batch 64,
    one thread). Spelling the strides out makes the convolution return channels-last maps."""
    x = x.contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    return x.as_strided(x.shape, (height * width * channels, 1, width * channels, channels), x.storage_offset())


def rows_map(rows: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Channels-last rows ``[B*H*W, C]`` as a map ``[B, C, H, W]`` (a view, channels-last strides)."""
    return rows.view(batch, height, width, -1).permute(0, 3, 1, 2)


def conv_sg_fusion_blocker(sg: ConvSyntheticGradient) -> Optional[str]:
    """Why the ops cannot step ``sg`` (it then runs on autograd and its optimizer's ``step()``), or None.

    Each convolution of a conv SG is a linear layer over its unfolded input (``[B*H*W, k*k*C]`` rows to ``C_out``
    columns): its prediction is ATen's convolutions (ReLU between, the label term, a gather, added to the first's
    output); its regression steps each conv as a block's (:func:`~fastdni.ops.dni_update_` on the unfolded input, fed
    the error pushed back through the convs above by ``convolution_backward``; ``W`` and ``b`` stepped in the GEMM's
    epilogue), and the label weight ``U`` by the optimizer's own ``step()`` on its gradient (an ``index_add``). Not
    ``sg_predict``/``sg_regression_``: their SG maps its input's features to as many through dense layers over one
    set of rows (the prediction shaped like the input, in their checks and kernels), where a conv SG reads ``k*k*C``
    columns per row, and its second convolution the hidden map at neighbouring positions."""
    if not all(p.requires_grad for p in sg.parameters()):
        return "some SG parameters are frozen (requires_grad=False)"
    return None


#: How :class:`DecoupledCNN` steps a conv's weight: the ops' GEMM over the unfolded input, or ATen's gradient.
WEIGHT_GRADS = ("aten", "gemm")


class _Block(NamedTuple):
    """What a conv block's training forward keeps for its update."""

    pre: Optional[Tensor]  #: the convolution's output, ``[B, C, H, W]`` (channels-last), without BatchNorm
    normed: Optional[ops.BatchNormResult]  #: ``act(BatchNorm(pre))`` over channels-last rows ``[B*H*W, C]``
    activated: Tensor  #: the activation, ``[B, C, H, W]`` (channels-last)
    pooled: Tensor  #: the block's output, ``[B, C, H/p, W/p]``
    indices: Tensor  #: the max pooling's argmax


class _Pending(NamedTuple):
    """An SG prediction awaiting its target (the gradient of the map it predicted for)."""

    index: int
    inputs: list[Tensor]  #: the input of each SG conv: the block's pooled map, then the hidden maps
    map: Tensor  #: the prediction ``M(h, c)``, like the pooled map
    fused: bool  #: whether the ops regress it (else autograd: ``map`` holds the SG's graph)
    context: Optional[Tensor]


class DecoupledCNN(DecoupledTrainer):
    """``[Conv2d -> (BatchNorm2d ->) act -> MaxPool -> conv SG] x len(channels) -> Flatten -> Linear``, stepped by
    :mod:`fastdni.ops`.

    The same training as :class:`DecoupledSequential` over ``nn.Sequential(Conv2d, BatchNorm2d, act, MaxPool2d)``
    blocks (``fastdni.experiments.models.cnn_blocks``) with a :class:`ConvSyntheticGradient` after each, built in the
    same order (the same seed gives the same initial parameters). Per block, in ``mode="dni"``:

    1. forward: ATen's convolution; with BatchNorm, :func:`~fastdni.ops.batch_norm_act` over the map's channels-last
       rows (batch statistics, the running statistics updated); ATen's max pooling (with its argmax);
    2. the SG predicts the synthetic gradient of the pooled map; ``max_pool2d_with_indices_backward`` takes it to
       the activation;
    3. :func:`~fastdni.ops.batch_norm_act_update_` steps gamma and beta and gives ``dL/dpre``; ``dx`` (the target
       of the SG below) comes from ATen's ``convolution_backward`` on the pre-update weight; then
       :func:`~fastdni.ops.dni_update_` on the unfolded input (:func:`unfold_rows`) steps the conv's weight (viewed
       ``[C_out, k*k*C_in]``, :func:`weight_rows`) and bias, the optimizer in the weight-gradient GEMM's epilogue;
    4. the SG below regresses onto ``dx``.

    The classifier learns from the true gradient of the loss, which is also the top SG's target. The conv SGs (linear,
    cDNI's, or with hidden convs, DNI's ``sg_hidden=(64,)`` in the experiment) predict with ATen's convolutions and
    step each conv on the ops the same way (:func:`conv_sg_fusion_blocker`; :attr:`sg_fusion_blockers` says, per
    SG, why it ran on autograd instead, None where it did not).

    Optimizers are ordinary ``torch.optim.Adam``, ``AdamW`` or ``SGD`` objects whose hyper-parameters and state the
    ops use in place (``optimizer_state_dict`` and checkpoints work); block ``i``'s holds the conv's weight and bias
    then gamma and beta (``DecoupledSequential``'s per-block optimizer). ``mode="backprop"`` trains through
    :meth:`forward` (ATen's layers) by autograd: no decoupled layer step to fuse. In eval mode BatchNorm uses the
    running statistics.

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
        weight_grad: ``"aten"`` (the default): every conv's weight and bias gradient from ATen's
            ``convolution_backward`` (oneDNN's direct kernels on the CPU), in the call that gives ``dx``, then the
            optimizer's own ``step()``; no unfolded copy (faster on the CPU measured here, docs/performance.md).
            ``"gemm"``: the GEMM over the unfolded input with the optimizer in its epilogue (above).
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
        weight_grad: str = "aten",
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
        for conv in (*self.convs, *(conv for sg in self.synthetic_gradients for conv in sg.convs)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)  # see the module docstring
        self.kernel_size, self.pool, self.activation = kernel_size, pool, activation
        self.sg_loss_weight = check_positive("sg_loss_weight", float(sg_loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        if weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"weight_grad: expected one of {WEIGHT_GRADS}, got {weight_grad!r}")
        self.weight_grad = weight_grad
        self.mode = mode
        self.optimizers = [optimizer([*conv.parameters(), *(norms[i].parameters() if batch_norm else ())])
                           for i, conv in enumerate(self.convs)]
        self.optimizers.append((head_optimizer or optimizer)(self.head.parameters()))
        self.sg_optimizers = [(sg_optimizer or optimizer)(sg.parameters()) for sg in self.synthetic_gradients]
        self.workspace = Workspace()  #: the unfolded operands' memory, kept between steps (:func:`unfold_rows`)
        #: per SG, why its last training step ran on autograd (None: on the ops); see conv_sg_fusion_blocker
        self.sg_fusion_blockers: list[Optional[str]] = [None] * len(channels)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """The network's output through ATen's layers: the convolution, the ``BatchNorm2d`` module (batch statistics
        in training, the running ones updated; the running statistics in eval mode), the activation, the pooling.
        Backprop mode trains through it by autograd (there is no layer step to fuse: the gradient comes back through
        the whole network); the decoupled step runs each block on the ops."""
        self._check_input(x)
        h = x
        for i, conv in enumerate(self.convs):
            h = F.conv2d(h, conv.weight, conv.bias, padding=self.kernel_size // 2)
            if self.norms is not None:
                h = self.norms[i](h)
            h = F.max_pool2d(activate(h, self.activation), self.pool)
        return self.head(h.flatten(1))

    def _check_input(self, x: Tensor) -> None:
        weight = self.convs[0].weight
        check_tensor("x", x, ndim=4, like=weight)
        if x.shape[0] == 0 or x.shape[1] != weight.shape[1] or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"x: expected a batch [B >= 1, {weight.shape[1]}, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got shape {tuple(x.shape)}")

    def _block_forward(self, i: int, x: Tensor) -> _Block:
        """Block ``i`` in training, outside any graph: ATen's convolution, BatchNorm (batch statistics, the running
        ones updated) and the activation on the ops over channels-last rows, ATen's max pooling."""
        conv = self.convs[i]
        pre = F.conv2d(x, conv.weight, conv.bias, padding=self.kernel_size // 2)  # channels-last: as is the weight
        if self.norms is None:
            activated = activate(pre, self.activation)
            return _Block(pre, None, activated, *F.max_pool2d(activated, self.pool, return_indices=True))
        normed = normalise(self.norms[i], map_rows(pre), self.activation, self.backend)
        activated = rows_map(normed.h, pre.shape[0], *pre.shape[2:])
        # pre is not kept: the update reads xhat (and h); only gelu forms y = gamma xhat + beta again
        return _Block(None, normed, activated, *F.max_pool2d(activated, self.pool, return_indices=True))

    # -- the decoupled step -------------------------------------------------------------------------------------

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        self._check_input(x)
        sg_losses: list[Optional[Tensor]] = [None] * len(self.convs)
        below: Optional[_Pending] = None  # the SG under this block, awaiting this block's dx
        h = channels_last_input(x.detach())
        with torch.no_grad():
            for i in range(len(self.convs)):
                block = self._block_forward(i, h)
                predicted = self._predict(i, block.pooled, context)
                dx = self._update_block(i, h, block, predicted.map, need_input_grad=below is not None)
                if below is not None:
                    sg_losses[below.index] = self._regress(below, dx)
                below, h = predicted, block.pooled
                del block, dx  # before the next block's forward: the peak holds one block's maps
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
        if self.norms is not None:
            delta = rows_map(step_batch_norm(optimizer, self.norms[i], block.normed, map_rows(grad_act),
                                             grad_scale=self.gradient_scale, activation=self.activation,
                                             backend=self.backend), x.shape[0], *x.shape[2:])
        else:  # ATen's dx needs the delta itself (dni_update_ forms it only inside its GEMMs)
            delta = grad_act * activation_derivative_from_output(block.activated, block.pre, self.activation)
            delta = delta / self.gradient_scale
        dx = self._step_conv(optimizer, conv, x, delta, need_input_grad)
        return x.new_empty(0) if dx is None else dx

    def _step_conv(self, optimizer: torch.optim.Optimizer, conv: nn.Conv2d, x: Tensor, delta: Tensor,
                   need_input_grad: bool) -> Optional[Tensor]:
        """Step ``conv``'s weight and bias on ``delta = dL/dpre`` (a map, channels-last) for its input ``x``; returns
        ``dx`` (from the pre-update weight; ATen's ``convolution_backward``) where asked for, else None.

        ``weight_grad="gemm"``: the GEMM ``delta^T unfold(x)`` of :func:`~fastdni.ops.dni_update_`, the optimizer in its
        epilogue. ``"aten"``: ATen's weight and bias gradients, in the call that gives ``dx``, then the optimizer's
        own ``step()`` on them (the other parameters of its group have no ``.grad``: the ops stepped them)."""
        padding = list(conv.padding)
        if self.weight_grad == "aten":
            dx, conv.weight.grad, conv.bias.grad = torch.ops.aten.convolution_backward(
                delta, x, conv.weight, [conv.weight.shape[0]], [1, 1], padding, [1, 1], False, [0, 0], 1,
                [need_input_grad, True, True])
            step_optimizer(optimizer)
            return dx
        dx = None
        if need_input_grad:
            dx = torch.ops.aten.convolution_backward(delta, x, conv.weight, None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        channels_last_(conv.weight, optimizer)
        step_on_delta(optimizer, [conv.weight, conv.bias], unfold_rows(x, conv.kernel_size[0], self.workspace),
                      map_rows(delta), need_input_grad=False, backend=self.backend, weight_operand=weight_rows)
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
                return _Pending(i, [h], sg(h, context), False, context)
        inputs, z = [h], h
        for layer, conv in enumerate(sg.convs):  # ConvSyntheticGradient.forward, keeping each conv's input
            if layer:
                inputs.append(z)
            z = F.conv2d(z, conv.weight, conv.bias, padding=conv.padding)
            if layer == 0 and context is not None:  # the label term, a gather of U (per position or per channel)
                term = context_term(context, sg.context_weight)
                z = z + (term.view(z.shape) if sg.context_map else term[:, :, None, None])
            if layer < len(sg.convs) - 1:
                z = F.relu(z)
        return _Pending(i, inputs, z, True, context)

    def _regress(self, pending: _Pending, target: Tensor) -> Tensor:
        """Regress SG ``pending.index`` onto ``gradient_scale * target`` and step it; returns its loss
        ``sg_loss_weight * sum ||M - s t||^2 / B`` (``DNI``'s)."""
        sg, optimizer = self.synthetic_gradients[pending.index], self.sg_optimizers[pending.index]
        batch = target.shape[0]
        error = pending.map - self.gradient_scale * target
        loss = self.sg_loss_weight * (error * error).sum() / batch
        grad = error * (2.0 * self.sg_loss_weight / batch)  # d loss / d M, as DNI's regression
        if not pending.fused:
            with torch.enable_grad():
                pending.map.backward(grad)
            step_optimizer(optimizer)
            return loss
        for layer in reversed(range(len(sg.convs))):  # top conv first: each below needs the gradient through it
            z = pending.inputs[layer]
            grad_z = self._step_conv(optimizer, sg.convs[layer], z, grad, need_input_grad=layer > 0)
            if layer:  # through the ReLU under this conv
                grad = grad_z * (z > 0)
        if pending.context is not None:
            # U: the label term's gradient (the gather's: an index_add), stepped by the optimizer's own step(),
            # which skips the convs (no .grad: the ops stepped them).
            grad = grad.sum((2, 3)) if sg.context_map is None else grad.reshape(batch, -1)
            context = pending.context
            sg.context_weight.grad = (grad.T @ context if context.dtype.is_floating_point else
                                      torch.zeros_like(sg.context_weight).index_add_(1, context, grad.T))
            step_optimizer(optimizer)
        return loss

    def extra_repr(self) -> str:
        norm = ", batch_norm=True" if self.norms is not None else ""
        return (f"activation={self.activation!r}, mode={self.mode!r}, backend={self.backend!r}, "
                f"weight_grad={self.weight_grad!r}{norm}")
