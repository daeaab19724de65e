"""Fixtures of the end-to-end tier: a whole emulated edge cluster per test.

Each test gets a :class:`~edgeweave.sandbox.sandbox.Sandbox` (the emulated API, the
controllers, the pod runner and the real operator as a process) and drives it as a
user would: ``kubectl apply`` (the ``kubernetes`` client when kubectl is missing),
requests to the pipeline's ``status.endpoint``, node deletion through the API. The
``mode`` fixture runs a test with plain processes always, and again with emulated
nodes (network namespaces, shaped links, CPU quotas) where root allows; without it
the emulated variant is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import NODES_FILE, Cluster

from edgeweave.sandbox.sandbox import Sandbox, SandboxOptions, read_nodes_file


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's model cache, shared by the session's sandboxes (one zoo build)."""
    return tmp_path_factory.mktemp("e2e-model-cache")


def _emulation() -> tuple[bool, str]:
    from edgeweave.local.emulate import emulation_available

    return emulation_available()


@pytest.fixture(params=["plain", "emulated"])
def mode(request: pytest.FixtureRequest) -> str:
    """Plain processes always; emulated nodes where root and the kernel allow."""
    if request.param == "emulated":
        available, why = _emulation()
        if not available:
            pytest.skip(why)
    return str(request.param)


def _start(mode: str, tmp_path: Path, model_cache: Path) -> Iterator[Cluster]:
    options = SandboxOptions(nodes=read_nodes_file(NODES_FILE), emulate=mode == "emulated",
                             run_dir=tmp_path / "sandbox", cache_dir=model_cache)
    with Sandbox(options) as sandbox:
        yield Cluster(sandbox)


@pytest.fixture
def cluster(mode: str, tmp_path: Path, model_cache: Path) -> Iterator[Cluster]:
    """A sandbox in each mode (see :func:`mode`)."""
    yield from _start(mode, tmp_path, model_cache)


@pytest.fixture
def plain_cluster(tmp_path: Path, model_cache: Path) -> Iterator[Cluster]:
    """A sandbox of plain processes (for scenarios the network does not change)."""
    yield from _start("plain", tmp_path, model_cache)
