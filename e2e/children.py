"""Child processes the harness starts (operator, simulated fleet, agents): stopping one."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_child(proc: subprocess.Popen[Any], grace_s: float = 20.0, kill_wait_s: float = 5.0) -> None:
    """SIGTERM a child still running and wait `grace_s` for it to exit (it cleans up on SIGTERM);
    SIGKILL it after that. Returns once it has exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(kill_wait_s)
