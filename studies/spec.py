"""Study specs: one YAML file -> a validated `StudySpec` (what to vary, how to search, what to optimise).

```yaml
study_name: micro_alignment_x_fusion
base: micro_quickstart.yaml          # experiment YAML, relative to this file
overrides: [training.max_steps=20]   # applied to the base before every trial
search_space:
  fusion.alignment: {type: categorical, choices: [dtw, offsets]}
  fusion.lam: {type: float, low: 0.5, high: 1.0, step: 0.25}
  sources: {type: categorical, choices: [[gpt2-arith], [gpt2-arith, llama-text]]}
sampler: grid                        # grid | tpe | random
objective: {metric: fusellm/micro, direction: maximize}
seeds: [0, 1, 2]
```
A search-space key is a config override path (`fusion.fusion`, `training.lr`, `baselines.merges.0.method`)
or `sources`, whose choices are lists of source names: a trial keeps only those sources.
Errors name the spec file and the field.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_local_paths,
    check_run_name,
    read_yaml,
    stable_hash,
    validate_config,
)

SOURCES_PARAM = "sources"
SEED_PARAM = "seed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalSpace(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


class FloatSpace(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)  # a grid needs it: the values low, low+step, ..., <= high

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step and log cannot both be set (Optuna samples a log range continuously)")
        return self

    def values(self) -> list[float]:
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(n)]


class IntSpace(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step must be 1 when log is true")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


def _check_range(low, high, log):
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0 (got {low})")


ParamSpace = Annotated[CategoricalSpace | FloatSpace | IntSpace, Field(discriminator="type")]


class ObjectiveSpec(_Strict):
    metric: str  # a key of ExperimentResult.metrics, e.g. "fusellm/micro" or "fusellm/bpb_avg"
    direction: Literal["maximize", "minimize"] = "maximize"


class StudySpec(_Strict):
    study_name: str = Field(min_length=1)
    base: str
    overrides: list[str] = Field(default_factory=list)
    search_space: dict[str, ParamSpace] = Field(min_length=1)
    sampler: Literal["grid", "tpe", "random"] = "grid"
    sampler_seed: int = 0
    objective: ObjectiveSpec
    n_trials: int | None = Field(None, ge=1)  # tpe/random: trials in the whole study (all workers)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    storage: str | None = None  # Optuna RDB URL; default sqlite:///<workdir>/optuna.db
    experiment: str | None = None  # MLflow experiment; default the study name
    pruner: Literal["none", "median"] = "none"  # tpe/random: prune a setting after its first seeds
    heartbeat_interval: int = Field(10, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int | None = Field(None, ge=1)  # a trial silent this long is dead; default 2 x interval
    max_retries: int = Field(1, ge=0)  # re-runs of a trial whose worker died (not of trials that raised)
    description: str = ""
    # test: once complete, the best setting (validation split) is run on the test split (studies.heldout)
    heldout: Literal["test", "none"] = "test"

    # Where the file was read from; set by `load_spec`, not by the YAML.
    spec_path: Path | None = Field(None, exclude=True)
    extra_overrides: tuple[str, ...] = Field((), exclude=True)

    @field_validator("study_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)  # it names <workdir>/reports/<study_name> and a lock file

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated values in {self.seeds}")
        if self.sampler == "grid":
            continuous = [k for k, v in self.search_space.items() if isinstance(v, FloatSpace) and v.step is None]
            if continuous:
                raise ValueError(f"search_space.{continuous[0]}: a grid needs discrete values: give `step` or use "
                                 "type: categorical")
            if any(isinstance(v, IntSpace) and v.log for v in self.search_space.values()):
                raise ValueError("search_space: log int ranges are not enumerable for a grid; list the values")
        elif self.n_trials is None:
            raise ValueError(f"n_trials: sampler {self.sampler!r} needs n_trials (the study's trial budget)")
        if SEED_PARAM in self.search_space:
            raise ValueError("search_space.seed: list seeds under `seeds:`, every setting runs once per seed")
        return self

    # -- paths --------------------------------------------------------------------------------------
    @property
    def source_name(self) -> str:
        return self.spec_path.name if self.spec_path else "<study spec>"

    @property
    def base_path(self) -> Path:
        base = Path(self.base).expanduser()
        if not base.is_absolute() and self.spec_path is not None:
            base = self.spec_path.parent / base
        return base.resolve()

    def base_data(self) -> dict:
        """The base experiment dict with the spec's and the caller's overrides applied."""
        if not self.base_path.is_file():
            raise ConfigError(f"{self.source_name}: base: experiment file {self.base_path} not found "
                              "(paths are relative to the spec file)")
        data = read_yaml(self.base_path)
        return apply_overrides(data, [*self.overrides, *self.extra_overrides],
                               source=f"{self.source_name} (overrides of {self.base_path.name})")

    def base_config(self) -> ExperimentConfig:
        return validate_config(self.base_data(), source=f"{self.source_name} -> {self.base_path.name}")

    def workdir(self) -> Path:
        from harness.pipeline import workdir  # honours FUSELAB_WORKDIR like the pipeline does

        return workdir(self.base_config())

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.workdir() / 'optuna.db'}"

    def experiment_name(self) -> str:
        """The MLflow experiment: `experiment`, else MLFLOW_EXPERIMENT_NAME, else the study's name."""
        from harness.tracking import resolve_experiment_name

        return resolve_experiment_name(self.experiment, self.study_name)

    def content_hash(self) -> str:
        """Identity of what a study runs: a resumed study must have the same hash."""
        return stable_hash({
            "base": self.base_data(), "search_space": {k: v.model_dump() for k, v in self.search_space.items()},
            "seeds": self.seeds, "objective": self.objective.model_dump(), "sampler": self.sampler,
        })

    # -- settings -----------------------------------------------------------------------------------
    def grid(self) -> list[dict[str, Any]]:
        """Every (setting, seed) of a grid study, as Optuna params (encoded choices, `seed` last).
        Order: settings in spec order, seeds innermost."""
        names = list(self.search_space)
        axes = [self.encoded_values(n) for n in names]
        points = []
        for combo in itertools.product(*axes):
            for seed in self.seeds:
                points.append({**dict(zip(names, combo)), SEED_PARAM: seed})
        return points

    def encoded_values(self, name: str) -> list:
        space = self.search_space[name]
        if isinstance(space, CategoricalSpace):
            return [encode_choice(c) for c in space.choices]
        return space.values()

    def decode(self, name: str, value: Any) -> Any:
        space = self.search_space[name]
        if isinstance(space, CategoricalSpace):
            for choice in space.choices:
                if encode_choice(choice) == value:
                    return choice
            raise ValueError(f"{self.source_name}: search_space.{name}: value {value!r} is not one of the choices")
        return value

    def config_for(self, params: dict[str, Any], seed: int | None = None,
                   extra: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
        """The experiment config of one trial. `params`: search-space name -> Optuna value (encoded
        choices are decoded); `seed` sets `ExperimentConfig.seed`; `extra`: overrides applied last."""
        data = self.base_data()
        overrides = []
        for name, value in params.items():
            if name == SEED_PARAM:
                seed = value if seed is None else seed
                continue
            value = self.decode(name, value)
            if name == SOURCES_PARAM:
                data = keep_sources(data, value, where=f"{self.source_name}: search_space.sources")
            else:
                overrides.append(f"{name}={json.dumps(value)}")
        if seed is not None:
            overrides.append(f"seed={int(seed)}")
        overrides += list(extra)
        where = f"{self.source_name}: search_space"
        data = apply_overrides(data, overrides, source=where)
        setting = ", ".join(f"{k}={params[k]}" for k in params if k != SEED_PARAM)
        cfg = validate_config(data, source=f"{self.source_name}: search_space (setting {setting or 'base'})")
        check_local_paths(cfg, self.source_name)
        return cfg

    def check_settings(self) -> None:
        """Build every grid point's config (or the range ends of numeric params) once, so a bad path or
        value fails when the spec loads, not in trial 7."""
        if self.sampler == "grid":
            for point in self.grid()[:: len(self.seeds)]:
                self.config_for(point)
            return
        for name, space in self.search_space.items():
            values = self.encoded_values(name) if isinstance(space, CategoricalSpace) else [space.low, space.high]
            for value in values:
                self.config_for({name: value})


def encode_choice(choice: Any) -> Any:
    """Optuna keeps only None/bool/int/float/str: a list of source names becomes `"a+b"`, other
    containers their JSON text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    if isinstance(choice, (list, tuple)) and all(isinstance(x, str) for x in choice):
        return "+".join(choice)
    return json.dumps(choice, sort_keys=True)


def keep_sources(data: dict, names: list[str] | str, where: str = "sources") -> dict:
    """Raw experiment dict with only the sources whose label is in `names` (order kept from the base);
    ensemble members are trimmed to match."""
    names = [names] if isinstance(names, str) else list(names)
    data = copy.deepcopy(data)
    sources = data.get("sources") or []
    labels = [_label(s) for s in sources]
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise ConfigError(f"{where}: unknown source {unknown[0]!r}; the base experiment has {labels}")
    if not names:
        raise ConfigError(f"{where}: an empty source list; every choice needs at least one source")
    data["sources"] = [s for s, lab in zip(sources, labels) if lab in names]
    members = (((data.get("baselines") or {}).get("ensemble") or {}).get("members"))
    if members:
        data["baselines"]["ensemble"]["members"] = [m for m in members if m in names] or None
    return data


def _label(source: dict) -> str:
    if isinstance(source, dict) and source.get("name"):
        return source["name"]
    ref = source.get("ref", "") if isinstance(source, dict) else str(source)
    return ref.split(":")[-1].rstrip("/").split("/")[-1]


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see docs/STUDIES.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)  # model-level messages start with their field
    return f"{source}: " + "; ".join(parts)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> StudySpec:
    """Read a study spec. `overrides`: `study.<field>=value` set spec fields (e.g. `study.seeds=[0]`),
    anything else is an experiment override applied after the spec's own. `check`: build every
    setting's config now (fails early with the spec file and field named)."""
    path = Path(path).expanduser().resolve()
    data = read_yaml(path, "study spec")
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: a study spec is a mapping (study_name, base, search_space, ...)")
    data.setdefault("study_name", path.stem)
    spec_overrides = [o.removeprefix("study.") for o in overrides if o.startswith("study.")]
    exp_overrides = tuple(o for o in overrides if not o.startswith("study."))
    data = apply_overrides(data, spec_overrides, source=f"{path.name} (study overrides)")
    try:
        spec = StudySpec.model_validate({**data, "spec_path": path, "extra_overrides": exp_overrides})
    except ValidationError as exc:
        raise ConfigError(_format_error(path.name, exc)) from None
    if check:
        spec.check_settings()
    return spec
