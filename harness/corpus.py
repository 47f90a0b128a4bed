"""Corpus loading: documents with a domain, split into train / validation.

Kinds: `micro` (the micro world's own splits), `text_files` (one domain per file; documents are groups of
paragraphs up to `DOC_CHARS` characters), `jsonl` (one document per row, `text_field`; the domain is the row's
`domain` field or the file stem). `.gz` files are read transparently.

Files are decoded strictly with `corpus.encoding` (default UTF-8): a file that is binary (a NUL byte, or more
than 1% control characters), not valid in that encoding, or a truncated/corrupt gzip stream is refused with
the file and the byte offset named, never turned into documents of replacement characters.
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
import random
import re
import zlib
from pathlib import Path

DOC_CHARS = 2000
# C0 control characters and DEL, except those text files hold (tab, newlines, form feed, ESC): a file with
# more than 1% of them (or any NUL) is binary.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_BINARY_CONTROL_SHARE = 0.01


class CorpusError(ValueError):
    pass


def read_text(path: Path, encoding: str = "utf-8", where: str = "corpus") -> str:
    """The whole text of `path` (`.gz` decompressed), decoded strictly with `encoding`.

    Raises CorpusError naming `where` (the config field), the file and the byte offset (of the decompressed
    data for `.gz`) when the file is binary, not valid `encoding`, or a truncated or corrupt gzip stream.
    """
    gz = path.suffix == ".gz"
    of = " of the decompressed data" if gz else ""
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorpusError(f"{where}: {path} is a truncated or corrupt gzip file ({exc}); "
                          f"re-download or re-compress it") from None
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NUL bytes are normal there
    nul = -1 if wide else data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{where}: {path} looks binary (a NUL byte at byte offset {nul}{of}); corpus files "
                          f"must be text")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{where}: {path} is not valid {encoding} at byte offset {exc.start}{of} "
                          f"({data[exc.start:exc.start + 8]!r}); set corpus.encoding to the file's encoding "
                          f"(e.g. latin-1) or convert the file to UTF-8") from None
    first = _CONTROL.search(text)
    if first is not None:
        count = len(_CONTROL.findall(text))
        if "\x00" in text or count > _BINARY_CONTROL_SHARE * len(text):
            at = text.index("\x00") if "\x00" in text else first.start()
            raise CorpusError(f"{where}: {path} looks binary ({count} control characters in {len(text)}, the first "
                              f"at byte offset {len(text[:at].encode(encoding))}{of}); corpus files must be text")
    return text


def paragraphs_to_documents(text: str, max_chars: int = DOC_CHARS, min_chars: int = 20) -> list[str]:
    """Group blank-line separated paragraphs into documents of at most ~max_chars characters."""
    docs, cur = [], ""
    for para in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + len(para) + 2 > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > max_chars:  # a single huge paragraph: cut at the last newline/space before the limit
            cut = max(cur.rfind("\n", 0, max_chars), cur.rfind(" ", 0, max_chars))
            cut = cut if cut > max_chars // 2 else max_chars
            docs.append(cur[:cut].rstrip())
            cur = cur[cut:].lstrip()
    if cur:
        docs.append(cur)
    return [d for d in docs if len(d) >= min_chars]


def _domain_docs(spec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, name in enumerate(spec.paths):
        path = Path(name).expanduser()
        if not path.is_file():
            raise CorpusError(f"corpus.paths.{i}: file {path} does not exist")
        stem = path.name.split(".")[0]
        text = read_text(path, spec.encoding, where=f"corpus.paths.{i}")
        if spec.kind == "text_files":
            docs = paragraphs_to_documents(text, min_chars=spec.min_chars)
            out.setdefault(stem, []).extend(docs)
        else:
            for ln, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"corpus.paths.{i}: {path} line {ln} is not JSON: {exc}") from None
                if spec.text_field not in row:
                    raise CorpusError(f"corpus.paths.{i}: {path} line {ln} has no field {spec.text_field!r} "
                                      f"(set corpus.text_field)")
                text = str(row[spec.text_field])
                if len(text) >= spec.min_chars:
                    out.setdefault(str(row.get("domain", stem)), []).append(text)
        if not out.get(stem) and spec.kind == "text_files":
            raise CorpusError(f"corpus.paths.{i}: {path} holds no document of at least {spec.min_chars} characters")
    return out


def load_corpus_splits(spec, *, world=None, seed: int = 0) -> dict[str, list[dict]]:
    """-> {"train": [{"domain", "text"}...], "validation": [...]}; deterministic for a seed."""
    if spec.kind == "micro":
        if world is None:
            raise CorpusError("corpus.kind: micro needs the micro world (`world: {kind: micro}`)")
        splits = {s: [{"domain": r["domain"], "text": r["text"]} for r in world.corpus(s)] for s in ("train", "validation")}
        if spec.max_docs_per_domain:
            splits = {s: _cap(rows, spec.max_docs_per_domain) for s, rows in splits.items()}
    else:
        rng = random.Random(seed)
        splits = {"train": [], "validation": []}
        for domain, docs in sorted(_domain_docs(spec).items()):
            docs = list(docs)
            rng.shuffle(docs)
            if spec.max_docs_per_domain:
                docs = docs[: spec.max_docs_per_domain]
            n_val = max(1, round(len(docs) * spec.validation_fraction)) if len(docs) > 1 else 0
            splits["validation"] += [{"domain": domain, "text": t} for t in docs[:n_val]]
            splits["train"] += [{"domain": domain, "text": t} for t in docs[n_val:]]
    if not splits["train"]:
        where = ", ".join(spec.paths) or "the micro world"
        raise CorpusError(f"corpus: no training documents in {where} (empty corpus)")
    return splits


def _cap(rows: list[dict], n: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r["domain"], 0) < n:
            out.append(r)
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
    return out


def save_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
