"""Shared fixtures: tiny tokenizers and models built locally, the shared data folder, offline mode."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Nothing in the tests may touch the network (see ../shared/FACTS.md: lm-eval otherwise retries for ~80 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# One micro world for the whole test session (and later sessions on the same checkout): the pipeline keeps
# the world stage there instead of in each test's work dir. Determinism tests build their own worlds.
os.environ.setdefault("FUSELAB_WORLD_CACHE", str(Path(__file__).resolve().parents[1] / ".fuselab" / "test-worlds"))

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUSELAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def no_ambient_tracking_uri():
    """Every test logs to the store it names: FuseLab honours MLFLOW_TRACKING_URI, and `mlflow.set_tracking_uri`
    (called by tests that read runs back) exports it, which would send the next test's runs to that store.
    Cleared before and after each test: a module-scoped fixture of the next module is set up between the two
    (monkeypatch would not undo a variable that was absent when it started)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real evaluation/text data (../shared/data). Absent only in a user's fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set FUSELAB_SHARED_DATA to run these tests)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sp_tokenizer():
    return tiny.sentencepiece_style()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return tiny.byte_level()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, sp_tokenizer):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    return tiny.save_pair(model, sp_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_tokenizer):
    model = tiny.tiny_model("gpt2", bpe_tokenizer, seed=1)
    return tiny.save_pair(model, bpe_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def micro_world():
    """The micro world at the seed the quickstart uses, built once (cached across sessions in .fuselab/)."""
    from harness.micro import build_micro_world
    from harness.pipeline import world_stage_key

    root = Path(os.environ["FUSELAB_WORLD_CACHE"]) / world_stage_key(0).key
    return build_micro_world(root, seed=0, progress=False)
