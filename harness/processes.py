"""Process liveness (the stage-cache locks, the micro-world build lock, the sandbox supervisor) and free ports (the
MLflow server of `fuselab ui`, distributed launchers)."""
from __future__ import annotations

import os
import socket


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it), for a server or a distributed launcher."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
