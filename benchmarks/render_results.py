"""Render benchmarks/RESULTS.md from benchmarks/results.json (run after any benchmark).

    python benchmarks/render_results.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "micro_world_build_seconds", "quickstart_seconds", "align_offsets_vs_dtw_speedup", "align_dtw_vs_python_speedup",
    "mined_map_seconds_32k_50k", "cache_bytes_per_token_k10", "fusion_step_vs_clm_ratio",
    "fusion_peak_mem_vs_dense_ratio", "extraction_flops_utilisation", "train_flops_utilisation",
    "ensemble_eval_time_ratio", "eval_overhead_vs_lm_eval_ratio",
]


def _fmt(v) -> str:
    if v is None:  # figures needing hardware this machine lacks (GPU): recorded, never estimated
        return "not measured"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def render() -> str:
    data = json.loads((HERE / "results.json").read_text())
    names = [n for n in ORDER if n in data] + sorted(n for n in data if n not in ORDER)
    lines = [
        "# Benchmark results",
        "",
        "Generated from `benchmarks/results.json` by `python benchmarks/render_results.py`. Ratios are measured side",
        "by side in one run; times are medians of at least 3 repeats. These machines are shared and noisy: the",
        "Machines line below says where the figures were taken. Names follow `../shared/BENCHMARKS.md`.",
        "",
        "| name | value | unit | target | date | command |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        e = data[n]
        lines.append(f"| {n} | {_fmt(e['value'])} | {e.get('unit', '')} | {e.get('target', '')} | {e.get('date', '')} "
                     f"| `{e.get('command', '')}` |")
    machines = sorted({data[n].get("machine", "") for n in names})
    lines += ["", "Machines: " + "; ".join(m for m in machines if m), "", "## Details", ""]
    for n in names:
        extra = {k: v for k, v in data[n].items() if k not in ("value", "unit", "target", "command", "machine", "date")}
        if extra:
            lines.append(f"- **{n}**: " + ", ".join(f"{k} = {_fmt(v) if not isinstance(v, (list, dict)) else json.dumps(v)}"
                                                    for k, v in extra.items()))
    notes = HERE / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (HERE / "RESULTS.md").write_text(render())
    print((HERE / "RESULTS.md").read_text())
