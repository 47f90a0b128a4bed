"""Continual training of the target model on the fused distributions, through the HF Trainer (and so DeepSpeed).

lam = 1 is the CLM-only baseline on the same code path: the fusion term is then skipped entirely and the
loss is exactly the HF causal-LM loss.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import torch
import transformers

from .data import FusionCollator, prepare_train_dataset
from .distributions import matmul_parameters
from .loss import IGNORE_INDEX, fusion_loss, valid_fusion_positions
from .publish import publish_file

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEEPSPEED_PRESETS = {"zero2": DEEPSPEED_DIR / "zero2.json", "zero3": DEEPSPEED_DIR / "zero3.json"}


@dataclass
class TrainSettings:
    """Target training hyper-parameters. Defaults follow the paper (block 2048, lr 1e-5, warmup 0.8%,
    weight decay 0.1, clip 1.0, cosine, 1 epoch) except bf16, which is off so that CPUs can run it.

    packing: concatenate documents into blocks (reference) or one example per document.
    cross_document_attention: with packing, let tokens attend across document boundaries (reference:
    packing without reset) or restart attention at every document.
    add_bos: prepend BOS to each document (the reference does not).
    deepspeed: None, "zero2", "zero3" (the shipped configs, all values "auto") or a path to a JSON config.
    device: None lets the Trainer choose (its GPU when one is visible); "cpu" keeps training on the CPU;
    "cuda" / "cuda:N" trains on that GPU (under a launcher each rank takes its LOCAL_RANK GPU).
    checkpoint_steps: how often `train_target` saves a resumable checkpoint when it is given a checkpoint_dir:
    None = about AUTO_CHECKPOINTS evenly spaced checkpoints per run, 0 = none, N = every N optimizer steps.
    Always a multiple of logging_steps, so that a resumed run logs the same loss averages as an uninterrupted one.
    extra_args: further `transformers.TrainingArguments` fields, passed through (`check_extra_args` says which
    are accepted); they win over FuseLab's defaults for the fields in `DEFAULTED_ARGS`.
    """

    block_size: int = 2048
    per_device_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_ratio: float = 0.008
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    lr_scheduler: str = "cosine"
    bf16: bool = False
    packing: bool = True
    cross_document_attention: bool = True
    add_bos: bool = False
    logging_steps: int = 1
    deepspeed: str | None = None
    device: str | None = None
    checkpoint_steps: int | None = None
    extra_args: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    """losses / clm_losses / fusion_losses: logged value by optimizer step (nats per token);
    train_runtime: seconds; tokens_per_s: non-padding tokens per second; flops_per_s: 6 * matmul parameters * tokens / s
    (fusion.distributions.matmul_parameters);
    model_dir: where the final model (safetensors) and tokenizer were saved."""

    losses: dict[int, float]
    clm_losses: dict[int, float]
    fusion_losses: dict[int, float]
    train_runtime: float
    tokens: int
    tokens_per_s: float
    flops_per_s: float
    model_dir: str
    settings: dict = field(default_factory=dict)
    device: str = ""  # where the Trainer ran the model (e.g. "cpu", "cuda:0")
    precision: str = ""  # "bf16 mixed" (float32 master weights) or the weights' dtype ("float32")
    resumed_from_step: int = 0  # the checkpoint's optimizer step this run continued from (0: from scratch)
    steps_run: int = 0  # optimizer steps computed by this call (total steps - resumed_from_step)


def deepspeed_config_path(deepspeed: str | None) -> str | None:
    """None, a preset name ("zero2", "zero3") or a path -> the JSON path the HF Trainer takes."""
    if deepspeed is None:
        return None
    if deepspeed in DEEPSPEED_PRESETS:
        return str(DEEPSPEED_PRESETS[deepspeed])
    if not Path(deepspeed).is_file():
        raise FileNotFoundError(f"deepspeed={deepspeed!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) "
                                "nor an existing JSON config file")
    return str(deepspeed)


class FusionTrainer(transformers.Trainer):
    """HF Trainer whose loss is `fusion.loss.fusion_loss`; logs clm_loss and fusion_loss next to loss.

    Extra arguments: lam (CLM weight lambda, 1 = CLM-only), temperature (applied to the fused distribution) and
    loss_positions (which positions the fusion term averages over, see `fusion.loss.valid_fusion_positions`).
    Under gradient accumulation both terms are normalised over the whole accumulated batch, as the HF
    Trainer does for its own CLM loss.
    """

    def __init__(self, *args, lam: float = 0.9, temperature: float = 1.0, loss_positions: str = "next_label",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.lam = lam
        self.temperature = temperature
        self.loss_positions = loss_positions
        self._num_fused_in_batch = None
        self._component_sums: dict[str, float] = {}
        self._component_steps = 0
        self.tokens_seen = 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._num_fused_in_batch = None
        if self.lam < 1.0 and num_items_in_batch is not None and batch_samples and "fused_probs" in batch_samples[0]:
            count = sum(valid_fusion_positions(b["labels"], b["fused_probs"], self.loss_positions).sum()
                        for b in batch_samples)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.to(device)).sum()
            self._num_fused_in_batch = count
        self._component_steps += 1
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        fused_ids = inputs.pop("fused_ids", None)
        fused_probs = inputs.pop("fused_probs", None)
        if model.training:
            self.tokens_seen += int((labels != IGNORE_INDEX).sum())
        # No KV cache in training; with a cache transformers also skips the packed-sequence mask from position_ids.
        outputs = model(**inputs, use_cache=False)
        fused_count = self._num_fused_in_batch if num_items_in_batch is not None else None
        parts = fusion_loss(outputs.logits, labels, fused_ids, fused_probs, self.lam, self.temperature,
                            num_items_in_batch=num_items_in_batch, num_fused_in_batch=fused_count,
                            positions=self.loss_positions)
        loss = parts["loss"]
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # Same rescaling as Trainer.compute_loss: the normaliser was summed over processes.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if model.training:
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            # current_gradient_accumulation_steps only exists inside Trainer.train (not in a bare training_step)
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            divisor = 1 if scaled else accumulation
            for name in ("clm_loss", "fusion_loss"):
                if name in parts:
                    self._component_sums[name] = self._component_sums.get(name, 0.0) + parts[name].item() / divisor
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._component_steps:
            for name, total in self._component_sums.items():
                logs[name] = round(total / self._component_steps, 6)
            self._component_sums = {}
            self._component_steps = 0
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------- checkpoints and progress
AUTO_CHECKPOINTS = 5  # checkpoint_steps=None: about this many checkpoints per run
CHECKPOINT_MARKER = "fuselab_checkpoint.json"  # written last into a checkpoint folder: it is complete


def checkpoint_interval(checkpoint_steps: int | None, max_steps: int, logging_steps: int) -> int:
    """Optimizer steps between checkpoints (0: none). None -> about AUTO_CHECKPOINTS per run of max_steps;
    always a multiple of logging_steps (a resumed run then logs the same loss averages as an uninterrupted one)."""
    if checkpoint_steps == 0 or max_steps <= 1:
        return 0
    if checkpoint_steps is None:
        per = -(-max_steps // AUTO_CHECKPOINTS)  # ceil
        return -(-per // logging_steps) * logging_steps
    if checkpoint_steps < 0 or checkpoint_steps % logging_steps:
        raise ValueError(f"checkpoint_steps={checkpoint_steps} must be 0 or a positive multiple of logging_steps="
                         f"{logging_steps} (so that a resumed run logs the same losses); e.g. "
                         f"{max(1, checkpoint_steps // logging_steps) * logging_steps}")
    return checkpoint_steps


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if path.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return int(name[len("checkpoint-"):])
    return None


def last_checkpoint(checkpoint_dir) -> Path | None:
    """The newest complete checkpoint (`checkpoint-<step>` with the marker written after the Trainer saved it)
    in checkpoint_dir, or None. A folder a kill interrupted mid-save has no marker and is never picked."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    done = [(step, p) for p in root.iterdir() if (step := _checkpoint_step(p)) is not None
            and (p / CHECKPOINT_MARKER).is_file()]
    return max(done)[1] if done else None


class CheckpointCallback(transformers.TrainerCallback):
    """Asks the Trainer to save every `interval` optimizer steps (not at the last step: the model is saved
    then anyway); after a save, marks the checkpoint complete and deletes every other checkpoint folder."""

    def __init__(self, checkpoint_steps: int | None, trainer: "FusionTrainer"):
        self.checkpoint_steps = checkpoint_steps
        self.trainer = trainer
        self.interval = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.interval = checkpoint_interval(self.checkpoint_steps, state.max_steps, args.logging_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.interval and state.global_step % self.interval == 0 and state.global_step < state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        with publish_file(folder / CHECKPOINT_MARKER, fsync=False) as tmp:
            tmp.write_text(json.dumps({"step": state.global_step, "tokens_seen": self.trainer.tokens_seen}))
        for other in Path(args.output_dir).iterdir():
            if other != folder and _checkpoint_step(other) is not None:
                shutil.rmtree(other, ignore_errors=True)


class LogForwarder(transformers.TrainerCallback):
    """Calls `sink(step, logs)` on the main process for every Trainer log entry (loss, clm_loss, fusion_loss,
    learning_rate, grad_norm per logging step; the run summary at the end). On a resumed run the entries
    restored from the checkpoint are replayed first, so a sink sees the whole curve. Errors in the sink are
    reported once and never stop training."""

    def __init__(self, sink: Callable[[int, dict], None]):
        self.sink = sink
        self._failed = False

    def _send(self, step: int, logs: dict) -> None:
        if self._failed:
            return
        try:
            self.sink(int(step), dict(logs))
        except Exception as exc:  # tracking is a side channel: a dead server must not kill the training
            self._failed = True
            print(f"warning: training logs stop being forwarded ({type(exc).__name__}: {exc})", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for entry in state.log_history:
                if "step" in entry:
                    self._send(entry["step"], {k: v for k, v in entry.items() if k != "step"})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._send(state.global_step, logs)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainingProgress(transformers.TrainerCallback):
    """One line per logging step on the main process, e.g.
    `    fusellm  step 15/60  loss 3.2101 (clm 3.3012, fusion 2.4107)  lr 9.5e-04  0:12 elapsed, ETA 0:36`.
    The ETA extrapolates the time per step of this process (steps restored from a checkpoint excluded)."""

    def __init__(self, label: str = "train", print_fn: Callable[[str], None] | None = None):
        self.label = label
        self.print = print_fn or (lambda line: print(line, flush=True))
        self.t0 = time.monotonic()
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.monotonic()
        self.first_step = state.global_step
        if state.is_world_process_zero and state.global_step:
            self.print(f"    {self.label}  resumed from the checkpoint at step {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        step, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self.t0
        done = step - self.first_step
        eta = elapsed / done * (total - step) if done > 0 else float("nan")
        parts = [f"    {self.label}  step {step}/{total}  loss {logs['loss']:.4f}"]
        terms = [f"{name.removesuffix('_loss')} {logs[name]:.4f}" for name in ("clm_loss", "fusion_loss") if name in logs]
        if terms:
            parts[0] += f" ({', '.join(terms)})"
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        parts.append(f"{_clock(elapsed)} elapsed, ETA {_clock(eta) if eta == eta else '?'}")
        self.print("  ".join(parts))


def require_position_ids(model) -> None:
    """Documents are isolated inside a packed block through position_ids resets (transformers builds the
    block-diagonal mask from them); a model whose forward takes no position_ids (e.g. MPT, ALiBi) cannot."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{type(model).__name__} takes no position_ids, so cross_document_attention=False cannot "
                         "isolate packed documents; use cross_document_attention=True or packing=False")


# Set by the launcher's worker (harness.launch) after it created accelerate's distributed state itself (CPU
# multi-process DeepSpeed); TrainingArguments must then keep that state instead of building a 1-process one.
CONFIGURED_STATE_ENV = "FUSELAB_CONFIGURED_STATE"


# TrainingArguments fields FuseLab derives from its own settings: `extra_args` may not set them (one place says
# each value, and the cache keys of trained models see it). Value: why, or what to set instead.
CONTROLLED_ARGS = {
    "output_dir": "it is the stage's cache folder",
    "per_device_train_batch_size": "set training.per_device_batch_size",
    "gradient_accumulation_steps": "set training.grad_accum",
    "learning_rate": "set training.lr",
    "warmup_steps": "set training.warmup_ratio",
    "weight_decay": "set training.weight_decay",
    "max_grad_norm": "set training.max_grad_norm",
    "num_train_epochs": "set training.num_epochs",
    "max_steps": "set training.max_steps",
    "seed": "set the config's seed",
    "data_seed": "set the config's seed",
    "lr_scheduler_type": "set training.lr_scheduler",
    "bf16": "set training.bf16",
    "logging_steps": "set training.logging_steps",
    "deepspeed": "set training.deepspeed",
    "remove_unused_columns": "always False: the collator needs the fused columns",
    "use_cpu": "set runtime.device",
    "accelerator_config": "set by the launcher",
    "resume_from_checkpoint": "a killed run resumes from its last checkpoint by itself (training.checkpoint_steps)",
}
# Fields FuseLab sets by default; `extra_args` wins over these.
DEFAULTED_ARGS = ("report_to", "save_strategy", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory")


def _value_problem(value, annotation) -> str | None:
    """Why `value` cannot be a TrainingArguments field of type `annotation` (None when it can). Only what holds
    on any machine is checked (types, enum choices); hardware-dependent checks (tf32...) happen at training."""
    import enum
    import types
    import typing

    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else (annotation,)
    if value is None:
        return None if type(None) in options else "may not be null"
    for enum_type in (o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)):
        choices = [e.value for e in enum_type]
        if value not in choices:
            quote = " (YAML reads no / yes as booleans: quote it)" if isinstance(value, bool) else ""
            return f"{value!r} is not one of {', '.join(map(str, choices))}{quote}"
        return None
    plain = [o for o in options if o in (bool, int, float, str)]
    if not plain or len(plain) != len([o for o in options if o is not type(None)]):
        return None  # dicts, lists, mixed unions: TrainingArguments checks them when training starts
    fits = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    return None if any(fits[o] for o in plain) else f"{value!r} is not a {' or '.join(o.__name__ for o in plain)}"


def check_extra_args(extra_args: dict) -> None:
    """ValueError naming the first field of `extra_args` that the installed transformers' TrainingArguments does not
    have, that FuseLab controls (`CONTROLLED_ARGS`), whose value has the wrong type or is not one of the field's
    choices, or (report_to) names a reporting integration that is unknown or not installed. Nothing that depends
    on the hardware is checked, so a config checks the same on a laptop and on a GPU node."""
    import dataclasses
    import typing

    from transformers.integrations import get_available_reporting_integrations

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    hints = typing.get_type_hints(transformers.TrainingArguments)
    for name, value in extra_args.items():
        if name in CONTROLLED_ARGS:
            raise ValueError(f"{name}: controlled by FuseLab, not settable in extra_args ({CONTROLLED_ARGS[name]})")
        if name not in fields:
            raise ValueError(f"{name}: not a field of transformers {transformers.__version__} TrainingArguments")
        problem = _value_problem(value, hints[name])
        if problem:
            raise ValueError(f"{name}: {problem}")
    report_to = extra_args.get("report_to")
    if report_to not in (None, "none", "all"):
        names = [report_to] if isinstance(report_to, str) else list(report_to)
        available = set(get_available_reporting_integrations())
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"report_to: {', '.join(missing)} is unknown to transformers or not installed here "
                             f"(installed: {', '.join(sorted(available)) or 'none'})")


def training_arguments(output_dir: str, settings: TrainSettings, deepspeed: str | None = None) -> transformers.TrainingArguments:
    """TrainSettings -> transformers.TrainingArguments. By default no external reporting (the harness tracks,
    through train_target's on_log), save_strategy "no" (`CheckpointCallback` decides when to save) and no tqdm
    bar; `settings.extra_args` sets any other field and wins over those defaults (`DEFAULTED_ARGS`)."""
    check_extra_args(settings.extra_args)
    extra = {}
    if os.environ.get(CONFIGURED_STATE_ENV) == "1":
        extra["accelerator_config"] = {"use_configured_state": True}
    on_gpu = torch.cuda.is_available()
    if settings.device == "cpu":
        extra["use_cpu"] = True
        on_gpu = False
    elif settings.device and settings.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        # one process: the Trainer places the model on the current CUDA device
        torch.cuda.set_device(int(settings.device.split(":", 1)[1]))
    defaults = {"save_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
                "dataloader_pin_memory": on_gpu}  # pinning without a GPU only warns
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        lr_scheduler_type=settings.lr_scheduler,
        bf16=settings.bf16,
        logging_steps=settings.logging_steps,
        deepspeed=deepspeed_config_path(deepspeed if deepspeed is not None else settings.deepspeed),
        remove_unused_columns=False,
        **{**defaults, **settings.extra_args},
        **extra,
    )


def train_target(model, tokenizer, fused_dataset: datasets.Dataset, output_dir, settings: TrainSettings,
                 lam: float, temperature: float = 1.0, deepspeed: str | None = None,
                 verbose: bool = True, loss_positions: str = "next_label", *, label: str = "train",
                 checkpoint_dir=None, on_log: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `model` on `fused_dataset` with lam * CLM + (1 - lam) * fusion loss and save it to output_dir.

    fused_dataset: doc_id, input_ids [n] (target tokenization), fused_ids / fused_probs [n * k], k; with
    lam = 1 a dataset with only input_ids is enough (CLM-only baseline, the fusion term is skipped).
    deepspeed overrides settings.deepspeed when given. The final model is saved as safetensors with the tokenizer.
    verbose: one progress line per logging step (`TrainingProgress`, prefixed with `label`); False prints
    nothing (the loss history is still returned).
    checkpoint_dir: a folder that outlives this process: checkpoints go there every settings.checkpoint_steps,
    and when it already holds a complete one (a killed run) training resumes from it, restoring weights,
    optimizer, scheduler, RNG states and the position in the data, so the final weights and logged losses
    equal those of an uninterrupted run. The caller deletes the folder once the model is safely stored.
    on_log(step, logs): called on the main process for every Trainer log entry (nats per token for the losses),
    the entries restored from a checkpoint first (e.g. to stream the curve to a tracking server).
    """
    fusion = lam < 1.0
    train_dataset = prepare_train_dataset(fused_dataset, settings.block_size, packing=settings.packing,
                                          add_bos=settings.add_bos, bos_token_id=tokenizer.bos_token_id,
                                          fusion=fusion)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token "
                         "to pad batches with; set tokenizer.pad_token")
    if not settings.cross_document_attention:
        require_position_ids(model)
    collator = FusionCollator(pad_id, cross_document_attention=settings.cross_document_attention)
    args = training_arguments(str(checkpoint_dir) if checkpoint_dir is not None else output_dir, settings, deepspeed)
    trainer = FusionTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                            lam=lam, temperature=temperature, loss_positions=loss_positions)
    # the raw log dicts go; the history is still recorded
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if verbose:
        trainer.add_callback(TrainingProgress(label))
    if on_log is not None:
        trainer.add_callback(LogForwarder(on_log))
    resume = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        trainer.add_callback(CheckpointCallback(settings.checkpoint_steps, trainer))
        resume = last_checkpoint(checkpoint_dir)
        if resume is not None:
            trainer.tokens_seen = int(json.loads((resume / CHECKPOINT_MARKER).read_text())["tokens_seen"])
    tokens_before = trainer.tokens_seen
    began = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    runtime = output.metrics.get("train_runtime", time.perf_counter() - began)
    resumed_from = int(resume.name.split("-")[-1]) if resume is not None else 0
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    history = trainer.state.log_history

    def by_step(key: str) -> dict[int, float]:
        return {int(entry["step"]): float(entry[key]) for entry in history if key in entry and "step" in entry}

    params = matmul_parameters(model)
    tokens = trainer.tokens_seen
    computed = tokens - tokens_before  # throughput of this process only (a resumed run restored the rest)
    return TrainResult(losses=by_step("loss"), clm_losses=by_step("clm_loss"), fusion_losses=by_step("fusion_loss"),
                       train_runtime=float(runtime), tokens=tokens,
                       tokens_per_s=computed / runtime if runtime else 0.0,
                       flops_per_s=6.0 * params * computed / runtime if runtime else 0.0,
                       model_dir=str(output_dir), settings=asdict(settings), device=str(trainer.args.device),
                       precision="bf16 mixed" if trainer.args.bf16 else
                       str(next(model.parameters()).dtype).removeprefix("torch."),
                       resumed_from_step=resumed_from, steps_run=int(trainer.state.global_step) - resumed_from)
