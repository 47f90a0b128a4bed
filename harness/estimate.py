"""Offline cost estimates per pipeline stage: tokens, cache bytes, FLOPs, device-hours, for named hardware.

Works with no network, no weights and no data: parameter counts come from a table of known hub ids, the
packaged-model registry, the micro world's declared architectures, or a local folder's config.json (a model
built on the meta device, so any architecture transformers knows is counted exactly). Corpus tokens come from
`corpus.expected_tokens`, the micro world's declared size, a table of known corpora, the size of local corpus
files at BYTES_PER_TOKEN, or the caller; each row's note says which.

Hardware: the machine it runs on (`detect_hardware`: CUDA GPUs by name, else the CPU with a measured matmul
peak) or a named profile (`hardware_profile("a100x8")`); the table always says which.

Formulas (Kaplan et al. 2020 approximations, N = all parameters, T = tokens):
  forward (distribution extraction):  2 * N * T FLOPs
  training (forward + backward):      6 * N * T FLOPs per epoch
  distribution cache:                 60 bytes / token / model at k = 10 (int32 id + fp16 logprob per slot,
                                      plus row overhead); scaled as 6 * k bytes for other k
  fused dataset:                      4 + 8 * k bytes / token (int32 input id, int32 id + fp32 prob per slot)
  device-hours = FLOPs / (utilisation * peak FLOP/s) / 3600, summed over devices; wall = device-hours / devices
  (data parallel: training's global batch is per_device_batch_size x grad_accum x devices).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import ExperimentConfig, ModelSpec

BYTES_PER_TOKEN = 4.0  # English/code text under a 32k-50k BPE vocabulary (Llama-2 on MiniPile: ~3.9)
# The micro target's tokenizer (llama-docs, vocabulary 1,024) on the v3 world's train split: 1,087,524
# characters in 509,818 tokens (the quickstart's train/fusellm stage).
MICRO_BYTES_PER_TOKEN = 2.13
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

# Corpora by hub id or file stem: documents and training tokens (Llama-2 tokenizer).
KNOWN_CORPORA: dict[str, dict] = {
    # MiniPile (Kaddour 2023): 1M documents of the Pile; the FuseLLM paper trains on ~1.8B tokens of it
    "JeanKaddour/minipile": {"documents": 1_000_000, "tokens": 1_800_000_000},
    "minipile": {"documents": 1_000_000, "tokens": 1_800_000_000},
}

# Dense bf16 tensor-core peaks per GPU (fp16 for V100/T4), FLOP/s, from the vendors' data sheets. Matched in
# this order against the CUDA device name (lower case), so "h100 pcie" wins over "h100".
GPU_PEAKS: dict[str, tuple[str, float]] = {
    "b200": ("NVIDIA B200", 2250e12),
    "h200": ("NVIDIA H200", 989e12),
    "h100 pcie": ("NVIDIA H100 PCIe", 756e12),
    "h100": ("NVIDIA H100 SXM", 989e12),
    "a100": ("NVIDIA A100", 312e12),
    "l40s": ("NVIDIA L40S", 362e12),
    "l4": ("NVIDIA L4", 121e12),
    "a10": ("NVIDIA A10/A10G", 125e12),
    "rtx 4090": ("NVIDIA RTX 4090", 165e12),
    "v100": ("NVIDIA V100 (fp16)", 125e12),
    "t4": ("NVIDIA T4 (fp16)", 65e12),
    "mi300x": ("AMD MI300X", 1307e12),
}
# Achieved fraction of the peak: ~40% for 7B training with ZeRO-2 on GPUs (the MFU commonly reported); on
# CPUs, of the measured fp32 matmul peak: 0.31 for distribution extraction, 0.18 for the micro FuseLLM
# training (9.8 GFLOP/s on 2 AMD EPYC cores, benchmarks/results.json and the quickstart's train stage).
GPU_UTILISATION = 0.40
CPU_UTILISATION = 0.20


@dataclass(frozen=True)
class Hardware:
    """What the estimate assumes. peak_flops: FLOP/s of one device (bf16 dense for GPUs, fp32 for a CPU, which
    counts as one device running on all its torch threads); utilisation: the fraction achieved (MFU);
    source: how it was chosen ("detected", "profile a100x8", ...)."""

    name: str
    peak_flops: float
    utilisation: float
    devices: int = 1
    source: str = "given"

    def describe(self) -> str:
        tera = self.peak_flops >= 1e12
        peak = f"{self.peak_flops / 1e12:,.4g} TFLOP/s" if tera else f"{self.peak_flops / 1e9:,.3g} GFLOP/s"
        return f"{self.devices} x {self.name}, peak {peak} each, {self.utilisation:.0%} of it achieved ({self.source})"


def measure_matmul_flops(device: str = "cpu", seconds: float = 0.3) -> float:
    """Peak FLOP/s of square matmuls on `device` (fp32 1024^2 on a CPU, bf16 8192^2 on CUDA): the fastest of the
    products timed over about `seconds` after one warm-up (the best one is the least disturbed by other work)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ a
    sync()
    best, began = math.inf, time.perf_counter()
    while time.perf_counter() - began < seconds:
        t0 = time.perf_counter()
        a @ a
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def hardware_profile(profile: str) -> Hardware:
    """A named profile: `<gpu>[x<count>]` (a100x8, h100, l4x2, rtx4090x2...; GPU_PEAKS, spaces and hyphens
    ignored) or `cpu` (this machine's CPU, peak measured). ValueError naming the profiles for anything else."""
    keys = {k.replace(" ", ""): k for k in GPU_PEAKS}
    wanted = profile.strip().lower().replace(" ", "").replace("-", "")
    name, count = wanted, 1
    if wanted not in keys and re.fullmatch(r".+x\d+", wanted):
        name, _, digits = wanted.rpartition("x")
        count = int(digits)
    if name == "cpu" and count == 1:
        return _cpu(source="profile cpu")
    if name in keys and count >= 1:
        display, peak = GPU_PEAKS[keys[name]]
        return Hardware(display, peak, GPU_UTILISATION, count, source=f"profile {profile}")
    raise ValueError(f"unknown hardware profile {profile!r}: use cpu, or a GPU name with an optional count "
                     f"(a100x8, h100x4, l4): {', '.join(keys)}")


def _cpu(source: str) -> Hardware:
    import os

    import torch

    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peak = measure_matmul_flops("cpu")
    return Hardware(f"CPU with {threads} torch thread(s) of {cores} cores", peak, CPU_UTILISATION, 1,
                    source=f"{source}; peak = fp32 matmul measured now")


def gpu_hardware(device_name: str, count: int, source: str = "detected") -> Hardware | None:
    """`count` GPUs called `device_name` (as torch.cuda.get_device_name says, e.g. "NVIDIA A100-SXM4-80GB"), the
    peak from GPU_PEAKS by the first key the name contains; None when no key matches."""
    key = next((k for k in GPU_PEAKS if k in device_name.lower()), None)
    return Hardware(device_name, GPU_PEAKS[key][1], GPU_UTILISATION, count, source) if key else None


def detect_hardware() -> Hardware:
    """The machine this runs on: its CUDA GPUs (all visible ones, the peak from GPU_PEAKS by name, else
    measured), or the CPU when no GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        return _cpu(source="detected: no CUDA GPU visible")
    count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    return gpu_hardware(name, count) or Hardware(name, measure_matmul_flops("cuda:0"), GPU_UTILISATION, count,
                                                 source="detected; peak = bf16 matmul measured now (not in GPU_PEAKS)")


def resolve_hardware(profile: str | None = None) -> Hardware:
    """`fuselab plan --hardware`: None or "auto" -> detect_hardware(), else hardware_profile(profile)."""
    return detect_hardware() if profile in (None, "auto") else hardware_profile(profile)


# ------------------------------------------------------------------------------------------------ models
class _DeclaredVocab:
    """Stands for a micro tokenizer of the declared size (only its length shapes a model config)."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _count_params(config, trust_remote_code: bool = False) -> int:
    """Exact parameter count of the architecture `config`, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())  # tied weights are one tensor, yielded once


def micro_params(name: str) -> int | None:
    """Parameters of the micro world's source `name` from its declared architecture (harness.micro.sources),
    so without the world being built; None for an unknown name."""
    from harness.micro.sources import SOURCE_SPECS, TrainSizes, model_config

    spec = next((s for s in SOURCE_SPECS if s.name == name), None)
    if spec is None:
        return None
    return _count_params(model_config(spec, _DeclaredVocab(spec.vocab_size), TrainSizes().seq_len))


def model_params(spec: ModelSpec) -> int | None:
    """Parameter count of a model reference without loading weights; None when nothing offline says."""
    ref = spec.model_ref
    if ref.text in KNOWN_PARAMS:
        return KNOWN_PARAMS[ref.text]
    if ref.kind == "micro":
        return micro_params(ref.name)
    if ref.kind == "packaged":
        from harness.packaged import PACKAGED

        entry = PACKAGED.get(ref.name)
        return entry.params if entry else None
    folder = ref.path if ref.kind == "local" else None
    if folder is not None and (folder / "config.json").is_file():
        return params_from_config(folder / "config.json", trust_remote_code=spec.trust_remote_code)
    return None


def params_from_config(config_json: str | Path, trust_remote_code: bool = False) -> int:
    """Exact parameter count of the architecture in `config_json`, built on the meta device (no memory)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(Path(config_json).parent), trust_remote_code=trust_remote_code)
    return _count_params(cfg, trust_remote_code)


# ------------------------------------------------------------------------------------------------ corpus
def _micro_tokens(corpus) -> tuple[int, str]:
    from harness.micro.corpus import DOMAINS, CorpusSizes

    sizes = CorpusSizes()
    chars = sizes.train_chars * len(DOMAINS)
    if corpus.max_docs_per_domain:  # documents are doc_min..doc_max characters long
        chars = min(chars, corpus.max_docs_per_domain * len(DOMAINS) * (sizes.doc_min_chars + sizes.doc_max_chars) / 2)
    return int(chars / MICRO_BYTES_PER_TOKEN), (f"micro world's declared size: {int(chars):,} characters of train "
                                                f"text / {MICRO_BYTES_PER_TOKEN} per token (data not read)")


def _file_bytes(corpus, base: Path) -> tuple[float, list[str], str | None]:
    """(estimated text bytes of the corpus files present, files absent, a known corpus named by an absent file)."""
    from harness.corpus import DOC_CHARS, CorpusError, local_data_files, path_entries

    total, missing, known = 0.0, [], None
    if corpus.kind == "datasets":
        present = sorted({p.resolve() for p in local_data_files(corpus)})
        entries = [(str(p), [p]) for p in present]
    else:
        try:
            entries = path_entries(corpus.paths)
        except CorpusError:  # a pattern matching nothing here: counted as missing
            entries = []
            missing = list(corpus.paths)
    for domain, files in entries:
        domain_size = 0.0
        for named in files:
            path = named.expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                missing.append(str(named))
                known = known or next((n for n in KNOWN_CORPORA if "/" not in n and n in path.name.lower()), None)
                continue
            # gzip text compresses ~3x; jsonl adds ~10% of keys and quoting
            domain_size += (path.stat().st_size * (3.0 if path.suffix in (".gz", ".zip") else 1.0)
                            * (0.9 if ".json" in path.name else 1.0))
        if corpus.kind == "text_files" and corpus.max_docs_per_domain:
            domain_size = min(domain_size, corpus.max_docs_per_domain * DOC_CHARS)  # documents are ~DOC_CHARS long
        total += domain_size
    return total, missing, known


def _read_tokens(corpus, base: Path) -> tuple[int | None, str]:
    """Tokens of every document the corpus reads (before the train / validation split), and how."""
    if corpus.expected_tokens:
        return corpus.expected_tokens, "declared corpus.expected_tokens (data not read)"
    path = corpus.dataset.path if corpus.kind == "datasets" else None
    if path in KNOWN_CORPORA:
        return KNOWN_CORPORA[path]["tokens"], f"known size of hub dataset {path} (data not read)"
    total, missing, known = _file_bytes(corpus, base)
    if total:
        return int(total / BYTES_PER_TOKEN), f"{int(total):,} bytes of text / {BYTES_PER_TOKEN} bytes per token"
    if known is not None:
        return KNOWN_CORPORA[known]["tokens"], f"known corpus {known} (file {missing[0]} not present here)"
    what = f"dataset {path}" if path else f"corpus files {missing}"
    return None, f"{what}: size unknown offline; declare corpus.expected_tokens"


def corpus_tokens(cfg: ExperimentConfig, base: Path = Path(".")) -> tuple[int | None, str]:
    """(training tokens of one epoch, how they were obtained): the train split after corpus.max_docs /
    max_tokens, from declared or known sizes when the data is not here (never reads a document)."""
    corpus = cfg.corpus
    if corpus.kind == "micro":
        return _micro_tokens(corpus)
    tokens, how = _read_tokens(corpus, base)
    if tokens is None:
        return None, how
    documents = KNOWN_CORPORA.get(corpus.dataset.path if corpus.dataset else "", {}).get("documents")
    if corpus.max_docs and documents and corpus.max_docs < documents:
        tokens = tokens * corpus.max_docs // documents
        how = f"{how}, first {corpus.max_docs:,} of {documents:,} documents"
    if corpus.max_tokens and corpus.max_tokens < tokens:
        tokens, how = corpus.max_tokens, f"corpus.max_tokens {corpus.max_tokens:,}"
    share = 1 - corpus.validation_fraction - (corpus.test_fraction or 0.0)
    return int(tokens * share), f"{how}; train split {share:.3g}"


# ------------------------------------------------------------------------------------------------ stages
def _n_domains(cfg: ExperimentConfig) -> int | None:
    """Domain experts of the pool (one per corpus domain) where that is known without the data."""
    domains = cfg.expert_domains()
    if domains is not None:
        return len(domains)
    if cfg.corpus.kind == "datasets" and cfg.corpus.domain_field is None:
        return 1
    return None


class _Table(dict):
    """stage -> row; `add` computes the device-hours and wall hours of a row from its FLOPs."""

    def __init__(self, hw: Hardware):
        super().__init__()
        self.hw = hw

    def add(self, name: str, *, params=None, tokens=None, flops=None, cache_bytes=None, note=""):
        hours = flops / (self.hw.utilisation * self.hw.peak_flops) / 3600.0 if flops is not None else None
        self[name] = {"tokens": tokens, "params": params, "flops": flops, "device_hours": hours,
                      "wall_hours": hours / self.hw.devices if hours is not None else None,
                      "cache_bytes": cache_bytes, "note": note}


def _world_row(table: _Table) -> None:
    """The micro world's build: training its sources (harness.micro TrainSizes), 6NT each."""
    from harness.micro.sources import SOURCE_SPECS, TrainSizes

    sizes = TrainSizes()
    tokens = {s.name: sizes.steps_of(s.name) * sizes.batch * sizes.seq_len for s in SOURCE_SPECS}
    flops = sum(6.0 * micro_params(name) * n for name, n in tokens.items())
    table.add("world", tokens=sum(tokens.values()), flops=flops,
              note=f"training the {len(tokens)} micro sources (6NT); corpus, tokenizers and tasks not included; "
                   f"built once and cached")


def _training_rows(table: _Table, cfg: ExperimentConfig, tokens: int | None, target_params: int | None) -> None:
    t, hw = cfg.training, table.hw
    batch_tokens = t.per_device_batch_size * t.grad_accum * hw.devices * t.block_size
    if t.max_steps and t.max_steps > 0:
        train_tokens = t.max_steps * batch_tokens
    else:
        train_tokens = int(tokens * t.num_epochs) if tokens is not None else None
    steps = math.ceil(train_tokens / batch_tokens) if train_tokens else None
    note = (f"6NT, {t.num_epochs:g} epoch(s), global batch {batch_tokens // t.block_size} x {t.block_size} tokens "
            f"({t.per_device_batch_size}/device x {t.grad_accum} accum x {hw.devices} devices), {steps} steps")
    flops = 6.0 * target_params * train_tokens if target_params and train_tokens else None
    ckpt = target_params * (2 if t.bf16 else 4) if target_params else None  # saved weights, no optimizer state
    table.add("train/fusellm", params=target_params, tokens=train_tokens, flops=flops, cache_bytes=ckpt, note=note)
    if cfg.baselines.clm:
        table.add("train/clm", params=target_params, tokens=train_tokens, flops=flops, cache_bytes=ckpt,
                  note="same schedule, lambda = 1")
    pool = cfg.baselines.domain_pool
    if pool.enabled:
        experts = _n_domains(cfg)
        pool_tokens = pool.max_steps * batch_tokens * experts if experts else None
        table.add("domain_pool", params=target_params, tokens=pool_tokens,
                  flops=6.0 * target_params * pool_tokens if target_params and pool_tokens else None,
                  cache_bytes=ckpt * experts if ckpt and experts else None,
                  note=f"{experts or 'one per domain (unknown before the data is read):'} experts x "
                       f"{pool.max_steps} steps x {batch_tokens:,} tokens")


def estimate(cfg: ExperimentConfig, *, hardware: Hardware | None = None, tokens: int | None = None,
             base: Path = Path(".")) -> dict[str, dict]:
    """Per-stage estimates, keyed like the plan's stages (`distributions/<label>`, `fused`, `train/fusellm`, ...),
    for `hardware` (default: this machine, `detect_hardware()`). Reads no corpus document and no weights.

    Each value: tokens (int), params (int), flops (float), device_hours (float, summed over devices),
    wall_hours (device_hours / devices), cache_bytes (float, on disk), note (str: how, and from what).
    Unknown quantities are None. `tokens` overrides the corpus's training tokens. A final `total` row sums the
    numeric columns and names the hardware.
    """
    hw = hardware or detect_hardware()
    tokens_note = "given"
    if tokens is None:
        tokens, tokens_note = corpus_tokens(cfg, base)
    k = cfg.fusion.top_k
    table = _Table(hw)
    if cfg.world is not None:
        _world_row(table)
    target_params = model_params(cfg.target)
    for spec in [cfg.target, *[s for s in cfg.sources if s.label != cfg.target.label]]:
        n = model_params(spec)
        table.add(f"distributions/{spec.label}", params=n, tokens=tokens,
                  flops=2.0 * n * tokens if n and tokens else None,
                  cache_bytes=DIST_BYTES_PER_TOKEN_K10 * k / 10 * tokens if tokens else None,
                  note=f"forward 2NT; tokens: {tokens_note}" if n else f"parameters of {spec.ref} unknown offline")
    for spec in cfg.sources:
        if spec.label != cfg.target.label:
            table.add(f"aligned/{spec.label}", tokens=tokens, cache_bytes=(8 * k + 8) * tokens if tokens else None,
                      note="CPU: alignment + vocabulary mapping, no accelerator FLOPs")
    table.add("fused", tokens=tokens, cache_bytes=(4 + 8 * k) * tokens if tokens else None, note="CPU")
    table.add("diagnostics", tokens=tokens, note="CPU: per source and domain, one pass over the aligned sets")
    _training_rows(table, cfg, tokens, target_params)
    numeric = ("flops", "device_hours", "wall_hours", "cache_bytes")
    known = {key: [r[key] for r in table.values() if r[key] is not None] for key in numeric}
    total = {key: sum(values) if values else None for key, values in known.items()}
    table["total"] = {**total, "tokens": None, "params": None,
                      "note": f"on {hw.describe()}; merges and evaluation not included"}
    return dict(table)


def _duration(hours: float | None) -> str:
    if hours is None:
        return "-"
    seconds = hours * 3600
    for unit, size in (("years", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.2g} s"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def format_estimate(est: dict[str, dict]) -> str:
    """A fixed-width table of `estimate(...)` for `fuselab plan`: FLOPs in scientific notation, durations and
    sizes in the unit that fits ("-": not known offline, or no accelerator work), then the notes."""
    lines = [f"{'stage':<34} {'tokens':>14} {'params':>14} {'FLOPs':>9} {'device time':>12} {'wall':>10} {'cache':>9}"]
    for name, r in est.items():
        tokens = f"{r['tokens']:,d}" if r.get("tokens") is not None else "-"
        params = f"{r['params']:,d}" if r.get("params") is not None else "-"
        flops = f"{r['flops']:.2e}" if r.get("flops") else "-"
        lines.append(f"{name:<34} {tokens:>14} {params:>14} {flops:>9} {_duration(r.get('device_hours')):>12} "
                     f"{_duration(r.get('wall_hours')):>10} {_size(r.get('cache_bytes')):>9}")
    notes = [f"  {name}: {r['note']}" for name, r in est.items() if r.get("note")]
    return "\n".join(lines + ["notes:"] + notes)


if __name__ == "__main__":
    import sys

    from harness.config import load_config

    cfg = load_config(sys.argv[1], sys.argv[2:], check_paths=False)
    print(format_estimate(estimate(cfg, base=Path(sys.argv[1]).parent)))
