"""How much memory this host can give a stage (shared by the fine-tune's check and the export's GPTQ correlations).

``available_bytes``: ``EDGETUNE_MEMORY_LIMIT`` when set, else the free memory, or the cgroup v2 limit when that is
tighter (a container). Stdlib + psutil, no torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BadInput


def parse_bytes(text: str) -> int:
    """'8GiB', '512M', '2.5G' or a plain number of bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise BadInput(f"EDGETUNE_MEMORY_LIMIT={text!r} is not a size", hint="use bytes or a size like 8GiB or 512M")
    return int(float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2).upper() or " "))))


def available_bytes() -> tuple[int, str]:
    """Memory a stage may use here, and where the figure comes from."""
    env = os.environ.get("EDGETUNE_MEMORY_LIMIT")
    if env:
        return parse_bytes(env), "EDGETUNE_MEMORY_LIMIT"
    import psutil

    avail, source = psutil.virtual_memory().available, "available memory"
    try:  # a container's cgroup v2 limit, when it is tighter than what the host has free
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and int(limit) - used < avail:
            avail, source = int(limit) - used, "the cgroup memory limit"
    except (OSError, ValueError):
        pass
    return avail, source
