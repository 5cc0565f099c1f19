"""The ``edgeclip`` command: a thin Typer layer over the library.

Library code raises ``EdgeclipError``s; this module is the one place that turns them into a
message on stderr and an exit code. Set ``EDGECLIP_DEBUG=1`` to see the traceback as well.

Typer turns Ctrl-C into a silent exit 130 and a closed pipe into a silent exit 1 before a
caller can react, so every command is wrapped (``_guard``): an interrupt becomes an
``Interrupted`` error (one line, exit 130) unless the command said more itself, and a reader
that went away (``edgeclip classify ... | head -1``) ends the run quietly with exit 141, as
``cat`` does.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Any, Callable, Optional

import typer

from edgeclip.edgeapp.cli import (
    commands_bench,
    commands_classify,
    commands_demo,
    commands_eval,
    commands_library,
    commands_manage,
)
from edgeclip.edgeapp.cli.console import err_console
from edgeclip.edgeapp.cli.output import EXIT_INTERRUPTED, Interrupted, configure_streams, markup, silence_stdout
from edgeclip.edgeapp.cli.exit_codes import caused_by_interrupt
from edgeclip.errors import EdgeclipError
from edgeclip.images import DEFAULT_MAX_PIXELS, pillow_pixel_limit, warnings_as_notes
from edgeclip.version import __version__

_WRITE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.EFBIG}
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat` reports when its reader goes away

EXIT_CODES_HELP = (
    "Exit codes: 0 every input done; 3 some inputs could not be read (the rest were still classified); "
    "2 usage error (bad argument, missing path, no bundle there, unknown model, bad domain folder); "
    "130 interrupted (Ctrl-C); 141 the reader of the output went away (a closed pipe); 1 any other failure."
)


class _OutputClosed(Exception):
    """The reader of stdout went away (BrokenPipeError), carried past Typer's own handling."""


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgeclip {__version__}")
        raise typer.Exit()


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
    # plain help: no rich markup, so help texts print literally ("pip install 'edgeclip[train]'")
    # and flags show no "<bool>" type
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", help="Print edgeclip's version and exit.", callback=_version_callback, is_eager=True),
) -> None:
    """Continual learning of CLIP models on edge devices."""


def _guard(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``command`` turning Ctrl-C and a closed stdout into exceptions Typer lets through, with the
    process-wide decoding settings of a program that owns its process (``images.warnings_as_notes``,
    ``images.pillow_pixel_limit`` with the command's ``--max-pixels``)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            # The CLI owns its process (the library never does this): Pillow's warnings about a file become
            # its note, and edgeclip's --max-pixels guard, not Pillow's global limit, refuses; both undone after.
            with warnings_as_notes(), pillow_pixel_limit(kwargs.get("max_pixels") or DEFAULT_MAX_PIXELS):
                return command(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Interrupted("interrupted") from exc
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:  # stdout or -o FILE on a full, read-only or failing disk
                raise EdgeclipError(f"cannot write the output: {os.strerror(exc.errno)}") from exc
            if caused_by_interrupt(exc):
                raise Interrupted("interrupted") from exc
            raise
        except EdgeclipError:
            raise  # the command's own words (an Interrupted that says what was kept, ...)
        except Exception as exc:
            if caused_by_interrupt(exc):  # a Ctrl-C while a C extension initialised: "ImportError: initialization failed"
                raise Interrupted("interrupted") from exc
            raise

    return run


commands_manage.register(app)
commands_classify.register(app)
commands_library.register(app)
commands_bench.register(app)
commands_demo.register(app)
commands_eval.register(app)
for _info in app.registered_commands:
    _info.callback = _guard(_info.callback)


def _flush_stdout() -> None:
    """Flush buffered output now, so that a full disk is reported here, not at interpreter exit."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        silence_stdout()  # what could not be written is dropped, not retried at interpreter exit
        raise EdgeclipError(f"cannot write the output: {os.strerror(exc.errno)}") from exc


def main() -> None:
    """Console-script entry point: Typer handles usage errors (exit 2); edgeclip errors become
    one line on stderr and their exit code."""
    configure_streams()
    try:
        try:
            app()
        except SystemExit as done:
            if done.code == EXIT_INTERRUPTED:  # Typer/Click caught a Ctrl-C outside a command (while parsing)
                err_console().print("interrupted", highlight=False)  # and exits 130 without a word
            _flush_stdout()
            raise done
        _flush_stdout()
    except EdgeclipError as exc:
        if os.environ.get("EDGECLIP_DEBUG"):
            traceback.print_exc()
        label = "" if isinstance(exc, Interrupted) else "[bold red]error:[/] "
        err_console().print(f"{label}{markup(exc)}", highlight=False)
        sys.exit(exc.exit_code)
    except (_OutputClosed, BrokenPipeError):
        silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except BaseException as exc:  # a Ctrl-C, or an error raised because of one; anything else (an exit) as it is
        if isinstance(exc, SystemExit) or not caused_by_interrupt(exc):
            raise
        err_console().print("interrupted", highlight=False)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    main()
