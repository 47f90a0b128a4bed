"""Local lm-eval tasks of the micro world: per domain one multiple_choice and one generate_until task.

Items come from the test split only (held-out material). Data are jsonl files; each task is an ordinary
lm-eval YAML with ``dataset_path: json`` and an absolute ``data_files`` path, grouped as ``micro``, so
``lm_eval --model hf --model_args pretrained=<folder> --include_path <tasks_dir> --tasks micro`` runs them.

- arithmetic: "Q: 17 + 25 =" -> choices ["42", "43", "32", "52"] / generate "42" (exact match).
- docs: a held-out sentence up to its final word -> choices [that word, 3 other words of the document]
  / generate the final word.
- code: up to 8 preceding lines (at most 400 characters) of held-out source -> choices [the next line,
  3 lines of other files re-indented alike] / generate the next line (exact match, whitespace stripped).
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import yaml

GROUP = "micro"
TASK_KINDS = ("mc", "gen")
_ARITHMETIC_LINE = re.compile(r"^Q: (\d+) ([+\-*]) (\d+) = (\d+)$", re.MULTILINE)
# The final word of a sentence: " <lowercase word>." followed by whitespace or the end of the document.
_SENTENCE_END = re.compile(r"(?<= )([a-z]{3,})\.(?=\s|$)")
_CODE_CONTEXT_LINES = 8
_CODE_CONTEXT_CHARS = 400


def task_names(domains: list[str]) -> list[str]:
    """Leaf task names, in order: ``micro_<domain>_mc``, ``micro_<domain>_gen`` per domain."""
    return [f"{GROUP}_{domain}_{kind}" for domain in domains for kind in TASK_KINDS]


def _arithmetic_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    seen = set()
    problems = []
    for row in rows:
        for m in _ARITHMETIC_LINE.finditer(row["text"]):
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                problems.append((row["doc_id"], a, op, b, c))
    mc, gen = [], []
    for doc_id, a, op, b, c in problems:
        context = f"Q: {a} {op} {b} ="
        near = [c + d for d in (1, -1, 2, -2, 10, -10) if c + d >= 0]
        choices = [str(c)] + [str(x) for x in rng.sample(near, 3)]
        rng.shuffle(choices)
        mc.append({"doc_id": doc_id, "context": context, "choices": choices, "gold": choices.index(str(c))})
        gen.append({"doc_id": doc_id, "context": context, "answer": str(c)})
    return mc, gen


def _docs_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    mc, gen = [], []
    for row in rows:
        text = row["text"]
        words = sorted(set(re.findall(r"\b[a-z]{3,}\b", text)))
        for m in _SENTENCE_END.finditer(text):
            gold = m[1]
            line_start = text.rfind("\n", 0, m.start()) + 1
            if text[line_start: line_start + 1] == " ":  # an indented code example, not prose
                continue
            # Up to ~300 characters of preceding text, starting at a line start.
            start = max(0, m.start() - 300)
            if start > 0:
                start = text.find("\n", start, m.start()) + 1 or line_start
            context = text[start: m.start() - 1]
            distractors = [w for w in words if w != gold]
            if len(distractors) < 3 or len(context) < 20:
                continue
            choices = [gold] + rng.sample(distractors, 3)
            rng.shuffle(choices)
            mc.append({"doc_id": row["doc_id"], "context": context, "choices": choices, "gold": choices.index(gold)})
            gen.append({"doc_id": row["doc_id"], "context": context, "answer": gold})
    return mc, gen


def _code_items(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    candidates = []  # (doc index, line index)
    doc_lines = [row["text"].split("\n") for row in rows]
    for d, lines in enumerate(doc_lines):
        for i in range(3, len(lines)):
            stripped = lines[i].strip()
            if len(stripped) >= 8 and not stripped.startswith("#") and lines[i - 1].strip():
                candidates.append((d, i))
    mc, gen = [], []
    for d, i in candidates:
        lines = doc_lines[d]
        gold = lines[i]
        indent = gold[: len(gold) - len(gold.lstrip())]
        context_lines = lines[max(0, i - _CODE_CONTEXT_LINES): i]
        # Keep contexts well inside the sources' 256-token window.
        while len(context_lines) > 1 and sum(len(x) + 1 for x in context_lines) > _CODE_CONTEXT_CHARS:
            context_lines = context_lines[1:]
        context = "\n".join(context_lines) + "\n"
        others = []
        while len(others) < 3:
            od, oi = candidates[rng.randrange(len(candidates))]
            line = indent + doc_lines[od][oi].strip()
            if od != d and line != gold and line not in others:
                others.append(line)
        choices = [gold] + others
        rng.shuffle(choices)
        mc.append({"doc_id": rows[d]["doc_id"], "context": context, "choices": choices, "gold": choices.index(gold)})
        gen.append({"doc_id": rows[d]["doc_id"], "context": context, "answer": gold.strip()})
    return mc, gen


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
              # code choices are whole lines that follow a newline-terminated context
              "target_delimiter": "" if domain == "code" else " ",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}}
        until = {"arithmetic": ["\n"], "docs": [".", ",", "\n"], "code": ["\n"]}[domain]
        # Answers are a number, a word, a line: short limits keep generation cheap on CPU.
        max_gen_toks = {"arithmetic": 8, "docs": 16, "code": 48}[domain]
        gen = {"task": gen_name, **common,
               "dataset_kwargs": {"data_files": {"test": str(tasks_dir / "data" / f"{gen_name}.jsonl")}},
               "output_type": "generate_until", "doc_to_target": "answer",
               "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False},
               "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                            {"function": "take_first"}]}],
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
               "metadata": {"version": 1.0}}
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
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
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
        if not mc:
            raise RuntimeError(f"micro task data: no {domain!r} items could be made from {len(rows)} test documents; "
                               "the corpus sizes are too small")
        keep = sorted(rng.sample(range(len(mc)), min(max_items, len(mc))))
        for name, items in zip(task_names([domain]), (mc, gen)):
            with open(write_dir / "data" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for n, k in enumerate(keep):
                    fh.write(json.dumps({"id": n, **items[k]}, sort_keys=True) + "\n")
            counts[name] = len(keep)
    write_task_yamls(tasks_dir, domains, write_dir)
    return counts
