"""Table of malformed inputs at the library level: recipes, tampered ONNX metadata, flag values, output paths.

Each case must raise BadInput with a single line that names the offending key or flag. (The CLI-level table,
with exit codes, wraps these.)
"""

import dataclasses
from pathlib import Path

import onnx
import pytest

from flexslim.deploy.gate import Measurement, validate
from flexslim.errors import BadInput
from flexslim.recipe import checks
from flexslim.recipe.schema import load_recipe

FAST_TIMING = {"runs": 2, "warmup": 0, "min_seconds": 0.0}
FAST = {"measure": Measurement(**FAST_TIMING)}


def _single_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# -- recipes: (overrides, text the message must contain) ---------------------------------------------------------
RECIPE_CASES = [
    (["data.image_size=0"], "data.image_size"),
    (["data.image_size=-3"], "data.image_size"),
    (["data.image_size=100000"], "data.image_size"),
    (["data.crop_padding=-1"], "data.crop_padding"),
    (["data.cutout=-1"], "data.cutout"),
    (["data.split_seed=-1"], "data.split_seed"),
    (["data.dataset=imagenet"], "data.dataset"),
    (["data.max_pixels=0"], "data.max_pixels"),
    (["data.max_pixels=-100"], "data.max_pixels"),
    (["data.max_pixels=2.5"], "data.max_pixels"),
    (["data.max_pixels=1000000000000"], "data.max_pixels"),  # over the cap (1 G pixels)
    (["model.round_to=-8"], "model.round_to"),
    (["model.min_width=0"], "model.min_width"),
    (["model.stem_width=0"], "model.stem_width"),
    (["model.head_width=-1"], "model.head_width"),
    (["model.drop_path=1.0"], "model.drop_path"),
    (["model.auxiliary_weight=nan"], "model.auxiliary_weight"),
    (["model.family=vgg"], "model.family"),
    (["model.stages=[]"], "model.stages"),
    (["model.stages=[{ width = 8 }]"], "'name'"),
    (['model.stages=[{ name = "a" }]'], "'width'"),
    (['model.stages=[{ name = "a", width = 0 }]'], "model.stages[0].width"),
    (['model.stages=[{ name = "a", width = 8, blocks = 0 }]'], "model.stages[0].blocks"),
    (['model.stages=[{ name = "a", width = 8, stride = 0 }]'], "model.stages[0].stride"),
    (['model.stages=[{ name = "a", width = 8 }, { name = "a", width = 8 }]'], "model.stages[1].name"),
    (["train.epochs=0"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=1000000"], "train.batch_size"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=inf"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.momentum=1.0"], "train.momentum"),
    (["train.weight_decay=-1e-4"], "train.weight_decay"),
    (["train.grad_clip=0"], "train.grad_clip"),
    (["search.epochs=0"], "search.epochs"),
    (["search.batch_size=0"], "search.batch_size"),
    (["search.sigma=0"], "search.sigma"),
    (["search.sigma=-inf"], "search.sigma"),
    (["search.arch_lr=0"], "search.arch_lr"),
    (["search.arch_beta2=1"], "search.arch_beta2"),
    (["search.step=0"], "search.step"),
    (["search.k_sigma=0"], "search.k_sigma"),
    (["search.average_last=0"], "search.average_last"),
    (["search.average_last=1.5"], "search.average_last"),
    (["latency.repeats=0"], "latency.repeats"),
    (["latency.confidence=-1"], "latency.confidence"),
    (["latency.near=-1"], "latency.near"),
    (["search.budget_margin=0.1"], "unknown key 'budget_margin'"),
    (["search.method=darts"], "search.method"),
    (["search.dmask_range=huge"], "search.dmask_range"),
    (["search.dmask_small=[2.0, 1.0]"], "search.dmask_small"),
    (["search.dmask_large=[0.0, 3.0]"], "search.dmask_large"),
    (["search.tau_final=0"], "search.tau_final"),
    (["latency.provider=tpu"], "latency.provider"),
    (["latency.batch=0"], "latency.batch"),
    (["latency.batch=5000"], "latency.batch"),
    (["data.image_size=2048"], "train.batch_size"),  # 64 x 1 x 2048 x 2048 float32 is over the 512 MiB cap
    (["latency.threads=-1"], "latency.threads"),
    (["latency.runs=0"], "latency.runs"),
    (["latency.runs=10000000"], "latency.runs"),
    (["latency.warmup=-1"], "latency.warmup"),
    (["latency.min_seconds=nan"], "latency.min_seconds"),
    (["latency.tolerance=-1"], "latency.tolerance"),
    (["train.init=pretrained"], "train.init"),
    (["latency.tolerance=inf"], "latency.tolerance"),
    (["latency.precision=-1"], "latency.tolerance"),  # a number: the stopping tolerance of a recipe before 2026-12
    (["latency.precision=int4"], "latency.precision"),
    (["latency.int8_format=qdq-s4s4"], "latency.int8_format"),
    (["latency.calibration=0"], "latency.calibration"),
    (["latency.percentile=0"], "latency.percentile"),
    (["latency.percentile=101"], "latency.percentile"),
    (["latency.samples=0"], "latency.samples"),
    (["bench.latency_ms=-1"], "bench.latency_ms"),
    (["bench.latency_ms=inf"], "bench.latency_ms"),
    (['bench.methods=["flexcharts", "nas"]'], "bench.methods[1]"),
]


@pytest.mark.parametrize("overrides, needle", RECIPE_CASES, ids=[c[0][0][:40] for c in RECIPE_CASES])
def test_malformed_recipe_values(overrides, needle):
    with pytest.raises(BadInput) as err:
        load_recipe("quickstart", overrides)
    assert needle in _single_line(err)


@pytest.mark.parametrize(
    "name", ["/../../../../tmp/x", "../up", ".hidden", "a/b", "", "x" * 65, "sp ace", "new\nline", "tab\t"]
)
def test_unsafe_recipe_names(tmp_path, name):
    path = tmp_path / "r.toml"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    path.write_text(f'name = "{escaped}"\n')
    with pytest.raises(BadInput) as err:
        load_recipe(str(path))
    assert "recipe name" in _single_line(err)


def test_a_file_name_with_odd_characters_gives_a_safe_default_name(tmp_path):
    path = tmp_path / "my recipe (v2).toml"
    path.write_text("[train]\nepochs = 2\n")
    assert load_recipe(str(path)).name == "my-recipe--v2-"


# -- tampered metadata ----------------------------------------------------------------------------------------
def _with_metadata(src: Path, dst: Path, **meta: str) -> Path:
    proto = onnx.load(str(src))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"flexslim.{key}", value
    onnx.save(proto, str(dst))
    return dst


METADATA_CASES = [
    ("budget_ms", "inf"),
    ("budget_ms", "nan"),
    ("budget_ms", "-1"),
    ("budget_ms", "0"),
    ("budget_ms", "fast"),
    ("budget_ms", ""),
    ("latency_percentile", "p90"),
    ("latency_percentile", "0"),
    ("latency_percentile", "250"),
    ("latency_percentile", "nan"),
    ("latency_threads", "-1"),
    ("latency_threads", "two"),
    ("latency_threads", "1.5"),
    ("latency_threads", "99999"),
    ("latency_batch", "0"),
    ("latency_batch", "100000"),
    ("latency_batch", "1e9"),
    ("latency_batch", "many"),
    ("dataset", "imagenet"),
]


@pytest.mark.parametrize("key, value", METADATA_CASES)
def test_tampered_metadata_is_bad_input_naming_the_key(tmp_path, make_onnx, key, value):
    model = _with_metadata(make_onnx(), tmp_path / "tampered.onnx", **{key: value})
    with pytest.raises(BadInput) as err:
        validate(model, **FAST)
    msg = _single_line(err)
    assert f"model metadata flexslim.{key}" in msg


def test_metadata_batch_over_the_byte_cap(tmp_path, make_onnx):
    big = make_onnx("big.onnx", inputs=(("x", ["N", 3, 1024, 1024]),))
    model = _with_metadata(big, tmp_path / "big-meta.onnx", latency_batch="1024")  # 12 GiB of input
    with pytest.raises(BadInput) as err:
        validate(model, **FAST)
    assert "flexslim.latency_batch" in _single_line(err) and "MiB" in str(err.value)


def test_fixed_batch_over_the_cap(make_onnx):
    with pytest.raises(BadInput) as err:
        validate(make_onnx("fixed.onnx", inputs=(("x", [100_000, 3, 8, 8]),)), **FAST)
    assert "input batch dimension" in _single_line(err)


def test_metadata_fills_settings_and_the_report_says_so(tmp_path, make_onnx):
    model = _with_metadata(
        make_onnx(),
        tmp_path / "meta.onnx",
        budget_ms="1000.0",
        latency_percentile="95",  # stricter than the default p90: metadata may describe, never loosen
        latency_threads="1",
        latency_batch="3",
    )
    rep = validate(model, **FAST)
    assert rep.from_metadata == {"budget_ms": 1000.0, "percentile": 95.0, "threads": 1, "batch": 3}
    assert rep.to_dict()["from_metadata"] == rep.from_metadata
    assert rep.timing.batch == 3 and rep.timing.percentile == 95.0 and rep.budget_ms == 1000.0
    assert "from the model's metadata" in rep.checks[0].message and "from the model's metadata" in rep.summary()
    rep = validate(model, latency_ms=500.0, measure=Measurement(batch=2, **FAST_TIMING))  # flags win, not listed
    assert rep.from_metadata == {"percentile": 95.0, "threads": 1} and rep.budget_ms == 500.0


# -- flag values -----------------------------------------------------------------------------------------------
FLAG_CASES = [
    ({"latency_ms": float("inf")}, "--latency-ms"),
    ({"latency_ms": float("nan")}, "--latency-ms"),
    ({"latency_ms": -0.5}, "--latency-ms"),
    ({"threads": -1}, "--threads"),
    ({"batch": 0}, "--batch"),
    ({"batch": 10**7}, "--batch"),
    ({"batch": 4096}, "--batch"),  # under the count cap, but 4096 x 3 x 1024 x 1024 floats is 48 GiB
    ({"percentile": 0.0}, "--percentile"),
    ({"percentile": float("nan")}, "--percentile"),
    ({"min_accuracy": -0.1}, "--min-accuracy"),
    ({"min_accuracy": float("nan")}, "--min-accuracy"),
    ({"runs": 0}, "--runs"),
    ({"runs": 10**9}, "--runs"),
    ({"warmup": -1}, "--warmup"),
    ({"warmup": 10**9}, "--warmup"),
    ({"min_seconds": float("inf")}, "--min-seconds"),
    ({"min_seconds": -1.0}, "--min-seconds"),
    ({"tolerance": float("nan")}, "--tolerance"),
    ({"tolerance": -0.01}, "--tolerance"),
    ({"tolerance": 0.9}, "--tolerance"),
    ({"provider": "tpu"}, "--provider"),
    ({"dataset": "emnist"}, "--dataset"),
]


@pytest.mark.parametrize("kw, flag_name", FLAG_CASES, ids=[f"{k}={v}" for (d, _) in FLAG_CASES for k, v in d.items()])
def test_malformed_flag_values(make_onnx, kw, flag_name):
    model = make_onnx("flags.onnx", inputs=(("x", ["N", 3, 1024, 1024]),))
    with pytest.raises(BadInput) as err:
        validate(model, **_split(kw))
    assert _single_line(err).startswith(flag_name)


def _split(kw: dict) -> dict:
    """validate() keyword arguments: the measurement settings of `kw` go into `measure` (with quick timing)."""
    fields = {f.name for f in dataclasses.fields(Measurement)}
    measured = {**FAST_TIMING, **{k: v for k, v in kw.items() if k in fields}}
    return {"measure": Measurement(**measured), **{k: v for k, v in kw.items() if k not in fields}}


# -- output paths ----------------------------------------------------------------------------------------------
def _paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    return {
        "a folder": tmp_path / "a-dir",
        "under a file, deeper": tmp_path / "a-file" / "sub" / "r.json",
        "under a file": tmp_path / "a-file" / "r.json",
        "trailing slash": Path(str(tmp_path / "new") + "/"),
    }


@pytest.mark.parametrize("case", ["a folder", "under a file, deeper", "under a file", "trailing slash"])
@pytest.mark.parametrize("flag_name", ["--report", "--junit"])
def test_bad_output_paths(tmp_path, case, flag_name):
    path = _paths(tmp_path)[case]
    with pytest.raises(BadInput) as err:
        checks.check_output_path(str(path) + ("/" if case == "trailing slash" else ""), flag_name)
    assert _single_line(err).startswith(flag_name)


def test_an_output_path_in_missing_folders_is_accepted_and_they_are_created_on_write(tmp_path):
    path = checks.check_output_path(tmp_path / "new" / "deeper" / "r.json", "--report")
    from flexslim.system.files import atomic_write_text

    atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
