"""Messages between pipeline stages: a small fixed-size header (kind, micro-batch id, each tensor's
dtype and shape) sent before the tensors, all on non-blocking point-to-point ops.

The header lets the receiver allocate the payload and check it *before* using it: a stage fed a
tensor of the wrong shape or dtype fails with an error naming the sender, not with a matmul error
(or silently wrong numbers) three calls later.
"""
from __future__ import annotations

import enum
import queue
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

MAGIC = 0x0DA1
MAX_TENSORS = 2
MAX_DIMS = 5
_FIELDS_PER_TENSOR = 2 + MAX_DIMS  # dtype code, ndim, dims
HEADER_SIZE = 4 + MAX_TENSORS * _FIELDS_PER_TENSOR
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)

# Tags keep the two directions between a pair of ranks apart.
FORWARD_TAG, BACKWARD_TAG = 1, 2


class Kind(enum.IntEnum):
    TRAIN = 1  #: activation and labels of a training micro-batch
    EVAL = 2  #: activation and labels of a test batch (no update)
    EVAL_END = 3  #: the evaluation at this step is complete
    GRAD = 4  #: gradient target for the micro-batch's output
    STOP = 5  #: no more messages on this channel


class WireError(RuntimeError):
    """A peer sent a message this stage cannot use (bad header, wrong shape or dtype)."""


class Message:
    __slots__ = ("kind", "micro_batch", "tensors")

    def __init__(self, kind: Kind, micro_batch: int, tensors: Sequence[Tensor] = ()):
        self.kind, self.micro_batch, self.tensors = Kind(kind), int(micro_batch), tuple(tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{t.dtype}{list(t.shape)}" for t in self.tensors)
        return f"Message({self.kind.name}, micro_batch={self.micro_batch}, [{shapes}])"


def encode_header(message: Message) -> Tensor:
    if len(message.tensors) > MAX_TENSORS:
        raise ValueError(f"message: at most {MAX_TENSORS} tensors, got {len(message.tensors)}")
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    header[:4] = torch.tensor([MAGIC, int(message.kind), message.micro_batch, len(message.tensors)])
    for i, t in enumerate(message.tensors):
        if t.dtype not in DTYPES:
            raise ValueError(f"message: tensor {i} has unsupported dtype {t.dtype}")
        if t.dim() > MAX_DIMS:
            raise ValueError(f"message: tensor {i} has {t.dim()} dims, at most {MAX_DIMS} supported")
        base = 4 + i * _FIELDS_PER_TENSOR
        header[base] = DTYPES.index(t.dtype)
        header[base + 1] = t.dim()
        header[base + 2 : base + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def decode_header(header: Tensor, source: str) -> tuple[Kind, int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    """(kind, micro-batch id, [(dtype, shape)] of the tensors that follow); raises :class:`WireError`."""
    values = header.tolist()
    if values[0] != MAGIC:
        raise WireError(f"{source}: not a fastdni header (magic {values[0]:#x}); are both ranks the same fastdni version?")
    try:
        kind = Kind(values[1])
    except ValueError:
        raise WireError(f"{source}: unknown message kind {values[1]}") from None
    count = values[3]
    if not 0 <= count <= MAX_TENSORS:
        raise WireError(f"{source}: header announces {count} tensors, at most {MAX_TENSORS} supported")
    specs = []
    for i in range(count):
        code, ndim, *dims = values[4 + i * _FIELDS_PER_TENSOR : 4 + (i + 1) * _FIELDS_PER_TENSOR]
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims[:ndim]):
            raise WireError(f"{source}: corrupt header for tensor {i}: dtype code {code}, ndim {ndim}, dims {dims}")
        specs.append((DTYPES[code], tuple(dims[:ndim])))
    return kind, values[2], specs


class ConnectionLost(RuntimeError):
    """A send to or receive from a peer failed (its process died, or the network broke)."""


class Sender:
    """Sends to one peer from a thread of its own, fed by a queue of at most ``max_pending`` messages.

    A thread because gloo's ``isend``/``irecv`` only complete inside ``Work.wait()`` (``is_completed``
    stays false until then, and a ``wait`` with a timeout closes the connection when it expires), so
    the only way to overlap communication with compute is to wait elsewhere. A full queue makes
    :meth:`send` wait (back-pressure), calling ``serve`` meanwhile: the caller keeps receiving, so two
    stages sending to each other cannot deadlock.
    """

    def __init__(self, peer: int, tag: int, max_pending: int, serve: Callable[[], None]):
        if max_pending < 1:
            raise ValueError(f"max_pending: expected >= 1, got {max_pending}")
        self.peer, self.tag, self._serve = peer, tag, serve
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name=f"fastdni-send-{peer}-{tag}", daemon=True)
        self._thread.start()

    def send(self, message: Message) -> None:
        self._raise_if_failed()
        # Copies: the caller may change its tensors while they wait in the queue.
        tensors = (encode_header(message),) + tuple(t.detach().contiguous().clone() for t in message.tensors)
        while True:
            try:
                self._queue.put((message.kind, tensors), timeout=0.001)
                return
            except queue.Full:
                self._raise_if_failed()
                self._serve()

    def flush(self) -> None:
        """Wait until everything up to the STOP message has been sent."""
        while self._thread.is_alive():
            self._raise_if_failed()
            self._serve()
            self._thread.join(0.001)
        self._raise_if_failed()

    def _loop(self) -> None:
        try:
            while True:
                kind, tensors = self._queue.get()
                works = [dist.isend(t, self.peer, tag=self.tag) for t in tensors]
                for work in works:
                    work.wait()
                if kind == Kind.STOP:
                    return
        except BaseException as err:  # reported to the main thread by the next send()/flush()
            self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ConnectionLost(f"sending to rank {self.peer} failed: {self._error}")


class Receiver:
    """Receives from one peer on a thread of its own into a queue of at most ``max_pending`` messages;
    :meth:`poll` never blocks. Headers are checked on arrival (a bad one ends the stream with a
    :class:`WireError`)."""

    def __init__(self, peer: int, tag: int, max_pending: int):
        self.peer, self.tag = peer, tag
        self.stopped = False
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._loop, name=f"fastdni-recv-{peer}-{tag}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                header = torch.empty(HEADER_SIZE, dtype=torch.int64)
                dist.irecv(header, self.peer, tag=self.tag).wait()
                kind, micro_batch, specs = decode_header(header, f"message from rank {self.peer}")
                tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
                for work in [dist.irecv(t, self.peer, tag=self.tag) for t in tensors]:
                    work.wait()
                self._queue.put(Message(kind, micro_batch, tensors))
                if kind == Kind.STOP:
                    return
        except WireError as err:
            self._queue.put(err)
        except BaseException as err:
            self._queue.put(ConnectionLost(f"receiving from rank {self.peer} failed: {err}"))

    def poll(self) -> Optional[Message]:
        """The next message if one has arrived, else ``None``; raises what ended the stream."""
        if self.stopped:
            return None
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.stopped = True
            raise item
        if item.kind == Kind.STOP:
            self.stopped = True
        return item


def check_tensor_spec(name: str, tensor: Tensor, dtype: torch.dtype, example_shape: Sequence[int], source: str) -> None:
    """``tensor`` must be ``[batch, *example_shape]`` of ``dtype``: else :class:`WireError`."""
    if tensor.dtype != dtype:
        raise WireError(f"{source}: {name} has dtype {tensor.dtype}, expected {dtype}")
    if tensor.dim() != 1 + len(example_shape) or tuple(tensor.shape[1:]) != tuple(example_shape):
        expected = ", ".join(["batch", *map(str, example_shape)])
        raise WireError(f"{source}: {name} has shape {list(tensor.shape)}, expected [{expected}]")
