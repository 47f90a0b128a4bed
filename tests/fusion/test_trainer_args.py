"""training.extra_args: any transformers.TrainingArguments field, checked at config load, reaching the Trainer."""
from pathlib import Path

import pytest
import transformers

import tiny
from fusion.trainer import FusionTrainer, TrainSettings, training_arguments
from harness.config import ConfigError, load_config
from harness.pipeline import build_plan, train_settings

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "micro_quickstart.yaml"
EXTRA = ("training.extra_args={adam_beta2: 0.95, optim: adafactor, report_to: [mlflow], save_strategy: steps, "
         "save_steps: 7, disable_tqdm: false}")


def _args(tmp_path, overrides):
    cfg = load_config(QUICKSTART, overrides, check_paths=False)
    return training_arguments(str(tmp_path), train_settings(cfg, device="cpu"))


def test_extra_args_reach_the_trainer_through_the_config(tmp_path, sp_tokenizer):
    args = _args(tmp_path, [EXTRA])
    assert (args.adam_beta2, args.optim, args.report_to) == (0.95, "adafactor", ["mlflow"])
    assert (args.save_strategy, args.save_steps, args.disable_tqdm) == ("steps", 7, False)
    # the curated fields still come from training.* (quickstart: lr 1e-3, batch 8, warmup 0.05)
    assert (args.learning_rate, args.per_device_train_batch_size, args.warmup_steps) == (1e-3, 8, 0.05)
    trainer = FusionTrainer(model=tiny.tiny_model("llama", sp_tokenizer), args=args, lam=1.0)
    callbacks = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert {"MLflowCallback", "ProgressCallback"} <= callbacks
    assert type(trainer.create_optimizer()).__name__ == "Adafactor"


def test_extra_args_reach_the_optimizer(tmp_path, sp_tokenizer):
    args = _args(tmp_path, ["training.extra_args={adam_beta2: 0.95, adam_epsilon: 1.0e-6}"])
    trainer = FusionTrainer(model=tiny.tiny_model("llama", sp_tokenizer), args=args, lam=1.0)
    group = trainer.create_optimizer().param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.95), 1e-6)


def test_without_extra_args_fuselab_defaults_and_unchanged_cache_keys(tmp_path):
    args = _args(tmp_path, [])
    assert (args.save_strategy, args.disable_tqdm, args.report_to) == ("no", True, [])
    assert args.remove_unused_columns is False
    cfg = load_config(QUICKSTART, check_paths=False)
    assert "extra_args" not in cfg.training.model_dump()  # dumps (and so stage keys) as before the field existed
    with_extra = load_config(QUICKSTART, ["training.extra_args={adam_beta2: 0.95}"], check_paths=False)
    plain, extra = build_plan(cfg).stages, build_plan(with_extra).stages
    assert plain["fused"].key == extra["fused"].key
    assert plain["train/fusellm"].key != extra["train/fusellm"].key


@pytest.mark.parametrize("value, message", [
    ("{adam_beta3: 0.9}",
     f"adam_beta3: not a field of transformers {transformers.__version__} TrainingArguments"),
    ("{learning_rate: 0.1}",
     "learning_rate: controlled by FuseLab, not settable in extra_args (set training.lr)"),
    ("{output_dir: /tmp/x}",
     "output_dir: controlled by FuseLab, not settable in extra_args (it is the stage's cache folder)"),
    ("{save_strategy: sometimes}", "save_strategy: 'sometimes' is not one of no, steps, epoch, best"),
    ("{save_strategy: no}",
     "save_strategy: False is not one of no, steps, epoch, best (YAML reads no / yes as booleans: quote it)"),
    ("{adam_beta2: high}", "adam_beta2: 'high' is not a float"),
    ("{disable_tqdm: 1}", "disable_tqdm: 1 is not a bool"),
    ("{report_to: [nosuchtracker]}", "report_to: nosuchtracker is unknown to transformers or not installed here"),
])
def test_bad_extra_args_fail_at_config_load_naming_the_field(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [f"training.extra_args={value}"], check_paths=False)
    assert str(err.value).startswith(f"micro_quickstart.yaml: training.extra_args: {message}")


def test_library_use_checks_extra_args_too(tmp_path):
    with pytest.raises(ValueError, match="^seed: controlled by FuseLab"):
        training_arguments(str(tmp_path), TrainSettings(extra_args={"seed": 3}))
