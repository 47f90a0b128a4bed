"""Experiments over tiny local model folders (tests of identity, integrity and bad input): models saved from
`tiny`, a two-domain text corpus written from the text their tokenizers were trained on, and a config with
every stage small (no CLM, ensemble or domain pool; perplexity only)."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

import tiny


def save_model(folder: Path, model_type: str, tokenizer, seed: int) -> Path:
    """A tiny random model of `model_type` (tiny.tiny_model) saved with its tokenizer into `folder`."""
    if folder.exists():
        shutil.rmtree(folder)
    return tiny.save_pair(tiny.tiny_model(model_type, tokenizer, seed=seed), tokenizer, folder)


def write_corpus(folder: Path) -> list[Path]:
    """Two domains (prose, code), each 12 paragraphs of ~600 characters: 4-5 documents per domain."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for domain, lines in (("prose", tiny.TRAIN_TEXT[0:2] + tiny.TRAIN_TEXT[5:6]), ("code", tiny.TRAIN_TEXT[2:5])):
        paras = [" ".join(f"{lines[(i + j) % len(lines)].strip()} ({domain} {i}.{j})" for j in range(8))
                 for i in range(12)]
        p = folder / f"{domain}.txt"
        p.write_text("\n\n".join(paras) + "\n")
        out.append(p)
    return out


def config_data(workdir: Path, target: Path, sources: list[tuple[str, Path]], corpus: list[Path], **extra) -> dict:
    """Raw config: target named "tgt", the sources by name; 2 training steps; perplexity on 2 documents."""
    data = {
        "name": "local", "seed": 0, "workdir": str(workdir),
        "target": {"name": "tgt", "ref": str(target)},
        "sources": [{"name": n, "ref": str(p)} for n, p in sources],
        "corpus": {"kind": "text_files", "paths": [str(p) for p in corpus], "validation_fraction": 0.25},
        "training": {"block_size": 64, "per_device_batch_size": 4, "max_steps": 2, "logging_steps": 1},
        "fusion": {"extraction_batch_size": 4},
        "baselines": {"clm": False, "ensemble": {"enabled": False}},
        "evaluation": {"suites": [], "perplexity": {"window": 64, "stride": 32, "max_docs_per_domain": 2}},
    }
    data.update(extra)
    return data


def local_config(*args, **kwargs):
    from harness.config import validate_config

    return validate_config(config_data(*args, **kwargs))


def write_config(path: Path, *args, **kwargs) -> Path:
    path.write_text(yaml.safe_dump(config_data(*args, **kwargs)))
    return path
