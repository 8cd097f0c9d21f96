"""The two ways a flexslim command can fail on purpose: bad input (exit 2) and a failed gate (exit 1)."""


class BadInput(Exception):
    """The user gave something unusable: a missing file, an unknown key, an impossible value.

    The message is one line that names the problem and, where there is one, the fix. The CLI prints it
    and exits with code 2; it never shows a traceback.
    """


class GateFailed(Exception):
    """A model was checked and did not pass (latency over budget, accuracy under target, parity). Exit 1."""
