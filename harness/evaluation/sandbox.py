"""Run untrusted generated code (MultiPL-E completions) in a constrained child process.

Isolation, from strongest to weakest layer:
- network: the child runs in a fresh network namespace (`unshare -n`, or `unshare --map-root-user -n` when we are
  not root), which has only a downed loopback, so every connect fails (127.0.0.1 included). On macOS the
  child runs under `sandbox-exec` with a deny-network profile. With neither available, `run_sandboxed` refuses
  to run (`SandboxUnavailable`) instead of silently executing with network access.
- processes: a new PID namespace when unshare allows it (killing its init kills every descendant, even ones
  that called setsid), plus a new session/process group that is SIGKILLed as a whole on timeout.
- resources: RLIMIT_AS (address space), RLIMIT_CPU (seconds of CPU), RLIMIT_NPROC (processes of this uid,
  counted from the ones it already has: the limit is per user, not per tree; root ignores it), RLIMIT_FSIZE.
- filesystem: a fresh temporary working directory, removed afterwards; a minimal environment. There is no
  filesystem jail: the code can read what the user can read. Do not run evaluation as a privileged user on a
  machine holding secrets.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024


class SandboxUnavailable(RuntimeError):
    """No way to cut the child off the network on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `memory_mb` None leaves RLIMIT_AS unset (the JVM reserves far more address space than it uses)."""

    timeout_s: float = 15.0          # wall clock, whole process tree
    cpu_s: int = 30                  # RLIMIT_CPU, per process
    memory_mb: int | None = 4096     # RLIMIT_AS, per process
    max_processes: int = 64          # on top of the processes this uid already runs
    max_file_mb: int = 64            # RLIMIT_FSIZE: biggest file the child may write
    max_output_bytes: int = 64 * 1024  # captured stdout/stderr kept (each), the rest is dropped


@dataclass(frozen=True)
class SandboxResult:
    status: str          # "passed" (exit 0), "failed" (non-zero exit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float       # wall clock

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that puts the child in its own network (and PID) namespace, probed once per process.

    Raises SandboxUnavailable when nothing on this machine can take the network away from the child.
    """
    unshare = shutil.which("unshare")
    if unshare:
        candidates = [
            (unshare, "-n", "-p", "--kill-child"),
            (unshare, "-n"),
            (unshare, "--map-root-user", "-n", "-p", "--kill-child"),
            (unshare, "--map-root-user", "-n"),
        ]
        for prefix in candidates:
            if _probe([*prefix, "true"]):
                return prefix
    sandbox_exec = shutil.which("sandbox-exec")
    if sandbox_exec and sys.platform == "darwin":
        prefix = (sandbox_exec, "-p", "(version 1)(allow default)(deny network*)")
        if _probe([*prefix, "true"]):
            return prefix
    raise SandboxUnavailable(
        "cannot isolate generated code from the network: `unshare -n` (util-linux) fails here and no macOS "
        "sandbox-exec is available. Allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) "
        "or install util-linux `unshare`, then rerun the code-execution suite."
    )


def _toolchain_env() -> dict[str, str]:
    # HOME is the temp dir, so toolchains that keep their state under the real home (rustup) are pointed at it.
    home = Path.home()
    env = {k: v for k, v in os.environ.items() if k in ("RUSTUP_HOME", "CARGO_HOME", "JAVA_HOME", "PYENV_ROOT")}
    for var, folder in (("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")):
        if var not in env and (home / folder).is_dir():
            env[var] = str(home / folder)
    return env


def _limit_child(limits: SandboxLimits, nproc_base: int):
    def apply() -> None:
        # Runs in the child between fork and exec (start_new_session already made it a session leader).
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        if limits.memory_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * MB, limits.memory_mb * MB))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb * MB, limits.max_file_mb * MB))
        nproc = nproc_base + limits.max_processes
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_sandboxed(argv: list[str], files: dict[str, str] | None = None, limits: SandboxLimits = SandboxLimits(),
                  env: dict[str, str] | None = None, stdin: str | None = None) -> SandboxResult:
    """Run `argv` inside a fresh temporary directory holding `files` (relative name -> text), without network.

    `argv[0]` is looked up on the parent's PATH; relative paths in argv resolve inside the temp dir.
    Returns the status, exit code, captured output (utf-8, truncated to `limits.max_output_bytes` each) and
    wall seconds. A run that exceeds `limits.timeout_s` has its whole process group (and PID namespace) killed.
    """
    prefix = isolation_prefix()
    with tempfile.TemporaryDirectory(prefix="fuselab-sandbox-") as work:
        for name, text in (files or {}).items():
            target = Path(work) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            **_toolchain_env(),
            **(env or {}),
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            [*prefix, *argv], cwd=work, env=child_env, start_new_session=True,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_limit_child(limits, _user_process_count()),
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode() if stdin is not None else None, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        finally:
            # Grandchildren that outlive a finished parent are killed too (same process group).
            _kill_group(proc)
        seconds = time.monotonic() - start
    cap = limits.max_output_bytes
    stdout = out[:cap].decode("utf-8", errors="replace")
    stderr = err[:cap].decode("utf-8", errors="replace")
    if timed_out:
        return SandboxResult("timeout", None, stdout, stderr, seconds)
    return SandboxResult("passed" if proc.returncode == 0 else "failed", proc.returncode, stdout, stderr, seconds)
