"""The latency cache's key: what decides a given graph's latency on this device, and which graph it is.

The key has two parts:
- the device fingerprint (`fingerprint`): the CPU (model name and instruction-set flags from /proc/cpuinfo, else
  `platform.processor()`; the cores this process may use), for CUDA the GPU (name, compute capability, memory, the
  NVIDIA driver, CUDA and cuDNN versions), onnxruntime's version, the provider that runs, the intra-op threads, the
  batch, the percentile and STATISTIC_VERSION (how a timing is read). Its sha256 (16 hex digits, `fingerprint_id`)
  names the cache's files for this device;
- the network (`graph_key`): the sha256 of the timed ONNX graph with the values of its float tensors (the weights)
  left out, shapes, operators, attributes and integer constants kept. The graph, not the Arch fields that made it:
  onnxruntime times the graph, so any change that alters it (a family's code, the exporter, torch, the opset) is a
  miss by itself, with no version number to remember, and two settings that export the same graph share one
  entry; the cost is one export per look-up (about 0.2 s for the small families), which a hit still saves many
  times over (a measurement is at least `min_seconds` of timed passes plus a fresh session in the helper).

A look-up that skips the export (`network_key`): the network as flexslim describes it (its Arch at the timed
widths: family, stages, stem, head, input shape, classes) together with the code that turns a description into a
graph (the sha256 of every source file of `flexslim.models` and of the family's module, torch's version). An entry
stores both keys; a run with the same description and the same code finds it without exporting. Any change to that
code (an edited family, another torch) changes the network key, and the look-up falls back to exporting and the
graph key - which still finds the entry when the graph itself did not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from pathlib import Path

from flexslim.recipe.schema import LatencyConfig

STATISTIC_VERSION = 1  # bump when what a Timing's figures mean changes (windows, percentile, median of sessions)


def fingerprint(settings: LatencyConfig) -> dict:
    """What decides a given graph's latency on the device that measures it, as a JSON-ready dict (see the module
    notes): the remote timer's device when one is configured (`latency.remote`, asked once per process), else
    this machine's."""
    from flexslim.latency import remote

    timer = remote.configured()
    if timer is not None:
        return remote.device(timer, settings)["fingerprint"]
    from flexslim.latency.model import provider_that_runs

    return local_fingerprint(settings, provider_that_runs(settings.provider))


def measuring_device(settings: LatencyConfig) -> dict:
    """The device that measures at `settings`, as tables and run.json record it: its fingerprint id, where it is
    ("local" or the timer's URL) and a few words on it (CPU or GPU, label)."""
    from flexslim.latency import remote

    fp = fingerprint(settings)
    device = fp.get("gpu") if fp.get("provider") == "cuda" else fp.get("cpu")
    return {
        "id": fingerprint_id(fp),
        "measured_on": remote.where(remote.configured()),
        "device": f"{fp.get('provider')} {device}" + (f" ({fp['label']})" if fp.get("label") else ""),
    }


def local_fingerprint(settings: LatencyConfig, provider: str, label: str = "") -> dict:
    """This machine's fingerprint at `settings`, `provider` being the one that runs ('cpu' | 'cuda'); a timer
    server's `label` (a name its operator gives the device) is part of it when given."""
    fp = {
        "statistic": STATISTIC_VERSION,
        "provider": provider,
        "threads": int(settings.threads),
        "batch": int(settings.batch),
        "percentile": float(settings.percentile),
        **_host(),
    }
    if provider == "cuda":
        fp.update(_gpu())
    if label:
        fp["label"] = label
    return fp


def fingerprint_id(fp: dict) -> str:
    """16 hex digits of the sha256 of a fingerprint: its files' name."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _host() -> dict:
    """The CPU, the cores this process may use, the OS and onnxruntime's version (read once per process)."""
    import onnxruntime as ort

    model, flags = _cpu()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": cores,
        "machine": platform.machine(),
        "system": platform.system(),
        "onnxruntime": ort.__version__,
    }


def _cpu() -> tuple[str, str]:
    """(CPU model, its instruction-set flags, sorted) from the first processor of /proc/cpuinfo (x86: `model name`
    and `flags`; ARM: implementer/part and `Features`), else platform.processor() and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), ""
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # the first processor's block
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    arm = " ".join(
        f"{k} {info[k]}" for k in ("CPU implementer", "CPU architecture", "CPU variant", "CPU part") if k in info
    )
    model = info.get("model name") or arm or platform.processor() or platform.machine()
    flags = info.get("flags") or info.get("Features") or ""
    return model, " ".join(sorted(flags.split()))


@functools.cache
def _gpu() -> dict:
    """The CUDA device onnxruntime uses (device 0): name, compute capability, memory, driver, CUDA and cuDNN."""
    out: dict = {"gpu": "unknown"}
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out = {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "gpu_memory_mb": int(p.total_memory) >> 20}
            out.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
    except Exception:  # noqa: BLE001 - no torch CUDA here: the fingerprint says unknown, never another device's
        pass
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        out["driver"] = next((w for w in first.split() if re.fullmatch(r"\d+\.\d+(\.\d+)?", w)), first.strip())
    except (OSError, IndexError):
        out["driver"] = "unknown"
    return out


def network_key(arch, widths: dict[str, int], precision: str = "") -> str:
    """sha256 (32 hex digits) of the network `arch` at `widths` as flexslim describes it, and of the code that
    exports it (see the module notes); `precision` ("" for fp32, else e.g. "int8:qdq-s8s8", `precision_tag`) names
    the graph it is deployed as."""
    body = {"arch": arch.with_widths(dict(widths)).to_dict(), "code": _code_id(arch.family)}
    if precision:
        body["precision"] = precision
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


@functools.cache
def _code_id(family: str) -> str:
    """sha256 of the source of `flexslim.models` (every .py under it), of `family`'s module, and torch's version."""
    import importlib

    import torch

    from flexslim.recipe.choices import FAMILIES

    models = Path(__file__).resolve().parents[1] / "models"
    files = sorted(models.rglob("*.py"))
    module = importlib.import_module(FAMILIES[family]) if family in FAMILIES else None
    if module is not None and getattr(module, "__file__", None):
        files.append(Path(module.__file__).resolve())
    h = hashlib.sha256(torch.__version__.encode())
    for f in dict.fromkeys(files):
        h.update(str(f.relative_to(models.parent) if f.is_relative_to(models.parent) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights
_QUANTIZED_TYPES = frozenset({2, 3})  # UINT8, INT8: quantized weights and zero points
_QUANTIZED_BIAS = 6  # INT32: a quantized graph's biases (left in a float graph, where int32 may be a shape)


def precision_tag(settings: LatencyConfig) -> str:
    """What the timed graph is converted to: "" (fp32, the exported graph itself), "fp16", or "int8:<format>"."""
    p = settings.precision
    return "" if p == "fp32" else (f"int8:{settings.int8_format}" if p == "int8" else p)


def graph_key(model: bytes) -> str:
    """sha256 (32 hex digits) of an ONNX model with the values of its float tensors (initializers and Constant
    nodes; in a quantized graph its int8, uint8 and int32 weights, zero points and biases too) and every doc string
    left out: the same network with other weights (or other calibration ranges) has the same key, another width,
    operator, attribute, shape constant, precision, quantization format or opset another."""
    import onnx

    proto = onnx.load_model_from_string(model)
    from flexslim.models.precision import graph_precision

    weights = _FLOAT_TYPES | _QUANTIZED_TYPES
    if graph_precision(proto) == "int8":
        weights = weights | {_QUANTIZED_BIAS}
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        node.doc_string = ""
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if t.data_type in weights:
            for name in ("raw_data", "float_data", "double_data", "int32_data"):
                t.ClearField(name)
    proto.doc_string = ""
    proto.graph.doc_string = ""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()[:32]
