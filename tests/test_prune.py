"""The prune-and-fine-tune baseline: channel slicing over Torch-Pruning's dependency groups (an oracle: channels
that carry nothing are the ones removed, and removing them changes nothing), the missing-library error, and the
bench row on a toy family against a known latency (lands in the window, fine-tunes the pruned weights, counts the
wide training as its compute)."""

from __future__ import annotations

import sys

import pytest
import torch
from search_fixtures import hand_latency_model, small_arch
from torch import nn

from flexslim.errors import BadInput

pytest.importorskip("torch_pruning")


def _dead_channels(model: nn.Module, arch, widths: dict[str, int]) -> nn.Module:
    """Zero, in every layer that produces or reads them, the last channels of each stage beyond `widths` (and of
    each block's inner conv): a network in which those channels carry nothing - what pruning them must not change."""
    stages = list(model.stages)
    for i, (spec, stage) in enumerate(zip(arch.stages, stages)):
        keep = widths[spec.name]
        for block in stage:
            for unit in (block.conv1, block.conv2, block.shortcut):
                if unit is None:
                    continue
                conv, bn = unit[0], unit[1]
                with torch.no_grad():
                    conv.weight[keep:] = 0
                    bn.weight[keep:] = 0
                    bn.bias[keep:] = 0
            with torch.no_grad():
                block.conv2[0].weight[:, keep:] = 0  # the inner conv's dead outputs, read by conv2
        readers = (
            [stages[i + 1][0].conv1[0], stages[i + 1][0].shortcut[0]] if i + 1 < len(stages) else [model.classifier]
        )
        readers += [b.conv1[0] for b in list(stage)[1:]]  # later blocks of the stage read it too
        with torch.no_grad():
            for r in readers:
                r.weight[:, keep:] = 0
    return model


def test_pruning_removes_the_channels_that_carry_nothing_and_changes_no_output():
    from flexslim.bench.prune import prune_channels, wide_arch
    from flexslim.models.families import build_network

    arch = small_arch()
    wide = wide_arch(arch, 2.0, 8)
    assert wide.widths == {s: 2 * w for s, w in arch.widths.items()}
    target = {"a": 8, "b": 24, "c": 16}
    torch.manual_seed(0)
    model = _dead_channels(build_network(wide).eval(), wide, target)
    x = torch.rand(5, *arch.input_shape)
    before = model(x)
    pruned = prune_channels(model, wide, target)
    dense = build_network(arch.with_widths(target)).eval()
    dense.load_state_dict(pruned.state_dict())  # the family's own layout at the target widths
    assert torch.allclose(dense(x), before, atol=1e-5)
    with pytest.raises(BadInput, match="prune_start"):
        prune_channels(build_network(arch).eval(), arch, {"a": 16, "b": 16, "c": 24})


def test_without_torch_pruning_the_method_says_how_to_install_it(monkeypatch):
    from flexslim.bench.prune import require_torch_pruning

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if it were not installed
    with pytest.raises(BadInput, match=r"flexslim\[compare\]"):
        require_torch_pruning()


def test_the_prune_row_lands_in_the_window_and_fine_tunes_the_pruned_weights(tmp_path, monkeypatch, quickstart):
    """The row against a known latency (the hand model as the runtime): the uniform ratio and the bake land it in
    [0.90, 1.00] x budget; the fine-tuning starts from the pruned weights (supernet_baked.pt of the run, the wide
    network's trained weights sliced); the wide network's training is its search compute."""
    from flexslim.bench import baselines
    from flexslim.latency.runtime import Timing
    from flexslim.models.arch import Arch
    from flexslim.recipe.choices import BENCH_METHODS
    from flexslim.recipe.schema import load_recipe
    from flexslim.search import bake as bake_mod

    recipe = load_recipe("quickstart", ["train.epochs=1", "model.round_to=8", "latency.bake_seconds=0"])
    arch = Arch.for_data(recipe.model, quickstart)
    table = hand_latency_model(arch, recipe.latency)
    table.save(tmp_path / "t.json")

    def clock(arch, widths, settings):
        ms = float(table.predict(widths))
        s = settings
        return Timing("cpu", s.batch, (s.batch, *arch.input_shape), s.threads, 1, 5, s.percentile, ms, ms, ms, ms,
                      "fake")  # fmt: skip

    monkeypatch.setattr(bake_mod, "measure", clock)
    real_bake = bake_mod.bake
    monkeypatch.setattr(bake_mod, "bake", lambda *a, **k: real_bake(*a, **{**k, "measure": clock}))
    budget_ms = 0.8 * float(table.predict(arch.widths))
    spec = {"latency_table": str(tmp_path / "t.json"), "budget_ms": budget_ms, "retrain": True, "run": "p",
            "out": str(tmp_path), "measure": clock}  # fmt: skip
    row, pruned = baselines.prune_row(spec, BENCH_METHODS["prune"], recipe, quickstart, torch.device("cpu"))
    assert 0.90 * budget_ms <= row["measured_ms"] <= budget_ms
    assert row["wide_widths"] == {s: 2 * w for s, w in arch.widths.items()}
    assert all(pruned.widths[s] < row["wide_widths"][s] for s in arch.widths)
    assert row["train_init"] == "pruned" and 0.0 <= row["acc_retrained"] <= 1.0 and row["acc_wide"] is not None
    saved = torch.load(tmp_path / "p" / "supernet_baked.pt", weights_only=True)
    assert Arch.from_dict(saved["arch"]).widths == pruned.widths and (tmp_path / "p" / "wide" / "model.pt").is_file()
    wide_macs = row["search_gmacs"]
    assert wide_macs > row["train_gmacs"] > 0  # one epoch at 2x the widths costs more than one at the pruned ones
    with pytest.raises(BadInput, match="--retrain"):
        baselines.prune_row({**spec, "retrain": False}, BENCH_METHODS["prune"], recipe, quickstart, None)


def test_the_bench_refuses_prune_without_retraining_or_the_library_before_measuring(cli, tmp_path, monkeypatch):
    from flexslim.cli import app

    out = tmp_path / "b"
    args = ["bench", "--latency-ms", "1", "--out", str(out)]
    res = cli.invoke(app, [*args, "--methods", "uniform,prune", "--no-retrain"])
    assert res.exit_code == 2 and "prune" in res.stderr and "--retrain" in res.stderr, res.output
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    res = cli.invoke(app, [*args, "--methods", "prune", "--retrain"])
    assert res.exit_code == 2 and "flexslim[compare]" in res.stderr, res.output
    assert not out.exists()  # nothing measured, nothing written
