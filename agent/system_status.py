"""A one-paragraph picture of the machine and the agent, for emergency reports and emergency.log."""

from __future__ import annotations

import os

import psutil


def describe_system() -> str:
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        memory = psutil.virtual_memory()
        lines = [
            f"CPU {psutil.cpu_percent(interval=None):.0f}% of {psutil.cpu_count()} cores, "
            f"load {load}",
            f"memory {memory.percent:.0f}% used, {memory.available // 2**20} MiB available",
        ]
        me = psutil.Process()
        parent = me.parent()
        family = [parent, *parent.children()] if parent is not None else [me]
        for process in family:
            try:
                with process.oneshot():
                    lines.append(
                        f"pid {process.pid} {' '.join(process.cmdline()[-2:])}: "
                        f"cpu {process.cpu_percent(interval=None):.0f}%, "
                        f"rss {process.memory_info().rss // 2**20} MiB"
                    )
            except psutil.Error:
                continue
        return "\n".join(lines)
    except (OSError, psutil.Error) as exc:
        return f"system status unavailable: {exc}"
