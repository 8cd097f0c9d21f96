"""`python tests/fake_timing_cli.py ARGS` = `python -m flexslim ARGS` with a deterministic timer.

The kill -9 tests compare a resumed search with an uninterrupted one, bit for bit: every measurement (the latency
model's near-budget networks, the bake) must then give the same number twice. This replaces the isolated timing
process with a function of the ONNX model's size (deterministic, monotone in the widths) that sleeps
$FAKE_TIMING_SLEEP seconds per call (a window to kill in) and prints one `fake timing N` line on stderr per call
(what the tests wait for).
"""

import os
import sys
import time

import torch

from flexslim.latency import runtime
from flexslim.latency.model import provider_that_runs

torch.set_num_threads(1)  # bit-reproducible float reductions, and no oversubscription on a shared CPU
_calls = [0]


def fake_time_isolated(model, provider, plan):
    _calls[0] += 1
    print(f"fake timing {_calls[0]}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("FAKE_TIMING_SLEEP", "0")))
    ms = 1e-6 * len(model)  # ~0.05 ms for the tiny quickstart network
    p, ran = plan, provider_that_runs(provider)  # what a real timing reports: tables are checked against the recipe
    return runtime.Timing(ran, p.batch, (p.batch,), p.threads, p.warmup, p.runs, p.percentile, ms, ms, ms, ms, "fake")


runtime.time_isolated = fake_time_isolated

if __name__ == "__main__":
    from flexslim.cli.commands import main

    sys.argv[0] = "flexslim"
    main()
