"""`flexslim timer serve`: time ONNX models on this device for a flexslim job running elsewhere.

The deployment device (an edge box, a Jetson, the production GPU server) runs this server; the training machine
passes `--timer URL` and every latency measurement of its job - probe, fit, hold-out, bake, gate - is made here,
with the gate's own statistic (`flexslim.latency.runtime.time_session`, in the isolated helper process). It needs
only onnxruntime and numpy: this module imports neither torch nor onnx.

HTTP, one JSON answer per request:

    GET  /health                      {"ok": true}                                      (no token)
    GET  /info?provider=&batch=&threads=&percentile=
                                      this device's fingerprint at those settings, versions, limits, queue
    POST /time                        body: the ONNX model's bytes; header X-Flexslim-Request: the JSON of
                                      `wire.request_dict` -> {"timing", "fingerprint", "fingerprint_id", ...}

Safe by construction: the token (header `Authorization: Bearer ...`) is compared in constant time before anything
else is read; a body must declare its length, at most `max_model_bytes`, and be a serialised ONNX ModelProto (no
pickle, no paths); settings are checked like the CLI's flags (`wire.request_from_dict`); the model is opened by
onnxruntime only in the helper process, which is killed when a measurement outlives its limit, so a hostile or
broken model cannot hang or crash the server. One measurement at a time: requests queue (at most `max_queue`
waiting, else 503), so timings never overlap on the device. Errors: 400 (bad settings or body), 401 (token),
404, 411 (no length), 413 (too large), 500 (the helper died), 503 (queue full), 504 (past the time limit). Every
request is one log line (stderr): when, who, what, the answer, and for a measurement its start and end times.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flexslim.errors import BadInput, TimedOut, TimingFailed
from flexslim.latency import wire
from flexslim.latency.fingerprint import fingerprint_id, local_fingerprint

MAX_MODEL_MB = 256.0
MAX_QUEUE = 4
GRACE_S = 30.0  # the helper's slack beyond a measurement's own time limit (spawn, imports, opening the model)
MAX_TIMEOUT_S = 600.0
REQUEST_HEADER = "X-Flexslim-Request"
MAX_REQUEST_HEADER = 4096  # characters of the settings header
READ_TIMEOUT_S = 60.0  # a client that stops sending its body mid-way is dropped after this long


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs (the flags of `flexslim timer serve`)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # None: no token (loopback only, --insecure-no-token)
    label: str = ""  # a name for this device, part of its fingerprint
    max_model_bytes: int = int(MAX_MODEL_MB * 2**20)
    max_queue: int = MAX_QUEUE
    max_timeout: float = MAX_TIMEOUT_S
    grace: float = GRACE_S
    tls_cert: Path | None = None
    tls_key: Path | None = None


def read_token(path: Path) -> str:
    """The token in `path` (surrounding whitespace stripped): BadInput when it is missing, unreadable or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise BadInput(f"--token-file {path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise BadInput(f"--token-file {path}: not text") from None
    if not token:
        raise BadInput(f"--token-file {path} is empty; write a long random token into it (e.g. `openssl rand -hex 32`)")
    if any(c.isspace() for c in token) or len(token) < 16:
        raise BadInput(f"--token-file {path}: the token must be one word of at least 16 characters")
    return token


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(c: ServeConfig) -> ServeConfig:
    """BadInput for a configuration that would be unsafe or cannot work (see the flags' help)."""
    if c.token is None and not is_loopback(c.host):
        raise BadInput(
            f"--host {c.host}: serving without a token is only allowed on loopback (127.0.0.1); pass --token-file"
        )
    if (c.tls_cert is None) != (c.tls_key is None):
        raise BadInput("--tls-cert and --tls-key go together: pass both or neither")
    for flag, p in (("--tls-cert", c.tls_cert), ("--tls-key", c.tls_key)):
        if p is not None and not Path(p).is_file():
            raise BadInput(f"{flag} {p} does not exist")
    if not 0 <= c.port <= 65535:
        raise BadInput(f"--port {c.port}: must be 0 .. 65535")
    if c.max_queue < 1 or c.max_model_bytes < 1 or c.max_timeout <= 0 or c.grace <= 0:
        raise BadInput("--max-queue, --max-model-mb, --max-timeout and --grace must be positive")
    return c


def measure(model: bytes, provider: str, plan, budget_ms: float | None):
    """The unit of work of the helper process: a session of `model` and its timing (a stopped timing is returned
    as such: the client decides what a stop means for its job)."""
    from flexslim.latency.runtime import time_session
    from flexslim.latency.sessions import make_session

    try:
        session = make_session(model, provider, plan.threads)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - onnxruntime refuses what it cannot parse or run: the client's input
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"onnxruntime cannot load the model: {first[:200]}") from None
    return time_session(session, plan, budget_ms=budget_ms)


class _State:
    """What the request threads share: the configuration, the queue and the one-at-a-time measurement lock."""

    def __init__(self, config: ServeConfig, log):
        self.config, self.log = config, log
        self.cond = threading.Condition()
        self.waiting = 0  # requests admitted to the queue, the one measuring included
        self.measuring = threading.Lock()
        self.serial = 0
        self.log_lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.log_lock:
            print(line, file=self.log, flush=True)


class _Answer(Exception):
    """An HTTP error answer: status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server_version = f"flexslim-timer/{wire.PROTOCOL}"
    timeout = READ_TIMEOUT_S  # the socket's timeout: a stalled client cannot hold a thread forever

    @property
    def state(self) -> _State:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; our own line replaces it
        pass

    # -- routing ------------------------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - http.server's name
        self._serve(self._get)

    def do_POST(self):  # noqa: N802
        self._serve(self._post)

    def do_PUT(self):  # noqa: N802
        self._serve(lambda: self._fail(405, "only GET /health, GET /info and POST /time"))

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _serve(self, route) -> None:
        self._extra, t0 = "", time.time()
        try:
            status, body = route()
        except _Answer as a:
            status, body = a.status, {"error": str(a)}
            self.close_connection = True  # the body (if any) was not read: never parse it as the next request
        except Exception as err:  # noqa: BLE001 - the server keeps serving whatever one request does
            status, body = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
            self.close_connection = True
        data = json.dumps(body).encode()
        what = body.get("error", "") if status != 200 else ""
        self.state.write(  # before the answer: a client that has its answer finds the request in the log
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t0))}Z {self.client_address[0]} {self.command} "
            f"{urllib.parse.urlsplit(self.path).path} {status} {time.time() - t0:.3f}s{self._extra}"
            + (f" error={what!r}" if what else "")
        )
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away; the log line says what it was answered

    def _fail(self, status: int, message: str):
        raise _Answer(status, message)

    def _authorized(self) -> None:
        token = self.state.config.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme != "Bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            self._fail(401, "missing or wrong token (header Authorization: Bearer <token>)")

    # -- GET ----------------------------------------------------------------------------------------------------
    def _get(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/health":
            return 200, {"ok": True}
        self._authorized()
        if url.path != "/info":
            self._fail(404, f"no such endpoint {url.path}: GET /health, GET /info, POST /time")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            settings = wire.settings_from_query(query)
            fp = _fingerprint(settings, self.state.config.label)
        except BadInput as err:
            self._fail(400, str(err))
        return 200, {**_about(self.state), "fingerprint": fp, "fingerprint_id": fingerprint_id(fp)}

    # -- POST /time ---------------------------------------------------------------------------------------------
    def _post(self):
        url = urllib.parse.urlsplit(self.path)
        self._authorized()  # before anything of the request's body is read
        if url.path != "/time":
            self._fail(404, f"no such endpoint {url.path}: POST /time")
        length = self._length()
        provider, plan, budget_ms = self._request()
        with self.state.cond:
            if self.state.waiting >= self.state.config.max_queue:
                self._fail(503, f"busy: {self.state.waiting} measurements queued (--max-queue); retry later")
            self.state.waiting += 1
        try:
            model = self._body(length)
            return 200, self._measured(model, provider, plan, budget_ms)
        finally:
            with self.state.cond:
                self.state.waiting -= 1

    def _length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._fail(411, "the request must say its Content-Length")
        try:
            length = int(raw)
        except ValueError:
            self._fail(400, f"Content-Length {raw!r} is not a number")
        if length < 0:
            self._fail(400, f"Content-Length {raw!r} is not a length")
        cap = self.state.config.max_model_bytes
        if length > cap:
            self._fail(413, f"the model is {length} bytes, over this server's cap of {cap} (--max-model-mb)")
        return length

    def _request(self):
        raw = self.headers.get(REQUEST_HEADER)
        if raw is None or len(raw) > MAX_REQUEST_HEADER:
            self._fail(
                400,
                f"header {REQUEST_HEADER} (the timing settings as JSON, at most {MAX_REQUEST_HEADER} "
                "characters) is missing or too long",
            )
        try:
            return wire.request_from_dict(json.loads(raw), self.state.config.max_timeout)
        except json.JSONDecodeError:
            self._fail(400, f"header {REQUEST_HEADER} is not JSON")
        except BadInput as err:
            self._fail(400, str(err))

    def _body(self, length: int) -> bytes:
        chunks, left = [], length
        try:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except (TimeoutError, OSError):
            self._fail(400, "the body stopped arriving")
        if left:
            self._fail(400, f"the body ended after {length - left} of {length} bytes")
        model = b"".join(chunks)
        if not model or model[0] != 0x08:  # a serialised ModelProto begins with its ir_version (field 1, varint)
            self._fail(400, "the body is not an ONNX model (send the bytes of a .onnx file)")
        return model

    def _measured(self, model: bytes, provider: str, plan, budget_ms) -> dict:
        from flexslim.latency.isolated import run_isolated

        st = self.state
        digest = hashlib.sha256(model).hexdigest()[:12]
        settings = wire.LatencyConfig(
            provider=provider, batch=plan.batch, threads=plan.threads, percentile=plan.percentile
        )
        with st.measuring:  # one at a time: timings never overlap on the device
            started = time.time()
            st.serial += 1
            serial = st.serial
            try:
                fp = _fingerprint(settings, st.config.label)
                timing = run_isolated(measure, model, provider, plan, budget_ms, limit_s=plan.timeout + st.config.grace)
            except BadInput as err:
                self._fail(400, str(err))
            except TimedOut as err:
                self._fail(504, str(err))
            except TimingFailed as err:
                self._fail(500, str(err))
            finally:
                ended = time.time()
                self._extra = f" model={digest} bytes={len(model)} measure={started:.6f}..{ended:.6f} n={serial}"
        self._extra += f" p{plan.percentile:g}={timing.at_percentile_ms:.5f}ms stopped={timing.stopped}"
        return {
            "timing": timing.to_dict(),
            "fingerprint": fp,
            "fingerprint_id": fingerprint_id(fp),
            "started": started,
            "ended": ended,
            "serial": serial,
        }


def _fingerprint(settings, label: str) -> dict:
    from flexslim.latency.sessions import provider_that_runs_here

    return local_fingerprint(settings, provider_that_runs_here(settings.provider), label)


def _about(state: _State) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    try:
        flexslim_version = version("flexslim")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        flexslim_version = "0.0.0+local"
    c = state.config
    return {
        "protocol": wire.PROTOCOL,
        "flexslim": flexslim_version,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "label": c.label,
        "max_model_bytes": c.max_model_bytes,
        "max_timeout": c.max_timeout,
        "queue": state.waiting,
        "max_queue": c.max_queue,
    }


class TimerServer(ThreadingHTTPServer):
    """The HTTP server with its shared state (`state`); `url` is where it listens."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: ServeConfig, log=None):
        self.state = _State(check_config(config), log or sys.stderr)
        try:
            super().__init__((config.host, config.port), _Handler)
        except OSError as err:
            raise BadInput(f"cannot listen on {config.host}:{config.port} ({err.strerror or err})") from None
        self.scheme = "http"
        if config.tls_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
            except (ssl.SSLError, OSError) as err:
                raise BadInput(f"--tls-cert/--tls-key cannot be loaded ({err})") from None
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{self.scheme}://{host}:{port}"


def serve(config: ServeConfig, log=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM end it cleanly); prints where it listens and for which device."""
    import signal

    from flexslim.latency.isolated import _kill_pool

    server = TimerServer(config, log)
    st = server.state
    fp = _fingerprint(wire.LatencyConfig(provider="auto"), config.label)
    st.write(
        f"flexslim timer listening on {server.url} (device {fingerprint_id(fp)}: {fp.get('cpu', '?')}"
        f"{', ' + fp['gpu'] if fp.get('gpu') else ''}, onnxruntime {fp.get('onnxruntime')}"
        f"{', label ' + config.label if config.label else ''}); "
        f"{'token required' if config.token else 'NO TOKEN (loopback only)'}, one measurement at a time, "
        f"queue {config.max_queue}"
    )
    if not is_loopback(config.host):
        st.write(
            "note: reachable beyond this machine: keep it on a private network behind a firewall, never the internet"
        )

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        st.write("flexslim timer stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        _kill_pool()
