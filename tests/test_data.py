from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from flexslim.data.augment import Augment
from flexslim.data.sources import load_dataset
from flexslim.data.tensors import Batches, Dataset, as_float, search_split
from flexslim.errors import BadInput
from flexslim.recipe.schema import DataConfig


def _qs(**kw):
    return load_dataset(DataConfig(dataset="quickstart", **kw))


# ---------------------------------------------------------------- quickstart


def test_quickstart_sizes_and_shapes(quickstart):
    ds = quickstart
    assert ds.name == "quickstart" and ds.num_classes == 10
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert (len(ds.train_y), len(ds.test_y)) == (1437, 360)  # 80/20
    assert ds.train_x.shape == (1437, 1, 16, 16) and ds.test_x.shape == (360, 1, 16, 16)
    assert ds.input_shape == (1, 16, 16)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    assert float(ds.train_x.max()) > 0.9  # really uses the [0, 1] range
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    assert ds.mean == pytest.approx((float(ds.train_x.mean()),)) and ds.std == pytest.approx((float(ds.train_x.std()),))


def test_quickstart_split_is_stratified(quickstart):
    train, test = Counter(quickstart.train_y.tolist()), Counter(quickstart.test_y.tolist())
    for c in range(10):
        assert abs(test[c] - 0.2 * (train[c] + test[c])) <= 1, (c, train[c], test[c])


@pytest.mark.parametrize("size", [8, 12, 32])
def test_quickstart_image_size(size):
    ds = _qs(image_size=size)
    assert ds.input_shape == (1, size, size) and ds.test_x.shape[1:] == (1, size, size)


def test_quickstart_at_8px_is_the_raw_digits_partitioned():
    """Oracle: at the native 8x8 the images are sklearn's digits / 16, and train + test is exactly the data set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ds = _qs(image_size=8)
    raw = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0

    def pairs(x, y):
        return Counter((img.numpy().tobytes(), int(label)) for img, label in zip(x, y))

    ours = pairs(ds.train_x, ds.train_y) + pairs(ds.test_x, ds.test_y)
    assert ours == pairs(raw, torch.tensor(digits.target))


def test_quickstart_is_deterministic_and_seeded():
    a, b = _qs(image_size=16), _qs(image_size=16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    c = _qs(image_size=16, split_seed=1)
    assert not torch.equal(a.test_x, c.test_x)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("test_size", [0.2, 0.25, 0.5])
def test_digits_and_their_split_are_scikit_learns_own(seed, test_size):
    """data.digits reads the CSV and splits without importing scikit-learn: the same arrays, the same indices."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from flexslim.data import digits

    assert digits.csv_path() is not None
    images, target = digits.load()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    want = train_test_split(list(range(len(target))), test_size=test_size, random_state=seed, stratify=ref.target)
    assert digits.split(target, test_size, seed) == (list(want[0]), list(want[1]))


def test_loading_the_quickstart_data_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = (
        "import sys; from flexslim.data.sources import load_dataset; from flexslim.recipe.schema import DataConfig; "
        "load_dataset(DataConfig(dataset='quickstart')); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_unknown_dataset():
    with pytest.raises(BadInput, match="quickstart"):
        load_dataset(DataConfig(dataset="emnist"))  # not in the table


# ---------------------------------------------------------------- cifar10 offline


def test_cifar10_data_dir_without_files_names_data_flag(tmp_path):
    with pytest.raises(BadInput) as e:
        load_dataset(DataConfig(dataset="cifar10"), tmp_path)
    assert "--data" in str(e.value) and str(tmp_path) in str(e.value)


def test_cifar10_empty_batches_folder_names_data_flag(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(BadInput) as e:
        load_dataset(DataConfig(dataset="cifar10"), tmp_path / "cifar-10-batches-py")
    assert "--data" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- search split


def _indexed(n=101):
    """A dataset whose image i holds the value i everywhere, so rows can be identified."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n)
    return Dataset("synthetic", x, y, x[:0], y[:0], n, (0.0,), (1.0,))


def test_search_split_disjoint_halves_covering_train():
    ds = _indexed(101)
    (xt, yt), (xs, ys) = search_split(ds, seed=0)
    assert (len(yt), len(ys)) == (50, 51)
    assert set(yt.tolist()).isdisjoint(ys.tolist())
    assert sorted(yt.tolist() + ys.tolist()) == list(range(101))
    # images travel with their labels
    assert torch.equal(xt[:, 0, 0, 0].long(), yt) and torch.equal(xs[:, 0, 0, 0].long(), ys)
    # shuffled, not the first and second half
    assert sorted(yt.tolist()) != list(range(50))


def test_search_split_is_seeded(quickstart):
    (_, a), _ = search_split(quickstart, seed=0)
    (_, b), _ = search_split(quickstart, seed=0)
    (_, c), _ = search_split(quickstart, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- batches


def test_batches_cover_the_data_once_per_epoch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    b = Batches(x, y, 4, shuffle=True, seed=0)
    assert len(b) == 3
    epoch1 = list(b)
    assert [len(yb) for _, yb in epoch1] == [4, 4, 2]
    assert sorted(torch.cat([yb for _, yb in epoch1]).tolist()) == list(range(10))
    for xb, yb in epoch1:
        assert xb.dtype == torch.float32
        assert torch.allclose(xb.view(-1), yb.float() / 255.0)  # uint8 -> [0, 1], still aligned with labels
    epoch2 = torch.cat([yb for _, yb in b])
    assert not torch.equal(torch.cat([yb for _, yb in epoch1]), epoch2)  # reshuffled
    assert len(Batches(x, y, 4, drop_last=True)) == 2
    assert torch.equal(torch.cat([yb for _, yb in Batches(x, y, 4)]), y)  # unshuffled: in order


def test_as_float():
    assert torch.equal(as_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    f = torch.tensor([0.25])
    assert as_float(f) is f


# ---------------------------------------------------------------- augmentation


def _aug(pad=0, flip=False, cutout=0, seed=0):
    return Augment(DataConfig(crop_padding=pad, flip=flip, cutout=cutout), seed=seed)


def _images(n=16, c=3, h=12, w=12, seed=0):
    # distinct positive values everywhere: a shifted window can be recognised, zero padding is distinguishable
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.01


def test_augment_keeps_shape_and_dtype():
    x = _images()
    for aug in (_aug(2, True, 4), _aug(4, True, 16), _aug()):
        y = aug(x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert _aug(2, True, 4)(x.double()).dtype == torch.float64


def test_augment_is_deterministic_for_a_seed():
    x = _images()
    a, b = _aug(2, True, 4, seed=3), _aug(2, True, 4, seed=3)
    first = a(x)
    assert torch.equal(first, b(x))
    assert torch.equal(a(x), b(x))  # the second batches match too
    assert not torch.equal(first, a(x))  # but successive batches are augmented differently
    assert not torch.equal(first, _aug(2, True, 4, seed=4)(x))


def test_no_augmentation_is_identity():
    x = _images()
    assert torch.equal(_aug(0, False, 0)(x), x)


def test_random_crop_is_a_window_of_the_padded_image():
    """Oracle: each output equals padded[i, :, dy:dy+h, dx:dx+w] for exactly one offset in [0, 2p]^2."""
    p, n, h, w = 3, 24, 10, 12
    x = _images(n=n, h=h, w=w)
    y = _aug(pad=p)(x)
    padded = F.pad(x, (p, p, p, p))
    offsets = []
    for i in range(n):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(y[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(hits) == 1, f"image {i}: {hits}"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1 and any(o != (p, p) for o in offsets)  # content is really shifted
    # a shifted image has exactly the padding's zeros where it moved in from outside
    dy, dx = offsets[0]
    zero_rows = max(0, p - dy) + max(0, dy - p)
    zero_cols = max(0, p - dx) + max(0, dx - p)
    assert int((y[0, 0] == 0).sum()) == h * w - (h - zero_rows) * (w - zero_cols)


def test_flip_off_leaves_images_unflipped_and_on_flips_some():
    x = _images(n=32)
    assert torch.equal(_aug(flip=False)(x), x)
    y = _aug(flip=True)(x)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(32)]
    same = [torch.equal(y[i], x[i]) for i in range(32)]
    assert all(f != s for f, s in zip(flipped, same))  # each image is either as-is or mirrored left-right
    assert any(flipped) and any(same)


def test_cutout_zeroes_one_square_of_the_right_size():
    c, n, h, w = 6, 64, 20, 20
    x = torch.ones(n, 3, h, w)
    y = _aug(cutout=c)(x)
    interior = 0
    for i in range(n):
        hole = y[i] == 0
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[0], hole[2])  # same square in every channel
        assert torch.all(y[i][~hole] == 1)  # everything else untouched
        rows = hole[0].any(1).nonzero().view(-1)
        cols = hole[0].any(0).nonzero().view(-1)
        assert len(rows) > 0, "cutout must zero something"
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert int(hole[0].sum()) == (r1 - r0) * (c1 - c0)  # a filled rectangle ...
        assert r1 - r0 <= c and c1 - c0 <= c  # ... no bigger than the square
        if r0 > 0 and r1 < h:
            assert r1 - r0 == c  # not clipped by the border: the full side
        if c0 > 0 and c1 < w:
            assert c1 - c0 == c
        if r0 > 0 and r1 < h and c0 > 0 and c1 < w:
            interior += 1
    assert interior > 0
