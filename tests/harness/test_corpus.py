"""Corpus files are refused at the door when they are not text: binary, another encoding, a truncated .gz
(issue 19), each error naming the config field, the file and the byte offset."""
from __future__ import annotations

import gzip
import os
import random
import re

import pytest

from harness.config import ConfigError, CorpusSpec, validate_config
from harness.corpus import CorpusError, load_corpus_splits, read_text

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
