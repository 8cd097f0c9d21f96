"""flexslim: latency-budgeted channel-width search (FlexCHarts), ONNX export and an onnxruntime gate.

`flexslim.validate(...)` is the gate as a library call. The package root imports only light modules
(numpy, no torch or onnxruntime) so `flexslim --help` stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flexslim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

# Imported eagerly on purpose: loading the submodule `flexslim.deploy.gate` binds the package attribute to the
# module, and this import then rebinds it to the function, once and for all.
from flexslim.deploy.gate import Measurement, Report, validate  # noqa: E402

__all__ = ["__version__", "Measurement", "Report", "validate"]
