"""onnxruntime sessions on the provider asked for, and which provider really runs them.

The provider that ran is the provider asked for: `--provider cuda` opens the session without onnxruntime's fallback
(`enable_fallback=0` at creation, `disable_fallback()` for runs), and refuses (BadInput) a session whose first
provider is not CUDA or that placed any compute node on the CPU (onnxruntime's recorded node assignment,
`session.record_ep_graph_assignment_info`; shape arithmetic, which onnxruntime keeps on the CPU on purpose, is
allowed). A CUDA failure during timing is BadInput too, never a CPU timing reported as CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.recipe.choices import PROVIDERS

_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_KEY = "flexslim.latency_provider"  # model metadata: the provider the model was searched (and budgeted) for
_ASSIGNMENT = "session.record_ep_graph_assignment_info"  # session config: record which provider runs each node
_SHAPE_OPS = frozenset({"Shape", "Size"})  # read only a tensor's shape, never its values


@functools.cache
def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider can actually run here (a GPU and its libraries are present)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # finds the CUDA/cuDNN libraries that torch's wheels installed
        except Exception:  # noqa: BLE001 - a failed preload just means no CUDA provider
            return False
    return True


def provider_list(provider: str) -> list[str]:
    """The explicit provider list for a choice of auto | cpu | cuda (CUDA only when it can load)."""
    if provider not in PROVIDERS:
        raise BadInput(f"unknown provider '{provider}'; valid: {', '.join(PROVIDERS)}")
    if provider == "cuda":
        if not cuda_usable():
            raise BadInput(
                "--provider cuda: onnxruntime's CUDA provider cannot run here (no GPU or no CUDA libraries); "
                "use --provider cpu or auto"
            )
        return [_NAMES["cuda"], _NAMES["cpu"]]
    if provider == "auto" and cuda_usable():
        return [_NAMES["cuda"], _NAMES["cpu"]]
    return [_NAMES["cpu"]]


def provider_that_runs_here(provider: str) -> str:
    """The provider a choice (auto | cpu | cuda) runs on on this machine: 'cpu' or 'cuda'."""
    return "cuda" if provider_list(provider)[0] == _NAMES["cuda"] else "cpu"


def make_session(model: str | Path | bytes, provider: str = "auto", threads: int = 0):
    """An InferenceSession on the chosen provider; `threads` > 0 fixes the intra-op thread count.

    `cuda` is strict: no fallback at creation or during runs, and BadInput unless CUDA runs every compute node
    (`require_cuda`). `auto` keeps onnxruntime's fallback to the CPU (the Timing says what ran)."""
    import onnxruntime as ort

    names = provider_list(provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no warnings about unused providers on a CPU machine
    opts.add_session_config_entry(_ASSIGNMENT, "1")
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    if provider != "cuda":
        return ort.InferenceSession(src, sess_options=opts, providers=names)
    what = "the model" if isinstance(model, bytes) else str(model)
    ort.set_default_logger_severity(4)  # a CUDA library that fails to load is our one error line, not ORT's log
    try:
        session = ort.InferenceSession(src, sess_options=opts, providers=names, enable_fallback=0)
    except Exception as err:  # noqa: BLE001 - a CUDA provider error is what the caller asked about
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(
            f"--provider cuda: onnxruntime could not open {what} on CUDA ({first[:160]}); nothing ran. "
            "Use --provider cpu or auto"
        ) from None
    session.disable_fallback()  # a CUDA failure in a run raises instead of re-running on the CPU
    require_cuda(placement(session, _graph(model)), what)
    return session


@dataclass(frozen=True)
class Placement:
    """Where onnxruntime put a session's graph.

    Attributes:
        provider: `cuda` when the session's first provider is CUDA, else `cpu`.
        cpu_nodes: compute nodes a CUDA session placed on the CPU, as `OpType 'name'` (shape arithmetic excluded).
        known: False when this onnxruntime cannot report node placement (then `cpu_nodes` is empty, unchecked).
    """

    provider: str
    cpu_nodes: tuple[str, ...] = ()
    known: bool = True


def placement(session, graph=None) -> Placement:
    """Which provider runs `session`, and which compute nodes a CUDA session left on the CPU.

    A CPU node counts as compute when it reads the image's values: with the ONNX `graph` given, when one of its
    inputs depends on the graph input other than through Shape/Size; without it (or for a node onnxruntime created),
    every CPU node but Shape/Size counts. The session must have been made with `make_session` (which records the
    node assignment)."""
    if session.get_providers()[0] != _NAMES["cuda"]:
        return Placement("cpu")
    try:
        assigned = session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001 - an onnxruntime without the call, or a session that did not record it
        return Placement("cuda", (), known=False)
    on_cpu = [n for sub in assigned if sub.ep_name == _NAMES["cpu"] for n in sub.get_nodes()]
    data = _data_nodes(graph) if graph is not None else None
    compute = [
        n for n in on_cpu if n.op_type not in _SHAPE_OPS and (data is None or not n.name or data.get(n.name, True))
    ]
    return Placement("cuda", tuple(f"{n.op_type} '{n.name}'" if n.name else n.op_type for n in compute))


def require_cuda(p: Placement, what: str = "the model") -> None:
    """BadInput unless CUDA runs every compute node of `what` (what `--provider cuda` promises)."""
    if p.provider != "cuda":
        raise BadInput(
            f"--provider cuda: onnxruntime ran {what} on the CPU (its CUDA provider did not load); a CPU timing "
            "is no CUDA verdict. Fix the CUDA/cuDNN libraries, or use --provider cpu"
        )
    if not p.known:
        raise BadInput(
            f"--provider cuda: this onnxruntime cannot report which provider runs each node of {what}, so CPU "
            "nodes in the CUDA session cannot be ruled out; upgrade onnxruntime (>= 1.24) or use --provider auto"
        )
    if p.cpu_nodes:
        shown = ", ".join(p.cpu_nodes[:5]) + (f" and {len(p.cpu_nodes) - 5} more" if len(p.cpu_nodes) > 5 else "")
        raise BadInput(
            f"--provider cuda: onnxruntime placed {len(p.cpu_nodes)} compute node(s) of {what} on the CPU ({shown}): "
            "no CUDA kernel for them; the model did not run on CUDA alone. Use --provider auto to time it anyway"
        )


def _graph(model: str | Path | bytes):
    """The ONNX graph of `model` (weights left out), for telling compute nodes from shape arithmetic."""
    import onnx

    try:
        if isinstance(model, bytes):
            return onnx.load_model_from_string(model).graph
        return onnx.load(str(model), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnxruntime read it; without the graph every CPU node counts as compute
        return None


def _data_nodes(graph) -> dict[str, bool]:
    """Node name -> whether the node reads values that depend on the graph's input (not only its shape)."""
    consts = {i.name for i in graph.initializer}
    live = {i.name for i in graph.input if i.name not in consts}  # tensors carrying the image's values
    reads = {}
    for node in graph.node:  # ONNX nodes are topologically sorted
        uses = any(t in live for t in node.input)
        if node.name:
            reads[node.name] = uses and node.op_type not in _SHAPE_OPS
        if uses and node.op_type not in _SHAPE_OPS:
            live.update(node.output)
    return reads


def ran_provider(session) -> str:
    """The provider that actually runs the graph ('cpu' or 'cuda')."""
    first = session.get_providers()[0]
    return "cuda" if first == _NAMES["cuda"] else "cpu"
