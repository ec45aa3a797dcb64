"""
The `malmen-hf` command line: the parser of the subcommands (`malmen_hf.commands`, one module each) and `main`.

This module and the commands import only the standard library and malmen-hf's light modules: each command imports
torch and transformers (seconds) when it runs, after checking its paths, names and facts, so that `--help` and bad
input answer at once.
"""

import argparse
import os
import sys
import time

from .commands import COMMANDS
from .commands.common import status

BUSY_CORES = 0.5  # cores kept busy by other processes from which torch's threads should wait passively


def build_parser() -> argparse.ArgumentParser:
    """The parser of `malmen-hf` and its subcommands; the parsed arguments' `run` carries out the command."""
    parser = argparse.ArgumentParser(prog="malmen-hf", description="MALMEN model editing for transformers models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs `malmen-hf` with `argv` (default: the process's arguments); bad input exits with status 2 and one line."""
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if "torch" not in sys.modules and wait_passively_when_busy():
        status(
            "Other programs keep a CPU core busy, so torch's threads wait passively instead of spinning (faster "
            "beside a busy neighbour); set OMP_WAIT_POLICY=ACTIVE or PASSIVE yourself to choose."
        )
    try:
        args.run(args)
    except Exception as error:
        # huggingface_hub's strict dataclasses (MalmenConfig) raise their own errors, not ValueError.
        if not isinstance(error, (ValueError, OSError)) and not type(error).__name__.startswith("StrictDataclass"):
            raise
        print(f"malmen-hf {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


def busy_cores(interval: float = 0.25) -> float | None:
    """
    How many cores were busy over the next `interval` seconds, from the kernel's counters (`/proc/stat`).

    Measured while this process sleeps, so it counts other processes only. `None` where there is no `/proc/stat`.
    """
    try:
        first = _cpu_times()
        time.sleep(interval)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = [after - before for before, after in zip(first, second, strict=True)]
    total = sum(elapsed)
    if total <= 0:
        return None
    idle = elapsed[3] + elapsed[4]  # idle and iowait
    return (total - idle) / total * (os.cpu_count() or 1)


def _cpu_times() -> list[int]:
    """The first eight fields of /proc/stat's `cpu` line: user, nice, system, idle, iowait, irq, softirq, steal."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def wait_passively_when_busy(environ: dict | None = None, busy: float | None = None) -> bool:
    """
    Sets `OMP_WAIT_POLICY=PASSIVE` when other processes keep at least `BUSY_CORES` cores busy, unless it is set.

    torch's OpenMP threads spin while they wait for each other; beside a busy neighbour the spinning takes the core
    that the awaited thread needs (`benchmarks/contention.py` measures it), while on an idle machine spinning is the
    faster choice, so the CLI decides at each start. OpenMP reads the policy once, when torch loads it: this must run
    before torch is imported. Returns whether it set the policy.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return False
    busy = busy_cores() if busy is None else busy
    if busy is None or busy < BUSY_CORES:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


if __name__ == "__main__":
    main()
