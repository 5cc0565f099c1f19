"""The ``edgeclip`` command: a thin Typer layer over the library.

Library code raises ``EdgeclipError``s; this module is the one place that turns them into a
message on stderr and an exit code. Set ``EDGECLIP_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import typer

from edgeclip.edgeapp.cli import commands_classify, commands_manage, commands_bench
from edgeclip.edgeapp.cli.console import err_console
from edgeclip.edgeapp.errors import EdgeclipError

EXIT_CODES_HELP = (
    "Exit codes: 0 every input done; 3 some inputs could not be read (the rest were still classified); "
    "2 usage error (bad argument, bad domain folder); 1 any other failure."
)

app = typer.Typer(
    name="edgeclip",
    help=(
        "Continual learning of CLIP models on edge devices: learn new image domains one after another "
        "(MoE-Adapters or RAIL, with the DDAS gate) and classify with onnxruntime or TensorRT, no torch needed.\n\n"
        + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

commands_manage.register(app)
commands_classify.register(app)
commands_bench.register(app)


def _run(entry: Callable[..., Any]) -> int:
    try:
        entry(standalone_mode=False)
    except EdgeclipError as exc:
        if os.environ.get("EDGECLIP_DEBUG"):
            raise
        err_console().print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]")
        return 130
    return 0


def main() -> None:
    """Console-script entry point."""
    import click

    command = typer.main.get_command(app)
    try:
        code = _run(command.main)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: Click formats them
        exc.show()
        code = 2
    except click.exceptions.Abort:
        code = 1
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
