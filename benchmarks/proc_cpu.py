"""CPU seconds per process from /proc (Linux): who used the cores while a benchmark ran."""

from __future__ import annotations

import os
import threading
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


class Watch:
    """Snapshots every ``interval`` s while a benchmark runs, so each process keeps the titles it had.

    Ray renames a worker as it goes (``ray::MapWorker(MapBatches(ScoreActor))`` while it serves a
    stage, something shorter while it shuts down): a snapshot taken only at the end can miss the
    stage. ``used()`` reports every title seen, joined by " | ".
    """

    def __init__(self, interval: float = 2.0) -> None:
        self.interval, self._stop = interval, threading.Event()
        self.first = snapshot()
        self._titles: dict[int, list[str]] = {}
        self._seen(self.first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _seen(self, snap: dict[int, tuple[str, float]]) -> None:
        for pid, (cmd, _) in snap.items():
            titles = self._titles.setdefault(pid, [])
            if cmd not in titles:
                titles.append(cmd)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._seen(snapshot())

    def used(self) -> list[tuple[float, str]]:
        """Stop watching; (CPU seconds, titles) of every process since the start, most first."""
        self._stop.set()
        self._thread.join()
        last = snapshot()
        self._seen(last)
        rows = []
        for pid, (_, t) in last.items():
            t0 = self.first.get(pid, ("", 0.0))[1]
            rows.append((t - (t0 if t >= t0 else 0.0), " | ".join(self._titles.get(pid, []))))  # less: a reused pid
        return sorted((r for r in rows if r[0] > 0), reverse=True)
