"""Recipes: TOML files mapped onto frozen dataclasses with canonical (paper) defaults.

A recipe is named (`quickstart` -> `recipes/quickstart.toml`, shipped inside the package) or a path.
`--set section.key=value` overrides one value; the value is read as TOML (`3`, `0.1`, `true`, `[1, 2]`)
and taken as a plain string when it is not valid TOML. Unknown sections or keys and wrong types are
`BadInput` errors that list the valid names.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput

RECIPE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # used in run-directory names: no '/', no '..'


@dataclass(frozen=True)
class StageSpec:
    """One stage of a family: `blocks` layers (cells) sharing one `width`, the first with `stride`."""

    name: str
    width: int
    blocks: int = 1
    stride: int = 1


@dataclass(frozen=True)
class DataConfig:
    """[data]: which dataset, its size and split, augmentation, streaming (see the key comments)."""

    dataset: str = "cifar10"  # cifar10 | quickstart | fashion-mnist | mnist | kmnist | folder (--data DIR with
    # train/ and val/ of class folders) | synthetic; the table is recipe.choices.DATASETS
    image_size: int = 32  # pixels; quickstart's 8x8 digits are resized to this, CIFAR-10 is 32 already
    crop_padding: int = 4  # pixels of zero padding for the random crop; 0 disables it
    flip: bool = True  # random horizontal flip (off for digits: a mirrored 3 is not a 3)
    cutout: int = 16  # side of the cutout square in pixels; 0 disables it
    split_seed: int = 0  # seeds the D_t/D_s split (and quickstart's train/test split)
    resized_crop: float = 0.0  # ImageNet-style random-resized-crop, smallest area fraction (0.08); 0 = pad-crop
    channels: int = 0  # folder: 0 = as the images are (all grey: 1, all colour: 3, mixed: refused); 1 or 3 converts
    mean: tuple[float, ...] = ()  # folder: per-channel normalisation; empty = computed from the training images
    std: tuple[float, ...] = ()
    max_in_memory_mb: int = 4096  # folder: decoded train + test images above this size stream from disk (folders.py)
    stream: bool = False  # folder: stream from disk through DataLoader workers even when the set fits in memory
    workers: int = -1  # folder, streaming: DataLoader worker processes per batch stream; -1 = min(4, CPU cores)
    max_pixels: int = 50_000_000  # folder: most pixels (width x height, read from the header) an image may have;
    # a larger one is refused naming it (decompression bombs: a small file that decodes to gigabytes). 50 M is a
    # 50-megapixel photo (8160 x 6120), 150 MB decoded as RGB in each worker; PIL's own bomb check follows this key
    train_subset: int = 0  # training images per class (class-balanced, drawn by split_seed) of an in-memory
    # dataset; 0 = all of them. A class with fewer keeps all of its images; the test set is never cut


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the family, its stem and stages, the width grid and floor, drop-path, auxiliary head."""

    family: str = "resnet"  # resnet | darts | resnet18 | resnet50 | mobilenet_v2
    stem_width: int = 16  # fixed, not searched
    head_width: int = 0  # 1x1 conv before pooling (0 = none); fixed, not searched
    stages: tuple[StageSpec, ...] = (
        StageSpec("stage1", 32, 2, 1),
        StageSpec("stage2", 64, 2, 2),
        StageSpec("stage3", 128, 2, 2),
    )
    min_width: int = 8  # no searched stage goes below this many channels
    round_to: int = 0  # final widths are multiples of this; 0 = the runtime's channel block found by the latency
    # probe (at least 8): a width between two blocks costs what the next block costs
    drop_path: float = 0.0  # DARTS family: drop-path probability at the end of training
    auxiliary_weight: float = 0.0  # DARTS family: auxiliary head loss weight in retraining (paper 0.4)
    pretrained: str = ""  # state_dict at the family's torchvision widths: the supernet and the retrained net start from
    # it (overlapping channels copied, a classifier of another class count skipped); "" = random init


@dataclass(frozen=True)
class TrainConfig:
    """[train]: retraining the dense network (SGD, cosine lr, epochs, batch, seed)."""

    epochs: int = 100
    batch_size: int = 96
    lr: float = 0.025  # cosine-annealed per step down to 0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0  # max global gradient norm
    seed: int = 0
    init: str = "auto"  # searched: fine-tune the run's supernet_baked.pt (the searched weights at the baked widths,
    # BatchNorm recalibrated) with this schedule; scratch: a seeded init; auto: searched where the run has them
    # (Fashion-MNIST, 3 seeds: +2.5 points at equal retrain epochs, the same accuracy in half of them)


@dataclass(frozen=True)
class SearchConfig:
    """[search]: Algorithm 1 (weights SGD, mu Adam, sigma, allocation, the budget controller, epochs)."""

    method: str = "flexcharts"  # flexcharts | dmask
    epochs: int = 50
    batch_size: int = 96
    lr: float = 0.025  # weights: SGD, same settings as TrainConfig
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 0.1  # Adam on mu; mu is in CHANNELS, so Adam moves mu by about arch_lr channels per step
    relative_arch_lr: bool = False  # each stage's mu moves by arch_lr x (its width / the widest stage's) per step:
    # the same fraction of its width in every stage, instead of the same number of channels
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    sigma: float = 8.0  # Gaussian width in channels
    step: int = 1  # grid step of the candidate widths f_k, in channels
    k_sigma: float = 3.0  # allocate ceil(mu + k_sigma * sigma) channels per stage
    hysteresis: float = 0.5  # shrink only when the allocation exceeds its target by more than this many sigmas
    dual_lr: float = 0.5  # budget controller: multiplier += dual_lr * (E[lat] / target - 1) per arch step
    init_multiplier: float = 0.0
    clamp_multiplier: bool = False  # keep the multiplier >= 0 (E[lat] <= limit as an inequality: under the budget
    # cross-entropy alone moves mu) instead of steering E[lat] to the limit from both sides
    warmup: float = 0.25  # the first warmup x epochs (rounded down; at least 1 of 2 or more) train the weights only:
    # mu, the logits and the budget controller start once cross-entropy can defend a width (FBNetV2's warm-up; 0: arch
    # steps from the start)
    average_last: float = 0.3  # mu handed to the bake = its mean over this last fraction of the search's steps
    trim: bool = True  # the measured bake: trim until the network measures within the budget, then grow stages
    # back while they fit (off: the rounded widths are only measured)
    bake_rank: str = "supernet"  # inside the latency window the bake keeps the network the searched supernet scores
    # best on D_s (supernet), or the one using most latency (latency: the bake of before 2026-12)
    # DMaskingNAS baseline (method = "dmask"): fixed option ranges, as multiples of the recipe's widths
    dmask_range: str = "large"  # small | large
    dmask_small: tuple[float, float] = (0.75, 1.5)
    dmask_large: tuple[float, float] = (0.25, 3.0)
    dmask_step: int = 4  # channels between options
    dmask_lr: float = 0.1  # Adam on the option logits
    tau0: float = 5.0  # Gumbel-softmax temperature at the first epoch
    tau_final: float = 0.09  # Gumbel temperature at the last search epoch, whatever the epoch count (FBNet's
    # 5.0 x 0.956^89 after its 90 epochs); geometric from tau0 in between
    seed: int = 0


@dataclass(frozen=True)
class LatencyConfig:
    """[latency]: how the deployment runtime is measured (provider, batch, threads, percentile, sessions)."""

    provider: str = "auto"  # auto | cpu | cuda (onnxruntime execution provider)
    batch: int = 32  # latency is per sample: time of one batch / batch
    threads: int = 0  # intra-op threads of onnxruntime; 0 = the runtime's default
    warmup: int = 10  # untimed runs before timing
    runs: int = 50  # at least this many timed runs; the gate reads a percentile of them
    min_seconds: float = 1.0  # ... and this long (seconds) of timed runs per network, split among the repeats ...
    tolerance: float = 0.02  # ... unless a session knows its percentile within +-2% sooner (95%; 0: always in full)
    percentile: float = 90.0
    samples: int = 16  # networks measured across the width box to fit the latency model
    holdout: int = 4  # further networks, measured only to report the model's error (without a budget)
    repeats: int = 3  # fresh sessions per measured network (min_seconds split among them); a point is their median
    probe: bool = True  # find the runtime's channel block first (a sweep of one width shared by every stage)
    near: int = 4  # fit networks measured near each budget (predicted within 12%), plus one held out
    confidence: float = 2.0  # the measured network must sit this many timing spreads under the budget
    bake_seconds: float = 2.0  # timed seconds per bake session at most (the gate's --min-seconds) ...
    bake_tolerance: float = 0.01  # ... unless its percentile is known within +-1% sooner (95%; 0: always in full)
    timeout: float = 600.0  # seconds one measurement may take; past it the timing helper is stopped (exit 1)
    precision: str = "fp32"  # what is deployed and timed: fp32 | int8 (onnxruntime static quantization) | fp16 (CUDA)
    int8_format: str = "auto"  # int8: qoperator-u8s8 | qdq-s8s8 | qdq-u8s8, or auto (the fastest here, by measurement)
    calibration: int = 256  # int8: training images (D_t) the deployed graph's activation ranges are calibrated on


@dataclass(frozen=True)
class BenchConfig:
    """[bench]: what `flexslim bench` compares by default (methods, budget, retrain)."""

    latency_ms: float = 0.0  # the budget every method searches for (0 = pass --latency-ms)
    methods: tuple[str, ...] = ("flexcharts", "dmask-small", "dmask-large", "uniform")
    retrain: bool = False  # also retrain each result and report test accuracy
    random_seconds: float = 60.0  # random search's time when no FlexCHarts run precedes it (else FlexCHarts' own)
    ceiling_networks: int = 10  # `ceiling`: random networks inside the window, each measured and retrained
    prune_start: float = 2.0  # `prune`: the family trained at this many times the recipe's widths, then pruned


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel runs under torchrun (see distributed.py); a single process ignores it."""

    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm); off: each rank's own shard


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: its name and the six sections, frozen (written back resolved into every run)."""

    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


SECTIONS = ("data", "model", "train", "search", "latency", "bench", "distributed")


def recipe_dir() -> Path:
    """Folder of the shipped recipes: the source tree's `recipes/`, or its copy inside an installed wheel."""
    source_tree = Path(__file__).resolve().parent.parent / "recipes"
    if source_tree.is_dir():  # a checkout or an editable install (also when the checkout shadows it on sys.path)
        return source_tree
    return Path(str(resources.files("flexslim.recipes")))


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped with flexslim (recipes/*.toml)."""
    return sorted(p.stem for p in recipe_dir().glob("*.toml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """The .toml file a recipe name or path refers to; BadInput naming the shipped ones otherwise."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise BadInput(f"recipe file {path} does not exist")
        return path
    shipped = recipe_dir() / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    raise BadInput(
        f"unknown recipe '{name_or_path}'; shipped recipes: {', '.join(shipped_recipes())} (or a .toml path)"
    )


def load_recipe(name_or_path: str = "quickstart", overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe by name or path and apply `section.key=value` overrides."""
    path = resolve_recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"recipe {path} is not valid TOML: {err}") from None
    raw.setdefault("name", safe_name(path.stem))
    for item in overrides:
        _apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe from parsed TOML and check every value (BadInput naming the key and the fix). A number in
    `latency.precision` is the timing's stopping tolerance of a recipe written before 2026-12 (now
    `latency.tolerance`; `latency.precision` names fp32 | int8 | fp16): read as that."""
    lat = raw.get("latency")
    if isinstance(lat, dict) and isinstance(lat.get("precision"), (int, float)) and not isinstance(lat["precision"], bool):
        raw = {**raw, "latency": {("tolerance" if k == "precision" else k): v for k, v in lat.items()}}
    try:
        recipe = _build(Recipe, raw, "")
    except BadInput as err:
        raise BadInput(f"recipe {source}: {err}" if source != "recipe" else f"recipe: {err}") from None
    from flexslim.recipe.rules import check_recipe  # the checks read this module's dataclasses

    check_recipe(recipe, None if source == "recipe" else source)
    return recipe


def safe_name(stem: str) -> str:
    """A recipe name made from a file name: characters outside [A-Za-z0-9._-] become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".")[:64]
    return name or "recipe"


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise BadInput(f"--set expects section.key=value, got '{item}' (sections: {', '.join(SECTIONS)})")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    section, name = parts
    if section not in SECTIONS:
        raise BadInput(f"--set {item}: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})[name] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    """`cls` from a TOML table; `where` is the key path ('' at the top) that error messages name."""
    label = where or "top level"
    if not isinstance(raw, dict):
        raise BadInput(f"{label}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise BadInput(f"{label}: unknown key '{key}'; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise BadInput(
            f"{label}: missing {', '.join(repr(m) for m in missing)} (required: {', '.join(required)}); add it"
        )
    return cls(**kwargs)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise BadInput(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise BadInput(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and (type(value) is not hint):
        raise BadInput(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (every key, defaults included), readable back by `load_recipe`."""
    lines = [f"name = {_toml_value(recipe.name)}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in dataclasses.asdict(getattr(recipe, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def stage_widths(model: ModelConfig) -> dict[str, int]:
    """The recipe's initial widths, stage name -> channels."""
    return {s.name: s.width for s in model.stages}
