"""Local lm-eval tasks of the micro world: per domain one multiple_choice and one generate_until task.

Items come from the test split only (held-out material). Data are jsonl files; each task is an ordinary
lm-eval YAML with ``dataset_path: json`` and an absolute ``data_files`` path, grouped as ``micro``, so
``lm_eval --model hf --model_args pretrained=<folder> --include_path <tasks_dir> --tasks micro`` runs them.

The micro sources are tiny (3 layers, 96 wide): they know their domain's spelling, punctuation and digit
facts, not its meaning. Tasks that need meaning (the final word of a sentence among words of the same
document, the next code line among lines of other files, the sum of two numbers) put every source at chance
(0.16-0.29 over 100 items, world version 2). So each multiple-choice item asks which of four versions of
a held-out line is intact; the three distractors each carry one error that only knowledge of the domain
exposes, and all four versions are scored after the same context:

- docs: two adjacent words of prose run together ("the replacement" -> "thereplacement").
- code: one punctuation character replaced by another ("f(x):" -> "f(x]:"), the syntax a code model knows.
- arithmetic: one digit fact of a worked problem off by 1 or 2 ("7 + 5 + 1 = 13" -> "= 14"), digits
  alike in count.

The generation tasks complete what the same knowledge predicts, scored by exact match:

- docs: the last 2 letters of a word of at least 6 letters ("replaceme" -> "nt").
- code: the closing punctuation that ends a line ("    if hasattr(self, '_devnull'" -> "):").
- arithmetic: the first digit fact of a worked problem ("Work: 279 + 51: 9 + 1 =" -> "10").
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from fusion.publish import publish_file

GROUP = "micro"
TASK_KINDS = ("mc", "gen")
_WORD = re.compile(r"\b[a-z]{4,}\b")
_CLOSING = re.compile(r"(?<=[\w'\"])[)\]}:,]+$")   # a code line's final closing run, after a name or string
_PUNCTUATION = "()[]{}:.,=+-*'\""
_WORKED_LINE = re.compile(r"^Work: .*$", re.MULTILINE)
_DIGIT_FACT = re.compile(r"(?<== )(\d+)(?=, write)")   # the sum or product of a step, before ", write"
_FIRST_FACT = re.compile(r"^(Work: \d+ [+*] \d+: \d+ [+*] \d+ =) (\d+),")
_CONTEXT_CHARS = 200          # preceding text of an item, cut at a line start
_LINE_CHARS = (40, 140)       # length of the line whose versions are the choices (stripped)
_SUFFIX_CHARS = 2             # characters a completion item asks for


def task_names(domains: list[str]) -> list[str]:
    """Leaf task names, in order: ``micro_<domain>_mc``, ``micro_<domain>_gen`` per domain."""
    return [f"{GROUP}_{domain}_{kind}" for domain in domains for kind in TASK_KINDS]


def _lines_with_context(text: str, prose: bool = False) -> list[tuple[str, str]]:
    """(context, line) pairs of `text`: each line of `_LINE_CHARS` characters (stripped) that has a previous
    line, with up to `_CONTEXT_CHARS` characters of the text before it, starting at a line start
    (at least 20 characters; the context ends with the newline before the line). With `prose`, indented
    lines (code examples in the docs) are skipped."""
    pairs = []
    offset = 0
    for i, line in enumerate(text.split("\n")):
        start, offset = offset, offset + len(line) + 1
        if i == 0 or not _LINE_CHARS[0] <= len(line.strip()) <= _LINE_CHARS[1]:
            continue
        cut = max(0, start - _CONTEXT_CHARS)
        if cut > 0:
            newline = text.find("\n", cut, start)
            cut = newline + 1 if newline >= 0 else start
        if start - cut >= 20 and not (prose and line.startswith(" ")):
            pairs.append((text[cut:start], line))
    return pairs


def _run_together(line: str, rng: random.Random) -> str | None:
    """`line` with one word of >= 4 letters joined to the next word (the space between them removed)."""
    joins = [m.end() for m in _WORD.finditer(line) if line[m.end(): m.end() + 1] == " "
             and line[m.end() + 1: m.end() + 2].isalpha()]
    if not joins:
        return None
    at = rng.choice(joins)
    return line[:at] + line[at + 1:]


def _wrong_punctuation(line: str, rng: random.Random) -> str | None:
    """`line` with one of its punctuation characters replaced by another one of `_PUNCTUATION`."""
    where = [i for i, c in enumerate(line) if c in _PUNCTUATION]
    if not where:
        return None
    i = rng.choice(where)
    return line[:i] + rng.choice([c for c in _PUNCTUATION if c != line[i]]) + line[i + 1:]


def _wrong_digit_fact(line: str, rng: random.Random) -> str | None:
    """`line` (a worked problem) with one step's result off by 1 or 2, keeping its number of digits."""
    facts = list(_DIGIT_FACT.finditer(line))
    if not facts:
        return None
    fact = rng.choice(facts)
    wrong = str(int(fact[1]) + rng.choice((-2, -1, 1, 2)))
    if wrong.startswith("-") or len(wrong) != len(fact[1]):
        return None
    return line[:fact.start()] + wrong + line[fact.end():]


def _intact_line_items(rows: list[dict], rng: random.Random, corrupt, lines=None) -> list[dict]:
    """Items "which of four versions of the line is intact": the line and three distinct corruptions."""
    items = []
    for row in rows:
        for context, line in (lines(row["text"]) if lines else _lines_with_context(row["text"])):
            wrong: list[str] = []
            for _ in range(30):
                candidate = corrupt(line, rng)
                if candidate is not None and candidate != line and candidate not in wrong:
                    wrong.append(candidate)
                if len(wrong) == 3:
                    break
            if len(wrong) < 3:
                continue
            choices = [line] + wrong
            rng.shuffle(choices)
            items.append({"doc_id": row["doc_id"], "context": context, "choices": choices,
                          "gold": choices.index(line)})
    return items


def _completion_items(rows: list[dict], pattern: re.Pattern, suffix: int, prose: bool = False) -> list[dict]:
    """Items "finish the word": context = up to `_CONTEXT_CHARS` characters (from a line start) ending with a
    match of `pattern` less its last `suffix` characters; answer = those characters. With `prose`, none on
    indented lines (code examples in the docs)."""
    items = []
    for row in rows:
        text = row["text"]
        for m in pattern.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            if prose and text[line_start: line_start + 1] == " ":
                continue
            cut = max(0, m.start() - _CONTEXT_CHARS)
            if cut > 0:
                newline = text.find("\n", cut, m.start())
                cut = newline + 1 if newline >= 0 else line_start
            if m.start() - cut < 20:
                continue
            items.append({"doc_id": row["doc_id"], "context": text[cut: m.end() - suffix],
                          "answer": m[0][-suffix:]})
    return items


def _docs_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    return (_intact_line_items(rows, rng, _run_together, lambda text: _lines_with_context(text, prose=True)),
            _completion_items(rows, re.compile(r"(?<![A-Za-z_])[a-z]{6,}\b"), _SUFFIX_CHARS, prose=True))


def _closing_items(rows: list[dict]) -> list[dict]:
    """Items "close the line": a code line cut before its final run of closing punctuation (`_CLOSING`,
    e.g. ")", "))" or "):"), after up to `_CONTEXT_CHARS` characters of the text before it; answer = that run."""
    items = []
    for row in rows:
        for context, line in _lines_with_context(row["text"]):
            m = _CLOSING.search(line)
            if m and not line.lstrip().startswith("#"):
                items.append({"doc_id": row["doc_id"], "context": context + line[:m.start()], "answer": m[0]})
    return items


def _code_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    return _intact_line_items(rows, rng, _wrong_punctuation), _closing_items(rows)


def _arithmetic_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    def worked_lines(text: str) -> list[tuple[str, str]]:
        pairs = []
        for m in _WORKED_LINE.finditer(text):
            cut = max(0, m.start() - _CONTEXT_CHARS)
            if cut > 0:
                newline = text.find("\n", cut, m.start())
                cut = newline + 1 if newline >= 0 else m.start()
            pairs.append((text[cut: m.start()], m[0]))
        return pairs

    gen = []
    for row in rows:
        for m in _WORKED_LINE.finditer(row["text"]):
            first = _FIRST_FACT.match(m[0])
            if first:
                gen.append({"doc_id": row["doc_id"], "context": first[1], "answer": first[2]})
    return _intact_line_items(rows, rng, _wrong_digit_fact, worked_lines), gen


_ITEM_BUILDERS = {"arithmetic": _arithmetic_items, "docs": _docs_items, "code": _code_items}


def task_yamls(tasks_dir: Path, domains: list[str]) -> dict[str, str]:
    """File name -> YAML text of every task and the ``micro`` group, data paths absolute under `tasks_dir`."""
    out = {}
    for domain in domains:
        mc_name, gen_name = task_names([domain])
        common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "context"}
        mc = {"task": mc_name, **common,
              "dataset_kwargs": {"data_files": {"test": str(tasks_dir / "data" / f"{mc_name}.jsonl")}},
              "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
              # choices are whole lines that follow a newline-terminated context
              "target_delimiter": "",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 2.0}}
        # Answers are a number, the end of a word, closing punctuation: a few tokens each.
        until = {"arithmetic": [","], "docs": [" ", ".", ",", ";", ":", ")", "\n"],
                 "code": ["\n"]}[domain]
        max_gen_toks = 8
        gen = {"task": gen_name, **common,
               "dataset_kwargs": {"data_files": {"test": str(tasks_dir / "data" / f"{gen_name}.jsonl")}},
               "output_type": "generate_until", "doc_to_target": "answer",
               "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False},
               "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                            {"function": "take_first"}]}],
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
               "metadata": {"version": 2.0}}
        out[f"{mc_name}.yaml"] = yaml.safe_dump(mc, sort_keys=False)
        out[f"{gen_name}.yaml"] = yaml.safe_dump(gen, sort_keys=False)
    group = {"group": GROUP, "task": task_names(domains), "metadata": {"version": 1.0}}
    out[f"_{GROUP}.yaml"] = yaml.safe_dump(group, sort_keys=False)
    return out


def write_task_yamls(tasks_dir: Path, domains: list[str], write_dir: Path | None = None) -> bool:
    """Write the YAML files (data paths under `tasks_dir`) into `write_dir` (default `tasks_dir`).

    Files whose content is already right are left alone; others are replaced atomically. Returns True
    when something was rewritten (e.g. the world was moved to another folder).
    """
    write_dir = Path(write_dir or tasks_dir)
    changed = False
    for name, text in task_yamls(Path(tasks_dir), domains).items():
        path = write_dir / name
        if path.is_file() and path.read_text() == text:
            continue
        with publish_file(path, fsync=False) as tmp:
            tmp.write_text(text)
        changed = True
    return changed


def build_tasks(test_rows: list[dict], domains: list[str], seed: int, max_items: int, tasks_dir: Path,
                write_dir: Path) -> dict[str, int]:
    """Generate every task's items from `test_rows` into ``write_dir/data`` and the YAMLs into `write_dir`.

    YAML data paths point at `tasks_dir` (the final location; `write_dir` is where the build writes,
    which is renamed to `tasks_dir` afterwards). At most `max_items` items per task, chosen with a
    seeded RNG and kept in document order. Returns task name -> number of items.
    """
    (write_dir / "data").mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain in domains:
        rows = [r for r in test_rows if r["domain"] == domain]
        rng = random.Random(f"tasks:{seed}:{domain}")
        mc, gen = _ITEM_BUILDERS[domain](rows, rng)
        for name, items in zip(task_names([domain]), (mc, gen)):
            if not items:
                raise RuntimeError(f"micro task data: no {name!r} items could be made from {len(rows)} test "
                                   "documents; the corpus sizes are too small")
            keep = sorted(rng.sample(range(len(items)), min(max_items, len(items))))
            with open(write_dir / "data" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for n, k in enumerate(keep):
                    fh.write(json.dumps({"id": n, **items[k]}, sort_keys=True) + "\n")
            counts[name] = len(keep)
    write_task_yamls(tasks_dir, domains, write_dir)
    return counts
