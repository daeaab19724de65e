"""The stage-0 route document: what a user (or the operator) is told about a bad one, and
which of two routes a gateway follows when the ConfigMap and a push race."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeweave.errors import EdgeweaveError
from edgeweave.worker.routing import (
    RouteError,
    Stage0Route,
    read_route_file,
    route_of_urls,
)

STAGE0 = "http://10.0.0.5:8100"


def route(serial: int, *urls: str, revision: str = "r1") -> Stage0Route:
    return Stage0Route(revision=revision, urls=urls or (STAGE0,), serial=serial)


def rejection(document: Any) -> str:
    with pytest.raises(RouteError) as caught:
        Stage0Route.from_document(document, "the pushed route")
    message = str(caught.value)
    assert message.startswith("the pushed route") and "\n" not in message, message
    return message


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "document",
    [
        {"revision": "r1", "serial": 1},
        {"revision": "r1", "urls": [], "serial": 1},
        {"revision": "r1", "urls": STAGE0, "serial": 1},
        {"revision": "r1", "urls": [STAGE0, 8100], "serial": 1},
    ],
    ids=["missing", "empty", "a string", "a number among them"],
)
def test_urls_must_be_a_non_empty_list_of_strings(document: dict[str, Any]) -> None:
    assert '"urls" must be a non-empty list' in rejection(document)


@pytest.mark.parametrize(
    "url", ["ftp://10.0.0.5:8100", "10.0.0.5:8100", "http://", "stage0", ""]
)
def test_each_url_must_be_an_http_base_url_and_the_message_quotes_it(url: str) -> None:
    message = rejection({"revision": "r1", "urls": [STAGE0, url], "serial": 1})
    assert repr(url) in message and "is not an http(s) base URL" in message


@pytest.mark.parametrize("serial", [-1, True, 1.5, "3", None])
def test_the_serial_must_be_a_non_negative_integer(serial: Any) -> None:
    message = rejection({"revision": "r1", "urls": [STAGE0], "serial": serial})
    assert '"serial" must be a non-negative integer' in message


def test_the_revision_must_be_a_string() -> None:
    assert '"revision" must be a string' in rejection({"revision": 7, "urls": [STAGE0]})


@pytest.mark.parametrize("document", [[STAGE0], "http://x", 3, None])
def test_a_document_that_is_not_an_object_says_what_shape_it_needs(document: Any) -> None:
    message = rejection(document)
    assert "must be a JSON object" in message and '"urls"' in message


def test_revision_and_serial_may_be_left_out() -> None:
    parsed = Stage0Route.from_document({"urls": [STAGE0, "https://[fd00::1]:8100"]})
    assert parsed == Stage0Route(revision="", urls=(STAGE0, "https://[fd00::1]:8100"), serial=0)


@pytest.mark.parametrize("text", ["", "{", "revision: r1", b"\xff\xfe"])
def test_text_that_is_not_json_is_refused_naming_its_source(text: str | bytes) -> None:
    with pytest.raises(RouteError) as caught:
        Stage0Route.from_json(text, "the request body")
    assert str(caught.value).startswith("the request body is not JSON")


def test_route_errors_are_user_fixable_errors() -> None:
    """The CLI prints EdgeweaveErrors as one line; a traceback would hide the cause."""
    assert issubclass(RouteError, EdgeweaveError)


# --------------------------------------------------------------------------- route files
def test_a_route_file_is_read_and_its_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "route.json"
    good.write_text(json.dumps({"revision": "r9", "urls": [STAGE0], "serial": 4}))
    assert read_route_file(good) == route(4, revision="r9")

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    bad_url = tmp_path / "bad-url.json"
    bad_url.write_text(json.dumps({"urls": ["ftp://x"]}))
    for path in (tmp_path / "missing.json", tmp_path, garbage, bad_url):
        with pytest.raises(RouteError) as caught:
            read_route_file(path)
        message = str(caught.value)
        assert f"--stage0-file {path}" in message and "\n" not in message, message
    with pytest.raises(RouteError) as caught:
        read_route_file(tmp_path / "missing.json")
    assert str(caught.value).startswith("cannot read --stage0-file")


def test_urls_given_by_hand_are_checked_and_carry_no_revision() -> None:
    assert route_of_urls([STAGE0]) == Stage0Route(revision="", urls=(STAGE0,), serial=0)
    with pytest.raises(RouteError) as caught:
        route_of_urls([STAGE0, "ftp://x"])
    assert str(caught.value).startswith("--stage0: 'ftp://x' is not an http(s) base URL")


# --------------------------------------------------------------------------- which wins
def test_any_route_replaces_none() -> None:
    assert route(0).newer_than(None)


def test_a_higher_serial_wins_and_a_lower_one_never_does() -> None:
    older, newer = route(3, "http://a:1", revision="r3"), route(4, "http://b:1", revision="r4")
    assert newer.newer_than(older)
    assert not older.newer_than(newer)
    # Even a route that looks identical to the one in use loses if it is older: the
    # ConfigMap refresh that arrives after a push must not undo the push.
    assert not route(3, "http://b:1", revision="r4").newer_than(newer)


def test_the_same_serial_with_other_urls_or_revision_wins_but_the_same_route_does_not() -> None:
    held = route(5, "http://a:1")
    assert route(5, "http://b:1").newer_than(held)
    assert route(5, "http://a:1", revision="r2").newer_than(held)
    assert not route(5, "http://a:1").newer_than(held)


# --------------------------------------------------------------------------- round trip
def test_a_route_survives_json_and_documents_unchanged() -> None:
    original = Stage0Route(revision="abc123", urls=(STAGE0, "https://s0-1.ns.svc:8100"),
                           serial=17)
    assert Stage0Route.from_json(original.to_json()) == original
    assert Stage0Route.from_json(original.to_json().encode()) == original
    assert Stage0Route.from_document(original.to_document()) == original
    assert json.loads(original.to_json()) == {
        "revision": "abc123", "urls": [STAGE0, "https://s0-1.ns.svc:8100"], "serial": 17,
    }

