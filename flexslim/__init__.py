"""flexslim: latency-budgeted channel-width search (FlexCHarts), ONNX export and an onnxruntime gate.

The package root stays import-light so `flexslim --help` is fast; `flexslim.validate` is resolved lazily.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flexslim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = ["__version__", "validate"]


def __getattr__(name: str):
    if name == "validate":
        from flexslim.validate import validate

        return validate
    raise AttributeError(f"module 'flexslim' has no attribute {name!r}")
