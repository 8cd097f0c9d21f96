"""The latency budget as one value: the milliseconds a user asked for, the window the delivered network should
land in, and the headroom kept for timing noise.

    ms          the budget: the gate fails a network whose percentile latency exceeds it
    limit_ms    what the search steers E[latency] to and the baked network must MEASURE at or under
                = ms * (1 - headroom); the headroom is `confidence` timing spreads of the deployment runtime
                (measured by the latency model), not a fixed constant
    low_ms      the bottom of the window the delivered network should land in = ms * (1 - window)
    safe_low_ms low_ms plus the headroom: under it the bake keeps looking for a wider network (within limit_ms)

Every place that needs one of these lines asks the Budget; nowhere else multiplies by (1 - margin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexslim.errors import BadInput

WINDOW = 0.10  # the delivered network should use at least 90% of the budget
# even a quiet runtime re-measures differently minutes later in the gate's fresh process: over 16 delivered networks
# on a 2-core VM the gate's median read 0.973-1.027 x the bake's measurement (its sessions' spread was ~1%)
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
        if (
            isinstance(self.ms, bool)
            or not isinstance(self.ms, (int, float))
            or not (math.isfinite(self.ms) and self.ms > 0)
        ):
            raise BadInput(f"--latency-ms must be a finite positive number of milliseconds, got {self.ms}")
        if not 0 <= self.headroom < 1 or not 0 < self.window < 1:
            raise BadInput(
                f"budget headroom and window must be fractions in [0, 1), got {self.headroom}, {self.window}"
            )

    @classmethod
    def for_noise(cls, ms: float, noise: float, confidence: float) -> Budget:
        """The budget whose headroom is `confidence` x the runtime's timing spread `noise` (a fraction), at least
        MIN_HEADROOM and at most half the window (so the aim stays inside the window)."""
        return cls(ms, min(WINDOW / 2, max(MIN_HEADROOM, confidence * noise)))

    @property
    def limit_ms(self) -> float:
        return self.ms * (1.0 - self.headroom)

    @property
    def target_ms(self) -> float:
        """What the search's controller steers E[latency] to: the measured limit."""
        return self.limit_ms

    @property
    def low_ms(self) -> float:
        return self.ms * (1.0 - self.window)

    @property
    def safe_low_ms(self) -> float:
        """The bottom of the window plus the same headroom as at the top: a network measured between low_ms and
        this may read under the window in the gate, so the bake still looks for a wider one."""
        return self.ms * (1.0 - self.window + self.headroom)
