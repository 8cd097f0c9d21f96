import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import flexslim
from flexslim.deploy import export as export_mod
from flexslim.deploy.export import PARITY_TOL, export_model, provenance
from flexslim.errors import BadInput, GateFailed
from flexslim.models import onnx_graph
from flexslim.models.arch import Arch


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_output_equals_torch_output(exported, batch):
    """Oracle: the exported graph computes the torch network (dynamic batch: 1 and 5 from one file)."""
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x = torch.rand(batch, *exported.arch.input_shape, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = exported.model(x).numpy()
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert got.shape == (batch, 10)
    assert float(np.abs(got - ref).max()) < 1e-4
    assert float(np.abs(ref).max()) > 1e-2  # not trivially small outputs


def test_export_result(exported):
    r = exported.result
    assert r.path == exported.path and r.path.is_file()
    assert r.size_bytes == exported.path.stat().st_size
    assert 0 <= r.parity_max_abs < PARITY_TOL
    assert r.parity_batches == (1, 5)
    assert r.opset >= 17
    assert [p.name for p in exported.path.parent.iterdir()] == ["tiny.onnx"]  # no temp files left


def test_graph_interface(exported):
    proto = onnx.load(str(exported.path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    assert inp.name == "input" and proto.graph.output[0].name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 16, 16]


def test_metadata_props(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    assert meta == exported.metadata
    assert json.loads(meta["flexslim.widths"]) == {"stage1": 8, "stage2": 16, "stage3": 16}
    assert Arch.from_dict(json.loads(meta["flexslim.arch"])) == exported.arch
    assert meta["flexslim.version"] == flexslim.__version__
    assert meta["flexslim.dataset"] == "quickstart" and meta["flexslim.recipe"] == "quickstart"
    assert meta["flexslim.family"] == "resnet"
    assert json.loads(meta["flexslim.input_shape"]) == [1, 16, 16]
    assert json.loads(meta["flexslim.normalization"]) == {"mean": [0.3], "std": [0.35]}
    assert meta["flexslim.latency_batch"] == "4" and meta["flexslim.latency_provider"] == "cpu"
    assert "flexslim.budget_ms" not in meta


def test_provenance_with_budget(tiny_arch):
    meta = provenance(tiny_arch, "quickstart", budget_ms=0.25, latency={"batch": 32, "percentile": 95.0})
    assert float(meta["flexslim.budget_ms"]) == 0.25
    assert meta["flexslim.latency_batch"] == "32" and float(meta["flexslim.latency_percentile"]) == 95.0
    assert "flexslim.latency_provider" not in meta


def test_non_onnx_output_path_is_bad_input(tmp_path, tiny_arch, tiny_model):
    with pytest.raises(BadInput, match=r"\.onnx"):
        export_model(copy.deepcopy(tiny_model), tiny_arch, tmp_path / "model.pt", {})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def reuse_graph(monkeypatch, exported):
    """Hand back the session fixture's graph instead of re-running the (slow) dynamo export."""
    graph = onnx.load(str(exported.path))
    monkeypatch.setattr(export_mod, "_dynamo_proto", lambda model, sample: copy.deepcopy(graph))


def test_parity_failure_writes_nothing(tmp_path, reuse_graph, tiny_arch, tiny_model, randomize_batchnorm):
    """A graph that does not compute the torch network (other BN statistics) fails parity: GateFailed, no file."""
    other = randomize_batchnorm(copy.deepcopy(tiny_model), seed=7)
    out = tmp_path / "bad.onnx"
    with pytest.raises(GateFailed, match="differs from torch"):
        export_model(other, tiny_arch, out, {"flexslim.recipe": "x"})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_metadata_is_replaced_and_atomic_write(tmp_path, reuse_graph, tiny_arch, tiny_model):
    out = tmp_path / "again.onnx"
    out.write_bytes(b"old")
    r = export_model(copy.deepcopy(tiny_model), tiny_arch, out, {"only": "this"}, parity_batches=(2,))
    assert r.parity_batches == (2,) and r.parity_max_abs < PARITY_TOL
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta == {"only": "this"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.onnx"]


def test_fast_export_computes_the_same_function(tiny_arch, tiny_model):
    """The latency model's fast path: same network, same outputs, dynamic batch."""
    data = onnx_graph.onnx_bytes(copy.deepcopy(tiny_model), tiny_arch.input_shape, fast=True)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.rand(b, *tiny_arch.input_shape)
        with torch.no_grad():
            ref = tiny_model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert float(np.abs(got - ref).max()) < 1e-4


def test_the_export_gate_helper_does_not_import_the_exporter(exported, tmp_path):
    """The export's gate runs in the isolated helper, which imports the module of the function it is handed: the
    gate's own (onnxruntime, onnx, numpy), not the export job's (the exporter and torch: ~1.6 s here). A fresh
    process (imports under the main guard: spawn re-runs the rest), so the helper is a new one. (Its accuracy read
    still imports torch: the data pipeline's tensors.)"""
    script = tmp_path / "gate.py"
    script.write_text(
        "if __name__ == '__main__':\n"
        "    import sys\n"
        f"    sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "    from loaded_modules import loaded\n"
        "    from flexslim.deploy.gate import Measurement\n"
        "    from flexslim.jobs.export import gate_in_fresh_process\n"
        "    from flexslim.latency.isolated import run_isolated\n"
        "    m = Measurement(warmup=1, runs=5, min_seconds=0)\n"
        f"    r = gate_in_fresh_process({str(exported.path)!r}, 1000.0, 'cpu', m)\n"
        "    print(r.passed, run_isolated(loaded, 'torch'), run_isolated(loaded, 'flexslim.deploy.export'))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]
