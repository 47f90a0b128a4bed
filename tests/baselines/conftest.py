"""Fixtures for the baseline tests: structurally identical tiny Llamas (different seeds) and pools
that weight merging must refuse."""
from __future__ import annotations

import pytest
import tiny


@pytest.fixture(scope="session")
def llama_pool(tmp_path_factory, sp_tokenizer):
    """Four tiny Llama folders sharing one tokenizer: a (seed 0), b (seed 1), c (seed 2), a_copy (seed 0)."""
    root = tmp_path_factory.mktemp("llama-pool")
    seeds = {"a": 0, "b": 1, "c": 2, "a_copy": 0}
    return {name: tiny.save_pair(tiny.tiny_model("llama", sp_tokenizer, seed=s), sp_tokenizer, root / name)
            for name, s in seeds.items()}


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory, sp_tokenizer):
    """Same architecture and tokenizer as the pool, hidden size 64 instead of 32."""
    model = tiny.tiny_model("llama", sp_tokenizer, seed=3, hidden=64)
    return tiny.save_pair(model, sp_tokenizer, tmp_path_factory.mktemp("wide-llama"))


@pytest.fixture(scope="session")
def other_vocab_llama_dir(tmp_path_factory, sp_tokenizer):
    """Same shapes as the pool (same vocabulary size) but two token ids swapped: equal sizes are not
    equal vocabularies."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(sp_tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    first, second = "▁the", "▁quick"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(tok) == len(sp_tokenizer)
    assert tok.convert_tokens_to_ids(first) != sp_tokenizer.convert_tokens_to_ids(first)
    model = tiny.tiny_model("llama", tok, seed=4)
    return tiny.save_pair(model, tok, tmp_path_factory.mktemp("other-vocab-llama"))
