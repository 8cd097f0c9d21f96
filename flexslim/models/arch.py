"""`Arch`: everything needed to rebuild a network, kept as a versioned `arch.json`.

The file names the family, the fixed parts (stem, head, stage layout) and the searched part (one width per
stage), plus what the network was made for (input shape, classes, dataset, normalisation). Networks are
always rebuilt from an Arch and a state_dict; no pickled modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput
from flexslim.recipe.choices import FAMILIES
from flexslim.recipe.schema import ModelConfig, StageSpec

ARCH_VERSION = 1


@dataclass(frozen=True)
class Arch:
    """A network to rebuild: family, fixed parts, per-stage widths, and what it was made for.

    Frozen: `with_widths` returns a new Arch. `to_dict`/`from_dict` are the versioned arch.json form.
    """

    family: str
    stages: tuple[StageSpec, ...]
    input_shape: tuple[int, int, int]  # C, H, W of one image
    num_classes: int
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem_width: int = 16
    head_width: int = 0
    class_names: tuple[str, ...] = ()  # index -> name when the dataset names its classes; optional in arch.json

    @property
    def widths(self) -> dict[str, int]:
        """Stage name -> width (channels)."""
        return {s.name: s.width for s in self.stages}

    def with_widths(self, widths: dict[str, int]) -> Arch:
        """The same network with some stages at other widths (unknown stage names are BadInput)."""
        unknown = set(widths) - set(self.widths)
        if unknown:
            raise BadInput(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(self.widths)}")
        stages = tuple(dataclasses.replace(s, width=int(widths.get(s.name, s.width))) for s in self.stages)
        return dataclasses.replace(self, stages=stages)

    @classmethod
    def from_model(
        cls, model: ModelConfig, input_shape, num_classes: int, dataset: str, mean, std, class_names=()
    ) -> Arch:
        """The Arch of a recipe's [model] section for a dataset's shape, classes, normalisation and class names."""
        return cls(
            family=model.family,
            stages=tuple(model.stages),
            input_shape=tuple(int(v) for v in input_shape),
            num_classes=int(num_classes),
            dataset=dataset,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            stem_width=model.stem_width,
            head_width=model.head_width,
            class_names=tuple(str(c) for c in class_names),
        )

    @classmethod
    def for_data(cls, model: ModelConfig, ds) -> Arch:
        """The recipe's network (its initial widths) for a dataset: input shape, classes, name, normalisation.

        `ds` is any object with `input_shape`, `num_classes`, `name`, `mean`, `std` and optionally `class_names`
        (a `data.Dataset`).
        """
        names = getattr(ds, "class_names", ())
        return cls.from_model(model, ds.input_shape, ds.num_classes, ds.name, ds.mean, ds.std, names)

    def to_dict(self) -> dict[str, Any]:
        """The arch.json content (versioned)."""
        d = {
            "version": ARCH_VERSION,
            "family": self.family,
            "widths": self.widths,
            "stages": [{"name": s.name, "blocks": s.blocks, "stride": s.stride} for s in self.stages],
            "stem_width": self.stem_width,
            "head_width": self.head_width,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "dataset": self.dataset,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
        }
        if self.class_names:  # optional: files without it (older, or unnamed classes) read as before
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "arch") -> Arch:
        """Parse arch.json's object; anything malformed is BadInput naming `where` and the field."""
        try:
            if not isinstance(d, dict):
                raise ValueError("expected a JSON object")
            version = d.get("version")
            if version != ARCH_VERSION:
                raise ValueError(f"unsupported version {version!r} (this flexslim reads version {ARCH_VERSION})")
            if d["family"] not in FAMILIES:
                raise ValueError(f"unknown family {d['family']!r} (known: {', '.join(FAMILIES)})")
            widths = d["widths"]
            stages = []
            for s in d["stages"]:
                name = str(s["name"])
                if name not in widths:
                    raise ValueError(f"stage {name!r} has no width in 'widths'")
                if any(st.name == name for st in stages):
                    raise ValueError(f"stage {name!r} appears twice in 'stages'")
                stages.append(
                    StageSpec(
                        name,
                        _positive(widths[name], name),
                        _positive(s["blocks"], "blocks"),
                        _positive(s["stride"], "stride"),
                    )
                )
            extra = set(widths) - {s.name for s in stages}
            if extra:
                raise ValueError(f"'widths' names stages that do not exist: {sorted(extra)}")
            shape = tuple(_positive(v, "input_shape") for v in d["input_shape"])
            if len(shape) != 3:
                raise ValueError("input_shape must be [C, H, W]")
            norm = d["normalization"]
            mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
            if len(mean) != shape[0] or len(std) != shape[0] or min(std) <= 0:
                raise ValueError("normalization needs one mean and one positive std per input channel")
            class_names = tuple(str(c) for c in d.get("class_names", ()))
            num_classes = _positive(d["num_classes"], "num_classes")
            if class_names and len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
            return cls(
                family=d["family"],
                stages=tuple(stages),
                input_shape=shape,
                num_classes=num_classes,
                dataset=str(d["dataset"]),
                mean=mean,
                std=std,
                stem_width=_positive(d.get("stem_width", 16), "stem_width"),
                head_width=_non_negative(d.get("head_width", 0), "head_width"),
                class_names=class_names,
            )
        except KeyError as err:
            raise BadInput(f"{where}: missing field {err}") from None
        except (TypeError, ValueError) as err:
            raise BadInput(f"{where}: {err}") from None


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _non_negative(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def load_arch(path: str | Path) -> Arch:
    """Read and check an arch.json file (BadInput when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"arch file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON: {err}") from None
    return Arch.from_dict(data, where=str(path))


def arch_json(arch: Arch) -> str:
    """The arch.json text of an Arch (versioned, indented)."""
    return json.dumps(arch.to_dict(), indent=2) + "\n"
