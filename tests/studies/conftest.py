"""Study fixtures: spec files written into a temp dir, based on the shipped micro quickstart."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"
sys.path.insert(0, str(Path(__file__).parent))  # study_objectives.py, importable in worker subprocesses too

# The pipeline at the smallest budget that still trains and evaluates FuseLLM (tens of seconds a trial).
TINY_PIPELINE = [
    "corpus.max_docs_per_domain=10",
    "training.max_steps=4",
    "training.per_device_batch_size=4",
    "baselines.clm=false",
    "baselines.ensemble.enabled=false",
    "baselines.domain_pool.enabled=false",
    "baselines.merges=[]",
    "evaluation.settings.limit=6",
    "evaluation.settings.max_gen_toks=8",
    "evaluation.perplexity.max_docs_per_domain=3",
]


@pytest.fixture()
def write_spec(tmp_path):
    """write_spec(name, **fields) -> path of a spec YAML whose base is the quickstart (absolute path)."""

    def write(name: str = "s", **fields) -> Path:
        data = {"study_name": name, "base": str(QUICKSTART),
                "search_space": {"fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]}},
                "objective": {"metric": "fusellm/micro", "direction": "maximize"}}
        data.update(fields)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
