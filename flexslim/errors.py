"""The error taxonomy and its exit codes: what CI reads as a verdict.

    EXIT_OK          0    done / gate passed
    EXIT_GATE        1    gate failed (over budget, under accuracy, parity,       GateFailed
                          a measurement past its time limit)                      TimedOut
    EXIT_BAD_INPUT   2    bad input (file, key, value, path); one line + fix      BadInput
    EXIT_INTERNAL    3    internal error: a bug, or the machinery itself failed   InternalError (and any
                          (e.g. the isolated timing process died)                 unexpected exception)
    EXIT_INTERRUPTED 130  Ctrl-C / SIGTERM

A crash must never exit 1: CI would read it as a slow model. `flexslim.system.exits` maps an exception to its
code and one line.
"""

EXIT_OK = 0
EXIT_GATE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """The user gave something unusable: a missing file, an unknown key, an impossible value.

    The message is one line that names the problem and, where there is one, the fix. The CLI prints it
    and exits with code 2; it never shows a traceback.
    """


class GateFailed(Exception):
    """A model was checked and did not pass (latency over budget, accuracy under target, parity). Exit 1."""


class TimedOut(GateFailed):
    """A measurement did not finish within its time limit (`--timeout`, `latency.timeout`): a model that cannot be
    measured in the time given is not a pass. Exit 1, one line `gate failed: timed out after S s ...`."""


class InternalError(Exception):
    """flexslim itself failed, not the input and not the model: exit 3 with one line."""


class TimingFailed(InternalError):
    """The isolated timing process died (killed, out of memory, could not start). flexslim does not re-time in
    the main process, which measures up to 40% slow, so the measurement is lost: exit 3."""


class RanksLost(Exception):
    """A distributed (torchrun) job stopped because another rank died or the launcher stopped it. Not a verdict
    on the model: exit 3, one line on every surviving rank, and the finished epochs are kept for --resume."""
