"""The CLI's interrupt exit code, defined once in a leaf module: the entry point imports it before
anything else, and the rest of the CLI imports it from here (no import circle back to the entry point)."""

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def caused_by_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is a Ctrl-C or was raised because of one: a SIGINT while a C extension
    initialises (onnxruntime's) surfaces as ``ImportError: initialization failed`` whose cause is the
    KeyboardInterrupt."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
