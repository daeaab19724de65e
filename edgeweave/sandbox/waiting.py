"""Waiting for the emulated cluster to reach a state: one poll loop for the sandbox's
users (its tests, benchmarks), which all wait on eventually consistent controllers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from edgeweave.sandbox.apiserver import SandboxError

T = TypeVar("T")


class WaitTimeout(SandboxError, TimeoutError):
    """What was waited for did not happen in time; the message says what and the last value."""


def wait_until(what: str, probe: Callable[[], T], timeout: float = 60.0,
               interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
