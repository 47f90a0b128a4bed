"""Target training under a distributed launcher (torchrun or DeepSpeed's), for DeepSpeed ZeRO-2/3.

`fuselab train CONFIG --launcher torchrun --nproc N` calls `launch_training`: the parent process runs
(or finds cached) every stage up to the fused dataset, then, for each training stage that is not cached
(`train/fusellm`, `train/clm`), writes a job file and starts `nproc` copies of the worker

    python -m harness.launch JOB.json          (what torchrun / deepspeed start in each process)

Each rank loads the target and the dataset and calls `fusion.trainer.train_target` with the
experiment's `training.deepspeed` (zero2 | zero3 | a JSON path); rank 0 writes `train_result.json`. When all
ranks exit 0 the parent moves the output into the stage cache atomically, so `fuselab run` then finds
the trained model cached and goes on with evaluation. Checkpoints go to the stage's folder under
`<cache>/_checkpoints/` (as in `fuselab run`): a killed job started again resumes from the last one.

Launchers:
- "torchrun": `python -m torch.distributed.run --standalone --nproc_per_node N` (CPU: gloo; GPU: nccl).
- "deepspeed": DeepSpeed's own launcher (`deepspeed --num_gpus N --module harness.launch JOB`); GPUs only.
- None / "none": one process with RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT set, which is what DeepSpeed
  needs to initialise without a launcher (otherwise it looks for mpi4py).

Several DeepSpeed processes without a GPU (transformers 5.24 / accelerate 1.15): TrainingArguments builds
accelerate's state with no backend, which then counts one process; the Trainer fills DeepSpeed's "auto"
train_batch_size for one process and DeepSpeed's batch check fails on every rank. The worker therefore
sets up that state itself with gloo (`_cpu_deepspeed_state`) and flags it in FUSELAB_CONFIGURED_STATE;
`fusion.trainer.training_arguments` must then pass `accelerator_config={"use_configured_state": True}`
so the state is kept. On GPUs (nccl) nothing of this is needed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from harness.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("torchrun", "deepspeed", "none")
CONFIGURED_STATE_ENV = "FUSELAB_CONFIGURED_STATE"


class LaunchError(RuntimeError):
    """A launched training job failed; the message names the stage, the launcher and the log file."""


def worker_command(job_path: str | Path, launcher: str | None, nproc: int) -> list[str]:
    """The argv that starts `nproc` training workers on `job_path` under `launcher`."""
    launcher = launcher or "none"
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if launcher == "none":
        if nproc != 1:
            raise ValueError(f"launcher none runs one process; use --launcher torchrun for nproc={nproc}")
        return [sys.executable, "-m", "harness.launch", str(job_path)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "harness.launch", str(job_path)]
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, f"--num_gpus={nproc}", f"--master_port={free_port()}", "--module", "harness.launch",
            str(job_path)]


def worker_env(launcher: str | None, nproc: int, threads: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if (launcher or "none") == "none":
        # DeepSpeed's init_distributed falls back to MPI discovery unless these say "single process"
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def run_job(job_path: str | Path, launcher: str | None = "torchrun", nproc: int = 1,
            timeout_s: float | None = None, threads: int | None = None) -> dict:
    """Run one training job (written by `write_job`) under `launcher`; return rank 0's train_result.json.

    The launcher's output goes to `<job dir>/launch.log`. Raises LaunchError naming the log on failure.
    """
    job_path = Path(job_path)
    job = json.loads(job_path.read_text())
    log_path = job_path.parent / "launch.log"
    cmd = worker_command(job_path, launcher, nproc)
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, env=worker_env(launcher, nproc, threads), cwd=str(REPO_ROOT), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{job['stage']}: {launcher} with {nproc} process(es) ran past {timeout_s} s; "
                              f"see {log_path}") from None
    result_path = Path(job["output"]) / "train_result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-2500:]
        raise LaunchError(f"{job['stage']}: training under {launcher or 'none'} with {nproc} process(es) failed "
                          f"(exit {proc.returncode}); full log {log_path}; last lines:\n{tail}")
    result = json.loads(result_path.read_text())
    result["launch_seconds"] = time.perf_counter() - t0
    return result


def write_job(job_dir: str | Path, *, stage: str, model: dict, dataset: str | Path, settings: dict, lam: float,
              temperature: float = 1.0, loss_positions: str = "next_label",
              checkpoint_dir: str | Path | None = None) -> Path:
    """Write `job.json`: model (a ModelSpec dump with a local `ref`), dataset (save_to_disk folder),
    settings (fusion.trainer.TrainSettings fields), lam, temperature, loss_positions, checkpoint_dir (where the
    workers keep resumable checkpoints; None: none). Output goes to `<job_dir>/output/`."""
    job_dir = Path(job_dir)
    out = job_dir / "output"
    if out.exists():
        shutil.rmtree(out)
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"stage": stage, "model": model, "dataset": str(dataset), "output": str(out), "settings": settings,
           "lam": lam, "temperature": temperature, "loss_positions": loss_positions,
           "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None}
    path = job_dir / "job.json"
    path.write_text(json.dumps(job, indent=2))
    return path


def run_worker(job_path: str | Path) -> None:
    """One rank of a training job: load target + dataset, train_target, rank 0 writes train_result.json.

    Output layout (the `train/*` stage layout of harness.pipeline): `<output>/model/` and
    `<output>/train_result.json`.
    """
    import datasets
    import torch

    from fusion.publish import publish_file
    from fusion.trainer import TrainSettings, train_target
    from harness.config import ModelSpec
    from harness.models import load_model

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings = TrainSettings(**job["settings"])
    if settings.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        _cpu_deepspeed_state()
    loaded = load_model(ModelSpec.model_validate(job["model"]))
    dataset = datasets.load_from_disk(job["dataset"])
    out = Path(job["output"])
    result = train_target(loaded.model, loaded.tokenizer, dataset, out / "model", settings,
                          lam=float(job["lam"]), temperature=float(job["temperature"]),
                          loss_positions=job["loss_positions"], label=job["stage"].rsplit("/", 1)[-1],
                          checkpoint_dir=job.get("checkpoint_dir"))
    if rank == 0:
        import deepspeed.comm

        payload = asdict(result)
        payload["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        # evidence that the DeepSpeed engine (not the plain Trainer loop) ran this job
        payload["deepspeed_initialized"] = bool(deepspeed.comm.is_initialized())
        with publish_file(out / "train_result.json", fsync=False) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, default=float))


def _cpu_deepspeed_state() -> None:
    """Several DeepSpeed processes without a GPU: set up accelerate's shared state with gloo first.

    TrainingArguments builds accelerate's PartialState with no backend when DeepSpeed is on; without a GPU
    that state then counts one process, the Trainer fills DeepSpeed's "auto" batch size for one process
    and DeepSpeed's batch check fails on every rank. A PartialState created first with the gloo backend
    (the one TrainingArguments later reuses) counts all ranks and still marks the run as DeepSpeed.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    # fusion.trainer passes accelerator_config={"use_configured_state": True} when this is set, so that
    # TrainingArguments keeps the state above instead of resetting it (fusion never imports harness)
    os.environ[CONFIGURED_STATE_ENV] = "1"


def launch_training(config: str | Path, overrides: list[str] = (), launcher: str | None = "torchrun",
                    nproc: int = 1, *, progress: bool = True, timeout_s: float | None = None) -> int:
    """`fuselab train`: train the target (every training stage of the plan: FuseLLM, CLM-only when enabled, and
    those of further methods) of `config` under `launcher`.

    The same plan, executor, cache and stage order as `fuselab run`: the stages a training reads are run (or
    found cached) first; a training stage is built by a launched job instead of in this process. Returns 0 on
    success (the CLI's exit status); raises LaunchError naming the stage and log when a job fails.
    """
    from harness.config import load_config
    from harness.executor import Executor
    from harness.models import ModelLoadError
    from harness.pipeline import build_plan, check_models
    from harness.stages.train import TrainStage

    launcher = None if launcher in (None, "none") else launcher
    worker_command("job.json", launcher, nproc)  # validates launcher / nproc before any work
    cfg = load_config(config, list(overrides))
    plan = build_plan(cfg)
    problems = check_models(cfg, plan.hashes)
    if problems:  # before any stage runs, one line per problem naming the model
        raise ModelLoadError("\n".join(problems))
    plan.cache.clean_stale()
    ex = Executor(plan, progress=progress)
    for stage in [st for st in plan.stages.values() if isinstance(st, TrainStage)]:
        for dep in stage.inputs().values():
            ex.ensure(dep)
        ex.ensure(stage, build=lambda tmp, st=stage: _launched_build(st, tmp, ex, launcher, nproc, timeout_s))
    return 0


def _launched_build(stage, tmp: Path, ex, launcher: str | None, nproc: int, timeout_s: float | None) -> None:
    """Build a training stage by a job under `launcher`: its model and train_result.json into `tmp`."""

    from harness.stages.corpus import CorpusStage
    from harness.stages.train import clm_dataset, train_settings

    env, p = ex.env, ex.placement
    job_dir = ex.cache.root.parent / "launch" / f"{stage.name.replace('/', '-')}-{stage.key.key}"
    if isinstance(stage.data, CorpusStage):  # CLM on the corpus: the job reads the tokenized documents
        dataset = job_dir / "dataset"
        if dataset.exists():
            shutil.rmtree(dataset)
        clm_dataset(env.tokenizer(stage.target_spec), env.corpus_rows(stage.data)["train"]).save_to_disk(str(dataset))
    else:
        dataset = env.path(stage.data) / "dataset"
    target = stage.target_spec
    model = target.model_copy(update={"ref": env.model_path(target), "name": target.label}).model_dump(mode="json")
    settings = train_settings(stage.training, stage.seed, device=p.device,
                              bf16=p.train_bf16(bool(stage.training.get("bf16", False))))
    job = write_job(job_dir, stage=stage.name, model=model, dataset=dataset, settings=asdict(settings),
                    lam=stage.lam, temperature=stage.temperature, loss_positions=stage.loss_positions,
                    checkpoint_dir=env.checkpoint_dir(stage))
    ex.say(f"  [launch] {stage.name} under {launcher or 'none'} x {nproc} (deepspeed={settings.deepspeed}); "
           f"log {job.parent / 'launch.log'}")
    run_job(job, launcher, nproc, timeout_s=timeout_s)
    shutil.move(str(job_dir / "output" / "model"), str(tmp / "model"))
    shutil.copy(job_dir / "output" / "train_result.json", tmp / "train_result.json")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.launch JOB.json   (started by a launcher; see launch_training)")
    run_worker(sys.argv[1])
