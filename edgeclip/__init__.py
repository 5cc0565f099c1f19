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

from typing import Any

from edgeclip.version import __version__

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
