"""GGUF -> HF folder conversion round trip on a tiny Llama GGUF the test writes itself.

The file is written the way llama.cpp's converter writes a Llama: its tensor names, metadata keys,
q/k rows permuted into llama.cpp's rotary layout, and a byte-level BPE vocabulary with merges. The
converted folder must reproduce the original model's logits to 1e-5 and tokenize identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny

gguf = pytest.importorskip("gguf")

from harness import packaged  # noqa: E402
from harness.config import ModelSpec  # noqa: E402
from harness.models import ModelLoadError, load_model  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n", "hello fusion"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers' loader undoes exactly this
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write a float32 GGUF of a transformers Llama with a byte-level BPE tokenizer (llama.cpp layout)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base = hf_name.removesuffix(".weight")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        w = tensor.detach().to(torch.float32).numpy().copy()
        if base.endswith("self_attn.q_proj"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name + ".weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, bpe_tokenizer):
    model = tiny.tiny_model("llama", bpe_tokenizer, seed=7)
    path = write_llama_gguf(model, bpe_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf")
    return model, bpe_tokenizer, path


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_gguf_round_trip_logits_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, tok, path = tiny_gguf
    folder = packaged.gguf_to_hf_folder(path, cache_dir=tmp_path)
    assert folder == tmp_path / "hf-from-gguf" / packaged.file_sha256(path)[:16]
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    info = json.loads((folder / packaged.PROVENANCE).read_text())
    assert info["sha256"] == packaged.file_sha256(path) and info["model_type"] == "llama"

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok2 = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert len(tok2) == len(tok)
    for text in TEXTS:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"], text
        diff = (_logits(model, tok2, text) - _logits(original, tok, text)).abs().max().item()
        assert diff < 1e-5, (text, diff)


def test_gguf_conversion_is_cached_and_atomic(tiny_gguf, tmp_path, monkeypatch):
    _, _, path = tiny_gguf
    first = packaged.gguf_to_hf_folder(path, cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("a cached conversion must not convert again")

    monkeypatch.setattr(packaged, "convert_gguf", fail)
    assert packaged.gguf_to_hf_folder(path, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # a folder whose provenance is missing (a conversion killed before the rename) is redone, not used
    (first / packaged.PROVENANCE).unlink()

    def killed(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        packaged.gguf_to_hf_folder(path, cache_dir=tmp_path)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(f".{first.name}.tmp-")]
    monkeypatch.undo()
    again = packaged.gguf_to_hf_folder(path, cache_dir=tmp_path)
    assert (again / packaged.PROVENANCE).is_file()


def test_gguf_ref_through_load_model(tiny_gguf, tmp_path):
    original, tok, path = tiny_gguf
    loaded = load_model(ModelSpec(ref=str(path)), cache_dir=tmp_path)
    assert loaded.model_type == "llama"
    text = TEXTS[0]
    diff = (_logits(loaded.model, loaded.tokenizer, text) - _logits(original, tok, text)).abs().max().item()
    assert diff < 1e-5


def test_unloadable_gguf_names_file_and_fix(tmp_path):
    bad = tmp_path / "broken.gguf"
    writer = gguf.GGUFWriter(str(bad), "gptneox")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"broken\.gguf.*HF folder"):
        packaged.gguf_to_hf_folder(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "hf-from-gguf" / packaged.file_sha256(bad)[:16]).exists()
