"""Structurally identical domain experts (the paper's Table 7): copies of the target trained one per corpus
domain (`baselines.domain_pool`). Output: `experts/<domain>/`, `experts.json` ({domain: relative folder}) and
`runtime.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.corpus import CorpusStage
from harness.stages.train import train_settings, trained_on


@dataclass(eq=False)
class DomainPoolStage(Stage):
    kind: ClassVar[str] = "domain_pool"

    corpus: CorpusStage
    target: dict
    seed: int
    training: dict
    max_steps: int
    target_spec: ModelSpec = no_key(default=None)

    def key_settings(self) -> dict:
        out = super().key_settings()
        out["training"] = {k: v for k, v in self.training.items() if k != "checkpoint_steps"}
        return out

    def build(self, out: Path, env) -> None:
        from baselines.domain_pool import train_domain_experts

        by_domain: dict[str, list[str]] = {}
        for r in env.corpus_rows(self.corpus)["train"]:
            by_domain.setdefault(r["domain"], []).append(r["text"])
        p = env.placement
        settings = train_settings(self.training, self.seed, max_steps=self.max_steps, device=p.device,
                                  bf16=p.train_bf16(bool(self.training.get("bf16", False))))
        path, tok = env.model_path(self.target_spec), env.tokenizer(self.target_spec)
        experts = train_domain_experts(path, by_domain, out / "experts", settings, tok, verbose=env.progress)
        env.note_runtime(self, out, {"device": trained_on(settings.device),
                                     "dtype": "bf16 mixed" if settings.bf16 else "float32"})
        (out / "experts.json").write_text(json.dumps({d: str(Path(p).relative_to(out)) for d, p in experts.items()}))


def read_experts(folder: Path) -> dict[str, Path]:
    """{domain: expert model folder} of a built domain pool."""
    folder = Path(folder)
    return {d: folder / p for d, p in json.loads((folder / "experts.json").read_text()).items()}
