"""`python -m flexslim.timer serve ...`: the timer server's command line for a device that has onnxruntime and
numpy but not torch or typer (the same flags as `flexslim timer serve`). Bad flags: one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexslim.errors import EXIT_BAD_INPUT, BadInput
from flexslim.timer.server import GRACE_S, MAX_MODEL_MB, MAX_QUEUE, MAX_TIMEOUT_S, ServeConfig, read_token, serve


def config_from(
    token_file: Path | None, insecure_no_token: bool, max_model_mb: float = MAX_MODEL_MB, **rest
) -> ServeConfig:
    """The ServeConfig the flags describe: the token read from `token_file` (BadInput for a token file that is
    missing or a token that is absent), `max_model_mb` in bytes, the other flags (host, port, label, tls_cert,
    tls_key, max_queue, max_timeout, grace) as ServeConfig's fields of the same names."""
    if token_file is None and not insecure_no_token:
        raise BadInput(
            "pass --token-file FILE (a file holding the token clients must send), or --insecure-no-token on loopback"
        )
    if token_file is not None and insecure_no_token:
        raise BadInput("--token-file and --insecure-no-token exclude each other")
    if not max_model_mb > 0:
        raise BadInput(f"--max-model-mb {max_model_mb}: must be positive")
    token = read_token(token_file) if token_file is not None else None
    return ServeConfig(token=token, max_model_bytes=int(max_model_mb * 2**20), **rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexslim.timer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="time ONNX models on this device for flexslim jobs elsewhere")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token-file", type=Path)
    s.add_argument("--insecure-no-token", action="store_true")
    s.add_argument("--label", default="")
    s.add_argument("--tls-cert", type=Path)
    s.add_argument("--tls-key", type=Path)
    s.add_argument("--max-model-mb", type=float, default=MAX_MODEL_MB)
    s.add_argument("--max-queue", type=int, default=MAX_QUEUE)
    s.add_argument("--max-timeout", type=float, default=MAX_TIMEOUT_S)
    s.add_argument("--grace", type=float, default=GRACE_S)
    a = p.parse_args(argv)
    del a.command
    try:
        serve(config_from(**vars(a)))
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
