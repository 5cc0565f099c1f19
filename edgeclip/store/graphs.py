"""ONNX graphs in the store: the tensors whose data lies in external files."""

from __future__ import annotations

from typing import Any, Iterator


def external_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of an onnx GraphProto (initialisers and attribute tensors, subgraphs included)
    whose data is external."""
    from onnx import AttributeProto, TensorProto

    def walk(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from walk(sub)

    for tensor in walk(graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor
