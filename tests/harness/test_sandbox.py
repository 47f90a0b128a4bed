"""The code-execution sandbox: canonical solutions pass, wrong ones fail, loops are killed, no network."""
from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from harness.evaluation.multipl_e import assemble_program, execute, toolchain_problem, truncate_completion
from harness.evaluation.sandbox import SandboxLimits, run_sandboxed


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


def test_detached_grandchild_dies_with_the_run(tmp_path):
    marker = tmp_path / "still-alive"
    # The grandchild starts its own session (escapes the process group) and would write the marker after 2 s.
    code = (f"import os, subprocess, time\n"
            f"subprocess.Popen(['bash', '-c', 'sleep 2; touch {marker}'], start_new_session=True)\n"
            f"time.sleep(30)\n")
    result = run_sandboxed([sys.executable, "-c", code], limits=SandboxLimits(timeout_s=0.5))
    assert result.status == "timeout"
    time.sleep(3)
    assert not marker.exists()


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
