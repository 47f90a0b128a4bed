"""Training the target: FuseLLM (lam < 1 on the fused set), CLM-only (lam = 1 on the same documents) and any
method that trains the target on a dataset stage (`fusion.trainer.train_target`).
Output: `model/` (safetensors + tokenizer), `train_result.json` (loss curves, throughput), `runtime.json`."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.corpus import CorpusStage


def train_settings(training: dict, seed: int, **overrides):
    """fusion.trainer.TrainSettings from the config's `training` section (same field names) and the seed;
    `overrides` (device, bf16, max_steps) win."""
    from fusion.trainer import TrainSettings

    return TrainSettings(**{**training, "seed": seed, **overrides})


@dataclass(eq=False)
class TrainStage(Stage):
    kind: ClassVar[str] = "train"

    data: Stage  # a stage with `dataset/` in the fused layout, or the corpus (CLM on its train split)
    target: dict  # the target's identity
    seed: int
    training: dict  # harness.config.TrainingSpec as JSON: the TrainSettings fields
    lam: float
    temperature: float
    loss_positions: str
    target_spec: ModelSpec = no_key(default=None)
    label: str = no_key(default="train")  # the contestant it trains (progress lines, live training curve)

    def key_settings(self) -> dict:
        out = super().key_settings()
        out["training"] = {k: v for k, v in self.training.items() if k != "checkpoint_steps"}  # saving changes no result
        if self.lam == 1.0:  # the fusion term is skipped: its knobs do not change the model
            out.pop("temperature"), out.pop("loss_positions")
        return out

    def dataset(self, env):
        """The training set: the input stage's `dataset/`, or the corpus' training documents tokenized by the
        target (no BOS, EOS appended) for CLM-only."""
        import datasets

        if isinstance(self.data, CorpusStage):
            return clm_dataset(env.tokenizer(self.target_spec), env.corpus_rows(self.data)["train"])
        return datasets.load_from_disk(str(env.path(self.data) / "dataset"))

    def build(self, out: Path, env) -> None:
        from fusion.trainer import train_target

        lm = env.load(self.target_spec, training=True)
        p = env.placement
        settings = train_settings(self.training, self.seed, device=p.device,
                                  bf16=p.train_bf16(bool(self.training.get("bf16", False))))
        res = train_target(lm.model, lm.tokenizer, self.dataset(env), out / "model", settings, lam=self.lam,
                           temperature=self.temperature, verbose=env.progress, loss_positions=self.loss_positions,
                           label=self.label, checkpoint_dir=env.checkpoint_dir(self), on_log=env.curve_sink(self.label))
        record = asdict(res)
        record["model_dir"] = "model"  # relative: the stage folder is renamed into place
        env.note_runtime(self, out, {"device": res.device, "dtype": res.precision})
        (out / "train_result.json").write_text(json.dumps(record, indent=2, default=float))

    def figures(self, folder: Path) -> dict:
        f = Path(folder) / "train_result.json"
        data = json.loads(f.read_text()) if f.is_file() else {}
        return {"runtime_s" if k == "train_runtime" else k: data[k]
                for k in ("train_runtime", "tokens", "tokens_per_s", "flops_per_s", "resumed_from_step", "steps_run")
                if k in data}

    def published(self, folder: Path, env) -> None:
        shutil.rmtree(env.checkpoint_dir(self), ignore_errors=True)  # the model is published: not needed


def clm_dataset(tokenizer, rows: list[dict]):
    """doc_id, input_ids (int32, no BOS, EOS appended) of corpus rows: the CLM-only training set."""
    import datasets
    import numpy as np

    from fusion.tokens import tokenize_document

    ids = [tokenize_document(tokenizer, r["text"], add_bos=False, add_eos=True).ids.astype(np.int32) for r in rows]
    return datasets.Dataset.from_dict({"doc_id": [r["doc_id"] for r in rows], "input_ids": ids})


def loss_curves(folder: Path, label: str) -> dict[str, list[tuple[int, float]]]:
    """{label: total loss, label/clm_loss, label/fusion_loss: [(step, nats/token)]} of a trained stage."""
    p = Path(folder) / "train_result.json"
    if not p.is_file():
        return {}
    rec = json.loads(p.read_text())
    out = {}
    for curve in ("losses", "clm_losses", "fusion_losses"):
        pts = sorted((int(step), float(v)) for step, v in rec.get(curve, {}).items())
        if pts:
            out[label if curve == "losses" else f"{label}/{curve.removesuffix('es')}"] = pts
    return out


def trained_on(device: str | None) -> str:
    """Where the HF Trainer trains with FuseLab's device setting (fusion.trainer.training_arguments)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return device if device and ":" in device else "cuda:0"
