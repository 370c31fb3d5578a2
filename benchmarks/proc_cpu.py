"""CPU seconds per process from /proc (Linux): who used the cores while a benchmark ran."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far); empty where /proc is absent."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may contain spaces
        cmd = cmd or stat[stat.find("(") + 1:stat.rfind(")")]
        out[int(proc.name)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


def used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> list[tuple[float, str]]:
    """(CPU seconds, command line) of every process between two snapshots, most first."""
    rows = []
    for pid, (cmd, t) in after.items():
        old_cmd, t0 = before.get(pid, (cmd, 0.0))
        rows.append((t - (t0 if old_cmd == cmd else 0.0), cmd))  # a reused pid is a new process
    return sorted((r for r in rows if r[0] > 0), reverse=True)
