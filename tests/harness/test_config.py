"""Experiment config: validation messages name the culprit, overrides, stable hashing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, apply_overrides, load_config, validate_config
from harness.models import ModelLoadError, load_model

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"


def _write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return p


def _minimal(**extra) -> dict:
    base = {"name": "t", "world": {"kind": "micro"}, "target": {"ref": "micro:a"},
            "sources": [{"ref": "micro:a"}, {"ref": "micro:b"}]}
    base.update(extra)
    return base


def test_quickstart_config_loads_and_hash_is_stable():
    a = load_config(QUICKSTART)
    b = load_config(QUICKSTART)
    assert a.content_hash() == b.content_hash()
    assert len(a.content_hash()) == 16
    assert a.fusion.lam == 0.9 and a.fusion.top_k == 10


def test_hash_ignores_key_order_and_spelled_out_defaults(tmp_path):
    plain = _minimal()
    spelled = dict(reversed(list(_minimal(fusion={"lam": 0.9, "top_k": 10}).items())))
    h1 = load_config(_write(tmp_path, plain, "a.yaml")).content_hash()
    h2 = load_config(_write(tmp_path, spelled, "b.yaml")).content_hash()
    assert h1 == h2
    h3 = load_config(_write(tmp_path, _minimal(fusion={"lam": 0.8}), "c.yaml")).content_hash()
    assert h3 != h1


def test_unknown_key_names_field_and_file(tmp_path):
    p = _write(tmp_path, _minimal(fusion={"lamda": 0.9}), "typo.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert msg.startswith("typo.yaml: fusion.lamda: unknown key")
    assert "\n" not in msg


def test_wrong_type_names_field(tmp_path):
    p = _write(tmp_path, _minimal(training={"block_size": "big"}))
    with pytest.raises(ConfigError, match=r"^exp\.yaml: training\.block_size: .*integer.*'big'"):
        load_config(p)


def test_out_of_range_and_unregistered_names(tmp_path):
    with pytest.raises(ConfigError, match=r"fusion\.lam: .*less than or equal to 1"):
        load_config(_write(tmp_path, _minimal(fusion={"lam": 1.5})))
    with pytest.raises(ConfigError, match=r"fusion\.fusion: unknown fusion function 'maxce'; registered: avgce, mince"):
        load_config(_write(tmp_path, _minimal(fusion={"fusion": "maxce"})))


def test_store_dtype_choices_are_what_extraction_writes(tmp_path):
    # issue 14 item 4: bfloat16 used to pass validation and fail at extraction; float32 was refused
    from fusion.distributions import STORE_DTYPES

    assert set(STORE_DTYPES) == {"float16", "float32"}
    assert load_config(_write(tmp_path, _minimal(fusion={"store_dtype": "float32"}))).fusion.store_dtype == "float32"
    with pytest.raises(ConfigError, match=r"fusion\.store_dtype: unknown store dtype 'bfloat16'; extraction "
                                          r"writes: float16, float32"):
        load_config(_write(tmp_path, _minimal(fusion={"store_dtype": "bfloat16"})))


def test_merges_and_combiners_checked_at_load(tmp_path):
    # a misspelled method, an unknown parameter, slerp (1 model into the base) against the micro pool's
    # 3 experts, an unknown combiner and weights that do not match the members fail before any work
    pool = {"domain_pool": {"enabled": True}}
    cases = [
        ({**pool, "merges": [{"method": "linearr"}]}, r"baselines\.merges\.0\.method: unknown merge method 'linearr'"),
        ({**pool, "merges": [{"method": "ties", "params": {"densty": 0.5}}]},
         r"baselines\.merges\.0: .*merge method 'ties' has no parameter\(s\) \['densty'\]"),
        ({**pool, "merges": [{"method": "slerp"}]},
         r"baselines\.merges\.0: merge method 'slerp' merges exactly 1 model\(s\) into the base; the pool has 3"),
        ({"ensemble": {"combiner": "median"}}, r"baselines\.ensemble\.combiner: unknown ensemble combiner 'median'"),
        ({"ensemble": {"combiner": "weighted"}}, r"baselines\.ensemble: .*combiner 'weighted' needs one weight"),
        ({"ensemble": {"combiner": "mean", "weights": [1, 2]}}, r"combiner 'mean' takes no weights"),
        ({"ensemble": {"combiner": "weighted", "weights": [1, 2, 3]}},
         r"baselines\.ensemble\.weights: 3 weights for 2 members"),
    ]
    for baselines, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, _minimal(baselines=baselines)))
    ok = load_config(_write(tmp_path, _minimal(baselines={"ensemble": {"combiner": "weighted", "weights": [3, 1]},
                                                          **pool, "merges": [{"method": "ties"}]})))
    assert ok.baselines.ensemble.weights == [3.0, 1.0]


def test_missing_model_path_names_field(tmp_path):
    data = {"name": "t", "target": {"ref": "./no/such/model"}, "sources": [{"ref": "/also/missing.gguf"}],
            "corpus": {"kind": "text_files", "paths": [str(tmp_path)]}}
    with pytest.raises(ConfigError, match=r"^exp\.yaml: target\.ref: model path \./no/such/model does not exist$"):
        load_config(_write(tmp_path, data))


def test_missing_required_and_impossible_combination(tmp_path):
    with pytest.raises(ConfigError, match=r"target: required field is missing"):
        load_config(_write(tmp_path, {"name": "t", "sources": [{"ref": "x/y"}]}))
    # micro models without a micro world
    data = _minimal()
    del data["world"]
    with pytest.raises(ConfigError, match=r"world: micro:\* models or a micro corpus need"):
        load_config(_write(tmp_path, data))
    # merging without a structurally identical pool
    with pytest.raises(ConfigError, match=r"baselines\.merges: merging needs structurally identical models"):
        load_config(_write(tmp_path, _minimal(baselines={"merges": [{"method": "linear"}]})))
    # duplicate source names
    with pytest.raises(ConfigError, match=r"sources: names must be unique, repeated: a"):
        load_config(_write(tmp_path, _minimal(sources=[{"ref": "micro:a"}, {"ref": "micro:a"}])))


def test_overrides_typed_and_indexed():
    data = _minimal()
    out = apply_overrides(data, ["fusion.lam=0.8", "sources.1.ref=micro:c", "evaluation.suites=[micro, bbh]",
                                 "training.bf16=true"])
    cfg = validate_config(out)
    assert cfg.fusion.lam == 0.8
    assert cfg.sources[1].ref == "micro:c"
    assert cfg.evaluation.suites == ["micro", "bbh"]
    assert cfg.training.bf16 is True
    assert data["sources"][1]["ref"] == "micro:b"  # the input is not mutated


@pytest.mark.parametrize("override, message", [
    ("fusion.lam", "override 'fusion.lam' must look like key.path=value"),
    ("sources.7.ref=x", "override 'sources.7.ref=x': sources.7 is not an index of a 2-item list"),
    ("name.first=x", "override 'name.first=x': name is not a section"),
    ("fusion..lam=1", "override 'fusion..lam=1' has an empty key"),
])
def test_invalid_override_names_it(override, message):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(_minimal(), [override], source="exp.yaml")
    assert str(exc.value) == f"exp.yaml: {message}"


def test_override_to_unknown_key_is_rejected_by_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"^exp\.yaml: fusion\.lamb: unknown key"):
        load_config(_write(tmp_path, _minimal()), ["fusion.lamb=0.5"])


def test_non_fast_tokenizer_names_model(tmp_path, sp_tokenizer):
    from transformers import ByT5Tokenizer

    import tiny
    from harness.config import ModelSpec

    folder = tmp_path / "slowtok"
    tiny.save_pair(tiny.tiny_model("llama", sp_tokenizer), sp_tokenizer, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    ByT5Tokenizer().save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=r"model slowtok: tokenizer ByT5Tokenizer is not a fast tokenizer"):
        load_model(ModelSpec(ref=str(folder)))


def test_pickle_weights_refused_unless_opted_in(tmp_path, sp_tokenizer):
    import tiny
    from harness.config import ModelSpec

    folder = tmp_path / "picklemodel"
    model = tiny.tiny_model("llama", sp_tokenizer)
    import torch

    model.config.save_pretrained(folder)
    sp_tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"model picklemodel: .* holds only pickle weights"):
        load_model(ModelSpec(ref=str(folder)))


def test_empty_corpus_names_file(tmp_path):
    from harness.corpus import CorpusError, load_corpus_splits
    from harness.config import CorpusSpec

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match=rf"corpus\.paths\.0: {empty} holds no document"):
        load_corpus_splits(CorpusSpec(kind="text_files", paths=[str(empty)]))


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    p = _write(tmp_path, _minimal(fusion={"lamda": 0.9}), "typo.yaml")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "plan", str(p)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fuselab: error: typo.yaml: fusion.lamda: unknown key")


def test_reference_preset_fills_every_unset_switch(tmp_path):
    from harness.config import REFERENCE_PRESET, FusionSpec

    default = load_config(_write(tmp_path, _minimal(), "d.yaml")).fusion
    ref = load_config(_write(tmp_path, _minimal(fusion={"preset": "reference"}), "r.yaml")).fusion
    expected = {"alignment": "dtw", "vocab_text": "reference", "special_tokens": "string",
                "position0": "prepend_marker", "fallback_onehot": "current_token", "duplicate_ids": "first",
                "empty_rows": "target", "avgce_weights": "softmax_exp_neg", "avgce_cut": "union",
                "loss_positions": "attention_mask"}
    assert REFERENCE_PRESET == expected and set(expected) <= set(FusionSpec.model_fields)
    assert {k: getattr(ref, k) for k in expected} == expected
    # every switch but avgce_cut (whose default already is the reference's) differs from the default
    assert [k for k in expected if getattr(default, k) == expected[k]] == ["avgce_cut"]
    # the rest of the section is untouched
    assert (ref.vocab_map, ref.fusion, ref.lam, ref.top_k) == (default.vocab_map, default.fusion, 0.9, 10)


def test_explicit_switch_beats_the_preset(tmp_path):
    path = _write(tmp_path, _minimal(fusion={"preset": "reference", "duplicate_ids": "sum"}))
    cfg = load_config(path)
    assert (cfg.fusion.duplicate_ids, cfg.fusion.fallback_onehot) == ("sum", "current_token")
    # an override on the command line is an explicit setting too, either way round
    cfg = load_config(_write(tmp_path, _minimal(), "o.yaml"), ["fusion.preset=reference", "fusion.alignment=offsets"])
    assert (cfg.fusion.alignment, cfg.fusion.vocab_text) == ("offsets", "reference")
    with pytest.raises(ConfigError, match=r"fusion\.preset"):
        load_config(_write(tmp_path, _minimal(fusion={"preset": "faithful"}), "bad.yaml"))


def test_paper_config_uses_the_reference_preset():
    cfg = load_config(REPO / "studies" / "paper_llama2_openllama_mpt_7b.yaml", check_paths=False)
    from harness.config import REFERENCE_PRESET

    assert cfg.fusion.preset == "reference"
    assert {k: getattr(cfg.fusion, k) for k in REFERENCE_PRESET} == REFERENCE_PRESET


@pytest.mark.parametrize("name", ["../../../x", "/tmp/elsewhere", "a/b", "a\\b", "..", "x..y", ""])
def test_run_names_that_would_leave_the_work_dir_are_refused(tmp_path, name):
    p = _write(tmp_path, _minimal(), "exp.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(p, [f"name={name}"] if name else ["name=''"])
    message = str(err.value)
    assert message.startswith("exp.yaml: name: name ") and "\n" not in message
    assert load_config(p, ["name=plain-name_1.v2"]).name == "plain-name_1.v2"


def test_study_names_are_checked_the_same_way(tmp_path):
    from studies.spec import load_spec

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"study_name": "../x", "base": str(QUICKSTART), "objective": {"metric": "bpb_avg"},
                                    "search_space": {"fusion.lam": {"type": "categorical", "choices": [0.9]}}}))
    with pytest.raises(ConfigError, match=r"s\.yaml: study_name: name '\.\./x' holds a path separator"):
        load_spec(spec)


def test_training_fields_are_the_trainer_settings_and_the_old_reset_key_still_reads():
    import dataclasses

    from fusion.trainer import TrainSettings
    from harness.config import TrainingSpec
    from harness.pipeline import train_settings

    # every training field becomes the TrainSettings field of the same name (plus the experiment seed)
    assert set(TrainingSpec.model_fields) <= {f.name for f in dataclasses.fields(TrainSettings)}
    assert TrainingSpec().cross_document_attention is True  # reference: attention crosses documents
    old = {"name": "x", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
           "sources": [{"ref": "micro:llama-docs"}], "training": {"reset_attention_across_documents": True}}
    cfg = validate_config(old)
    assert cfg.training.cross_document_attention is False
    assert train_settings(cfg).cross_document_attention is False and train_settings(cfg).seed == cfg.seed
    contradicts = {**old, "training": {"reset_attention_across_documents": True, "cross_document_attention": True}}
    with pytest.raises(ConfigError, match="contradict each other"):
        validate_config(contradicts)


def test_file_corpus_settings_on_the_micro_corpus_are_an_error_not_ignored():
    base = {"name": "x", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
            "sources": [{"ref": "micro:neox-code"}]}
    with pytest.raises(ConfigError, match=r"corpus: min_chars: only for file and datasets corpora"):
        validate_config({**base, "corpus": {"kind": "micro", "min_chars": 50}})
    assert validate_config({**base, "corpus": {"kind": "micro", "min_chars": 20}}).corpus.min_chars == 20


@pytest.mark.parametrize("limit, message", [
    (0, r"evaluation\.settings\.limit: .*limit must be a positive number of examples, got 0"),
    ({"micro": 0}, r"evaluation\.settings\.limit: .*limit\.micro must be a positive number of examples, got 0"),
    ({"commonsence": 3}, r"evaluation: .*settings\.limit names commonsence, not in suites \['micro'\]"),
])
def test_limit_is_a_number_or_one_per_suite_of_the_run(tmp_path, limit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _minimal(evaluation={"settings": {"limit": limit}})))
    ok = load_config(_write(tmp_path, _minimal(evaluation={"settings": {"limit": {"micro": 5}}}), "ok.yaml"))
    assert ok.evaluation.settings.limit == {"micro": 5}
    # FuseLab's own suites may stay in the limits when an override drops them (a study's held-out run: no suites)
    kept = load_config(_write(tmp_path, _minimal(evaluation={"suites": [], "settings": {"limit": {"bbh": 5}}}),
                              "kept.yaml"))
    assert kept.evaluation.settings.limit == {"bbh": 5}


def test_fuselab_suite_names_match_the_evaluation_package():
    from harness.config import FUSELAB_SUITES
    from harness.evaluation.data import BUILTIN_SUITES

    assert set(FUSELAB_SUITES) == {*BUILTIN_SUITES, "micro"}
