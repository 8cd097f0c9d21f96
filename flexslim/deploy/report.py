"""The gate's verdict: one Check per thing checked, the Report over them (summary line, report.json, JUnit XML).

A Report passes only when at least one check ran and every check passed.
"""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexslim.latency.runtime import (
    Timing,
)
from flexslim.system.files import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class Check:
    """One check the gate ran, and its verdict.

    Attributes:
        name: `latency` or `accuracy`.
        passed: measured <= limit (latency) or measured >= limit (accuracy).
        measured: per-sample latency at the percentile (ms), or top-1 accuracy (a fraction in [0, 1]).
        limit: the budget (ms) or the minimum accuracy (fraction).
        unit: `ms` or `fraction`.
        message: one line for people: measured vs limit, where the limit came from, provider and batch.
    """

    name: str  # latency | accuracy
    passed: bool
    measured: float
    limit: float
    unit: str  # ms | fraction
    message: str


@dataclass(frozen=True)
class Report:
    """What the gate measured and judged; `passed` is the verdict (exit 0 / 1 of `flexslim validate`).

    Attributes:
        model: the ONNX file.
        requested_provider: the provider asked for (`timing.provider` is the one that ran).
        timing: the latency measurement (batch, input shape, threads, percentile, p50 / p90, runtime).
        budget_ms: the latency budget judged against (None: no latency check).
        dataset: the dataset the accuracy was computed on (None: no accuracy was asked for).
        accuracy: top-1 accuracy on its test split (None: not computed).
        num_test: images the accuracy was computed on.
        min_accuracy: the accuracy target (None: no accuracy check).
        checks: the checks that ran; a report without checks never passes.
        metadata: the model's metadata_props.
        host: the machine that measured.
        from_metadata: the settings the model's `flexslim.*` metadata supplied (setting name -> value).
        notes: what people should know about the measurement: the provider `auto` could not use, CPU nodes in a CUDA
            session, an early stop.
        measured_on: where the latency was measured: "local", or the URL of the remote timer (`--timer`).
        device: the fingerprint id of the device that measured (the latency cache's file name for it).
        precision: what the graph computes in, read from the graph itself (fp32 | int8 | fp16).
        fp32_accuracy: for a quantized or fp16 flexslim model with its fp32 twin beside it (`flexslim.fp32_twin`),
            the twin's accuracy on the same images (None: not computed); the verdict is the given graph's alone.
    """

    model: str
    requested_provider: str
    timing: Timing
    budget_ms: float | None
    dataset: str | None
    accuracy: float | None
    num_test: int
    min_accuracy: float | None
    checks: tuple[Check, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    host: str = field(default_factory=platform.node)
    from_metadata: dict[str, float | int | str] = field(default_factory=dict)  # settings the model's metadata gave
    notes: tuple[str, ...] = ()
    measured_on: str = "local"
    device: str = ""
    precision: str = "fp32"
    fp32_accuracy: float | None = None

    @property
    def passed(self) -> bool:
        """The verdict: at least one check ran and every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def latency_ms(self) -> float:
        """The gate's statistic: per-sample latency at the report's percentile."""
        return self.timing.at_percentile_ms

    def summary(self) -> str:
        """The one-line verdict, e.g. `PASS - latency: p90 0.0570 ms/sample <= budget 0.1 ms (...) [from the
        model's metadata: flexslim.budget_ms=0.1]`; it names every value the model's metadata supplied."""
        from flexslim.deploy.settings import METADATA_SETTINGS  # the metadata keys live with the rules that read them

        parts = [f"{c.name}: {c.message}" for c in self.checks] or ["nothing was checked"]
        given = ", ".join(f"{METADATA_SETTINGS[k][0]}={v}" for k, v in self.from_metadata.items())
        return (
            ("PASS" if self.passed else "FAIL")
            + " - "
            + "; ".join(parts)
            + (f" [from the model's metadata: {given}]" if given else "")
        )

    def to_dict(self) -> dict:
        """The report as JSON-ready data (report.json)."""
        return {
            "model": self.model,
            "passed": self.passed,
            "provider": self.timing.provider,
            "requested_provider": self.requested_provider,
            "batch": self.timing.batch,
            "input_shape": list(self.timing.input_shape),
            "threads": self.timing.threads,
            "percentile": self.timing.percentile,
            "latency_ms": self.latency_ms,
            "p50_ms": self.timing.p50_ms,
            "p90_ms": self.timing.p90_ms,
            "mean_ms": self.timing.mean_ms,
            "all_passes_ms": self.timing.all_passes_ms,
            "latency_interval_ms": [self.timing.ci_low_ms, self.timing.ci_high_ms],  # 95%, order statistics
            "precision": self.precision,  # what the graph computes in (read from it)
            "fp32_accuracy": self.fp32_accuracy,  # its fp32 twin's, when there is one beside it
            "tolerance": self.timing.precision,  # > 0: timing could stop early ...
            "stopped_known": self.timing.known,  # ... and did, the interval within +-tolerance
            "timed_runs": self.timing.runs,
            "windows": self.timing.windows,
            "quiet_windows": self.timing.quiet_windows,
            "warmup_runs": self.timing.warmup,
            "runtime": self.timing.runtime,
            "budget_ms": self.budget_ms,
            "dataset": self.dataset,
            "accuracy": self.accuracy,
            "num_test": self.num_test,
            "min_accuracy": self.min_accuracy,
            "checks": [asdict(c) for c in self.checks],
            "host": self.host,
            "measured_on": self.measured_on,
            "device_fingerprint": self.device,
            "metadata": {k: v for k, v in self.metadata.items() if k != "flexslim.arch"},
            "from_metadata": dict(self.from_metadata),
            "stopped": self.timing.stopped,
            "elapsed_s": self.timing.elapsed_s,
            "timeout_s": self.timing.timeout_s,
            "cpu_nodes": list(self.timing.cpu_nodes),
            "notes": list(self.notes),
        }

    def write_json(self, path: str | Path) -> Path:
        """Write `to_dict()` atomically as JSON; returns the path."""
        return atomic_write_json(path, self.to_dict())

    def write_junit(self, path: str | Path) -> Path:
        """Write the checks as JUnit XML (one testcase per check) atomically; returns the path."""
        suite = ET.Element(
            "testsuite",
            name="flexslim.validate",
            tests=str(len(self.checks)),
            failures=str(sum(not c.passed for c in self.checks)),
            errors="0",
        )
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"flexslim.validate.{Path(self.model).name}", name=c.name)
            if not c.passed:
                ET.SubElement(case, "failure", message=c.message, type="GateFailed").text = c.message
            ET.SubElement(case, "system-out").text = json.dumps(
                {"measured": c.measured, "limit": c.limit, "unit": c.unit, "provider": self.timing.provider}
            )
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        return atomic_write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
