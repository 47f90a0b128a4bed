"""Sharded distribution extraction: 2 torchrun processes give exactly the single-process dataset."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from fusion.distributions import extract_distributions
from harness.config import ModelSpec
from harness.models import load_model
from harness.sharded import ShardedExtractionError, extract_distributions_sharded, merge_shards, shard_plan

WORDS = "the quick brown fox jumps over the lazy dog and a stitch in time saves nine hello fusion".split()


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(3)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 40)))) for _ in range(n)]


def test_shard_plan_deals_whole_batches_longest_first():
    lengths = [5, 9, 2, 9, 7, 1, 4]
    # longest-first stable order: 1(9) 3(9) 4(7) 0(5) 6(4) 2(2) 5(1); batches of 2: [1,3] [4,0] [6,2] [5]
    # loads: r0 <- [1,3] (18), r1 <- [4,0] (14), r1 <- [6,2] (14+8=22), r0 <- [5] (18+1)
    assert shard_plan(lengths, world_size=2, batch_size=2) == [[1, 3, 5], [4, 0, 6, 2]]
    assert shard_plan(lengths, world_size=1, batch_size=3) == [[1, 3, 4, 0, 6, 2, 5]]
    assert shard_plan(lengths, world_size=3, batch_size=4) == [[1, 3, 4, 0], [6, 2, 5], []]
    with pytest.raises(ValueError, match="world_size"):
        shard_plan(lengths, world_size=0, batch_size=2)


def test_merge_shards_refuses_duplicates_and_gaps(tmp_path):
    def save(name, ids):
        ds = datasets.Dataset.from_dict({"doc_id": ids, "x": [i * 10 for i in ids]})
        ds.save_to_disk(str(tmp_path / name))
        return tmp_path / name

    a, b, c = save("a", [4, 1]), save("b", [3, 2]), save("c", [1])
    merged = merge_shards([a, b], expected_doc_ids=[1, 2, 3, 4])
    assert merged["doc_id"] == [1, 2, 3, 4] and merged["x"] == [10, 20, 30, 40]
    with pytest.raises(ShardedExtractionError, match="more than one shard"):
        merge_shards([a, b, c])
    with pytest.raises(ShardedExtractionError, match=r"miss doc_ids \[5\]"):
        merge_shards([a, b], expected_doc_ids=[1, 2, 3, 4, 5])


@pytest.mark.slow
def test_two_process_extraction_equals_single_process(tiny_llama_dir, tmp_path):
    texts = _texts(13)
    doc_ids = [100 + 7 * i for i in range(len(texts))][::-1]  # unsorted ids: the merge must sort them
    spec = ModelSpec(ref=str(tiny_llama_dir))
    loaded = load_model(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: same kernels, same reduction order
    try:
        single, single_stats = extract_distributions(loaded.model, loaded.tokenizer, texts, doc_ids, k=5,
                                                     batch_size=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    sharded, stats = extract_distributions_sharded(spec, texts, doc_ids, tmp_path / "job", nproc=2, k=5, batch_size=3,
                                                   threads_per_proc=1, timeout_s=300)
    assert sharded.features == single.features
    assert sharded["doc_id"] == sorted(doc_ids)
    assert sharded[:] == single[:]  # exact: fp16 logprobs and float32 ce/bpb included
    assert sharded.data.table.equals(single.data.table)
    assert stats.tokens == single_stats.tokens
    shard_rows = [len(datasets.load_from_disk(str(tmp_path / "job" / "shards" / f"rank-{r:05d}" / "dataset")))
                  for r in range(2)]
    assert sum(shard_rows) == len(texts) and min(shard_rows) > 0  # both ranks did real work


def test_failed_rank_names_the_model_and_logs(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(ShardedExtractionError, match=r"not-a-model with 1 processes failed.*per-rank logs under"):
        extract_distributions_sharded(ModelSpec(ref=str(bad)), ["a b c"], [0], tmp_path / "job", nproc=1, timeout_s=300)


@pytest.mark.slow
def test_pipeline_shards_extraction_itself(micro_world, tmp_path):
    """`runtime.extraction_nproc=2` (what `fuselab run --nproc 2` sets): the distributions stage runs two torchrun
    ranks and stores exactly what one single-threaded process computes, and says so in its runtime.json."""
    import json
    from pathlib import Path

    from harness.config import load_config
    from harness.executor import Executor
    from harness.pipeline import build_plan

    quickstart = Path(__file__).resolve().parents[2] / "studies" / "micro_quickstart.yaml"
    cfg = load_config(quickstart, [f"workdir={tmp_path}", "corpus.max_docs_per_domain=5", "runtime.device=cpu",
                                   "runtime.extraction_nproc=2"])
    plan = build_plan(cfg)
    single_plan = build_plan(load_config(quickstart, [f"workdir={tmp_path}", "corpus.max_docs_per_domain=5"]))
    assert plan.stages["distributions/neox-code"].key == single_plan.stages["distributions/neox-code"].key
    ex = Executor(plan, progress=False)
    stage = ex.ensure(plan.stages["distributions/neox-code"])
    rows = ex.env.corpus_rows(plan.stages["corpus"])["train"]
    sharded = datasets.load_from_disk(str(stage / "dataset"))
    assert json.loads((stage / "runtime.json").read_text()) == {"device": "cpu", "dtype": "float32", "processes": 2}
    assert not (stage / "_sharded").exists()  # the ranks' work folder is not kept in the cache
    lm = load_model(cfg.model_by_label("neox-code"), world=micro_world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, _ = extract_distributions(lm.model, lm.tokenizer, [r["text"] for r in rows], [r["doc_id"] for r in rows],
                                          k=cfg.fusion.top_k, batch_size=cfg.fusion.extraction_batch_size,
                                          store_dtype=cfg.fusion.store_dtype, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert sharded.data.table.equals(single.data.table)


def test_sharded_extraction_refuses_a_missing_gpu(tiny_llama_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from harness.runtime import RuntimeConfigError

    with pytest.raises(RuntimeConfigError, match="runtime.device: 'cuda' was asked for"):
        extract_distributions_sharded(ModelSpec(ref=str(tiny_llama_dir)), ["a b"], [0], tmp_path / "job", nproc=2,
                                      device="cuda")
    assert not (tmp_path / "job").exists()  # nothing started
