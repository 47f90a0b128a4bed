"""The runtime setting (device / dtype): resolution rules, cache keys, and that it reaches every model-running
stage of the pipeline (a CPU run in bfloat16: every stage must report the dtype it was given, not float32).
CUDA-only checks skip with a reason on machines without a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.config import ConfigError, load_config
from harness.pipeline import build_plan, run_experiment, runtime_params
from harness.runtime import (Placement, RuntimeConfigError, placement_from_config, planned_placement,
                             resolve_device, resolve_dtype)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"
SMALL = ["corpus.max_docs_per_domain=6", "training.max_steps=3", "training.per_device_batch_size=4",
         "baselines.domain_pool.max_steps=2", "evaluation.settings.limit=3", "evaluation.settings.max_gen_toks=4",
         "evaluation.perplexity.max_docs_per_domain=2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch here)")


def gpus(n: int) -> dict:
    return {"cuda_available": lambda: n > 0, "device_count": lambda: n}


# ------------------------------------------------------------------------------------------ resolution
def test_auto_is_the_gpu_when_visible_else_the_cpu():
    assert resolve_device("auto", **gpus(0), env={}) == "cpu"
    assert resolve_device("auto", **gpus(1), env={}) == "cuda:0"
    assert resolve_device("auto", **gpus(4), env={"LOCAL_RANK": "3"}) == "cuda:3"  # one rank per GPU
    assert resolve_device("cpu", **gpus(4), env={"LOCAL_RANK": "3"}) == "cpu"


def test_cuda_takes_the_local_rank_and_an_explicit_index():
    assert resolve_device("cuda", **gpus(2), env={}) == "cuda:0"
    assert resolve_device("cuda", **gpus(2), env={"LOCAL_RANK": "1"}) == "cuda:1"
    assert resolve_device("cuda:1", **gpus(2), env={"LOCAL_RANK": "0"}) == "cuda:1"


def test_no_silent_fallback_to_the_cpu():
    with pytest.raises(RuntimeConfigError, match=r"runtime.device: 'cuda' was asked for but torch sees no CUDA GPU"):
        resolve_device("cuda", **gpus(0), env={})
    with pytest.raises(RuntimeConfigError, match=r"runtime.device: 'cuda:2'.*needs GPU 2 but torch sees 2 GPU"):
        resolve_device("cuda:2", **gpus(2), env={})
    with pytest.raises(RuntimeConfigError, match=r"needs GPU 2 but torch sees 2"):
        resolve_device("cuda", **gpus(2), env={"LOCAL_RANK": "2"})
    with pytest.raises(RuntimeConfigError, match="runtime.device: 'gpu'"):
        resolve_device("gpu", **gpus(1), env={})


def test_dtype_auto_keeps_cpu_results_and_uses_bf16_on_a_gpu():
    yes, no = (lambda d: True), (lambda d: False)
    assert resolve_dtype("auto", "cpu", "float32", bf16_supported=yes) == "float32"
    assert resolve_dtype("auto", "cpu", "float16", bf16_supported=yes) == "float16"
    assert resolve_dtype("auto", "cuda:0", "float32", bf16_supported=yes) == "bfloat16"
    assert resolve_dtype("auto", "cuda:0", "float32", bf16_supported=no) == "float32"
    assert resolve_dtype("float32", "cuda:0", "bfloat16", bf16_supported=yes) == "float32"
    with pytest.raises(RuntimeConfigError, match="runtime.dtype: bfloat16 .* cuda:0 does not support it"):
        resolve_dtype("bfloat16", "cuda:0", bf16_supported=no)


def test_placement_rules():
    cpu = Placement("cpu")
    assert cpu.key_settings("float32") == {} and cpu.train_bf16(False) is False
    assert cpu.batch_size(4) == 4 and cpu.batch_size("auto") == 1
    gpu = Placement("cuda:0", bf16_ok=True)
    assert gpu.dtype_for("float32") == "bfloat16" and gpu.key_settings("float32") == {"run_dtype": "bfloat16"}
    assert gpu.train_bf16(False) is True and gpu.batch_size("auto:4") == 16
    assert Placement("cuda:0", dtype_request="float32").key_settings("float32") == {}
    assert Placement("cpu", dtype_request="bfloat16").train_bf16(False) is True


# ------------------------------------------------------------------------------------------ config
def test_runtime_section_validates_and_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime.device: device 'gpu0' is not one of auto, cpu, cuda, cuda:N"):
        load_config(QUICKSTART, ["runtime.device=gpu0"])
    with pytest.raises(ConfigError, match=r"runtime.dtype"):
        load_config(QUICKSTART, ["runtime.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"evaluation.settings.batch_size: .*'auto' or 'auto:N'"):
        load_config(QUICKSTART, ["evaluation.settings.batch_size=big"])
    assert load_config(QUICKSTART, ["evaluation.settings.batch_size=auto:8"]).evaluation.settings.batch_size == "auto:8"


def test_default_runtime_keeps_config_hash_and_stage_keys(tmp_path):
    base = load_config(QUICKSTART, [f"workdir={tmp_path}"])
    explicit = load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=auto", "runtime.dtype=auto"])
    assert explicit.content_hash() == base.content_hash()
    on_cpu = load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=cpu"])
    assert on_cpu.content_hash() != base.content_hash()
    a, b = build_plan(base), build_plan(on_cpu)
    if not torch.cuda.is_available():  # auto is the CPU here: the same results, so the same keys
        assert {n: s.key.key for n, s in a.stages.items()} == {n: s.key.key for n, s in b.stages.items()}


def test_bf16_changes_the_keys_of_what_models_compute_only(tmp_path):
    a = build_plan(load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=cpu"]))
    b = build_plan(load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=cpu", "runtime.dtype=bfloat16"]))
    changed = sorted(n for n in a.stages if a.stages[n].key.key != b.stages[n].key.key)
    assert "corpus" not in changed and not any(n.startswith("vocab/") for n in changed)
    assert {"distributions/llama-docs", "distributions/neox-code", "train/fusellm", "train/clm", "domain_pool",
            "eval/llama-docs", "eval/ensemble"} <= set(changed)
    assert b.stages["distributions/neox-code"].settings["run_dtype"] == "bfloat16"
    assert b.stages["train/clm"].settings["bf16_mixed"] is True


def test_a_gpu_config_plans_on_a_cpu_machine_and_runs_nowhere(tmp_path):
    cfg = load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=cuda"])
    plan = build_plan(cfg)  # planning never needs the device: keys as the GPU run will make them (bf16)
    assert plan.stages["distributions/neox-code"].settings.get("run_dtype") == "bfloat16"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the run would start")
    with pytest.raises(RuntimeConfigError, match="runtime.device: 'cuda' was asked for"):
        run_experiment(cfg, progress=False, track=False)
    assert not (tmp_path / "cache" / "distributions").exists()  # failed before any stage


def test_planned_placement_of_an_unavailable_gpu_assumes_bf16():
    cfg = load_config(QUICKSTART, ["runtime.device=cuda:1"])
    p = planned_placement(cfg.runtime)
    if not torch.cuda.is_available():
        assert p.device == "cuda:1" and p.dtype_for("float32") == "bfloat16"
        with pytest.raises(RuntimeConfigError):
            placement_from_config(cfg.runtime)


# ------------------------------------------------------------------------------------------ every stage
MODEL_STAGES = ("distributions/", "train/", "domain_pool", "merge/", "eval/")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, micro_world):
    wd = tmp_path_factory.mktemp("runtime-bf16")
    cfg = load_config(QUICKSTART, [f"workdir={wd}", *SMALL, "runtime.device=cpu", "runtime.dtype=bfloat16"])
    return cfg, run_experiment(cfg, progress=False, track=False)


@pytest.mark.slow
def test_the_runtime_dtype_reaches_every_model_running_stage(bf16_run):
    cfg, res = bf16_run
    rec = json.loads((res.run_dir / "runtime.json").read_text())
    assert rec["runtime"] == {"device": "cpu", "dtype": "bfloat16", "attn_implementation": "auto",
                              "extraction_nproc": 1}
    stages = rec["stages"]
    plan = build_plan(cfg)
    expected = sorted(n for n in plan.stages if n.startswith(MODEL_STAGES))
    assert sorted(stages) == expected  # every model-running stage reports, and only those
    for name, used in stages.items():
        if name.startswith("distributions/"):
            assert used == {"device": "cpu", "dtype": "bfloat16"}, name
        elif name.startswith("train/") or name == "domain_pool":
            assert used == {"device": "cpu", "dtype": "bf16 mixed"}, name  # float32 master weights
        elif name.startswith("merge/"):
            assert used == {"device": "cpu", "dtype": "float32"}, name
        elif name == "eval/ensemble":
            assert set(used["ensemble"]["members"]) == {s.label for s in cfg.sources}
            assert all(m == {"device": "cpu", "dtype": "bfloat16"} for m in used["ensemble"]["members"].values())
        else:
            assert used and all(m == {"device": "cpu", "dtype": "bfloat16"} for m in used.values()), (name, used)
    assert set(stages["eval/domain_pool"]) == {"expert:arithmetic", "expert:code", "expert:docs"}
    # the stage folder keeps it too, and MLflow gets one param per stage
    assert json.loads((plan.path("eval/clm") / "runtime.json").read_text()) == stages["eval/clm"]
    params = runtime_params(cfg, res.run_dir)
    assert params["placement.device"] == "cpu" and params["placement.dtype"] == "bfloat16"
    assert params["device/distributions/neox-code"] == "cpu bfloat16"
    assert params["device/train/fusellm"] == "cpu bf16 mixed"
    assert params["device/eval/merge_linear"] == "merge:linear=cpu bfloat16"


@needs_cuda
def test_gpu_extraction_matches_cpu_top_k(tiny_llama_dir):
    from fusion.distributions import extract_distributions
    from harness.config import ModelSpec
    from harness.models import load_model

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a stitch in time saves nine"]
    spec = ModelSpec(ref=str(tiny_llama_dir))
    cpu = load_model(spec)
    gpu = load_model(spec, device="cuda:0", dtype="float32")
    assert str(next(gpu.model.parameters()).device) == "cuda:0"
    a, _ = extract_distributions(cpu.model, cpu.tokenizer, texts, [0, 1], k=5, progress=False)
    b, _ = extract_distributions(gpu.model, gpu.tokenizer, texts, [0, 1], k=5, progress=False)
    ids_a, ids_b = sum(a["topk_ids"], []), sum(b["topk_ids"], [])
    assert sum(x == y for x, y in zip(ids_a, ids_b)) / len(ids_a) >= 0.999
    assert abs(float(a["bpb"][0]) - float(b["bpb"][0])) < 1e-3


def test_a_loaded_pair_scores_as_the_folder_does(micro_world):
    """Eval stages hand lm-eval the model they loaded (once, on the runtime device) instead of its folder:
    the scores must be those lm-eval gives for the folder itself."""
    from harness.evaluation import EvalSettings, evaluate
    from harness.models import load_model
    from harness.config import ModelSpec

    folder = micro_world.models["llama-docs"]
    settings = EvalSettings(limit=4, max_gen_toks=4, device="cpu")
    kw = dict(include_paths=[micro_world.tasks_dir], progress=False)
    by_path = evaluate(str(folder), ["micro"], settings, **kw)
    lm = load_model(ModelSpec(ref=str(folder)))
    by_pair = evaluate((lm.model, lm.tokenizer), ["micro"], settings, **kw)
    cols = ["task", "metric", "value", "stderr", "n"]
    assert len(by_path) > 0
    assert by_pair[cols].equals(by_path[cols])


def test_runtime_params_go_to_mlflow_beside_the_config(tmp_path):
    """What run_experiment logs: the config's runtime.* (as written) and placement.* / device/<stage> (as run)
    side by side in one MLflow run, stage names made valid param keys."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import Tracker

    cfg = load_config(QUICKSTART, [f"workdir={tmp_path}", "runtime.device=cpu"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "runtime.json").write_text(json.dumps({
        "runtime": {"device": "cpu", "dtype": "auto", "attn_implementation": "auto", "extraction_nproc": 2},
        "stages": {"distributions/neox-code": {"device": "cpu", "dtype": "float32", "processes": 2},
                   "eval/merge:ties": {"merge:ties": {"device": "cpu", "dtype": "float32"}},
                   "eval/ensemble": {"ensemble": {"members": {"a": {"device": "cpu", "dtype": "float32"}}}}}}))
    tracker = Tracker(None, "runtime-params", tmp_path / "mlflow")
    with tracker.run("exp") as run:
        tracker.log_config(cfg)
        tracker.log_params(runtime_params(cfg, run_dir))
    params = MlflowClient(tracker.uri).get_run(run.info.run_id).data.params
    assert params["runtime.device"] == "cpu" and params["placement.device"] == "cpu"
    assert params["placement.extraction_nproc"] == "2"
    assert params["device/distributions/neox-code"] == "cpu float32"
    assert params["device/eval/merge_ties"] == "merge:ties=cpu float32"
    assert params["device/eval/ensemble"] == "ensemble=a=cpu float32"
