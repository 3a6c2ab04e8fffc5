"""How much memory a model may take, checked before loading it, so a model that cannot fit fails with numbers."""

from __future__ import annotations

from pathlib import Path

from tpa_core.errors import TPAError

GIB = 2**30


def available_bytes() -> int | None:
    """Memory available to this process: /proc/meminfo's MemAvailable, lowered to the cgroup's remaining limit
    when one is set; None where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            found.append(max(int(limit) - current, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(need: int, what: str, hint: str) -> None:
    """TPAError if `need` bytes exceed the available memory: `what` names the model and its form, `hint` what
    the user can do instead."""
    available = available_bytes()
    if available is not None and need > available:
        raise TPAError(f"{what} needs {need / GIB:.1f} GiB of memory, and {available / GIB:.1f} GiB is available; "
                       f"{hint}")
