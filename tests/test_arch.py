import json

import pytest

from flexslim.errors import BadInput
from flexslim.models.arch import ARCH_VERSION, Arch, arch_json, load_arch
from flexslim.recipe.schema import StageSpec, load_recipe


def _write(tmp_path, obj, name="arch.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_json_round_trip(tmp_path, tiny_arch):
    path = _write(tmp_path, arch_json(tiny_arch))
    again = load_arch(path)
    assert again == tiny_arch
    assert arch_json(again) == arch_json(tiny_arch)


def test_round_trip_keeps_head_blocks_and_rgb_normalisation(tmp_path):
    arch = Arch(
        "resnet",
        (StageSpec("a", 24, 3, 1), StageSpec("b", 40, 2, 2)),
        (3, 32, 32),
        100,
        "cifar10",
        (0.49, 0.48, 0.45),
        (0.25, 0.24, 0.26),
        stem_width=32,
        head_width=64,
    )
    assert load_arch(_write(tmp_path, arch_json(arch))) == arch


def test_file_content(tiny_arch):
    d = json.loads(arch_json(tiny_arch))
    assert d["version"] == ARCH_VERSION
    assert d["family"] == "resnet"
    assert d["widths"] == {"stage1": 8, "stage2": 16, "stage3": 16}
    assert d["stages"] == [
        {"name": "stage1", "blocks": 1, "stride": 1},
        {"name": "stage2", "blocks": 1, "stride": 2},
        {"name": "stage3", "blocks": 1, "stride": 2},
    ]
    assert d["input_shape"] == [1, 16, 16] and d["num_classes"] == 10 and d["dataset"] == "quickstart"
    assert d["normalization"] == {"mean": [0.3], "std": [0.35]}


def test_from_model_and_with_widths():
    recipe = load_recipe("quickstart")
    arch = Arch.from_model(recipe.model, (1, 16, 16), 10, "quickstart", [0.3], [0.35])
    assert arch.widths == {"stage1": 16, "stage2": 32, "stage3": 64}
    assert arch.input_shape == (1, 16, 16) and arch.stem_width == 16
    narrower = arch.with_widths({"stage2": 24})
    assert narrower.widths == {"stage1": 16, "stage2": 24, "stage3": 64}
    assert arch.widths["stage2"] == 32  # frozen: the original is unchanged
    assert [(s.blocks, s.stride) for s in narrower.stages] == [(s.blocks, s.stride) for s in arch.stages]
    with pytest.raises(BadInput, match="stage9"):
        arch.with_widths({"stage9": 8})


def _valid(tiny_arch):
    return json.loads(arch_json(tiny_arch))


def _drop(d, key):
    d.pop(key)
    return d


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: {**d, "version": 2}, "version"),
        (lambda d: _drop(d, "version"), "version"),
        (lambda d: _drop(d, "num_classes"), "num_classes"),
        (lambda d: _drop(d, "widths"), "widths"),
        (lambda d: _drop(d, "normalization"), "normalization"),
        (lambda d: {**d, "widths": {**d["widths"], "stage2": 0}}, "stage2"),
        (lambda d: {**d, "widths": {**d["widths"], "stage2": -16}}, "stage2"),
        (lambda d: {**d, "widths": {**d["widths"], "stage2": 12.5}}, "stage2"),
        (lambda d: {**d, "widths": {**d["widths"], "stage2": True}}, "stage2"),
        (lambda d: {**d, "widths": {**d["widths"], "stage9": 8}}, "stage9"),
        (lambda d: {**d, "widths": {"stage1": 8, "stage2": 16}}, "stage3"),
        (lambda d: {**d, "family": "vgg"}, "vgg"),
        (lambda d: {**d, "input_shape": [16, 16]}, "input_shape"),
        (lambda d: {**d, "num_classes": 0}, "num_classes"),
        (lambda d: {**d, "normalization": {"mean": [0.1, 0.2], "std": [0.3, 0.3]}}, "normalization"),
        (lambda d: {**d, "normalization": {"mean": [0.1], "std": [0.0]}}, "std"),
        (lambda d: [d], "object"),
        (lambda d: {**d, "head_width": -4}, "head_width"),
        (lambda d: {**d, "head_width": 2.5}, "head_width"),
        (lambda d: {**d, "stem_width": 0}, "stem_width"),
        (lambda d: {**d, "stages": d["stages"] + [d["stages"][0]]}, "twice"),
        (lambda d: {**d, "stages": [{"name": "stage1", "blocks": 1}]}, "stride"),
    ],
)
def test_invalid_arch_is_bad_input(tmp_path, tiny_arch, mutate, needle):
    path = _write(tmp_path, mutate(_valid(tiny_arch)))
    with pytest.raises(BadInput) as e:
        load_arch(path)
    msg = str(e.value)
    assert needle in msg
    assert str(path) in msg  # names the file
    assert "\n" not in msg


def test_bad_json(tmp_path):
    path = _write(tmp_path, '{"version": 1, "family": ')
    with pytest.raises(BadInput, match="not valid JSON"):
        load_arch(path)


def test_binary_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput):
        load_arch(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_arch(tmp_path / "nope.json")
