"""
What a busy machine costs the command line, for each way torch's threads can wait.

Runs one CLI command (default: `malmen-hf eval` of 64 CounterFact facts with the released editor) in a fresh process,
once per setting, first on the idle machine and then beside a neighbour that keeps every core busy with a torch
matrix-product loop (`--neighbour-threads`, default: all cores). The settings:

- `spin`: torch imported before the CLI starts, so the CLI leaves OpenMP's defaults alone (its threads spin while they
  wait, then sleep);
- `passive`: `OMP_WAIT_POLICY=PASSIVE` (threads sleep at once);
- `one-thread`: `OMP_NUM_THREADS=1`;
- `cli`: the CLI as users run it: it measures how many cores other processes keep busy and sets
  `OMP_WAIT_POLICY=PASSIVE` when that is at least half a core (`malmen_hf.cli.wait_passively_when_busy`).

Wall time counts everything the user waits for (start, model load, tokenization, scoring). One unrecorded run warms
the file cache first; each setting then runs `--repeats` times per condition, interleaved with the others, and the
median is reported. Run it on an otherwise idle machine: the idle rows assume nothing else runs. It prints a table
and writes JSON (default `benchmarks/results/contention.json`).

    python benchmarks/contention.py
    python benchmarks/contention.py --settings cli passive --num-facts 32 --repeats 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import REPO_ROOT, command_line, machine_info

SETTINGS = {
    "spin": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "cli": {},
}
NEIGHBOUR = """import torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).tanh()
"""


def cli_command(setting: str, cli_args: list[str]) -> list[str]:
    """The command of one run: `spin` imports torch first, so that the CLI leaves the wait policy alone."""
    preamble = "import torch; " if setting == "spin" else ""
    code = f"{preamble}import sys; from malmen_hf.cli import main; sys.argv[0] = 'malmen-hf'; main()"
    return [sys.executable, "-c", code, *cli_args]


def timed_run(setting: str, cli_args: list[str]) -> dict:
    """Runs the command once with the setting's environment; its wall time and whether the CLI chose PASSIVE."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OMP_")}
    environ.update(SETTINGS[setting])
    start = time.perf_counter()
    result = subprocess.run(cli_command(setting, cli_args), env=environ, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{result.stderr[-2000:]}")
    return {"seconds": round(seconds, 1), "cli_chose_passive": "wait passively" in result.stderr}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--num-facts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting and condition (the median is shown)")
    parser.add_argument("--neighbour-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "contention.json")
    args = parser.parse_args(argv)
    cli_args = ["eval", "--editor", "malmen-smollm2-135m-counterfact", "--num-facts", str(args.num_facts)]
    cli_args += ["--scores", "ES", "GS", "LS", "--json"]
    timed_run("cli", cli_args)  # warms the file cache: the model's weights, the editor, the data
    runs = {setting: {"idle": [], "busy": []} for setting in args.settings}
    for _ in range(args.repeats):
        for setting in args.settings:
            runs[setting]["idle"].append(timed_run(setting, cli_args))
    neighbour_code = NEIGHBOUR.format(threads=args.neighbour_threads)
    neighbour = subprocess.Popen([sys.executable, "-c", neighbour_code])
    try:
        time.sleep(5)  # torch imported and the loop running before the first measurement
        for _ in range(args.repeats):
            for setting in args.settings:
                runs[setting]["busy"].append(timed_run(setting, cli_args))
    finally:
        neighbour.kill()
        neighbour.wait()
    rows = {
        setting: {
            condition: {
                "median_seconds": round(statistics.median(run["seconds"] for run in measured), 1),
                "seconds": [run["seconds"] for run in measured],
                "cli_chose_passive": [run["cli_chose_passive"] for run in measured],
            }
            for condition, measured in conditions.items()
        }
        for setting, conditions in runs.items()
    }
    neighbour_column = f"beside a {args.neighbour_threads}-thread neighbour (s)"
    print(f"| setting | idle (s) | {neighbour_column} | CLI chose PASSIVE (idle / busy runs) |")
    print("|---|---|---|---|")
    for setting, row in rows.items():
        chose = " / ".join(f"{sum(row[c]['cli_chose_passive'])} of {args.repeats}" for c in ("idle", "busy"))
        chose = chose if setting == "cli" else ""
        print(f"| {setting} | {row['idle']['median_seconds']} | {row['busy']['median_seconds']} | {chose} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command_line(__file__, argv),
        "cli_command": "malmen-hf " + " ".join(cli_args),
        "machine": machine_info(torch.device("cpu")),
        "neighbour_threads": args.neighbour_threads,
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
