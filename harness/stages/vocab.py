"""A source -> target vocabulary map (`fusion.vocab.build_vocab_map`). Output: `source_to_target.npy` and
`prefixed_to_target.npy` (int32 [source vocab], target id or -1) and `summary.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.world import WorldStage


@dataclass(eq=False)
class VocabStage(Stage):
    kind: ClassVar[str] = "vocab"
    version: ClassVar[int] = 2  # 2: byte tokens compared as bytes (they all collapsed into U+FFFD before)

    world: WorldStage | None
    source: dict  # tokenizer identities: a map depends on the tokenizers only
    target: dict
    method: str  # a name in fusion.registry.VOCAB_MAPS
    text: str  # fusion.vocab_text
    special_tokens: str  # fusion.special_tokens
    source_spec: ModelSpec = no_key(default=None)
    target_spec: ModelSpec = no_key(default=None)

    def build(self, out: Path, env) -> None:
        from fusion.vocab import build_vocab_map

        vm = build_vocab_map(self.method, env.tokenizer(self.source_spec), env.tokenizer(self.target_spec),
                             text=self.text, special_tokens=self.special_tokens)
        np.save(out / "source_to_target.npy", vm.source_to_target)
        np.save(out / "prefixed_to_target.npy", vm.prefixed_to_target)
        (out / "summary.json").write_text(json.dumps(
            {"method": vm.method, "mapped": int((vm.source_to_target >= 0).sum()),
             "source_vocab": int(vm.source_to_target.shape[0])}))

    def figures(self, folder: Path) -> dict:
        data = json.loads((Path(folder) / "summary.json").read_text())
        if data.get("source_vocab"):
            data["mapped_fraction"] = data["mapped"] / data["source_vocab"]
        return data


def read_vocab_map(folder: Path, method: str):
    """fusion.vocab.VocabMap of a built vocab stage."""
    from fusion.vocab import VocabMap

    folder = Path(folder)
    return VocabMap(np.load(folder / "source_to_target.npy"), method, np.load(folder / "prefixed_to_target.npy"))
