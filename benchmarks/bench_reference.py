"""Reference fidelity: share of target positions whose aligned distribution equals an independent re-derivation
of the reference FuseLLM rules (tests/fusion/test_reference_agreement.py, written from ../shared/DESIGN.md).

For each pair (micro neox-code -> llama-docs, micro mpt-arithmetic -> llama-docs, Gemma-3-270M -> SmolLM2-135M,
Qwen2.5-Coder-0.5B -> SmolLM2-135M) and map (em, mined): FuseLab in `fusion.preset: reference` (the figure,
target 1.0) and in the default settings (`default_preset`, for information: what the documented improvements
change), on the same documents and the same seeded synthetic top-k (see the test module's docstring). The real
pairs need the packaged models (docs/REAL_MODELS.md); without them their figures are recorded as not measured.

Run: python benchmarks/bench_reference.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "fusion"))

import test_reference_agreement as agreement  # noqa: E402
from _results import record  # noqa: E402
from harness.config import FusionSpec  # noqa: E402

COMMAND = "python benchmarks/bench_reference.py"
SHARED_DATA = Path(os.environ.get("FUSELAB_SHARED_DATA", ROOT.parent / "shared" / "data"))


def micro_pairs() -> dict:
    from transformers import AutoTokenizer

    from harness.micro import build_micro_world
    from harness.pipeline import world_stage_key

    cache = Path(os.environ.get("FUSELAB_WORLD_CACHE", ROOT / ".fuselab" / "test-worlds"))
    world = build_micro_world(cache / world_stage_key(0).key, seed=0, progress=False)
    toks = {name: AutoTokenizer.from_pretrained(world.models[name]) for name in ("llama-docs", "neox-code",
                                                                                  "mpt-arithmetic")}
    return {key: agreement.Pair(key, s, t, toks[s], toks[t], agreement.micro_documents(world, s))
            for key, (s, t) in agreement.MICRO_PAIRS.items()}


def real_pairs() -> dict:
    names = sorted({n for pair in agreement.REAL_PAIRS.values() for n in pair})
    if not agreement.packaged_installed(*names):
        return {}
    toks = {name: agreement.packaged_tokenizer(name) for name in names}
    texts = agreement.real_documents(SHARED_DATA)
    return {key: agreement.Pair(key, s, t, toks[s], toks[t], texts) for key, (s, t) in agreement.REAL_PAIRS.items()}


def main() -> None:
    pairs = {**micro_pairs(), **real_pairs()}
    for key in [*agreement.MICRO_PAIRS, *agreement.REAL_PAIRS]:
        for method in ("em", "mined"):
            name = f"reference_agreement_{key}_{method}"
            if key not in pairs:
                record(name, None, "fraction", "1.0", COMMAND,
                       note="not measured: the packaged real models are not installed (docs/REAL_MODELS.md)")
                continue
            pair = pairs[key]
            counts: dict = {}
            t0 = time.perf_counter()
            share, total, bad, map_seconds = agreement.reference_agreement(pair, method, counts=counts)
            seconds = time.perf_counter() - t0
            default_share, _, _, _ = agreement.reference_agreement(pair, method, spec=FusionSpec(vocab_map=method))
            print(f"{name}: reference preset {share:.4f}, default {default_share:.4f} over {total} positions "
                  f"({seconds:.0f} s)")
            if bad:
                print(agreement._explain(bad))
            record(name, round(share, 6), "fraction", "1.0", COMMAND,
                   default_preset=round(default_share, 4), positions=total, documents=len(pair.texts),
                   pair=f"{pair.source_name} -> {pair.target_name}", rules_fired=counts,
                   vocab_map_seconds=round(map_seconds, 1),
                   inputs="seeded synthetic top-10 (true next token + document and vocabulary ids), target top-10 "
                          "for empty rows")


if __name__ == "__main__":
    main()
