"""The latency budget as one value: the milliseconds a user asked for and the two lines derived from it.

    target_ms  what the search steers the expected latency to   = ms * (1 - search_margin)
    limit_ms   what the baked network must MEASURE at or under  = ms * (1 - trim_margin)

Every place that needs either line asks the Budget; nowhere else multiplies by (1 - margin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexslim.errors import BadInput


@dataclass(frozen=True)
class Budget:
    """A latency budget and its two derived lines (see the module docstring); frozen, checked on creation."""

    ms: float  # per-sample latency at the gate's percentile, milliseconds
    search_margin: float = 0.0  # fraction of ms the search keeps free for rounding and timing noise
    trim_margin: float = 0.0  # fraction of ms the measured network keeps free (the gate re-measures)

    def __post_init__(self) -> None:
        if not (isinstance(self.ms, (int, float)) and math.isfinite(self.ms) and self.ms > 0):
            raise BadInput(f"--latency-ms must be a finite positive number of milliseconds, got {self.ms}")
        for name in ("search_margin", "trim_margin"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise BadInput(f"budget {name.replace('_', ' ')} must be in [0, 1), got {v}")

    @classmethod
    def from_recipe(cls, ms: float, search) -> Budget:
        """The budget with the margins of a recipe's [search] section."""
        return cls(ms, search.budget_margin, search.trim_margin)

    @property
    def target_ms(self) -> float:
        return self.ms * (1.0 - self.search_margin)

    @property
    def limit_ms(self) -> float:
        return self.ms * (1.0 - self.trim_margin)
