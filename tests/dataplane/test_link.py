"""The link: frames over one HTTP stream each way acked, least-outstanding, resent on failure."""

from __future__ import annotations

import asyncio
import json
import time
import types
from collections.abc import AsyncIterator, Sequence

import aiohttp
import numpy as np
import pytest

from edgeweave.worker.frames import FrameHeader, encode_frame, encode_frame_bytes
from edgeweave.worker.link import (
    SINK_ROLE,
    Delivery,
    LinkPool,
    Peer,
    ReplyTargets,
    stream_url,
)


# --------------------------------------------------------------------- helpers
def _frame(frame_id: str, size: int = 16, *, deadline: float | None = None) -> list[bytes]:
    values = np.arange(size, dtype=np.float32) + len(frame_id)
    return [bytes(b) for b in encode_frame(FrameHeader(frame_id, deadline), {"x": values})]


async def _connected(pool: LinkPool, links: int, dp: types.ModuleType) -> None:
    await dp.wait_until(lambda: pool.links_up() == links, f"{links} links up")


async def _stream_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    async for line in response.content:
        if line.strip():
            yield json.loads(line)


async def _raw_stream(
    url: str, token: str, chunks: Sequence[bytes]
) -> tuple[int, list[dict]]:
    """POST ``chunks`` as one stream; the status and every ack line until the stream ends."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async with aiohttp.ClientSession() as session, session.post(
        stream_url(url), data=body(), headers={"Authorization": f"Bearer {token}"}
    ) as response:
        if response.status != 200:
            return response.status, []
        return 200, [line async for line in _stream_lines(response)]


# --------------------------------------------------------------------- delivery
def test_frames_arrive_whole_and_in_order_and_every_send_is_acked(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token).start()
        pool = LinkPool([receiver.url], token, max_outstanding_per_link=4)
        sizes = [1, 1000, 3 * 2**20 // 4, 7, 2**16]
        sent = {f"f{i}": _frame(f"f{i}", sizes[i % len(sizes)]) for i in range(40)}
        futures = [await pool.send(frame_id, buffers) for frame_id, buffers in sent.items()]
        deliveries = await asyncio.gather(*futures)
        assert all(d.ok and d.target == receiver.url for d in deliveries)
        assert receiver.ids() == list(sent)
        for frame in receiver.frames:
            assert encode_frame_bytes(frame.header, frame.tensors) == b"".join(sent[frame.id])
        assert pool.outstanding() == 0
        await pool.close()
        await receiver.stop()

    asyncio.run(scenario())


def test_least_outstanding_sends_around_a_replica_that_is_slow_to_ack(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        slow = await dp.Sink(token, hold=True).start()
        fast = await dp.Sink(token).start()
        pool = LinkPool([slow.url, fast.url], token)
        await _connected(pool, 2, dp)
        for i in range(10):
            future = await pool.send(f"f{i}", _frame(f"f{i}"))
            await dp.wait_until(
                lambda i=i: f"f{i}" in slow.ids() + fast.ids(), f"frame f{i} to arrive"
            )
            if f"f{i}" in fast.ids():
                assert (await future).target == fast.url
        # The slow replica got one frame while idle and no more while it held it.
        assert len(slow.frames) == 1 and len(fast.frames) == 9
        assert pool.outstanding_by_target() == {slow.url: 1, fast.url: 0}
        slow.release()
        await dp.wait_until(lambda: pool.outstanding() == 0, "the held frame's ack")
        await pool.close()
        await slow.stop()
        await fast.stop()

    asyncio.run(scenario())


def test_send_waits_while_every_link_is_at_its_cap(token: str, dp: types.ModuleType) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token, hold=True).start()
        pool = LinkPool([receiver.url], token, max_outstanding_per_link=3)
        futures = [await pool.send(f"f{i}", _frame(f"f{i}")) for i in range(3)]
        fourth = asyncio.create_task(pool.send("f3", _frame("f3")))
        await dp.wait_until(lambda: len(receiver.frames) == 3, "three frames at the receiver")
        await asyncio.sleep(0.2)
        assert not fourth.done(), "a fourth frame went out past the cap of 3"
        assert pool.outstanding() == 3 and len(receiver.frames) == 3
        receiver.release(1)
        fourth_delivery = await fourth  # placed once the first ack freed a slot
        assert (await futures[0]).ok
        await dp.wait_until(lambda: len(receiver.frames) == 4, "the fourth frame")
        receiver.release()
        assert (await fourth_delivery).ok
        await pool.close()
        await receiver.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------- auth
def test_the_stream_endpoint_wants_the_token(token: str, dp: types.ModuleType) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token).start()
        frame = b"".join(_frame("f0"))
        assert (await _raw_stream(receiver.url, "", [frame]))[0] == 401
        assert (await _raw_stream(receiver.url, token + "x", [frame]))[0] == 401
        assert (await _raw_stream(receiver.url, token, [frame])) == (
            200, [{"id": "f0", "ok": True}]
        )
        assert receiver.ids() == ["f0"], "a refused stream must not deliver anything"
        await receiver.stop()

    asyncio.run(scenario())


def test_a_pool_with_a_wrong_token_drops_at_the_deadline_saying_why(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token).start()
        pool = LinkPool([receiver.url], "not-" + token)
        future = await pool.send("f0", _frame("f0", deadline=time.time() + 0.5))
        delivery = await asyncio.wait_for(future, 30)
        assert delivery.dropped and not delivery.ok
        assert "401" in (delivery.error or "")
        assert receiver.frames == []
        await pool.close()
        await receiver.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------- failures
def test_unacked_frames_of_a_failed_link_are_resent_to_the_survivor(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        doomed = await dp.Sink(token, hold=True).start()
        survivor = await dp.Sink(token).start()
        pool = LinkPool([doomed.url, survivor.url], token, max_outstanding_per_link=4)
        await _connected(pool, 2, dp)
        futures = [await pool.send(f"f{i}", _frame(f"f{i}")) for i in range(20)]
        await dp.wait_until(lambda: len(doomed.frames) == 4, "the doomed replica to fill up")
        await doomed.stop()  # its held frames were never acked
        deliveries: list[Delivery] = await asyncio.gather(*futures)
        assert all(d.ok for d in deliveries)
        assert {d.frame_id for d in deliveries if d.target == survivor.url} == {
            f"f{i}" for i in range(20)
        }
        assert set(survivor.ids()) >= set(doomed.ids())
        await pool.close()
        await survivor.stop()

    asyncio.run(scenario())


def test_with_no_receiver_a_frame_waits_for_one_until_its_deadline(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        port = dp.free_port()
        url = f"http://127.0.0.1:{port}"
        pool = LinkPool([url], token)
        lost = await pool.send("lost", _frame("lost", deadline=time.time() + 0.3))
        delivery = await asyncio.wait_for(lost, 30)
        assert delivery.dropped and "no live downstream link" in (delivery.error or "")
        # send() itself waits for a link: the frame is not placed anywhere meanwhile.
        patient = asyncio.create_task(
            pool.send("patient", _frame("patient", deadline=time.time() + 120))
        )
        await asyncio.sleep(0.3)  # the pool retries, with backoff, meanwhile
        assert not patient.done()
        receiver = await dp.Sink(token).start(port)
        assert (await asyncio.wait_for(await patient, 60)).ok
        assert receiver.ids() == ["patient"]
        await pool.close()
        await receiver.stop()

    asyncio.run(scenario())


def test_close_resolves_unacked_frames_as_dropped(token: str, dp: types.ModuleType) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token, hold=True).start()
        pool = LinkPool([receiver.url], token)
        future = await pool.send("f0", _frame("f0"))
        await dp.wait_until(lambda: receiver.frames, "the frame to arrive")
        await pool.close()
        delivery = await future
        assert delivery.dropped and "closed" in (delivery.error or "")
        with pytest.raises(RuntimeError, match="closed"):
            await pool.send("f1", _frame("f1"))
        await receiver.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------- re-plans
def test_set_targets_sends_new_frames_to_the_new_replicas_and_drains_the_old(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        old = await dp.Sink(token, hold=True).start()
        new = await dp.Sink(token).start()
        pool = LinkPool([old.url], token)
        first = await pool.send("f0", _frame("f0"))
        await dp.wait_until(lambda: old.frames, "f0 at the old replica")
        pool.set_targets([new.url])
        assert pool.targets == [new.url]
        second = await pool.send("f1", _frame("f1"))
        assert (await second).target == new.url
        assert old.receiver.open_streams == 1, "the old link stays until f0 is acked"
        old.release()
        assert (await first).target == old.url
        await dp.wait_until(lambda: old.receiver.open_streams == 0, "the old link to close")
        assert old.ids() == ["f0"] and new.ids() == ["f1"]
        assert pool.outstanding_by_target() == {new.url: 0}
        await pool.close()
        await old.stop()
        await new.stop()

    asyncio.run(scenario())


def test_targets_must_be_http_urls(token: str) -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="not an http"):
            LinkPool(["ftp://example.com"], token)

    asyncio.run(scenario())


# --------------------------------------------------------------------- bad input
def test_a_refused_frame_is_answered_and_the_stream_reads_on(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token).start()
        bad = b"".join(_frame("bad")).replace(b'"float32"', b'"float33"')
        status, acks = await _raw_stream(
            receiver.url, token, [b"".join(_frame("a")), bad, b"".join(_frame("b"))]
        )
        assert status == 200
        assert acks[0] == {"id": "a", "ok": True} and acks[2] == {"id": "b", "ok": True}
        assert acks[1]["id"] == "bad" and acks[1]["ok"] is False
        assert "float33" in acks[1]["error"]
        assert receiver.ids() == ["a", "b"]
        await receiver.stop()

    asyncio.run(scenario())


def test_lost_framing_closes_only_that_stream(token: str, dp: types.ModuleType) -> None:
    async def scenario() -> None:
        receiver = await dp.Sink(token).start()
        pool = LinkPool([receiver.url], token)
        assert (await (await pool.send("before", _frame("before")))).ok
        garbage = [b"".join(_frame("g0")), b"this is not a frame at all" * 10]
        status, acks = await _raw_stream(receiver.url, token, garbage)
        assert status == 200 and acks == [{"id": "g0", "ok": True}]
        assert (await (await pool.send("after", _frame("after")))).ok
        assert receiver.ids() == ["before", "g0", "after"]
        assert (await _raw_stream(receiver.url, token, [b"".join(_frame("new"))]))[1] == [
            {"id": "new", "ok": True}
        ], "new streams are still accepted"
        await pool.close()
        await receiver.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------- handshake, replies
def test_a_pool_learns_what_its_receivers_are_and_which_header_fields_they_read(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        sink = await dp.Sink(token, role=SINK_ROLE).start()
        old = await dp.Sink(token, announce=False).start()
        nobody = f"http://127.0.0.1:{dp.free_port()}"
        to_sink, to_old, to_nobody = (LinkPool([url], token) for url in (sink.url, old.url,
                                                                       nobody))
        try:
            peer = await to_sink.wait_for_peer(time.time() + 60)
            assert peer == Peer(SINK_ROLE, frozenset({"reply_to", "category"})) and peer.is_sink
            peer = await to_old.wait_for_peer(time.time() + 60)
            assert peer == Peer(None, frozenset()) and not peer.is_sink
            assert to_nobody.peer() is None
            assert await to_nobody.wait_for_peer(time.time() + 0.2) is None
            # Two kinds of replica behind one pool: only the fields both read.
            to_sink.set_targets([sink.url, old.url])
            await _connected(to_sink, 2, dp)
            assert to_sink.peer() == Peer(None, frozenset())
        finally:
            for pool in (to_sink, to_old, to_nobody):
                await pool.close()
            await sink.stop()
            await old.stop()

    asyncio.run(scenario())


def test_enqueue_never_waits_and_max_wait_bounds_a_frame_with_no_link(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        nobody = LinkPool([f"http://127.0.0.1:{dp.free_port()}"], token, max_wait_s=0.3)
        receiver = await dp.Sink(token, hold=True).start()
        full = LinkPool([receiver.url], token, max_outstanding_per_link=1, max_wait_s=60)
        try:
            # No deadline at all: max_wait_s alone ends the wait.
            delivery = await asyncio.wait_for(nobody.enqueue("lost", _frame("lost")), 30)
            assert delivery.dropped and not delivery.ok
            assert "gave up after waiting 0.3 s with no live downstream link" in delivery.error
            assert nobody.outstanding() == 0

            await _connected(full, 1, dp)
            first, second = full.enqueue("a", _frame("a")), full.enqueue("b", _frame("b"))
            await dp.wait_until(lambda: receiver.ids() == ["a"], "the first frame")
            assert full.outstanding() == 2 and not second.done()
            receiver.release()
            await dp.wait_until(lambda: receiver.ids() == ["a", "b"], "the second frame")
            receiver.release()
            assert (await first).ok and (await second).ok
        finally:
            await nobody.close()
            await full.close()
            await receiver.stop()

    asyncio.run(scenario())


def test_reply_targets_hold_one_pool_per_replica_up_to_a_cap_and_close_idle_ones(
    token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        gateways = [await dp.Sink(token, role=SINK_ROLE).start() for _ in range(3)]
        replies = ReplyTargets(token, max_targets=2, idle_s=0.4)
        try:
            first = replies.pool_for(gateways[0].url)
            assert first is not None and replies.pool_for(gateways[0].url) is first
            second = replies.pool_for(gateways[1].url)
            assert second is not None and second is not first
            assert replies.pool_for(gateways[2].url) is None  # at the cap
            for index, pool in enumerate((first, second)):
                assert (await pool.enqueue(f"r{index}", _frame(f"r{index}"))).ok
            assert [g.ids() for g in gateways] == [["r0"], ["r1"], []]
            await dp.wait_until(lambda: replies.targets == [], "idle reply pools to close")
            third = replies.pool_for(gateways[2].url)
            assert third is not None and replies.targets == [gateways[2].url]
            assert (await third.enqueue("r2", _frame("r2"))).ok
            assert gateways[2].ids() == ["r2"]
        finally:
            await replies.close()
            for gateway in gateways:
                await gateway.stop()

    asyncio.run(scenario())
