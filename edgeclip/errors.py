"""One exception family for the whole project; the CLI maps each to a message and exit code."""


class EdgeclipError(Exception):
    """Base of every error edgeclip raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(EdgeclipError):
    """A bad argument or input the user can fix (exit code 2)."""

    exit_code = 2


class DomainError(UsageError):
    """A domain folder that cannot be learned (too few classes, empty class, name clash)."""


class BundleError(EdgeclipError):
    """A model bundle that is missing, incomplete, corrupt or of an unknown schema."""


class ImageError(EdgeclipError):
    """An input file that cannot be read as an image."""


class BackboneLoadError(EdgeclipError):
    """An open_clip model or its weights cannot be loaded (offline, unknown name, bad file)."""


class UnknownModelError(BackboneLoadError, UsageError):
    """A model name open_clip does not know: a usage error (exit code 2)."""


class MissingExtraError(EdgeclipError):
    """A command needs an optional dependency that is not installed."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        """``what`` needs package ``module``, installed by ``pip install 'edgeclip[extra]'``."""
        super().__init__(
            f"{what} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'edgeclip[{extra}]'"
        )
        self.extra = extra
        self.module = module


class EngineError(EdgeclipError):
    """The inference engine (onnxruntime, TensorRT) failed while running a graph (out of memory, a graph
    whose shapes or values do not fit at run time)."""


class BackendUnavailableError(EdgeclipError):
    """An inference backend (CUDA, TensorRT) was asked for but is not usable here."""
