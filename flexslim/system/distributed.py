"""Data-parallel runs under `torchrun`: who this process is (rank, world size from torchrun's environment),
the process group (gloo on CPUs, nccl for CUDA tensors) and how it ends, rank-0-only side effects and the checks
that the ranks agree. The collectives inside a training step (shards, gradients, BatchNorm) are
`flexslim.system.collectives`.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every function here is the single-process identity: no
process group, `rank() == 0`, `on_main(fn) == fn()`, gradients untouched. The environment counts as torchrun's
only when torchrun's own variables are there (`launched_by_torchrun`): TORCHELASTIC_RUN_ID, or RANK, LOCAL_RANK,
WORLD_SIZE and MASTER_ADDR together. A stray RANK or WORLD_SIZE (left over in a shell or a CI job) is ignored, with
a one-line note (`stray_rank_note`): otherwise `RANK=1 flexslim validate ...` would believe it is rank 1, skip every
write and exit 0 with no report. Under torchrun with N ranks:

- every rank iterates the same GLOBAL batches (the recipe's batch size, same shuffles and augmentation) and
  trains on its own slice of each (`collectives.shard`); weight and mu gradients are averaged
  (`collectives.average_gradients`), so
  the ranks stay in lockstep and N ranks compute what one process computes on the global batch;
- whatever touches the outside world (the run directory, onnxruntime timings, the log) happens on rank 0:
  `runs.atomic_write_*` are no-ops elsewhere, and `on_main(fn)` runs fn on rank 0 and hands its result (or
  its exception) to every rank;
- bad input is caught on every rank at once (`check_recipe`, `check_batch`), printed by rank 0 only;
- a rank that dies makes the others stop with `RanksLost` (exit 3) instead of waiting for it.

torch is imported inside the functions, so the CLI can ask `is_main()` without loading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flexslim.errors import BadInput, RanksLost

if TYPE_CHECKING:
    import torch

    from flexslim.recipe.schema import Recipe


T = TypeVar("T")

TIMEOUT_ENV = "FLEXSLIM_DIST_TIMEOUT_S"  # seconds a rank waits in a collective (rank 0 measuring latency, baking)
DEFAULT_TIMEOUT_S = 3600.0
_CUDA_RANKS = [False]  # set by `init`: the ranks train on CUDA (nccl, torch's SyncBatchNorm)


# -- who am I -------------------------------------------------------------------------------------------------
def world_size() -> int:
    """Ranks taking part (1 without torchrun)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")  # set together by torchrun for every worker
_STRAY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when this process is a worker that torchrun started: its TORCHELASTIC_RUN_ID is set, or RANK,
    LOCAL_RANK, WORLD_SIZE and MASTER_ADDR all are (a launcher that sets torchrun's env:// variables itself)."""
    env = os.environ
    return bool(env.get("TORCHELASTIC_RUN_ID")) or all(env.get(k) for k in TORCHRUN_VARS)


def stray_rank_note() -> str | None:
    """One line to print when RANK / WORLD_SIZE / LOCAL_RANK are set but torchrun did not start this process (they
    are ignored: it runs as the single process), else None."""
    if launched_by_torchrun():
        return None
    stray = [f"{k}={os.environ[k]}" for k in _STRAY_VARS if os.environ.get(k)]
    if not stray:
        return None
    return (
        f"note: ignoring {' '.join(stray)}: not a torchrun launch (no TORCHELASTIC_RUN_ID, nor RANK, LOCAL_RANK, "
        "WORLD_SIZE and MASTER_ADDR together); running as a single process"
    )


def rank() -> int:
    """This process's rank (torchrun's RANK; 0 without torchrun, whatever a stray RANK says)."""
    return int(os.environ["RANK"]) if launched_by_torchrun() and os.environ.get("RANK") else 0


def is_main() -> bool:
    """True on rank 0, the one rank that writes files, logs and measures latency."""
    return rank() == 0


def launched_world() -> int:
    """The world size torchrun announced in the environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def init(device: str = "auto") -> bool:
    """Join torchrun's process group (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); False when
    there is nothing to join (one process). CUDA ranks pin GPU LOCAL_RANK and reduce CUDA tensors with nccl; CPU
    tensors always go through gloo. Collectives give up after FLEXSLIM_DIST_TIMEOUT_S seconds (default 3600)."""
    import torch
    import torch.distributed as dist

    if launched_world() <= 1 or dist.is_initialized():
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    _CUDA_RANKS[0] = cuda
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    except (ValueError, RuntimeError) as err:  # a rendezvous that cannot happen: bad address, port, world
        raise BadInput(
            f"cannot join the torchrun process group ({_first_line(err)}); check the rendezvous flags"
        ) from None
    return True


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """One CLI command's process group: joined on entry, left on exit. Inside it a lost rank, a broken connection
    or the launcher's SIGTERM (torchrun stops the other workers when one fails) becomes `RanksLost`."""
    import torch.distributed as dist

    if not init(device):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    finished = False
    try:
        yield
        # every rank done before any leaves: rank 0 hosts the store, and a rank still tearing down its group when
        # rank 0 has gone aborts in gloo's destructor (seen: SIGABRT "terminate called without an active exception")
        dist.barrier()
        finished = True
    except (BadInput, RanksLost):
        raise
    except Exception as err:
        if _is_comm_failure(err):
            raise RanksLost(_lost_message(_first_line(err))) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _leave(wait_for_others=finished)


LEFT_KEY = "flexslim/left"  # the store's counter of ranks whose process group is torn down
LEAVE_WAIT_S = 10.0  # rank 0 waits at most this long for the others to have torn theirs down


def _leave(wait_for_others: bool) -> None:
    """Tear down this rank's process group; after a finished command, rank 0 (the store's host) leaves last.

    The barrier alone did not order the teardowns: under load rank 1 was still destroying its gloo group when rank
    0's process had exited with the store, and aborted (SIGABRT, exit 1) after a finished run. So every other rank
    counts itself out on the store once its group is gone, and rank 0 waits for that count (at most LEAVE_WAIT_S;
    after a failure nobody waits: the others may be gone)."""
    import torch.distributed as dist

    store = None
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    if store is None or not wait_for_others:
        return
    with contextlib.suppress(Exception):
        if rank() != 0:
            store.add(LEFT_KEY, 1)
            return
        deadline = time.monotonic() + LEAVE_WAIT_S
        while store.add(LEFT_KEY, 0) < launched_world() - 1 and time.monotonic() < deadline:
            time.sleep(0.02)


def _stopped_by_launcher(signum, frame) -> None:
    raise RanksLost(_lost_message("stopped by the launcher (SIGTERM): another rank failed or the job was cancelled"))


def _lost_message(cause: str) -> str:
    return (
        f"rank {rank()} of {launched_world()}: the distributed job stopped ({cause}); finished epochs are kept in "
        "the run directory: rerun the same torchrun command with --resume (any number of ranks)"
    )


def _is_comm_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out")
    )


def _first_line(err: BaseException) -> str:
    """The error's first line, without the source location gloo puts in front ('[.../pair.cc:545] ...')."""
    lines = str(err).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(err).__name__)[:200]


# -- rank 0 does it, everyone gets it -------------------------------------------------------------------------
def on_main(fn: Callable[[], T]) -> T:
    """fn() on rank 0, its result on every rank (pickled to the others). An exception raised by fn is raised on
    every rank, so a BadInput found by rank 0 stops all ranks at once. The other ranks are idle meanwhile (they
    wait at a barrier first), so what rank 0 times is not slowed down by them."""
    if world_size() == 1:
        return fn()
    import torch.distributed as dist

    dist.barrier()
    if is_main():
        try:
            payload: tuple[str, Any] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - handed to the other ranks, then re-raised here
            payload = ("error", err)
        try:
            dist.broadcast_object_list([payload], src=0)
        except (TypeError, AttributeError, ValueError, pickle.PicklingError):  # unpicklable: send its text
            payload = ("error", RuntimeError(f"rank 0: {type(payload[1]).__name__}: {payload[1]}"))
            dist.broadcast_object_list([payload], src=0)
        kind, value = payload
    else:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
    if kind == "error":
        raise _everywhere(value)
    return value


def _everywhere(err: BaseException) -> BaseException:
    """Mark an error every rank raises alike, so that only rank 0 prints it (see `printed_here`)."""
    err.on_every_rank = True
    return err


def printed_here(err: BaseException) -> bool:
    """Whether this rank prints `err`: rank 0 always, another rank only an error of its own (one that rank 0
    does not also report)."""
    return is_main() or not getattr(err, "on_every_rank", False)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads a dataset into a shared cache), then the others run it."""
    if world_size() == 1:
        yield
        return
    import torch.distributed as dist

    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def load_on_main(path) -> Any:
    """torch.load(path) (weights only, on the CPU) read by rank 0 and handed to every rank: checkpoints resume
    without the run directory being visible to the other ranks."""
    import torch

    return on_main(lambda: torch.load(path, map_location="cpu", weights_only=True))


# -- agreement ------------------------------------------------------------------------------------------------
def check_same(what: str, value: Any) -> None:
    """RuntimeError on every rank unless every rank holds the same `value` (compared by repr: tensors are turned
    into lists first). Used where disagreement would be a bug (mu, allocation)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    text = repr(_plain(value))
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, hashlib.sha256(text.encode()).hexdigest())
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise RuntimeError(f"ranks diverged: {what} on rank(s) {odd} differ from rank 0 (this is a bug): {text[:300]}")


def _plain(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_recipe(load: Callable[[], Recipe], *, search: bool = True, train: bool = True) -> None:
    """Every rank resolves its recipe with `load()`; BadInput on every rank (printed by rank 0) when the ranks
    resolved different recipes, when `load` failed, or when a batch the run will use does not split evenly
    over the ranks. Nothing to check in a single process."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    from flexslim.recipe.schema import recipe_to_toml

    recipe, problem = None, None
    try:
        recipe = load()
        text = recipe_to_toml(recipe)
    except BadInput as err:
        problem = str(err)
        text = f"error: {problem}"
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, hashlib.sha256(text.encode()).hexdigest()[:12])
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise _everywhere(
            BadInput(
                f"the ranks disagree on the recipe: rank(s) {', '.join(map(str, odd))} resolved another recipe than "
                f"rank 0 (sha256 {digests[odd[0]]} vs {digests[0]}); launch every rank with the same --recipe and "
                "--set values, and the same recipe file on every node"
            )
        )
    if problem is not None:
        raise _everywhere(BadInput(problem))
    if search:
        check_batch(recipe.search.batch_size, "search.batch_size")
    if train:
        check_batch(recipe.train.batch_size, "train.batch_size")


def check_batch(batch: int, key: str) -> None:
    """BadInput (on every rank alike: no collective) unless `batch` (global) splits evenly over the ranks."""
    n = world_size()
    if n > 1 and batch % n:
        lower = batch - batch % n
        raise _everywhere(
            BadInput(
                f"{key} {batch} does not split evenly over {n} ranks (each rank trains on {key} / {n} images of every "
                f"batch); --set {key}={lower or n} or {lower + n}, or launch a number of ranks that divides {batch}"
            )
        )
