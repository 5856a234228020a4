"""Instructions counted by ``valgrind --tool=callgrind``: what a busy machine does not blur.

A measured process starts under callgrind with instrumentation off (``--instr-atstart=no``) and
switches it on and off around the part it measures (``instrument``); the parent reads the total of
the output file (``total_instructions``). Instructions are repeatable for the same code and inputs
whatever else the two cores are doing, where CPU seconds are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def instrument(switch: str, pid: int | None = None) -> None:
    """Instrumentation ``on`` or ``off`` in a process that runs under callgrind (by default this one)."""
    target = os.getpid() if pid is None else pid
    subprocess.run(["callgrind_control", "-i", switch, str(target)], check=True, capture_output=True)


def wrapper(out: Path) -> list[str]:
    """The command prefix that runs a program under callgrind, instrumentation off at start."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def total_instructions(callgrind_out: Path) -> int:
    for line in callgrind_out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{callgrind_out}: no totals line")


def run_module(module: str, args: list[str], out: Path) -> str:
    """``python -m module args`` under callgrind, instrumentation off at start; its stdout."""
    command = [*wrapper(out), sys.executable, "-m", module, *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout
