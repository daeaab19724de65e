"""Frames between gateway and stages: exact round trips, zero copies, refusals that say why."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeweave.errors import EdgeweaveError
from edgeweave.worker.frames import (
    COALESCE_BYTES,
    DTYPES,
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    Frame,
    FrameError,
    FrameHeader,
    FrameReader,
    FramingError,
    decode_frame,
    encode_frame,
    encode_frame_bytes,
    read_frame,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------- helpers
def _raw_frame(
    header: Mapping[str, Any] | str | bytes,
    payload: bytes = b"",
    *,
    magic: bytes = b"EWF\x01",
    header_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """A frame built by hand, so that any field can be wrong."""
    if isinstance(header, Mapping):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    prefix = struct.pack(
        "<4sIQ", magic, len(raw) if header_len is None else header_len,
        len(payload) if payload_len is None else payload_len,
    )
    return prefix + raw + payload


def _header(**fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"id": "req-7", "deadline": None, "kind": "data", "tensors": []}
    document.update(fields)
    return {key: value for key, value in document.items() if value is not _DROP}


_DROP = object()


def _assert_same_arrays(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, array in expected.items():
        wire = np.asarray(array)
        assert got[name].dtype == DTYPES[wire.dtype.name], name
        assert got[name].shape == wire.shape, name
        # bytes, not values: NaNs and signed zeros must survive too
        assert got[name].tobytes() == np.ascontiguousarray(wire, DTYPES[wire.dtype.name]).tobytes()


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(DTYPES[dtype], np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(DTYPES[dtype])
    return rng.integers(info.min, info.max, shape, dtype=DTYPES[dtype], endpoint=True)


# --------------------------------------------------------------------- round trips
SHAPES = [(), (0,), (1,), (5,), (3, 4), (2, 0, 5), (1, 1, 1, 1, 1, 1, 1, 1), (7, 3, 5)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_round_trips(dtype: str, shape: tuple[int, ...]) -> None:
    arrays = {"t": _sample(dtype, shape), "after": _sample("float64", (3,))}
    frame = decode_frame(encode_frame_bytes(FrameHeader("r1", 1.5e9), arrays))
    assert frame.header == FrameHeader("r1", 1.5e9)
    _assert_same_arrays(frame.tensors, arrays)


def test_special_floats_round_trip_bit_for_bit() -> None:
    values = np.array([np.nan, -np.inf, np.inf, -0.0, 1e-45, 65504], np.float32)
    arrays = {"f32": values, "f16": values.astype(np.float16), "f64": values.astype(np.float64)}
    _assert_same_arrays(decode_frame(encode_frame_bytes(FrameHeader("x"), arrays)).tensors, arrays)


@pytest.mark.parametrize(
    "make",
    [lambda a: a[:, ::2], lambda a: np.asfortranarray(a), lambda a: a.astype(">f4"),
     lambda a: a.T],
    ids=["strided", "fortran", "big-endian", "transposed"],
)
def test_arrays_in_any_layout_arrive_as_c_order_little_endian(
    make: Callable[[np.ndarray], np.ndarray],
) -> None:
    source = make(np.arange(24, dtype=np.float32).reshape(4, 6))
    frame = decode_frame(encode_frame_bytes(FrameHeader("x"), {"a": source}))
    assert frame.tensors["a"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(frame.tensors["a"], source)


def test_tensor_order_deadline_and_error_frames_round_trip() -> None:
    arrays = {name: _sample("int32", (2,)) for name in ("zeta", "alpha", "mid")}
    frame = decode_frame(encode_frame_bytes(FrameHeader("r", 1_700_000_000), arrays))
    assert list(frame.tensors) == ["zeta", "alpha", "mid"]
    assert frame.deadline == 1.7e9 and isinstance(frame.deadline, float)
    error = decode_frame(encode_frame_bytes(FrameHeader.for_error("r", "stage 2 is gone"), {}))
    assert error.is_error and error.header.error == "stage 2 is gone" and error.tensors == {}
    assert not frame.is_error


def test_error_messages_are_cut_to_the_limit() -> None:
    header = FrameHeader.for_error("r", "x" * 10_000)
    assert decode_frame(encode_frame_bytes(header, {})).header.error == "x" * 4096


def test_tensors_start_8_byte_aligned_in_the_frame() -> None:
    arrays = {"odd": np.ones(3, np.uint8), "wide": np.ones(3, np.float64),
              "bits": np.ones(5, bool), "half": np.ones(1, np.float16)}
    for header in (FrameHeader("a"), FrameHeader("a-much-longer-request-id-0123456789", 2.5)):
        buffer = bytearray(encode_frame_bytes(header, arrays))
        start = np.frombuffer(buffer, np.uint8).ctypes.data
        for array in decode_frame(buffer).tensors.values():
            assert (array.ctypes.data - start) % 8 == 0


# --------------------------------------------------------------------- zero copy
def test_decoded_arrays_view_the_received_buffer() -> None:
    arrays = {"x": np.arange(6, dtype=np.float32), "y": np.arange(4, dtype=np.int64)}
    buffer = bytearray(encode_frame_bytes(FrameHeader("zc"), arrays))
    frame = decode_frame(buffer)
    assert np.shares_memory(frame.tensors["x"], np.frombuffer(buffer, np.uint8))
    offset = buffer.index(np.float32(5).tobytes())
    buffer[offset : offset + 4] = np.float32(-1).tobytes()  # the wire buffer changes ...
    assert frame.tensors["x"][5] == -1  # ... and so does the array: it is a view


def test_arrays_decoded_from_bytes_are_read_only_views() -> None:
    data = encode_frame_bytes(FrameHeader("zc"), {"x": np.ones(8, np.float32)})
    array = decode_frame(data).tensors["x"]
    assert not array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(data, np.uint8))


def test_large_arrays_are_handed_to_the_writer_without_a_copy() -> None:
    big = np.arange(COALESCE_BYTES, dtype=np.float32)
    buffers = encode_frame(FrameHeader("big"), {"big": big, "tail": np.ones(3, np.int8)})
    assert any(
        isinstance(b, memoryview) and np.shares_memory(np.asarray(b), big) for b in buffers
    )
    frame = decode_frame(b"".join(buffers))
    np.testing.assert_array_equal(frame.tensors["big"], big)
    assert frame.nbytes == sum(len(b) for b in buffers)


def test_small_frames_are_one_buffer() -> None:
    assert len(encode_frame(FrameHeader("s"), {"x": np.ones((4, 4), np.float32)})) == 1


# --------------------------------------------------------------------- refusals
HEADER_CASES: list[tuple[Any, str]] = [
    (b"\xff\xfe{}", r"not UTF-8"),
    ('{"id": "req-7",', r"not valid JSON"),
    ("[]", r"must be a JSON object, not an array"),
    ('"just a string"', r"must be a JSON object, not a string"),
    ('{"id":"a","id":"b","deadline":null,"kind":"data","tensors":[]}', r"'id' appears twice"),
    ('{"id":"a","deadline":NaN,"kind":"data","tensors":[]}', r"NaN is not a number JSON allows"),
    ("[" * 30_000 + "]" * 30_000, r"nested too deeply|not valid JSON"),
    (_header(id=_DROP), r"'id' must be a non-empty string"),
    (_header(id=""), r"'id' must be a non-empty string of at most 128"),
    (_header(id="x" * 129), r"'id' must be a non-empty string of at most 128"),
    (_header(id=17), r"'id' must be .*, not 17"),
    (_header(id="a\nb"), r"printable characters"),
    (_header(extra=1), r"unknown header field\(s\) \['extra'\]"),
    (_header(deadline=_DROP), r"header lacks \['deadline'\]"),
    (_header(tensors=_DROP), r"header lacks \['tensors'\]"),
    (_header(deadline="soon"), r"'deadline' must be Unix seconds or null, not \"soon\""),
    (_header(deadline=True), r"'deadline' must be Unix seconds or null"),
    (_header(deadline=-1), r"'deadline' must be finite and non-negative"),
    ('{"id":"a","deadline":1e999,"kind":"data","tensors":[]}', r"finite and non-negative"),
    ('{"id":"a","deadline":' + "9" * 400 + ',"kind":"data","tensors":[]}',
     r"finite and non-negative"),
    (_header(kind="maybe"), r"'kind' must be \"data\" or \"error\""),
    (_header(error="boom"), r"a data frame has no 'error'"),
    (_header(kind="error"), r"an error frame needs an 'error' string"),
    (_header(kind="error", error=""), r"an error frame needs an 'error' string"),
    (_header(kind="error", error="x",
             tensors=[{"name": "a", "dtype": "int8", "shape": [0]}]),
     r"an error frame carries no tensors"),
    (_header(tensors={"a": 1}), r"'tensors' must be a list, not an object"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [0]}] * 1025),
     r"lists 1025 tensors, over 1024"),
    (_header(tensors=[["a", "int8", [1]]]), r"tensor #0 must be an object with exactly"),
    (_header(tensors=[{"name": "a", "dtype": "int8"}]), r"tensor #0 must be an object with"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [], "strides": []}]),
     r"exactly 'name', 'dtype' and 'shape'"),
    (_header(tensors=[{"name": "", "dtype": "int8", "shape": []}]), r"'name' must be"),
    (_header(tensors=[{"name": 3, "dtype": "int8", "shape": []}]), r"'name' must be"),
    (_header(tensors=[{"name": "a", "dtype": "complex64", "shape": []}]),
     r"tensor 'a': dtype \"complex64\" is not one of float32, float16"),
    (_header(tensors=[{"name": "a", "dtype": "object", "shape": []}]), r"is not one of"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": "3"}]),
     r"'shape' must be a list of at most 8 dims"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [1] * 9}]),
     r"'shape' must be a list of at most 8 dims"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [-1]}]),
     r"shape dims must be integers from 0 to 4294967296, not -1"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [1.5]}]), r"not 1.5"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [True]}]), r"not true"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [2**20, 2**20]}]),
     r"has 1099511627776 elements, over 4294967296"),
    (_header(tensors=[{"name": "a", "dtype": "int8", "shape": [0]}] * 2),
     r"has tensor 'a' twice"),
    (_header(reply_to="ftp://gw:8080"), r"'reply_to' must be an http:// or https:// URL"),
    (_header(reply_to="http://gw:8080/v1/stream"), r"'reply_to' must be a base URL"),
    (_header(reply_to="http://gw:8080/?x=1"), r"'reply_to' must be a base URL"),
    (_header(reply_to="http://user:pw@gw:8080"), r"'reply_to' must not carry credentials"),
    (_header(reply_to="http://gw:99999"), r"'reply_to' is not a URL"),
    (_header(reply_to="http://[fd00::1"), r"'reply_to' is not a URL"),
    (_header(reply_to="http://gw:0"), r"'reply_to' must not name port 0"),
    (_header(reply_to="http://" + "g" * 300), r"'reply_to' must be an http\(s\) base URL of at"),
    (_header(reply_to="http://gw\n:1"), r"'reply_to' must be an http\(s\) base URL"),
    (_header(reply_to="http://gé:1"), r"'reply_to' must be an http\(s\) base URL"),
    (_header(reply_to=8080), r"'reply_to' must be an http\(s\) base URL .*not 8080"),
    (_header(reply_to=""), r"'reply_to' must be an http\(s\) base URL"),
    (_header(category="internal"), r"only an error frame has a 'category'"),
    (_header(kind="error", error="x", category="Internal"), r"'category' must be a lowercase"),
    (_header(kind="error", error="x", category="x" * 33), r"'category' must be a lowercase"),
    (_header(kind="error", error="x", category=3), r"'category' must be a lowercase"),
]


@pytest.mark.parametrize(("header", "message"), HEADER_CASES)
def test_every_bad_header_field_is_refused_with_a_reason(header: Any, message: str) -> None:
    with pytest.raises(FrameError, match=message) as caught:
        decode_frame(_raw_frame(header))
    assert caught.value.recoverable, "a bad header behind a sound prefix spoils only its frame"
    assert isinstance(caught.value, EdgeweaveError)


def test_refusals_name_the_request_once_its_id_is_known() -> None:
    bad = _header(tensors=[{"name": "a", "dtype": "complex64", "shape": []}])
    with pytest.raises(FrameError) as caught:
        decode_frame(_raw_frame(bad))
    assert caught.value.frame_id == "req-7"
    with pytest.raises(FrameError) as caught:
        decode_frame(_raw_frame(_header(id="")))
    assert caught.value.frame_id is None


def test_reply_to_and_category_round_trip_and_old_frames_decode_as_before() -> None:
    data = FrameHeader("r", 5.0, reply_to="http://10.0.0.9:8080")
    error = FrameHeader.for_error("r", "boom", category="too_large", reply_to="https://[fd00::9]")
    for header, arrays in ((data, {"x": np.ones(2, np.float32)}), (error, {})):
        assert decode_frame(encode_frame_bytes(header, arrays)).header == header
    # Fields a receiver does not announce are left out, so a receiver from before them
    # gets exactly the frame it always got.
    bare = encode_frame_bytes(error.reduced_to(()), {})
    assert b"reply_to" not in bare and b"category" not in bare
    assert bare == encode_frame_bytes(FrameHeader.for_error("r", "boom"), {})
    with_category = FrameHeader.for_error("r", "boom", category="too_large")
    assert error.reduced_to(["category"]) == with_category
    old = decode_frame(_raw_frame(_header(kind="error", error="from an old stage")))
    assert (old.header.reply_to, old.header.category) == (None, None)
    # A category this version does not know (a newer sender's) still decodes.
    newer = decode_frame(_raw_frame(_header(kind="error", error="x", category="quota_spent")))
    assert newer.header.category == "quota_spent"


def test_a_refusal_keeps_a_valid_reply_to_so_its_error_finds_the_right_gateway() -> None:
    bad_tensor = [{"name": "a", "dtype": "complex64", "shape": []}]
    with pytest.raises(FrameError) as caught:
        decode_frame(_raw_frame(_header(reply_to="http://gw-1:8080", tensors=bad_tensor)))
    assert (caught.value.frame_id, caught.value.reply_to) == ("req-7", "http://gw-1:8080")
    payload_short = _header(reply_to="http://gw-1:8080",
                            tensors=[{"name": "a", "dtype": "float32", "shape": [3]}])
    with pytest.raises(FrameError) as caught:
        decode_frame(_raw_frame(payload_short, b"\0" * 8))
    assert caught.value.reply_to == "http://gw-1:8080"
    with pytest.raises(FrameError) as caught:
        decode_frame(_raw_frame(_header(reply_to="ftp://gw-1")))
    assert (caught.value.frame_id, caught.value.reply_to) == ("req-7", None)


def test_payload_must_match_the_tensors() -> None:
    header = _header(tensors=[{"name": "a", "dtype": "float32", "shape": [3]}])
    for payload in (b"\0" * 8, b"\0" * 12, b"\0" * 24):  # 12 bytes pad to 16
        with pytest.raises(FrameError, match=r"payload is \d+ bytes but its tensors need 16"):
            decode_frame(_raw_frame(header, payload))
    assert decode_frame(_raw_frame(header, b"\0" * 16)).tensors["a"].shape == (3,)


def test_bool_tensors_hold_only_zeros_and_ones() -> None:
    header = _header(tensors=[{"name": "mask", "dtype": "bool", "shape": [3]}])
    with pytest.raises(FrameError, match=r"bool tensor 'mask' holds bytes other than 0 and 1"):
        decode_frame(_raw_frame(header, b"\1\2\0" + b"\0" * 5))


FRAMING_CASES: list[tuple[bytes, str]] = [
    (_raw_frame(_header(), magic=b"HTTP"), r"not an edgeweave frame: it starts with b'HTTP'"),
    (_raw_frame(_header(), magic=b"EWF\x02"), r"frame format version 2 is not the supported 1"),
    (_raw_frame(_header(), header_len=MAX_HEADER_BYTES + 1),
     r"header of 65537 bytes is over 65536"),
    (_raw_frame(_header(), payload_len=2**63), r"over the 268435456-byte limit"),
    (_raw_frame(_header(), payload_len=8), r"the frame is \d+ bytes but its prefix declares"),
    (_raw_frame(_header()) + b"\0" * 8, r"the frame is \d+ bytes but its prefix declares"),
    (b"EWF\x01\0\0", r"a frame is at least 16 bytes; got 6"),
]


@pytest.mark.parametrize(("data", "message"), FRAMING_CASES)
def test_broken_framing_is_unrecoverable(data: bytes, message: str) -> None:
    with pytest.raises(FramingError, match=message) as caught:
        decode_frame(data)
    assert not caught.value.recoverable


def test_the_frame_size_limit_is_configurable() -> None:
    arrays = {"x": np.zeros(1024, np.float32)}
    data = encode_frame_bytes(FrameHeader("big"), arrays)
    assert decode_frame(data, max_frame_bytes=len(data)).tensors["x"].shape == (1024,)
    with pytest.raises(FramingError, match=r"over the 4096-byte limit"):
        decode_frame(data, max_frame_bytes=4096)
    with pytest.raises(FrameError, match=r"frame 'big' would be \d+ bytes, over the 4096"):
        encode_frame(FrameHeader("big"), arrays, max_frame_bytes=4096)


@pytest.mark.parametrize(
    ("header", "arrays", "message"),
    [
        (FrameHeader("c"), {"z": np.zeros(2, np.complex64)}, r"dtype complex64, which frames"),
        (FrameHeader("o"), {"s": np.array(["a"], object)}, r"dtype object"),
        (FrameHeader("u"), {"s": np.zeros(2, np.uint16)}, r"dtype uint16"),
        (FrameHeader("n"), {"": np.zeros(2, np.int8)}, r"'name' must be"),
        (FrameHeader.for_error("e", "gone"), {"x": np.zeros(1, np.int8)}, r"carries no tensors"),
    ],
)
def test_the_encoder_refuses_what_the_decoder_would(
    header: FrameHeader, arrays: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(FrameError, match=message):
        encode_frame(header, arrays)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FrameHeader(""), r"'id' must be a non-empty string"),
        (lambda: FrameHeader("a", float("nan")), r"finite"),
        (lambda: FrameHeader("a", kind="other"), r"'kind' must be"),  # type: ignore[arg-type]
        (lambda: FrameHeader("a", kind="error"), r"needs an 'error' string"),
    ],
)
def test_bad_headers_cannot_be_built(make: Callable[[], FrameHeader], message: str) -> None:
    with pytest.raises(FrameError, match=message):
        make()


# --------------------------------------------------------------------- streams
STREAM_ARRAYS: list[tuple[FrameHeader, dict[str, np.ndarray]]] = [
    (FrameHeader("one", 10.0), {"x": _sample("float32", (2, 3))}),
    (FrameHeader("two"), {"mask": _sample("bool", (5,)), "empty": _sample("int64", (0, 4))}),
    (FrameHeader.for_error("three", "stage 1 failed: out of memory"), {}),
    (FrameHeader("four"), {"scalar": _sample("float16", ()), "ids": _sample("int64", (1, 9))}),
]


def _stream() -> bytes:
    return b"".join(encode_frame_bytes(header, arrays) for header, arrays in STREAM_ARRAYS)


def _assert_stream_frames(frames: list[Frame]) -> None:
    assert [frame.header for frame in frames] == [header for header, _ in STREAM_ARRAYS]
    for frame, (_, arrays) in zip(frames, STREAM_ARRAYS, strict=True):
        _assert_same_arrays(frame.tensors, arrays)


def test_the_reader_cuts_a_stream_split_at_every_byte_boundary() -> None:
    data = _stream()
    for cut in range(len(data) + 1):
        reader = FrameReader()
        reader.feed(data[:cut])
        early = list(reader)
        reader.feed(data[cut:])
        _assert_stream_frames(early + list(reader))
        assert not reader.mid_frame
        reader.end_of_stream()


def test_the_reader_takes_one_byte_at_a_time() -> None:
    reader, frames = FrameReader(), []
    for byte in _stream():
        reader.feed(bytes([byte]))
        frames.extend(reader)
    _assert_stream_frames(frames)


@FUZZ
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(_stream())), max_size=12))
def test_the_reader_takes_any_chunking(cuts: list[int]) -> None:
    data, reader = _stream(), FrameReader()
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        reader.feed(memoryview(data)[start:end])
    _assert_stream_frames(list(reader))


def test_a_refused_frame_is_skipped_and_the_stream_goes_on() -> None:
    bad = _raw_frame(
        _header(id="bad", tensors=[{"name": "a", "dtype": "uint16", "shape": [2]}]), b"\0" * 8
    )
    good = [encode_frame_bytes(h, a) for h, a in STREAM_ARRAYS[:2]]
    reader = FrameReader()
    reader.feed(good[0] + bad + good[1])
    assert reader.next_frame().id == "one"  # type: ignore[union-attr]
    with pytest.raises(FrameError, match=r"dtype \"uint16\"") as caught:
        reader.next_frame()
    assert caught.value.recoverable and caught.value.frame_id == "bad"
    assert reader.next_frame().id == "two"  # type: ignore[union-attr]
    assert reader.next_frame() is None and not reader.broken


def test_lost_framing_kills_the_reader_after_the_frames_before_it() -> None:
    reader = FrameReader()
    reader.feed(encode_frame_bytes(*STREAM_ARRAYS[0]) + b"GET / HTTP/1.1\r\n\r\n")
    assert reader.next_frame().id == "one"  # type: ignore[union-attr]
    for _ in range(2):
        with pytest.raises(FramingError, match=r"not an edgeweave frame: it starts with b'GET "):
            reader.next_frame()
    assert reader.broken
    with pytest.raises(FramingError):
        reader.feed(encode_frame_bytes(*STREAM_ARRAYS[1]))


def test_a_stream_that_ends_inside_a_frame_is_unrecoverable() -> None:
    data = encode_frame_bytes(*STREAM_ARRAYS[0])
    for cut in (5, PREFIX_BYTES, len(data) - 1):
        reader = FrameReader()
        reader.feed(data[:cut])
        assert reader.mid_frame
        reader.end_of_stream()
        with pytest.raises(FramingError, match="the stream ended inside a frame"):
            reader.next_frame()


def test_the_reader_enforces_its_frame_size_limit_before_buffering() -> None:
    reader = FrameReader(max_frame_bytes=1024)
    reader.feed(_raw_frame(_header(), payload_len=1 << 40)[:PREFIX_BYTES])
    with pytest.raises(FramingError, match=r"over the 1024-byte limit"):
        reader.next_frame()


def test_frames_from_the_reader_are_writable_views_of_one_buffer() -> None:
    reader = FrameReader()
    reader.feed(encode_frame_bytes(FrameHeader("w"), {"a": np.ones(4), "b": np.zeros(2)}))
    frame = reader.next_frame()
    assert frame is not None and frame.tensors["a"].flags.writeable
    a, b = frame.tensors["a"], frame.tensors["b"]
    assert not a.flags.owndata and not b.flags.owndata
    assert b.ctypes.data - a.ctypes.data == a.nbytes, "b follows a in the same buffer"


# --------------------------------------------------------------------- async streams
async def _read_all(stream: asyncio.StreamReader) -> list[Frame | FrameError]:
    outcomes: list[Frame | FrameError] = []
    while True:
        try:
            frame = await read_frame(stream)
        except FramingError as exc:
            return [*outcomes, exc]
        except FrameError as exc:
            outcomes.append(exc)
            continue
        if frame is None:
            return outcomes
        outcomes.append(frame)


def _stream_reader(data: bytes) -> asyncio.StreamReader:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return stream


def test_read_frame_reads_a_stream_until_it_ends() -> None:
    async def scenario() -> None:
        outcomes = await _read_all(_stream_reader(_stream()))
        _assert_stream_frames(outcomes)  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_read_frame_skips_refused_frames_and_stops_at_lost_framing() -> None:
    bad = _raw_frame(_header(id="bad", deadline="later"))
    data = encode_frame_bytes(*STREAM_ARRAYS[0]) + bad + encode_frame_bytes(*STREAM_ARRAYS[1])

    async def scenario() -> None:
        outcomes = await _read_all(_stream_reader(data + b"EWF\x01\0\0"))
        assert [type(o).__name__ for o in outcomes] == [
            "Frame", "FrameError", "Frame", "FramingError"]
        assert outcomes[1].frame_id == "bad"  # type: ignore[union-attr]
        assert "inside a frame prefix (6 of 16 bytes)" in str(outcomes[3])

        cut = await _read_all(_stream_reader(encode_frame_bytes(*STREAM_ARRAYS[0])[:-3]))
        assert isinstance(cut[0], FramingError) and "ended inside a frame" in str(cut[0])

    asyncio.run(scenario())


def test_frames_stream_over_a_real_aiohttp_connection() -> None:
    """A client streams frames in one long request; the server reads them with
    ``read_frame(request.content)`` and streams doubled tensors back."""
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    sent = [
        (FrameHeader(f"r{i}", 1e9 + i), {"x": _sample("float32", (64, 1024), i)})
        for i in range(5)
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while (frame := await read_frame(request.content)) is not None:
            doubled = {name: array * 2 for name, array in frame.tensors.items()}
            for buffer in encode_frame(frame.header, doubled):
                await response.write(buffer)
        await response.write_eof()
        return response

    async def body() -> AsyncIterator[bytes | memoryview]:
        for header, arrays in sent:
            for buffer in encode_frame(header, arrays):
                yield buffer

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/frames", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/frames", data=body()
            ) as response:
                received = []
                while (frame := await read_frame(response.content)) is not None:
                    received.append(frame)
        finally:
            await runner.cleanup()
        assert [frame.header for frame in received] == [header for header, _ in sent]
        for frame, (_, arrays) in zip(received, sent, strict=True):
            np.testing.assert_array_equal(frame.tensors["x"], arrays["x"] * 2)

    asyncio.run(scenario())


# --------------------------------------------------------------------- fuzzing
wire_dtypes = st.sampled_from(list(DTYPES)).map(lambda name: DTYPES[name])
wire_arrays = st.dictionaries(
    st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=12),
    hnp.arrays(wire_dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)),
    max_size=4,
)
frame_ids = st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=20)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    header = FrameHeader(draw(frame_ids), draw(st.none() | st.floats(0, 4e9)))
    return encode_frame_bytes(header, draw(wire_arrays))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes flipped, cut, inserted or dropped."""
    data = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "drop"]))
        if action == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "drop":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
spec_like = st.fixed_dictionaries(
    {"name": st.text(max_size=4) | json_values,
     "dtype": st.sampled_from([*DTYPES, "complex64", ""]) | json_values,
     "shape": st.lists(st.integers(-2, 5), max_size=9) | json_values},
)
header_like = st.fixed_dictionaries(
    {"id": frame_ids | json_values,
     "tensors": st.lists(spec_like, max_size=3) | json_values},
    optional={"deadline": st.floats(allow_nan=True) | json_values,
              "kind": st.sampled_from(["data", "error"]) | json_values,
              "error": st.text(max_size=5) | json_values,
              "extra": json_values},
)


def _decode_or_refuse(data: bytes) -> Frame | FrameError:
    try:
        frame = decode_frame(data)
    except FrameError as exc:
        return exc
    for array in frame.tensors.values():
        assert array.nbytes <= len(data)
    return frame


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_are_refused_cleanly(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(FUZZ, max_examples=400)
@given(mutated_frames())
def test_fuzz_mutated_frames_decode_or_are_refused(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(FUZZ, max_examples=400)
@given(header_like, st.binary(max_size=64))
def test_fuzz_headers_behind_a_sound_prefix_spoil_only_their_frame(
    header: dict[str, Any], payload: bytes
) -> None:
    try:
        text = json.dumps(header)
    except ValueError:  # integers too long for str(): not a header anyone can send
        return
    outcome = _decode_or_refuse(_raw_frame(text, payload))
    if isinstance(outcome, FrameError):
        assert outcome.recoverable, str(outcome)


@settings(FUZZ, max_examples=200)
@given(
    st.lists(valid_frames() | mutated_frames(), min_size=1, max_size=5),
    st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
def test_fuzz_streams_of_good_and_bad_frames_never_wedge_the_reader(
    frames: list[bytes], chunk_sizes: list[int]
) -> None:
    data, reader, position, step = b"".join(frames), FrameReader(), 0, 0
    outcomes = 0
    while position < len(data) and not reader.broken:
        size = chunk_sizes[step % len(chunk_sizes)]
        reader.feed(data[position : position + size])
        position, step = position + size, step + 1
        while True:
            try:
                if reader.next_frame() is None:
                    break
            except FramingError:
                break
            except FrameError:
                pass
            outcomes += 1
    reader.end_of_stream()
    assert outcomes <= len(frames) + len(data) // PREFIX_BYTES
