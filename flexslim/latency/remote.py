"""The remote timer's client: every latency measurement of a job made on the deployment device instead of here.

`--timer URL` (or `$FLEXSLIM_TIMER`) names a `flexslim timer serve` on the device; its token comes from
`--timer-token-file` (or `$FLEXSLIM_TIMER_TOKEN_FILE`, or the token itself in `$FLEXSLIM_TIMER_TOKEN`). The CLI
puts both in the environment for the job (`using`), so the processes it starts (the gate's, a bench's workers, a
sweep's searches, torchrun ranks) measure on the same device. With a timer:

- `profiling` times every network there (probe, fit, hold-out, refine, the bake's screens and sessions);
- the device fingerprint (`fingerprint.fingerprint`) is the server's, asked once per process and settings
  (`device`): the latency cache keys the device's points by it, never mixing them with this machine's;
- the gate (`deploy.gate.validate`) sends the model it checks and reads the device's timing.

A server that cannot be reached, a wrong token, a measurement refused: `TimerError` (BadInput, exit 2), one line
naming the URL and the cause. A measurement past its limit on the device is TimedOut (exit 1), as it is here.

    with using("http://10.0.0.7:8765", Path("token")):
        timer = configured()                      # Timer(url=..., token=...)
        device(timer, settings)["fingerprint_id"]
        time_model(timer, onnx_bytes, "cpu", TimingPlan(batch=32, min_seconds=1.0))
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from flexslim.errors import BadInput, TimedOut
from flexslim.latency import wire
from flexslim.latency.runtime import DEFAULT_TIMEOUT, Timing, TimingPlan
from flexslim.recipe.schema import LatencyConfig

ENV_URL = "FLEXSLIM_TIMER"
ENV_TOKEN_FILE = "FLEXSLIM_TIMER_TOKEN_FILE"
ENV_TOKEN = "FLEXSLIM_TIMER_TOKEN"
CONNECT_TIMEOUT_S = 10.0
SLACK_S = 120.0  # beyond a measurement's own limit: the server's helper grace, the queue, the transfer


class TimerError(BadInput):
    """The remote timer could not measure: unreachable, refused the token, refused the request (exit 2)."""


@dataclass(frozen=True)
class Timer:
    """Where the device's timer listens and the token it wants (None: a loopback server without one)."""

    url: str
    token: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"Timer({self.url!r})"


def check_url(url: str, origin: str = "--timer") -> str:
    """`url` when it is http(s)://host:port[/] (BadInput otherwise); trailing slashes dropped."""
    u = urllib.parse.urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.username:
        raise BadInput(f"{origin} {url!r}: expected http://HOST:PORT or https://HOST:PORT of a `flexslim timer serve`")
    try:
        _ = u.port  # raises for a port that is not a number
    except ValueError:
        raise BadInput(f"{origin} {url!r}: the port is not a number") from None
    return f"{u.scheme}://{u.netloc}"


def configured() -> Timer | None:
    """The timer the environment names (None: measure on this machine). A bad URL or token file is BadInput."""
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        return None
    url = check_url(url, ENV_URL)
    token = os.environ.get(ENV_TOKEN, "").strip() or None
    file = os.environ.get(ENV_TOKEN_FILE, "").strip()
    if token is None and file:
        try:
            token = Path(file).read_text().strip() or None
        except OSError as err:
            raise BadInput(f"timer token file {file} cannot be read ({err.strerror or err})") from None
        if token is None:
            raise BadInput(f"timer token file {file} is empty")
    return Timer(url, token)


@contextlib.contextmanager
def using(url: str | None, token_file: Path | None = None) -> Iterator[Timer | None]:
    """While open: the environment names `url` (and `token_file`) for this process and the ones it starts; None
    leaves the environment as it is (`$FLEXSLIM_TIMER` may still name one). Yields `configured()`."""
    saved = {k: os.environ.get(k) for k in (ENV_URL, ENV_TOKEN_FILE)}
    try:
        if url is not None:
            os.environ[ENV_URL] = check_url(url)
        if token_file is not None:
            if not Path(token_file).is_file():
                raise BadInput(f"--timer-token-file {token_file} does not exist")
            os.environ[ENV_TOKEN_FILE] = str(Path(token_file).resolve())
        yield configured()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timer_environment() -> dict[str, str | None]:
    """The environment variables that name the timer, as they are now (None: unset): for a process started before."""
    return {k: os.environ.get(k) for k in (ENV_URL, ENV_TOKEN_FILE, ENV_TOKEN)}


def set_timer_environment(env: dict[str, str | None]) -> None:
    """Make this process's timer variables those of `env` (`timer_environment` of another process)."""
    for k in (ENV_URL, ENV_TOKEN_FILE, ENV_TOKEN):
        if env.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = env[k]


def where(timer: Timer | None) -> str:
    """What records say measured: the timer's URL, or "local"."""
    return timer.url if timer is not None else "local"


# -- asking the device --------------------------------------------------------------------------------------------
_DEVICES: dict[tuple, dict] = {}


def device(timer: Timer, settings: LatencyConfig) -> dict:
    """The server's /info at `settings` (its fingerprint, versions, limits), asked once per process."""
    key = (timer.url, *wire.settings_query(settings).items())
    if key not in _DEVICES:
        query = urllib.parse.urlencode(wire.settings_query(settings))
        status, body = _call(timer, "GET", f"/info?{query}", None, {}, CONNECT_TIMEOUT_S + 20)
        if status != 200:
            raise _refused(timer, status, body, "GET /info")
        if body.get("protocol") != wire.PROTOCOL or not isinstance(body.get("fingerprint"), dict):
            raise TimerError(
                f"timer {timer.url}: speaks protocol {body.get('protocol')!r}, this flexslim {wire.PROTOCOL}; "
                "install the same flexslim on both sides"
            )
        _DEVICES[key] = body
    return _DEVICES[key]


def time_model(timer: Timer, model: bytes, provider: str, plan: TimingPlan, budget_ms: float | None = None) -> Timing:
    """One session of the ONNX `model` timed on the device with `plan` (a stopped timing comes back as such)."""
    limit = plan.timeout if plan.timeout is not None else DEFAULT_TIMEOUT
    plan_sent = replace(plan, timeout=limit)
    cap = device(
        timer, LatencyConfig(provider=provider, batch=plan.batch, threads=plan.threads, percentile=plan.percentile)
    ).get("max_model_bytes")
    if isinstance(cap, int) and len(model) > cap:
        raise TimerError(
            f"timer {timer.url}: the model is {len(model)} bytes, over the server's cap of {cap} (its --max-model-mb)"
        )
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Flexslim-Request": json.dumps(wire.request_dict(provider, plan_sent, budget_ms)),
    }
    status, body = _call(timer, "POST", "/time", model, headers, limit + SLACK_S)
    if status == 504:
        raise TimedOut(f"gate failed: {body.get('error', 'timed out')} (on the timer {timer.url})")
    if status != 200:
        raise _refused(timer, status, body, "POST /time")
    try:
        return wire.timing_from_dict(body["timing"])
    except (KeyError, TypeError, ValueError) as err:
        raise TimerError(f"timer {timer.url}: answered a timing flexslim cannot read ({err})") from None


def time_model_bytes(timer: Timer, model: bytes, provider: str, plan: TimingPlan) -> Timing:
    """`runtime.time_model_bytes` on the device: a timing past `plan.timeout` is TimedOut (exit 1)."""
    t = time_model(timer, model, provider, plan)
    if t.stopped == "timeout":
        raise TimedOut(
            f"gate failed: timed out after {t.timeout_s or plan.timeout:g} s timing a network on the timer "
            f"{timer.url} ({t.runs} timed passes of batch {t.batch}); raise latency.timeout to measure it"
        )
    return t


def _refused(timer: Timer, status: int, body: dict, what: str) -> TimerError:
    why = body.get("error", "") if isinstance(body, dict) else ""
    hint = {401: "; pass the server's token (--timer-token-file)", 503: "; it is busy: retry"}.get(status, "")
    return TimerError(f"timer {timer.url}: {what} answered {status} ({why or 'no reason given'}){hint}")


def _call(timer: Timer, method: str, path: str, body: bytes | None, headers: dict, read_timeout: float):
    """(status, JSON answer) of one request; TimerError for a connection that fails or an answer that is not JSON."""
    u = urllib.parse.urlsplit(timer.url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(
            u.hostname,
            u.port or 443,
            timeout=CONNECT_TIMEOUT_S,
            context=ssl.create_default_context(cafile=os.environ.get("FLEXSLIM_TIMER_CA")),
        )
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=CONNECT_TIMEOUT_S)
    headers = dict(headers)
    if timer.token:
        headers["Authorization"] = f"Bearer {timer.token}"
    try:
        conn.connect()
        conn.sock.settimeout(read_timeout)
        conn.putrequest(method, path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders()
        if body:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused early: read why below
                conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
    except ConnectionRefusedError:
        raise TimerError(f"timer {timer.url}: connection refused (is `flexslim timer serve` running there?)") from None
    except TimeoutError:
        raise TimerError(f"timer {timer.url}: no answer within {read_timeout:g} s") from None
    except ssl.SSLError as err:
        raise TimerError(
            f"timer {timer.url}: TLS failed ({err.reason or err}); set FLEXSLIM_TIMER_CA to its certificate"
        ) from None
    except (OSError, http.client.HTTPException) as err:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else (str(err) or type(err).__name__)
        raise TimerError(
            f"timer {timer.url}: the connection failed ({cause}); the server may have stopped. "
            "Restart it and rerun with --resume"
        ) from None
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TimerError(
            f"timer {timer.url}: answered {resp.status} with something that is not JSON (is it a flexslim timer?)"
        ) from None
    return resp.status, answer if isinstance(answer, dict) else {}
