"""Run untrusted generated code (MultiPL-E completions) in a jail.

The jail (default, Linux, bubblewrap `bwrap`):
- filesystem: a fresh mount namespace whose root is an empty, read-only tmpfs. Visible read-only: the system
  directories (/usr, /bin, /lib...), a short allow-list of /etc entries that toolchains need (the dynamic linker
  cache, `alternatives`, Java's configuration...), a synthetic /etc/passwd and /etc/group, and the install
  prefixes of the executables the run needs (the Python interpreter and its venv, rustup's home...). Writable:
  only the private work directory `/sandbox` (the program's files, its cwd and HOME), /tmp and /dev/shm, each a
  size-limited tmpfs that disappears with the run. Home directories, the project tree, the stage cache and the
  host /tmp are not there at all.
- user: when the evaluator is root, the program runs as a fresh unprivileged uid/gid (no supplementary groups,
  no capabilities, no_new_privs), one per run, so root-owned files are out of reach even where visible and the
  kernel's per-user process limit counts this run only. When the evaluator is not root it runs as the
  evaluator's own uid inside a user namespace that may not create further user namespaces.
- processes: a new PID namespace with its own /proc (host processes and their environments are not visible);
  when the run ends, however it ends, its PID namespace is torn down, so a daemonised child dies with it.
- network: a new network namespace with only a downed loopback: every connect fails.
- resources: the total memory and number of processes of the whole run are limited by a cgroup when one is
  writable here (v2 delegated, or v1 as root): the kernel accounts every page, tmpfs files included; otherwise a
  supervisor polls the run's process tree and kills the whole run when its summed resident memory passes the
  limit, and RLIMIT_NPROC bounds its processes. Per process: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE.
  Output is streamed: at most `max_output_bytes` of stdout and of stderr are kept, the rest is read and dropped,
  so the evaluator's memory does not grow with what the program prints. The wall-clock timeout kills the run.

Where the jail cannot be built (no bwrap, no user namespaces for a non-root evaluator, not Linux), every run
raises `SandboxUnavailable` saying what to install or allow, unless the user names the unjailed mode:
`FUSELAB_SANDBOX=unjailed`. Unjailed, the program runs as the evaluator's own user in a temporary directory,
with the same resource limits, output cap and timeout, cut off the network (and in its own PID namespace) when
`unshare` allows it, but with the whole filesystem of the user visible and writable.
`FUSELAB_SANDBOX_CGROUP=off` uses the polling supervisor even where a cgroup is writable.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.processes import pid_alive

MB = 1024 * 1024
MODE_ENV = "FUSELAB_SANDBOX"
CGROUP_ENV = "FUSELAB_SANDBOX_CGROUP"
JAIL, UNJAILED = "jail", "unjailed"
WORK_DIR = "/sandbox"  # the program's cwd and HOME inside the jail

# Read-only inside the jail when they exist (symlinks are recreated as symlinks: merged-/usr systems).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc entries toolchains read; everything else in /etc (passwd, shadow, ssh, credentials) stays invisible.
ETC_VISIBLE = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
               "java-*", "mono", "R", "php", "php*", "ruby*", "perl", "gprolog", "lua*", "julia")
_SANDBOX_UID_BASE = 1_500_000_000  # fresh uids far above any real account; one per run (root evaluator only)
_POLL_S = 0.05
_CGROUP_PREFIX = "fuselab-sandbox"


class SandboxUnavailable(RuntimeError):
    """The jail cannot be built on this machine (and the unjailed mode was not chosen)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. `memory_mb` None leaves RLIMIT_AS unset (the JVM reserves far more address space than it
    uses); the run's total memory is still bounded by `total_memory_mb`."""

    timeout_s: float = 15.0          # wall clock, whole run
    cpu_s: int = 30                  # RLIMIT_CPU, per process
    memory_mb: int | None = 4096     # RLIMIT_AS, per process
    total_memory_mb: int = 4096      # every process of the run together (cgroup, else summed RSS)
    max_processes: int = 64          # processes and threads of the run together
    max_file_mb: int = 64            # RLIMIT_FSIZE: biggest file the program may write
    work_dir_mb: int = 256           # size of each writable tmpfs (/sandbox, /tmp, /dev/shm)
    max_open_files: int = 1024       # RLIMIT_NOFILE
    max_output_bytes: int = 64 * 1024  # stdout and stderr kept (each); the rest is read and dropped


@dataclass(frozen=True)
class SandboxResult:
    status: str          # "passed" (exit 0), "failed" (non-zero exit), "timeout", "memory" (total limit hit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float       # wall clock
    peak_memory_mb: float = 0.0  # the run's peak total memory as seen by the cgroup or the supervisor's polls

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def sandbox_mode() -> str:
    """"jail" (default) or "unjailed", from env FUSELAB_SANDBOX."""
    mode = os.environ.get(MODE_ENV, JAIL).strip().lower() or JAIL
    if mode not in (JAIL, UNJAILED):
        raise ValueError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: expected {JAIL!r} (default) or {UNJAILED!r}")
    return mode


def check_sandbox() -> str:
    """The mode runs will use; raises SandboxUnavailable now (e.g. at plan time) if the jail is needed but
    cannot be built here."""
    mode = sandbox_mode()
    if mode == JAIL:
        problem = jail_problem()
        if problem:
            raise SandboxUnavailable(problem)
    return mode


# ------------------------------------------------------------------------------------------- the jail
def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _install_prefix(executable: str) -> str | None:
    """/x/venv/bin/python -> /x/venv; /opt/t/tool -> /opt/t. None for the system directories."""
    parent = os.path.dirname(executable)
    prefix = os.path.dirname(parent) if os.path.basename(parent) in ("bin", "sbin") else parent
    if prefix in ("", "/") or _under(prefix, SYSTEM_PATHS):
        return None
    return prefix


def _tool_paths(names, path_env: str) -> list[str]:
    """Install prefixes (as named and as resolved through symlinks) of executables looked up on `path_env`."""
    out = []
    for name in names:
        if "/" in name and not os.path.isabs(name):
            continue  # relative to the work directory: nothing of the host to expose
        found = shutil.which(name, path=path_env) if "/" not in name else name
        if not found:
            continue
        for candidate in (os.path.abspath(found), os.path.realpath(found)):
            prefix = _install_prefix(candidate)
            if prefix:
                out.append(prefix)
    return out


def _toolchain_env() -> dict[str, str]:
    # Toolchains that keep their state under the real home (rustup) are pointed at it: HOME is the work dir.
    home = Path.home()
    env = {k: v for k, v in os.environ.items() if k in ("RUSTUP_HOME", "CARGO_HOME", "JAVA_HOME", "PYENV_ROOT")}
    for var, folder in (("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")):
        if var not in env and (home / folder).is_dir():
            env[var] = str(home / folder)
    return env


def _minimal(paths: list[str]) -> list[str]:
    """Existing absolute paths, deduplicated, without those inside another one of the list."""
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)}):
        if not _under(p, out):
            out.append(p)
    return out


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _fd_arg(fds: list[int], name: str, data: bytes) -> str:
    """A memfd holding `data`, appended to `fds`; its number as a bwrap argument."""
    fds.append(_memfd(name, data))
    return str(fds[-1])


def _parent_dirs(path: str, made: set[str], mode: str = "0755") -> list[str]:
    """bwrap arguments creating the parents of `path` not in `made` (which records them)."""
    # bwrap would create missing parents mode 0700 (root's when we are root): make them traversable.
    out = []
    for parent in reversed(Path(path).parents):
        if str(parent) not in made:
            out += ["--perms", mode, "--dir", str(parent)]
            made.add(str(parent))
    return out


def _namespace_args(info_write: int, as_root: bool) -> list[str]:
    """bwrap and its namespace options (the program, its parent, session and info pipe)."""
    cmd = [shutil.which("bwrap"), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--info-fd", str(info_write)]
    if not as_root:
        cmd += ["--unshare-user", "--disable-userns"]
    return cmd + ["--hostname", "sandbox"]


def _filesystem_args(limits: SandboxLimits, dir_mode: str, made: set[str]) -> list[str]:
    """The read-only system directories, /proc, /dev and the size-limited writable tmpfs mounts."""
    cmd = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    size = str(limits.work_dir_mb * MB)
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
            "--perms", dir_mode, "--size", size, "--tmpfs", WORK_DIR]
    made.update(("/proc", "/dev", "/dev/shm", "/tmp", WORK_DIR))
    return cmd


def _visible_args(visible: list[str], made: set[str]) -> list[str]:
    """Read-only binds of the allowed /etc entries and of `visible` (paths outside the system directories)."""
    # After the tmpfs mounts, so that a path exposed under /tmp is not hidden by the jail's own /tmp.
    etc = sorted({p for pattern in ETC_VISIBLE for p in glob.glob(os.path.join("/etc", pattern))})
    cmd = []
    for path in _minimal(etc + [p for p in visible if not _under(os.path.abspath(p), SYSTEM_PATHS)]):
        cmd += _parent_dirs(path, made) + ["--ro-bind", path, path]
    return cmd


def _account_args(uid: int, gid: int, fds: list[int], made: set[str]) -> list[str]:
    """A synthetic /etc/passwd and /etc/group naming the sandbox user."""
    passwd = (f"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}:sandbox:{WORK_DIR}:/bin/sh\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    group = f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"
    return _parent_dirs("/etc/passwd", made) + [
        "--perms", "0644", "--ro-bind-data", _fd_arg(fds, "passwd", passwd.encode()), "/etc/passwd",
        "--perms", "0644", "--ro-bind-data", _fd_arg(fds, "group", group.encode()), "/etc/group"]


def _work_file_args(files: dict[str, str], modes: tuple[str, str], fds: list[int], made: set[str]) -> list[str]:
    """The program's files (relative name -> text) under the work directory; modes: (directories, files)."""
    dir_mode, file_mode = modes
    cmd = []
    for name, text in files.items():
        target = os.path.normpath(os.path.join(WORK_DIR, name))
        if not _under(target, [WORK_DIR]) or target == WORK_DIR:
            raise ValueError(f"run_sandboxed: file name {name!r} leaves the work directory")
        cmd += _parent_dirs(target, made, dir_mode)
        cmd += ["--perms", file_mode, "--file", _fd_arg(fds, name, text.encode("utf-8")), target]
    return cmd


def _jail_command(argv: list[str], files: dict[str, str], limits: SandboxLimits, visible: list[str],
                  fds: list[int]) -> tuple[list[str], int]:
    """bwrap argv running `argv` jailed, and the read end of bwrap's info pipe. Every descriptor the command
    needs is appended to `fds` (the caller passes them to the child and closes them, the info read end too)."""
    as_root = os.geteuid() == 0
    uid = _SANDBOX_UID_BASE + secrets.randbelow(1 << 24) if as_root else os.getuid()
    gid = uid if as_root else os.getgid()
    info_read, info_write = os.pipe()
    fds.append(info_write)
    # As root the files are created by bwrap (root) and used by the unprivileged uid: world-writable.
    modes = ("0777", "0666") if as_root else ("0700", "0600")
    made = {"/"}
    cmd = _namespace_args(info_write, as_root) + _filesystem_args(limits, modes[0], made)
    cmd += _visible_args(visible, made) + _account_args(uid, gid, fds, made)
    cmd += _work_file_args(files, modes, fds, made)
    cmd += ["--remount-ro", "/", "--chdir", WORK_DIR, "--"]
    if as_root:
        cmd += [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return cmd + list(argv), info_read


@functools.cache
def jail_problem() -> str | None:
    """None when the jail can be built here, else one paragraph: what failed and what would fix it."""
    optout = (f"or set {MODE_ENV}={UNJAILED} to run generated code without the jail (as your own user, the "
              f"filesystem visible and writable; network cut where unshare allows)")
    if not sys.platform.startswith("linux"):
        return f"the code-execution jail needs Linux (bubblewrap, namespaces); this is {sys.platform}: {optout}."
    if shutil.which("bwrap") is None:
        return ("the code-execution jail needs bubblewrap: `bwrap` is not on PATH. Install it (Debian/Ubuntu: "
                f"`apt-get install bubblewrap`), {optout}.")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return f"running as root, the jail drops to an unprivileged uid with util-linux `setpriv`, not found: {optout}."
    true = shutil.which("true") or "/bin/true"
    fds: list[int] = []
    try:
        cmd, info_read = _jail_command([true], {}, SandboxLimits(), [], fds)
        fds.append(info_read)
        probe = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               pass_fds=fds[:-1], timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the code-execution jail (bubblewrap) could not start: {exc}; {optout}."
    finally:
        for fd in fds:
            os.close(fd)
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        hint = "" if os.geteuid() == 0 else (
            " Unprivileged bubblewrap needs user namespaces: sysctl kernel.unprivileged_userns_clone=1 "
            "(Debian), kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap (Ubuntu "
            "24.04+), user.max_user_namespaces > 0; or run the evaluator as root.")
        return (f"the code-execution jail (bubblewrap) fails here: {why[-1] if why else f'exit {probe.returncode}'}."
                f"{hint} Fix that, {optout}.")
    return None


@functools.cache
def _unjailed_prefix() -> tuple[str, ...]:
    """Best-effort network (and PID) namespace for the unjailed mode; () when nothing works here."""
    def works(argv: list[str]) -> bool:
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    unshare = shutil.which("unshare")
    if unshare:
        for prefix in [(unshare, "-n", "-p", "--kill-child"), (unshare, "-n"),
                       (unshare, "--map-root-user", "-n", "-p", "--kill-child"), (unshare, "--map-root-user", "-n")]:
            if works([*prefix, "true"]):
                return prefix
    sandbox_exec = shutil.which("sandbox-exec")
    if sandbox_exec and sys.platform == "darwin":
        prefix = (sandbox_exec, "-p", "(version 1)(allow default)(deny network*)")
        if works([*prefix, "true"]):
            return prefix
    return ()


# ----------------------------------------------------------------------------------- memory and processes
def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read_int(path: str) -> int:
    with open(path) as fh:
        return int(fh.read().split()[0])


def _counter(path: str, name: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


class _Cgroup:
    """A cgroup (v2, or v1 memory+pids) holding one run: the kernel enforces its total memory and task count."""

    def __init__(self, version: int, dirs: dict[str, str]):
        self.version = version
        self.dirs = dirs  # controller ("memory", "pids"; v2: "unified") -> cgroup directory

    @classmethod
    def create(cls, limits: SandboxLimits) -> "_Cgroup | None":
        if os.environ.get(CGROUP_ENV, "auto").strip().lower() == "off" or not sys.platform.startswith("linux"):
            return None
        try:
            mounts = []
            with open("/proc/self/mountinfo") as fh:
                for line in fh:
                    left, _, right = line.partition(" - ")
                    fields, tail = left.split(), right.split()
                    mounts.append((fields[3], fields[4], tail[0], tail[2].split(",") if len(tail) > 2 else []))
            own = {}
            with open("/proc/self/cgroup") as fh:
                for line in fh:
                    _, controllers, path = line.rstrip("\n").split(":", 2)
                    for c in (controllers.split(",") if controllers else ["unified"]):
                        own[c] = path
        except (OSError, IndexError, ValueError):
            return None
        name = f"{_CGROUP_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"

        def base(fstype: str, controller: str | None) -> str | None:
            for root, point, kind, opts in mounts:
                if kind == fstype and (controller is None or controller in opts):
                    path = own.get(controller or "unified")
                    if path is None or not (path == root or path.startswith(root.rstrip("/") + "/")):
                        return None
                    return os.path.normpath(os.path.join(point, os.path.relpath(path, root)))
            return None

        v2 = base("cgroup2", None)
        if v2 is not None:
            group = cls._make_v2(v2, name, limits)
            if group is not None:
                return group
        memory, pids = base("cgroup", "memory"), base("cgroup", "pids")
        if memory is not None:
            return cls._make_v1(memory, pids, name, limits)
        return None

    @staticmethod
    def _sweep(parent: str) -> None:
        # Groups left by a killed evaluator: empty ones are removed (rmdir refuses a group that holds tasks).
        for entry in glob.glob(os.path.join(parent, f"{_CGROUP_PREFIX}-*")):
            try:
                pid = int(os.path.basename(entry).split("-")[2])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.rmdir(entry)

    @classmethod
    def _make_v2(cls, parent: str, name: str, limits: SandboxLimits) -> "_Cgroup | None":
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as fh:
                available = fh.read().split()
            if "memory" not in available or "pids" not in available:
                return None
            cls._sweep(parent)
            path = os.path.join(parent, name)
            os.mkdir(path)
        except OSError:
            return None
        group = cls(2, {"unified": path})
        try:
            if not os.path.exists(os.path.join(path, "memory.max")):
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            _write(os.path.join(path, "memory.max"), str(limits.total_memory_mb * MB))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
            _write(os.path.join(path, "pids.max"), str(limits.max_processes + 2))
            _write(os.path.join(path, "memory.oom.group"), "1")
        except OSError:
            group.remove()
            return None
        return group

    @classmethod
    def _make_v1(cls, memory: str, pids: str | None, name: str, limits: SandboxLimits) -> "_Cgroup | None":
        dirs = {}
        try:
            for controller, parent in (("memory", memory), ("pids", pids)):
                if parent is None:
                    continue
                cls._sweep(parent)
                path = os.path.join(parent, name)
                try:
                    os.mkdir(path)
                except OSError:
                    if controller == "memory":
                        raise
                    continue
                dirs[controller] = path
            group = cls(1, dirs)
        except OSError:
            for path in dirs.values():
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            return None
        try:
            limit = str(limits.total_memory_mb * MB)
            _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), limit)
            memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                with contextlib.suppress(OSError):  # absent swap accounting: nothing to limit
                    _write(memsw, limit)
            if "pids" in dirs:
                _write(os.path.join(dirs["pids"], "pids.max"), str(limits.max_processes + 2))
        except OSError:
            group.remove()
            return None
        return group

    def attach(self) -> None:
        """Move the calling process in (runs in the child before exec, so everything it starts is inside)."""
        pid = str(os.getpid()).encode()
        for path in self.dirs.values():
            fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def _memory_dir(self) -> str:
        return self.dirs["unified" if self.version == 2 else "memory"]

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        try:
            return _read_int(os.path.join(self._memory_dir(), name))
        except (OSError, ValueError):
            return 0

    def peak(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return _read_int(os.path.join(self._memory_dir(), name))
        except (OSError, ValueError):
            return 0

    def over_limit(self) -> bool:
        """The kernel killed a task of the run for memory (its limit is the run's total)."""
        if self.version == 2:
            return _counter(os.path.join(self._memory_dir(), "memory.events"), "oom_kill") > 0
        return _counter(os.path.join(self._memory_dir(), "memory.oom_control"), "oom_kill") > 0

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self._memory_dir(), "cgroup.procs")) as fh:
                return [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self, wait_s: float = 5.0) -> None:
        if self.version == 2 and os.path.exists(os.path.join(self.dirs["unified"], "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(self.dirs["unified"], "cgroup.kill"), "1")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        for path in self.dirs.values():
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)


class _TreeMeter:
    """Summed resident memory of a process and all its descendants, from /proc (the cgroup-less supervisor)."""

    def __init__(self, root_pid: int, limit_bytes: int):
        self.root_pid = root_pid
        self.limit = limit_bytes
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.last = 0
        self.high = 0

    def descendants(self) -> dict[int, int]:
        """pid -> resident bytes for the root and every descendant."""
        parent, rss = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            rss[pid] = int(fields[21]) * self.page
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        out, todo = {}, [self.root_pid]
        while todo:
            pid = todo.pop()
            if pid in rss and pid not in out:
                out[pid] = rss[pid]
                todo.extend(children.get(pid, ()))
        return out

    def usage(self) -> int:
        self.last = sum(self.descendants().values())
        self.high = max(self.high, self.last)
        return self.last

    def peak(self) -> int:
        return self.high

    def over_limit(self) -> bool:
        return self.last > self.limit


def _user_task_count() -> int:
    """Processes and threads of this uid (RLIMIT_NPROC counts both)."""
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                pass
    return count


def _limit_child(limits: SandboxLimits, nproc: int, cgroup: _Cgroup | None):
    def apply() -> None:
        # Runs in the child between fork and exec (start_new_session already made it a session leader).
        if cgroup is not None:
            cgroup.attach()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        if limits.memory_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * MB, limits.memory_mb * MB))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb * MB, limits.max_file_mb * MB))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        files = limits.max_open_files if hard == resource.RLIM_INFINITY else min(limits.max_open_files, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# ------------------------------------------------------------------------------------------------- run
@dataclass
class _Launch:
    """How to start one run: the command, its directories, and the descriptors the child inherits."""
    command: list[str]
    cwd: str
    home: str
    tmp: str
    dropped: bool                 # runs as a fresh unprivileged uid
    pass_fds: list[int]
    info_fd: int | None = None    # read end of bwrap's info pipe (the jail only)


def _jailed_launch(argv: list[str], files: dict[str, str], limits: SandboxLimits, visible: list[str],
                   stack: contextlib.ExitStack) -> _Launch:
    pass_fds: list[int] = []
    try:
        command, info_fd = _jail_command(list(argv), files, limits, visible, pass_fds)
    except BaseException:
        for fd in pass_fds:
            os.close(fd)
        raise
    stack.callback(os.close, info_fd)
    return _Launch(command, "/", WORK_DIR, "/tmp", os.geteuid() == 0, pass_fds, info_fd)


def _unjailed_launch(argv: list[str], files: dict[str, str], stack: contextlib.ExitStack) -> _Launch:
    work = stack.enter_context(tempfile.TemporaryDirectory(prefix="fuselab-sandbox-"))
    for name, text in files.items():
        target = Path(work) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return _Launch([*_unjailed_prefix(), *argv], work, work, work, False, [])


def _stdin_file(stdin: str | None, stack: contextlib.ExitStack):
    """A temporary file holding `stdin` (utf-8), rewound; None for no input."""
    if stdin is None:
        return None
    stdin_file = stack.enter_context(tempfile.TemporaryFile())
    stdin_file.write(stdin.encode("utf-8"))
    stdin_file.seek(0)
    return stdin_file


def _spawn(launch: _Launch, child_env: dict[str, str], limits: SandboxLimits, cgroup: _Cgroup | None,
           stdin_file) -> subprocess.Popen:
    # A fresh uid has no other task, so the limit is the run's own; otherwise it comes on top of ours.
    nproc = limits.max_processes if launch.dropped else _user_task_count() + limits.max_processes
    try:
        return subprocess.Popen(
            launch.command, cwd=launch.cwd, env=child_env, start_new_session=True, pass_fds=launch.pass_fds,
            stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_child(limits, nproc, cgroup))
    finally:
        # The child holds its own copies; ours (the info pipe's write end above all) must go for EOF.
        for fd in launch.pass_fds:
            os.close(fd)


def run_sandboxed(argv: list[str], files: dict[str, str] | None = None, limits: SandboxLimits = SandboxLimits(),
                  env: dict[str, str] | None = None, stdin: str | None = None, *, tools: tuple[str, ...] = (),
                  read_only_paths: tuple[str, ...] = ()) -> SandboxResult:
    """Run `argv` in the jail, in a fresh work directory holding `files` (relative name -> text).

    argv[0] is looked up on the evaluator's PATH; relative paths resolve in the work directory. The install
    prefixes of argv[0] and of the executables named in `tools` (e.g. the compilers a build script calls), and
    `read_only_paths` (e.g. a library jar), are made visible read-only. Returns the status, exit code, output
    (utf-8, at most `limits.max_output_bytes` of each stream), wall seconds and peak total memory. Everything
    the run started is dead when this returns. Raises SandboxUnavailable where the jail cannot be built (see the
    module docstring).
    """
    mode = check_sandbox()
    files = files or {}
    path_env = os.environ.get("PATH", "/usr/bin:/bin")
    toolchain = _toolchain_env()
    with contextlib.ExitStack() as stack:
        if mode == JAIL:
            visible = _tool_paths([argv[0], *tools], path_env) + list(toolchain.values()) + list(read_only_paths)
            launch = _jailed_launch(argv, files, limits, visible, stack)
        else:
            launch = _unjailed_launch(argv, files, stack)
        child_env = {"PATH": path_env, "HOME": launch.home, "TMPDIR": launch.tmp, "LANG": "C.UTF-8",
                     "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", **toolchain,
                     **(env or {})}
        stdin_file = _stdin_file(stdin, stack)
        cgroup = _Cgroup.create(limits)
        if cgroup is not None:
            stack.callback(cgroup.remove)
        start = time.monotonic()
        proc = _spawn(launch, child_env, limits, cgroup, stdin_file)
        meter = cgroup or _TreeMeter(proc.pid, limits.total_memory_mb * MB)
        status, out, err = _supervise(proc, limits, meter, cgroup, launch.info_fd, start)
        seconds = time.monotonic() - start
        peak_mb = meter.peak() / MB
    if status is None:
        status = "passed" if proc.returncode == 0 else "failed"
    return SandboxResult(status, proc.returncode if status in ("passed", "failed") else None,
                         out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace"),
                         seconds, peak_mb)


def _grow_pipe(fd: int) -> None:
    # Fewer wake-ups while a program prints a lot (Linux only; the default 64 KiB pipe works too).
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


class _OutputReader:
    """Reads the run's stdout and stderr (keeping at most `cap` bytes of each, dropping the rest) and bwrap's
    info pipe, without blocking."""

    def __init__(self, proc: subprocess.Popen, cap: int, info_fd: int | None):
        self.cap = cap
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.kept = {self.out_fd: bytearray(), self.err_fd: bytearray()}
        self.info_fd = info_fd
        self.info = bytearray()
        self.selector = selectors.DefaultSelector()
        for fd in self.kept:
            _grow_pipe(fd)
            self.selector.register(fd, selectors.EVENT_READ)
        if info_fd is not None:
            self.selector.register(info_fd, selectors.EVENT_READ)

    def open(self) -> bool:
        return bool(self.selector.get_map())

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout=timeout):
            self._read(key.fd)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self.selector.unregister(fd)
        elif fd == self.info_fd:
            self.info.extend(chunk)
        elif len(self.kept[fd]) < self.cap:
            self.kept[fd].extend(chunk[: self.cap - len(self.kept[fd])])

    def namespace_init(self) -> int | None:
        """The pid of the jail's PID-namespace init, from bwrap's info JSON; None when unknown."""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(bytes(self.info).split(b"}")[0] + b"}")["child-pid"])
        return None

    def drain(self, seconds: float) -> None:
        """Read what is left in stdout and stderr (every writer is dead: EOF comes at once), then close."""
        until = time.monotonic() + seconds
        while any(fd in self.kept for fd in self.selector.get_map()) and time.monotonic() < until:
            self.poll(0.1)
        self.selector.close()

    def output(self) -> tuple[bytes, bytes]:
        return bytes(self.kept[self.out_fd]), bytes(self.kept[self.err_fd])


def _watch(proc: subprocess.Popen, limits: SandboxLimits, meter, reader: _OutputReader,
           start: float) -> str | None:
    """Read output until the program exits (-> None), the timeout passes ("timeout") or the run's total memory
    passes its limit ("memory")."""
    deadline = start + limits.timeout_s
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        if now >= next_check:
            meter.usage()
            if meter.over_limit():
                return "memory"
            next_check = now + _POLL_S
        if proc.poll() is not None:
            return None
        wait = min(_POLL_S, max(0.0, deadline - now))
        if reader.open():
            reader.poll(wait)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)


def _supervise(proc: subprocess.Popen, limits: SandboxLimits, meter, cgroup: _Cgroup | None,
               info_fd: int | None, start: float) -> tuple[str | None, bytes, bytes]:
    """Stream output (keeping at most the cap of each stream), enforce the timeout and the total memory, and
    kill whatever is left at the end. Returns (status or None for a normal exit, stdout, stderr)."""
    reader = _OutputReader(proc, limits.max_output_bytes, info_fd)
    status = None
    try:
        status = _watch(proc, limits, meter, reader, start)
    finally:
        _kill_run(proc, cgroup, reader.namespace_init(), meter)
        reader.drain(2.0)
        proc.stdout.close()
        proc.stderr.close()
    if status is None and cgroup is not None and cgroup.over_limit():
        status = "memory"  # the kernel killed a task for memory and the run then ended
    return status, *reader.output()


def _kill_run(proc: subprocess.Popen, cgroup: _Cgroup | None, ns_init: int | None, meter) -> None:
    """SIGKILL the run's PID namespace, process group and cgroup; returns once the outer process is reaped,
    which for the jail is after every process of its PID namespace has died."""
    if proc.poll() is None and ns_init is not None:
        try:  # the namespace's init, only while it is still our child's child (no pid reuse)
            with open(f"/proc/{ns_init}/stat", "rb") as fh:
                if int(fh.read().rsplit(b")", 1)[1].split()[1]) == proc.pid:
                    os.kill(ns_init, signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass
    if proc.poll() is None and isinstance(meter, _TreeMeter):
        for pid in meter.descendants():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if cgroup is not None:
        cgroup.kill_all()
