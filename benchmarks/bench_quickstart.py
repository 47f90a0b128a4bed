"""quickstart_seconds: README's first command (the micro quickstart) with the micro world already cached.

    python benchmarks/bench_quickstart.py [--repeats 3]

Each repeat runs `fuselab run studies/micro_quickstart.yaml` in a fresh work dir (empty stage cache, fresh
MLflow store) with the micro world shared, as a user's second experiment would; median of the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import record

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    world_cache = Path(os.environ.get("FUSELAB_WORLD_CACHE", REPO / ".fuselab" / "bench-worlds"))
    env = {**os.environ, "FUSELAB_WORLD_CACHE": str(world_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    fuselab = [sys.executable, "-m", "harness.cli"]
    sys.path.insert(0, str(REPO))
    from harness.micro import build_micro_world
    from harness.pipeline import world_stage_key

    build_micro_world(world_cache / world_stage_key(0).key, seed=0, progress=False)  # cached world: not timed
    times = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as wd:
            t0 = time.perf_counter()
            subprocess.run([*fuselab, "run", "studies/micro_quickstart.yaml", f"workdir={wd}", "--quiet"],
                           check=True, env=env, cwd=REPO)
            times.append(time.perf_counter() - t0)
            print(f"repeat {i}: {times[-1]:.1f} s", flush=True)
    record("quickstart_seconds", round(statistics.median(times), 1), "s", "<= 600",
           "python benchmarks/bench_quickstart.py --repeats 3", repeats=[round(t, 1) for t in times],
           note="micro world cached, fresh stage cache and MLflow store per repeat")


if __name__ == "__main__":
    main()
