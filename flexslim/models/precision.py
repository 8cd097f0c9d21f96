"""The graph as it is deployed: an exported float32 ONNX graph converted to the precision it will run at.

    int8   onnxruntime's static quantization (its pre-processing first: shape inference and graph optimization),
           per-channel int8 weights, activation ranges calibrated (MinMax) on given images; in one of INT8_FORMATS:
           qoperator-u8s8  QLinearConv/QLinearMatMul operators, uint8 activations, int8 weights
           qdq-s8s8        QuantizeLinear/DequantizeLinear pairs around float operators, int8 activations
           qdq-u8s8        the same pairs, uint8 activations
           Which is fastest depends on the CPU and the widths (on an AVX-512 VNNI Xeon, 16/32/64 at 28x28 ran
           QDQ S8S8 1.66 x slower and QOperator 1.42 x faster than fp32): only measurement can say.
    fp16   float16 weights and operators with float32 inputs and outputs (onnxruntime's converter; CUDA only).

`graph_precision` reads back what a graph runs at. Inputs and outputs stay float32 NCHW images in [0, 1] and float32
class scores in every precision, so the gate and the latency timer handle every graph alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from flexslim.recipe.choices import INT8_FORMATS, PRECISIONS

_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}
CALIBRATION_BATCH = 32  # images per calibration pass


def graph_precision(proto) -> str:
    """What an ONNX graph (a ModelProto) computes in: int8 (any quantization operator), fp16 (any float16 tensor or
    Cast to float16), else fp32."""
    import onnx

    nodes = list(proto.graph.node)
    if any(n.op_type in _INT8_OPS for n in nodes):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in proto.graph.initializer):
        return "fp16"
    for n in nodes:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute):
            return "fp16"
    return "fp32"


def deployed(model: bytes, precision: str, int8_format: str, calibration: np.ndarray | None = None) -> bytes:
    """`model` (float32 ONNX bytes) as it runs at `precision`: unchanged for fp32; int8 in `int8_format` (one of
    INT8_FORMATS, calibrated on `calibration`, float32 N,C,H,W images in [0, 1]; None: seeded uniform noise, which
    is all a latency measurement needs: the graph's shape and operators, not its ranges); fp16 converted."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "fp32":
        return model
    if precision == "fp16":
        return _half(model)
    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8 format {int8_format!r} is not one of {INT8_FORMATS} (resolve 'auto' by measuring)")
    return _int8(model, int8_format, calibration)


def noise_images(input_shape: tuple[int, ...], n: int = 2 * CALIBRATION_BATCH, seed: int = 0) -> np.ndarray:
    """`n` seeded uniform [0, 1] float32 images of `input_shape` (C, H, W): the calibration of a timed graph."""
    return np.random.default_rng(seed).random((n, *input_shape), dtype=np.float32)


def _int8(model: bytes, fmt: str, calibration: np.ndarray | None) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load_model_from_string(model)
    meta = [(p.key, p.value) for p in proto.metadata_props]
    input_name = proto.graph.input[0].name
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    images = calibration if calibration is not None else noise_images(tuple(d.dim_value for d in dims[1:]))
    images = np.ascontiguousarray(images, dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{input_name: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
            )

        def get_next(self):
            return next(self.batches, None)

    layout, acts = fmt.split("-")
    with tempfile.TemporaryDirectory(prefix="flexslim-int8-") as tmp, _quiet():
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QOperator if layout == "qoperator" else QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if acts == "u8s8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    for key, value in meta:
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    return quantized.SerializeToString()


def _half(model: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(onnx.load_model_from_string(model), keep_io_types=True)
    return half.SerializeToString()


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization tools log and print warnings (per-channel advice, pre-processing hints) that are
    not the user's business: silenced while open."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
