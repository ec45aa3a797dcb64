"""
The checks a lent GPU machine runs in one call of the device tool (see benchmarks/gpu/README.md, "Device check").

    python benchmarks/device_check.py prepare     # here, once (needs PyPI): fills .gpu/device-check (about 20 MB)
    make device-check                             # there: python3 benchmarks/device_check.py run

`run` does three steps, each in its own process, and writes what they found to `--output-dir` (default `$OUT`, the
folder the device tool brings back, else `benchmarks/results/gpu`):

1. tests: the test suite's device-dependent tests on the device (`pytest -m cuda`: apply, bit-exact revert in float32,
   bfloat16 and float16, batch-size invariance, the meta-gradient against autograd, a model split by a `device_map`);
2. edit speed: `benchmarks/edit_speed.py` on a model of GPT-J-6B's shape with random bfloat16 weights and the carried
   SmolLM2 tokenizer's vocabulary, for N = 1,024, 4,096 and 16,384 CounterFact facts (one `apply_edits` call each;
   the facts of train.json, then of edit.json, since 16,384 is more than either has),
   against one no-grad forward over the same tokens, with peak GPU memory;
3. `device_check.json`: the versions, each step's exit status, counts and wall time, and the speed results
   (`log.txt` has the steps' output).

The device has torch 2.11 and transformers 5.17; this project needs transformers >= 5.23, so `run` first installs the
carried wheels (`--carried`, made by `prepare`: the versions installed here) into a folder that it puts first on the
children's `PYTHONPATH`. `--device cpu --model-size tiny --n 8 16 --no-wheels` runs the same steps on the CPU in
seconds (tests/test_device_check.py).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CARRIED = REPO_ROOT / ".gpu" / "device-check"
DEFAULT_DATA = [REPO_ROOT.parent / "shared" / "data" / "counterfact" / name for name in ("train.json", "edit.json")]
# The packages the device lacks or has too old (KINDS.md lists what it has: torch, accelerate, tokenizers,
# safetensors, huggingface-hub, pandas, pyarrow, ...; regex, which transformers checks at import, in an unknown
# version). `prepare` fetches the versions installed here.
WHEELS = ["transformers", "regex", "datasets", "dill", "multiprocess", "evaluate"]
TESTS_LIMIT_S = 200  # of the 420 s budget: the rest is the speed step's
DEVICE_TESTS = [
    "tests/test_apply_edits.py",
    "tests/test_caching.py",
    "tests/test_training.py",
    "tests/test_device_map.py",
]
VERSIONS_SCRIPT = """
import json, torch, transformers, accelerate
print(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "transformers_from": transformers.__file__,
    "accelerate": accelerate.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
}))
"""
# GPT-J-6B's architecture (EleutherAI/gpt-j-6b's config.json); the vocabulary is the carried tokenizer's.
MODEL_CONFIGS = {
    "gptj-6b": {
        "model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "n_positions": 2048,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    },
    "tiny": {
        "model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 256,
        "tie_word_embeddings": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="fill the carried folder (here, with PyPI)")
    prepare.add_argument("--carried", type=Path, default=DEFAULT_CARRIED)
    prepare.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA, help="CounterFact JSON files")
    prepare.add_argument("--tokenizer", default="smollm2-135m", help="short name or folder of the tokenizer to carry")

    run = commands.add_parser("run", help="run the checks (on the device)")
    run.add_argument("--carried", type=Path, default=DEFAULT_CARRIED)
    run.add_argument(
        "--output-dir", type=Path, default=Path(os.environ.get("OUT") or REPO_ROOT / "benchmarks/results/gpu")
    )
    run.add_argument("--device", default="cuda")
    run.add_argument("--model-size", choices=sorted(MODEL_CONFIGS), default="gptj-6b")
    run.add_argument("--dtype", default="bfloat16")
    run.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384], help="numbers of facts")
    run.add_argument("--batch-size", type=int, default=64, help="facts per base-model batch")
    run.add_argument("--tests-marker", default="cuda", help="pytest -m expression of the tests to run")
    run.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all steps together")
    run.add_argument(
        "--no-wheels", action="store_true", help="use the installed packages, not the carried (Python 3.12) wheels"
    )
    run.add_argument("--skip", nargs="*", choices=["tests", "speed"], default=[], help="steps to leave out")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    """Wheels of the installed versions, the tokenizer's files and the facts' prompts and targets, in `--carried`."""
    from transformers import AutoTokenizer

    from malmen_hf.offline_models import resolve_model

    shutil.rmtree(args.carried, ignore_errors=True)
    wheels = args.carried / "wheels"
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
         "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels), *pins],
        check=True,
    )  # fmt: skip
    AutoTokenizer.from_pretrained(resolve_model(args.tokenizer)).save_pretrained(args.carried / "tokenizer")
    records = []
    for path in args.data:
        with open(path) as file:
            records += [{key: record[key] for key in ("prompt", "target_new")} for record in json.load(file)]
    (args.carried / "counterfact.json").write_text(json.dumps(records))
    size = sum(path.stat().st_size for path in args.carried.rglob("*") if path.is_file())
    print(f"{args.carried}: {', '.join(pins)}; the tokenizer; {len(records)} facts; {size / 2**20:.1f} MiB")


class Runner:
    """Runs the steps' processes with the carried packages first on their path, logging their output."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        args.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(args.output_dir / "log.txt", "w")  # noqa: SIM115 (closed by close())
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._scratch = tempfile.TemporaryDirectory(prefix="malmen-device-check-")
        self.scratch = Path(self._scratch.name)

    def install_wheels(self) -> None:
        wheels = [] if self.args.no_wheels else sorted((self.args.carried / "wheels").glob("*.whl"))
        if not wheels:
            self.write(f"no wheels in {self.args.carried / 'wheels'}: using the installed packages\n")
            return
        site = self.scratch / "site"
        self.call(
            "install",
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--target", str(site), *map(str, wheels)],
            check=True,
        )  # fmt: skip
        self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])

    def call(self, name: str, command: list[str], check: bool = False, limit_s: float = float("inf")) -> dict:
        """
        Runs `command` for at most `limit_s` and what is left of the budget; returns its exit status, wall time and
        the tail of its output.
        """
        self.write(f"\n=== {name}: {shlex.join(command)}\n")
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # Killed when the budget runs out, so that the steps after it and device_check.json still come back.
        deadline = min(self.deadline, start + limit_s)
        watchdog = threading.Timer(max(1.0, deadline - start), process.kill)
        watchdog.start()
        tail: list[str] = []
        for line in process.stdout:
            self.write(line)
            tail = [*tail[-39:], line]
        returncode = process.wait()
        watchdog.cancel()
        result = {"returncode": returncode, "wall_s": round(time.monotonic() - start, 1), "tail": "".join(tail)}
        if time.monotonic() >= deadline:
            result["timed_out"] = True
        if check and returncode != 0:
            raise SystemExit(f"{name} failed with exit status {returncode}")
        return result

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.log.write(text)
        self.log.flush()

    def close(self) -> None:
        self.log.close()
        self._scratch.cleanup()


def run_tests(runner: Runner) -> dict:
    report = runner.args.output_dir / "tests.xml"
    result = runner.call(
        "tests",
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", runner.args.tests_marker,
         f"--junitxml={report}", *DEVICE_TESTS],
        limit_s=TESTS_LIMIT_S,
    )  # fmt: skip
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
        report.unlink()  # the counts and the tail say what matters; the tool brings back at most 8 files
    return result


def run_speed(runner: Runner) -> dict:
    args = runner.args
    config_dir = runner.scratch / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(MODEL_CONFIGS[args.model_size]))
    output = args.output_dir / "edit_speed.json"
    result = runner.call(
        "edit speed",
        [sys.executable, "benchmarks/edit_speed.py", "--model", str(config_dir), "--random-weights", "--tokenizer",
         str(args.carried / "tokenizer"), "--data", str(args.carried / "counterfact.json"), "--dtype", args.dtype,
         "--device", args.device, "--batch-size", str(args.batch_size), "--floors", "forward", "--output",
         str(output), "--n", *map(str, args.n)],
    )  # fmt: skip
    if output.is_file():
        speed = json.loads(output.read_text())
        result.update(machine=speed["machine"], settings=speed["settings"], results=speed["results"])
    return result


def run(args: argparse.Namespace) -> dict:
    runner = Runner(args)
    start = time.monotonic()
    summary: dict = {"command": shlex.join(["python", "benchmarks/device_check.py", *sys.argv[1:]]), "steps": {}}
    finished = False
    try:
        runner.install_wheels()
        versions = runner.call("versions", [sys.executable, "-c", VERSIONS_SCRIPT], check=True)
        summary["versions"] = json.loads(versions["tail"].strip().splitlines()[-1])
        for name, step in (("tests", run_tests), ("speed", run_speed)):
            if name not in args.skip:
                summary["steps"][name] = step(runner)
        finished = True
    finally:
        summary["wall_s"] = round(time.monotonic() - start, 1)
        summary["ok"] = finished and all(step["returncode"] == 0 for step in summary["steps"].values())
        (args.output_dir / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        runner.write(f"\nwrote {args.output_dir / 'device_check.json'}: ok={summary['ok']} in {summary['wall_s']} s\n")
        runner.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        prepare(args)
        return 0
    missing = [name for name in ("tokenizer", "counterfact.json") if not (args.carried / name).exists()]
    if "speed" not in args.skip and missing:
        raise SystemExit(f"{args.carried} has no {' or '.join(missing)}: run `device_check.py prepare` here first")
    return 0 if run(args)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
