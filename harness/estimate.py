"""Offline cost estimates per pipeline stage: tokens, cache bytes, FLOPs, GPU-hours.

Works with no network and no weights: parameter counts come from a table of known hub ids, the
packaged-model registry, or a local folder's config.json (a model built on the meta device, so any
architecture transformers knows is counted exactly). Corpus tokens come from a table of known corpora,
the size of local corpus files at BYTES_PER_TOKEN, or the caller.

Formulas (Kaplan et al. 2020 approximations, N = all parameters, T = tokens):
  forward (distribution extraction):  2 * N * T FLOPs
  training (forward + backward):      6 * N * T FLOPs per epoch
  distribution cache:                 60 bytes / token / model at k = 10 (int32 id + fp16 logprob per slot,
                                      plus row overhead); scaled as 6 * k bytes for other k
  fused dataset:                      4 + 8 * k bytes / token (int32 input id, int32 id + fp32 prob per slot)
  GPU-hours = FLOPs / (utilisation * peak FLOP/s) / 3600, per GPU summed over GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness.config import ExperimentConfig, ModelSpec

BYTES_PER_TOKEN = 4.0  # English/code text under a 32k-50k BPE vocabulary (Llama-2 on MiniPile: ~3.9)
DIST_BYTES_PER_TOKEN_K10 = 60.0

# Exact parameter counts (embeddings and output head included), from the models' published configs.
KNOWN_PARAMS: dict[str, int] = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "openlm-research/open_llama_7b_v2": 6_738_415_616,
    "openlm-research/open_llama_7b": 6_738_415_616,
    "mosaicml/mpt-7b": 6_649_286_656,
    "EleutherAI/pythia-1b-deduped": 1_011_781_632,
    "EleutherAI/pythia-1.4b-deduped": 1_414_647_808,
}

# Corpora by hub id or file stem: documents and tokens (Llama-2 tokenizer).
KNOWN_CORPORA: dict[str, dict] = {
    # MiniPile (Kaddour 2023): 1M documents of the Pile; the FuseLLM paper trains on ~1.8B tokens of it
    "JeanKaddour/minipile": {"documents": 1_000_000, "tokens": 1_800_000_000},
    "minipile": {"documents": 1_000_000, "tokens": 1_800_000_000},
}


@dataclass(frozen=True)
class Hardware:
    """peak_flops: dense bf16 FLOP/s of one accelerator; utilisation: the fraction achieved (MFU)."""

    name: str = "A100-80GB (bf16 dense 312 TFLOP/s)"
    peak_flops: float = 312e12
    utilisation: float = 0.40
    gpus: int = 8


A100_8X = Hardware()


def model_params(spec: ModelSpec, base: Path = Path(".")) -> int | None:
    """Parameter count of a model reference without loading weights; None when nothing offline says."""
    ref = spec.ref
    if ref in KNOWN_PARAMS:
        return KNOWN_PARAMS[ref]
    if ref.startswith("packaged:"):
        from harness.packaged import PACKAGED

        entry = PACKAGED.get(ref.split(":", 1)[1])
        return entry.params if entry else None
    folder = Path(ref).expanduser()
    if not folder.is_absolute():
        folder = base / folder
    if (folder / "config.json").is_file():
        return params_from_config(folder / "config.json", trust_remote_code=spec.trust_remote_code)
    return None


def params_from_config(config_json: str | Path, trust_remote_code: bool = False) -> int:
    """Exact parameter count of the architecture in `config_json`, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(Path(config_json).parent), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    # tied weights are one tensor; parameters() already yields each once
    return sum(p.numel() for p in model.parameters())


def corpus_tokens(cfg: ExperimentConfig, base: Path = Path(".")) -> tuple[int | None, str]:
    """(training tokens of one epoch, how it was obtained) for the experiment's corpus."""
    corpus = cfg.corpus
    dataset = getattr(corpus, "dataset", None)  # a hub-dataset corpus kind, when the schema has one
    if dataset and dataset in KNOWN_CORPORA:
        return KNOWN_CORPORA[dataset]["tokens"], f"known corpus {dataset}"
    if corpus.kind == "micro":
        return None, "micro world (built at run time; see `fuselab run`)"
    total_bytes, unknown = 0, []
    for p in corpus.paths:
        path = Path(p).expanduser()
        path = path if path.is_absolute() else base / path
        known = next((name for name in KNOWN_CORPORA if "/" not in name and name in path.name.lower()), None)
        if path.is_file():
            size = path.stat().st_size
            # gzip text compresses ~3x; jsonl adds ~10% of keys and quoting
            size *= (3.0 if path.suffix == ".gz" else 1.0) * (0.9 if ".jsonl" in path.name else 1.0)
            if corpus.kind == "text_files" and corpus.max_docs_per_domain:
                from harness.corpus import DOC_CHARS

                size = min(size, corpus.max_docs_per_domain * DOC_CHARS)  # documents are ~DOC_CHARS long
            total_bytes += size
        elif known is not None:
            return KNOWN_CORPORA[known]["tokens"], f"known corpus {known} (file {p} not present here)"
        else:
            unknown.append(p)
    if unknown and not total_bytes:
        return None, f"corpus files not present: {unknown}"
    tokens = int(total_bytes / BYTES_PER_TOKEN * (1 - corpus.validation_fraction))
    return tokens, f"{int(total_bytes):,} bytes of text / {BYTES_PER_TOKEN} bytes per token, train split"


def _gpu_hours(flops: float | None, hw: Hardware) -> float | None:
    if flops is None:
        return None
    return flops / (hw.utilisation * hw.peak_flops) / 3600.0


def estimate(cfg: ExperimentConfig, *, hardware: Hardware = A100_8X, tokens: int | None = None,
             base: Path = Path(".")) -> dict[str, dict]:
    """Per-stage estimates, keyed like the pipeline's stages (`distributions/<label>`, `fused`, `train/fusellm`, ...).

    Each value: tokens (int), params (int), flops (float), gpu_hours (float, total over GPUs),
    wall_hours (gpu_hours / hardware.gpus), cache_gb (GB = 1e9 bytes on disk). Unknown quantities are None.
    `tokens` overrides the corpus token count. A final `total` row sums the numeric columns.
    """
    hw = hardware
    if tokens is None:
        tokens, tokens_note = corpus_tokens(cfg, base)
    else:
        tokens_note = "given"
    k = cfg.fusion.top_k
    epochs = cfg.training.num_epochs
    t = cfg.training
    global_batch = t.per_device_batch_size * t.grad_accum * hw.gpus
    train_tokens = None
    if t.max_steps and t.max_steps > 0:
        train_tokens = t.max_steps * global_batch * t.block_size
    elif tokens is not None:
        train_tokens = int(tokens * epochs)

    out: dict[str, dict] = {}

    def row(name: str, *, params=None, n_tokens=None, flops=None, cache_bytes=None, note=""):
        gh = _gpu_hours(flops, hw)
        out[name] = {"tokens": n_tokens, "params": params, "flops": flops, "gpu_hours": gh,
                     "wall_hours": gh / hw.gpus if gh is not None else None,
                     "cache_gb": cache_bytes / 1e9 if cache_bytes is not None else None, "note": note}

    target_params = model_params(cfg.target, base)
    models = [cfg.target, *[s for s in cfg.sources if s.label != cfg.target.label]]
    for spec in models:
        n = model_params(spec, base)
        row(f"distributions/{spec.label}", params=n, n_tokens=tokens,
            flops=2.0 * n * tokens if n and tokens else None,
            cache_bytes=DIST_BYTES_PER_TOKEN_K10 * k / 10 * tokens if tokens else None,
            note=f"forward 2NT; {tokens_note}")
    for spec in cfg.sources:
        if spec.label != cfg.target.label:
            row(f"aligned/{spec.label}", n_tokens=tokens, cache_bytes=(8 * k + 8) * tokens if tokens else None,
                note="CPU: alignment + vocabulary mapping, no accelerator FLOPs")
    row("fused", n_tokens=tokens, cache_bytes=(4 + 8 * k) * tokens if tokens else None, note="CPU")
    steps = math.ceil(train_tokens / (global_batch * t.block_size)) if train_tokens else None
    train_note = (f"6NT, {epochs:g} epoch(s), global batch {global_batch} x {t.block_size} tokens "
                  f"({t.per_device_batch_size}/device x {t.grad_accum} accum x {hw.gpus} GPUs), {steps} steps")
    train_flops = 6.0 * target_params * train_tokens if target_params and train_tokens else None
    ckpt = target_params * (2 if t.bf16 else 4) if target_params else None  # saved weights, no optimizer state
    row("train/fusellm", params=target_params, n_tokens=train_tokens, flops=train_flops,
        cache_bytes=ckpt, note=train_note)
    if cfg.baselines.clm:
        row("train/clm", params=target_params, n_tokens=train_tokens, flops=train_flops, cache_bytes=ckpt,
            note="same schedule, lambda = 1")
    numeric = ("flops", "gpu_hours", "wall_hours", "cache_gb")
    out["total"] = {key: sum(r[key] for r in out.values() if r[key] is not None) for key in numeric}
    out["total"].update(tokens=None, params=None,
                        note=f"{hw.name} x {hw.gpus} at {hw.utilisation:.0%} utilisation; evaluation not included")
    return out


def format_estimate(est: dict[str, dict]) -> str:
    """A fixed-width table of `estimate(...)` for `fuselab plan`."""
    lines = [f"{'stage':<34} {'tokens':>14} {'params':>14} {'PFLOPs':>12} {'GPU-h':>9} {'wall-h':>8} {'cache GB':>9}"]
    for name, r in est.items():
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        lines.append(f"{name:<34} {fmt(r.get('tokens'), ',d'):>14} {fmt(r.get('params'), ',d'):>14} "
                     f"{fmt(r['flops'] / 1e15 if r.get('flops') is not None else None, ',.1f'):>12} "
                     f"{fmt(r.get('gpu_hours'), ',.1f'):>9} {fmt(r.get('wall_hours'), ',.1f'):>8} "
                     f"{fmt(r.get('cache_gb'), ',.1f'):>9}")
    notes = [f"  {name}: {r['note']}" for name, r in est.items() if r.get("note")]
    return "\n".join(lines + ["notes:"] + notes)


if __name__ == "__main__":
    import sys

    from harness.config import load_config

    cfg = load_config(sys.argv[1], sys.argv[2:], check_paths=False)
    print(format_estimate(estimate(cfg, base=Path(sys.argv[1]).parent)))
