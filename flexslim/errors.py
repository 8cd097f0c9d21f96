"""The two ways a flexslim command can fail on purpose: bad input (exit 2) and a failed gate (exit 1)."""


class BadInput(Exception):
    """The user gave something unusable: a missing file, an unknown key, an impossible value.

    The message is one line that names the problem and, where there is one, the fix. The CLI prints it
    and exits with code 2; it never shows a traceback.
    """


class GateFailed(Exception):
    """A model was checked and did not pass (latency over budget, accuracy under target, parity). Exit 1."""


class RanksLost(Exception):
    """A distributed (torchrun) job stopped because another rank died or the launcher stopped it. Not a verdict
    on the model: exit 3, one line on every surviving rank, and the finished epochs are kept for --resume."""
