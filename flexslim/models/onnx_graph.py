"""A torch network -> ONNX bytes with a dynamic batch axis: the serialisation shared by the latency measurements
(fast path) and the release export (`deploy.export`, which adds the checker, parity and provenance).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], fast: bool = False) -> bytes:
    """Serialise an eval-mode network with a dynamic batch axis.

    `fast=True` uses the TorchScript exporter when this torch still has it (0.2 s instead of ~5 s); the
    latency model uses it to time dozens of candidate networks. Both exporters emit the same operator
    graph for these families (conv, BN folded by onnxruntime, relu, add, pool, gemm). Release exports
    always use the dynamo exporter.
    """
    model = model.eval()
    sample = torch.rand(2, *input_shape)
    if fast:
        buf = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model,
                    (sample,),
                    buf,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}},
                    opset_version=17,
                )
                return buf.getvalue()
            except (TypeError, RuntimeError, ImportError):
                pass  # no TorchScript exporter in this torch: fall through to dynamo
    return _dynamo_proto(model, sample).SerializeToString()


def _dynamo_proto(model: nn.Module, sample: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    return program.model_proto
