"""The stage worker (DESIGN.md §3): frames in, one shard of the model, frames out.

Three things run at once, joined by bounded queues, so that a stage receives the
next frame and sends the previous result while it computes the current one:

    inbound streams ──deliver──▶ [inbox: queue_size] ──compute thread──▶ [outbox: queue_size]
        ──sender──▶ LinkPool (≤ max_outstanding per downstream replica) ──▶ next stage

Each stage is a full link receiver (:class:`~edgeweave.worker.link.StreamReceiver`),
so when the inbox is full the inbound streams stop being read and TCP pushes back on
the stage before: nothing here grows with the offered load.

Acks travel back end to end: a stage acks an inbound frame when its downstream has
acked the result (the contract's "handed to its outbound LinkPool", held until that
hand-off is confirmed). So at every moment some live process still holds the bytes
of every frame not yet at the gateway, and killing any one replica loses nothing:
its upstream resends what it had not been acked. The price is that a link's cap
bounds all frames in flight behind it, so the cap must cover a few stages of
pipelining (the default 16 does).

Where results go: to the ``--downstream`` pool, except at the last stage for a frame
that names a ``reply_to`` (the gateway replica holding the request): that result goes
to that replica, through a pool of its own (:class:`~edgeweave.worker.link.ReplyTargets`),
so that several gateway replicas can share one set of stages. A stage knows it is the
last from its downstream's handshake (the gateway announces itself as the sink), so
neither the operator nor ``edgeweave run`` has to say it. Each output frame carries
the input frame's ``reply_to`` on, and the optional header fields only go to a
receiver that announced it reads them (an older one would refuse the frame).

Error frames name a category (:data:`~edgeweave.worker.frames.ERROR_CATEGORIES`):
the gateway's client status comes from it, never from the message's wording.

onnxruntime runs with ``intra_op_num_threads = threads`` (the node's CPU share), one
inter-op thread, sequential execution, and its worker threads do not spin-wait: a
spinning pool would burn the CPU share that receiving and sending need, and in
``edgeweave run`` other stages share the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import Gauge

from edgeweave.errors import EdgeweaveError
from edgeweave.worker.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    DTYPES,
    OPTIONAL_HEADER_KEYS,
    Frame,
    FrameError,
    FrameHeader,
    FrameTooLarge,
    encode_frame,
)
from edgeweave.worker.link import (
    DEFAULT_MAX_OUTSTANDING,
    DEFAULT_MAX_REPLY_TARGETS,
    DEFAULT_REPLY_IDLE_S,
    DEFAULT_REPLY_MAX_WAIT_S,
    STAGE_ROLE,
    STREAM_PATH,
    STREAM_READ_BUFFER,
    Ack,
    Delivery,
    LinkPool,
    Peer,
    ReplyTargets,
    StreamReceiver,
    bearer_auth_middleware,
    stream_url,
)
from edgeweave.worker.metrics import WorkerMetrics
from edgeweave.worker.shardfile import ShardFileError, check_sha256_format, read_shard

log = logging.getLogger(__name__)

REPLY_FIELDS = frozenset(OPTIONAL_HEADER_KEYS) - {"reply_to"}
"""What a result to its gateway replica carries: a gateway that sets ``reply_to`` reads
every optional field (they came in one version), and the frame is where it belongs."""
DEFAULT_QUEUE_SIZE = 2
"""Frames waiting to compute (and computed, waiting to send): two keep the compute
thread fed across a network hiccup; more would only add latency and memory."""
PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics")
"""Probes and scrapers carry no token."""

ORT_TENSOR_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
"""onnxruntime's type names of the tensor types frames carry (frames.DTYPES)."""
assert set(ORT_TENSOR_TYPES.values()) == set(DTYPES)


class ShardModelError(EdgeweaveError):
    """The shard loads, but a stage cannot serve it (tensor types frames cannot carry)."""


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage worker needs; the CLI's options one to one."""

    shard: str
    """A path, ``file://`` or http(s) URL."""
    downstream: tuple[str, ...]
    """Base URLs of the next stage's replicas (or of the gateway after the last stage)."""
    token: str
    name: str = "stage"
    shard_sha256: str | None = None
    threads: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_outstanding: int = DEFAULT_MAX_OUTSTANDING
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_reply_targets: int = DEFAULT_MAX_REPLY_TARGETS
    """Gateway replicas a last stage sends results to at once; more are refused."""
    reply_idle_s: float = DEFAULT_REPLY_IDLE_S
    """A link to a gateway replica that carried nothing for this long is closed."""
    reply_max_wait_s: float = DEFAULT_REPLY_MAX_WAIT_S
    """How long a result waits for a link to its gateway replica before it is dropped."""

    def __post_init__(self) -> None:
        if not self.token:
            raise EdgeweaveError("a stage needs the pipeline's token (it must not be empty)")
        if not self.downstream:
            raise EdgeweaveError(f"stage {self.name}: give at least one --downstream URL")
        for url in self.downstream:
            try:
                stream_url(url)
            except ValueError as exc:
                raise EdgeweaveError(f"stage {self.name}: --downstream {exc}") from None
        if self.threads < 1 or self.queue_size < 1 or self.max_outstanding < 1:
            raise EdgeweaveError(
                f"stage {self.name}: --threads, --queue-size and --max-outstanding must be ≥ 1"
            )
        if self.max_reply_targets < 1 or not (self.reply_idle_s > 0 and self.reply_max_wait_s > 0):
            raise EdgeweaveError(
                f"stage {self.name}: max_reply_targets must be ≥ 1, reply_idle_s and "
                "reply_max_wait_s positive"
            )
        object.__setattr__(self, "shard_sha256", check_sha256_format(self.shard_sha256))


# --------------------------------------------------------------------- the shard
@dataclass(frozen=True)
class TensorRule:
    """What a shard input accepts: its dtype, rank and the dims the model fixes."""

    name: str
    dtype: str
    dims: tuple[int | None, ...]
    """``None`` where the model leaves the size open (a symbolic batch dimension)."""

    def problem(self, array: np.ndarray) -> str | None:
        if array.dtype.name != self.dtype:
            return f"input {self.name!r} must be {self.dtype}, not {array.dtype.name}"
        if array.ndim != len(self.dims) or any(
            want is not None and got != want
            for got, want in zip(array.shape, self.dims, strict=True)
        ):
            wanted = [("*" if d is None else d) for d in self.dims]
            return f"input {self.name!r} must have shape {wanted}, not {list(array.shape)}"
        return None

    def example(self) -> np.ndarray:
        return np.zeros([1 if d is None else d for d in self.dims], dtype=DTYPES[self.dtype])


def session_options(ort: Any, threads: int) -> Any:
    """How every shard runs: ``threads`` kernel threads (the node's CPU share), one
    operator at a time, no spinning (a spinning thread burns the CPU quota it waits in).
    Layer timing uses the same options, so its kernels and fusions are the stage's."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class ShardRunner:
    """An onnxruntime session over one shard, and the rules its inputs must meet."""

    def __init__(self, model: bytes, *, threads: int = 1, label: str = "shard") -> None:
        import onnxruntime as ort  # the worker extra; the planner never imports it

        options = session_options(ort, threads)
        try:
            self.session = ort.InferenceSession(
                model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise ShardFileError(
                f"{label} is not a model onnxruntime can load: {first_line}"
            ) from None
        self.inputs = [_rule(arg, label, "input") for arg in self.session.get_inputs()]
        self.outputs = [arg.name for arg in self.session.get_outputs()]
        for arg in self.session.get_outputs():
            _rule(arg, label, "output")
        self._input_names = {rule.name for rule in self.inputs}

    def check(self, frame: Frame) -> str | None:
        """Why ``frame`` is not exactly this shard's inputs, or ``None``."""
        names = set(frame.tensors)
        if names != self._input_names:
            missing = sorted(self._input_names - names)
            extra = sorted(names - self._input_names)
            parts = []
            if missing:
                parts.append(f"lacks input(s) {missing}")
            if extra:
                parts.append(f"carries tensor(s) {extra} the shard does not take")
            expected = [rule.name for rule in self.inputs]
            return f"frame {frame.id!r} {' and '.join(parts)} (the shard takes {expected})"
        for rule in self.inputs:
            problem = rule.problem(frame.tensors[rule.name])
            if problem is not None:
                return f"frame {frame.id!r}: {problem}"
        return None

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.outputs, dict(tensors))
        return dict(zip(self.outputs, results, strict=True))

    def warm_up(self) -> None:
        """One inference on zeros, so the first real frame does not pay for allocations."""
        self.run({rule.name: rule.example() for rule in self.inputs})


def _rule(arg: Any, label: str, role: str) -> TensorRule:
    dtype = ORT_TENSOR_TYPES.get(arg.type)
    if dtype is None:
        raise ShardModelError(
            f"{label}: {role} {arg.name!r} has type {arg.type}, which frames cannot carry "
            f"(they carry {', '.join(DTYPES)})"
        )
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorRule(arg.name, dtype, dims)


# --------------------------------------------------------------------- the worker
@dataclass(eq=False)
class _Work:
    """One inbound frame on its way through the stage; several acks if it came twice."""

    frame: Frame
    acks: list[Ack]
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    """Why this stage refused the frame: an error frame goes downstream, and upstream's
    ack says ``ok: false`` with this message once downstream has the error frame."""
    category: str = "internal"
    """The error's category (frames.ERROR_CATEGORIES), when there is an error."""

    def refuse(self, message: str, category: str) -> None:
        self.error, self.category = message, category


class StageWorker:
    """The aiohttp app of one stage replica; the shard loads in the background."""

    def __init__(self, config: StageConfig) -> None:
        self.config = config
        self.metrics = WorkerMetrics(role="stage", name=config.name)
        self.runner: ShardRunner | None = None
        self.load_error: str | None = None
        self.pool: LinkPool | None = None
        self.replies: ReplyTargets | None = None
        self._inbox: asyncio.Queue[_Work] = asyncio.Queue(config.queue_size)
        self._outbox: asyncio.Queue[_Work] = asyncio.Queue(config.queue_size)
        self._inflight: dict[str, _Work] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{config.name}")
        self._tasks: list[asyncio.Task[Any]] = []
        self._load_task: asyncio.Task[None] | None = None
        self.receiver = StreamReceiver(
            config.token,
            self._deliver,
            refuse=self._refuse,
            not_ready=self._not_ready,
            max_frame_bytes=config.max_frame_bytes,
            metrics=self.metrics,
            role=STAGE_ROLE,
        )
        self.metrics.watch_queue("in", self._inbox.qsize, config.queue_size)
        self.metrics.watch_queue("out", self._outbox.qsize, config.queue_size)
        self.app = self._make_app()

    @property
    def ready(self) -> bool:
        return self.runner is not None

    async def wait_loaded(self) -> None:
        """Wait for the shard; raises the load's error (a bad sha256, a refused download)."""
        assert self._load_task is not None, "the app has not started"
        await asyncio.shield(self._load_task)

    # ------------------------------------------------------------- app
    def _make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[bearer_auth_middleware(self.config.token, PUBLIC_PATHS)]
        )
        app.router.add_post(STREAM_PATH, self.receiver.handle)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self.metrics.handle)
        app.router.add_put("/v1/downstream", self._put_downstream)
        app.router.add_get("/v1/downstream", self._get_downstream)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.pool = LinkPool(
            self.config.downstream,
            self.config.token,
            max_outstanding_per_link=self.config.max_outstanding,
            metrics=self.metrics,
            gauges=False,
        )
        self.replies = ReplyTargets(
            self.config.token,
            max_targets=self.config.max_reply_targets,
            idle_s=self.config.reply_idle_s,
            max_wait_s=self.config.reply_max_wait_s,
            max_outstanding_per_link=self.config.max_outstanding,
            metrics=self.metrics,
        )
        self._watch_links(self.pool, self.replies)
        self._load_task = asyncio.create_task(self._load(), name="edgeweave-load-shard")
        # The error stays in load_error and /readyz; retrieving it here keeps asyncio
        # from reporting it again when nobody awaits wait_loaded().
        self._load_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        self._tasks = [
            asyncio.create_task(self._compute_loop(), name="edgeweave-compute"),
            asyncio.create_task(self._send_loop(), name="edgeweave-send"),
        ]

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.receiver.close()

    async def _on_cleanup(self, app: web.Application) -> None:
        tasks = [*self._tasks, *([self._load_task] if self._load_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.pool is not None:
            await self.pool.close()
        if self.replies is not None:
            await self.replies.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _load(self) -> None:
        label = f"stage {self.config.name}'s shard {self.config.shard}"
        try:
            async with aiohttp.ClientSession() as session:
                data = await read_shard(
                    self.config.shard,
                    sha256=self.config.shard_sha256,
                    token=self.config.token,
                    session=session,
                )
            runner = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                functools.partial(ShardRunner, data, threads=self.config.threads, label=label),
            )
            del data
            await asyncio.get_running_loop().run_in_executor(self._executor, runner.warm_up)
        except EdgeweaveError as exc:
            self.load_error = str(exc)
            log.error("%s", exc)
            raise
        except Exception as exc:
            self.load_error = f"{label}: warm-up failed: {exc}"
            log.error("%s", self.load_error)
            raise EdgeweaveError(self.load_error) from None
        self.runner = runner
        self.metrics.ready.set(1)
        log.info(
            "stage %s ready: inputs %s, outputs %s", self.config.name,
            [r.name for r in runner.inputs], runner.outputs,
        )

    def _watch_links(self, pool: LinkPool, replies: ReplyTargets) -> None:
        """Link gauges over both kinds of outbound pool; the reply targets have their own."""
        metrics = self.metrics
        metrics.link_outstanding.set_function(lambda: pool.outstanding() + replies.outstanding())
        metrics.links_up.set_function(lambda: pool.links_up() + replies.links_up())
        Gauge(
            "edgeweave_reply_targets",
            "Gateway replicas this (last) stage holds a result link to.",
            registry=metrics.registry,
        ).set_function(lambda: len(replies.targets))
        Gauge(
            "edgeweave_frames_held",
            "Frames taken in to compute whose result downstream has not acked yet.",
            registry=metrics.registry,
        ).set_function(lambda: len(self._inflight))

    def _not_ready(self) -> str | None:
        if self.runner is not None:
            return None
        return f"load failed: {self.load_error}" if self.load_error else "loading the shard"

    # ------------------------------------------------------------- endpoints
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "name": self.config.name})

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._not_ready()
        if reason is None:
            return web.json_response({"ready": True, "name": self.config.name})
        return web.json_response(
            {"ready": False, "name": self.config.name, "reason": reason}, status=503
        )

    async def _put_downstream(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        urls = document.get("urls") if isinstance(document, dict) else None
        if (
            not isinstance(urls, list)
            or not urls
            or not all(isinstance(url, str) for url in urls)
        ):
            return web.json_response(
                {"error": 'the body must be {"urls": [one or more http(s) URLs]}'}, status=400
            )
        assert self.pool is not None
        try:
            self.pool.set_targets(urls)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("stage %s: downstream is now %s", self.config.name, urls)
        return web.json_response({"urls": self.pool.targets})

    async def _get_downstream(self, request: web.Request) -> web.Response:
        assert self.pool is not None and self.replies is not None
        return web.json_response(
            {
                "urls": self.pool.targets,
                "outstanding": self.pool.outstanding_by_target(),
                "links_up": self.pool.links_up(),
                "errors": self.pool.link_errors(),
                "reply_targets": self.replies.targets,
            }
        )

    # ------------------------------------------------------------- frames in
    async def _deliver(self, frame: Frame, ack: Ack) -> None:
        duplicate = self._inflight.get(frame.id)
        if duplicate is not None:
            # Resent by an upstream whose link to us failed: one compute answers both.
            duplicate.acks.append(ack)
            return
        work = _Work(frame, [ack])
        if frame.is_error:
            await self._forward(work)
            return
        assert self.runner is not None  # the receiver refuses streams until loaded
        problem = self.runner.check(frame)
        if problem is not None:
            self.metrics.frames_refused.labels(reason="tensors").inc()
            work.refuse(f"stage {self.config.name}: {problem}", "invalid_input")
            await self._forward(work)
            return
        self._inflight[frame.id] = work
        await self._inbox.put(work)

    async def _refuse(self, error: FrameError, ack: Ack) -> None:
        """A frame whose header was refused: tell upstream, and the gateway via an error frame."""
        message = f"stage {self.config.name} refused a frame: {error}"
        if error.frame_id is None:
            ack.fail(message)
            return
        header = FrameHeader.for_error(
            error.frame_id, message, category="invalid_input", reply_to=error.reply_to
        )
        work = _Work(Frame(header), [ack], error=message, category="invalid_input")
        await self._forward(work)

    # ------------------------------------------------------------- compute
    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = await self._inbox.get()
            deadline = work.frame.deadline
            late = time.time() - deadline if deadline is not None else 0.0
            if late > 0:
                self.metrics.frames_refused.labels(reason="deadline").inc()
                work.refuse(
                    f"deadline exceeded: stage {self.config.name} got frame {work.frame.id!r} "
                    f"{late:.3f} s after its deadline", "deadline",
                )
            else:
                await self._compute(loop, work)
            await self._outbox.put(work)

    async def _compute(self, loop: asyncio.AbstractEventLoop, work: _Work) -> None:
        assert self.runner is not None
        metrics = self.metrics
        metrics.busy.begin()
        started = time.perf_counter()
        try:
            work.outputs = await loop.run_in_executor(
                self._executor, self.runner.run, work.frame.tensors
            )
            metrics.frames_computed.inc()
        except Exception as exc:  # onnxruntime's errors are untyped; the stage lives on
            metrics.frames_refused.labels(reason="compute").inc()
            work.refuse(
                f"stage {self.config.name} failed to compute frame {work.frame.id!r}: {exc}",
                "internal",
            )
            log.warning("%s", work.error)
        finally:
            elapsed = time.perf_counter() - started
            metrics.busy.end()
            metrics.compute_seconds.observe(elapsed)
            metrics.busy_seconds.inc(elapsed)
            work.frame = Frame(work.frame.header)  # release the input bytes now

    # ------------------------------------------------------------- frames out
    async def _send_loop(self) -> None:
        while True:
            work = await self._outbox.get()
            try:
                await self._forward(work)
            except Exception as exc:  # a bug must cost this frame, not the stage
                log.exception("stage %s cannot forward %r", self.config.name, work.frame.id)
                self._inflight.pop(work.frame.id, None)
                for ack in work.acks:
                    ack.fail(f"stage {self.config.name} could not forward the frame: {exc}")

    async def _forward(self, work: _Work) -> None:
        """Send the result (or error frame) on; ack upstream once it is acked there.

        Downstream's handshake decides two things: which optional header fields go
        (none it would refuse), and whether this is the last stage, whose results go
        to the gateway replica named by ``reply_to``. A frame that arrives before any
        downstream link came up waits for one here, as it would in ``send``.
        """
        assert self.pool is not None and self.replies is not None
        peer = await self.pool.wait_for_peer(work.frame.deadline)
        reply_to = work.frame.header.reply_to
        if reply_to is not None and peer is not None and peer.is_sink:
            replies = self.replies.pool_for(reply_to)
            if replies is not None:
                # Never wait here: a slow or dead gateway replica must not hold up the
                # results of the others. The upstream links' caps bound what piles up.
                future = replies.enqueue(work.frame.id, self._encode(work, REPLY_FIELDS))
                future.add_done_callback(functools.partial(self._settle, work))
                return
            work.refuse(
                f"stage {self.config.name} already sends results to "
                f"{self.replies.max_targets} gateway replicas, the most it serves; "
                f"refusing the request from {reply_to}", "overloaded",
            )
        future = await self.pool.send(work.frame.id, self._encode(work, _sendable_fields(peer)))
        future.add_done_callback(functools.partial(self._settle, work))

    def _encode(self, work: _Work, fields: Collection[str]) -> list[bytes | memoryview]:
        """The frame to send on (result or error), with only ``fields`` of the optional ones."""
        header = work.frame.header
        if work.error is None and header.kind != "error":
            assert work.outputs is not None
            try:
                return encode_frame(
                    FrameHeader(header.id, header.deadline, reply_to=header.reply_to)
                    .reduced_to(fields),
                    work.outputs, max_frame_bytes=self.config.max_frame_bytes,
                )
            except FrameTooLarge as exc:
                work.refuse(f"stage {self.config.name}: cannot send its result: {exc}",
                            "too_large")
            except FrameError as exc:
                work.refuse(f"stage {self.config.name}: cannot send its result: {exc}",
                            "internal")
        if work.error is not None:
            header = FrameHeader.for_error(
                header.id, work.error, header.deadline, category=work.category,
                reply_to=header.reply_to,
            )
        work.outputs = None
        return encode_frame(header.reduced_to(fields), {})

    def _settle(self, work: _Work, future: asyncio.Future[Delivery]) -> None:
        if self._inflight.get(work.frame.id) is work:
            del self._inflight[work.frame.id]
        delivery = future.result()
        for ack in work.acks:
            if not delivery.ok:
                ack.fail(delivery.error or "refused downstream")
            elif work.error is not None:
                ack.fail(work.error)
            else:
                ack.ok()


def _sendable_fields(peer: Peer | None) -> frozenset[str]:
    """The optional header fields a frame to the default downstream may carry: those it
    reads, but no ``reply_to`` to a gateway (through its Service, the frame is not
    where the field says it should go; a result there is the old, one-replica way)."""
    if peer is None:
        return frozenset()
    return peer.fields - {"reply_to"} if peer.is_sink else peer.fields


# --------------------------------------------------------------------- serving
@dataclass
class RunningStage:
    """A stage worker serving on a socket (the CLI's and the tests' way to run one)."""

    worker: StageWorker
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_stage(config: StageConfig, host: str = "127.0.0.1", port: int = 0) -> RunningStage:
    """Serve a stage on ``host:port`` (0: any free port); the shard loads in the background."""
    worker = StageWorker(config)
    runner = web.AppRunner(
        worker.app, read_bufsize=STREAM_READ_BUFFER, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise EdgeweaveError(f"stage {config.name} cannot listen on {host}:{port}: {exc}") from None
    bound = _bound_port(runner, port)
    return RunningStage(worker, runner, host, bound)


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, Sequence) and len(address) >= 2:
            return int(address[1])
    return requested
