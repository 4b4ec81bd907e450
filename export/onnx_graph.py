"""The one ONNX graph writer: nodes, initializers, opsets, model assembly and saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

MS = "com.microsoft"
# The fused graph needs opset 21 (onnxruntime 1.31 reads IR <= 13; 10 is what opset 21 needs).
OPSET = 21
# The reference graph stays on opset 17 so that any onnxruntime >= 1.13 (and optimum) reads it.
PORTABLE_OPSET = 17
IR_VERSIONS = {17: 8, 21: 10}  # the IR version each opset needs
GRAPH_FILE = "model.onnx"
PRODUCER = "discord-llm export"

# ops of onnxruntime's com.microsoft domain that the graphs use
MS_OPS = frozenset(
    {
        "GroupQueryAttention",
        "SkipSimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "MatMulNBits",
        "FastGelu",
        "GatherBlockQuantized",
    }
)


class GraphWriter:
    """Collects nodes and initializers while a graph is written; every node output gets a
    readable, unique name (`name` for the first output, `name/1`, `name/2`, ... for the rest)."""

    def __init__(self, float_type: type[np.floating] = np.float32) -> None:
        self.float_type = float_type  # the dtype of `weight` initializers
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer, stored as given (callers choose the dtype); returns its name."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        """An int64 vector initializer (shapes, axes, splits)."""
        return self.const(name, np.array(values, dtype=np.int64))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float initializer in the graph's float type."""
        return self.const(name, np.asarray(array, dtype=self.float_type))

    def node(
        self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs
    ) -> list[str]:
        """Add one node (com.microsoft ops get their domain); returns its output names."""
        outs = [name if i == 0 else f"{name}/{i}" for i in range(outputs)]
        domain = MS if op_type in MS_OPS else ""
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs)
        )
        return outs

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """Add a node with one output; returns its name."""
        return self.node(op_type, inputs, name, **attrs)[0]

    def model(
        self,
        name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        *,
        opset: int = OPSET,
        doc: str = "",
    ) -> onnx.ModelProto:
        """The model of everything written so far (with the com.microsoft opset when used)."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", opset)]
        if any(n.domain == MS for n in self.nodes):
            opsets.append(helper.make_opsetid(MS, 1))
        model = helper.make_model(
            graph, opset_imports=opsets, ir_version=IR_VERSIONS[opset], producer_name=PRODUCER
        )
        model.doc_string = doc
        return model


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `path` (model.onnx) plus one external data file beside it (model.onnx.data).

    Small constants (shapes, axes) stay inline for shape inference. onnx moves the tensors out
    of `model` while saving; they are read back so `model` stays usable.
    """
    path = Path(path)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    load_external_data_for_model(model, str(path.parent))
    return path
