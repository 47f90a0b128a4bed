"""Held-out text per domain for perplexity, from the shared data folder (a MiniPile-like domain mix).

Domains (all under `<data_dir>/text/` except code):
- wikipedia:   wikitext-2 valid + test, one document per article (" = Title = " headings)
- books:       LAMBADA book passages (context + continuation)
- pubmed:      PubMedQA abstracts (the "Context:" part, question and answer options dropped)
- shakespeare: tinyshakespeare, consecutive speeches grouped into ~2,000-character documents
- speeches:    NLTK state_union + inaugural, one document per speech
- web:         NLTK webtext, 50-line documents
- code:        this Python's standard library sources, one document per module (varies with the Python version)
"""
from __future__ import annotations

import json
import random
import re
import sysconfig
import zipfile
from pathlib import Path


def _wikipedia(text_dir: Path) -> list[str]:
    docs = []
    for split in ("valid", "test"):
        current: list[str] = []
        for line in (text_dir / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            if re.match(r"^ = [^=].* = $", line) and current:
                docs.append("\n".join(current).strip())
                current = []
            current.append(line)
        if current:
            docs.append("\n".join(current).strip())
    return [d for d in docs if d]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _books(text_dir: Path) -> list[str]:
    return [r["context"] + r["continuation"] for r in _jsonl(text_dir / "lambada_openai.llmfoundry.jsonl")]


def _pubmed(text_dir: Path) -> list[str]:
    docs = []
    for row in _jsonl(text_dir / "pubmed_qa_labeled.llmfoundry.jsonl"):
        abstract = row["context"].split("\nQuestion:", 1)[0]
        docs.append(abstract.removeprefix("Context: ").strip())
    return docs


def _shakespeare(text_dir: Path, target_chars: int = 2000) -> list[str]:
    docs, current = [], ""
    for speech in (text_dir / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n"):
        current = f"{current}\n\n{speech}" if current else speech
        if len(current) >= target_chars:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def _zip_texts(path: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(path) as archive:
        return [(name, archive.read(name).decode("latin-1")) for name in sorted(archive.namelist())
                if name.endswith(".txt")]


def _speeches(text_dir: Path) -> list[str]:
    return [text.strip() for corpus in ("state_union", "inaugural")
            for _, text in _zip_texts(text_dir / "nltk" / f"{corpus}.zip")]


def _web(text_dir: Path, lines_per_doc: int = 50) -> list[str]:
    docs = []
    for _, text in _zip_texts(text_dir / "nltk" / "webtext.zip"):
        lines = text.splitlines()
        docs += ["\n".join(lines[i: i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    return [d for d in docs if d.strip()]


def _code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]


DOMAINS = {"wikipedia": _wikipedia, "books": _books, "pubmed": _pubmed, "shakespeare": _shakespeare,
           "speeches": _speeches, "web": _web}


def minipile_texts(data_dir: Path, max_docs_per_domain: int, seed: int) -> dict[str, list[str]]:
    """Documents per domain: at most `max_docs_per_domain` each, a seeded sample (same seed, same texts)."""
    text_dir = Path(data_dir) / "text"
    if not text_dir.is_dir():
        raise FileNotFoundError(f"minipile_texts: {text_dir} does not exist; pass the shared data folder (the one "
                                "holding text/wikitext-2, text/nltk, ...) as data_dir")
    loaders = {**{name: (lambda fn=fn: fn(text_dir)) for name, fn in DOMAINS.items()}, "code": _code}
    out = {}
    for domain, load in loaders.items():
        docs = load()
        rng = random.Random(f"{seed}:{domain}")
        out[domain] = rng.sample(docs, min(max_docs_per_domain, len(docs)))
    return out
