"""Subprocess entry point that trains one micro-world source: ``python -m harness.micro.worker <job.json>``.

A separate interpreter per source (rather than multiprocessing) keeps user scripts without a
``__main__`` guard safe and lets each source run single-threaded, which makes its weights reproducible.
The job file holds ``{"spec", "seed", "train_sizes", "corpus_dir", "out_dir", "result_path", "parent_pid",
"progress"}``; the result (see `sources.train_source`) is written to ``result_path`` as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from fusion.publish import publish_file


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the building process dies (e.g. SIGKILL), so no orphan keeps writing into its temp dir."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except OSError:
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    _die_with_parent(job["parent_pid"])
    from .sources import SourceSpec, TrainSizes, train_source

    result = train_source(SourceSpec(**job["spec"]), job["seed"], TrainSizes(**job["train_sizes"]),
                          Path(job["corpus_dir"]), Path(job["out_dir"]), progress=job["progress"])
    with publish_file(Path(job["result_path"]), fsync=False) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
