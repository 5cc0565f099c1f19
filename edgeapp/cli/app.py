"""The ``edgeclip`` command: a thin Typer layer over the library.

Library code raises ``EdgeclipError``s; this module is the one place that turns them into a
message on stderr and an exit code. Set ``EDGECLIP_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from edgeclip.edgeapp.cli import commands_bench, commands_classify, commands_eval, commands_manage
from edgeclip.edgeapp.cli.console import err_console
from edgeclip.errors import EdgeclipError

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
commands_eval.register(app)


def main() -> None:
    """Console-script entry point: Typer handles usage errors (exit 2); edgeclip errors become
    one line on stderr and their exit code."""
    try:
        app()
    except EdgeclipError as exc:
        if os.environ.get("EDGECLIP_DEBUG"):
            raise
        err_console().print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
