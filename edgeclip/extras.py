"""Optional dependencies: a clear error when one is missing, and lazy imports of the modules that need torch.

The classify and RAIL add-task paths must import no torch (import-linter's ``torch-free`` contract in
``.importlinter``). Modules that need torch (the ``train`` extra) are therefore reached only through
``import_torch_module``, by name, at the moment a command needs them: the static import graph of the
torch-free path never contains them, and a device without torch gets ``MissingExtraError`` naming
the extra to install instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from edgeclip.errors import MissingExtraError

TORCH_PACKAGES = (("torch", "torch"), ("open_clip", "open_clip_torch"))  # (module, pip package)


def require_torch(what: str) -> None:
    """Raise ``MissingExtraError`` (saying ``pip install 'edgeclip[train]'``) unless torch and open_clip
    are importable. ``what`` names the action that needs them, for the message."""
    for module, package in TORCH_PACKAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or blocked installation
            found = False
        if not found:
            raise MissingExtraError(what, "train", package)


def import_torch_module(module: str, what: str) -> ModuleType:
    """Import an edgeclip module that needs torch (e.g. ``"edgeclip.train.moe"``) after checking that
    the ``train`` extra is installed. Same-layer or lower-layer modules only: this is a lazy import,
    not a way around the layer order. Raises ``MissingExtraError``."""
    require_torch(what)
    return importlib.import_module(module)


RAY_PACKAGES = (("ray", "ray"), ("pyarrow", "pyarrow"))  # (module, pip package) of the ``ray`` extra


def require_ray(what: str) -> None:
    """Raise ``MissingExtraError`` (saying ``pip install 'edgeclip[ray]'``) unless Ray (with Ray Data's
    pyarrow) is importable. ``what`` names the action that needs it, for the message."""
    for module, package in RAY_PACKAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(what, "ray", package)


def import_ray_module(module: str, what: str) -> ModuleType:
    """Import an edgeclip module that needs Ray (``"edgeclip.edgeapp.distributed"``) after checking that the
    ``ray`` extra is installed: the CLI and the facade reach it by name, so nothing else imports Ray
    (``.importlinter``: Ray-free). Raises ``MissingExtraError``."""
    require_ray(what)
    return importlib.import_module(module)
