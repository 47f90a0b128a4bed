"""One model's top-k next-token distributions on every training document (`fusion.distributions`), in one process
or sharded over `runtime.extraction_nproc` processes (`harness.sharded`).
Output: `dataset/` (doc_id, n_tokens, topk_ids, topk_logprobs, ce, n_bytes, bpb), `stats.json`, `runtime.json`."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.checks import require_finite
from harness.stages.corpus import CorpusStage


@dataclass(eq=False)
class DistributionsStage(Stage):
    kind: ClassVar[str] = "distributions"

    corpus: CorpusStage
    model: dict  # the model's content identity (harness.models.identity): weights, tokenizer, dtype
    k: int
    dtype: str  # what the log-probabilities are stored as (fusion.store_dtype)
    batch_size: int = no_key(default=8)  # padding moves logits by float noise only (below the stored precision)
    spec: ModelSpec = no_key(default=None)
    device: str = no_key(default="cpu")  # runtime.device as configured (the sharded ranks resolve it)

    def build(self, out: Path, env) -> None:
        import torch

        torch.manual_seed(env.seed)
        rows = env.corpus_rows(self.corpus)["train"]
        texts, doc_ids = [r["text"] for r in rows], [r["doc_id"] for r in rows]
        if env.placement.extraction_nproc > 1:
            ds, stats, used = self._sharded(texts, doc_ids, out, env)
        else:
            ds, stats, used = self._single(texts, doc_ids, env)
        env.note_runtime(self, out, used)
        require_finite(ds, ("topk_logprobs", "ce", "bpb"), self.name,
                       f"model {self.spec.label} gives non-finite log-probabilities (NaN/inf weights, or an overflow "
                       f"in {self.spec.dtype}: try dtype float32)")
        ds.save_to_disk(str(out / "dataset"))
        (out / "stats.json").write_text(json.dumps(asdict(stats), indent=2))

    def _single(self, texts: list[str], doc_ids: list[int], env):
        from fusion.distributions import extract_distributions
        from harness.runtime import observed

        lm = env.load(self.spec)
        ds, stats = extract_distributions(lm.model, lm.tokenizer, texts, doc_ids, k=self.k,
                                          batch_size=self.batch_size, store_dtype=self.dtype,
                                          progress=env.progress, label=self.spec.label)
        return ds, stats, observed(lm.model)

    def _sharded(self, texts: list[str], doc_ids: list[int], out: Path, env):
        from harness.sharded import extract_distributions_sharded

        p = env.placement
        local = self.spec.model_copy(update={"ref": env.model_path(self.spec), "name": self.spec.label})
        work = out / "_sharded"
        ds, stats = extract_distributions_sharded(
            local, texts, doc_ids, work, nproc=p.extraction_nproc, k=self.k, batch_size=self.batch_size,
            store_dtype=self.dtype, device=self.device, dtype=p.dtype_for(self.spec.dtype),
            attn_implementation=p.attn_implementation, progress=env.progress)
        used = {"device": stats_device(work), "dtype": p.dtype_for(self.spec.dtype), "processes": p.extraction_nproc}
        shutil.rmtree(work)  # the merged dataset is in memory; the shards would double the stage's size
        return ds, stats, used


def stats_device(work: Path) -> str:
    """The devices the ranks of a sharded extraction ran on, from their stats files ("cpu", "cuda:0,cuda:1")."""
    found = []
    for f in sorted(Path(work).glob("shards/rank-*/stats.json")):
        d = json.loads(f.read_text()).get("device", "cpu")
        if d not in found:
            found.append(d)
    return ",".join(found) or "cpu"
