"""Corpus loading: documents with a domain, split into train / validation.

Kinds: `micro` (the micro world's own splits), `text_files` (one domain per `paths` entry; documents are groups
of paragraphs up to `DOC_CHARS` characters), `jsonl` (one document per row, `text_field`; the domain is the row's
`domain` field or the file stem), `datasets` (one document per row of `datasets.load_dataset(**corpus.dataset)`,
a hub id or local files, streamed on request, capped by `max_docs` / `max_tokens`; the domain is the row's
`domain_field` or `dataset_domain`). `.gz` files are read transparently.

Files are decoded strictly with `corpus.encoding` (default UTF-8; a list: the first that decodes the file): a
file that is binary (a NUL byte, or more than 1% control characters), not valid in that encoding, or a
truncated/corrupt gzip stream is refused with the file and the byte offset named, never turned into documents of
replacement characters.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import random
import re
import zlib
from pathlib import Path
from typing import Callable

DOC_CHARS = 2000
# C0 control characters and DEL, except those text files hold (tab, newlines, form feed, ESC): a file with
# more than 1% of them (or any NUL) is binary.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_BINARY_CONTROL_SHARE = 0.01


class CorpusError(ValueError):
    pass


_GLOB_CHARS = re.compile(r"[*?\[]")
_DOMAIN_PREFIX = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


def path_entry(entry: str) -> tuple[str, list[Path]]:
    """(domain, files) of one `corpus.paths` entry.

    An entry is a file (its domain: the file name up to the first dot), a glob pattern (`**` recursive; every
    matching file, sorted, makes one domain named after the last folder before the first wildcard, e.g.
    `fusion/**/*.py` -> "fusion"), either one prefixed by `DOMAIN=` to name the domain (`code=fusion/**/*.py`,
    `wikitext=../shared/data/text/wikitext-2/valid.txt`). An existing file whose name holds "=" is read as a file.
    Files that do not exist are returned as they are (the caller names the missing one); a pattern matching no
    file raises CorpusError.
    """
    domain, spec = None, entry
    m = _DOMAIN_PREFIX.match(entry)
    if m and not Path(entry).expanduser().is_file():
        domain, spec = m.group(1), m.group(2)
    if not _GLOB_CHARS.search(spec):
        path = Path(spec).expanduser()
        return domain or path.name.split(".")[0], [path]
    files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
    if not files:
        raise CorpusError(f"no file matches the pattern {spec!r}")
    if domain is None:
        parts = Path(spec).parts
        literal = parts[:next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))]
        domain = Path(*literal).expanduser().resolve().name if literal else Path.cwd().name
    return domain, files


def path_entries(paths: list[str], where: str = "corpus.paths") -> list[tuple[str, list[Path]]]:
    """path_entry of each entry; a bad one raises CorpusError naming `where.<index>`."""
    out = []
    for i, entry in enumerate(paths):
        try:
            out.append(path_entry(entry))
        except CorpusError as exc:
            raise CorpusError(f"{where}.{i}: {exc}") from None
    return out


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
    return _decode(data, str(path), encoding, where, of)


def _decode(data: bytes, name: str, encoding: str | list[str], where: str, of: str = "") -> str:
    """`data` decoded strictly; CorpusError naming `where` and `name` when it is binary or not `encoding`. A list
    of encodings: the first that decodes all of `data` (the error is the last one's)."""
    if not isinstance(encoding, str):
        for candidate in encoding[:-1]:
            try:
                data.decode(candidate)
            except UnicodeDecodeError:
                continue
            return _decode(data, name, candidate, where, of)
        encoding = encoding[-1]
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NUL bytes are normal there
    nul = -1 if wide else data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{where}: {name} looks binary (a NUL byte at byte offset {nul}{of}); corpus files "
                          f"must be text")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{where}: {name} is not valid {encoding} at byte offset {exc.start}{of} "
                          f"({data[exc.start:exc.start + 8]!r}); set corpus.encoding to the file's encoding "
                          f"(e.g. latin-1) or convert the file to UTF-8") from None
    first = _CONTROL.search(text)
    if first is not None:
        count = len(_CONTROL.findall(text))
        if "\x00" in text or count > _BINARY_CONTROL_SHARE * len(text):
            at = text.index("\x00") if "\x00" in text else first.start()
            raise CorpusError(f"{where}: {name} looks binary ({count} control characters in {len(text)}, the first "
                              f"at byte offset {len(text[:at].encode(encoding))}{of}); corpus files must be text")
    return text


def read_texts(path: Path, encoding: str = "utf-8", where: str = "corpus") -> list[str]:
    """The texts of a corpus file: one for a text (or `.gz`) file, one per file inside a `.zip` archive (in
    name order), each decoded and checked as `read_text` does (errors name `archive.zip:member`)."""
    if path.suffix != ".zip":
        return [read_text(path, encoding, where)]
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted(i.filename for i in archive.infolist() if not i.is_dir())
            return [_decode(archive.read(m), f"{path}:{m}", encoding, where) for m in members]
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CorpusError(f"{where}: {path} is a truncated or corrupt zip file ({exc})") from None


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
    for i, (domain, files) in enumerate(path_entries(spec.paths)):
        for path in files:
            if not path.is_file():
                raise CorpusError(f"corpus.paths.{i}: file {path} does not exist")
            if spec.kind == "text_files":
                for text in read_texts(path, spec.encoding, where=f"corpus.paths.{i}"):
                    out.setdefault(domain, []).extend(paragraphs_to_documents(text, min_chars=spec.min_chars))
                continue
            text = read_text(path, spec.encoding, where=f"corpus.paths.{i}")
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
                    out.setdefault(str(row.get("domain", domain)), []).append(text)
        if not out.get(domain) and spec.kind == "text_files":
            what = files[0] if len(files) == 1 else f"the {len(files)} files of {spec.paths[i]!r}"
            raise CorpusError(f"corpus.paths.{i}: {what} holds no document of at least {spec.min_chars} characters")
    return out


# load_dataset builders that read data_files: their name says nothing about the corpus
_FILE_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "webdataset", "xml")


def _data_file_entries(dataset) -> list[str]:
    """dataset.data_files as one flat list (it may be a string, a list, or a dict of split -> string or list)."""
    files = dataset.data_files or []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files)


def dataset_domain(dataset) -> str:
    """The one domain of a `datasets` corpus without a domain field: the dataset's name (`JeanKaddour/minipile`
    -> `minipile`), or for a file builder (`json`, `parquet`...) the stem of its first data file."""
    files = _data_file_entries(dataset)
    if dataset.path in _FILE_BUILDERS and files:
        return Path(files[0]).name.split(".")[0]
    return Path(dataset.path.rstrip("/")).name.lower()


def open_dataset(dataset):
    """The rows (dicts) of `datasets.load_dataset(**dataset)`: a Dataset, or an IterableDataset when streaming.
    Raises CorpusError naming corpus.dataset and the cause (not found, offline and not cached, ...)."""
    import datasets

    kwargs = {k: v for k, v in dataset.model_dump().items() if v is not None and k != "path"}
    try:
        return datasets.load_dataset(dataset.path, **kwargs)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        offline = " (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and it is not in the datasets cache)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise CorpusError(f"corpus.dataset: load_dataset({dataset.path!r}, name={dataset.name!r}, "
                          f"split={dataset.split!r}) failed{offline}: {type(exc).__name__}: {exc}") from None


def local_data_files(spec) -> list[Path]:
    """The local files a corpus reads, sorted (globs and folders expanded; a missing one is left out): what
    its cache key should hash. Hub datasets contribute nothing (their revision names their content)."""
    if spec.kind in ("text_files", "jsonl"):
        return sorted(Path(p).expanduser() for p in spec.paths if Path(p).expanduser().is_file())
    if spec.kind != "datasets":
        return []
    out: set[Path] = set()
    for pattern in _local_patterns(spec.dataset):
        for hit in map(Path, glob.glob(str(Path(pattern).expanduser()), recursive=True)):
            if hit.is_dir():
                out.update(f for f in hit.rglob("*") if f.is_file())
            else:
                out.add(hit)
    return sorted(out)


def _local_patterns(dataset) -> list[str]:
    """data_files entries that are not URLs, and the dataset path when it is a local folder or file."""
    local = [f for f in _data_file_entries(dataset) if "://" not in f]
    if dataset.path.startswith(("/", "./", "../", "~")) or Path(dataset.path).expanduser().exists():
        local.append(dataset.path)
    return local


def corpus_problems(spec) -> list[str]:
    """One line per reason the corpus stage would fail, found without reading the corpus: a corpus file, data file
    or local dataset folder that does not exist (glob patterns need one match), or, offline (HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE), a hub dataset missing from the datasets cache. Nothing is downloaded."""
    if spec.kind in ("text_files", "jsonl"):
        problems = []
        for i, entry in enumerate(spec.paths):
            try:
                _, files = path_entry(entry)
            except CorpusError as exc:
                problems.append(f"corpus.paths.{i}: {exc}")
                continue
            problems += [f"corpus.paths.{i}: file {f} does not exist" for f in files if not f.is_file()]
        return problems
    if spec.kind != "datasets":
        return []
    missing = [f for f in _local_patterns(spec.dataset) if not glob.glob(str(Path(f).expanduser()))]
    if missing:
        return [f"corpus.dataset: {f} does not exist" for f in missing]
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        return []  # online, a hub dataset is checked by loading it (the corpus stage comes first)
    try:
        datasets.load_dataset_builder(spec.dataset.path, spec.dataset.name, data_dir=spec.dataset.data_dir,
                                      data_files=spec.dataset.data_files, revision=spec.dataset.revision)
    except Exception as exc:  # datasets raises many types; the message says which
        return [f"corpus.dataset: {spec.dataset.path} cannot be loaded offline (not in the datasets cache?): "
                f"{type(exc).__name__}: {exc}"]
    return []


def _dataset_docs(spec, count_tokens) -> dict[str, list[str]]:
    """Documents per domain from the rows of `spec.dataset`, in the dataset's order, stopping at the caps:
    `max_docs` documents, or the documents before the one that would take the total over `max_tokens` tokens
    (`count_tokens(text)`). Rows shorter than `min_chars` characters are skipped and count for neither cap."""
    if spec.max_tokens and count_tokens is None:
        raise CorpusError("corpus.max_tokens: counting tokens needs the target tokenizer "
                          "(load_corpus_splits(..., count_tokens=...))")
    out: dict[str, list[str]] = {}
    default_domain, kept, tokens = dataset_domain(spec.dataset), 0, 0
    for n, row in enumerate(open_dataset(spec.dataset)):
        for field in (spec.text_field, spec.domain_field):
            if field is not None and field not in row:
                which = "text_field" if field == spec.text_field else "domain_field"
                raise CorpusError(f"corpus.{which}: row {n} of {spec.dataset.path} has no field {field!r} "
                                  f"(its fields: {', '.join(row)})")
        text = str(row[spec.text_field])
        if len(text) < spec.min_chars:
            continue
        if spec.max_tokens:
            tokens += count_tokens(text)
            if tokens > spec.max_tokens:
                break
        out.setdefault(str(row[spec.domain_field]) if spec.domain_field else default_domain, []).append(text)
        kept += 1
        if spec.max_docs and kept >= spec.max_docs:
            break
    return out


def load_corpus_splits(spec, *, world=None, seed: int = 0,
                       count_tokens: Callable[[str], int] | None = None) -> dict[str, list[dict]]:
    """-> {"train": [{"domain", "text"}...], "validation": [...], "test": [...]}; deterministic for a seed.
    "test" is there for the micro world (its own test split) and for file / datasets corpora with
    `corpus.test_fraction` (per domain, taken from the shuffled documents before the validation ones).
    count_tokens(text) -> tokens of the target's tokenizer: needed by `corpus.max_tokens` only."""
    if spec.kind == "micro":
        if world is None:
            raise CorpusError("corpus.kind: micro needs the micro world (`world: {kind: micro}`)")
        splits = {s: [{"domain": r["domain"], "text": r["text"]} for r in world.corpus(s)]
                  for s in ("train", "validation", "test")}
        if spec.max_docs_per_domain:
            splits = {s: _cap(rows, spec.max_docs_per_domain) for s, rows in splits.items()}
    else:
        rng = random.Random(seed)
        splits = {"train": [], "validation": [], **({"test": []} if spec.test_fraction else {})}
        by_domain = _dataset_docs(spec, count_tokens) if spec.kind == "datasets" else _domain_docs(spec)
        for domain, docs in sorted(by_domain.items()):
            docs = list(docs)
            rng.shuffle(docs)
            if spec.max_docs_per_domain:
                docs = docs[: spec.max_docs_per_domain]
            # both fractions are of the domain's documents; each held-out split gets at least one document
            # while one is left for training
            n_test = max(1, round(len(docs) * spec.test_fraction)) if spec.test_fraction and len(docs) > 2 else 0
            n_val = max(1, round(len(docs) * spec.validation_fraction)) if len(docs) - n_test > 1 else 0
            if n_test:
                splits["test"] += [{"domain": domain, "text": t} for t in docs[:n_test]]
            splits["validation"] += [{"domain": domain, "text": t} for t in docs[n_test:n_test + n_val]]
            splits["train"] += [{"domain": domain, "text": t} for t in docs[n_test + n_val:]]
    if not splits["train"]:
        where = spec.dataset.path if spec.kind == "datasets" else ", ".join(spec.paths) or "the micro world"
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
