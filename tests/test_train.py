import dataclasses
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from flexslim.data.tensors import Dataset
from flexslim.errors import BadInput
from flexslim.jobs.train import open_train_run, train_arch
from flexslim.models.arch import Arch, arch_json, load_arch
from flexslim.models.families import build_network
from flexslim.recipe.schema import load_recipe, recipe_to_toml, stage_widths
from flexslim.system.console import Reporter
from flexslim.train.checkpoint import load_model, save_model
from flexslim.train.loop import evaluate, fit
from flexslim.train.schedules import cosine_lr, drop_path_at

CPU = torch.device("cpu")


def _arch_for(recipe, ds) -> Arch:
    return Arch.for_data(recipe.model, ds)


def _fresh(arch, seed=0):
    torch.manual_seed(seed)
    return build_network(arch)


def _subset(ds: Dataset, n_train: int, n_test: int) -> Dataset:
    return dataclasses.replace(
        ds,
        train_x=ds.train_x[:n_train],
        train_y=ds.train_y[:n_train],
        test_x=ds.test_x[:n_test],
        test_y=ds.test_y[:n_test],
    )


@pytest.fixture(scope="module")
def trained(tiny_recipe, quickstart):
    """The tiny network trained for 2 epochs on the full quickstart data (shared: training costs seconds)."""
    arch = _arch_for(tiny_recipe, quickstart)
    model = _fresh(arch)
    history = fit(model, quickstart, tiny_recipe, CPU, epochs=2)
    return arch, model.eval(), history


def test_fit_learns(trained, tiny_recipe):
    _, _, history = trained
    assert [m.epoch for m in history] == [1, 2]
    for m in history:
        assert all(math.isfinite(v) for v in (m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.lr, m.seconds))
        assert 0 <= m.train_acc <= 1 and 0 <= m.test_acc <= 1
    assert history[0].lr == tiny_recipe.train.lr  # cosine schedule starts at the recipe's lr ...
    assert history[1].lr < history[0].lr  # ... and anneals
    assert history[1].train_loss < history[0].train_loss < math.log(10) + 0.2
    assert history[1].test_acc > 0.2  # ten classes: chance is 0.1


def test_evaluate_matches_a_direct_computation(trained, quickstart):
    _, model, _ = trained
    x, y = quickstart.test_x[:123], quickstart.test_y[:123]
    loss, acc = evaluate(model, x, y, CPU, batch_size=50)  # uneven last batch
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_model_pt_loads_weights_only_and_rebuilds_the_same_network(tmp_path, trained, tiny_recipe, quickstart):
    arch, model, history = trained
    path = save_model(tmp_path / "model.pt", arch, model, tiny_recipe, history)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"arch", "state_dict", "recipe", "metrics"}
    assert Arch.from_dict(payload["arch"]) == arch
    assert [m["epoch"] for m in payload["metrics"]] == [1, 2]
    assert payload["metrics"][-1]["test_acc"] == history[-1].test_acc
    (tmp_path / "r.toml").write_text(payload["recipe"])
    assert load_recipe(str(tmp_path / "r.toml")) == tiny_recipe

    arch2, model2, _ = load_model(path)
    assert arch2 == arch and not model2.training
    x = quickstart.test_x[:16]
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
    assert model2.state_dict().keys() == model.state_dict().keys()


def test_load_model_bad_files(tmp_path, trained, tiny_recipe):
    with pytest.raises(BadInput, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(BadInput, match="not a flexslim model.pt"):
        load_model(tmp_path / "text.pt")
    arch, model, _history = trained
    torch.save({"arch": arch.to_dict(), "state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(BadInput, match="not a flexslim model.pt"):
        load_model(tmp_path / "partial.pt")
    wrong = arch.with_widths({"stage3": 24})
    torch.save({"arch": wrong.to_dict(), "state_dict": model.state_dict()}, tmp_path / "mismatch.pt")
    with pytest.raises(BadInput):
        load_model(tmp_path / "mismatch.pt")


def test_fit_rejects_zero_epochs(tiny_recipe, quickstart):
    arch = _arch_for(tiny_recipe, quickstart)
    with pytest.raises(BadInput, match="epochs"):
        fit(build_network(arch), quickstart, tiny_recipe, CPU, epochs=0)


def test_cosine_schedule_reaches_zero():
    """The per-step schedule fit sets (schedules.cosine_lr, shared with the search): base -> 0 over the run."""
    lrs = [cosine_lr(0.1, step, 10) for step in range(10)]
    assert lrs[0] == 0.1 and lrs[5] == pytest.approx(0.05) and cosine_lr(0.1, 10, 10) == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_drop_path_ramps_linearly_from_zero():
    assert drop_path_at(0.2, 0, 10) == 0.0 and drop_path_at(0.2, 5, 10) == pytest.approx(0.1)
    assert drop_path_at(0.2, 3, 0) == pytest.approx(0.6)  # no division by zero


def test_train_arch_writes_model_pt(tmp_path, tiny_recipe, quickstart):
    ds = _subset(quickstart, 200, 60)
    arch = _arch_for(tiny_recipe, ds)
    history = train_arch(arch, tiny_recipe, tmp_path, ds, CPU, epochs=1)
    assert len(history) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # the resume checkpoint is removed
    arch2, model, payload = load_model(tmp_path / "model.pt")
    assert arch2 == arch and payload["metrics"][0]["test_acc"] == history[0].test_acc
    _, acc = evaluate(model, ds.test_x, ds.test_y, CPU)
    assert acc == pytest.approx(history[0].test_acc)  # model.pt holds the weights the metrics were measured on


class Interrupt(Reporter):
    """Raises KeyboardInterrupt on the n-th training step, as Ctrl-C would."""

    def __init__(self, after_steps: int):
        self.left = after_steps
        self.lines: list[str] = []

    def advance(self, info: str = "") -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt

    def log(self, line: str) -> None:
        self.lines.append(line)


def _resume_case(tmp_path, recipe, ds):
    """(uninterrupted 2-epoch run, run interrupted in epoch 2 then resumed); both from the same initial weights."""
    arch = _arch_for(recipe, ds)
    steps = len(ds.train_y) // recipe.train.batch_size
    ref_model = _fresh(arch)
    ref = fit(ref_model, ds, recipe, CPU, epochs=2)

    ckpt = tmp_path / "train_state.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(_fresh(arch), ds, recipe, CPU, epochs=2, reporter=Interrupt(steps + 2), checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1]  # the finished epoch is kept

    log = Interrupt(10**9)
    model = _fresh(arch, seed=123)  # the checkpoint's weights must replace these
    resumed = fit(model, ds, recipe, CPU, epochs=2, reporter=log, checkpoint=ckpt)
    assert any("resuming training at epoch 2/2" in line for line in log.lines)
    assert [m.epoch for m in resumed] == [1, 2]
    assert dataclasses.asdict(resumed[0]) == state["history"][0]
    assert resumed[0].test_acc == ref[0].test_acc and resumed[0].train_loss == ref[0].train_loss
    return ref_model, ref, model, resumed


def test_resume_continues_at_the_right_epoch(tmp_path, no_aug_recipe, quickstart):
    """Without augmentation (no randomness beyond the data order) the resumed run equals an uninterrupted one."""
    recipe = dataclasses.replace(no_aug_recipe, train=dataclasses.replace(no_aug_recipe.train, batch_size=32))
    ref_model, ref, model, resumed = _resume_case(tmp_path, recipe, _subset(quickstart, 160, 40))
    assert resumed[1].lr == ref[1].lr  # same point on the schedule
    assert resumed[1].train_loss == pytest.approx(ref[1].train_loss, rel=1e-5)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_resume_with_augmentation_equals_uninterrupted(tmp_path, tiny_recipe, quickstart):
    recipe = dataclasses.replace(tiny_recipe, train=dataclasses.replace(tiny_recipe.train, batch_size=32))
    _ref_model, ref, _model, resumed = _resume_case(tmp_path, recipe, _subset(quickstart, 160, 40))
    assert resumed[1].train_loss == pytest.approx(ref[1].train_loss, rel=1e-5)


# ---------------------------------------------------------------- where `flexslim train` writes


def test_open_train_run_new_run_from_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = open_train_run(None, "quickstart", ["train.epochs=1"], None)
    assert run.run_dir.parent.resolve() == (tmp_path / "runs").resolve()
    assert (tmp_path / "runs" / "latest").resolve() == run.run_dir.resolve()
    assert run.arch.widths == stage_widths(load_recipe("quickstart").model)
    assert load_arch(run.run_dir / "arch.json") == run.arch
    assert run.recipe.train.epochs == 1
    assert (run.run_dir / "recipe.toml").read_text() == recipe_to_toml(run.recipe)
    size = run.recipe.data.image_size
    assert run.arch.mean == run.dataset.mean and run.arch.input_shape == (1, size, size)


def test_open_train_run_from_arch_json_and_run_dir(tmp_path, monkeypatch, tiny_arch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "my_arch.json"
    src.write_text(arch_json(tiny_arch))
    run = open_train_run(src, None, [], None)
    assert run.arch == tiny_arch and load_arch(run.run_dir / "arch.json") == tiny_arch
    # a run directory: its own arch and recipe (with the overrides applied on top)
    again = open_train_run(run.run_dir, None, ["train.epochs=2"], None)
    assert again.run_dir == run.run_dir and again.arch == tiny_arch and again.recipe.train.epochs == 2
    assert len(os.listdir(tmp_path / "runs")) == 2  # the run and `latest`: no new run directory


def test_open_train_run_errors(tmp_path, monkeypatch, tiny_arch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="neither a run directory nor an arch.json"):
        open_train_run(tmp_path / "nothing.json", None, [], None)
    cifar_shaped = dataclasses.replace(
        tiny_arch, input_shape=(3, 32, 32), dataset="cifar10", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    (tmp_path / "cifar.json").write_text(arch_json(cifar_shaped))
    with pytest.raises(BadInput, match="--recipe"):
        open_train_run(tmp_path / "cifar.json", "quickstart", [], None)
    assert not (tmp_path / "runs").exists()  # nothing created for a refused run


@pytest.mark.gpu
def test_fit_on_cuda(tiny_recipe, quickstart):
    ds = _subset(quickstart, 256, 64)
    model = _fresh(_arch_for(tiny_recipe, ds))
    history = fit(model, ds.to("cuda"), tiny_recipe, torch.device("cuda"), epochs=1)
    assert math.isfinite(history[0].train_loss)
    assert next(model.parameters()).is_cuda


# ---------------------------------------------------------------- resume identity and CPU kernels (issue 9)
def test_a_checkpoint_of_another_schedule_or_recipe_is_refused_naming_it(tmp_path, no_aug_recipe, quickstart):
    recipe = dataclasses.replace(no_aug_recipe, train=dataclasses.replace(no_aug_recipe.train, batch_size=32))
    ds, arch = _subset(quickstart, 64, 16), _arch_for(recipe, _subset(quickstart, 64, 16))
    ckpt = tmp_path / "train_state.pt"
    fit(_fresh(arch), ds, recipe, CPU, epochs=1, checkpoint=ckpt)
    with pytest.raises(BadInput, match="not 2") as err:
        fit(_fresh(arch), ds, recipe, CPU, epochs=2, checkpoint=ckpt)
    assert str(ckpt) in str(err.value)
    other = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, lr=recipe.train.lr * 2))
    with pytest.raises(BadInput, match="another recipe"):
        fit(_fresh(arch), ds, other, CPU, epochs=1, checkpoint=ckpt)
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(BadInput, match="train_state.pt"):
        fit(_fresh(arch), ds, recipe, CPU, epochs=1, checkpoint=ckpt)


def test_fit_trains_inside_cpu_training_kernels_once_per_epoch(monkeypatch, no_aug_recipe, quickstart):
    import contextlib

    import flexslim.train.loop as train_mod

    calls = []

    @contextlib.contextmanager
    def spy(device, widths):
        calls.append(sorted(set(widths)))
        yield False

    monkeypatch.setattr(train_mod, "cpu_training_kernels", spy)
    recipe = dataclasses.replace(no_aug_recipe, train=dataclasses.replace(no_aug_recipe.train, batch_size=32))
    ds = _subset(quickstart, 64, 16)
    fit(_fresh(_arch_for(recipe, ds)), ds, recipe, CPU, epochs=2)
    assert len(calls) == 2 and min(calls[0]) == 8  # every conv's channels, the tiny net's stem (8) among them


def test_recalibrated_recomputes_batchnorm_statistics_on_a_copy():
    from flexslim.data.tensors import Batches
    from flexslim.train.loop import recalibrate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    net[1].running_mean.fill_(7.0)  # stale statistics
    x = torch.rand(40, 1, 8, 8)
    model = recalibrate(net, Batches(x, torch.zeros(40, dtype=torch.int64), 10), torch.device("cpu"))
    with torch.no_grad():
        out = net[0](x)
    assert torch.allclose(model[1].running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)  # the mean over ALL batches
    assert model is net and not model.training and net[1].momentum == 0.1  # in place; momentum restored
