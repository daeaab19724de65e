"""The link between data-plane processes: one long-lived HTTP stream of frames, acked line by line.

Every hop (gateway → stage 0 → … → last stage → gateway) is the same kind of link
(``.notes/dataplane-contract.md``):

- **Receiver** (:class:`StreamReceiver`, mounted at ``POST /v1/stream``): checks the
  bearer token before reading anything, answers with a streaming response right away
  and reads frames from the request body one by one. Each frame is handed to the
  owner's ``deliver`` callback together with an :class:`Ack`; the owner completes the
  ack (``ok()`` / ``fail(error)``) once it has taken responsibility for the frame and
  an ack line ``{"id": ..., "ok": true}`` goes back on the response. ``deliver`` may
  block (a full bounded queue): the reader then stops reading and TCP flow control
  pushes back to the sender. A refused frame (:class:`FrameError`) goes to ``refuse``
  and reading goes on; lost framing (:class:`FramingError`) closes only that stream.

- **Sender** (:class:`LinkPool`): one link (stream) per replica of the next stage.
  ``send`` puts a frame on the live link with the fewest outstanding (sent, unacked)
  frames, waits while every link is at its cap, and keeps the frame's buffers until
  it is acked. When a link fails, its unacked frames are sent again on the other live
  links (or on the same one once it reconnects, with backoff); a frame that finds no
  link before its deadline is dropped, and its delivery says so.

- **Handshake**: the receiver's response headers say what it is (:data:`ROLE_HEADER`:
  ``stage`` or ``sink``, the gateway) and which optional frame-header fields it reads
  (:data:`FIELDS_HEADER`). A sender learns both when a link comes up
  (:meth:`LinkPool.peer`): a stage whose downstream is a sink is the last stage, and
  nobody sends a field its receiver would refuse (a receiver from before the field).

- **Replies** (:class:`ReplyTargets`): the last stage sends a result whose frame names
  a ``reply_to`` to that gateway replica, through one pool per replica, created on
  first use and closed once idle.

Why acks, and not just TCP: TCP's delivery ends at the peer's kernel buffer. A
replica killed with frames in its queues loses them, and only the sender, which
still holds the bytes until the ack, can send them again elsewhere. Duplicates are
possible after a failure (a frame the dead replica had already forwarded is sent
again); the gateway keeps the first result for a request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from edgeweave.worker.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    OPTIONAL_HEADER_KEYS,
    PREFIX_BYTES,
    Frame,
    FrameError,
    FrameReader,
    FramingError,
    parse_prefix,
)
from edgeweave.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
ACK_CONTENT_TYPE = "application/x-ndjson"
DEFAULT_MAX_OUTSTANDING = 16
"""Frames per link sent but not acked. With end-to-end acks through a stage (see
:mod:`edgeweave.worker.stage`) this also bounds the frames in flight behind a link, so
it must cover a few stages' worth of pipelining; it is also the memory a sender holds
per link for resends."""
DEFAULT_CONNECT_TIMEOUT_S = 5.0
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0
STREAM_READ_BUFFER = 2**20
"""aiohttp's per-stream read buffer (``read_bufsize``) for links: big enough that a
multi-MB frame is read in few wake-ups, small enough that a paused stream holds little."""
ROLE_HEADER = "Edgeweave-Role"
"""What a receiver is: :data:`STAGE_ROLE` or :data:`SINK_ROLE` (the gateway)."""
FIELDS_HEADER = "Edgeweave-Frame-Fields"
"""The optional frame-header fields a receiver reads, comma-separated. Absent (a
receiver from before them): it reads none, and refuses a frame that carries one."""
STAGE_ROLE = "stage"
SINK_ROLE = "sink"
DEFAULT_MAX_REPLY_TARGETS = 64
DEFAULT_REPLY_IDLE_S = 30.0
DEFAULT_REPLY_MAX_WAIT_S = 5.0
"""How long a result may wait for a link to its gateway replica. A reply target does
not come back under another name as a stage replica may; while a result for a dead
replica waits, it holds its upstream links' slots, which other replicas' requests need."""

Buffer = bytes | bytearray | memoryview
LinkState = Literal["connecting", "up", "down", "closed"]


# --------------------------------------------------------------------- auth
def bearer_token_matches(request: web.BaseRequest, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    presented = value.strip().encode() if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(presented, token.encode())


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "missing or wrong bearer token (the pipeline's token)"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="edgeweave"'},
    )


def bearer_auth_middleware(token: str, public_paths: Iterable[str]) -> Any:
    """An aiohttp middleware that answers 401 on every path but ``public_paths``."""
    public = frozenset(public_paths)

    @web.middleware
    async def require_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in public and not bearer_token_matches(request, token):
            return unauthorized()
        return await handler(request)

    return require_token


# --------------------------------------------------------------------- receiver
class _AckStream:
    """Ack lines of one inbound stream, written in batches by one task.

    Acks complete from anywhere (the compute loop, a done-callback); batching them
    into one write per wake-up keeps small frames cheap.
    """

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._lines: list[bytes] = []
        self._wake = asyncio.Event()
        self.closed = False
        self.unanswered = 0
        self._answered = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    def opened(self) -> None:
        self.unanswered += 1
        self._answered.clear()

    def answered(self, line: bytes) -> None:
        self.unanswered -= 1
        if self.unanswered == 0:
            self._answered.set()
        self.put(line)

    async def all_answered(self) -> None:
        if self.unanswered:
            await self._answered.wait()

    def put(self, line: bytes) -> None:
        if self.closed:
            return
        self._lines.append(line)
        self._wake.set()

    async def close(self) -> None:
        """Flush the acks completed so far, then stop; later acks are dropped."""
        self.closed = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._lines:
                data = b"".join(self._lines)
                self._lines.clear()
                try:
                    await self._response.write(data)
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    self.closed = True  # the peer is gone; its frames will be resent
                    return
            if self.closed and not self._lines:
                return


class Ack:
    """The answer owed for one inbound frame; the first ``ok``/``fail`` wins."""

    __slots__ = ("_stream", "done", "frame_id")

    def __init__(self, frame_id: str | None, stream: _AckStream) -> None:
        self.frame_id = frame_id
        self._stream = stream
        self.done = False
        stream.opened()

    def ok(self) -> None:
        self._finish({"id": self.frame_id, "ok": True})

    def fail(self, error: str) -> None:
        self._finish({"id": self.frame_id, "ok": False, "error": error})

    def _finish(self, document: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        self._stream.answered(json.dumps(document, separators=(",", ":")).encode() + b"\n")


Deliver = Callable[[Frame, Ack], Awaitable[None]]
Refuse = Callable[[FrameError, Ack], Awaitable[None]]


async def _fail_ack(error: FrameError, ack: Ack) -> None:
    ack.fail(str(error))


class StreamReceiver:
    """Serves ``POST /v1/stream``: frames in, ack lines out.

    ``deliver(frame, ack)`` takes each good frame (await to push back: the stream is not
    read meanwhile) and must complete ``ack`` once the frame is its responsibility.
    ``refuse(error, ack)`` takes each refused frame (default: ``ack.fail``);
    ``error.frame_id`` names its request when the header got that far.
    ``not_ready()`` returns a reason to answer 503 instead (e.g. the shard is loading)
    or ``None``. When the sender ends its body, the response ends once every frame
    it sent has been answered, so a finite stream gets all its acks. ``role`` is
    announced to senders (:data:`ROLE_HEADER`), with the optional header fields this
    version reads.
    """

    def __init__(
        self,
        token: str,
        deliver: Deliver,
        *,
        refuse: Refuse | None = None,
        not_ready: Callable[[], str | None] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        metrics: WorkerMetrics | None = None,
        role: str | None = None,
    ) -> None:
        if not token:
            raise ValueError("a stream receiver needs a non-empty token")
        self._token = token
        self._headers = {"Content-Type": ACK_CONTENT_TYPE,
                         FIELDS_HEADER: ",".join(OPTIONAL_HEADER_KEYS)}
        if role is not None:
            self._headers[ROLE_HEADER] = role
        self._deliver = deliver
        self._refuse = refuse or _fail_ack
        self._not_ready = not_ready or (lambda: None)
        self.max_frame_bytes = max_frame_bytes
        self._metrics = metrics
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False
        if metrics is not None:
            metrics.streams_open.set_function(lambda: len(self._streams))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not bearer_token_matches(request, self._token):
            return unauthorized()
        reason = "shutting down" if self._closing else self._not_ready()
        if reason is not None:
            return web.json_response({"error": f"not ready: {reason}"}, status=503)
        response = web.StreamResponse(headers=self._headers)
        await response.prepare(request)
        acks = _AckStream(response)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            if await self._read_frames(request, acks):
                # The sender ended its body: answer every frame it sent, then end ours.
                await acks.all_answered()
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.info("stream from %s ended: %s", request.remote, exc or type(exc).__name__)
        except Exception:  # a bug in deliver/refuse ends this stream, not the process
            log.exception("closing the stream from %s", request.remote)
        finally:
            self._streams.discard(task)
            await acks.close()
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await response.write_eof()
        return response

    async def close(self) -> None:
        """End every open stream (app shutdown); their senders resend elsewhere."""
        self._closing = True
        for task in list(self._streams):
            task.cancel()
        for task in list(self._streams):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _read_frames(self, request: web.Request, acks: _AckStream) -> bool:
        """Deliver frames until the body ends (``True``) or loses its framing (``False``).

        Reads the body as aiohttp buffered it (``readchunk`` hands out its buffers
        without joining them) and lets :class:`FrameReader` copy each frame once into
        a buffer of its own size: about half the CPU of ``readexactly`` for MB-sized
        frames, which joins the 256 KiB socket reads, copying more. The next chunk is
        read only when every frame of the last one was delivered, so a blocked
        ``deliver`` stops the reading.
        """
        content = request.content
        reader = FrameReader(max_frame_bytes=self.max_frame_bytes)
        while True:
            data, end_of_http_chunk = await content.readchunk()
            if data:
                reader.feed(data)
            elif end_of_http_chunk and not content.at_eof():
                # An empty chunk boundary, not the end. aiohttp's shared empty-body reader
                # reports end-of-chunk forever, so at EOF fall through and finish.
                continue
            else:
                reader.end_of_stream()
            if not await self._deliver_ready(reader, request, acks):
                return False
            if not data:
                return True

    async def _deliver_ready(
        self, reader: FrameReader, request: web.Request, acks: _AckStream
    ) -> bool:
        """Deliver (or refuse) every complete frame; ``False`` once the framing is lost."""
        metrics = self._metrics
        while True:
            try:
                frame = reader.next_frame()
            except FramingError as exc:
                log.warning("closing the stream from %s: %s", request.remote, exc)
                if metrics is not None:
                    metrics.frames_refused.labels(reason="framing").inc()
                return False
            except FrameError as exc:
                if metrics is not None:
                    metrics.frames_refused.labels(reason="header").inc()
                await self._refuse(exc, Ack(exc.frame_id, acks))
                continue
            if frame is None:
                return True
            if metrics is not None:
                metrics.frames_received.labels(kind=frame.header.kind).inc()
                metrics.bytes_received.inc(frame.nbytes)
            await self._deliver(frame, Ack(frame.id, acks))


# --------------------------------------------------------------------- sender
@dataclass(frozen=True)
class Delivery:
    """How a sent frame ended: acked (``ok`` or refused with ``error``) or ``dropped``."""

    frame_id: str
    ok: bool
    error: str | None = None
    target: str | None = None
    """The base URL of the link that acked it."""
    dropped: bool = False
    """No link took the frame before its deadline (or the pool closed)."""


@dataclass(frozen=True)
class Peer:
    """What the receivers of a pool said of themselves when their links came up."""

    role: str | None
    fields: frozenset[str]
    """The optional frame-header fields every one of them reads."""

    @property
    def is_sink(self) -> bool:
        return self.role == SINK_ROLE


def _peer_of(headers: Any) -> Peer:
    listed = headers.get(FIELDS_HEADER, "")
    fields = frozenset(name.strip() for name in listed.split(",") if name.strip())
    return Peer(headers.get(ROLE_HEADER), fields)


class _Pending:
    """A frame from ``send`` until its ack: the pool keeps its bytes for resends."""

    __slots__ = (
        "buffers", "deadline", "expiry", "frame_id", "future", "kind", "nbytes", "was_sent",
    )

    def __init__(
        self, frame_id: str, buffers: list[Buffer], deadline: float | None, kind: str
    ) -> None:
        self.frame_id = frame_id
        self.buffers = buffers
        self.nbytes = sum(memoryview(b).nbytes for b in buffers)
        self.deadline = deadline
        self.kind = kind
        self.future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self.expiry: asyncio.TimerHandle | None = None
        self.was_sent = False

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) >= self.deadline

    def resolve(self, delivery: Delivery) -> None:
        if not self.future.done():
            self.future.set_result(delivery)
        self.buffers = []  # the bytes may be large; the ack ends the need for them


class _LinkRefused(Exception):
    """The receiver answered the stream request with an error status."""


class _Link:
    """One stream to one receiver, reconnected with backoff until closed."""

    def __init__(self, pool: LinkPool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.stream_url = stream_url(url)
        self.state: LinkState = "connecting"
        self.retiring = False
        self.peer: Peer | None = None
        """What the receiver announced on the latest connection."""
        self.last_error: str | None = None
        self.sent_total = 0
        self._outstanding: dict[str, deque[_Pending]] = {}
        self.count = 0
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._closed = False
        self._task = asyncio.create_task(self._run(), name=f"edgeweave-link {url}")

    def has_room(self) -> bool:
        return self.state == "up" and not self.retiring and self.count < self.pool.max_outstanding

    def push(self, pending: _Pending) -> None:
        pending.was_sent = True
        self._outstanding.setdefault(pending.frame_id, deque()).append(pending)
        self.count += 1
        self.sent_total += 1
        self._queue.put_nowait(pending)

    def retire(self) -> None:
        """Take no new frames; close once the outstanding ones are acked."""
        self.retiring = True
        if self.count == 0:
            self.close()

    @property
    def closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the stream cleanly (the receiver sees the end of the body)."""
        self._closed = True
        self._queue.put_nowait(None)

    async def wait_closed(self, grace_s: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def take_outstanding(self) -> list[_Pending]:
        pendings = [pending for queue in self._outstanding.values() for pending in queue]
        self._outstanding.clear()
        self.count = 0
        return pendings

    async def _run(self) -> None:
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                await self._serve_one_connection()
                reason = "the receiver ended the stream"
            except _LinkRefused as exc:
                reason = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except asyncio.CancelledError:
                self._connection_ended("cancelled", final=True)
                raise
            was_up = self.state == "up"
            final = self._closed or self.retiring
            self._connection_ended(reason, final=final)
            if final:
                return
            if was_up:
                delay = BACKOFF_INITIAL_S
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX_S)
            if self._closed:
                self._connection_ended("closed", final=True)
                return
            self.state = "connecting"

    def _connection_ended(self, reason: str, *, final: bool) -> None:
        self._note_failure(reason, self.state == "up")
        self.state = "closed" if final else "down"
        if final:
            self._closed = True
        self._queue.put_nowait(None)  # ends this connection's body generator
        self.pool._link_lost(self, self.take_outstanding(), final=final)

    def _note_failure(self, reason: str, was_up: bool) -> None:
        if self._closed:
            return
        if was_up or reason != self.last_error:
            log.warning("link to %s is down: %s", self.url, reason)
        self.last_error = reason

    async def _serve_one_connection(self) -> None:
        self._queue = asyncio.Queue()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.pool.connect_timeout, sock_read=None
        )
        # The receiver answers before reading any frame, so the response headers are
        # due within the connect timeout too: a peer that accepts and stays silent fails.
        response = await asyncio.wait_for(
            self.pool.session.post(
                self.stream_url,
                data=self._body(self._queue),
                headers={"Authorization": f"Bearer {self.pool.token}"},
                timeout=timeout,
            ),
            self.pool.connect_timeout,
        )
        async with response:
            if response.status != 200:
                text = (await response.text())[:300].strip()
                raise _LinkRefused(f"{self.url} answered HTTP {response.status}: {text}")
            self.peer = _peer_of(response.headers)
            self.state = "up"
            self.last_error = None
            self.pool._capacity_changed()
            await self._read_acks(response)

    async def _body(self, queue: asyncio.Queue[_Pending | None]) -> Any:
        # An empty first chunk makes aiohttp send the request headers now, so the
        # receiver answers (and the link comes up) before the first frame exists.
        yield b""
        metrics = self.pool.metrics
        while True:
            pending = await queue.get()
            if pending is None:
                return
            if pending.future.done():
                continue
            for buffer in pending.buffers:
                yield buffer
            if metrics is not None:
                metrics.frames_sent.labels(kind=pending.kind).inc()
                metrics.bytes_sent.inc(pending.nbytes)

    async def _read_acks(self, response: aiohttp.ClientResponse) -> None:
        async for line in response.content:
            if line.strip():
                self._on_ack(line)

    def _on_ack(self, line: bytes) -> None:
        try:
            document = json.loads(line)
            frame_id, ok = document["id"], document["ok"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{self.url} sent a line that is not an ack: {line[:100]!r}") from None
        queue = self._outstanding.get(frame_id) if isinstance(frame_id, str) else None
        if not queue:
            log.info("ack from %s for a frame it does not hold: %s", self.url, line[:200])
            return
        pending = queue.popleft()
        if not queue:
            del self._outstanding[frame_id]
        self.count -= 1
        error = document.get("error")
        pending.resolve(
            Delivery(frame_id, ok is True, str(error) if error is not None else None, self.url)
        )
        if self.retiring and self.count == 0:
            self.close()
        self.pool._capacity_changed()


def stream_url(url: str) -> str:
    """The stream endpoint of a target: a base URL gets ``/v1/stream``, a full one is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"link target {url!r} is not an http(s) URL")
    if parts.path in ("", "/"):
        return url.rstrip("/") + STREAM_PATH
    return url


class LinkPool:
    """Frames to the replicas of the next stage, least-outstanding first, resent on failure.

    Construct it inside a running event loop (links start connecting at once). The
    frame's deadline and kind are read from its own header, so the pool cannot disagree
    with the frame about when to give up. ``max_wait_s``, when given, also bounds how
    long a frame waits for a link with room (a frame without a deadline, too).
    ``gauges=False`` leaves the metrics' link gauges to the owner (who sums pools).
    """

    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        *,
        max_outstanding_per_link: int = DEFAULT_MAX_OUTSTANDING,
        session: aiohttp.ClientSession | None = None,
        metrics: WorkerMetrics | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_wait_s: float | None = None,
        gauges: bool = True,
    ) -> None:
        if max_outstanding_per_link < 1:
            raise ValueError("max_outstanding_per_link must be at least 1")
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError("max_wait_s must be positive")
        for url in urls:
            stream_url(url)  # refuse a bad target before opening anything
        self.token = token
        self.max_outstanding = max_outstanding_per_link
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.max_wait_s = max_wait_s
        self._own_session = session is None
        self.session = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            read_bufsize=STREAM_READ_BUFFER,
        )
        self._links: dict[str, _Link] = {}
        self._retiring: set[_Link] = set()
        self._retry: deque[_Pending] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.set_targets(urls)
        if metrics is not None and gauges:
            metrics.link_outstanding.set_function(self.outstanding)
            metrics.links_up.set_function(self.links_up)

    # ------------------------------------------------------------- public
    @property
    def targets(self) -> list[str]:
        return list(self._links)

    def outstanding(self) -> int:
        """Frames sent and not yet acked, on every link (retiring ones too)."""
        return sum(link.count for link in self._all_links()) + len(self._retry)

    def outstanding_by_target(self) -> dict[str, int]:
        return {link.url: link.count for link in self._all_links()}

    def links_up(self) -> int:
        return sum(1 for link in self._links.values() if link.state == "up")

    def peer(self) -> Peer | None:
        """What the current replicas announced; ``None`` until one link has come up.

        The role is theirs when they agree; the fields are those every one reads, so a
        frame encoded for them suits whichever link it ends up on."""
        peers = [link.peer for link in self._links.values() if link.peer is not None]
        if not peers:
            return None
        roles = {peer.role for peer in peers}
        fields = frozenset.intersection(*(peer.fields for peer in peers))
        return Peer(roles.pop() if len(roles) == 1 else None, fields)

    async def wait_for_peer(self, deadline: float | None) -> Peer | None:
        """:meth:`peer`, once a link has come up; ``None`` if none did by ``deadline``."""
        while (peer := self.peer()) is None:
            if self._closed or (deadline is not None and time.time() >= deadline):
                return None
            await self._wait_for_capacity(deadline)
        return peer

    def link_errors(self) -> dict[str, str]:
        """The last failure of every link that is not up, for 503 reasons and logs."""
        return {
            link.url: link.last_error or link.state
            for link in self._links.values()
            if link.state != "up"
        }

    async def send(self, frame_id: str, buffers: Sequence[Buffer]) -> asyncio.Future[Delivery]:
        """Hand a frame (``encode_frame``'s buffers) to a link; waits while all are full.

        Returns a future that resolves when the frame is acked or dropped; it never
        raises. Do not modify the buffers' memory until then.
        """
        pending = self._pending(frame_id, buffers)
        give_up = self._give_up_time(pending)
        while True:
            if self._place(pending):
                return pending.future
            if self._closed:
                self._drop(pending, "the link pool was closed")
                return pending.future
            if give_up is not None and time.time() >= give_up:
                self._drop(pending, self._no_link_reason(pending))
                return pending.future
            await self._wait_for_capacity(give_up)

    def enqueue(self, frame_id: str, buffers: Sequence[Buffer]) -> asyncio.Future[Delivery]:
        """Like :meth:`send`, but never waits: a frame no link has room for waits in the
        pool (until its deadline or ``max_wait_s``) and the caller goes on. For a sender
        that must not stall every frame behind one target; its own bound on frames in
        flight (end-to-end acks upstream) is what keeps the pool's queue small."""
        pending = self._pending(frame_id, buffers)
        if not self._place(pending):
            self._hold(pending)
            self._capacity_changed()  # frames waiting while a link has room go now
        return pending.future

    def set_targets(self, urls: Sequence[str]) -> None:
        """Replace the replica set live: new links connect, removed ones drain and close."""
        wanted = list(dict.fromkeys(urls))
        for url in wanted:
            stream_url(url)  # refuse a bad URL before changing anything
        for url in list(self._links):
            if url not in wanted:
                link = self._links.pop(url)
                self._retiring.add(link)
                link.retire()
        for url in wanted:
            if url in self._links:
                continue
            revived = next((link for link in self._retiring if link.url == url), None)
            if revived is not None and not revived.closing:
                self._retiring.discard(revived)
                revived.retiring = False
                self._links[url] = revived
            else:
                self._links[url] = _Link(self, url)
        self._capacity_changed()

    async def close(self, grace_s: float = 1.0) -> None:
        """Close every link; frames not yet acked resolve as dropped."""
        if self._closed:
            return
        self._closed = True
        links = self._all_links()
        for link in links:
            link.close()
        await asyncio.gather(*(link.wait_closed(grace_s) for link in links))
        for link in links:
            for pending in link.take_outstanding():
                self._drop(pending, "the link pool was closed")
        while self._retry:
            self._drop(self._retry.popleft(), "the link pool was closed")
        self._wake_all()
        if self._own_session:
            await self.session.close()

    # ------------------------------------------------------------- internals
    def _pending(self, frame_id: str, buffers: Sequence[Buffer]) -> _Pending:
        if self._closed:
            raise RuntimeError("send() on a closed LinkPool")
        deadline, kind = _deadline_and_kind(frame_id, buffers)
        return _Pending(frame_id, list(buffers), deadline, kind)

    def _place(self, pending: _Pending) -> bool:
        """Put ``pending`` on the best link now, unless resends wait or no link has room."""
        if self._retry:
            return False
        link = self._least_outstanding()
        if link is None:
            return False
        link.push(pending)
        return True

    def _give_up_time(self, pending: _Pending) -> float | None:
        """When a frame waiting for a link is dropped: its deadline, or sooner."""
        if self.max_wait_s is None:
            return pending.deadline
        waited = time.time() + self.max_wait_s
        return waited if pending.deadline is None else min(pending.deadline, waited)

    def _hold(self, pending: _Pending) -> None:
        """Keep ``pending`` until a link has room; drop it when it has waited too long."""
        if self._closed:
            self._drop(pending, "the link pool was closed")
            return
        give_up = self._give_up_time(pending)
        if give_up is not None and time.time() >= give_up:
            self._drop(pending, self._no_link_reason(pending))
            return
        self._retry.append(pending)
        if give_up is not None:
            pending.expiry = asyncio.get_running_loop().call_later(
                max(0.0, give_up - time.time()), self._expire_retry, pending
            )

    def _all_links(self) -> list[_Link]:
        return [*self._links.values(), *self._retiring]

    def _least_outstanding(self) -> _Link | None:
        best: _Link | None = None
        for link in self._links.values():
            if link.has_room() and (
                best is None or (link.count, link.sent_total) < (best.count, best.sent_total)
            ):
                best = link
        return best

    async def _wait_for_capacity(self, deadline: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if deadline is None:
                await waiter
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, max(0.0, deadline - time.time()))
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _capacity_changed(self) -> None:
        """A link came up or freed a slot: place resends first, then wake senders."""
        while self._retry:
            link = self._least_outstanding()
            if link is None:
                break
            pending = self._retry.popleft()
            if pending.expiry is not None:
                pending.expiry.cancel()
                pending.expiry = None
            if pending.was_sent and self.metrics is not None:
                self.metrics.frames_resent.inc()
            link.push(pending)
        self._wake_all()

    def _wake_all(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _link_lost(self, link: _Link, pendings: list[_Pending], *, final: bool) -> None:
        """A link's connection ended: its unacked frames go to the others (or wait)."""
        if final:
            self._retiring.discard(link)
        for pending in pendings:
            if pending.expired():
                self._drop(pending, f"deadline passed after {link.url} failed: {link.last_error}")
            else:
                self._hold(pending)
        self._capacity_changed()

    def _expire_retry(self, pending: _Pending) -> None:
        pending.expiry = None
        with contextlib.suppress(ValueError):
            self._retry.remove(pending)
            self._drop(pending, self._no_link_reason(pending))
            self._wake_all()

    def _drop(self, pending: _Pending, reason: str) -> None:
        if pending.future.done():
            return
        if self.metrics is not None:
            self.metrics.frames_dropped.inc()
        log.info("dropping frame %r: %s", pending.frame_id, reason)
        pending.resolve(Delivery(pending.frame_id, False, reason, None, dropped=True))

    def _no_link_reason(self, pending: _Pending) -> str:
        when = (
            "the deadline passed" if pending.expired()
            else f"gave up after waiting {self.max_wait_s:g} s"
        )
        if not self._links:
            return f"{when}: the link pool has no targets"
        errors = self.link_errors()
        if not errors:
            return f"{when} while every downstream link was at its cap"
        shown = "; ".join(f"{url}: {error}" for url, error in errors.items())
        return f"{when} with no live downstream link ({shown})"


class ReplyTargets:
    """One :class:`LinkPool` per gateway replica that results go back to (``reply_to``).

    A pool is made on first use and closed once it has held nothing for ``idle_s``, so
    a gateway replica that is gone costs nothing after a while. At most ``max_targets``
    exist at once: :meth:`pool_for` answers ``None`` beyond that, and the caller refuses
    the frame. A frame waits at most ``max_wait_s`` for its replica's link (see
    :data:`DEFAULT_REPLY_MAX_WAIT_S`). Construct it inside a running event loop.
    """

    def __init__(
        self,
        token: str,
        *,
        max_targets: int = DEFAULT_MAX_REPLY_TARGETS,
        idle_s: float = DEFAULT_REPLY_IDLE_S,
        max_wait_s: float = DEFAULT_REPLY_MAX_WAIT_S,
        max_outstanding_per_link: int = DEFAULT_MAX_OUTSTANDING,
        metrics: WorkerMetrics | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        if max_targets < 1 or not idle_s > 0:
            raise ValueError("max_targets must be at least 1 and idle_s positive")
        self.token = token
        self.max_targets = max_targets
        self.idle_s = idle_s
        self._pool_options: dict[str, Any] = {
            "max_outstanding_per_link": max_outstanding_per_link, "metrics": metrics,
            "connect_timeout": min(connect_timeout, max_wait_s), "max_wait_s": max_wait_s,
            "gauges": False,
        }
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            read_bufsize=STREAM_READ_BUFFER,
        )
        self._pools: dict[str, LinkPool] = {}
        self._last_used: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._reaper = asyncio.create_task(self._reap_idle(), name="edgeweave-reply-reaper")

    @property
    def targets(self) -> list[str]:
        return list(self._pools)

    def pool_for(self, url: str) -> LinkPool | None:
        """The pool to ``url`` (made now if new); ``None`` when at ``max_targets``."""
        if self._closed:
            raise RuntimeError("pool_for() on closed ReplyTargets")
        pool = self._pools.get(url)
        if pool is None:
            if len(self._pools) >= self.max_targets:
                return None
            pool = LinkPool([url], self.token, session=self._session, **self._pool_options)
            self._pools[url] = pool
            log.info("results now also go back to %s", url)
        self._last_used[url] = time.monotonic()
        return pool

    def outstanding(self) -> int:
        return sum(pool.outstanding() for pool in self._pools.values())

    def links_up(self) -> int:
        return sum(pool.links_up() for pool in self._pools.values())

    async def close(self) -> None:
        """Close every pool; frames not yet acked resolve as dropped."""
        if self._closed:
            return
        self._closed = True
        self._reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reaper
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.close(grace_s=0.5) for pool in pools), *self._closing)
        await self._session.close()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self.idle_s / 4)
            now = time.monotonic()
            for url, pool in list(self._pools.items()):
                if pool.outstanding() == 0 and now - self._last_used[url] >= self.idle_s:
                    # Out of the table first: a frame for this replica meanwhile gets a
                    # new pool rather than one that is closing.
                    del self._pools[url], self._last_used[url]
                    closing = asyncio.create_task(pool.close(grace_s=0.5))
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
                    log.info("closed the idle result link to %s", url)


def _deadline_and_kind(frame_id: str, buffers: Sequence[Buffer]) -> tuple[float | None, str]:
    """The deadline and kind from the frame's own header (the first buffer(s))."""
    head = memoryview(buffers[0]).cast("B") if buffers else memoryview(b"")
    if len(head) >= PREFIX_BYTES:
        header_len, _ = parse_prefix(head[:PREFIX_BYTES])
    else:
        header_len = -1
    if len(head) < PREFIX_BYTES + header_len or header_len < 0:
        joined = b"".join(bytes(b) for b in buffers)
        header_len, _ = parse_prefix(joined[:PREFIX_BYTES])
        head = memoryview(joined)
    header = json.loads(bytes(head[PREFIX_BYTES : PREFIX_BYTES + header_len]))
    if header.get("id") != frame_id:
        raise ValueError(f"send({frame_id!r}) got the frame of {header.get('id')!r}")
    return header.get("deadline"), header.get("kind", "data")
