"""What the remote timer and its clients exchange, as JSON: a measurement request (the provider, the TimingPlan and
an optional budget), the device settings a fingerprint is asked for, and the Timing that comes back.

Both sides check every value with the CLI's own rules (`flexslim.recipe.checks`): a client never trusts a server's
figures, a server never trusts a client's settings. Imports neither torch nor onnx (the server runs without them).

    body = request_dict("cpu", TimingPlan(batch=32, min_seconds=1.0), budget_ms=0.3)
    provider, plan, budget = request_from_dict(body)        # BadInput naming the bad key
    timing_from_dict(timing.to_dict()) == timing            # True: every figure checked on the way in
"""

from __future__ import annotations

import math
from dataclasses import fields

from flexslim.errors import BadInput
from flexslim.latency.runtime import Timing, TimingPlan
from flexslim.recipe import checks
from flexslim.recipe.choices import PROVIDERS
from flexslim.recipe.schema import LatencyConfig

PROTOCOL = 1  # bump when a request or an answer changes meaning; a server refuses another version (400)

_PLAN_CHECKS = {
    "batch": checks.batch,
    "warmup": checks.warmup,
    "runs": checks.runs,
    "percentile": checks.percentile,
    "threads": checks.threads,
    "seed": lambda v, o: checks.integer(v, o, low=0, cap=2**31 - 1),
    "min_seconds": checks.min_seconds,
    "precision": checks.tolerance,
}


def _origin(key: str) -> checks.Origin:
    return checks.Origin(f"timer request {key}", "send a valid value (flexslim checks it like the CLI's flag)")


# -- a measurement request --------------------------------------------------------------------------------------
def request_dict(provider: str, plan: TimingPlan, budget_ms: float | None = None) -> dict:
    """The JSON a client sends with an ONNX model (the model itself travels as the request's body)."""
    d = {"protocol": PROTOCOL, "provider": provider, "budget_ms": budget_ms}
    d.update({k: getattr(plan, k) for k in (*_PLAN_CHECKS, "timeout")})
    return d


def request_from_dict(d: object, max_timeout: float | None = None) -> tuple[str, TimingPlan, float | None]:
    """(provider, plan, budget_ms) of a request, every value checked (BadInput naming the key); `max_timeout` caps
    the measurement's time limit (a server's own limit)."""
    if not isinstance(d, dict):
        raise BadInput("timer request: expected a JSON object of timing settings")
    unknown = set(d) - {"protocol", "provider", "budget_ms", "timeout", *_PLAN_CHECKS}
    if unknown:
        raise BadInput(f"timer request: unknown keys {', '.join(sorted(map(str, unknown)))}")
    if d.get("protocol") != PROTOCOL:
        raise BadInput(f"timer request: protocol {d.get('protocol')!r}, this server speaks {PROTOCOL}")
    provider = checks.choice(d.get("provider"), _origin("provider"), PROVIDERS)
    values = {k: check(d[k], _origin(k)) for k, check in _PLAN_CHECKS.items() if k in d}
    if "batch" not in values:
        raise BadInput("timer request: batch is required")
    timeout = checks.timeout(d["timeout"], _origin("timeout")) if d.get("timeout") is not None else None
    if max_timeout is not None and (timeout is None or timeout > max_timeout):
        timeout = max_timeout
    budget = d.get("budget_ms")
    budget = None if budget is None else checks.budget_ms(budget, _origin("budget_ms"))
    return provider, TimingPlan(**values, timeout=timeout), budget


# -- the device settings a fingerprint is asked for -------------------------------------------------------------
def settings_query(s: LatencyConfig) -> dict[str, str]:
    """The query string of `GET /info`: what the device fingerprint depends on besides the device."""
    return {"provider": s.provider, "batch": str(s.batch), "threads": str(s.threads), "percentile": repr(s.percentile)}


def settings_from_query(q: dict[str, str]) -> LatencyConfig:
    """The LatencyConfig a `GET /info` query names (defaults for what it leaves out), checked."""

    def number(key: str, kind):
        raw = q.get(key)
        if raw is None:
            return getattr(LatencyConfig, key)
        try:
            return kind(raw)
        except ValueError:
            raise BadInput(f"timer request {key} = {raw!r}: not a number") from None

    return LatencyConfig(
        provider=checks.choice(q.get("provider", "auto"), _origin("provider"), PROVIDERS),
        batch=checks.batch(number("batch", int), _origin("batch")),
        threads=checks.threads(number("threads", int), _origin("threads")),
        percentile=checks.percentile(number("percentile", float), _origin("percentile")),
    )


# -- a Timing, both ways ----------------------------------------------------------------------------------------
_POSITIVE_MS = ("p50_ms", "p90_ms", "at_percentile_ms", "mean_ms")
_OPTIONAL_MS = ("all_passes_ms", "fastest_ms", "timeout_s", "ci_low_ms", "ci_high_ms")
STOPS = (None, "timeout", "over_budget")


def timing_from_dict(d: object) -> Timing:
    """A Timing from its `to_dict()`, every figure checked (ValueError/TypeError otherwise). `stopped` may be one
    of STOPS (a cache entry additionally refuses a stopped timing)."""
    if not isinstance(d, dict) or set(d) - {f.name for f in fields(Timing)}:
        raise ValueError("not a timing")
    t = Timing(**{**d, **{k: tuple(d[k]) for k in ("input_shape", "sessions", "cpu_nodes") if k in d}})
    if not isinstance(t.provider, str) or not isinstance(t.runtime, str) or t.stopped not in STOPS:
        raise ValueError("provider, runtime, stopped")
    for name in _POSITIVE_MS:
        _number(getattr(t, name), 0.0, strict=True)
    for name in _OPTIONAL_MS:
        if getattr(t, name) is not None:
            _number(getattr(t, name), 0.0, strict=True)
    for v in t.sessions:
        _number(v, 0.0, strict=True)
    _number(t.percentile, 0.0)
    _number(t.elapsed_s, 0.0)
    _number(t.precision, 0.0)
    if not isinstance(t.known, bool):
        raise ValueError("known")
    for v in (t.batch, *t.input_shape):
        whole(v, 1)
    for v in (t.threads, t.warmup, t.runs, t.windows, t.quiet_windows):
        whole(v, 0)
    if not all(isinstance(n, str) for n in t.cpu_nodes):
        raise ValueError("cpu_nodes")
    return t


def _number(v, low: float, strict: bool = False) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < low
        or (strict and v <= low)
    ):
        raise ValueError(f"not a number >= {low}: {v!r}")
    return float(v)


number = _number  # the store checks its own fields with the same rule


def whole(v, low: int) -> int:
    """An integer (not a bool) >= low, else ValueError."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"not a whole number >= {low}: {v!r}")
    return v
