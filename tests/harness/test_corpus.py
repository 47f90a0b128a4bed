"""Corpus files are refused at the door when they are not text: binary, another encoding, a truncated .gz
(issue 19), each error naming the config field, the file and the byte offset."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

import pytest

from harness.config import ConfigError, CorpusSpec, check_local_paths, validate_config
from harness.corpus import (CorpusError, corpus_problems, load_corpus_splits, local_data_files, path_entry,
                            read_text)

PROSE = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 20


def _spec(kind: str, *paths, **extra) -> CorpusSpec:
    return CorpusSpec(kind=kind, paths=[str(p) for p in paths], **extra)


def test_binary_file_is_refused_naming_the_file_and_offset(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(PROSE.encode()[:300] + random.Random(0).randbytes(4096))
    with pytest.raises(CorpusError) as err:
        load_corpus_splits(_spec("text_files", junk))
    message = str(err.value)
    assert message.startswith(f"corpus.paths.0: {junk} ")
    offset = int(re.search(r"byte offset (\d+)", message).group(1))
    assert offset >= 300  # the prose before the junk is fine: the offset points into the junk
    assert "\n" not in message


def test_binary_without_nul_bytes_is_refused_under_a_single_byte_encoding(tmp_path):
    # latin-1 decodes any byte: the control characters give the junk away.
    rng = random.Random(1)
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(b for b in rng.randbytes(8192) if b != 0))
    with pytest.raises(CorpusError, match=rf"corpus\.paths\.0: {junk} looks binary \(\d+ control characters"):
        load_corpus_splits(_spec("text_files", junk, encoding="latin-1"))


def test_latin1_file_is_refused_as_utf8_and_read_with_a_declared_encoding(tmp_path):
    text = PROSE + "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve \u00fcber.\n\n" + PROSE
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("latin-1"))
    first_bad = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(CorpusError, match=rf"corpus\.paths\.0: {path} is not valid utf-8 at byte offset "
                                          rf"{first_bad} .*corpus\.encoding"):
        load_corpus_splits(_spec("text_files", path))
    splits = load_corpus_splits(_spec("text_files", path, encoding="latin-1"))
    docs = [r["text"] for rows in splits.values() for r in rows]
    assert any("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e" in d for d in docs)
    assert not any("\ufffd" in d for d in docs)


def test_utf16_file_with_its_declared_encoding_is_text(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes(PROSE.encode("utf-16"))
    assert read_text(path, "utf-16") == PROSE
    with pytest.raises(CorpusError, match="looks binary"):  # its NUL bytes, read as UTF-8
        read_text(path)


def test_truncated_gzip_names_the_file(tmp_path):
    rows = "".join('{"text": "%s"}\n' % ("document %d " % i * 30) for i in range(200)).encode()
    whole = gzip.compress(rows)
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=rf"corpus\.paths\.0: {path} is a truncated or corrupt gzip file"):
        load_corpus_splits(_spec("jsonl", path))
    path.write_bytes(whole)
    assert sum(len(v) for v in load_corpus_splits(_spec("jsonl", path)).values()) == 200


def test_binary_inside_a_gzip_counts_offsets_in_the_decompressed_data(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine text here, long enough"}\n' + b"\x00\x01\x02"))
    with pytest.raises(CorpusError, match=r"NUL byte at byte offset 40 of the decompressed data"):
        load_corpus_splits(_spec("jsonl", path))


def test_text_with_a_few_escape_sequences_and_form_feeds_is_still_text(tmp_path):
    path = tmp_path / "log.txt"
    text = PROSE + "\x1b[1mbold\x1b[0m and a page break\f\n\n" + PROSE
    path.write_text(text)
    assert read_text(path) == text


def test_encoding_is_validated_in_the_config():
    with pytest.raises(ConfigError, match=r"exp\.yaml: corpus\.encoding: unknown text encoding 'utf-99'"):
        validate_config({"name": "t", "target": {"ref": "/m"}, "sources": [{"ref": "/m"}],
                         "corpus": {"kind": "text_files", "paths": ["/x.txt"], "encoding": "utf-99"}},
                        source="exp.yaml")


def test_existing_utf8_corpus_reads_as_before(shared_data):
    path = shared_data / "text" / "tinyshakespeare.txt"
    assert read_text(path) == path.read_text(encoding="utf-8")
    assert os.path.getsize(path) == len(read_text(path).encode())


# ------------------------------------------------------------------ corpus.kind: datasets (load_dataset)
def _rows(n: int, words: int = 5) -> list[dict]:
    """Row i: 'doc<i>' repeated `words` times (words * 5 - 1 characters for i < 10), domain a (odd) / b (even)."""
    return [{"text": " ".join([f"doc{i}"] * words), "src": "a" if i % 2 else "b"} for i in range(n)]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def _datasets_spec(**fields) -> CorpusSpec:
    return CorpusSpec(kind="datasets", min_chars=1, **fields)


def test_a_local_json_folder_through_load_dataset_with_a_domain_field(tmp_path, datasets_cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(10)))
    splits = load_corpus_splits(_datasets_spec(dataset={"path": str(folder)}, domain_field="src",
                                               validation_fraction=0.2))
    # 5 documents per domain; round(5 * 0.2) = 1 of each held out
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2
    assert sorted(r["domain"] for r in splits["validation"]) == ["a", "b"]
    every = splits["train"] + splits["validation"]
    assert sorted(r["text"] for r in every) == sorted(r["text"] for r in _rows(10))
    assert all(r["domain"] == ("a" if int(r["text"].split()[0][3:]) % 2 else "b") for r in every)


def test_arrow_files_streamed_and_capped_at_max_docs(tmp_path, datasets_cache):
    import datasets

    datasets.Dataset.from_list(_rows(10)).save_to_disk(str(tmp_path / "saved"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    spec = _datasets_spec(dataset={"path": "arrow", "data_files": [str(f) for f in arrow], "streaming": True},
                          max_docs=4, validation_fraction=0.25)
    splits = load_corpus_splits(spec)
    texts = sorted(r["text"] for r in splits["train"] + splits["validation"])
    assert texts == sorted(r["text"] for r in _rows(4))  # the first 4 rows in the dataset's order
    assert {r["domain"] for r in splits["train"]} == {arrow[0].name.split(".")[0]}  # one domain: the file stem
    assert len(splits["validation"]) == 1  # round(4 * 0.25)


def test_max_tokens_takes_the_documents_that_fit_and_short_rows_count_for_nothing(tmp_path, datasets_cache):
    rows = _rows(6, words=5)
    rows.insert(1, {"text": "x", "src": "a"})  # below min_chars 2: skipped, counts for no cap
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = CorpusSpec(kind="datasets", dataset={"path": "json", "data_files": str(data)}, min_chars=2,
                      max_tokens=14, validation_fraction=0.5)
    # 5 tokens per document (words): 5, 10 fit in 14, the third would make 15
    splits = load_corpus_splits(spec, count_tokens=lambda text: len(text.split()))
    assert sorted(r["text"] for r in splits["train"] + splits["validation"]) == ["doc0 " * 4 + "doc0",
                                                                                   "doc1 " * 4 + "doc1"]
    assert {r["domain"] for r in splits["train"]} == {"rows"}
    with pytest.raises(CorpusError, match=r"^corpus\.max_tokens: counting tokens needs the target tokenizer"):
        load_corpus_splits(spec)


def test_a_missing_text_field_names_the_row_and_the_fields(tmp_path, datasets_cache):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"content": "some text here"}) + "\n")
    with pytest.raises(CorpusError, match=r"^corpus\.text_field: row 0 of json has no field 'text' "
                                          r"\(its fields: content\)$"):
        load_corpus_splits(_datasets_spec(dataset={"path": "json", "data_files": str(data)}))


def test_hub_dataset_offline_fails_at_once_naming_it(tmp_path, datasets_cache):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: no network
    spec = _datasets_spec(dataset={"path": "JeanKaddour/minipile"})
    with pytest.raises(CorpusError, match=r"^corpus\.dataset: load_dataset\('JeanKaddour/minipile', name=None, "
                                          r"split='train'\) failed \(offline: .*not in the datasets cache\)"):
        load_corpus_splits(spec)
    [problem] = corpus_problems(spec)
    assert problem.startswith("corpus.dataset: JeanKaddour/minipile cannot be loaded offline")


def test_corpus_problems_and_local_files(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    spec = _datasets_spec(dataset={"path": "json", "data_files": {"train": [str(data), str(tmp_path / "b*.jsonl")]}})
    assert corpus_problems(spec) == [f"corpus.dataset: {tmp_path / 'b*.jsonl'} does not exist"]
    assert local_data_files(spec) == [data]
    (tmp_path / "b1.jsonl").write_text("{}\n")
    assert corpus_problems(spec) == [] and local_data_files(spec) == [data, tmp_path / "b1.jsonl"]
    assert corpus_problems(_spec("jsonl", tmp_path / "none.jsonl")) == [
        f"corpus.paths.0: file {tmp_path / 'none.jsonl'} does not exist"]


@pytest.mark.parametrize("corpus, message", [
    ({"kind": "datasets"}, "corpus: dataset: kind datasets needs the load_dataset arguments"),
    ({"kind": "datasets", "dataset": {"path": "json"}, "paths": ["a.jsonl"]},
     "corpus: paths: kind datasets reads corpus.dataset"),
    ({"kind": "jsonl", "paths": ["a.jsonl"], "max_docs": 3}, "corpus: max_docs: only for kind datasets"),
    ({"kind": "datasets", "dataset": {"path": "json", "spilt": "train"}}, "corpus.dataset.spilt: unknown key"),
])
def test_datasets_corpus_config_errors(corpus, message):
    data = {"name": "x", "target": {"ref": "gpt2"}, "sources": [{"ref": "gpt2"}], "corpus": corpus}
    with pytest.raises(ConfigError) as err:
        validate_config(data, "exp.yaml")
    assert str(err.value).startswith(f"exp.yaml: {message}")


def test_new_corpus_fields_leave_existing_cache_keys_alone():
    assert CorpusSpec(kind="jsonl", paths=["a.jsonl"]).model_dump() == {
        "kind": "jsonl", "paths": ["a.jsonl"], "text_field": "text", "max_docs_per_domain": None,
        "validation_fraction": 0.1, "min_chars": 20, "encoding": "utf-8"}


def test_a_glob_entry_is_one_domain_named_after_its_folder_and_a_prefix_renames_it(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text(PROSE)
    (pkg / "sub" / "b.py").write_text(PROSE)
    (pkg / "notes.md").write_text(PROSE)
    other = tmp_path / "valid.txt"
    other.write_text(PROSE)
    monkeypatch.chdir(tmp_path)
    assert path_entry("pkg/**/*.py") == ("pkg", [Path("pkg/a.py"), Path("pkg/sub/b.py")])
    assert path_entry("code=pkg/*.py") == ("code", [Path("pkg/a.py")])
    assert path_entry("wiki=valid.txt") == ("wiki", [Path("valid.txt")])
    assert path_entry("valid.txt") == ("valid", [Path("valid.txt")])
    splits = load_corpus_splits(_spec("text_files", "code=pkg/**/*.py", "wiki=valid.txt", validation_fraction=0.5))
    domains = {r["domain"] for rows in splits.values() for r in rows}
    assert domains == {"code", "wiki"}
    # two files of code, one of wiki: every paragraph group of both files lands in "code"
    assert sum(r["domain"] == "code" for rows in splits.values() for r in rows) == \
        2 * sum(r["domain"] == "wiki" for rows in splits.values() for r in rows)


def test_a_file_whose_name_holds_an_equals_sign_is_read_as_a_file(tmp_path, monkeypatch):
    (tmp_path / "a=b.txt").write_text(PROSE)
    monkeypatch.chdir(tmp_path)
    assert path_entry("a=b.txt") == ("a=b", [Path("a=b.txt")])


def test_a_pattern_that_matches_nothing_names_the_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match=r"^corpus\.paths\.1: no file matches the pattern 'src/\*\*/\*\.py'$"):
        load_corpus_splits(_spec("text_files", tmp_path / "x.txt", "src/**/*.py"))
    cfg = validate_config({"name": "t", "target": {"name": "m", "ref": "micro:llama-docs"},
                           "sources": [{"name": "m", "ref": "micro:llama-docs"}],
                           "world": {"kind": "micro"},
                           "corpus": {"kind": "text_files", "paths": ["code=src/*.py"]}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"^t\.yaml: corpus\.paths\.0: no file matches the pattern 'src/\*\.py'$"):
        check_local_paths(cfg, "t.yaml")


def test_test_fraction_takes_held_out_test_documents_before_the_validation_ones(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("".join(f"Paragraph {i}: " + "words of plain prose here. " * 70 + "\n\n" for i in range(20)))
    plain = load_corpus_splits(_spec("text_files", text, validation_fraction=0.2), seed=3)
    split = load_corpus_splits(_spec("text_files", text, validation_fraction=0.2, test_fraction=0.25), seed=3)
    n = len(plain["train"]) + len(plain["validation"])
    assert "test" not in plain and n == 20  # one ~2,000-character document per paragraph
    # of 20 documents: round(20 * 0.25) = 5 test, round(20 * 0.2) = 4 validation, 11 train, disjoint
    assert (len(split["test"]), len(split["validation"]), len(split["train"])) == (5, 4, 11)
    texts = [{r["text"] for r in split[s]} for s in ("test", "validation", "train")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert set().union(*texts) == {r["text"] for s in plain.values() for r in s}


@pytest.mark.parametrize("corpus, message", [
    ({"kind": "micro", "test_fraction": 0.1}, r"corpus: .*test_fraction: the micro world brings its own test split"),
    ({"kind": "text_files", "paths": ["a.txt"], "validation_fraction": 0.5, "test_fraction": 0.5},
     r"test_fraction: validation_fraction 0\.5 \+ test_fraction 0\.5 leave no training documents"),
])
def test_test_fraction_errors(corpus, message):
    cfg = {"name": "t", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
           "sources": [{"ref": "micro:llama-docs"}], "corpus": corpus}
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, "t.yaml")


def test_a_test_split_evaluation_needs_a_test_split():
    cfg = {"name": "t", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
           "sources": [{"ref": "micro:llama-docs"}], "corpus": {"kind": "text_files", "paths": ["a.txt"]},
           "evaluation": {"perplexity": {"split": "test"}}}
    with pytest.raises(ConfigError, match=r"evaluation\.perplexity\.split: test needs a test split: set "
                                          r"corpus\.test_fraction"):
        validate_config(cfg, "t.yaml")
    cfg["corpus"]["test_fraction"] = 0.1
    assert validate_config(cfg, "t.yaml").evaluation.perplexity.split == "test"


def test_a_zip_archive_is_read_member_by_member_with_the_first_encoding_that_fits(tmp_path):
    import zipfile

    archive = tmp_path / "speeches.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("speeches/b.txt", ("Caf\u00e9 au lait, " * 20 + "\n\n").encode("cp1252"))  # 0xe9: not UTF-8
        zf.writestr("speeches/a.txt", ("Na\u00efve plain text. " * 20 + "\n\n").encode("utf-8"))
    with pytest.raises(CorpusError, match=rf"^corpus\.paths\.0: {archive}:speeches/b\.txt is not valid utf-8 at "
                                          r"byte offset 3 "):
        load_corpus_splits(_spec("text_files", archive))
    splits = load_corpus_splits(_spec("text_files", archive, encoding=["utf-8", "cp1252"]))
    texts = sorted(r["text"] for rows in splits.values() for r in rows)
    assert texts == [("Caf\u00e9 au lait, " * 20).strip(), ("Na\u00efve plain text. " * 20).strip()]
    assert {r["domain"] for rows in splits.values() for r in rows} == {"speeches"}
    with pytest.raises(ValueError, match="unknown text encoding 'utf-9'"):
        CorpusSpec(kind="text_files", paths=["x"], encoding=["utf-8", "utf-9"])
