"""The ``edgeclip`` console script's entry point: tiny, so that a Ctrl-C while the CLI's modules are
still being imported (the first few hundred milliseconds) ends like any other interrupt, with one
line and exit 130, not a traceback."""

from __future__ import annotations

import signal
import sys

from edgeclip.edgeapp.cli.exit_codes import EXIT_INTERRUPTED, caused_by_interrupt


def main() -> None:
    """Import the CLI and run it; an interrupt during the import is one line on stderr and exit 130.
    Once the command has finished, a late Ctrl-C (during interpreter shutdown) is ignored: the work
    is done and its output written."""
    try:
        from edgeclip.edgeapp.cli.app import main as run
    except BaseException as exc:
        if not caused_by_interrupt(exc):  # a Ctrl-C, or an import that failed because of one
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    try:
        run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
