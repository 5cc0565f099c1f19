"""edgeclip: continual learning of CLIP models on edge devices.

The three stages live in top-level folders mapped into this namespace:
``edgeclip.edgeapp`` (torch-free runtime and CLI), ``edgeclip.train`` (learners)
and ``edgeclip.export`` (ONNX/TensorRT graphs).
"""

__version__ = "0.1.0"
