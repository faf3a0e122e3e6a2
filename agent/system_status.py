"""A short picture of the machine and the agent, for emergency reports and emergency.log.

psutil is imported on first use: only an emergency needs it, and the processes that may have one
(collector, monitor) need not carry it (~1 MiB of RSS each) until then.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

CPU_SAMPLE = 0.1  # seconds; a first cpu_percent(None) in a fresh process always says 0


def describe_system(disk_path: str | None = None) -> str:
    """CPU, load, memory, (disk), and completiond's own processes: one fact a line.

    Never raises: a psutil failure becomes a line that says so.
    """
    import psutil

    lines: list[str] = []
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(
            f"CPU {psutil.cpu_percent(interval=CPU_SAMPLE):.0f}% of {psutil.cpu_count()} cores, "
            f"load {load}"
        )
        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        lines.append(
            f"memory {memory.percent:.0f}% used, {memory.available // 2**20} MiB available; "
            f"swap {swap.percent:.0f}% used"
        )
        if disk_path:
            disk = psutil.disk_usage(disk_path)
            lines.append(f"disk {disk.percent:.0f}% used, {disk.free // 2**20} MiB free")
    except (OSError, psutil.Error) as exc:
        lines.append(f"system status unavailable: {exc}")
    lines.extend(_agent_processes())
    return "\n".join(lines)


def _agent_processes() -> list[str]:
    """completiond (the parent) and its children, or this process alone outside an agent."""
    import psutil

    try:
        me = psutil.Process()
        parent = me.parent()
        if parent is not None and _role(parent) == "completiond":
            family = [parent, *parent.children()]
        else:
            family = [me]
    except psutil.Error as exc:
        return [f"agent processes unavailable: {exc}"]
    lines = []
    now = time.time()
    for process in family:
        try:
            with process.oneshot():
                cpu = process.cpu_times()
                lines.append(
                    f"pid {process.pid} {_role(process)}: {process.status()}, "
                    f"up {now - process.create_time():.0f} s, "
                    f"cpu {cpu.user + cpu.system:.1f} s, "
                    f"rss {process.memory_info().rss // 2**20} MiB, "
                    f"threads {process.num_threads()}"
                )
        except psutil.Error:
            continue
    return lines


def _role(process: psutil.Process) -> str:
    import psutil

    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return "?"
    if "agent.child" in cmdline:
        index = cmdline.index("agent.child")
        return cmdline[index + 1] if index + 1 < len(cmdline) else "child"
    if ("agent" in cmdline and "-m" in cmdline) or any(a.endswith("completiond") for a in cmdline):
        return "completiond"
    return " ".join(cmdline[-2:]) or process.name()
