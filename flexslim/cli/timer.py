"""`flexslim timer serve`: the remote timer, run on the deployment device (`python -m flexslim.timer serve` takes
the same flags where typer and torch are not installed). Registered on the shared `app` after `cache`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexslim.cli.app import app, command_exit_codes
from flexslim.timer.server import GRACE_S, MAX_MODEL_MB, MAX_QUEUE, MAX_TIMEOUT_S

timer_app = typer.Typer(help="The remote timer: time ONNX models on this device for flexslim jobs run elsewhere.")
app.add_typer(timer_app, name="timer")


@timer_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on: loopback by default; a private one to serve.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port (0: any free port, printed).")] = 8765,
    token_file: Annotated[
        Optional[Path], typer.Option(help="File holding the token clients must send (required off loopback).")
    ] = None,
    insecure_no_token: Annotated[
        bool, typer.Option("--insecure-no-token", help="Serve without a token (loopback only).")
    ] = False,
    label: Annotated[str, typer.Option(help="A name for this device, part of its fingerprint.")] = "",
    tls_cert: Annotated[Optional[Path], typer.Option(help="TLS certificate (PEM) to serve https.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="TLS private key (PEM) of --tls-cert.")] = None,
    max_model_mb: Annotated[float, typer.Option(help="Largest model accepted (MiB); larger is 413.")] = MAX_MODEL_MB,
    max_queue: Annotated[int, typer.Option(help="Measurements that may wait; more is 503.")] = MAX_QUEUE,
    max_timeout: Annotated[float, typer.Option(help="Longest time limit a request may ask for (s).")] = MAX_TIMEOUT_S,
    grace: Annotated[float, typer.Option(help="Seconds the helper gets beyond a measurement's limit.")] = GRACE_S,
) -> None:
    """Serve timings until Ctrl-C: one measurement at a time, the gate's statistic, in an isolated helper process."""
    with command_exit_codes():
        from flexslim.timer.__main__ import config_from
        from flexslim.timer.server import serve as run_server

        flags = dict(host=host, port=port, label=label, tls_cert=tls_cert, tls_key=tls_key, max_queue=max_queue,
                     max_timeout=max_timeout, grace=grace)  # fmt: skip
        run_server(config_from(token_file, insecure_no_token, max_model_mb, **flags))
