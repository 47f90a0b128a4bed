"""The micro world's text: three domains built offline from what every Python installation carries.

- ``docs``: English prose, the standard library's documentation topics (``pydoc_data.topics``).
- ``code``: standard library source files (``Lib/*.py``), a seeded but deterministic selection.
- ``arithmetic``: procedurally generated worked arithmetic ("Q: 17 + 25 = 42").

All text is normalised to printable ASCII plus newline, so every tokenizer of the world covers every
character (no ``<unk>``, which would make bits per byte meaningless).
Rows are ``{"doc_id": int, "domain": str, "text": str}``; ``doc_id`` is unique across all splits.
"""
from __future__ import annotations

import random
import re
import string
import sysconfig
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("docs", "code", "arithmetic")
SPLITS = ("train", "validation", "test")
# Printable ASCII without the exotic whitespace (\t is expanded, \r\x0b\x0c dropped).
ALPHABET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
_ALPHABET_SET = frozenset(ALPHABET)

# Stdlib modules whose text is not ordinary code (encoded data tables, rot13, generated tables).
_CODE_EXCLUDE = frozenset({"this.py", "_pydecimal.py", "_pydatetime.py", "pydoc.py", "_aix_support.py",
                           "stringprep.py", "_strptime.py", "_osx_support.py", "__phello__", "__hello__.py"})
_CODE_MAX_FILE_CHARS = 120_000


@dataclass(frozen=True)
class CorpusSizes:
    """Sizes of the corpus, in characters of normalised text per domain."""

    train_chars: int = 360_000
    heldout_chars: int = 40_000   # each of validation and test
    doc_min_chars: int = 300
    doc_max_chars: int = 1500


def normalize_text(text: str) -> str:
    """Map `text` onto `ALPHABET`: accents stripped (NFKD), tabs -> 4 spaces, other characters dropped."""
    text = unicodedata.normalize("NFKD", text).replace("\t", "    ").replace("\r\n", "\n")
    return "".join(c for c in text if c in _ALPHABET_SET)


def chunk_text(text: str, rng: random.Random, min_chars: int, max_chars: int) -> list[str]:
    """Split `text` into documents of `min_chars`..`max_chars` characters at paragraph (blank line) boundaries.

    Paragraphs longer than `max_chars` are split at line boundaries, lines longer than that hard.
    Each document's target length is drawn from `rng`, so lengths vary but are reproducible.
    A final remainder shorter than `min_chars` is dropped.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > min_chars // 2 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        pieces.append(paragraph)

    docs: list[str] = []
    current: list[str] = []
    length = 0
    target = rng.randint(min_chars, max_chars)
    for piece in pieces:
        if current and length + 2 + len(piece) > max_chars:
            if length >= min_chars:
                docs.append("\n\n".join(current))
            current, length = [], 0
            target = rng.randint(min_chars, max_chars)
        current.append(piece)
        length += len(piece) + (2 if length else 0)
        if length >= target:
            docs.append("\n\n".join(current))
            current, length = [], 0
            target = rng.randint(min_chars, max_chars)
    if current and length >= min_chars:
        docs.append("\n\n".join(current))
    return docs


def _split_by_budget(units: list[list[str]], sizes: CorpusSizes) -> dict[str, list[str]]:
    """Assign whole units (a topic, a file) to test, then validation, then train, until each is full."""
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    budgets = {"test": sizes.heldout_chars, "validation": sizes.heldout_chars, "train": sizes.train_chars}
    order = ["test", "validation", "train"]
    filled = {split: 0 for split in SPLITS}
    for unit in units:
        split = next((s for s in order if filled[s] < budgets[s]), None)
        if split is None:
            break
        out[split].extend(unit)
        filled[split] += sum(len(d) for d in unit)
    return out


def docs_domain(seed: int, sizes: CorpusSizes) -> dict[str, list[str]]:
    """English prose: pydoc topics chunked into documents, documents shuffled, then split by size budget."""
    import pydoc_data.topics

    rng = random.Random(f"docs:{seed}")
    docs: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        docs.extend(chunk_text(normalize_text(pydoc_data.topics.topics[name]), rng,
                               sizes.doc_min_chars, sizes.doc_max_chars))
    rng.shuffle(docs)
    # Scale the budgets down when the installation's topics are smaller than asked (they are ~465k chars).
    total = sum(len(d) for d in docs)
    wanted = sizes.train_chars + 2 * sizes.heldout_chars
    if total < wanted:
        scale = total / wanted
        sizes = CorpusSizes(int(sizes.train_chars * scale), int(sizes.heldout_chars * scale),
                            sizes.doc_min_chars, sizes.doc_max_chars)
    return _split_by_budget([[d] for d in docs], sizes)


def stdlib_source_files() -> list[Path]:
    """Top-level standard library modules (``Lib/*.py``) in sorted order, minus data-like files."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(lib.glob("*.py")) if p.name not in _CODE_EXCLUDE]
    if not files:
        raise RuntimeError(f"no standard library sources found under {lib}; the micro world's 'code' domain "
                           "needs a Python installation that ships its .py files")
    return files


def code_domain(seed: int, sizes: CorpusSizes) -> dict[str, list[str]]:
    """Python source: stdlib files in a seeded order, each split into documents; splits by whole file."""
    rng = random.Random(f"code:{seed}")
    files = stdlib_source_files()
    rng.shuffle(files)
    units = []
    for path in files:
        text = normalize_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) > _CODE_MAX_FILE_CHARS:
            continue
        units.append(chunk_text(text, rng, sizes.doc_min_chars, sizes.doc_max_chars))
    return _split_by_budget(units, sizes)


def arithmetic_split_of(seed: int, a: int, op: str, b: int) -> str:
    """The split a problem belongs to, fixed by a hash: no test or validation problem occurs in train."""
    bucket = zlib.crc32(f"{seed}:{a}{op}{b}".encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _problem(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choice("++--*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(0, 99)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


def worked_addition(a: int, b: int) -> str:
    """Column addition with carries, digit by digit, ending with the full equation."""
    steps = []
    carry = 0
    x, y = a, b
    while x or y or carry:
        dx, dy = x % 10, y % 10
        s = dx + dy + carry
        term = f"{dx} + {dy}" + (f" + {carry}" if carry else "")
        steps.append(f"{term} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
        carry = s // 10
        x, y = x // 10, y // 10
    return f"Work: {a} + {b}: " + "; ".join(steps) + f"; so {a} + {b} = {a + b}"


def worked_multiplication(a: int, b: int) -> str:
    """Single digit `a` times `b`, digit by digit with carries, ending with the full equation."""
    steps = []
    carry = 0
    y = b
    while True:
        dy = y % 10
        p = a * dy + carry
        y //= 10
        term = f"{a} * {dy}" + (f" + {carry}" if carry else "")
        if not y:
            steps.append(f"{term} = {p}, write {p}")
            break
        carry = p // 10
        steps.append(f"{term} = {p}, write {p % 10}" + (f", carry {carry}" if carry else ""))
    return f"Work: {a} * {b}: " + "; ".join(steps) + f"; so {a} * {b} = {a * b}"


def _arithmetic_line(rng: random.Random) -> tuple[tuple[int, str, int], str]:
    """One exercise: a question line (35%), a worked addition (40%) or a worked multiplication (25%).

    Worked lines are mostly deterministic given their operands, so they reward learning the digit
    facts and the procedure: what separates the arithmetic specialist from the other sources.
    """
    kind = rng.random()
    if kind < 0.35:
        a, op, b, c = _problem(rng)
        return (a, op, b), f"Q: {a} {op} {b} = {c}"
    if kind < 0.75:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return (a, "+w", b), worked_addition(a, b)
    a, b = rng.randint(2, 9), rng.randint(10, 999)
    return (a, "*w", b), worked_multiplication(a, b)


def arithmetic_domain(seed: int, sizes: CorpusSizes) -> dict[str, list[str]]:
    """Exercise sheets of "Q: a op b = c" lines and worked problems, each problem in one split only."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        rng = random.Random(f"arithmetic:{seed}:{split}")
        budget = sizes.train_chars if split == "train" else sizes.heldout_chars
        docs: list[str] = []
        total = 0
        while total < budget:
            target = rng.randint(sizes.doc_min_chars, sizes.doc_max_chars)
            lines = [f"Exercise sheet {rng.randint(1, 999)}"]
            length = len(lines[0])
            while length < target:
                (a, op, b), line = _arithmetic_line(rng)
                if arithmetic_split_of(seed, a, op, b) != split:
                    continue
                if length + 1 + len(line) > sizes.doc_max_chars:
                    break
                lines.append(line)
                length += 1 + len(line)
            docs.append("\n".join(lines))
            total += length
        out[split] = docs
    return out


_BUILDERS = {"docs": docs_domain, "code": code_domain, "arithmetic": arithmetic_domain}


def build_corpus(seed: int, sizes: CorpusSizes = CorpusSizes()) -> dict[str, list[dict]]:
    """Rows per split for all `DOMAINS`: ``{"train"|"validation"|"test": [{"doc_id", "domain", "text"}]}``.

    No text occurs twice (duplicates are dropped, the first occurrence in train, validation, test order
    kept). Row order: split, then domain in `DOMAINS` order, then document order; doc_ids count up across
    train, validation and test in that order. Same seed and Python installation -> identical rows.
    """
    per_domain = {domain: _BUILDERS[domain](seed, sizes) for domain in DOMAINS}
    # Some stdlib files repeat each other's code verbatim: a held-out document must not be a training one.
    for splits in per_domain.values():
        seen: set[str] = set()
        for split in SPLITS:
            kept = [t for t in dict.fromkeys(splits[split]) if t not in seen]
            seen.update(kept)
            splits[split] = kept
    rows: dict[str, list[dict]] = {}
    doc_id = 0
    for split in SPLITS:
        rows[split] = []
        for domain in DOMAINS:
            for text in per_domain[domain][split]:
                rows[split].append({"doc_id": doc_id, "domain": domain, "text": text})
                doc_id += 1
    return rows
