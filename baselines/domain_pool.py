"""A pool of structurally identical domain experts (the paper's Table 7 setting).

Each expert is a copy of the same base (target) model continually trained with the CLM loss on one
domain's texts, so that FuseLLM, the output ensemble and weight merging can all be run on the same
domain models and compared: identical architecture and tokenizer make the pool mergeable.
"""
from __future__ import annotations

import re
from pathlib import Path

from fusion.publish import publish_dir
from fusion.trainer import TrainSettings

from .clm import clm_dataset, train_clm


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def train_domain_experts(base_model_path: Path, texts_by_domain: dict[str, list[str]], out_dir: Path,
                         settings: TrainSettings, tokenizer, verbose: bool = True) -> dict[str, Path]:
    """Train one expert per domain from the same base model; returns {domain: expert folder}.

    base_model_path: local HF folder of the base (target) model, reloaded fresh for every domain.
    texts_by_domain: domain name -> training texts (tokenized with `tokenizer`, no BOS, EOS appended).
    out_dir: experts go to out_dir/<domain> as safetensors HF folders with the tokenizer. Each is
    trained in a temporary sibling folder and renamed when complete; an existing complete expert is
    reused (a killed run resumes with the next domain). Every expert uses settings.seed.
    verbose=False drops the per-step progress lines (each prefixed with `expert:<domain>`).
    """
    from transformers import AutoModelForCausalLM

    base_model_path, out_dir = Path(base_model_path), Path(out_dir)
    if not (base_model_path / "config.json").is_file():
        raise ValueError(f"base model {base_model_path} is not a HF model folder (no config.json)")
    if not texts_by_domain:
        raise ValueError("train_domain_experts: texts_by_domain is empty; give at least one domain")
    for domain, texts in texts_by_domain.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", domain):
            raise ValueError(f"domain name {domain!r} is used as a folder name: use letters, digits, '_', '-', '.'")
        if not texts:
            raise ValueError(f"domain {domain!r} has no training texts")
    out_dir.mkdir(parents=True, exist_ok=True)
    experts: dict[str, Path] = {}
    for domain, texts in texts_by_domain.items():
        final = out_dir / domain
        if _complete(final):
            experts[domain] = final
            continue
        if final.exists():
            raise FileExistsError(f"expert folder {final} exists but holds no complete model; remove it to retrain")
        # the base's own dtype, so that the experts stay structurally identical to it
        model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype="auto")
        with publish_dir(final, fsync=False) as tmp:
            train_clm(model, tokenizer, clm_dataset(tokenizer, texts), tmp, settings, verbose=verbose,
                      label=f"expert:{domain}")
        del model  # one expert in memory at a time
        experts[domain] = final
    return experts
