"""Shared fixtures: a tiny quickstart-shaped network, one exported ONNX model (the dynamo export takes
seconds, so it is made once per session), a torchvision model exported by plain `torch.onnx.export`,
hand-built ONNX graphs for the bad-input paths, and the quickstart dataset."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from search_fixtures import randomize_batchnorm as _randomize_batchnorm

from flexslim.models.arch import Arch
from flexslim.recipe.schema import StageSpec

TINY_STAGES = (StageSpec("stage1", 8, 1, 1), StageSpec("stage2", 16, 1, 2), StageSpec("stage3", 16, 1, 2))
TINY_STAGE_TOML = (
    '[{ name = "stage1", width = 8, blocks = 1, stride = 1 }, '
    '{ name = "stage2", width = 16, blocks = 1, stride = 2 }, '
    '{ name = "stage3", width = 16, blocks = 1, stride = 2 }]'
)
# --set overrides that turn the quickstart recipe into the tiny network below
TINY_OVERRIDES = ("model.stem_width=8", f"model.stages={TINY_STAGE_TOML}")
LATENCY_META = {"provider": "cpu", "batch": 4, "threads": 1, "percentile": 90.0}


# One intra-op thread for torch: the tests' tensors are small, so extra threads buy little, while on a
# shared 2-core box (CI runners, a second job) oversubscribed threads made training 3-4x slower. It also
# makes float reductions, and so the training assertions, bit-reproducible. FLEXSLIM_TEST_TORCH_THREADS=0
# keeps torch's default.
_threads = int(os.environ.get("FLEXSLIM_TEST_TORCH_THREADS", "1"))
if _threads > 0:
    torch.set_num_threads(_threads)

# oneDNN (torch 2.14.1, CPU) can hang in the backward pass of 1x1 convs with 4 channels, which the small
# test networks use (min_width 4); the native kernels are slower but never hang. Set
# FLEXSLIM_TEST_ONEDNN=1 to test with oneDNN.
if os.environ.get("FLEXSLIM_TEST_ONEDNN") != "1":
    torch.backends.mkldnn.enabled = False


# -- the user's cache folder: never the real one, and never shared between tests -----------------------------------
# $FLEXSLIM_CACHE holds the latency cache (and downloads): a test that expects to time a network must not be served
# another test's timing of it. Set in the environment, so the flexslim processes a test starts inherit it. Three
# layers: the session's (for session fixtures), each module's (module fixtures that profile), each test's own.
@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXSLIM_CACHE", str(tmp_path_factory.mktemp("cache-session")))
        mp.delenv("FLEXSLIM_NO_CACHE", raising=False)
        # measure here unless a test asks for a timer
        for name in ("FLEXSLIM_TIMER", "FLEXSLIM_TIMER_TOKEN_FILE", "FLEXSLIM_TIMER_TOKEN"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory, _session_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXSLIM_CACHE", str(tmp_path_factory.mktemp("cache-module")))
        yield


@pytest.fixture(autouse=True)
def flexslim_cache(tmp_path_factory, monkeypatch, _module_cache) -> Path:
    """This test's own $FLEXSLIM_CACHE folder (empty; the latency cache writes into `latency/` under it)."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FLEXSLIM_CACHE", str(path))
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def randomize_batchnorm():
    """The function that gives a network random BN statistics and affine parameters (in place)."""
    return _randomize_batchnorm


@pytest.fixture(scope="session")
def tiny_arch() -> Arch:
    """Quickstart-shaped (1x16x16 digits, 10 classes) resnet: stem 8, widths 8/16/16."""
    return Arch(
        family="resnet",
        stages=TINY_STAGES,
        input_shape=(1, 16, 16),
        num_classes=10,
        dataset="quickstart",
        mean=(0.3,),
        std=(0.35,),
        stem_width=8,
        head_width=0,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_arch):
    """Eval-mode tiny network with random weights and BN statistics. Do not mutate: deepcopy it."""
    from flexslim.models.families import build_network

    torch.manual_seed(0)
    return _randomize_batchnorm(build_network(tiny_arch)).eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_arch, tiny_model):
    """The tiny network exported once with flexslim's exporter (dynamo, dynamic batch, provenance)."""
    from flexslim.deploy.export import export_model, provenance

    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    meta = provenance(tiny_arch, "quickstart", budget_ms=None, latency=LATENCY_META)
    result = export_model(copy.deepcopy(tiny_model), tiny_arch, out, meta, parity_batches=(1, 5))
    return SimpleNamespace(path=out, result=result, arch=tiny_arch, model=tiny_model, metadata=meta)


@pytest.fixture
def tiny_run(tmp_path, monkeypatch, tiny_arch, tiny_model, exported):
    """Factory: make(latency, recipe_overrides=None) -> a run folder (tmp_path/run, the working directory is tmp_path)
    holding the tiny model.pt, a run.json of budget 1000 ms with `latency`, and, when `recipe_overrides` is a list,
    the quickstart recipe.toml with them. Conversions reuse the session's graph of the same network instead of the
    slow dynamo export (the parity check still runs)."""
    import json

    import onnx

    from flexslim.deploy import export as export_mod
    from flexslim.recipe.schema import load_recipe, recipe_to_toml
    from flexslim.train.checkpoint import save_model

    graph = onnx.load(str(exported.path))
    monkeypatch.setattr(export_mod, "_dynamo_proto", lambda model, sample: copy.deepcopy(graph))
    monkeypatch.chdir(tmp_path)

    def make(latency: dict, recipe_overrides: list[str] | None = None) -> Path:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        save_model(run / "model.pt", tiny_arch, copy.deepcopy(tiny_model), load_recipe("quickstart"), {})
        (run / "run.json").write_text(json.dumps({"budget_ms": 1000.0, "latency": latency}))
        if recipe_overrides is not None:
            (run / "recipe.toml").write_text(recipe_to_toml(load_recipe("quickstart", recipe_overrides)))
        return run

    return make


@pytest.fixture(scope="session")
def torchvision_onnx(tmp_path_factory) -> Path:
    """A user's classifier: torchvision resnet18 (random weights, 10 classes) exported by plain
    `torch.onnx.export` at 1x3x32x32 (a fixed batch of 1), no flexslim metadata."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    out = tmp_path_factory.mktemp("torchvision") / "resnet18.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(out))
    return out


@pytest.fixture
def make_onnx(tmp_path):
    """Factory: a one-node ONNX graph (Relu per input, or Identity) with the given input shapes and type."""
    import onnx
    from onnx import TensorProto, helper

    def make(name: str = "g.onnx", inputs=(("x", ["N", 3, 8, 8]),), elem_type=TensorProto.FLOAT) -> Path:
        ins = [helper.make_tensor_value_info(n, elem_type, shape) for n, shape in inputs]
        outs = [helper.make_tensor_value_info(f"{n}_out", elem_type, shape) for n, shape in inputs]
        nodes = [
            helper.make_node("Relu" if elem_type == TensorProto.FLOAT else "Identity", [n], [f"{n}_out"])
            for n, _ in inputs
        ]
        model = helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return make


@pytest.fixture(scope="session")
def quickstart():
    """The quickstart dataset at 16x16, as the shipped recipe loads it."""
    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import DataConfig

    return load_dataset(DataConfig(dataset="quickstart", image_size=16, crop_padding=2, flip=False, cutout=0))


@pytest.fixture(scope="session")
def tiny_recipe():
    """The quickstart recipe shrunk to the tiny network (stages set through --set)."""
    from flexslim.recipe.schema import load_recipe

    return load_recipe("quickstart", TINY_OVERRIDES)


@pytest.fixture
def no_aug_recipe(tiny_recipe):
    """tiny_recipe without augmentation (bit-reproducible training on the CPU)."""
    data = dataclasses.replace(tiny_recipe.data, crop_padding=0, flip=False, cutout=0)
    return dataclasses.replace(tiny_recipe, data=data)


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    return CliRunner()


def _one_line_error(result) -> str:
    text = result.stderr.strip()
    assert text, f"no message on stderr (stdout: {result.stdout!r})"
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert len(text.splitlines()) == 1, f"expected one line on stderr, got:\n{text}"
    return text


@pytest.fixture
def one_line_error():
    """Checker: a CLI result's stderr is a single error line without a traceback; returns that line."""
    return _one_line_error
