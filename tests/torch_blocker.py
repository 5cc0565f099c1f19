"""Make torch, torchvision and open_clip unimportable in this process (as on an edge device).

Used by tests through ``python -c 'import tests.torch_blocker'`` style preambles: importing this
module installs a meta-path finder that refuses those packages.
"""

import importlib.abc
import sys

BLOCKED = ("torch", "torchvision", "open_clip", "onnxscript")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: D401 - importlib protocol
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: this test runs as on a device without torch")
        return None


for _name in list(sys.modules):
    if _name.split(".")[0] in BLOCKED:
        del sys.modules[_name]
sys.meta_path.insert(0, _Blocker())
