"""torch -> ONNX with the dynamo exporter: dynamic batch axis, full checker, parity with torch, provenance.

Conversion only: the export JOB (a run directory -> ONNX -> gate) is `jobs/export.py`.

The exported graph takes float32 NCHW images in [0, 1]; normalisation is the network's first layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flexslim.errors import BadInput, GateFailed
from flexslim.models.arch import Arch, arch_json
from flexslim.system.files import atomic_write_bytes

if TYPE_CHECKING:
    from torch import nn

PARITY_TOL = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote: the file, the parity it reached, the opset and the size."""

    path: Path
    parity_max_abs: float  # largest |onnxruntime - torch| over the parity batches
    parity_batches: tuple[int, ...]
    opset: int
    size_bytes: int
    copied_from: Path | None = None  # the conversion this file copies (a search's run/model.onnx), else None


def provenance(
    arch: Arch,
    recipe_name: str,
    budget_ms: float | None = None,
    latency: dict | None = None,
    model_sha256: str | None = None,
) -> dict[str, str]:
    """metadata_props for a flexslim model; `validate` reads the `flexslim.*` keys back. `model_sha256`: the
    sha256 of the model.pt it was converted from (`system.files.file_sha256`)."""
    from flexslim import __version__

    meta = {
        "flexslim.version": __version__,
        "flexslim.family": arch.family,
        "flexslim.widths": json.dumps(arch.widths),
        "flexslim.arch": arch_json(arch),
        "flexslim.dataset": arch.dataset,
        "flexslim.input_shape": json.dumps(list(arch.input_shape)),
        "flexslim.normalization": json.dumps({"mean": list(arch.mean), "std": list(arch.std)}),
        "flexslim.recipe": recipe_name,
    }
    if arch.class_names:
        meta["flexslim.class_names"] = json.dumps(list(arch.class_names))
    if budget_ms is not None:
        meta["flexslim.budget_ms"] = repr(float(budget_ms))
    for key in ("provider", "batch", "threads", "percentile"):
        if latency and key in latency:
            meta[f"flexslim.latency_{key}"] = str(latency[key])
    if model_sha256:
        meta["flexslim.model_sha256"] = model_sha256
    return meta


def _dynamo_proto(model: nn.Module, sample):
    """`models.onnx_graph._dynamo_proto`, imported when a conversion happens (torch and the exporter: a copied
    export never imports them)."""
    from flexslim.models.onnx_graph import _dynamo_proto as convert

    return convert(model, sample)


def export_model(
    model: nn.Module,
    arch: Arch,
    out: str | Path,
    metadata: dict[str, str],
    parity_batches: tuple[int, ...] = (1, 7),
    tol: float = PARITY_TOL,
    seed: int = 0,
) -> ExportResult:
    """Export, check (onnx.checker full), compare with torch on random inputs, then write atomically.

    Raises GateFailed (nothing written) when the max abs difference exceeds `tol`.
    """
    import onnx
    import onnxruntime as ort
    import torch

    out = Path(out)
    if out.suffix != ".onnx":
        raise BadInput(f"output {out} should end in .onnx")
    model = model.cpu().eval()
    proto = _dynamo_proto(model, torch.rand(2, *arch.input_shape))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in parity_batches:
        x = torch.rand(b, *arch.input_shape, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        worst = max(worst, float(abs(ref - got).max()))
    if worst > tol:
        raise GateFailed(f"ONNX output differs from torch by {worst:.3g} (> {tol:g}); {out} not written")
    atomic_write_bytes(out, data)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(out, worst, tuple(parity_batches), opset, len(data))


@dataclass(frozen=True)
class DeployedResult:
    """The deployed graph `export_deployed` wrote beside its fp32 twin: precision, format, how far its outputs are
    from the twin's on the calibration images (quantization moves them: reported, not a failure)."""

    path: Path
    twin: Path
    precision: str
    int8_format: str
    calibration_images: int
    max_abs_vs_fp32: float
    size_bytes: int


def twin_path(out: str | Path) -> Path:
    """Where the fp32 twin of a deployed graph `out` is written: `model.onnx` -> `model.fp32.onnx`."""
    out = Path(out)
    return out.with_name(out.stem + ".fp32.onnx")


def export_deployed(
    twin: Path, out: str | Path, precision: str, int8_format: str, calibration, metadata: dict[str, str]
) -> DeployedResult:
    """The exported fp32 graph `twin` converted to `precision` (`models.precision.deployed`; int8 calibrated on the
    `calibration` images, float32 N,C,H,W in [0, 1], the training images D_t) and written atomically to `out`, with
    `metadata` plus what it is: `flexslim.precision`, `flexslim.int8_format`, `flexslim.calibration_images` and the
    twin's file name (`flexslim.fp32_twin`, which the gate evaluates beside it)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from flexslim.models.precision import deployed

    out = Path(out)
    data = deployed(twin.read_bytes(), precision, int8_format, calibration)
    proto = onnx.load_model_from_string(data)
    del proto.metadata_props[:]
    described = {
        **metadata,
        "flexslim.precision": precision,
        "flexslim.fp32_twin": twin.name,
        **({"flexslim.int8_format": int8_format, "flexslim.calibration_images": str(len(calibration))}
           if precision == "int8" else {}),
    }  # fmt: skip
    for key, value in described.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    x = np.ascontiguousarray(calibration[:64], dtype=np.float32)
    outs = []
    try:
        for graph in (twin.read_bytes(), data):
            s = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
            outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
        moved = float(abs(outs[0] - outs[1]).max())
    except Exception:  # noqa: BLE001 - an fp16 graph the CPU provider cannot run (it deploys on CUDA)
        if precision == "int8":
            raise
        moved = float("nan")
    atomic_write_bytes(out, data)
    fmt = int8_format if precision == "int8" else ""
    return DeployedResult(out, twin, precision, fmt, len(calibration), moved, len(data))
