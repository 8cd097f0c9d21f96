"""The latency budget as one value: the milliseconds a user asked for, the window the delivered network should
land in, and the headroom kept for timing noise.

    ms          the budget: the gate fails a network whose percentile latency exceeds it
    limit_ms    what the search steers E[latency] to and the baked network must MEASURE at or under
                = ms * (1 - headroom); the headroom is `confidence` timing spreads of the deployment runtime
                (measured by the latency model), not a fixed constant
    low_ms      the bottom of the window the delivered network should land in = ms * (1 - window)
    safe_low_ms low_ms plus the headroom: under it the bake keeps looking for a wider network (within limit_ms)

Every place that needs one of these lines asks the Budget; nowhere else multiplies by (1 - margin). A run builds
its Budget once, from the flag and the latency model's timing spread (`for_noise`); the bake may re-fit the headroom
from its own sessions (`refit`) and hands that Budget back in its result, which is what run.json records.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexslim.errors import BadInput
from flexslim.recipe import checks

WINDOW = 0.10  # the delivered network should use at least 90% of the budget
# even a quiet runtime re-measures differently minutes later in the gate's fresh process: over 16 delivered networks
# on a 2-core VM the gate's median read 0.973-1.027 x the bake's measurement (its sessions' spread was ~1%). The prior
# only: once a device has re-timings on record, what they moved is the floor (`latency.rechecks.floor`)
MIN_HEADROOM = 0.03


@dataclass(frozen=True)
class Budget:
    """A latency budget (ms per sample at the gate's percentile) with its derived lines; checked on creation.

    Example::

        b = Budget.for_noise(0.06, noise=0.018, confidence=2.0)   # headroom max(3%, 2 x 1.8%) = 3.6%
        b.limit_ms, b.low_ms                                       # 0.05784, 0.054
    """

    ms: float
    headroom: float = 0.0  # fraction of ms kept free under the budget for timing noise
    window: float = WINDOW

    def __post_init__(self) -> None:
        checks.budget_ms(self.ms, checks.flag("--latency-ms"))  # the one budget validator (flags, metadata alike)
        if not 0 <= self.headroom < 1 or not 0 < self.window < 1:
            raise BadInput(
                f"budget headroom and window must be fractions in [0, 1), got {self.headroom}, {self.window}"
            )

    @classmethod
    def for_noise(cls, ms: float, noise: float, confidence: float, floor: float = MIN_HEADROOM) -> Budget:
        """The budget whose headroom is `confidence` x the runtime's timing spread `noise` (a fraction), at least
        `floor` (how far re-timings moved on this device, `latency.rechecks.floor`; before any: MIN_HEADROOM) and at
        most half the window (so the aim stays inside the window)."""
        return cls(ms, min(WINDOW / 2, max(floor, confidence * noise)))

    def refit(self, noise: float, confidence: float, floor: float = MIN_HEADROOM) -> Budget:
        """The same budget with the headroom re-fitted to a measured timing spread (the bake's own sessions)."""
        return Budget.for_noise(self.ms, noise, confidence, floor)

    def check_floor(self, floor_ms: float, provider: str, min_width: int) -> None:
        """The one floor rule: BadInput (exit 2) when even the narrowest network of the family (every stage at
        `min_width`, measured `floor_ms`) cannot be measured under the limit."""
        if self.limit_ms < floor_ms:
            raise BadInput(
                f"--latency-ms {self.ms:g} is below the floor of this family on {provider}: the narrowest "
                f"network (every stage at min_width {min_width}) measures {floor_ms:.4f} ms; "
                f"raise the budget or lower model.min_width"
            )

    def in_window(self, measured_ms: float) -> bool:
        """True when a measured latency lands in [low_ms, ms]: the budget is met and used."""
        return self.low_ms <= measured_ms <= self.ms

    def as_dict(self) -> dict:
        """What run.json and reports record of the budget."""
        return {"ms": self.ms, "limit_ms": self.limit_ms, "low_ms": self.low_ms, "headroom": self.headroom}

    @property
    def limit_ms(self) -> float:
        """What the search's controller steers E[latency] to and the baked network must measure at or under."""
        return self.ms * (1.0 - self.headroom)

    @property
    def low_ms(self) -> float:
        """The bottom of the window the delivered network should land in."""
        return self.ms * (1.0 - self.window)

    @property
    def safe_low_ms(self) -> float:
        """The bottom of the window plus the same headroom as at the top: a network measured between low_ms and
        this may read under the window in the gate, so the bake still looks for a wider one."""
        return self.ms * (1.0 - self.window + self.headroom)
