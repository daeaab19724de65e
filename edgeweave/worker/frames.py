"""The wire format between gateway and stages: a small header, then raw tensor bytes.

Layout of one frame (all integers little-endian)::

    offset  size         field
    0       4            magic ``b"EWF"`` + format version byte (1)
    4       4            header_len: uint32, ≤ MAX_HEADER_BYTES
    8       8            payload_len: uint64
    16      header_len   header: compact UTF-8 JSON, right-padded with spaces so that
                         the payload starts at a multiple of 8
    16+hl   payload_len  each tensor's C-order bytes in header order, each padded with
                         zeros to a multiple of 8 bytes

The header is ``{"id": str, "deadline": float | null, "kind": "data" | "error",
"tensors": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]}`` plus
``"error": str`` in (and only in) error frames, which carry no tensors. ``deadline``
is absolute, in Unix seconds, so that it survives hops without clock arithmetic.
Two optional fields (:data:`OPTIONAL_HEADER_KEYS`) may follow:

- ``"reply_to"``: the base URL of the gateway replica that holds the request; the
  last stage sends the result there rather than to its ``--downstream`` (the
  gateway Service), so that a pipeline may have several gateway replicas.
- ``"category"`` (error frames only): why the request failed, as one of
  :data:`ERROR_CATEGORIES`, so that the gateway picks the client's status without
  reading the message.

Receivers from before these fields refuse any header key they do not know, and the
format version did not change for them: a sender includes an optional field only
when its receiver announced it reads it (see ``edgeweave.worker.link.FIELDS_HEADER``
and :meth:`FrameHeader.reduced_to`). Old frames, without them, decode as before.

Why this shape: tensors are never pickled or encoded per element; the encoder hands
out the arrays' own memory (:func:`encode_frame` returns a list of buffers to write
one after another) and the decoder returns numpy arrays that *view* the received
buffer. Padding keeps every tensor 8-byte aligned within the frame, so the views are
aligned whenever the buffer is (bytes objects and bytearrays are). Small frames are
coalesced into one buffer, so a small request costs one write.

Validation and recovery: every field is checked (magic, version, lengths, JSON
syntax, duplicate keys, unknown keys, id, deadline, kind, error text, reply_to,
category, tensor names, dtypes against :data:`DTYPES`, ranks, dims, element counts,
the payload length against the tensors, the frame size against ``max_frame_bytes``,
bool bytes) and a bad frame raises :class:`FrameError` saying what is wrong. Because
the 16-byte prefix states the frame's full length *before* anything else is trusted,
there are two kinds of failure on a stream:

- **recoverable** (``FrameError``, ``error.recoverable is True``): the prefix was
  sound, so the whole frame was consumed and the stream is positioned at the next
  frame. Refuse this frame (``error.frame_id`` names its request when the id itself
  was valid, so the sender can be told) and keep reading.
- **unrecoverable** (:class:`FramingError`, ``recoverable is False``): bad magic or
  version, a length over the limits, or a stream that ends inside a frame. Where the
  next frame starts is unknown: close the stream. The stage and its other streams
  live on.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import numpy as np

from edgeweave.errors import EdgeweaveError

MAGIC = b"EWF"
VERSION = 1
PREFIX = struct.Struct("<4sIQ")
PREFIX_BYTES = PREFIX.size  # 16
ALIGNMENT = 8
"""Every tensor starts at a multiple of this (the widest allowed dtype)."""

MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_ERROR_CHARS = 4096
MAX_REPLY_TO_CHARS = 256
MAX_CATEGORY_CHARS = 32
MAX_TENSORS = 1024
MAX_RANK = 8
MAX_ELEMENTS = 2**32
"""Per tensor: more than any edge model's activations, less than overflows int64 sizes."""
COALESCE_BYTES = 64 * 1024
"""Frames whose payload is at most this size are encoded as one buffer (one write)."""

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in (
        ("float32", "<f4"), ("float16", "<f2"), ("float64", "<f8"), ("int64", "<i8"),
        ("int32", "<i4"), ("int8", "i1"), ("uint8", "u1"), ("bool", "?"),
    )
}
"""The tensor element types a frame may carry, by wire name (numpy's name)."""

OPTIONAL_HEADER_KEYS = ("reply_to", "category")
"""Header fields added after version 1 shipped: sent only to receivers that read them."""
HEADER_KEYS = frozenset({"id", "deadline", "kind", "tensors", "error", *OPTIONAL_HEADER_KEYS})
REQUIRED_HEADER_KEYS = ("id", "deadline", "kind", "tensors")
ERROR_CATEGORIES = ("invalid_input", "too_large", "deadline", "overloaded", "internal")
"""Why a stage refused a request, as its error frame says. A receiver must accept (and
treat as ``internal``) a well-formed category it does not know: a newer sender may add
one, and refusing its frame would turn an answer into a lost request."""
_CATEGORY_SHAPE = re.compile(r"[a-z][a-z0-9_]*")
TENSOR_KEYS = frozenset({"name", "dtype", "shape"})
FrameKind = Literal["data", "error"]


class FrameError(EdgeweaveError, ValueError):
    """A frame was refused. ``recoverable``: the stream can go on to the next frame."""

    recoverable = True

    def __init__(
        self, message: str, *, frame_id: str | None = None, reply_to: str | None = None
    ) -> None:
        super().__init__(message)
        self.frame_id = frame_id
        """The refused frame's request id, when the header got far enough to tell."""
        self.reply_to = reply_to
        """The refused frame's valid ``reply_to``, so its error frame finds the gateway
        replica that holds the request."""


class FrameTooLarge(FrameError):
    """A frame would be over the size limit (a result larger than the input that caused it)."""


class FramingError(FrameError):
    """The stream lost its framing: where the next frame starts is unknown; close it."""

    recoverable = False


@dataclass(frozen=True)
class FrameHeader:
    """What a frame says about its request; the tensors' specs come from the arrays."""

    id: str
    deadline: float | None = None
    kind: FrameKind = "data"
    error: str | None = None
    reply_to: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        object.__setattr__(self, "deadline", _checked_deadline(self.deadline, self.id))
        _check_kind_and_error(self.kind, self.error, self.id)
        _check_reply_to(self.reply_to, self.id)
        _check_category(self.category, self.kind, self.id)

    @classmethod
    def for_error(
        cls,
        frame_id: str,
        message: str,
        deadline: float | None = None,
        *,
        category: str | None = None,
        reply_to: str | None = None,
    ) -> FrameHeader:
        """An error frame for request ``frame_id``; the message is cut to fit the limit."""
        return cls(
            frame_id, deadline, "error", message[:MAX_ERROR_CHARS] or "error",
            reply_to=reply_to, category=category,
        )

    def reduced_to(self, fields: Collection[str]) -> FrameHeader:
        """This header without the optional fields a receiver does not read."""
        reply_to = self.reply_to if "reply_to" in fields else None
        category = self.category if "category" in fields else None
        if (reply_to, category) == (self.reply_to, self.category):
            return self
        return replace(self, reply_to=reply_to, category=category)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded frame. Its arrays view the buffer it was decoded from (no copy):
    read-only when that buffer was ``bytes``, and valid as long as they are referenced."""

    header: FrameHeader
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    nbytes: int = 0
    """Size of the frame on the wire."""

    def __repr__(self) -> str:
        """Names, dtypes and shapes only: a frame's repr lands in logs, its data must not."""
        specs = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.tensors.items())
        return f"Frame({self.header!r}, {{{specs}}}, nbytes={self.nbytes})"

    @property
    def id(self) -> str:
        return self.header.id

    @property
    def deadline(self) -> float | None:
        return self.header.deadline

    @property
    def is_error(self) -> bool:
        return self.header.kind == "error"


# --------------------------------------------------------------------- encoding
def encode_frame(
    header: FrameHeader,
    arrays: Mapping[str, np.ndarray],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> list[bytes | memoryview]:
    """Buffers that, written back to back, make one frame.

    Large arrays are not copied: their memory is in the list, so do not modify them
    until the buffers are written. Arrays that are not C-contiguous little-endian
    are converted first (that one copy is unavoidable).
    """
    if header.kind == "error" and arrays:
        raise FrameError("an error frame carries no tensors", frame_id=header.id)
    prepared = [(name, _wire_array(name, array, header.id)) for name, array in arrays.items()]
    specs = [TensorSpec(name, array.dtype.name, tuple(array.shape)) for name, array in prepared]
    header_bytes = _header_bytes(header, specs)
    payload_len = sum(_padded(array.nbytes) for _, array in prepared)
    frame_bytes = PREFIX_BYTES + len(header_bytes) + payload_len
    if frame_bytes > max_frame_bytes:
        raise FrameTooLarge(
            f"frame {header.id!r} would be {frame_bytes} bytes, over the "
            f"{max_frame_bytes}-byte limit", frame_id=header.id,
        )
    buffers: list[bytes | memoryview] = [
        PREFIX.pack(MAGIC + bytes([VERSION]), len(header_bytes), payload_len) + header_bytes
    ]
    for _, array in prepared:
        if array.nbytes:
            buffers.append(memoryview(array.reshape(-1).view(np.uint8)))
        padding = _padded(array.nbytes) - array.nbytes
        if padding:
            buffers.append(bytes(padding))
    if payload_len <= COALESCE_BYTES:
        return [b"".join(buffers)]
    return buffers


def encode_frame_bytes(
    header: FrameHeader,
    arrays: Mapping[str, np.ndarray],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """One frame as a single bytes object (copies: for small frames and tests)."""
    return b"".join(encode_frame(header, arrays, max_frame_bytes=max_frame_bytes))


def _wire_array(name: str, array: np.ndarray, frame_id: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.name not in DTYPES or array.dtype.kind == "V":
        raise FrameError(
            f"tensor {name!r} has dtype {array.dtype}, which frames do not carry "
            f"(allowed: {', '.join(DTYPES)})", frame_id=frame_id,
        )
    wire = DTYPES[array.dtype.name]
    if array.dtype != wire or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire)
    return array


def _header_bytes(header: FrameHeader, specs: Sequence[TensorSpec]) -> bytes:
    document: dict[str, Any] = {
        "id": header.id,
        "deadline": header.deadline,
        "kind": header.kind,
        "tensors": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs],
    }
    if header.error is not None:
        document["error"] = header.error
    if header.reply_to is not None:
        document["reply_to"] = header.reply_to
    if header.category is not None:
        document["category"] = header.category
    text = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    _check_header_document(document, len(text))  # the decoder's rules, on the sender's side
    return text + b" " * (_padded(PREFIX_BYTES + len(text)) - PREFIX_BYTES - len(text))


def _padded(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------- decoding
def decode_frame(
    buffer: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame:
    """Decode exactly one frame; its arrays view ``buffer``."""
    view = _byte_view(buffer)
    if len(view) < PREFIX_BYTES:
        raise FramingError(f"a frame is at least {PREFIX_BYTES} bytes; got {len(view)}")
    header_len, payload_len = parse_prefix(view[:PREFIX_BYTES], max_frame_bytes=max_frame_bytes)
    declared = PREFIX_BYTES + header_len + payload_len
    if len(view) != declared:
        raise FramingError(f"the frame is {len(view)} bytes but its prefix declares {declared}")
    return _decode_body(view[PREFIX_BYTES:], header_len, payload_len)


def parse_prefix(
    prefix: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[int, int]:
    """``(header_len, payload_len)`` from the first 16 bytes of a frame."""
    magic, header_len, payload_len = PREFIX.unpack(prefix)
    if magic[:3] != MAGIC:
        raise FramingError(
            f"not an edgeweave frame: it starts with {bytes(magic)!r}, not {MAGIC!r}"
        )
    if magic[3] != VERSION:
        raise FramingError(f"frame format version {magic[3]} is not the supported {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise FramingError(f"frame header of {header_len} bytes is over {MAX_HEADER_BYTES}")
    if PREFIX_BYTES + header_len + payload_len > max_frame_bytes:
        raise FramingError(
            f"frame of {PREFIX_BYTES + header_len + payload_len} bytes is over the "
            f"{max_frame_bytes}-byte limit"
        )
    return header_len, payload_len


def _byte_view(buffer: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _decode_body(body: memoryview, header_len: int, payload_len: int) -> Frame:
    """Decode header and payload that follow a valid prefix (``len(body)`` is exact)."""
    header, specs = _parse_header(body[:header_len])
    expected = sum(_padded(spec.nbytes) for spec in specs)
    if payload_len != expected:
        raise FrameError(
            f"frame {header.id!r}: payload is {payload_len} bytes but its tensors need "
            f"{expected}", frame_id=header.id, reply_to=header.reply_to,
        )
    tensors: dict[str, np.ndarray] = {}
    offset = header_len
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        array = np.frombuffer(body, dtype=dtype, count=math.prod(spec.shape), offset=offset)
        if spec.dtype == "bool" and array.size and array.view(np.uint8).max() > 1:
            raise FrameError(
                f"frame {header.id!r}: bool tensor {spec.name!r} holds bytes other than 0 and 1",
                frame_id=header.id, reply_to=header.reply_to,
            )
        tensors[spec.name] = array.reshape(spec.shape)
        offset += _padded(spec.nbytes)
    return Frame(header, tensors, PREFIX_BYTES + header_len + payload_len)


def _parse_header(raw: memoryview) -> tuple[FrameHeader, list[TensorSpec]]:
    try:
        text = str(raw, "utf-8")
        document = json.loads(
            text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
        )
    except UnicodeDecodeError:
        raise FrameError("frame header is not UTF-8") from None
    except RecursionError:
        raise FrameError("frame header JSON is nested too deeply") from None
    except ValueError as exc:
        raise FrameError(f"frame header is not valid JSON: {exc}") from None
    return _check_header_document(document, len(raw))


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"key {duplicate!r} appears twice")
    return document


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


# --------------------------------------------------------------------- field rules
def _check_header_document(document: Any, size: int) -> tuple[FrameHeader, list[TensorSpec]]:
    """Check a parsed header against every rule; the encoder runs it too."""
    if size > MAX_HEADER_BYTES:
        raise FrameError(f"frame header of {size} bytes is over {MAX_HEADER_BYTES}")
    if not isinstance(document, dict):
        raise FrameError(f"frame header must be a JSON object, not {_json_type(document)}")
    frame_id = document.get("id")
    _check_id(frame_id)
    try:
        return _check_identified_header(document, frame_id)
    except FrameError as exc:
        reply_to = document.get("reply_to")
        if exc.reply_to is None and reply_to_problem(reply_to) is None:
            exc.reply_to = reply_to  # the refusal, too, goes back to the replica that asked
        raise


def _check_identified_header(
    document: dict[str, Any], frame_id: str
) -> tuple[FrameHeader, list[TensorSpec]]:
    unknown = sorted(set(document) - HEADER_KEYS)
    if unknown:
        raise FrameError(
            f"frame {frame_id!r}: unknown header field(s) {unknown}", frame_id=frame_id
        )
    missing = [key for key in REQUIRED_HEADER_KEYS if key not in document]
    if missing:
        raise FrameError(f"frame {frame_id!r}: header lacks {missing}", frame_id=frame_id)
    header = FrameHeader(
        frame_id, document["deadline"], document["kind"], document.get("error"),
        document.get("reply_to"), document.get("category"),
    )
    specs = _check_tensor_specs(document["tensors"], frame_id)
    if header.kind == "error" and specs:
        raise FrameError(
            f"frame {frame_id!r}: an error frame carries no tensors", frame_id=frame_id
        )
    return header, specs


def _check_id(frame_id: Any) -> None:
    if (
        not isinstance(frame_id, str)
        or not 0 < len(frame_id) <= MAX_ID_CHARS
        or not frame_id.isprintable()
    ):
        raise FrameError(
            f"frame 'id' must be a non-empty string of at most {MAX_ID_CHARS} printable "
            f"characters, not {_shown(frame_id)}"
        )


def _checked_deadline(deadline: Any, frame_id: str) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        raise FrameError(
            f"frame {frame_id!r}: 'deadline' must be Unix seconds or null, not "
            f"{_shown(deadline)}", frame_id=frame_id,
        )
    try:
        seconds = float(deadline)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise FrameError(
            f"frame {frame_id!r}: 'deadline' must be finite and non-negative, not "
            f"{_shown(deadline)}", frame_id=frame_id,
        )
    return seconds


def _check_kind_and_error(kind: Any, error: Any, frame_id: str) -> None:
    if kind not in ("data", "error"):
        raise FrameError(
            f"frame {frame_id!r}: 'kind' must be \"data\" or \"error\", not {_shown(kind)}",
            frame_id=frame_id,
        )
    if kind == "data" and error is not None:
        raise FrameError(f"frame {frame_id!r}: a data frame has no 'error'", frame_id=frame_id)
    if kind == "error" and (
        not isinstance(error, str) or not 0 < len(error) <= MAX_ERROR_CHARS
    ):
        raise FrameError(
            f"frame {frame_id!r}: an error frame needs an 'error' string of 1 to "
            f"{MAX_ERROR_CHARS} characters, not {_shown(error)}", frame_id=frame_id,
        )


def reply_to_problem(url: Any) -> str | None:
    """Why ``url`` cannot be a ``reply_to`` (an http(s) base URL), or ``None``.

    The last stage opens a connection to it and sends the pipeline's token there, so
    only a plain ``scheme://host[:port]`` passes: no credentials, path, query or
    fragment that could make it mean more than "this gateway replica".
    """
    if (
        not isinstance(url, str)
        or not 0 < len(url) <= MAX_REPLY_TO_CHARS
        or not url.isascii()
        or not url.isprintable()
        or " " in url
    ):
        return (
            f"must be an http(s) base URL of at most {MAX_REPLY_TO_CHARS} printable ASCII "
            f"characters, not {_shown(url)}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc}): {_shown(url)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, not {_shown(url)}"
    if parts.username is not None or parts.password is not None:
        return f"must not carry credentials: {_shown(url)}"
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"must be a base URL (scheme, host and port only), not {_shown(url)}"
    if port == 0:
        return f"must not name port 0: {_shown(url)}"
    return None


def _check_reply_to(reply_to: Any, frame_id: str) -> None:
    if reply_to is None:
        return
    problem = reply_to_problem(reply_to)
    if problem is not None:
        raise FrameError(f"frame {frame_id!r}: 'reply_to' {problem}", frame_id=frame_id)


def _check_category(category: Any, kind: str, frame_id: str) -> None:
    if category is None:
        return
    if kind != "error":
        raise FrameError(
            f"frame {frame_id!r}: only an error frame has a 'category'", frame_id=frame_id
        )
    if (
        not isinstance(category, str)
        or len(category) > MAX_CATEGORY_CHARS
        or not _CATEGORY_SHAPE.fullmatch(category)
    ):
        raise FrameError(
            f"frame {frame_id!r}: 'category' must be a lowercase identifier of at most "
            f"{MAX_CATEGORY_CHARS} characters (such as {', '.join(ERROR_CATEGORIES)}), "
            f"not {_shown(category)}", frame_id=frame_id,
        )


def _check_tensor_specs(entries: Any, frame_id: str) -> list[TensorSpec]:
    if not isinstance(entries, list):
        raise FrameError(
            f"frame {frame_id!r}: 'tensors' must be a list, not {_json_type(entries)}",
            frame_id=frame_id,
        )
    if len(entries) > MAX_TENSORS:
        raise FrameError(
            f"frame {frame_id!r} lists {len(entries)} tensors, over {MAX_TENSORS}",
            frame_id=frame_id,
        )
    specs = [_check_tensor_spec(entry, i, frame_id) for i, entry in enumerate(entries)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise FrameError(f"frame {frame_id!r} has tensor {duplicate!r} twice", frame_id=frame_id)
    return specs


def _check_tensor_spec(entry: Any, position: int, frame_id: str) -> TensorSpec:
    where = f"frame {frame_id!r}, tensor #{position}"
    if not isinstance(entry, dict) or set(entry) != TENSOR_KEYS:
        raise FrameError(
            f"{where} must be an object with exactly 'name', 'dtype' and 'shape', not "
            f"{_shown(entry)}", frame_id=frame_id,
        )
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise FrameError(
            f"{where}: 'name' must be a non-empty printable string of at most "
            f"{MAX_NAME_CHARS} characters, not {_shown(name)}", frame_id=frame_id,
        )
    where = f"frame {frame_id!r}, tensor {name!r}"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FrameError(
            f"{where}: dtype {_shown(dtype)} is not one of {', '.join(DTYPES)}", frame_id=frame_id
        )
    return TensorSpec(name, dtype, _checked_shape(shape, where, frame_id))


def _checked_shape(shape: Any, where: str, frame_id: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise FrameError(
            f"{where}: 'shape' must be a list of at most {MAX_RANK} dims, not {_shown(shape)}",
            frame_id=frame_id,
        )
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_ELEMENTS:
            raise FrameError(
                f"{where}: shape dims must be integers from 0 to {MAX_ELEMENTS}, not "
                f"{_shown(dim)}", frame_id=frame_id,
            )
    if math.prod(shape) > MAX_ELEMENTS:
        raise FrameError(
            f"{where}: shape {shape} has {math.prod(shape)} elements, over {MAX_ELEMENTS}",
            frame_id=frame_id,
        )
    return tuple(shape)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "?")


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: headers can be 64 KiB of junk."""
    text = json.dumps(value) if isinstance(value, str | int | float | bool | type(None)) else (
        _json_type(value)
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------- streams
class FrameReader:
    """Cuts a byte stream into frames, fed chunk by chunk (any split points).

    Each frame is copied once, from the chunks into a buffer of its exact size that
    its arrays then view (writable). ``feed`` never raises for a bad frame: outcomes
    queue up in stream order, and :meth:`next_frame` returns the next frame or raises
    its :class:`FrameError`. After a :class:`FramingError` the reader is dead: frames
    queued before it are still returned, then every call raises it again.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._prefix = bytearray()
        self._frame: bytearray | None = None
        self._filled = 0
        self._layout = (0, 0)
        self._ready: deque[Frame | FrameError] = deque()
        self._broken: FramingError | None = None

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived: the stream must not end here."""
        return bool(self._prefix) or self._frame is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken is not None:
            raise self._broken
        view = _byte_view(data)
        while view and self._broken is None:
            view = self._take_prefix(view) if self._frame is None else self._take_body(view)

    def next_frame(self) -> Frame | None:
        """The next complete frame, ``None`` until more data arrives; raises refusals."""
        if self._ready:
            outcome = self._ready.popleft()
            if isinstance(outcome, FrameError):
                raise outcome
            return outcome
        if self._broken is not None:
            raise self._broken
        return None

    def __iter__(self) -> Iterator[Frame]:
        """Frames ready now; iteration stops at the first refusal by raising it."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def end_of_stream(self) -> None:
        """Call when the stream closes: a frame cut short is a :class:`FramingError`."""
        if self.mid_frame and self._broken is None:
            self._break(FramingError("the stream ended inside a frame"))

    def _take_prefix(self, view: memoryview) -> memoryview:
        needed = PREFIX_BYTES - len(self._prefix)
        self._prefix += view[:needed]
        if len(self._prefix) == PREFIX_BYTES:
            try:
                self._layout = parse_prefix(self._prefix, max_frame_bytes=self.max_frame_bytes)
            except FramingError as exc:
                self._break(exc)
                return view[:0]
            header_len, payload_len = self._layout
            self._frame = bytearray(PREFIX_BYTES + header_len + payload_len)
            self._frame[:PREFIX_BYTES] = self._prefix
            self._filled = PREFIX_BYTES
            self._prefix = bytearray()
            self._complete_if_full()
        return view[needed:]

    def _take_body(self, view: memoryview) -> memoryview:
        assert self._frame is not None
        taken = min(len(view), len(self._frame) - self._filled)
        self._frame[self._filled : self._filled + taken] = view[:taken]
        self._filled += taken
        self._complete_if_full()
        return view[taken:]

    def _complete_if_full(self) -> None:
        if self._frame is None or self._filled < len(self._frame):
            return
        header_len, payload_len = self._layout
        body = memoryview(self._frame)[PREFIX_BYTES:]
        self._frame = None
        try:
            self._ready.append(_decode_body(body, header_len, payload_len))
        except FrameError as exc:
            self._ready.append(exc)

    def _break(self, error: FramingError) -> None:
        self._broken = error
        self._prefix = bytearray()
        self._frame = None
        self._ready.append(error)


class ReadsExactly(Protocol):
    """What :func:`read_frame` needs: aiohttp's and asyncio's ``StreamReader`` both fit."""

    async def readexactly(self, n: int) -> bytes: ...


async def read_frame(
    stream: ReadsExactly, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame | None:
    """Read one frame; ``None`` when the stream ends cleanly between frames.

    Raises :class:`FrameError` for a refused frame (already consumed: call again) and
    :class:`FramingError` when the stream must be closed. Header and payload arrive
    in one ``readexactly``, so the arrays view that one bytes object.
    """
    try:
        prefix = await stream.readexactly(PREFIX_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FramingError(
            f"the stream ended inside a frame prefix ({len(exc.partial)} of {PREFIX_BYTES} bytes)"
        ) from None
    header_len, payload_len = parse_prefix(prefix, max_frame_bytes=max_frame_bytes)
    try:
        body = await stream.readexactly(header_len + payload_len)
    except asyncio.IncompleteReadError as exc:
        raise FramingError(
            f"the stream ended inside a frame ({len(exc.partial)} of "
            f"{header_len + payload_len} bytes after the prefix)"
        ) from None
    return _decode_body(memoryview(body), header_len, payload_len)
