"""The one ONNX graph writer: nodes, initializers, opsets, model assembly and saving."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

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
EXTERNAL_THRESHOLD = 1024  # initializers of this many bytes or more go to the external data file
ALIGNMENT = 4096  # external data offsets: page-aligned, so ONNX Runtime can map them

# the folder where GraphWriters spool their large initializers (streamed_weights), else None
_SPOOL_FOLDER: ContextVar[Path | None] = ContextVar("spool_folder", default=None)
_SPOOLED: dict[str, Path] = {}  # spool file name (an initializer's location) -> its path


@contextmanager
def streamed_weights(folder: str | Path) -> Iterator[None]:
    """Graphs written inside this block put each large initializer into a data file in `folder`
    as soon as it is made (ONNX external data) instead of holding it in memory; save_model then
    moves that file beside the graph. An export so holds one weight at a time, not the graph."""
    token = _SPOOL_FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _SPOOL_FOLDER.reset(token)


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
        self._spool: BinaryIO | None = None
        if (folder := _SPOOL_FOLDER.get()) is not None:
            path = folder / f".weights-{uuid.uuid4().hex[:12]}.data"
            self._spool = path.open("wb")
            _SPOOLED[path.name] = path

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer, stored as given (callers choose the dtype); returns its name."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        if self._spool is not None and array.nbytes >= EXTERNAL_THRESHOLD:
            self.initializers.append(self._spooled(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _spooled(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """`array` written to the spool file at the next aligned offset; its external tensor."""
        spool = self._spool
        assert spool is not None
        offset = -(-spool.tell() // ALIGNMENT) * ALIGNMENT
        spool.seek(offset)
        spool.write(memoryview(array.reshape(-1)).cast("B"))
        tensor = onnx.TensorProto(
            name=name,
            dims=array.shape,
            data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
        )
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", Path(spool.name).name), ("offset", offset)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.external_data.add(key="length", value=str(array.nbytes))
        return tensor

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
        if self._spool is not None:
            self._spool.close()
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
    of `model` while saving; they are read back so `model` stays usable. A graph written inside
    streamed_weights already has its data file: it is moved beside the graph, not read.
    """
    path = Path(path)
    spooled = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location" and entry.value in _SPOOLED
    }
    if spooled:
        return _save_spooled(model, path, spooled)
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


def _save_spooled(model: onnx.ModelProto, path: Path, spooled: set[str]) -> Path:
    """Save a graph whose initializers are in one spool file: the file becomes path's data file."""
    if len(spooled) != 1:
        raise ValueError("a graph's initializers must come from one GraphWriter")
    (spool_name,) = spooled
    data = path.with_name(path.name + ".data")
    spool = _SPOOLED.pop(spool_name)
    if spool != data:
        try:
            os.replace(spool, data)
        except OSError:  # another file system (the gate's temporary folder)
            shutil.move(spool, data)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == spool_name:
                entry.value = data.name
    onnx.save_model(model, str(path))
    return path
