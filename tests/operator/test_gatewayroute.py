"""The operator tells each gateway pod where stage 0 moved (``push_route``), against real
gateways: one :class:`~edgeweave.worker.gateway.Gateway` per "pod", each on its own
loopback address (127.0.0.2, 127.0.0.3, ...) and the same port, as pods each have
their own IP and the same container port. No stage is running: the route endpoint
does not need one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import pytest

from edgeweave.operator import settings
from edgeweave.operator.gatewayroute import PushOutcome, gateway_pod_url, push_route
from edgeweave.worker.gateway import GatewayConfig, RunningGateway, start_gateway
from edgeweave.worker.protocol import ModelMetadata, TensorSpec
from edgeweave.worker.routing import Stage0Route

T = TypeVar("T")
HANG_GUARD_S = 60.0
"""Only a push that ignores its own timeout reaches this."""
METADATA = ModelMetadata(
    name="m", inputs=[TensorSpec("x", "FP32", (-1, 4))], outputs=[TensorSpec("y", "FP32", (-1, 4))]
)
OLD_STAGE0 = "http://127.0.0.1:9"
"""Nothing listens there; gateways keep reconnecting, which the route endpoint ignores."""


def pod(name: str, ip: str | None, *, deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "edge"}
    if deleting:
        metadata["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    return {"metadata": metadata, "status": {"podIP": ip} if ip else {"phase": "Pending"}}


def route(revision: str, serial: int) -> Stage0Route:
    return Stage0Route(revision=revision, urls=(f"http://{revision}-stage0.edge.svc:8100",),
                       serial=serial)


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, HANG_GUARD_S))


class Pods:
    """Real gateways serving as pods: one address each, one port shared by all."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.port = 0
        self.gateways: dict[str, RunningGateway] = {}
        self._next_host = 2

    def address(self) -> str:
        """A loopback address no pod of this test uses yet."""
        host = f"127.0.0.{self._next_host}"
        self._next_host += 1
        return host

    async def gateway(self, name: str, held: Stage0Route | None = None,
                      token: str | None = None) -> dict[str, Any]:
        held = held or Stage0Route(revision="r1", urls=(OLD_STAGE0,), serial=1)
        host = self.address()
        running = await start_gateway(
            GatewayConfig(metadata=METADATA, stage0_urls=held.urls, token=token or self.token,
                          stage0_revision=held.revision, stage0_serial=held.serial),
            host=host, port=self.port,
        )
        self.port = running.port
        self.gateways[name] = running
        return pod(name, host)

    def route_of(self, name: str) -> Stage0Route:
        return self.gateways[name].gateway.route

    async def stop(self) -> None:
        for running in self.gateways.values():
            await running.stop()


@contextlib.asynccontextmanager
async def gateway_pods(token: str) -> AsyncIterator[Pods]:
    pods = Pods(token)
    try:
        yield pods
    finally:
        await pods.stop()


async def push(pods: Pods, targets: Sequence[Mapping[str, Any]], new: Stage0Route,
               monkeypatch: pytest.MonkeyPatch, *, timeout_s: float = 2.0,
               token: str | None = None) -> PushOutcome:
    """``push_route`` with the container port the pods of this test listen on."""
    monkeypatch.setattr(settings, "GATEWAY_CONTAINER_PORT", pods.port)
    return await push_route(targets, new, token or pods.token, timeout_s=timeout_s)


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


# --------------------------------------------------------------------------- addresses
def test_each_pod_is_addressed_by_its_own_ip_and_the_container_port() -> None:
    port = settings.GATEWAY_CONTAINER_PORT
    assert gateway_pod_url(pod("gw-0", "10.1.2.3")) == f"http://10.1.2.3:{port}"
    assert gateway_pod_url(pod("gw-0", "fd00::7")) == f"http://[fd00::7]:{port}"
    assert gateway_pod_url(pod("gw-0", None)) is None
    assert gateway_pod_url(pod("gw-0", "10.1.2.3", deleting=True)) is None
    assert gateway_pod_url({"metadata": {"name": "gw-0"}}) is None


# --------------------------------------------------------------------------- pushes
def test_every_addressed_gateway_pod_is_told_and_confirms(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            targets = [await pods.gateway("gw-a"), await pods.gateway("gw-b")]
            new = route("r2", 2)
            outcome = await push(pods, targets, new, monkeypatch)
            assert outcome == PushOutcome(confirmed=("gw-a", "gw-b"), unreached={})
            assert outcome.complete
            assert pods.route_of("gw-a") == new and pods.route_of("gw-b") == new

            # Told again (the operator's next pass before it saw the confirmation): still
            # confirmed, since the gateway answers with the route it follows.
            assert (await push(pods, targets, new, monkeypatch)).confirmed == ("gw-a", "gw-b")

    run(scenario())


def test_pods_without_an_address_or_being_deleted_are_skipped_not_failed(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            live = await pods.gateway("gw-live")
            # A real gateway behind the deleted pod's IP: had it been told, it would switch.
            deleting = {**await pods.gateway("gw-deleting"),
                        "metadata": pod("gw-deleting", None, deleting=True)["metadata"]}
            pending = pod("gw-pending", None)
            before = pods.route_of("gw-deleting")

            outcome = await push(pods, [live, deleting, pending], route("r2", 2), monkeypatch)
            assert outcome == PushOutcome(confirmed=("gw-live",), unreached={})
            assert pods.route_of("gw-deleting") == before

            nobody = await push(pods, [pending, deleting], route("r3", 3), monkeypatch)
            assert nobody == PushOutcome(confirmed=(), unreached={}) and nobody.complete

    run(scenario())


def test_an_unreachable_pod_is_reported_with_the_reason_and_the_rest_still_switch(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            live = await pods.gateway("gw-live")
            closed = pod("gw-closed", pods.address())  # nothing listens on its port
            new = route("r2", 2)
            outcome = await push(pods, [live, closed], new, monkeypatch)
            assert outcome.confirmed == ("gw-live",) and not outcome.complete
            assert list(outcome.unreached) == ["gw-closed"]
            assert "Connect" in outcome.unreached["gw-closed"], outcome.unreached
            assert pods.route_of("gw-live") == new

    run(scenario())


def test_a_pod_that_accepts_but_never_answers_is_given_up_on_at_the_timeout(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            live = await pods.gateway("gw-live")
            silent_host = pods.address()
            held: list[asyncio.StreamWriter] = []

            async def never_answer(_reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
                held.append(writer)

            server = await asyncio.start_server(never_answer, silent_host, pods.port,
                                                family=socket.AF_INET)
            try:
                outcome = await push(pods, [live, pod("gw-hung", silent_host)], route("r2", 2),
                                     monkeypatch, timeout_s=0.5)
            finally:
                for writer in held:
                    writer.close()
                server.close()
                await server.wait_closed()
            assert outcome.confirmed == ("gw-live",)
            assert held, "the hung pod was never contacted"
            assert "Timeout" in outcome.unreached["gw-hung"], outcome.unreached

    run(scenario())


def test_a_gateway_with_another_token_refuses_and_is_reported_with_its_answer(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            stranger = await pods.gateway("gw-other-pipeline", token=secrets.token_hex(16))
            before = pods.route_of("gw-other-pipeline")
            outcome = await push(pods, [stranger], route("r2", 2), monkeypatch)
            assert outcome.confirmed == ()
            assert outcome.unreached["gw-other-pipeline"].startswith("HTTP 401"), outcome
            assert pods.route_of("gw-other-pipeline") == before

    run(scenario())


def test_a_gateway_holding_a_newer_route_is_reported_with_the_revision_it_follows(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with gateway_pods(token) as pods:
            newer = route("r7", 7)
            ahead = await pods.gateway("gw-ahead", held=newer)
            behind = await pods.gateway("gw-behind")
            outcome = await push(pods, [ahead, behind], route("r5", 5), monkeypatch)
            assert outcome.confirmed == ("gw-behind",)
            reason = outcome.unreached["gw-ahead"]
            assert "'r7'" in reason and "serial 7" in reason, reason
            assert pods.route_of("gw-ahead") == newer
            assert pods.route_of("gw-behind") == route("r5", 5)

    run(scenario())
