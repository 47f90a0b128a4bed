"""Where models run: the experiment's `runtime` section resolved once into a `Placement` that every
model-running stage receives (extraction, perplexity, lm-eval, the ensemble, training, domain experts, merging).

Rules (docs/CONFIG.md, `runtime`):
- device `auto` is the first visible GPU (under torchrun: the rank's `cuda:LOCAL_RANK`), else the CPU;
  `cuda` / `cuda:N` when no such GPU is visible is an error naming `runtime.device`, never a silent CPU run.
- dtype `auto` keeps each model's own declared dtype on the CPU (so CPU results are exactly today's) and runs
  bfloat16 on a GPU that supports it; an explicit dtype applies to every model-running stage.
- training keeps float32 master weights and uses bf16 mixed precision when the run dtype is bfloat16.

The device does not enter cache keys (a GPU and a CPU give the same results up to float rounding, as batch
sizes do); a run dtype that differs from the declared one does (see `Placement.key_settings`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("float32", "bfloat16", "float16")
# Requests per batch that "auto" becomes where FuseLab's own loops need a number (perplexity, the ensemble);
# lm-eval's HFLM gets "auto" itself and probes its largest batch.
AUTO_BATCH = {"cpu": 1, "cuda": 16}


class RuntimeConfigError(ValueError):
    """The runtime section asks for something this machine cannot do; the message names the field."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_count() -> int:
    """GPUs torch sees (0 without CUDA)."""
    return _cuda_device_count()


def _bf16_supported(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return True


def resolve_device(requested: str, *, cuda_available: Callable[[], bool] = _cuda_available,
                   device_count: Callable[[], int] = _cuda_device_count, env: dict | None = None) -> str:
    """`runtime.device` -> a concrete torch device string ("cpu", "cuda:0", ...).

    auto: "cuda:<LOCAL_RANK>" (0 outside torchrun) when a GPU is visible, else "cpu".
    cuda: the rank's GPU ("cuda:<LOCAL_RANK>"); cuda:N: GPU N. Both raise RuntimeConfigError naming
    `runtime.device` when no such GPU is visible.
    """
    env = os.environ if env is None else env
    if not DEVICE_PATTERN.match(str(requested)):
        raise RuntimeConfigError(f"runtime.device: {requested!r} is not one of auto, cpu, cuda, cuda:N")
    if requested == "cpu":
        return "cpu"
    local_rank = int(env.get("LOCAL_RANK", "0") or 0)
    if requested == "auto":
        if not cuda_available():
            return "cpu"
        return f"cuda:{local_rank % max(device_count(), 1)}"
    if not cuda_available():
        raise RuntimeConfigError(
            f"runtime.device: {requested!r} was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is "
            "False: a CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES hides them); set runtime.device=cpu "
            "or runtime.device=auto")
    index = local_rank if requested == "cuda" else int(requested.split(":", 1)[1])
    count = device_count()
    if index >= count:
        raise RuntimeConfigError(
            f"runtime.device: {requested!r} (LOCAL_RANK={local_rank}) needs GPU {index} but torch sees {count} "
            f"GPU(s) (cuda:0..cuda:{count - 1}); use a visible index or start fewer processes")
    return f"cuda:{index}"


def resolve_dtype(requested: str, device: str, declared: str = "float32", *,
                  bf16_supported: Callable[[str], bool] = _bf16_supported) -> str:
    """`runtime.dtype` -> the dtype a model runs in on `device` ("float32" | "bfloat16" | "float16").

    declared: the model's (or section's) own dtype, kept by `auto` on the CPU. On a GPU `auto` is bfloat16
    when the GPU supports it, else the declared dtype. An explicit bfloat16 on a GPU without it is an error.
    """
    if requested not in ("auto", *DTYPES):
        raise RuntimeConfigError(f"runtime.dtype: {requested!r} is not one of auto, {', '.join(DTYPES)}")
    if declared not in DTYPES:
        raise RuntimeConfigError(f"declared dtype {declared!r} is not one of {', '.join(DTYPES)}")
    if requested == "auto":
        if device.startswith("cuda") and bf16_supported(device):
            return "bfloat16"
        return declared
    if requested == "bfloat16" and not bf16_supported(device):
        raise RuntimeConfigError(f"runtime.dtype: bfloat16 was asked for but {device} does not support it; "
                                 "use float16 or float32")
    return requested


@dataclass(frozen=True)
class Placement:
    """One experiment's resolved runtime. device: concrete ("cpu", "cuda:0"); dtype_request: runtime.dtype
    as configured ("auto" or a dtype); attn_implementation: None = transformers' default."""

    device: str
    dtype_request: str = "auto"
    attn_implementation: str | None = None
    extraction_nproc: int = 1
    bf16_ok: bool = True  # the device computes in bfloat16 (every CPU; GPUs from Ampere on)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def dtype_for(self, declared: str = "float32") -> str:
        """The dtype a model declared as `declared` runs in here."""
        return resolve_dtype(self.dtype_request, self.device, declared, bf16_supported=lambda _: self.bf16_ok)

    def train_bf16(self, configured: bool) -> bool:
        """bf16 mixed precision for training: the training section's own `bf16`, or a bfloat16 run dtype."""
        return configured or self.dtype_for("float32") == "bfloat16"

    def batch_size(self, configured: int | str) -> int:
        """A concrete batch size for FuseLab's own loops: an int stays; "auto" / "auto:N" becomes
        AUTO_BATCH of this device kind."""
        if isinstance(configured, int):
            return configured
        return AUTO_BATCH["cuda" if self.is_cuda else "cpu"]

    def key_settings(self, declared: str = "float32") -> dict:
        """What a stage key must add so that a different run dtype is a different result: {} when the model
        runs in its declared dtype (so CPU defaults keep today's keys)."""
        run = self.dtype_for(declared)
        return {} if run == declared else {"run_dtype": run}

    def params(self) -> dict:
        """For logs and MLflow params."""
        return {"device": self.device, "dtype": self.dtype_request,
                "attn_implementation": self.attn_implementation or "auto", "extraction_nproc": self.extraction_nproc}


def placement_from_config(runtime_spec, *, bf16_supported: Callable[[str], bool] = _bf16_supported,
                          **resolvers) -> Placement:
    """harness.config.RuntimeSpec -> Placement: resolves `auto`, checks that the device exists and that the dtype
    runs there (RuntimeConfigError naming the field otherwise). resolvers: see resolve_device."""
    device = resolve_device(runtime_spec.device, **resolvers)
    bf16_ok = bf16_supported(device)
    resolve_dtype(runtime_spec.dtype, device, bf16_supported=lambda _: bf16_ok)  # fail now, not in a stage
    attn = None if runtime_spec.attn_implementation == "auto" else runtime_spec.attn_implementation
    return Placement(device=device, dtype_request=runtime_spec.dtype, attn_implementation=attn,
                     extraction_nproc=runtime_spec.extraction_nproc, bf16_ok=bf16_ok)


def planned_placement(runtime_spec) -> Placement:
    """The placement a plan's cache keys are computed with: `placement_from_config`, or where this machine
    cannot run the requested device (planning a GPU run on a laptop), that device as asked, assumed to
    support bfloat16, so the plan shows the keys the GPU run will use."""
    try:
        return placement_from_config(runtime_spec)
    except RuntimeConfigError:
        device = "cuda:0" if runtime_spec.device in ("cuda", "auto") else runtime_spec.device
        attn = None if runtime_spec.attn_implementation == "auto" else runtime_spec.attn_implementation
        return Placement(device=device, dtype_request=runtime_spec.dtype, attn_implementation=attn,
                         extraction_nproc=runtime_spec.extraction_nproc, bf16_ok=True)


def observed(model) -> dict:
    """Where a model actually is: {"device": "cuda:0", "dtype": "bfloat16"} from its first parameter."""
    p = next(model.parameters())
    return {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch.")}
