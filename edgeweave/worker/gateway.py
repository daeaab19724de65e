"""The pipeline's front door: the Open Inference Protocol v2 over HTTP (DESIGN.md §3).

Clients talk KServe v2 to the gateway; the gateway turns each inference request into one
frame, sends it to a stage-0 replica through a :class:`~edgeweave.worker.link.LinkPool`,
and receives the result on its own ``POST /v1/stream`` sink, to which every last-stage
replica streams. The gateway is therefore both the pipeline's first sender and its final
receiver, and every hop in between is the same kind of link.

Request life cycle::

    decode + validate (protocol.py) → in-flight entry (future, deadline, inputs)
      → frame "<request>.<attempt>" to stage 0 → … stages … → the sink matches the
      frame id and resolves the future → v2 response (JSON or binary outputs)

Why the pieces are shaped this way:

- **Frame ids are internal.** A client's ``id`` is echoed in its response but never used
  as a key: two clients may both send ``"id": "1"``. Each *attempt* gets its own frame id
  (``<request>.<n>``), so a re-sent request is a new frame to every stage (a stage merges
  re-sends of one frame id, which would tie the retry to the path it is escaping);
  whichever attempt's result arrives first answers, later ones are acked and dropped.
- **Who retries what.** Acks run end to end (a stage acks a frame once its downstream
  acked the result), so every frame not yet at the gateway is still held by a live
  sender, and each LinkPool re-sends what a failed link never acked: a killed replica
  loses nothing. The gateway's own delivery future therefore tells it how the *whole*
  trip ended: acked (the result reached the sink), refused (an error frame reached the
  sink first), or dropped somewhere for lack of a path before the deadline (→ 503 with
  that hop's reason). What acks cannot see is a replica that hangs while its link stays
  up; for that the gateway re-sends a request with no result after a retry interval:
  a multiple of the pipeline's recent latency, never more than a fraction of the
  timeout, doubling after each retry, and never while every stage-0 link is at its cap
  (then the result is late because the pipeline is full, and a duplicate would only
  deepen the queue). The re-send goes to the least-loaded stage-0 replica, which is
  not the stuck one.
- **503 only when no path exists.** While stage 0 has no live replica the gateway holds
  requests (the pool keeps reconnecting, e.g. during a re-plan); once none has been
  reachable for a grace period, new requests are refused at once with the reason.
  A request whose deadline passes is 504 unless a hop reported it had no path (503).
- **Several replicas.** Behind one Service, a result that came back through the Service
  could reach a replica that does not hold its request. So each replica started with
  ``--advertise-url`` (its own address) names itself in every frame's ``reply_to``, and
  the last stage sends the result straight there. Stage 0's handshake says whether the
  stages read the field; older ones would refuse it, so it is sent only when they do.
- **Readiness means results come back.** ``/v2/health/ready`` is 200 when a stage-0 link
  is up *and* a full round trip has recently succeeded: a client request, or the
  gateway's probe (zeros shaped like the model's inputs, sent whenever no request has
  succeeded for a probe interval; the first probe warms the pipeline up). A connected
  stage 0 alone proves nothing about the stages behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from edgeweave import __version__
from edgeweave.errors import EdgeweaveError
from edgeweave.worker import frames
from edgeweave.worker.frames import Frame, FrameError, FrameHeader, encode_frame
from edgeweave.worker.link import (
    DEFAULT_MAX_OUTSTANDING,
    SINK_ROLE,
    STREAM_PATH,
    STREAM_READ_BUFFER,
    Ack,
    Delivery,
    LinkPool,
    StreamReceiver,
    bearer_token_matches,
    stream_url,
    unauthorized,
)
from edgeweave.worker.metrics import WorkerMetrics
from edgeweave.worker.protocol import (
    DEFAULT_LIMITS,
    HEADER_LENGTH,
    InferRequest,
    Limits,
    ModelMetadata,
    ProtocolError,
    TensorSpec,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
    error_body,
    numpy_dtype,
)
from edgeweave.worker.routing import STAGE0_PATH, RouteError, Stage0Route, read_route_file

log = logging.getLogger("edgeweave.gateway")

SERVER_NAME: Final = "edgeweave"
EXTENSIONS: Final = ("binary_tensor_data",)
TIMEOUT_HEADER: Final = "Timeout"
"""Seconds (a decimal number) the client gives the request; the ``timeout`` request
parameter says the same in microseconds, as Triton's schedule-policy extension does."""

LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
OFFLOAD_BYTES: Final = 1 << 20
"""Bodies and responses above this are decoded/encoded on a worker thread, so that one
large JSON request does not hold up every other request's turn of the event loop."""
DEADLINE_GRACE_S: Final = 0.25
"""After a deadline, how long to wait for a hop's report of *why* (a pool drops a frame
at its deadline, so that report races the gateway's own clock)."""
WATCH_INTERVAL_S: Final = 0.1

_ATTEMPT_SEPARATOR: Final = "."
_FRAME_DTYPE_BY_DATATYPE: Final = {
    datatype_of(dtype): name for name, dtype in frames.DTYPES.items()
}


class GatewayConfigError(EdgeweaveError):
    """The gateway cannot start with this configuration (metadata, token, key file)."""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Everything a gateway needs; the CLI builds it from flags and files."""

    metadata: ModelMetadata
    stage0_urls: tuple[str, ...]
    token: str
    """The pipeline's bearer token: sent to stage 0, required on ``/v1/stream``."""
    api_keys: frozenset[str] = frozenset()
    """Keys clients must present (``Authorization: Bearer KEY``); empty: no client auth."""
    limits: Limits = DEFAULT_LIMITS
    timeout_s: float = 30.0
    """Default and maximum time for a request: a client may ask for less, not more."""
    retry_fraction: float = 0.25
    """A request is first re-sent after at most this fraction of its timeout…"""
    retry_latency_factor: float = 8.0
    """…or sooner, after this many times the pipeline's recent round-trip time."""
    min_retry_s: float = 0.25
    unavailable_grace_s: float = 2.0
    """How long stage 0 may be unreachable before new requests are refused with 503."""
    probe_interval_s: float = 5.0
    max_inflight: int = 1024
    """Requests held at once; more are refused with 429 so memory stays bounded."""
    max_outstanding_per_link: int = DEFAULT_MAX_OUTSTANDING
    stage0_revision: str = ""
    """The plan revision ``stage0_urls`` belong to (empty when given by hand)."""
    stage0_serial: int = 0
    stage0_file: Path | None = None
    """A route file to follow live (the operator's ``<pipeline>-stage0`` ConfigMap)."""
    stage0_file_poll_s: float = 1.0
    advertise_url: str | None = None
    """This replica's own base URL, where the last stage sends the results of the
    requests it sent (``reply_to``); needed when several gateway replicas share one
    Service. ``None``: results come back through ``--downstream`` of the last stage."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage0_urls", tuple(self.stage0_urls))
        if not self.stage0_urls:
            raise GatewayConfigError("the gateway needs at least one stage-0 URL (--stage0)")
        for url in self.stage0_urls:
            try:
                stream_url(url)
            except ValueError as exc:
                raise GatewayConfigError(f"--stage0: {exc}") from None
        if not self.token:
            raise GatewayConfigError("the pipeline token is empty (--token-file)")
        if self.advertise_url is not None:
            problem = frames.reply_to_problem(self.advertise_url)
            if problem is not None:
                raise GatewayConfigError(f"--advertise-url {problem}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise GatewayConfigError(f"the timeout must be positive seconds, not {self.timeout_s}")
        if self.max_inflight < 1 or self.max_outstanding_per_link < 1:
            raise GatewayConfigError("max_inflight and max_outstanding_per_link must be ≥ 1")
        check_frame_types(self.metadata)


def limits_for_body(max_body_bytes: int) -> Limits:
    """Protocol limits for a body cap: JSON gets the smaller of the cap and the default."""
    if max_body_bytes < 1:
        raise GatewayConfigError(f"the body limit must be at least 1 byte, not {max_body_bytes}")
    return Limits(
        max_body_bytes=max_body_bytes,
        max_json_bytes=min(max_body_bytes, DEFAULT_LIMITS.max_json_bytes),
        max_elements=max(DEFAULT_LIMITS.max_elements, max_body_bytes),
    )


# --------------------------------------------------------------------------- metadata


def load_metadata(path: str | Path, model_name: str) -> ModelMetadata:
    """The model's v2 metadata from a JSON file ``{"inputs": [...], "outputs": [...]}``.

    Each tensor is ``{"name", "datatype", "shape"}`` with ``-1`` for a dynamic axis: what
    ``GET /v2/models/{name}`` answers, so ``ModelMetadata.to_dict`` writes such a file
    (its ``name``, ``versions`` and ``platform`` are optional; ``model_name`` wins).
    """
    source = Path(path)
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GatewayConfigError(f"cannot read model metadata {source}: {exc.strerror}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise GatewayConfigError(f"model metadata {source} is not JSON: {exc}") from None
    try:
        return metadata_from_document(document, model_name)
    except (ProtocolError, GatewayConfigError) as exc:
        raise GatewayConfigError(f"model metadata {source}: {exc}") from None


def metadata_from_document(document: Any, model_name: str) -> ModelMetadata:
    """:class:`ModelMetadata` named ``model_name`` from a parsed metadata document."""
    if not isinstance(document, dict):
        raise GatewayConfigError("it must be a JSON object with 'inputs' and 'outputs'")
    versions = document.get("versions", ["1"])
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise GatewayConfigError("'versions' must be a list of strings")
    metadata = ModelMetadata(
        name=model_name,
        inputs=_tensor_specs(document, "inputs"),
        outputs=_tensor_specs(document, "outputs"),
        versions=tuple(versions) or ("1",),
        platform=str(document.get("platform", "onnxruntime_onnx")),
    )
    check_frame_types(metadata)
    return metadata


def metadata_from_onnx(model: onnx.ModelProto, model_name: str) -> ModelMetadata:
    """The v2 metadata of an ONNX model: its graph inputs (weights excluded) and outputs,
    symbolic or unknown dimensions as ``-1``. ``edgeweave run`` writes it for the gateway."""
    weights = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    metadata = ModelMetadata(
        name=model_name,
        inputs=[_onnx_tensor_spec(value) for value in inputs],
        outputs=[_onnx_tensor_spec(value) for value in model.graph.output],
    )
    check_frame_types(metadata)
    return metadata


def _onnx_tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    try:
        datatype = datatype_of(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError, ProtocolError):
        raise GatewayConfigError(
            f"model tensor {value.name!r} has ONNX element type {tensor_type.elem_type}, "
            "which has no v2 datatype that stages carry"
        ) from None
    dims = tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1
        for dim in tensor_type.shape.dim
    )
    return TensorSpec(value.name, datatype, dims)


def _tensor_specs(document: Mapping[str, Any], key: str) -> list[TensorSpec]:
    entries = document.get(key)
    if not isinstance(entries, list) or not entries:
        raise GatewayConfigError(f"'{key}' must be a non-empty list of tensors")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "datatype", "shape"} <= set(entry):
            raise GatewayConfigError(f"{key}[{i}] must have 'name', 'datatype' and 'shape'")
        name, datatype, shape = entry["name"], entry["datatype"], entry["shape"]
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise GatewayConfigError(f"{key}[{i}]: 'name' and 'datatype' must be strings")
        if not isinstance(shape, list):
            raise GatewayConfigError(f"{key}[{i}] {name!r}: 'shape' must be a list")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return specs


def check_frame_types(metadata: ModelMetadata) -> None:
    """Refuse at start-up what no stage could carry, rather than on the first request."""
    for kind, specs in (("input", metadata.inputs), ("output", metadata.outputs)):
        for spec in specs:
            if spec.datatype not in _FRAME_DTYPE_BY_DATATYPE:
                raise GatewayConfigError(
                    f"model {kind} {spec.name!r} is {spec.datatype}, which stage frames "
                    f"cannot carry (they carry {', '.join(_FRAME_DTYPE_BY_DATATYPE)})"
                )
            if not 0 < len(spec.name) <= frames.MAX_NAME_CHARS or not spec.name.isprintable():
                raise GatewayConfigError(
                    f"model {kind} name {spec.name[:64]!r} must be 1 to "
                    f"{frames.MAX_NAME_CHARS} printable characters"
                )


def read_api_keys(path: str | Path) -> frozenset[str]:
    """Client API keys, one a line; blank lines and ``#`` comments are skipped."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"cannot read the API key file {source}: {exc}") from None
    keys = frozenset(
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise GatewayConfigError(f"the API key file {source} holds no key")
    return keys


# --------------------------------------------------------------------------- in-flight


class PipelineFailure(Exception):
    """A round trip ended without a result: the HTTP status to answer and the reason."""

    def __init__(self, status: int, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.answered = answered
        """A stage's error frame came back: the path works, the request did not."""


@dataclass(eq=False)
class _InFlight:
    """One request, held until its result, an error frame, a lost path, or its deadline."""

    request_id: str
    inputs: Mapping[str, np.ndarray]
    deadline: float
    """Absolute Unix seconds, as frames carry it."""
    future: asyncio.Future[Frame]
    wake: asyncio.Future[None]
    """Resolved when every attempt so far was lost on the way: retry now, not later."""
    frame_ids: list[str] = field(default_factory=list)
    deliveries: list[asyncio.Future[Delivery]] = field(default_factory=list)
    last_sent: float = 0.0
    lost: Delivery | None = None
    """The latest attempt's failed delivery, once every attempt has failed."""

    def next_frame_id(self) -> str:
        return f"{self.request_id}{_ATTEMPT_SEPARATOR}{len(self.frame_ids)}"

    def remaining(self) -> float:
        return self.deadline - time.time()

    def fail(self, failure: PipelineFailure) -> None:
        if not self.future.done():
            self.future.set_exception(failure)


class _GatewayMetrics:
    """The gateway's own series, beside the link ones in the shared :class:`WorkerMetrics`."""

    def __init__(self, worker: WorkerMetrics) -> None:
        registry = worker.registry
        self.requests = Counter(
            "edgeweave_gateway_requests",
            "Inference requests answered, by HTTP status code.", ["code"], registry=registry,
        )
        self.latency = Histogram(
            "edgeweave_gateway_request_seconds",
            "Time from receiving an inference request to answering it.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inflight = Gauge(
            "edgeweave_gateway_inflight", "Requests waiting for their result.", registry=registry
        )
        self.retries = Counter(
            "edgeweave_gateway_retries",
            "Requests sent to stage 0 again because their result was late.", registry=registry,
        )
        self.late_results = Counter(
            "edgeweave_gateway_late_results",
            "Results for requests already answered (a retry's twin, or past the deadline).",
            registry=registry,
        )
        self.probes = Counter(
            "edgeweave_gateway_probes",
            "Round trips the gateway made itself to check the pipeline, by outcome.",
            ["outcome"], registry=registry,
        )
        self.ready = Gauge(
            "edgeweave_gateway_ready", "1 while /v2/health/ready answers 200.", registry=registry
        )


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """One pipeline's gateway; :attr:`app` is the aiohttp application to serve."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metadata = config.metadata
        self.worker_metrics = WorkerMetrics(role="gateway", name=config.metadata.name)
        self.metrics = _GatewayMetrics(self.worker_metrics)
        self.pool: LinkPool | None = None
        self.route = Stage0Route(revision=config.stage0_revision, urls=config.stage0_urls,
                                 serial=config.stage0_serial)
        self.receiver = StreamReceiver(
            config.token,
            self._accept_result,
            refuse=self._refuse_result,
            max_frame_bytes=_frame_limit(config.limits),
            metrics=self.worker_metrics,
            role=SINK_ROLE,
        )
        self._inflight: dict[str, _InFlight] = {}
        self._by_frame: dict[str, _InFlight] = {}
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(4)
        self._background: list[asyncio.Task[None]] = []
        self._latency_ewma: float | None = None
        self._last_ok: float | None = None
        self._last_probe_failure: tuple[float, str] | None = None
        self._stage0_down_since: float | None = time.monotonic()
        self.metrics.inflight.set_function(lambda: len(self._inflight))
        self.metrics.ready.set_function(lambda: float(self.readiness()[0]))
        self.app = self._build_app()

    # ------------------------------------------------------------------ app wiring

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.limits.max_body_bytes, middlewares=[self._v2_errors]
        )
        model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/v2/health/ready", self._ready)
        app.router.add_get("/v2", self._server_metadata)
        for prefix in (model, versioned):
            app.router.add_get(prefix, self._model_metadata)
            app.router.add_get(f"{prefix}/ready", self._model_ready)
            app.router.add_post(f"{prefix}/infer", self._infer)
        app.router.add_get("/metrics", self.worker_metrics.handle)
        app.router.add_post(STREAM_PATH, self.receiver.handle)
        app.router.add_get(STAGE0_PATH, self._show_route)
        app.router.add_put(STAGE0_PATH, self._replace_route)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shut_down)
        app.on_cleanup.append(self._close_pool)
        return app

    async def _start(self, _app: web.Application) -> None:
        self.pool = LinkPool(
            self.config.stage0_urls,
            self.config.token,
            max_outstanding_per_link=self.config.max_outstanding_per_link,
            metrics=self.worker_metrics,
        )
        self._background = [
            asyncio.create_task(self._watch_stage0(), name="edgeweave-gateway-watch"),
            asyncio.create_task(self._probe_loop(), name="edgeweave-gateway-probe"),
        ]
        if self.config.stage0_file is not None:
            self._background.append(asyncio.create_task(
                self._follow_route_file(self.config.stage0_file), name="edgeweave-gateway-route"))

    async def _shut_down(self, _app: web.Application) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background = []
        for entry in list(self._inflight.values()):
            entry.fail(PipelineFailure(503, "the gateway is shutting down"))
        await self.receiver.close()

    async def _close_pool(self, _app: web.Application) -> None:
        if self.pool is not None:
            await self.pool.close()

    def set_stage0(self, urls: Sequence[str]) -> None:
        """Point the gateway at a new set of stage-0 replicas (a re-plan), live."""
        self._switch(replace(self.route, revision="", urls=tuple(urls)))

    def set_route(self, route: Stage0Route) -> bool:
        """Follow ``route`` unless the gateway already holds a newer one; report if it did."""
        if not route.newer_than(self.route):
            return False
        self._switch(route)
        return True

    def _switch(self, route: Stage0Route) -> None:
        if self.pool is None:
            raise RuntimeError("the gateway has not started")
        self.pool.set_targets(route.urls)
        if route.urls != self.route.urls:
            log.info("stage 0 is now %s (plan revision %s)", ", ".join(route.urls),
                     route.revision or "unknown")
        self.route = route

    async def _follow_route_file(self, path: Path) -> None:
        """Re-read the mounted route file: kubelet rewrites it when the ConfigMap changes."""
        last_error = ""
        while True:
            await asyncio.sleep(self.config.stage0_file_poll_s)
            try:
                route = read_route_file(path)
            except RouteError as exc:
                if str(exc) != last_error:
                    log.warning("keeping stage 0 as it is: %s", exc)
                last_error = str(exc)
                continue
            last_error = ""
            self.set_route(route)

    async def _show_route(self, request: web.Request) -> web.Response:
        if not bearer_token_matches(request, self.config.token):
            return unauthorized()
        return web.json_response(self.route.to_document())

    async def _replace_route(self, request: web.Request) -> web.Response:
        """The operator's push after a re-plan; answers with the route now in use."""
        if not bearer_token_matches(request, self.config.token):
            return unauthorized()
        try:
            route = Stage0Route.from_json(await request.read(), "the request body")
        except RouteError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.set_route(route)
        return web.json_response(self.route.to_document())

    # ------------------------------------------------------------------ errors, auth

    @web.middleware
    async def _v2_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure becomes a v2 error body; nothing a client sends takes the server down."""
        try:
            return await handler(request)
        except ProtocolError as exc:
            return _error(exc.status, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, self._body_too_large())
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason, headers=_challenge(exc))
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: there is no one to answer
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return _error(500, "internal error in the gateway; the details are in its log")

    def _body_too_large(self) -> str:
        return f"request body is above the limit of {self.config.limits.max_body_bytes} bytes"

    def _authorize_client(self, request: web.Request) -> None:
        if not self.config.api_keys:
            return
        presented = _bearer(request).encode()
        if not any(hmac.compare_digest(presented, key.encode()) for key in self.config.api_keys):
            raise web.HTTPUnauthorized(
                reason="a valid API key is required (Authorization: Bearer KEY)",
                headers={"WWW-Authenticate": 'Bearer realm="edgeweave"'},
            )

    def _check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        if name != self.metadata.name:
            raise ProtocolError(
                f"unknown model {name[:64]!r}; this gateway serves {self.metadata.name!r}",
                status=404,
            )
        version = request.match_info.get("version")
        if version is not None and version not in self.metadata.versions:
            raise ProtocolError(
                f"model {name!r} has no version {version[:32]!r}; it has "
                f"{', '.join(self.metadata.versions)}",
                status=404,
            )

    # ------------------------------------------------------------------ health, metadata

    async def _live(self, _request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _ready(self, _request: web.Request) -> web.Response:
        return self._readiness_response()

    async def _model_ready(self, request: web.Request) -> web.Response:
        self._authorize_client(request)
        self._check_model(request)
        return self._readiness_response()

    def _readiness_response(self) -> web.Response:
        ready, reason = self.readiness()
        if ready:
            return web.json_response({"ready": True})
        # The v2 protocol: a 4xx status means "not ready"; the body says why.
        return _error(400, f"not ready: {reason}")

    async def _server_metadata(self, request: web.Request) -> web.Response:
        self._authorize_client(request)
        return web.json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
        )

    async def _model_metadata(self, request: web.Request) -> web.Response:
        self._authorize_client(request)
        self._check_model(request)
        return web.Response(body=self.metadata.to_json(), content_type="application/json")

    def readiness(self) -> tuple[bool, str]:
        """Whether requests can be served now and, if not, why (``/v2/health/ready``)."""
        if self.pool is None:
            return False, "the gateway is starting"
        if self.pool.links_up() == 0:
            return False, self._no_stage0_reason()
        if self._last_ok is None:
            return False, "no request has made the round trip through the pipeline yet"
        failure = self._last_probe_failure
        if failure is not None and failure[0] > self._last_ok:
            return False, f"the last probe through the pipeline failed: {failure[1]}"
        age = time.monotonic() - self._last_ok
        if age > 3 * self.config.probe_interval_s + self.config.timeout_s:
            return False, f"no round trip has succeeded for {age:.0f} s"
        return True, "ready"

    # ------------------------------------------------------------------ inference

    async def _infer(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        status = 500
        try:
            response = await self._answer_infer(request)
            status = response.status
            return response
        except (ProtocolError, web.HTTPException) as exc:
            status = exc.status
            raise
        finally:
            self.metrics.requests.labels(code=str(status)).inc()
            self.metrics.latency.observe(time.monotonic() - started)

    async def _answer_infer(self, request: web.Request) -> web.Response:
        self._authorize_client(request)
        self._check_model(request)
        body = await self._read_body(request)
        content_type = request.headers.get("Content-Type")
        header_length = request.headers.get(HEADER_LENGTH)
        infer: InferRequest = await _offloaded(
            len(body),
            lambda: decode_infer_request(
                body, content_type, header_length, self.metadata, limits=self.config.limits
            ),
        )
        timeout = self._timeout_of(request, infer)
        try:
            result = await self.round_trip(infer.inputs, timeout)
        except PipelineFailure as failure:
            return _error(failure.status, failure.message)
        outputs = self._outputs_of(result, infer)
        encoded: tuple[bytes, dict[str, str]] = await _offloaded(
            sum(array.nbytes for array in outputs.values()),
            lambda: encode_infer_response(
                self.metadata.name, infer.id, outputs, binary=infer.binary_outputs
            ),
        )
        return web.Response(body=encoded[0], headers=encoded[1])

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        length = request.content_length
        if length is None:
            return await request.read()  # chunked: aiohttp enforces client_max_size
        if length == 0:
            return b""
        if length > limit:
            raise ProtocolError(
                f"request body is {length} bytes, above the limit of {limit}", status=413
            )
        try:
            # One copy (the chunks joined), where request.read() would make two.
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                f"the request body ended after {len(exc.partial)} of its {length} bytes"
            ) from None

    def _timeout_of(self, request: web.Request, infer: InferRequest) -> float:
        """The request's time budget in seconds: the client's, capped at the gateway's."""
        budgets = [self.config.timeout_s]
        header = request.headers.get(TIMEOUT_HEADER)
        if header is not None:
            budgets.append(_positive_seconds(header.strip(), f"the {TIMEOUT_HEADER} header"))
        parameter = infer.parameters.get("timeout")
        if parameter is not None:
            if isinstance(parameter, bool) or not isinstance(parameter, int) or parameter <= 0:
                raise ProtocolError(
                    "request parameter timeout must be a positive integer of microseconds, "
                    f"got {json.dumps(parameter)[:40]}"
                )
            budgets.append(parameter / 1e6)
        return min(budgets)

    def _outputs_of(self, result: Frame, infer: InferRequest) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = {}
        for name in infer.output_names:
            array = result.tensors.get(name)
            spec = self.metadata.output(name)
            if array is None or spec is None:
                raise _internal(
                    f"the pipeline's result lacks output {name!r} (it has "
                    f"{sorted(result.tensors)}): the last stage does not match the model"
                )
            if datatype_of(array.dtype) != spec.datatype:
                raise _internal(
                    f"the pipeline returned output {name!r} as {datatype_of(array.dtype)}, "
                    f"but the model declares {spec.datatype}"
                )
            outputs[name] = array
        return outputs

    # ------------------------------------------------------------------ the round trip

    async def round_trip(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> Frame:
        """Send ``inputs`` through the pipeline; the last stage's frame, or
        :class:`PipelineFailure` (error frame, no path, deadline, overload)."""
        if len(self._inflight) >= self.config.max_inflight:
            raise PipelineFailure(
                429, f"the gateway already holds {self.config.max_inflight} requests; retry later"
            )
        self._refuse_if_no_stage0()
        loop = asyncio.get_running_loop()
        entry = _InFlight(
            request_id=f"{self._id_prefix}-{next(self._ids):x}",
            inputs={name: _frame_array(array) for name, array in inputs.items()},
            deadline=time.time() + timeout_s,
            future=loop.create_future(),
            wake=loop.create_future(),
        )
        self._inflight[entry.request_id] = entry
        try:
            return await self._until_answered(entry, timeout_s)
        finally:
            self._forget(entry)

    async def _until_answered(self, entry: _InFlight, timeout_s: float) -> Frame:
        started = time.monotonic()
        interval = self._first_retry_interval(timeout_s)
        while True:
            await self._send_attempt(entry)
            retry_at = entry.last_sent + interval
            while True:
                await self._wait_for_answer(entry, retry_at)
                if entry.future.done() or entry.remaining() <= 0 or entry.lost is not None:
                    break
                if not self._stage0_saturated():
                    break
                # Every stage-0 link is at its cap: the result is late because the
                # pipeline is full, not lost; a duplicate would only deepen the queue.
                retry_at = time.monotonic() + interval
            if not entry.future.done() and entry.remaining() <= 0:
                await asyncio.wait([entry.future], timeout=DEADLINE_GRACE_S)
                entry.fail(self._deadline_failure(entry, timeout_s))
            if entry.future.done():
                result = entry.future.result()  # raises the PipelineFailure, if one
                self._record_success(time.monotonic() - started)
                return result
            self.metrics.retries.inc()
            interval *= 2

    async def _wait_for_answer(self, entry: _InFlight, retry_at: float) -> None:
        """Until the request is answered, it is time to re-send, or its deadline passes."""
        while not entry.future.done():
            if entry.lost is not None:
                # Lost on the way with time left: re-send soon (not in a tight loop).
                retry_at = min(retry_at, entry.last_sent + self.config.min_retry_s)
            wait = min(retry_at - time.monotonic(), entry.remaining())
            if wait <= 0:
                return
            waiters = [entry.future] if entry.wake.done() else [entry.future, entry.wake]
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)

    async def _send_attempt(self, entry: _InFlight) -> None:
        """Hand one attempt to the stage-0 pool; waits while every link is at its cap."""
        assert self.pool is not None
        frame_id = entry.next_frame_id()
        entry.frame_ids.append(frame_id)
        entry.last_sent = time.monotonic()
        entry.lost = None
        if entry.wake.done():
            entry.wake = asyncio.get_running_loop().create_future()
        self._by_frame[frame_id] = entry
        sending = asyncio.ensure_future(self._send_frame(entry, frame_id))
        try:
            await asyncio.wait([sending, entry.future], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sending.done():
                # Answered meanwhile (an earlier attempt's result came): nothing to send.
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
        if sending.cancelled():
            return
        try:
            delivery = sending.result()
        except RuntimeError:  # the pool is closed
            raise PipelineFailure(503, "the gateway is shutting down") from None
        entry.deliveries.append(delivery)
        delivery.add_done_callback(lambda _: self._on_delivery(entry))

    async def _send_frame(self, entry: _InFlight, frame_id: str) -> asyncio.Future[Delivery]:
        assert self.pool is not None
        reply_to = await self._reply_to(entry.deadline)
        try:
            buffers = encode_frame(
                FrameHeader(frame_id, entry.deadline, reply_to=reply_to), entry.inputs,
                max_frame_bytes=_frame_limit(self.config.limits),
            )
        except FrameError as exc:
            raise PipelineFailure(413, f"the inputs do not fit in one frame: {exc}") from None
        return await self.pool.send(frame_id, buffers)

    async def _reply_to(self, deadline: float) -> str | None:
        """This replica's address for the last stage, when stage 0 reads the field.

        Without it the result comes back through the gateway Service, which is right
        only with one replica. Stage 0's handshake tells whether the stages know the
        field (older ones refuse a frame that carries it), so the first request waits
        for a link to come up, as its ``send`` would have anyway.
        """
        assert self.pool is not None
        if self.config.advertise_url is None:
            return None
        peer = await self.pool.wait_for_peer(deadline)
        if peer is None or "reply_to" not in peer.fields:
            return None
        return self.config.advertise_url

    def _on_delivery(self, entry: _InFlight) -> None:
        """An attempt's trip ended. Acked: its result is already at the sink. Refused: its
        error frame reached the sink first. So a failure with the request still open means
        the frame was lost on the way: a hop dropped it for lack of a path, or closed."""
        if entry.future.done() or len(entry.deliveries) < len(entry.frame_ids):
            return
        if not all(d.done() and not d.result().ok for d in entry.deliveries):
            return
        entry.lost = entry.deliveries[-1].result()
        if entry.remaining() <= self.config.min_retry_s:
            entry.fail(self._lost_failure(entry.lost))
        elif not entry.wake.done():
            entry.wake.set_result(None)

    def _lost_failure(self, lost: Delivery) -> PipelineFailure:
        """503 when a hop had no live next hop; otherwise the deadline won (504)."""
        reason = lost.error or "the frame was lost"
        if re.search(r"\bno live\b|\bno targets\b", reason):
            if lost.dropped:
                return PipelineFailure(503, f"no live replica of stage 0: {reason}")
            return PipelineFailure(503, f"the pipeline has no path for the request: {reason}")
        return PipelineFailure(504, f"deadline exceeded: {reason}")

    def _stage0_saturated(self) -> bool:
        assert self.pool is not None
        capacity = self.pool.links_up() * self.config.max_outstanding_per_link
        return self.pool.outstanding() >= capacity

    def _first_retry_interval(self, timeout_s: float) -> float:
        ceiling = max(self.config.retry_fraction * timeout_s, self.config.min_retry_s)
        if self._latency_ewma is None:
            return ceiling
        adaptive = self.config.retry_latency_factor * self._latency_ewma
        return min(max(adaptive, self.config.min_retry_s), ceiling)

    def _record_success(self, latency_s: float) -> None:
        self._last_ok = time.monotonic()
        previous = self._latency_ewma
        self._latency_ewma = latency_s if previous is None else 0.8 * previous + 0.2 * latency_s

    def _forget(self, entry: _InFlight) -> None:
        self._inflight.pop(entry.request_id, None)
        for frame_id in entry.frame_ids:
            self._by_frame.pop(frame_id, None)
        if not entry.future.done():
            entry.future.cancel()
        elif not entry.future.cancelled():
            entry.future.exception()  # retrieved: no "never retrieved" warning

    def _deadline_failure(self, entry: _InFlight, timeout_s: float) -> PipelineFailure:
        if entry.lost is not None:
            return self._lost_failure(entry.lost)
        if self.pool is not None and self.pool.links_up() == 0:
            return PipelineFailure(
                503, f"{self._no_stage0_reason()}; gave up after {timeout_s:g} s"
            )
        attempts = len(entry.frame_ids)
        return PipelineFailure(
            504,
            f"deadline exceeded: no result from the pipeline within {timeout_s:g} s "
            f"({attempts} attempt{'s' if attempts != 1 else ''})",
        )

    # ------------------------------------------------------------------ results (the sink)

    async def _accept_result(self, frame: Frame, ack: Ack) -> None:
        """A frame from a last stage: answer its request; the ack ends the trip upstream."""
        entry = self._by_frame.get(frame.id)
        if entry is None or entry.future.done():
            self.metrics.late_results.inc()
        elif frame.is_error:
            entry.fail(failure_of_error_frame(frame.header.error or "error", frame.header.category))
        else:
            entry.future.set_result(frame)
        ack.ok()

    async def _refuse_result(self, error: FrameError, ack: Ack) -> None:
        """A last stage sent a frame the gateway cannot read: its request gets a 502."""
        ack.fail(f"the gateway refused the result: {error}")
        entry = self._by_frame.get(error.frame_id) if error.frame_id is not None else None
        if entry is not None:
            log.error("malformed result from the last stage: %s", error)
            entry.fail(
                PipelineFailure(502, f"the pipeline's last stage sent a bad result: {error}")
            )

    # ------------------------------------------------------------------ stage-0 liveness

    def _no_stage0_reason(self) -> str:
        assert self.pool is not None
        errors = "; ".join(f"{url}: {error}" for url, error in self.pool.link_errors().items())
        return "no live replica of stage 0" + (f" ({errors})" if errors else "")

    def _refuse_if_no_stage0(self) -> None:
        if self.pool is None or self.pool.links_up() > 0:
            return
        down_since = self._stage0_down_since
        if down_since is not None and (
            time.monotonic() - down_since >= self.config.unavailable_grace_s
        ):
            raise PipelineFailure(503, self._no_stage0_reason())

    async def _watch_stage0(self) -> None:
        """Track since when stage 0 has been unreachable, for fail-fast 503s."""
        while True:
            if self.pool is not None and self.pool.links_up() > 0:
                self._stage0_down_since = None
            elif self._stage0_down_since is None:
                self._stage0_down_since = time.monotonic()
            await asyncio.sleep(WATCH_INTERVAL_S)

    # ------------------------------------------------------------------ probes

    async def _probe_loop(self) -> None:
        """Keep readiness truthful when no client traffic proves the pipeline works."""
        while True:
            since_ok = math.inf if self._last_ok is None else time.monotonic() - self._last_ok
            if since_ok < self.config.probe_interval_s:
                await asyncio.sleep(self.config.probe_interval_s - since_ok)
            elif self.pool is None or self.pool.links_up() == 0:
                await asyncio.sleep(WATCH_INTERVAL_S)
            elif not await self._probe():
                await asyncio.sleep(min(1.0, self.config.probe_interval_s))

    async def _probe(self) -> bool:
        """One round trip of zeros. An error frame coming back counts as success: it
        crossed every stage, and zeros are not every model's valid input."""
        try:
            await self.round_trip(probe_inputs(self.metadata), self.config.timeout_s)
        except PipelineFailure as failure:
            self.metrics.probes.labels(outcome=str(failure.status)).inc()
            if failure.answered:
                self._last_ok = time.monotonic()
                log.info("the pipeline answered the probe with an error: %s", failure.message)
                return True
            self._last_probe_failure = (time.monotonic(), failure.message)
            log.warning("pipeline probe failed: %s", failure.message)
            return False
        self.metrics.probes.labels(outcome="ok").inc()
        return True


# --------------------------------------------------------------------------- serving


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)


def create_app(config: GatewayConfig) -> web.Application:
    """The gateway's aiohttp application; its :class:`Gateway` is ``app[GATEWAY_KEY]``."""
    gateway = Gateway(config)
    gateway.app[GATEWAY_KEY] = gateway
    return gateway.app


@dataclass
class RunningGateway:
    """A gateway serving on a socket (the CLI's and the tests' way to run one)."""

    gateway: Gateway
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_gateway(
    config: GatewayConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningGateway:
    """Serve a gateway on ``host:port`` (0: any free port)."""
    gateway = Gateway(config)
    gateway.app[GATEWAY_KEY] = gateway
    runner = web.AppRunner(
        gateway.app, read_bufsize=STREAM_READ_BUFFER, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise GatewayConfigError(f"the gateway cannot listen on {host}:{port}: {exc}") from None
    bound = next(
        (int(a[1]) for a in runner.addresses if isinstance(a, Sequence) and len(a) >= 2), port
    )
    return RunningGateway(gateway, runner, host, bound)


# --------------------------------------------------------------------------- helpers


STATUS_OF_CATEGORY: Final[Mapping[str, int]] = {
    "invalid_input": 400,
    "too_large": 413,
    "deadline": 504,
    "overloaded": 503,
    "internal": 500,
}
"""An error frame's category (set by the stage that made it) → the client's status; a
category this gateway does not know (a newer stage's) is 500."""
assert set(STATUS_OF_CATEGORY) == set(frames.ERROR_CATEGORIES)

_STATUS_OF_UNCATEGORIZED: Final = (
    (re.compile(r"^deadline exceeded\b"), 504),
    (re.compile(r"\bfailed to compute\b|\bcannot send its result\b"), 500),
    (re.compile(r"\brefused a frame\b|\blacks input|\bcarries tensor|\binput '.*' must "), 400),
)
"""For error frames without a category: stages from before categories, which a gateway
meets during a rolling upgrade. Their wording, frozen; anything else is 500."""


def failure_of_error_frame(message: str, category: str | None = None) -> PipelineFailure:
    """The status a stage's error frame earns its request; the message is passed through."""
    if category is not None:
        return PipelineFailure(STATUS_OF_CATEGORY.get(category, 500), message, answered=True)
    for pattern, status in _STATUS_OF_UNCATEGORIZED:
        if pattern.search(message):
            return PipelineFailure(status, message, answered=True)
    return PipelineFailure(500, message, answered=True)


def probe_inputs(metadata: ModelMetadata) -> dict[str, np.ndarray]:
    """Zeros shaped like the inputs, dynamic axes 1: a request every model accepts."""
    return {
        spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], numpy_dtype(spec.datatype))
        for spec in metadata.inputs
    }


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=error_body(message), content_type="application/json", headers=headers
    )


def _challenge(exc: web.HTTPException) -> dict[str, str] | None:
    challenge = exc.headers.get("WWW-Authenticate")
    return {"WWW-Authenticate": challenge} if challenge else None


def _internal(message: str) -> ProtocolError:
    log.error("%s", message)
    return ProtocolError(message, status=500)


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


_SECONDS: Final = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


def _positive_seconds(text: str, what: str) -> float:
    if not _SECONDS.fullmatch(text) or float(text) <= 0:
        raise ProtocolError(f"{what} must be a positive number of seconds, got {text[:40]!r}")
    return float(text)


async def _offloaded(size: int, work: Callable[[], Any]) -> Any:
    if size <= OFFLOAD_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _frame_array(array: np.ndarray) -> np.ndarray:
    """The array as frames name its dtype (same bytes: a view, never a copy)."""
    wire = frames.DTYPES[_FRAME_DTYPE_BY_DATATYPE[datatype_of(array.dtype)]]
    return array if array.dtype == wire else array.view(wire)


def _frame_limit(limits: Limits) -> int:
    """Never refuse a frame that the body limit allowed (frames add only a header)."""
    return max(frames.DEFAULT_MAX_FRAME_BYTES, 2 * limits.max_body_bytes)
