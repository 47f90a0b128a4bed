"""`fuselab` as a user meets it: help and an example for every command, --version, `config show`, one-line errors
with exit code 2 (tracebacks with --debug), Ctrl-C exiting with 130, `world` building where the pipeline reads,
`ui` refusing a busy port, `study --no-track`."""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import cli
from harness.cli import build_parser, main
from harness.config import load_config
from harness.processes import free_port

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "fuselab"):
    """(full name, parser) of every subcommand, nested ones (`config show`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield f"{prefix} {name}", sp
                yield from _subcommands(sp, f"{prefix} {name}")


def test_every_command_and_argument_has_help_and_an_example():
    commands = dict(_subcommands(build_parser()))
    assert {"fuselab run", "fuselab study", "fuselab report", "fuselab ui", "fuselab world",
            "fuselab config show"} <= set(commands)
    for name, sp in commands.items():
        if not sp.add_help:  # a pass-through (`fuselab lm-eval`): the wrapped tool's own --help answers
            continue
        assert sp.description, name
        assert sp.epilog.startswith(f"example:\n  {name} "), f"{name}: epilog {sp.epilog!r}"
        for action in sp._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help.strip(), f"{name} {action.dest}: no help text"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    # the [project] table's version line (tomllib is Python >= 3.11; the tests run on 3.10 too)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert capsys.readouterr().out == f"fuselab {version}\n"


def test_study_takes_quiet_and_no_track_like_run():
    for command, target in (("run", str(QUICKSTART)), ("study", "s.yaml")):
        args = build_parser().parse_args([command, target, "--quiet", "--no-track"])
        assert (args.quiet, args.no_track) == (True, True)
    args = build_parser().parse_args(["study", "s.yaml"])
    assert (args.quiet, args.no_track) == (False, False)


def test_overrides_may_follow_options():
    args = cli.parse_args(["run", "exp.yaml", "fusion.lam=0.8", "--quiet", "training.max_steps=5", "--no-track"])
    assert (args.config, args.overrides, args.quiet, args.no_track) == (
        "exp.yaml", ["fusion.lam=0.8", "training.max_steps=5"], True, True)
    with pytest.raises(SystemExit) as exc:  # a word that is no override stays an error
        cli.parse_args(["run", "exp.yaml", "--quiet", "oops"])
    assert exc.value.code == 2


def test_config_show_prints_the_resolved_config_and_its_hash(capsys, tmp_path):
    assert main(["config", "show", str(QUICKSTART), "fusion.lam=0.8", "training.max_steps=7"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    expected_hash = load_config(QUICKSTART, ["fusion.lam=0.8", "training.max_steps=7"]).content_hash()
    assert first == (f"# micro_quickstart: content hash {expected_hash} (config {QUICKSTART}, "
                     "overrides: fusion.lam=0.8 training.max_steps=7)")
    data = yaml.safe_load(rest)
    assert data["name"] == "micro_quickstart" and data["fusion"]["lam"] == 0.8
    assert data["training"]["max_steps"] == 7
    assert data["fusion"]["alignment"] == "offsets"  # defaults spelled out
    # what it prints is a complete config: loaded back, it is the same experiment
    (tmp_path / "shown.yaml").write_text(rest)
    assert load_config(tmp_path / "shown.yaml").content_hash() == expected_hash


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fuselab: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return captured.err


def test_expected_failures_are_one_line_naming_the_culprit(capsys, tmp_path):
    err = _one_line_error(capsys, ["config", "show", str(QUICKSTART), "fusion.lamda=0.8"])
    assert "micro_quickstart.yaml: fusion.lamda: unknown key" in err
    err = _one_line_error(capsys, ["run", str(tmp_path / "missing.yaml"), "--no-track"])
    assert err == f"fuselab: error: {tmp_path / 'missing.yaml'}: config file not found\n"
    err = _one_line_error(capsys, ["study", str(tmp_path / "missing_study.yaml")])
    assert "missing_study.yaml: study spec not found" in err
    err = _one_line_error(capsys, ["report", "no-such-target", "--workdir", str(tmp_path / "wd")])
    assert err.startswith("fuselab: error: fuselab report 'no-such-target': not a study spec file")


def test_a_model_that_does_not_load_is_one_line(capsys, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder that is not a loadable model
    assert main(["run", str(QUICKSTART), f"workdir={tmp_path / 'wd'}", f"target.ref={broken}", "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fuselab: error: ") and "broken-model" in err and "Traceback" not in err


def test_which_errors_are_expected():
    from baselines.merging import UnmergeableModelsError
    from harness.config import ConfigError
    from harness.evaluation.data import DataUnavailableError
    from harness.models import ModelLoadError

    for exc in (ConfigError("x"), ModelLoadError("x"), UnmergeableModelsError("x"), DataUnavailableError("x"),
                FileNotFoundError("x"), PermissionError("x")):
        assert cli.is_expected(exc), exc
    for exc in (ValueError("x"), KeyError("x"), RuntimeError("x"), ZeroDivisionError()):
        assert not cli.is_expected(exc), exc


def test_every_expected_error_names_an_exception_class():
    import importlib

    for module, names in cli.EXPECTED_ERRORS.items():
        mod = importlib.import_module(module)
        for name in names:
            assert issubclass(getattr(mod, name), Exception), f"{module}.{name}"


def test_debug_shows_the_traceback_before_the_line(capsys):
    for argv in (["--debug", "config", "show", str(QUICKSTART), "fusion.lamda=1"],
                 ["config", "show", str(QUICKSTART), "fusion.lamda=1", "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "harness.config.ConfigError" in err
        assert err.splitlines()[-1].startswith("fuselab: error: micro_quickstart.yaml: fusion.lamda: unknown key")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a FuseLab bug")

    monkeypatch.setattr(cli, "cmd_config_show", bug)
    with pytest.raises(ZeroDivisionError):
        main(["config", "show", str(QUICKSTART)])


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_config_show", interrupted)
    assert main(["config", "show", str(QUICKSTART)]) == 130
    assert capsys.readouterr().err == "fuselab: interrupted\n"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_with(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ctrl_c_while_the_ui_starts_exits_130_and_stops_the_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "ui", "--workdir", str(tmp_path), "--port",
                             str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    server_cmd = f"--port {port} --workers 1"
    deadline = time.monotonic() + 120
    while not _processes_with(server_cmd) and time.monotonic() < deadline:  # the MLflow server is starting
        time.sleep(0.2)
    assert _processes_with(server_cmd), "the MLflow server never started"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "fuselab: interrupted\n"
    assert _processes_with(server_cmd) == [] and not _listening(port)


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, capsys):
    with socket.socket() as other:  # any process listening there
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        (tmp_path / f"mlflow-ui-{port}.log").write_text("another server's log\n")
        err = _one_line_error(capsys, ["ui", "--workdir", str(tmp_path), "--port", str(port)])
    assert err.startswith(f"fuselab: error: port {port} on 127.0.0.1 is in use")
    assert (tmp_path / f"mlflow-ui-{port}.log").read_text() == "another server's log\n"
    assert not (tmp_path / "mlflow.db").exists()


def test_world_is_built_where_the_pipeline_reads(tmp_path, monkeypatch, micro_world, capsys):
    from harness.pipeline import world_stage_key

    # the cache layout <workdir>/cache/<stage kind>/<key>, the folder the pipeline's world stage opens
    monkeypatch.delenv("FUSELAB_WORLD_CACHE", raising=False)
    cfg = load_config(QUICKSTART, [f"workdir={tmp_path / 'wd'}"])
    expected = (tmp_path / "wd").resolve() / "cache" / "world" / world_stage_key(0).key
    assert cli.world_root(cfg, str(QUICKSTART)) == expected
    # with a shared world cache (FUSELAB_WORLD_CACHE, as in these tests) `fuselab world` finds the built one there
    monkeypatch.setenv("FUSELAB_WORLD_CACHE", str(micro_world.root.parent))
    assert main(["world", str(QUICKSTART), f"workdir={tmp_path / 'wd'}"]) == 0
    assert capsys.readouterr().out.startswith(f"micro world at {micro_world.root}: ")


def test_world_without_a_world_section_is_one_line(capsys, tmp_path, tiny_llama_dir):
    cfg = tmp_path / "noworld.yaml"
    cfg.write_text(yaml.safe_dump({"name": "noworld", "corpus": {"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]},
                                   "target": {"ref": str(tiny_llama_dir)}, "sources": [{"ref": str(tiny_llama_dir)}]}))
    (tmp_path / "c.jsonl").write_text('{"text": "a b c"}\n')
    err = _one_line_error(capsys, ["world", str(cfg)])
    assert err == "fuselab: error: noworld.yaml: world: not set; this experiment uses no micro world\n"


def test_a_study_without_tracking_logs_nothing_to_mlflow(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "studies"))
    from study_objectives import expected_micro, fake_experiment

    from studies.runner import run_study

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "study_name": "s", "base": str(QUICKSTART), "seeds": [0],
        "search_space": {"fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]}},
        "objective": {"metric": "fusellm/micro", "direction": "maximize"}}))
    wd = tmp_path / "wd"
    study = run_study(spec, [f"workdir={wd}"], objective_fn=fake_experiment, progress=False, track=False)
    values = sorted(t.value for t in study.trials)
    assert values == [expected_micro("avgce", "mined", 0), expected_micro("mince", "mined", 0)] == [0.375, 0.625]
    assert not (wd / "mlflow.db").exists() and not (wd / "mlartifacts").exists()
    assert (wd / "reports" / "s" / "report.md").is_file()


def _environment_variables_read() -> set[str]:
    """Names the code reads: `os.environ[...]`, `.get` / `.setdefault` / `.pop`, `getenv`, `env.get`, `*_ENV = "..."`
    constants (Python), `${NAME:-...}` (scripts)."""
    call = re.compile(r"""(?:environ(?:\.get|\.setdefault|\.pop)?\(\s*|environ\[\s*|getenv\(\s*|env\.get\(\s*)"""
                      r"""["']([A-Z][A-Z0-9_]+)["']""")
    constant = re.compile(r"""^[A-Z_]*_ENV\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M)
    names: set[str] = set()
    for folder in ("harness", "fusion", "baselines", "studies", "benchmarks"):
        for py in (REPO / folder).rglob("*.py"):
            text = py.read_text()
            names |= set(call.findall(text)) | set(constant.findall(text))
    for sh in (REPO / "scripts").glob("*.sh"):
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-", sh.read_text()))
    return names


def test_every_environment_variable_the_code_reads_is_documented():
    names = _environment_variables_read()
    assert {"FUSELAB_WORKDIR", "FUSELAB_SANDBOX", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "LOCAL_RANK",
            "FUSELAB_LOCK"} <= names  # the scan finds what it should
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    section = doc[doc.index("## Environment variables"):]
    missing = sorted(n for n in names if f"`{n}`" not in section)
    assert missing == [], f"read by the code but not in docs/CONFIG.md's environment variables: {missing}"


@pytest.mark.slow
def test_fuselab_study_quiet_no_track_runs_a_real_trial_without_mlflow(tmp_path, micro_world, capsys):
    spec = tmp_path / "nt.yaml"
    spec.write_text(yaml.safe_dump({
        "study_name": "nt", "base": str(QUICKSTART), "seeds": [0],
        "search_space": {"fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]}},
        "objective": {"metric": "fusellm/micro", "direction": "maximize"}}))
    wd = tmp_path / "wd"
    small = ["corpus.max_docs_per_domain=10", "training.max_steps=4", "training.per_device_batch_size=4",
             "baselines.clm=false", "baselines.ensemble.enabled=false", "baselines.domain_pool.enabled=false",
             "baselines.merges=[]", "evaluation.settings.limit=6", "evaluation.settings.max_gen_toks=8",
             "evaluation.perplexity.max_docs_per_domain=3"]
    assert main(["study", str(spec), f"workdir={wd}", *small, "--n-trials", "1", "--quiet", "--no-track"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["[nt] queued 2 grid points", "[nt] trial 0: fusion.fusion=mince, seeds [0]"]
    assert out.splitlines()[2].startswith("[nt] trial 0: fusellm/micro = ")
    assert "[run]" not in out and "[cached]" not in out  # --quiet: no stage lines
    assert not (wd / "mlflow.db").exists() and not (wd / "mlartifacts").exists()
    assert (wd / "optuna.db").is_file()


@pytest.mark.slow
def test_ctrl_c_during_a_run_exits_130_without_a_traceback(tmp_path, micro_world):
    cmd = [sys.executable, "-m", "harness.cli", "run", str(QUICKSTART), f"workdir={tmp_path / 'wd'}", "--no-track",
           "--quiet", "corpus.max_docs_per_domain=10", "baselines.ensemble.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[run]" in line and "distributions/" in line:  # a stage is being built
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == ("fuselab: interrupted; what finished is cached: the same command "
                                           "resumes from there")
    assert "Traceback" not in out
