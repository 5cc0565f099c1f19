"""Output that survives where it goes: pipes that close early, consoles that cannot show a
character, and user text (file and class names) that holds control codes.

Conventions (README "Output formats"):

- Text a person reads (tables, CSV, messages) shows a file name's bytes that are not UTF-8 as
  ``\\xNN`` and control characters (C0, DEL, C1, bidirectional overrides) as ``\\xNN`` /
  ``\\uNNNN``, so a name can never move the cursor, change colours or reorder a line.
- JSON is exact: a path is the file name decoded with Python's ``surrogateescape`` (each byte
  that is not UTF-8 becomes the lone surrogate U+DC80+byte), written as a ``\\udcNN`` escape;
  ``os.fsencode(json.loads(line)["path"])`` gives back the file's bytes.
- A stream whose encoding cannot show a character gets a ``\\uNNNN`` escape instead (no crash);
  JSON to such a stream is written ASCII-only, which loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, TextIO

from rich.markup import escape

from edgeclip.edgeapp.cli.exit_codes import EXIT_INTERRUPTED
from edgeclip.errors import EdgeclipError


class Interrupted(EdgeclipError):
    """Ctrl-C: the message says what was kept (the CLI prints it as is); exit code 130."""

    exit_code = EXIT_INTERRUPTED

# C0 controls, DEL, C1 controls, bidirectional marks/overrides/isolates, lone surrogates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# what JSON (with ensure_ascii=False) still leaves raw: C1, bidi, surrogates (C0 is escaped already)
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    """``text`` with every control character, bidirectional override and undecodable byte shown
    as a backslash escape: safe to print to a terminal, never more than one line."""
    return _UNSAFE.sub(_escape_char, str(text))


def markup(text: object) -> str:
    """User text made visible (``visible``) and escaped for rich markup (``[red]`` stays literal)."""
    return escape(visible(text))


def json_text(obj: Any, ascii_only: bool = False) -> str:
    """One JSON document on one line. Lone surrogates (undecodable file-name bytes), C1 controls
    and bidi overrides are written as ``\\uNNNN`` escapes, so the text is valid UTF-8, harmless on
    a terminal, and ``json.loads`` gives back the exact string."""
    text = json.dumps(obj, ensure_ascii=ascii_only)
    if ascii_only:
        return text
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def is_utf(stream: TextIO) -> bool:
    """True when ``stream`` encodes text as UTF-8 (or another Unicode encoding)."""
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
    return encoding.startswith("utf")


def configure_streams() -> None:
    """Make stdout and stderr replace what their encoding cannot show (``\\uNNNN``) instead of
    raising UnicodeEncodeError: a cp1252 console prints ``\\u5199\\u771f.png`` for ``写真.png``."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a closed or unusual stream
                pass


def silence_stdout() -> None:
    """After the reader of a pipe went away: point stdout at /dev/null so that Python's final
    flush does not print 'Exception ignored ... BrokenPipeError'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no real file descriptor
        pass


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (False when it has no file descriptor)."""
    try:
        return sys.stdout.isatty()
    except (ValueError, AttributeError):  # pragma: no cover
        return False
