"""Shared test configuration: fixtures every tier may use."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO / "examples"


@pytest.fixture
def cli_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., str]:
    """``cli_error_line(*args)`` runs ``edgeweave *args`` as the console script does and
    returns its error line, once it has kept what a user-fixable error promises: exit
    status 1, one ``error: `` line, last, and no traceback before it."""
    # Imported here: only the tests that ask for this pay for loading the CLI.
    from edgeweave.cli import main

    def error_line(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["edgeweave", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ")
        assert not any(line.startswith(("Traceback", "error: ")) for line in lines[:-1]), lines
        return lines[-1]

    return error_line
