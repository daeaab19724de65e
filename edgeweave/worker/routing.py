"""Where the gateway sends: the stage-0 route document, its one home.

A re-plan moves stage 0 to new pods. The gateway must follow without restarting
(a new gateway pod would lose the requests the old one holds), so the operator
tells it in two ways that carry the same document:

* it rewrites the ``<pipeline>-stage0`` ConfigMap, which the gateway pod mounts and
  re-reads (``gateway --stage0-file``): this survives gateway restarts, but kubelet
  refreshes mounted ConfigMaps only every minute or so;
* it ``PUT``\\ s the document to every gateway pod at :data:`STAGE0_PATH` (the pipeline
  token required) and waits for each to answer with the new revision: this is how a
  node loss is recovered from in seconds.

Both paths can race (a slow ConfigMap refresh arriving after a newer push), so the
document carries a ``serial`` that only grows: a gateway ignores any route older
than the one it holds. Standard library only: the operator imports this too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeweave.errors import EdgeweaveError

STAGE0_PATH = "/v1/stage0"
"""The gateway's route endpoint: ``GET`` shows the route, ``PUT`` replaces it."""


class RouteError(EdgeweaveError, ValueError):
    """A stage-0 route document that cannot be used."""


@dataclass(frozen=True)
class Stage0Route:
    """The stage-0 replicas of one plan revision."""

    revision: str
    urls: tuple[str, ...]
    serial: int = 0
    """Grows with every route the operator writes; an older route never wins."""

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def newer_than(self, other: Stage0Route | None) -> bool:
        """Whether this route should replace ``other`` (the one in use)."""
        if other is None:
            return True
        if self.serial != other.serial:
            return self.serial > other.serial
        return (self.revision, self.urls) != (other.revision, other.urls)

    def to_document(self) -> dict[str, Any]:
        return {"revision": self.revision, "urls": list(self.urls), "serial": self.serial}

    def to_json(self) -> str:
        return json.dumps(self.to_document(), sort_keys=True)

    @classmethod
    def from_document(cls, document: Any, source: str = "the stage-0 route") -> Stage0Route:
        """Validate a decoded document (a ConfigMap file's or a request body's)."""
        if not isinstance(document, dict):
            raise RouteError(f'{source} must be a JSON object {{"revision", "urls", "serial"}}')
        urls = document.get("urls")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise RouteError(f'{source}: "urls" must be a non-empty list of stage-0 base URLs')
        for url in urls:
            _check_url(url, source)
        revision = document.get("revision", "")
        serial = document.get("serial", 0)
        if not isinstance(revision, str):
            raise RouteError(f'{source}: "revision" must be a string')
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            raise RouteError(f'{source}: "serial" must be a non-negative integer')
        return cls(revision=revision, urls=tuple(urls), serial=serial)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "the stage-0 route") -> Stage0Route:
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise RouteError(f"{source} is not JSON: {exc}") from None
        return cls.from_document(document, source)


def read_route_file(path: Path) -> Stage0Route:
    """The route in a mounted ConfigMap file (``gateway --stage0-file``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RouteError(f"cannot read --stage0-file {path}: {exc.strerror or exc}") from None
    return Stage0Route.from_json(text, f"--stage0-file {path}")


def route_of_urls(urls: Sequence[str]) -> Stage0Route:
    """A route from ``--stage0`` URLs given by hand (no revision, serial 0)."""
    for url in urls:
        _check_url(url, "--stage0")
    return Stage0Route(revision="", urls=tuple(urls), serial=0)


def _check_url(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RouteError(f"{source}: {url!r} is not an http(s) base URL of a stage-0 replica")
