"""`fuselab ui`: an MLflow tracking server (the UI, and artifact proxying for other machines) on a FuseLab store.

`ui_main` starts `mlflow server --serve-artifacts` in its own process group and waits until it answers; a busy
port is refused before anything starts or is written; `stop_ui` ends the whole group.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.processes import free_port
from harness.tracking import TrackingError, is_server_uri, resolve_tracking_uri


def port_in_use(host: str, port: int) -> bool:
    """True when a process listens on `host:port` (a socket bound the way servers bind, with SO_REUSEADDR, is
    refused). Raises TrackingError naming the address when it cannot be bound for another reason."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise TrackingError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return False


def ui_command(uri: str, host: str, port: int, artifacts: Path) -> list[str]:
    """`mlflow server` on store `uri`, proxying artifacts to the folder `artifacts` (so clients on other
    machines log artifacts through it: `mlflow-artifacts:/`)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]


def ui_main(workdir: Path, host: str = "127.0.0.1", port: int = 5000, block: bool = True,
            uri: str | None = None, timeout_s: float = 180.0) -> subprocess.Popen:
    """Start the MLflow UI (a tracking server) on store `uri` (default: `resolve_tracking_uri`: the
    MLFLOW_TRACKING_URI store, else the work dir's) and wait until it answers `/health`.

    Artifacts of experiments created through it go to `<workdir>/mlartifacts`, served to clients.
    Runs `mlflow server ... --workers 1` with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` (with the defaults
    MLflow 3.17 took ~52 s to serve and left 7 job processes behind); its own process group so `stop_ui` ends
    all of it; its output appended to `<workdir>/mlflow-ui-<port>.log`. `block=True`: serve until Ctrl-C, then
    stop. Returns the process (already ended when `block`). Raises TrackingError when `uri` is a server
    (it serves its own UI), when `port` is taken (before anything starts or is written), when the server exits
    or does not answer within `timeout_s` seconds.
    """
    workdir = Path(workdir).expanduser().resolve()
    uri = resolve_tracking_uri(uri, workdir)
    if is_server_uri(uri):
        raise TrackingError(f"{uri} is a tracking server: its UI is served there already (open it in a browser)")
    if port_in_use(host, port):
        raise TrackingError(f"port {port} on {host} is in use (another MLflow UI or server?): pass a free port, "
                            f"e.g. --port {free_port(host)}")
    log_path = workdir / f"mlflow-ui-{port}.log"
    with open(log_path, "ab") as log:
        log.write(f"--- fuselab ui {time.strftime('%Y-%m-%d %H:%M:%S')}: store {uri}\n".encode())
        log.flush()
        proc = subprocess.Popen(ui_command(uri, host, port, workdir / "mlartifacts"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    url = f"http://{host}:{port}"
    try:
        _wait_until_serving(proc, url, log_path, timeout_s)
    except BaseException:  # Ctrl-C while it starts: its own session does not get the signal
        stop_ui(proc)
        raise
    print(f"MLflow UI on {url} (store {uri}; log {log_path}); Ctrl-C to stop", flush=True)
    if block:
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_ui(proc)
    return proc


def _wait_until_serving(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Return once `url/health` answers; TrackingError (naming the log) if `proc` exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not _answers(f"{url}/health"):
        if proc.poll() is not None:
            raise TrackingError(f"the MLflow server exited with code {proc.returncode} before serving {url}: "
                                f"see {log_path} ({_last_line(log_path)})")
        if time.monotonic() > deadline:
            raise TrackingError(f"the MLflow server did not answer at {url} within {timeout_s:.0f} s: see {log_path}")
        time.sleep(0.5)
    if proc.poll() is not None:  # what answered is another process that took the port meanwhile
        raise TrackingError(f"the MLflow server exited with code {proc.returncode}; {url} is served by another "
                            f"process: see {log_path}")


def stop_ui(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `timeout_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # uvicorn workers may outlive their parent
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (the error a server died with)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "no output"
