"""Cache identity from content (issue 19, items 1-2): model identities hash the files' content, every stage
key holds every setting its output depends on (and nothing it does not), the corpus key holds the seed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny
from local_models import local_config, save_model, write_corpus
from harness.config import ExperimentConfig, load_config, validate_config
from harness.pipeline import build_plan

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"


def keys(plan) -> dict[str, str]:
    return {name: st.key.key for name, st in plan.stages.items()}


def changed(a, b) -> list[str]:
    ka, kb = keys(a), keys(b)
    return sorted(n for n in set(ka) | set(kb) if ka.get(n) != kb.get(n))


def micro_plan(tmp_path, *overrides):
    return build_plan(load_config(QUICKSTART, [f"workdir={tmp_path}", *overrides]))


# --------------------------------------------------------------------------------------- local models
@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity-models")
    sp, bpe = tiny.sentencepiece_style(), tiny.byte_level()
    return {"root": root, "sp": sp, "bpe": bpe,
            "llama": save_model(root / "llama", "llama", sp, 0), "gpt2": save_model(root / "gpt2", "gpt2", bpe, 1),
            "corpus": write_corpus(root / "corpus")}


def test_same_size_new_weights_change_exactly_the_dependent_keys(local_models, tmp_path):
    """The issue's reproducer: new weights of the same size (another seed) used to change 0 stage keys."""
    m = local_models
    target = save_model(tmp_path / "target", "llama", m["sp"], 0)
    cfg = local_config(tmp_path / "wd", target, [("tgt", target), ("gpt2", m["gpt2"])], m["corpus"])
    before = build_plan(cfg)
    size = (target / "model.safetensors").stat().st_size
    save_model(target, "llama", m["sp"], 7)
    assert (target / "model.safetensors").stat().st_size == size  # same size, same names, same config.json
    after = build_plan(cfg)
    # everything computed from the target's weights; the corpus split and the vocabulary map only tokenize
    assert changed(before, after) == ["aligned/gpt2", "diagnostics", "distributions/tgt", "eval/fusellm", "eval/tgt",
                                      "fused", "train/fusellm"]


def test_three_structurally_identical_experts_get_distinct_identities(local_models, tmp_path):
    """Paper Table 7: experts that differ only in weight values (same sizes, config and tokenizer)."""
    m = local_models
    experts = [save_model(tmp_path / f"expert{i}", "llama", m["sp"], 10 + i) for i in range(3)]
    assert len({(e / "model.safetensors").stat().st_size for e in experts}) == 1
    assert len({(e / "config.json").read_text() for e in experts}) == 1
    cfg = local_config(tmp_path / "wd", experts[0], [(f"e{i}", e) for i, e in enumerate(experts)], m["corpus"])
    plan = build_plan(cfg)
    dist = [plan.stages[f"distributions/e{i}"].key.key for i in range(3)]
    assert len(set(dist)) == 3
    # same tokenizer: one vocabulary map serves both sources (same content, same key)
    assert plan.stages["vocab/e1"].key == plan.stages["vocab/e2"].key
    assert len({plan.stages[f"eval/e{i}"].key for i in range(3)}) == 3


def test_tokenizer_change_reaches_corpus_and_vocab_keys(local_models, tmp_path):
    m = local_models
    src = save_model(tmp_path / "src", "gpt2", m["bpe"], 1)
    cfg = local_config(tmp_path / "wd", m["llama"], [("tgt", m["llama"]), ("src", src)], m["corpus"])
    before = build_plan(cfg)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": len(tok["model"]["vocab"]), "content": "<extra>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    after = build_plan(cfg)
    assert {"corpus", "vocab/src", "distributions/src"} <= set(changed(before, after))


def test_corpus_file_content_is_in_the_corpus_key(local_models, tmp_path):
    m = local_models
    corpus = write_corpus(tmp_path / "corpus")
    cfg = local_config(tmp_path / "wd", m["llama"], [("tgt", m["llama"]), ("gpt2", m["gpt2"])], corpus)
    before = build_plan(cfg)
    text = corpus[0].read_text()
    corpus[0].write_text(text.replace("fox", "cat", 1))  # same length, one word
    after = build_plan(cfg)
    # every stage reads the corpus, directly or not, except the vocabulary map (tokenizers only)
    assert changed(before, after) == sorted(set(after.stages) - {"vocab/gpt2"})


def test_seed_changes_the_corpus_key_and_split(local_models, tmp_path):
    """Issue item 2: seed 0 and 1 had the same corpus key although their validation splits differ."""
    from harness.corpus import load_corpus_splits

    m = local_models
    cfg0 = local_config(tmp_path / "wd", m["llama"], [("tgt", m["llama"]), ("gpt2", m["gpt2"])], m["corpus"])
    cfg1 = ExperimentConfig.model_validate({**cfg0.model_dump(mode="json"), "seed": 1})
    assert build_plan(cfg0).stages["corpus"].key != build_plan(cfg1).stages["corpus"].key
    val0 = {r["text"] for r in load_corpus_splits(cfg0.corpus, seed=0)["validation"]}
    val1 = {r["text"] for r in load_corpus_splits(cfg1.corpus, seed=1)["validation"]}
    assert val0 != val1
    # the micro corpus comes split by the world: the run seed does not change its key
    assert micro_plan(tmp_path, "seed=0").stages["corpus"].key == micro_plan(tmp_path, "seed=1").stages["corpus"].key


# One input that matters and one that does not, per stage kind (micro quickstart: no model files needed).
CASES = [
    # (override, stage whose key is checked, changes?)
    ("training.block_size=128", "corpus", True),
    ("fusion.lam=0.5", "corpus", False),
    ("fusion.top_k=5", "distributions/neox-code", True),
    ("fusion.top_k=5", "distributions/llama-docs", True),
    ("fusion.extraction_batch_size=4", "distributions/neox-code", False),  # float rounding only
    ("fusion.vocab_map=em", "distributions/neox-code", False),
    ("fusion.vocab_map=em", "vocab/neox-code", True),
    ("fusion.top_k=5", "vocab/neox-code", False),
    ("fusion.alignment=dtw", "aligned/neox-code", True),
    ("fusion.fusion=avgce", "aligned/neox-code", False),
    ("fusion.fusion=avgce", "fused", True),
    ("fusion.lam=0.5", "fused", False),
    ("fusion.lam=0.5", "train/fusellm", True),
    ("training.lr=0.002", "train/clm", True),
    ("fusion.lam=0.5", "train/clm", False),
    ("baselines.domain_pool.max_steps=5", "domain_pool", True),
    ("fusion.lam=0.5", "domain_pool", False),
    ("baselines.merges.1.params.density=0.7", "merge/ties", True),
    ("baselines.merges.1.params.density=0.7", "merge/linear", False),
    ("evaluation.settings.limit=3", "eval/fusellm", True),
    ("tracking.experiment=elsewhere", "eval/fusellm", False),
    ("world.seed=1", "world", True),
    ("seed=1", "world", False),
]


@pytest.mark.parametrize("override,stage,changes", CASES)
def test_stage_key_follows_what_its_output_depends_on(tmp_path, override, stage, changes):
    base, other = micro_plan(tmp_path), micro_plan(tmp_path, override)
    assert (base.stages[stage].key != other.stages[stage].key) is changes


# Settings that do not change any stage's output: where things go and what loading may do; a revision
# for micro models (hub ids only: test_hub_ids_resolve_...); how many processes extract distributions (float
# rounding only, like the device: harness/runtime.py).
NOT_IN_ANY_KEY = {"name", "workdir", "tracking.uri", "tracking.experiment", "target.trust_remote_code",
                  "target.allow_pickle", "sources.*.trust_remote_code", "sources.*.allow_pickle", "target.revision",
                  "sources.*.revision", "runtime.extraction_nproc",
                  "fusion.extraction_batch_size", "runtime.device", "runtime.attn_implementation", "fusion.preset",
                  "training.checkpoint_steps"}
# Settings that matter only together with others (set on both sides of the comparison).
COMPANIONS = {"fusion.avgce_weights": ["fusion.fusion=avgce"], "fusion.avgce_cut": ["fusion.fusion=avgce"],
              "baselines.ensemble.weights": ["baselines.ensemble.combiner=weighted",
                                             "baselines.ensemble.weights=[0.2, 0.3, 0.5]"],
              "baselines.domain_pool.enabled": ["baselines.merges=[]"]}
# A source named like the target must keep the target's spec (config check): both change together.
PAIRED = {"target.dtype": "sources.0.dtype", "target.ref": "sources.0.ref"}  # (quickstart: sources.0 = target)
# Fields that cannot change alone: the source named like the target, a one-choice kind, and the corpus kind
# (other kinds need files: test_corpus_file_content_is_in_the_corpus_key).
FIXED = {"sources.0.dtype", "world.kind", "corpus.kind",
         # file-corpus settings: a micro corpus refuses them (a config error, not an ignored knob)
         "corpus.encoding", "corpus.min_chars", "corpus.paths", "corpus.text_field"}


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _field_type(path: str):
    """The annotation of a config field by dotted path (list indices step into the item type)."""
    import typing

    tp = ExperimentConfig
    for part in path.split("."):
        if part.isdigit():
            tp = typing.get_args(tp)[0]
            continue
        while typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if not hasattr(tp, "model_fields"):
            return None  # inside a free-form dict (merge params)
        tp = tp.model_fields[part].annotation
    return tp


def _alternatives(path: str, value, scratch: Path):
    import typing

    tp = _field_type(path)
    for arg in [tp, *typing.get_args(tp)]:
        if typing.get_origin(arg) is typing.Literal:
            yield from typing.get_args(arg)
    special = {"lr_scheduler": ["linear"], "deepspeed": ["zero2"], "combiner": ["max_prob", "mince"],
               "weights": [[0.5, 0.3, 0.2]], "suites": [["micro", "bbh"]], "members": [["llama-docs", "neox-code"]],
               "name": ["other-name"], "dtype": ["float16"], "data_dir": [str(scratch)], "paths": [["/tmp/x.txt"]],
               "ref": ["micro:other-model"], "encoding": ["latin-1"], "method": ["slerp", "task_arithmetic"],
               "device": ["cpu"], "include_path": [[str(scratch)]]}
    yield from special.get(path.split(".")[-1], [])
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value * 2 + 2, value - 1)
    elif isinstance(value, float):
        yield from (value * 0.5, min(value * 1.5, 0.99), value + 0.1)
    elif value is None:
        yield from (3, 0.5, ["micro"], "x")
    elif isinstance(value, str):  # registered names (alignments, vocabulary maps, fusions, dtypes)
        yield from ("dtw", "em", "avgce", "float32", "bfloat16", "other")


def test_every_config_field_is_in_some_stage_key_or_declared_irrelevant(tmp_path):
    """Guard for new settings: each field changes at least one stage key (or the set of stages), unless it
    is listed in NOT_IN_ANY_KEY with the reason above."""
    import re

    from harness.config import ConfigError, apply_overrides

    scratch = tmp_path / "data"
    (scratch / "bbh").mkdir(parents=True)
    (scratch / "bbh" / "x.json").write_text("{}")
    base_data = load_config(QUICKSTART, [f"workdir={tmp_path}"]).model_dump(mode="json")
    base = build_plan(validate_config(base_data))
    unkeyed, untested = [], []
    for path, value in _leaves(base_data):
        generic = re.sub(r"\.\d+\.", ".*.", path)
        if path in NOT_IN_ANY_KEY or generic in NOT_IN_ANY_KEY:
            continue
        start = apply_overrides(base_data, COMPANIONS.get(path, []))
        before = build_plan(validate_config(start))
        tried = keyed = 0
        for alt in _alternatives(path, value, scratch):
            if alt == value or tried >= 4:
                continue
            change = [f"{p}={json.dumps(alt)}" for p in (path, PAIRED.get(path)) if p]
            try:
                cfg = validate_config(apply_overrides(start, change))
            except (ConfigError, ValueError):
                continue
            tried += 1
            if changed(before, build_plan(cfg)):
                keyed += 1
                break
        if not tried:
            untested.append(path)
        elif not keyed:
            unkeyed.append(path)
    assert (unkeyed, sorted(untested)) == ([], sorted(FIXED))
    assert set(changed(base, micro_plan(tmp_path, "name=other"))) == set()


# --------------------------------------------------------------------------------------- hub ids
HUB_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from harness import models
    from harness.config import ModelSpec

    def ask(revision=None):
        models._hub_commit.cache_clear()  # a new process in real use; here: one process for three questions
        spec = ModelSpec(name="hubby", ref="org/tiny", revision=revision)
        return {"ident": models.identity(spec)["weights"], "path": models.resolve(spec),
                "problems": models.check_model(spec),
                "missing": models.check_model(ModelSpec(name="absent", ref="org/absent"))}

    cache, second_model, c1, c2 = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    out = {"first": ask()}
    # main moves to a new commit with other weights
    repo = cache / "models--org--tiny"
    shutil.copytree(second_model, repo / "snapshots" / c2)
    (repo / "refs" / "main").write_text(c2)
    out["moved"] = ask()
    out["pinned"] = ask(c1)
    print(json.dumps(out))
""")


def test_hub_ids_resolve_to_the_local_snapshot_at_the_pinned_commit(local_models, tmp_path):
    """Issue item 6: a hub id is keyed by the commit its revision resolves to and evaluated from that
    snapshot (a real Hugging Face cache layout, read by huggingface_hub offline)."""
    m = local_models
    cache = tmp_path / "hub"
    c1, c2 = "1" * 40, "2" * 40
    repo = cache / "models--org--tiny"
    snap1, snap2 = repo / "snapshots" / c1, repo / "snapshots" / c2
    shutil.copytree(m["llama"], snap1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(c1)
    script = tmp_path / "hub.py"
    script.write_text(HUB_SCRIPT)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(cache), str(m["gpt2"]), c1, c2], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, moved, pinned = out["first"], out["moved"], out["pinned"]
    assert first["ident"] == f"org/tiny@{c1}" and Path(first["path"]) == snap1 and first["problems"] == []
    assert len(first["missing"]) == 1 and first["missing"][0].startswith("model absent: hub id org/absent")
    assert "not in the local Hugging Face cache" in first["missing"][0]
    # identity and folder follow the branch; a pinned revision stays where it was
    assert moved["ident"] == f"org/tiny@{c2}" and Path(moved["path"]) == snap2 and moved["problems"] == []
    assert pinned["ident"] == f"org/tiny@{c1}" and Path(pinned["path"]) == snap1
