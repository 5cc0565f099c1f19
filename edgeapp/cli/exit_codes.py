"""The CLI's interrupt exit code, defined once in a leaf module: the entry point imports it before
anything else, and the rest of the CLI imports it from here (no import circle back to the entry point)."""

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
