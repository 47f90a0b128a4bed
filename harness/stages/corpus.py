"""The corpus stage: train / validation documents, training documents split so that every model's tokenization
fits one block (`fusion.data.split_documents`). Output: `train.jsonl`, `validation.jsonl` with doc_id, domain,
text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harness.config import CorpusSpec, ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.world import WorldStage


@dataclass(eq=False)
class CorpusStage(Stage):
    kind: ClassVar[str] = "corpus"

    world: WorldStage | None
    corpus: CorpusSpec
    block_size: int
    tokenizers: list[str]  # identities of every tokenizer that splits the documents (sorted JSON)
    files: list[str | None] = no_key(default_factory=list)  # sha256 of each corpus file (file corpora)
    models: list[ModelSpec] = no_key(default_factory=list)  # whose tokenizers those are: target, then sources
    seed: int = no_key(default=0)  # the train/validation shuffle of file corpora (in the key for those only)

    def key_settings(self) -> dict:
        out = {"corpus": self.corpus.model_dump(mode="json"), "block_size": self.block_size,
               "tokenizers": self.tokenizers}
        if self.corpus.kind != "micro":  # the micro world brings its own split (keyed by the world)
            out["seed"] = self.seed
            out["files"] = self.files
        return out

    def build(self, out: Path, env) -> None:
        from fusion.data import split_documents
        from harness.corpus import load_corpus_splits, save_jsonl

        toks = [env.tokenizer(spec) for spec in self.models]  # the target's first
        target = toks[0]
        splits = load_corpus_splits(self.corpus, world=env.world, seed=self.seed,
                                    count_tokens=lambda t: len(target(t, add_special_tokens=False)["input_ids"]))
        for split, rows in splits.items():
            docs, doc_id = [], 0
            for row in rows:
                pieces = split_documents([row["text"]], toks, self.block_size) if split == "train" else [row["text"]]
                for piece in pieces:
                    docs.append({"doc_id": doc_id, "domain": row["domain"], "text": piece})
                    doc_id += 1
            save_jsonl(out / f"{split}.jsonl", docs)


def read_corpus(folder: Path) -> dict[str, list[dict]]:
    """{split: [{"doc_id", "domain", "text"}]} of a built corpus stage."""
    from harness.corpus import load_jsonl

    return {p.stem: load_jsonl(p) for p in sorted(Path(folder).glob("*.jsonl"))}
