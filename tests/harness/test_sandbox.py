"""The code-execution sandbox: canonical solutions pass, wrong ones fail, loops are killed, and the jail holds:
no writes outside the work directory, no host files or process environments, no network, a total process and
memory limit, bounded output, no survivors (issue 19)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.evaluation import sandbox
from harness.evaluation.multipl_e import (JAR, TOOLCHAINS, assemble_program, execute, toolchain_problem,
                                          truncate_completion)
from harness.evaluation.sandbox import SandboxLimits, SandboxUnavailable, run_sandboxed

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
# Correct and wrong completions of HumanEval_23 (string length) per compiled/scripted language.
STRLEN = {
    "cpp": ("    return string.size();\n}\n", "    return string.size() + 1;\n}\n"),
    "rs": ("    string.len() as isize\n}\n", "    string.len() as isize + 1\n}\n"),
    "sh": ("    echo ${#1}\n}\n", "    echo 7\n}\n"),
    "js": ("  return string.length;\n}\n", "  return string.length + 1;\n}\n"),
}


def _row(shared_data, language: str, key: str, value: str) -> dict:
    with open(shared_data / "multipl-e" / f"humaneval-{language}.jsonl") as fh:
        return next(r for r in map(json.loads, fh) if r[key] == value)


def test_python_canonical_passes_and_wrong_fails(shared_data):
    row = _row(shared_data, "python", "task_id", "Python/0")
    assert execute(row, row["canonical_solution"], "python").status == "passed"
    wrong = execute(row, "    return False\n", "python")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


@pytest.mark.skipif(toolchain_problem("js") is not None, reason="node is not installed")
def test_javascript_canonical_passes_and_wrong_fails(shared_data):
    row = _row(shared_data, "js", "name", "HumanEval_23_strlen")
    # Generation continues after the stop token "\nfunction "; it must be cut before the tests are appended.
    solution = "  return string.length;\n}\nfunction unrelated() {"
    assert truncate_completion(solution, row["stop_tokens"]) == "  return string.length;\n}"
    assert execute(row, solution, "js").status == "passed"
    wrong = execute(row, "  return string.length + 1;\n}\n", "js")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_program_is_prompt_completion_tests(shared_data):
    row = _row(shared_data, "js", "name", "HumanEval_23_strlen")
    program = assemble_program(row, "  return 0;\n}\n// trailing", "js")
    assert program == row["prompt"] + "  return 0;\n}" + "\n" + row["tests"]


def test_infinite_loop_is_killed_within_timeout():
    start = time.monotonic()
    result = run_sandboxed([sys.executable, "-c", "while True: pass"], limits=SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout" and result.returncode is None
    assert time.monotonic() - start < 4


def test_network_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        code = ("import socket, sys\n"
                "for host, port in [('127.0.0.1', %d), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
                "    try:\n"
                "        socket.create_connection((host, port), timeout=2).close()\n"
                "        print('connected', host)\n"
                "    except OSError as exc:\n"
                "        print('refused', host, exc.errno)\n" % port)
        result = run_sandboxed([sys.executable, "-c", code])
        # The same connect from outside the sandbox works: the refusal is the sandbox's doing.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.close()
    assert result.status == "passed"
    assert result.stdout.count("refused") == 3 and "connected" not in result.stdout


def test_memory_and_file_limits():
    grab = run_sandboxed([sys.executable, "-c", "x = bytearray(800 * 1024 * 1024)"],
                         limits=SandboxLimits(memory_mb=300))
    assert grab.status == "failed" and "MemoryError" in grab.stderr
    write = run_sandboxed([sys.executable, "-c", "open('big', 'wb').write(b'0' * (3 * 1024 * 1024))"],
                          limits=SandboxLimits(max_file_mb=1))
    assert write.status == "failed"


def test_files_land_in_a_fresh_working_directory():
    result = run_sandboxed([sys.executable, "main.py"], {"main.py": "import os; print(sorted(os.listdir('.')))"})
    assert result.status == "passed" and result.stdout.strip() == "['main.py']"


@pytest.mark.parametrize("language", sorted(STRLEN))
def test_compiled_and_scripted_languages_pass_correct_and_fail_wrong(shared_data, language):
    if toolchain_problem(language) is not None:
        pytest.skip(toolchain_problem(language))
    row = _row(shared_data, language, "name", "HumanEval_23_strlen")
    good, wrong = STRLEN[language]
    assert execute(row, good, language).status == "passed"
    assert execute(row, wrong, language).status == "failed"


# ------------------------------------------------------------------------------------------ the jail (issue 19)
def _report(result) -> dict:
    assert result.status == "passed", result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_writing_outside_the_work_directory_fails(tmp_path):
    targets = ["/fuselab-x", "/etc/fuselab-x", "/usr/bin/fuselab-x", os.path.join(sys.prefix, "fuselab-x"),
               str(REPO / "fuselab-x"), str(Path.home() / "fuselab-x"), str(tmp_path / "fuselab-x")]
    code = ("import json, os\n"
            f"out = {{}}\n"
            f"for path in {targets!r} + ['inside.txt', '/tmp/scratch']:\n"
            "    try:\n"
            "        with open(path, 'w') as fh: fh.write('x')\n"
            "        out[path] = 'written'\n"
            "    except OSError as exc:\n"
            "        out[path] = type(exc).__name__\n"
            f"for path in [{str(REPO / 'pyproject.toml')!r}, {sys.executable!r}]:\n"
            "    try:\n"
            "        os.remove(path); out['rm ' + path] = 'removed'\n"
            "    except OSError as exc:\n"
            "        out['rm ' + path] = type(exc).__name__\n"
            "print(json.dumps(out))\n")
    report = _report(run_sandboxed([sys.executable, "-c", code]))
    # Inside the work directory and /tmp writing works: the failures below are the jail's doing.
    assert report.pop("inside.txt") == "written" and report.pop("/tmp/scratch") == "written"
    assert all(v not in ("written", "removed") for v in report.values()), report
    assert not any(Path(t).exists() for t in targets)
    assert (REPO / "pyproject.toml").is_file() and os.path.exists(sys.executable)


def test_the_work_directory_is_a_size_limited_tmpfs():
    code = ("import os\n"
            "written = 0\n"
            "try:\n"
            "    for i in range(64):\n"
            "        with open(f'f{i}', 'wb') as fh: fh.write(b'0' * (1024 * 1024))\n"
            "        written += 1\n"
            "except OSError as exc:\n"
            "    print('stopped', exc.errno, written)\n")
    result = run_sandboxed([sys.executable, "-c", code], limits=SandboxLimits(work_dir_mb=8))
    words = result.stdout.split()
    assert words[:2] == ["stopped", "28"]  # ENOSPC
    assert int(words[2]) <= 8  # 8 MB of files, not 64


def test_host_files_and_process_environments_are_out_of_reach(tmp_path, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("FUSELAB_TEST_SECRET", secret)  # in this test process's /proc/<pid>/environ
    key = tmp_path / "key"
    key.write_text(secret)
    key.chmod(0o600)
    host_passwd = Path("/etc/passwd").read_text()
    code = ("import json, os\n"
            "out = {}\n"
            f"for path in [{str(key)!r}, '/etc/shadow', {str(Path.home() / '.bashrc')!r}, "
            f"'/proc/{os.getpid()}/environ', '/proc/1/environ']:\n"
            "    try:\n"
            "        out[path] = open(path).read()\n"
            "    except OSError as exc:\n"
            "        out[path] = type(exc).__name__\n"
            "out['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "found = []\n"
            "for pid in out['pids']:\n"
            "    try:\n"
            f"        if {secret!r} in open(f'/proc/{{pid}}/environ').read(): found.append(pid)\n"
            "    except OSError:\n"
            "        pass\n"
            "out['secret_in'] = found\n"
            "out['passwd'] = open('/etc/passwd').read()\n"
            "print(json.dumps(out))\n")
    report = _report(run_sandboxed([sys.executable, "-c", code]))
    assert report[str(key)] == "FileNotFoundError"
    assert report["/etc/shadow"] == "FileNotFoundError"
    assert report[str(Path.home() / ".bashrc")] in ("FileNotFoundError", "PermissionError")
    assert report[f"/proc/{os.getpid()}/environ"] in ("FileNotFoundError", "PermissionError")
    assert report["/proc/1/environ"] in ("FileNotFoundError", "PermissionError")
    # Its own PID namespace: bubblewrap's init (1) and the program (2), no host process.
    assert report["pids"] == [1, 2]
    assert report["secret_in"] == []
    # A synthetic passwd: none of the host's accounts but root.
    host_accounts = {line.split(":")[0] for line in host_passwd.splitlines() if line and line[0] != "#"}
    jail_accounts = {line.split(":")[0] for line in report["passwd"].splitlines() if line}
    assert jail_accounts & host_accounts <= {"root", "nobody"}
    assert len(host_accounts - {"root", "nobody"}) > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop applies to a root evaluator")
def test_root_is_dropped_a_visible_root_only_file_cannot_be_read(tmp_path):
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "key").write_text("top secret")
    (folder / "key").chmod(0o600)  # owned by root, as this test runs as root
    code = ("import json, os\n"
            "out = {'uid': os.getuid(), 'euid': os.geteuid(), 'groups': os.getgroups(),\n"
            f"       'visible': os.path.exists({str(folder / 'key')!r})}}\n"
            "try:\n"
            f"    out['read'] = open({str(folder / 'key')!r}).read()\n"
            "except OSError as exc:\n"
            "    out['read'] = type(exc).__name__\n"
            "out['capeff'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
            "print(json.dumps(out))\n")
    report = _report(run_sandboxed([sys.executable, "-c", code], read_only_paths=(str(folder),)))
    assert report["visible"] is True and report["read"] == "PermissionError"
    assert report["uid"] != 0 and report["euid"] != 0 and report["groups"] in ([], [report["uid"]])
    assert int(report["capeff"], 16) == 0


@pytest.fixture(params=["auto", "off"])
def cgroup_mode(request, monkeypatch):
    """Each limit is checked with the kernel cgroup (where writable here) and with the polling supervisor."""
    monkeypatch.setenv(sandbox.CGROUP_ENV, request.param)
    if request.param == "auto" and sandbox._Cgroup.create(SandboxLimits()) is None:
        pytest.skip("no writable cgroup on this machine: the supervisor is the only path")
    return request.param


def test_four_hundred_forks_are_refused(cgroup_mode):
    code = ("import os, time\n"
            "started = refused = 0\n"
            "for _ in range(400):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        refused += 1\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        time.sleep(20)\n"
            "        os._exit(0)\n"
            "    started += 1\n"
            "print(started, refused, flush=True)\n")
    limits = SandboxLimits(timeout_s=30, max_processes=64)
    result = run_sandboxed([sys.executable, "-c", code], limits=limits)
    started, refused = map(int, result.stdout.split())
    assert started + refused == 400
    assert 10 <= started < limits.max_processes and refused > 400 - limits.max_processes


def _allocating_children(n: int) -> str:
    return ("import os, sys, time\n"
            "pids = []\n"
            f"for _ in range({n}):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        block = b'\\x01' * (1536 * 1024 * 1024)  # 1.5 GB, every page touched\n"
            "        print('allocated', flush=True)\n"
            "        time.sleep(8)\n"
            "        os._exit(0)\n"
            "    pids.append(pid)\n"
            "codes = [os.waitpid(pid, 0)[1] for pid in pids]\n"
            "print('all done', codes, flush=True)\n")


@pytest.mark.slow
def test_three_children_of_one_and_a_half_gigabytes_are_stopped_by_the_total_limit(cgroup_mode):
    limits = SandboxLimits(timeout_s=60, memory_mb=4096, total_memory_mb=4096)
    # Each child fits the per-process limit (1.5 < 4 GB): only a limit on the total stops three of them.
    result = run_sandboxed([sys.executable, "-c", _allocating_children(3)], limits=limits)
    assert result.status == "memory", (result.status, result.stdout, result.stderr)
    assert "all done" not in result.stdout
    if cgroup_mode == "auto":  # the kernel's own accounting: the total never passed the limit
        assert result.peak_memory_mb <= limits.total_memory_mb
    # Two of them (3 GB) fit the same total: it is the sum that is limited.
    two = run_sandboxed([sys.executable, "-c", _allocating_children(2).replace("time.sleep(8)", "time.sleep(1)")],
                        limits=limits)
    assert two.status == "passed" and two.stdout.count("allocated") == 2, (two.status, two.stderr)
    assert 3000 <= two.peak_memory_mb <= limits.total_memory_mb


def test_one_gigabyte_of_output_leaves_the_evaluator_small():
    # A fresh interpreter, so that its peak resident memory is this run's: the old sandbox buffered it all.
    script = (
        "import json, resource, sys\n"
        "from harness.evaluation.sandbox import SandboxLimits, run_sandboxed\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "printer = ('import sys\\nchunk = b\"x\" * (1 << 20)\\n'\n"
        "           'for _ in range(1024): sys.stdout.buffer.write(chunk)\\n')  # 1 GiB\n"
        "r = run_sandboxed([sys.executable, '-c', printer], limits=SandboxLimits(timeout_s=120))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'growth_kb': after - before, 'status': r.status, 'kept': len(r.stdout)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "passed" and report["kept"] == SandboxLimits().max_output_bytes
    assert report["growth_kb"] < 100 * 1024, report


def _host_processes_with(needle: bytes) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    if needle in fh.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_a_daemonised_child_dies_with_the_run(ending, cgroup_mode):
    token = f"{secrets.randbelow(10 ** 6) + 10 ** 6}.25"  # `sleep <token>`: findable in the host's /proc
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"  # a daemon: own session, its parent gone, stdout closed
            "    if os.fork() == 0:\n"
            "        devnull = os.open('/dev/null', os.O_RDWR)\n"
            "        for fd in (0, 1, 2): os.dup2(devnull, fd)\n"
            f"        os.execvp('sleep', ['sleep', {token!r}])\n"
            "    os._exit(0)\n"
            "time.sleep(1.5)\n"
            + ("" if ending == "exit" else "time.sleep(60)\n"))
    seen = []
    stop = threading.Event()

    def watch():  # the daemon exists while the run is alive, so the final check can fail
        while not stop.is_set():
            seen.extend(_host_processes_with(b"sleep\0" + token.encode()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_sandboxed([sys.executable, "-c", code], limits=SandboxLimits(timeout_s=3))
    finally:
        stop.set()
        watcher.join()
    assert result.status == ("passed" if ending == "exit" else "timeout")
    assert seen, "the daemon never started"
    assert _host_processes_with(b"sleep\0" + token.encode()) == []


@pytest.fixture
def fresh_jail_probe():
    sandbox.jail_problem.cache_clear()
    yield
    sandbox.jail_problem.cache_clear()


def test_no_jail_is_refused_unless_unjailed_is_named(tmp_path, monkeypatch, fresh_jail_probe):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*FUSELAB_SANDBOX=unjailed"):
        sandbox.check_sandbox()
    with pytest.raises(SandboxUnavailable):
        run_sandboxed([sys.executable, "-c", "print('ran')"])
    monkeypatch.setenv("FUSELAB_SANDBOX", "unjailed")
    result = run_sandboxed([sys.executable, "-c", "print('ran')"])
    assert result.status == "passed" and result.stdout == "ran\n"
    monkeypatch.setenv("FUSELAB_SANDBOX", "no-thanks")
    with pytest.raises(ValueError, match="FUSELAB_SANDBOX='no-thanks'"):
        sandbox.check_sandbox()


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK")
def test_the_jar_path_is_an_argument_never_shell_text(tmp_path):
    # A path that a shell would act on if it were pasted into the script.
    jar_dir = tmp_path / "x y;touch PWNED;$(touch PWNED2)"
    jar_dir.mkdir()
    some_jar = next(p for p in Path("/usr/share/java").glob("*.jar")) if Path("/usr/share/java").is_dir() else None
    if some_jar is None:
        pytest.skip("no jar to stand in for javatuples")
    jar = jar_dir / "javatuples.jar"
    shutil.copy(some_jar, jar)
    chain = TOOLCHAINS["java"]
    assert JAR in chain.command and not any(JAR in part for part in chain.command if part != JAR)
    command = [str(jar) if part == JAR else part for part in chain.command]
    program = 'class Problem { public static void main(String[] a) { System.out.println("ok"); } }'
    result = run_sandboxed(command, {"Problem.java": program},
                           SandboxLimits(timeout_s=60, memory_mb=None, max_processes=256),
                           tools=chain.needs, read_only_paths=(str(jar),))
    listing = run_sandboxed(["ls"], {})
    assert result.status == "passed" and result.stdout == "ok\n", result.stderr
    assert "PWNED" not in listing.stdout and not list(tmp_path.glob("PWNED*"))


def test_no_shell_string_is_built_from_data_anywhere():
    # Every shell script in the code is a constant: no f-string/format/concatenation reaches `bash -c`.
    offenders = []
    for path in [*REPO.glob("harness/**/*.py"), *REPO.glob("fusion/**/*.py"), *REPO.glob("baselines/**/*.py"),
                 *REPO.glob("studies/**/*.py")]:
        text = path.read_text()
        for needle in ("shell=True", "os.system(", "os.popen("):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []
    for chain in TOOLCHAINS.values():
        if chain.command[:2] == ("bash", "-c"):
            assert "{" not in chain.command[2], chain.language
