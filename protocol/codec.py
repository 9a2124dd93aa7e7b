"""msgpack codec with out-of-band tensor frames.

A message is a list of frames:

    frame 0      msgpack header: (version, type_id, session_id, step, body, tensors)
    frame 1..k   one raw frame per tensor of 64 KiB or more, in `tensors` order
    last frame   HMAC-SHA256 of the frames above, only when a SharedSecret is configured

`body` is the message's wire tuple (see messages.py) with None where a tensor was. Each entry
of `tensors` is (body_index, dtype_name, shape, inline_bytes_or_None): tensors under 64 KiB
ride inline in the header (a frame of their own would cost more than the copy), larger ones
are None there and have their own frame.

Zero-copy both ways: encode hands the tensor's own memory to zmq (`send(copy=False)` keeps
a reference to it until libzmq is done), decode wraps the received zmq.Frame's buffer with
`np.frombuffer`, so the array *is* the frame memory (`is_zero_copy` checks that).

Decoding untrusted input: the size limit is checked first, then the signature, then msgpack,
then every header field, then each tensor's byte count against its frame. Every failure is
one `ProtocolError` subclass. No pickle, no msgpack ext types, nothing is evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgpack
import numpy as np
import zmq

from protocol.auth import SharedSecret
from protocol.batch_messages import DraftCall, EnsembleCall, EnsembleRows
from protocol.errors import (
    AuthenticationError,
    InvalidMessage,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    TensorMismatch,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.fields import MAX_TENSOR_NDIM, PROTOCOL_VERSION
from protocol.messages import Error, Handshake, Message, Shutdown
from protocol.pipeline_messages import CandidateTree, ContextUpdate, Verdict

MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE_ID: cls
    for cls in (Handshake, ContextUpdate, CandidateTree, Verdict, Error, Shutdown, EnsembleCall, EnsembleRows,
                DraftCall)
}

INLINE_TENSOR_LIMIT = 64 * 1024  # below: inline bytes in the header; at/above: own frame, no copy
MAX_TENSOR_BYTES = 1 << 40  # any one tensor's shape, zero dimensions counted as one: a bound numpy can allocate
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# header, one frame per out-of-band tensor, signature: far fewer than this. libzmq bounds each
# frame's size, not their number; a flood of frames is refused before any is looked at.
MAX_FRAMES = 8

# Explicit little-endian dtypes: the wire format does not depend on the host.
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("bool", "?"), ("uint8", "u1"), ("int8", "i1"), ("int16", "<i2"), ("int32", "<i4"),
        ("int64", "<i8"), ("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"),
    )
}
_NAME_BY_DTYPE = {dtype: name for name, dtype in WIRE_DTYPES.items()}

TensorLib = Literal["numpy", "torch"]
_HEADER_FIELDS = 6


# ---------------------------------------------------------------------------------------------
# encode


def _to_wire_array(value: Any) -> np.ndarray:
    """A C-contiguous little-endian numpy view of a numpy array or (CPU) torch tensor."""
    if not isinstance(value, np.ndarray):
        # torch: .numpy() shares memory (CPU) and keeps the tensor alive; GPU tensors copy here.
        value = value.detach().cpu().numpy()
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    return np.ascontiguousarray(value)  # no copy when already contiguous


def encode(
    message: Message,
    *,
    secret: SharedSecret | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[bytes | memoryview]:
    """Frames for `message`. Large tensors are memoryviews of the caller's memory: do not
    modify them until zmq has sent them (pass `track=True` to the channel's send to know)."""
    body = message.to_wire()
    tensors: list[tuple] = []
    frames: list[bytes | memoryview] = [b""]
    total = 0
    if message.TENSOR_FIELDS:
        body = list(body)
        for index in message.TENSOR_FIELDS:
            value = body[index]
            if value is None:
                continue
            array = _to_wire_array(value)
            name = _NAME_BY_DTYPE.get(array.dtype)
            if name is None:
                raise InvalidMessage(f"dtype {array.dtype} cannot go on the wire")
            if array.nbytes < INLINE_TENSOR_LIMIT:
                tensors.append((index, name, array.shape, array.tobytes()))
            else:
                tensors.append((index, name, array.shape, None))
                frames.append(memoryview(array).cast("B"))
                total += array.nbytes
            body[index] = None
    header = msgpack.packb(
        (message.version, message.TYPE_ID, message.session_id, message.step, body, tensors),
        use_bin_type=True,
    )
    frames[0] = header
    total += len(header)
    if total > max_message_bytes:
        raise MessageTooLarge(f"message of {total} bytes exceeds the {max_message_bytes}-byte limit")
    if secret is not None:
        frames.append(secret.sign(frames))
    return frames


# ---------------------------------------------------------------------------------------------
# decode


def _frame_view(frame: Any) -> memoryview:
    """A flat byte view of a zmq.Frame (its own buffer, no copy), bytes or memoryview."""
    view = frame.buffer if type(frame) is zmq.Frame else memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _check(condition: bool, detail: str) -> None:
    if not condition:
        raise MalformedMessage(detail)


def _decode_tensor(desc: Any, body: list, frames: list[memoryview], next_frame: int,
                   tensor_fields: tuple[int, ...]) -> int:
    """Place one tensor described by `desc` into `body`; return the next unused frame."""
    _check(type(desc) is tuple and len(desc) == 4, "tensor descriptor must have 4 fields")
    index, dtype_name, shape, inline = desc
    _check(type(index) is int and index in tensor_fields and body[index] is None,
           f"tensor descriptor points at field {index!r}, which is not a free tensor field")
    dtype = WIRE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise TensorMismatch(f"dtype {dtype_name!r} is not allowed on the wire")
    if (type(shape) is not tuple or len(shape) > MAX_TENSOR_NDIM
            or not all(type(dim) is int and dim >= 0 for dim in shape)):
        raise TensorMismatch(f"bad tensor shape {shape!r}")
    if inline is None:
        _check(next_frame < len(frames), "tensor frame missing (truncated message)")
        data = frames[next_frame]
        next_frame += 1
    else:
        _check(type(inline) is bytes, "inline tensor data must be bytes")
        data = inline
    expected, nonzero = dtype.itemsize, dtype.itemsize
    for dim in shape:
        expected *= dim
        nonzero *= max(dim, 1)
    if nonzero > MAX_TENSOR_BYTES:  # an empty array of (0, 2**62) matches 0 bytes, then numpy refuses it
        raise TensorMismatch(f"tensor shape {list(shape)} is too large")
    if expected != len(data):
        raise TensorMismatch(f"{dtype_name}{list(shape)} needs {expected} bytes, frame has {len(data)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if inline is not None:
        array = array.copy()  # small; makes it writable and independent of the header bytes
    body[index] = array
    return next_frame


def decode(
    frames: Sequence[Any],
    *,
    secret: SharedSecret | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tensor_lib: TensorLib = "numpy",
) -> Message:
    """The message in `frames` (zmq.Frame, bytes or memoryview). Tensors of 64 KiB and more
    are views on the received frames, not copies. Raises only `ProtocolError` subclasses."""
    if len(frames) > MAX_FRAMES:
        raise MessageTooLarge(f"message of {len(frames)} frames; a message has at most {MAX_FRAMES}")
    try:
        views = [_frame_view(frame) for frame in frames]
    except TypeError:
        raise MalformedMessage("frames must be bytes-like") from None
    total = sum(map(len, views))
    if total > max_message_bytes:
        raise MessageTooLarge(f"message of {total} bytes exceeds the {max_message_bytes}-byte limit")
    if secret is not None:
        if len(views) < 2:
            raise AuthenticationError("message carries no signature frame")
        secret.verify(views[:-1], views[-1])
        views = views[:-1]
    if not views:
        raise MalformedMessage("empty message")

    # Checks below are inlined rather than helper calls: this runs for every message.
    try:
        # use_list=False: arrays come back as tuples, the form messages keep indices in.
        header = msgpack.unpackb(views[0], use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # any parser failure on untrusted bytes is "malformed"
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(header) is not tuple or len(header) < 2 or type(header[0]) is not int:
        raise MalformedMessage("header must be an array starting with the version")
    version, type_id = header[0], header[1]
    # Version first: a peer on another version may use another layout for everything after it.
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}")
    message_cls = MESSAGE_TYPES.get(type_id) if type(type_id) is int else None
    if message_cls is None:
        raise UnknownMessageType(f"unknown message type {type_id!r}")
    if len(header) != _HEADER_FIELDS:
        raise MalformedMessage(f"header must have {_HEADER_FIELDS} fields")
    _, _, session_id, step, body, tensors = header
    if type(body) is not tuple or type(tensors) is not tuple:
        raise MalformedMessage("body and tensors must be arrays")

    next_frame = 1
    if tensors:
        _check(len(tensors) <= len(message_cls.TENSOR_FIELDS), "more tensors than tensor fields")
        _check(all(index < len(body) for index in message_cls.TENSOR_FIELDS), "body too short")
        body = list(body)
        for desc in tensors:
            next_frame = _decode_tensor(desc, body, views, next_frame, message_cls.TENSOR_FIELDS)
        if tensor_lib == "torch":
            _to_torch(body, message_cls.TENSOR_FIELDS)
        body = tuple(body)
    if next_frame != len(views):
        raise MalformedMessage(f"{len(views) - next_frame} unexpected extra frame(s)")

    try:
        return message_cls.from_wire(session_id, step, version, body)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a body with the wrong arity
        raise MalformedMessage(f"bad {message_cls.__name__} body: {exc}") from None


def _to_torch(body: list, tensor_fields: tuple[int, ...]) -> None:
    import torch  # only when a caller asks for torch tensors

    for index in tensor_fields:
        if isinstance(body[index], np.ndarray):
            array = body[index]
            if not array.flags.writeable:  # bytes input (tests); zmq frames are writable
                array = array.copy()
            body[index] = torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------
# evidence for "received without a copy"


def buffer_address_range(buffer: Any) -> tuple[int, int]:
    """[start, end) addresses of a bytes-like object or zmq.Frame's memory."""
    view = np.frombuffer(_frame_view(buffer), dtype=np.uint8)  # frombuffer never copies
    start = view.__array_interface__["data"][0]
    return start, start + view.nbytes


def owning_frame(array: np.ndarray) -> Any:
    """The zmq.Frame (or other buffer) a decoded array views, found through its `.base` chain;
    None if the array owns its memory (it was copied)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def is_zero_copy(array: Any, frame: Any) -> bool:
    """True if `array` (numpy or torch) lies inside `frame`'s memory, i.e. was not copied."""
    if not isinstance(array, np.ndarray):
        array = array.numpy()
    start, end = buffer_address_range(frame)
    address = array.__array_interface__["data"][0]
    return start <= address and address + array.nbytes <= end and np.shares_memory(
        array, np.frombuffer(_frame_view(frame), dtype=np.uint8))
