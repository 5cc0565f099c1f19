"""edgeclip: continual learning of CLIP models on edge devices.

The public API (``edgeclip.edgeapp.api``), reached lazily so that importing any part of the package
stays cheap and torch-free::

    import edgeclip
    clf = edgeclip.load("models/bundles/default")
    print(clf.classify("photo.jpg")[0].label)

Layers, one way (``.importlinter``): core ``edgeclip/`` (this folder: errors, bundle store, layout,
images, tokenizer, domain folders) < ``edgeclip.train`` < ``edgeclip.export`` < ``edgeclip.edgeapp``.
No module below imports this facade.
"""

import os
from typing import Any

from edgeclip.version import __version__

# Privacy on the edge: onnxruntime's Linux/macOS wheels (1DS telemetry) write a device id and an event
# database for every process that imports them (~/.cache/Microsoft/DeveloperTools/.onnxruntime/, or under
# $XDG_CACHE_HOME), and ``onnxruntime.disable_telemetry_events()`` does not stop it. The environment
# variable ORT_DISABLE_TELEMETRY=1 does, read when onnxruntime is imported; every edgeclip module imports
# this package first. A user who sets the variable (e.g. to 0) keeps their choice. README, "Privacy".
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__all__ = ["Classifier", "Prediction", "TaskInfo", "__version__", "create", "distributed", "load"]
_API = {"Classifier", "TaskInfo", "create", "load"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from edgeclip.edgeapp import api

        return getattr(api, name)
    if name == "distributed":  # the Ray path (the ``ray`` extra): edgeclip.distributed.classify_dataset
        from edgeclip.extras import import_ray_module

        return import_ray_module("edgeclip.edgeapp.distributed", "edgeclip.distributed")
    if name == "Prediction":
        from edgeclip.edgeapp.classify import Prediction

        return Prediction
    raise AttributeError(f"module 'edgeclip' has no attribute {name!r}")
