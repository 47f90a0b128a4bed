"""Record benchmark figures in benchmarks/results.json (names from ../shared/BENCHMARKS.md) and render RESULTS.md.

Several benchmarks may write at once: updates take an exclusive lock on the JSON file.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}"


def record(name: str, value: float, unit: str, target: str, command: str, **extra) -> dict:
    """Merge one figure into results.json under `name`; `extra` keys (e.g. repeats, details) are kept too."""
    entry = {"value": value, "unit": unit, "target": target, "command": command, "machine": machine(),
             "date": datetime.date.today().isoformat(), **extra}
    RESULTS_JSON.touch(exist_ok=True)
    with open(RESULTS_JSON, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read()
        data = json.loads(text) if text.strip() else {}
        data[name] = entry
        fh.seek(0)
        fh.truncate()
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    print(f"{name} = {value} {unit} (target {target})")
    return entry
