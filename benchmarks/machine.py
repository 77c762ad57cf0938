"""What the benchmark scripts record about the machine (imported from beside them)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git(*command: str) -> str:
    """A git command's output in the checkout raymix is imported from ('' when there is none)."""
    import raymix

    where = Path(raymix.__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(where), *command], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
