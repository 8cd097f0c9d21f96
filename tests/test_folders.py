"""Image-folder datasets (folders.py): decoding, class names into Arch and ONNX metadata, the accuracy check of
`validate` on a folder, random-resized-crop, and one clear BadInput (exit 2) per kind of bad folder."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from folder_fixtures import NAMES, write_digits_folder
from PIL import Image
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.data.augment import Augment, random_resized_crop
from flexslim.data.folders import load_eval_folder
from flexslim.data.sources import load_dataset
from flexslim.deploy.export import provenance
from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.recipe.schema import DataConfig, StageSpec

FOLDER = DataConfig(dataset="folder", image_size=32)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"), train_per_class=12, val_per_class=3)


@pytest.fixture
def copy_of(digits, tmp_path):
    def make():
        root = tmp_path / "data"
        shutil.copytree(digits, root)
        return root

    return make


def test_folder_loads_as_uint8_tensors_with_sorted_class_names(digits):
    ds = load_dataset(FOLDER, digits)
    assert ds.name == "folder" and ds.class_names == tuple(sorted(NAMES)) and ds.num_classes == 10
    assert ds.train_x.shape == (120, 3, 32, 32) and ds.test_x.shape == (30, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y).tolist() == [12] * 10 and torch.bincount(ds.test_y).tolist() == [3] * 10
    x = ds.train_x.float() / 255  # normalisation is the training images' own, per channel
    assert torch.allclose(torch.tensor(ds.mean), x.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(torch.tensor(ds.std), x.std((0, 2, 3)), atol=1e-3)
    assert ds.to("cpu").class_names == ds.class_names


def test_given_normalisation_and_resizing(digits):
    ds = load_dataset(dataclasses.replace(FOLDER, image_size=20, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4)), digits)
    assert ds.input_shape == (3, 20, 20) and ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.2, 0.3, 0.4)
    grey = load_dataset(dataclasses.replace(FOLDER, channels=1), digits)
    assert grey.input_shape == (1, 32, 32) and len(grey.mean) == 1


def test_class_names_travel_in_arch_json_and_onnx_metadata():
    arch = Arch("resnet18", (StageSpec("layer1", 8, 1, 1),), (3, 32, 32), 2, "folder", (0.5,) * 3, (0.2,) * 3)
    named = dataclasses.replace(arch, class_names=("cat", "dog"))
    assert Arch.from_dict(named.to_dict()) == named
    old = arch.to_dict()  # arch.json without the field (older files, unnamed classes) reads as before
    assert "class_names" not in old and Arch.from_dict(old).class_names == ()
    with pytest.raises(BadInput, match="class_names"):
        Arch.from_dict({**named.to_dict(), "class_names": ["cat"]})
    assert json.loads(provenance(named, "r")["flexslim.class_names"]) == ["cat", "dog"]
    assert "flexslim.class_names" not in provenance(arch, "r")


def test_eval_folder_labels_follow_the_models_class_names(digits):
    names = tuple(reversed(sorted(NAMES)))  # a model whose class i is another folder
    x, y = load_eval_folder(digits / "val", 16, 3, names)
    _, y_sorted = load_eval_folder(digits, 16, 3)  # a dataset root: its val/; no names: sorted folders
    assert x.shape == (30, 3, 16, 16)
    assert torch.equal(y, 9 - y_sorted)
    with pytest.raises(BadInput, match="not among the model's"):
        load_eval_folder(digits / "val", 16, 3, ("zero", "one"))


def test_random_resized_crop_keeps_shape_range_and_is_seeded():
    x = torch.rand(6, 3, 24, 24)
    a = random_resized_crop(x, 0.08, torch.Generator().manual_seed(0))
    b = random_resized_crop(x, 0.08, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.allclose(a, x)
    aug = Augment(dataclasses.replace(FOLDER, resized_crop=0.5, flip=True, cutout=0))
    assert aug(x).shape == x.shape


# -- bad input -------------------------------------------------------------------------------------------------
def _no_classes(root):
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    return "has no class folders", "train"


def _broken_image(root):
    (root / "train" / "one" / "broken.png").write_bytes(b"not a png at all")
    return "does not decode", "broken.png"


def _class_missing_in_val(root):
    shutil.rmtree(root / "val" / "seven")
    return "seven", "not in"


def _mixed_modes(root):
    path = root / "train" / "two" / "000.png"
    Image.open(path).convert("L").save(path)
    return "mixed greyscale and colour", "data.channels"


def _no_val(root):
    shutil.rmtree(root / "val")
    return "no val/ or test/", "train/<class>"


@pytest.mark.parametrize("spoil", [_no_classes, _broken_image, _class_missing_in_val, _mixed_modes, _no_val])
def test_bad_folders_are_one_line_bad_input(copy_of, tmp_path, monkeypatch, one_line_error, spoil):
    root = copy_of()
    needles = spoil(root)
    with pytest.raises(BadInput) as err:
        load_dataset(FOLDER, root)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "--recipe", "imagenet-resnet18", "--data", str(root), "--device", "cpu"])
    assert res.exit_code == 2
    assert needles[0] in one_line_error(res)


def test_mixed_modes_convert_when_asked(copy_of):
    root = copy_of()
    _mixed_modes(root)
    ds = load_dataset(dataclasses.replace(FOLDER, channels=3), root)
    assert ds.input_shape == (3, 32, 32)


def test_folder_needs_data_dir():
    with pytest.raises(BadInput, match="--data"):
        load_dataset(FOLDER, None)


# -- issue #18.8: only regular files inside the root; a val/ without train/ is refused ----------------------------
def test_links_out_of_the_root_loops_and_fifos_are_not_read(copy_of, tmp_path):
    import os

    from flexslim.data.folders import scan

    root = copy_of()
    cls = root / "train" / NAMES[0]
    outside = tmp_path / "outside.png"
    shutil.copy(next(cls.iterdir()), outside)
    (cls / "out.png").symlink_to(outside)  # out of the root: skipped
    (cls / "loop").symlink_to(cls)  # a folder link (a loop): not followed
    os.mkfifo(cls / "x.jpg")  # would block forever when opened
    before = len(list((root / "train").rglob("*.png")))
    _, samples = scan(root / "train")
    names = {os.path.basename(p) for p, _ in samples}
    assert "x.jpg" not in names and "out.png" not in names
    assert len(samples) == before - 1  # rglob counted out.png


def test_a_root_with_val_but_no_train_is_refused(copy_of):
    root = copy_of()
    shutil.rmtree(root / "train")
    with pytest.raises(BadInput, match="no train/"):
        load_eval_folder(root, 32, 3)


# -- issue #18.8: a pixel cap (data.max_pixels) from the header, and PIL's decompression-bomb check, by name -----
CAP = 32 * 32  # the digits are 32 x 32: exactly at the cap, so only the added image is over it


def _pil_check_off(monkeypatch):
    """PIL's own decompression-bomb check disabled: the cap's own header check must still refuse."""
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda size, **kw: None)


@pytest.mark.parametrize(
    "side, pil",
    [
        (40, "off"),  # 1,600 pixels: the cap's own header check
        (40, "on"),  # PIL's DecompressionBombWarning (over the limit), raised as an error
        (50, "on"),  # 2,500 pixels, over twice the limit: PIL's DecompressionBombError at the header
    ],
)
@pytest.mark.parametrize(
    "settings",
    [{}, {"stream": True, "workers": 0}, {"stream": True, "channels": 3, "workers": 0}],
    ids=["in-memory", "streamed", "streamed-rgb"],
)
def test_an_image_over_the_pixel_cap_is_refused_naming_it(copy_of, monkeypatch, side, pil, settings):
    root = copy_of()
    big = root / "train" / "three" / "big.png"
    Image.new("RGB", (side, side), (200, 10, 10)).save(big)
    if pil == "off":
        _pil_check_off(monkeypatch)
    with pytest.raises(BadInput) as err:
        load_dataset(dataclasses.replace(FOLDER, max_pixels=CAP, **settings), root)
    msg = str(err.value)
    assert "\n" not in msg and str(big) in msg and "data.max_pixels = 1,024" in msg
    assert f"{side * side:,} pixels" in msg and f"set data.max_pixels={side * side} to allow it" in msg
    from PIL import Image as PILImage

    ds = load_dataset(dataclasses.replace(FOLDER, max_pixels=side * side, **settings), root)  # the fix it names
    assert ds.num_train == 121 and PILImage.MAX_IMAGE_PIXELS == side * side  # PIL's check follows the key


def test_a_file_grown_over_the_cap_after_loading_fails_its_batch_in_a_worker(copy_of):
    """A streamed folder decodes in DataLoader workers: a refusal there comes back as the same one line."""
    root = copy_of()
    ds = load_dataset(dataclasses.replace(FOLDER, max_pixels=CAP, stream=True, workers=1), root)
    grown = root / "train" / "five" / "000.png"
    Image.new("RGB", (40, 40)).save(grown)  # after the header pass: the worker's decoding refuses it
    with pytest.raises(BadInput) as err:
        for _ in ds.train_batches(64):
            pass
    msg = str(err.value)
    assert "\n" not in msg and str(grown) in msg and "set data.max_pixels=1600" in msg


def test_validate_folders_have_the_default_cap(copy_of, monkeypatch):
    from flexslim.data import folders

    root = copy_of()
    monkeypatch.setattr(folders, "EVAL_MAX_PIXELS", CAP)
    big = root / "val" / "one" / "big.png"
    Image.new("RGB", (40, 40)).save(big)
    refusal = "over the limit of 1,024 pixels an image may have; shrink or remove it"  # validate has no recipe key
    with pytest.raises(BadInput, match=refusal):
        folders.load_eval_folder(root, 16, 3)
    with pytest.raises(BadInput, match=refusal):
        for _ in folders.eval_folder_batches(root, 16, 3):  # streamed: refused at its batch
            pass
    assert DataConfig().max_pixels == 50_000_000  # the default, documented in recipe/schema.py


def test_cli_refuses_an_image_over_the_cap_exit_2(copy_of, tmp_path, monkeypatch, one_line_error):
    root = copy_of()
    big = root / "val" / "seven" / "big.png"
    Image.new("L", (20, 60)).save(big)  # 1,200 pixels
    monkeypatch.chdir(tmp_path)
    args = ["train", "--recipe", "imagenet-resnet18", "--data", str(root), "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--set", f"data.max_pixels={CAP}"])
    assert res.exit_code == 2, res.output
    line = one_line_error(res)
    assert str(big) in line and "data.max_pixels = 1,024" in line and "set data.max_pixels=1200" in line
    assert not list(tmp_path.rglob("model.pt"))  # refused while loading, before any training
