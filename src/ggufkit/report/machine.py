"""The machine a report runs on (its facts, recorded beside the numbers) and the thread and engine choices
the measuring steps run with."""

from __future__ import annotations

import math
import os
import platform

from .measure import ReportError


def machine_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    from ..engine.numerics import cpu_count

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "ram_total_bytes": total,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "load_average_1min": round(load, 2) if load is not None else None,
    }


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    """The cores not already busy (by the 1-minute load average), at least one. llama.cpp's threads spin at
    their barriers, so running as many threads as cores on a machine that is busy elsewhere is many times
    slower than running fewer; on an idle machine this is all the cores."""
    from ..engine.numerics import cpu_count

    cores = cpu_count()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return max(1, min(cores, cores - math.floor(busy + 0.5)))


def resolve_engine(engine: str) -> str:
    from ..evaluation import ENGINES

    if engine == "auto":
        return "llama.cpp" if llama_cpp_available() else "builtin"
    if engine not in ENGINES:
        raise ReportError(f"unknown engine {engine!r} (known: auto, {', '.join(ENGINES)})")
    return engine
