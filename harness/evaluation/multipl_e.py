"""MultiPL-E (HumanEval translated to many languages): program assembly, toolchains, pass@1 scoring.

Program convention (MultiPL-E): `prompt + completion + "\n" + tests`, the completion cut at the first of the
language's stop tokens. The local `humaneval-python.jsonl` is in HumanEval-X form (`prompt`, `test` ending with
`check(fn)`) and OpenAI HumanEval rows have `test` + `entry_point`: both are handled.

A language whose toolchain is missing is never scored 0: `toolchain_problem(lang)` says what is missing and the
suite reports it as not run.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .sandbox import SandboxLimits, SandboxResult, run_sandboxed

# MultiPL-E's own Python stop tokens (the HumanEval-X rows carry none).
PYTHON_STOP_TOKENS = ["\ndef ", "\n#", "\nif ", "\nclass ", "\nprint("]
# The stop tokens every row of a language carries (MultiPL-E "reworded" prompts), for data read from the hub.
STOP_TOKENS = {
    "python": PYTHON_STOP_TOKENS,
    "cpp": ["\n}"], "cs": ["\n    }\n"], "d": ["\n\n", "\nvoid", "\nbool", "\nint"],
    "go": ["\nfunc", "struct", "\n// "], "java": ["\n    }\n"], "jl": ["\nfunction", "\nmacro", "\n\n"],
    "js": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"], "lua": ["\nlocal", "\nfunction", "\n--", "\n\n"],
    "php": ["\nfunction", "\n?>", "\n//", "\n#"], "pl": ["\nsub", "\n#", "\n\n"], "r": ["\n#", "\n```"],
    "rb": ["\nclass", "\ndef", "\n#", "\n\n"], "rkt": ["\n(define ", "\n#|", "\n;", "\n("], "rs": ["\n}"],
    "scala": ["\n    }\n"], "sh": ["\n}"], "swift": ["\n}"], "ts": ["\nfunction ", "\n/*", "\n//", "\nclass"],
}


JAR = "{jar}"  # an argv element replaced, whole, by the javatuples jar's path


@dataclass(frozen=True)
class Toolchain:
    language: str                 # data file suffix: humaneval-<language>.jsonl
    file_name: str                # the program file inside the sandbox
    command: tuple[str, ...]      # run (and build) argv; an element equal to JAR becomes the javatuples jar
    needs: tuple[str, ...]        # executables that must be on PATH (made visible inside the jail)
    probe: tuple[str, ...] = ()   # extra command that must succeed (library present)
    probe_hint: str = ""
    memory_mb: int | None = 4096  # RLIMIT_AS; None for runtimes that reserve huge address space (JVM)
    timeout_s: float = 15.0       # compiled languages spend most of it compiling
    max_processes: int = 64       # processes + threads of the run (the JVM starts dozens of threads)


def _script(script: str, *args: str) -> tuple[str, ...]:
    """Build-then-run steps as a constant bash script. Variable data (a path) reaches it only as a positional
    argument ("$1"), never pasted into the script text, so no value can change what the shell parses."""
    return ("bash", "-c", script, "bash", *args)


TOOLCHAINS: dict[str, Toolchain] = {t.language: t for t in [
    Toolchain("python", "program.py", (sys.executable, "program.py"), ()),
    Toolchain("js", "program.js", ("node", "program.js"), ("node",)),
    Toolchain("ts", "program.ts", _script("tsc --target es2020 --lib es2020,dom --types node program.ts 2>/dev/null; "
                                           "node program.js"), ("tsc", "node")),
    Toolchain("cpp", "program.cpp", _script("g++ -std=c++17 -O0 program.cpp -o program && ./program"), ("g++",),
              timeout_s=30.0),
    Toolchain("rs", "program.rs", _script("rustc --edition 2021 -A warnings program.rs -o program && ./program"),
              ("rustc",), timeout_s=30.0),
    Toolchain("java", "Problem.java", _script('javac -cp "$1" Problem.java && java -ea -cp "$1":. Problem', JAR),
              ("javac", "java"), memory_mb=None, timeout_s=30.0, max_processes=256),
    Toolchain("sh", "program.sh", ("bash", "program.sh"), ("bash",)),
    Toolchain("pl", "program.pl", ("perl", "program.pl"), ("perl",), ("perl", "-MTest::Deep", "-e", "1"),
              "the Perl module Test::Deep (apt install libtest-deep-perl)"),
    Toolchain("go", "program_test.go", ("go", "test", "program_test.go"), ("go",), timeout_s=30.0,
              max_processes=256),
    Toolchain("php", "program.php", ("php", "program.php"), ("php",)),
    Toolchain("rb", "program.rb", ("ruby", "program.rb"), ("ruby",)),
    Toolchain("r", "program.r", ("Rscript", "program.r"), ("Rscript",)),
    Toolchain("lua", "program.lua", ("lua", "program.lua"), ("lua",), ("lua", "-e", "require('luaunit')"),
              "the Lua library luaunit (luarocks install luaunit)"),
    Toolchain("jl", "program.jl", ("julia", "program.jl"), ("julia",), timeout_s=30.0),
    Toolchain("rkt", "program.rkt", ("racket", "program.rkt"), ("racket",), timeout_s=30.0),
    Toolchain("swift", "program.swift", _script("swiftc program.swift -o program && ./program"), ("swiftc",),
              timeout_s=30.0),
    Toolchain("scala", "Problem.scala", _script("scalac Problem.scala && scala Problem"), ("scalac", "scala"),
              memory_mb=None, timeout_s=60.0, max_processes=256),
    Toolchain("d", "program.d", _script("dmd -unittest program.d -of=program && ./program"), ("dmd",),
              timeout_s=30.0),
    Toolchain("cs", "Problem.cs", _script("mcs -d:DEBUG -r:System.Numerics.dll Problem.cs -out:Problem.exe && "
                                          "mono Problem.exe"), ("mcs", "mono"), timeout_s=30.0, max_processes=256),
]}
LANGUAGES = tuple(TOOLCHAINS)


def javatuples_jar() -> str | None:
    """The javatuples jar MultiPL-E's Java prompts import (env FUSELAB_JAVATUPLES_JAR or a usual location)."""
    candidates = [os.environ.get("FUSELAB_JAVATUPLES_JAR", ""), "/usr/share/java/javatuples.jar",
                  "/usr/local/share/java/javatuples-1.2.jar", "/usr/share/java/javatuples-1.2.jar"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@functools.cache
def toolchain_problem(language: str) -> str | None:
    """None when `language` can be executed here, else a sentence naming what is missing."""
    if language not in TOOLCHAINS:
        return f"unknown MultiPL-E language {language!r}; known: {', '.join(LANGUAGES)}"
    chain = TOOLCHAINS[language]
    missing = [exe for exe in chain.needs if shutil.which(exe) is None]
    if missing:
        return f"toolchain for {language} not found on PATH: {', '.join(missing)}"
    if language == "java" and javatuples_jar() is None:
        return ("java needs the javatuples jar its prompts import: set FUSELAB_JAVATUPLES_JAR to javatuples-1.2.jar")
    if chain.probe:
        try:
            ok = subprocess.run(chain.probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            return f"{language} needs {chain.probe_hint}"
    return None


def available_languages() -> tuple[str, ...]:
    """Every MultiPL-E language whose toolchain (and test library) is present on this machine."""
    return tuple(lang for lang in LANGUAGES if toolchain_problem(lang) is None)


def problem_number(doc: dict) -> int:
    """The HumanEval number of a row: MultiPL-E "HumanEval_23_strlen", HumanEval-X "Python/0", OpenAI
    "HumanEval/0"."""
    name = doc.get("name") or doc.get("task_id") or ""
    found = re.match(r"HumanEval_(\d+)_", name) or re.search(r"/(\d+)$", name)
    if found is None:
        raise ValueError(f"MultiPL-E row without a HumanEval number in name/task_id: {name!r}")
    return int(found.group(1))


def order_problems(dataset, common: list[int]):
    """lm-eval `process_docs`: the rows by HumanEval number, those in `common` (present in every language of the
    run) first, so that a limit of k <= len(common) scores the same k problems in every language; a full run
    still scores every row. `dataset`: a `datasets.Dataset` of MultiPL-E / HumanEval-X rows."""
    common = set(common)
    numbers = [problem_number(row) for row in dataset]
    order = sorted(range(len(numbers)), key=lambda i: (numbers[i] not in common, numbers[i]))
    return dataset.select(order)


def stop_tokens(doc: dict, language: str) -> list[str]:
    tokens = doc.get("stop_tokens") or []
    return list(tokens) if tokens else list(STOP_TOKENS.get(language, []))


def truncate_completion(completion: str, stops: list[str]) -> str:
    """Cut `completion` at the earliest stop sequence (MultiPL-E convention; lm-eval usually did it already)."""
    cut = len(completion)
    for stop in stops:
        at = completion.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion[:cut]


def assemble_program(doc: dict, completion: str, language: str) -> str:
    """prompt + completion + tests, as MultiPL-E runs it. `completion` is the raw generation (cut here)."""
    completion = truncate_completion(completion, stop_tokens(doc, language))
    tests = doc.get("tests") or doc.get("test") or ""
    program = doc["prompt"] + completion + "\n" + tests
    if language == "python" and doc.get("entry_point") and f"check({doc['entry_point']})" not in tests:
        program += f"\n\ncheck({doc['entry_point']})\n"
    return program


def execute(doc: dict, completion: str, language: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run one completion against its tests in the sandbox. Raises RuntimeError when the toolchain is missing."""
    problem = toolchain_problem(language)
    if problem:
        raise RuntimeError(problem)
    chain = TOOLCHAINS[language]
    jar = javatuples_jar() if JAR in chain.command else None
    command = [jar if part == JAR else part for part in chain.command]
    limits = limits or SandboxLimits(timeout_s=chain.timeout_s, memory_mb=chain.memory_mb,
                                     max_processes=chain.max_processes)
    return run_sandboxed(command, {chain.file_name: assemble_program(doc, completion, language)}, limits,
                         tools=chain.needs, read_only_paths=(jar,) if jar else ())


def pass_at_1(doc: dict, results: list[str], language: str) -> dict[str, float]:
    """lm-eval `process_results` body: greedy pass@1 of the single generation in `results`."""
    return {"pass@1": 1.0 if execute(doc, results[0], language).passed else 0.0}
