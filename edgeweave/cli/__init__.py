"""The ``edgeweave`` command line: one Typer app, one module per subcommand group.

Each module registers its commands on :data:`app` when imported below. Errors a
user can fix (:class:`~edgeweave.errors.EdgeweaveError`) print one red line and
exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from edgeweave.cli.output import err_console
from edgeweave.errors import EdgeweaveError
from edgeweave.local.parent import die_with_parent

app = typer.Typer(
    name="edgeweave",
    help=(
        "Run one DNN model as a pipeline across small, unequal edge machines.\n\n"
        "Start with `edgeweave zoo list`, then `edgeweave profile zoo:resnet50` and "
        "`edgeweave plan zoo:resnet50 --nodes examples/nodes-pi4-mixed.yaml`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_state = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app`.
    from edgeweave.cli import (  # noqa: F401
        bench,
        crd,
        gateway,
        operator,
        plan,
        profile,
        profile_node,
        run,
        sandbox,
        worker,
        zoo,
    )


def main() -> None:
    """Console-script entry point."""
    die_with_parent()
    _register_commands()
    try:
        app()
    except EdgeweaveError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
