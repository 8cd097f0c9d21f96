"""torch -> ONNX with the dynamo exporter: dynamic batch axis, full checker, parity with torch, provenance.

Conversion only: the export JOB (a run directory -> ONNX -> gate) is `jobs/export.py`.

The exported graph takes float32 NCHW images in [0, 1]; normalisation is the network's first layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexslim.errors import BadInput, GateFailed
from flexslim.models.arch import Arch, arch_json
from flexslim.models.onnx_graph import _dynamo_proto
from flexslim.system.files import atomic_write_bytes

PARITY_TOL = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote: the file, the parity it reached, the opset and the size."""

    path: Path
    parity_max_abs: float  # largest |onnxruntime - torch| over the parity batches
    parity_batches: tuple[int, ...]
    opset: int
    size_bytes: int


def provenance(
    arch: Arch, recipe_name: str, budget_ms: float | None = None, latency: dict | None = None
) -> dict[str, str]:
    """metadata_props for a flexslim model; `validate` reads the `flexslim.*` keys back."""
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
    return meta


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
