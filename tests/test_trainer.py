import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, GradientState

from malmen_hf import MalmenEditorModel
from malmen_hf.training import trainer
from malmen_hf.training.trainer import MalmenTrainingArguments, train_editor
from tests import tiny
from tests.test_training import REQUESTS

TRAIN = [request for _ in range(4) for request in REQUESTS]  # 20 facts


def reset_accelerate():
    """accelerate keeps process-wide singletons: each run (and each forked process) starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def run(output_dir, **overrides):
    """A short training run of an editor for the tiny GPT-2, built afresh (same weights every time)."""
    reset_accelerate()
    torch.set_num_threads(1)
    tokenizer = tiny.gpt2_tokenizer()
    model = tiny.gpt2_model(len(tokenizer))
    editor = MalmenEditorModel.for_model(model, rank=8, lr_init=0.5)
    settings = dict(facts_per_step=4, batch_size=2, editor_batch_size=3, max_steps=4, eval_every=2, eval_facts=5,
                    checkpoint_every=1, meta_lr=1e-3, progress=False)  # fmt: skip
    args = MalmenTrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})
    return train_editor(editor, model, tokenizer, TRAIN, args, eval_requests=REQUESTS)


def assert_same_editor(first, second):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_saves_a_loadable_editor_with_its_settings(tmp_path):
    editor = run(tmp_path)
    reloaded = MalmenEditorModel.from_pretrained(tmp_path)
    assert_same_editor(reloaded.state_dict(), editor.state_dict())
    training_record = reloaded.config.training
    assert training_record["steps"] == 4 and training_record["facts_per_step"] == 4
    assert set(training_record["last_validation"]) >= {"ES", "GS", "LS"}
    history = json.loads((tmp_path / "training_history.json").read_text())
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    # the editor kept is the first with the best mean of ES, GS and LS, and the record says which step's it is
    validations = [record for record in history if "ES" in record]
    best = max(validations, key=lambda record: (record["ES"] + record["GS"] + record["LS"]) / 3)
    assert training_record["best_step"] == best["step"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    # the normalizer learned the statistics of the keys and value gradients
    assert reloaded.nets["128x32"].normalizer.count > 0
    # the card records the settings and the last validation (5 held-out facts edited at once)
    card = (tmp_path / "README.md").read_text()
    assert "| N | ES | GS | LS |" in card and "\n| 5 | " in card and "| facts_per_step | `4` |" in card
    # TensorBoard is installed with the dev extras: "auto" logs there
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_bf16_mixed_precision(tmp_path):
    editor = run(tmp_path, mixed_precision="bf16", log_with=None)
    history = json.loads((tmp_path / "training_history.json").read_text())
    assert all(math.isfinite(record["loss"]) for record in history)
    assert all(torch.isfinite(tensor).all() for tensor in editor.state_dict().values())
    assert not (tmp_path / "logs").exists()


def test_two_processes_train_the_same_editor_as_one(tmp_path):
    single = run(tmp_path / "one").state_dict()
    reset_accelerate()
    debug_launcher(run, args=(tmp_path / "two",), num_processes=2)
    double = MalmenEditorModel.from_pretrained(tmp_path / "two")
    assert double.config.training["num_processes"] == 2  # not two runs of one process each
    assert_same_editor(double.state_dict(), single)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    uninterrupted = run(tmp_path / "whole").state_dict()

    real_meta_gradient = trainer.meta_gradient
    calls = []

    def killed_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed (simulated)")
        return real_meta_gradient(*args, **kwargs)

    monkeypatch.setattr("malmen_hf.training.trainer.meta_gradient", killed_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr("malmen_hf.training.trainer.meta_gradient", real_meta_gradient)
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=True).state_dict()
    assert_same_editor(resumed, uninterrupted)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_a_resumed_run_trains_with_the_learning_rate_given_now(tmp_path, monkeypatch):
    run(tmp_path, max_steps=2)
    learning_rates = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        learning_rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    run(tmp_path, max_steps=4, meta_lr=3e-4, resume_from_checkpoint=True)
    assert learning_rates == [3e-4, 3e-4]  # not the checkpoint's 1e-3


class PlantedCode:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoints_hold_no_pickles_and_resume_runs_no_code(tmp_path):
    run(tmp_path / "run", max_steps=2, log_with=None)
    for checkpoint in (tmp_path / "run" / "checkpoints").iterdir():
        names = sorted(path.name for path in checkpoint.iterdir())
        assert names == ["editor.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    # A crafted folder in accelerate's custom-state format: loading it with pickle would run the planted code.
    crafted = tmp_path / "crafted" / "checkpoints" / "step_00000009"
    crafted.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    for index in range(3):
        torch.save(PlantedCode(marker), crafted / f"custom_checkpoint_{index}.pkl")
    with pytest.raises(ValueError, match=r"holds pickles \(custom_checkpoint_0.pkl.*which can run code"):
        run(tmp_path / "crafted", resume_from_checkpoint=str(crafted))
    with pytest.raises(FileNotFoundError, match="none is complete"):
        run(tmp_path / "crafted", resume_from_checkpoint=True)
    assert not marker.exists()


def partial_checkpoint(output_dir, step):
    """What a save killed half-way left with accelerate's save_state: a later step folder with some of its files."""
    complete = sorted((output_dir / "checkpoints").iterdir())[-1]
    partial = output_dir / "checkpoints" / f"step_{step:08d}"
    partial.mkdir()
    for name in sorted(path.name for path in complete.iterdir())[:2]:
        shutil.copy(complete / name, partial / name)
    return partial


def test_resume_skips_a_partial_checkpoint_and_refuses_one_named(tmp_path):
    uninterrupted = run(tmp_path / "whole").state_dict()
    run(tmp_path / "resumed", max_steps=2)
    partial = partial_checkpoint(tmp_path / "resumed", 3)
    with pytest.raises(ValueError, match="is not a complete malmen-hf checkpoint.*interrupted while saving"):
        run(tmp_path / "resumed", resume_from_checkpoint=str(partial))
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000002")  # the newest complete one is step 1 now
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=True).state_dict()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_a_damaged_checkpoint_is_refused(tmp_path):
    run(tmp_path, max_steps=1, log_with=None)
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    data = (checkpoint / "optimizer.safetensors").read_bytes()
    (checkpoint / "optimizer.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="optimizer.safetensors is missing, truncated or modified"):
        run(tmp_path, resume_from_checkpoint=True)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("facts_per_step", 0, "`facts_per_step` must be a positive integer"),
        ("mixed_precision", "fp16", "must be 'no' or 'bf16'"),
        ("meta_lr", float("nan"), "`meta_lr` must be a non-negative number"),
        ("max_time_s", 0, "`max_time_s` must be a positive number of seconds"),
    ],
)
def test_bad_arguments(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        MalmenTrainingArguments(output_dir=str(tmp_path), **{option: value})


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        run(tmp_path, resume_from_checkpoint=True)


def test_command_line_training(tmp_path, capsys):
    from malmen_hf.cli import main

    train_from_command_line(tmp_path, main, "--max-steps", "2")
    assert "Saved the editor" in capsys.readouterr().out
    editor = MalmenEditorModel.from_pretrained(tmp_path / "editor")
    assert editor.config.training["num_train_facts"] == 15
    assert editor.config.base_model_name_or_path == str(tmp_path / "model")


def test_command_line_resume_from_a_partial_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from malmen_hf.cli import main

    train_from_command_line(tmp_path, main, "--max-steps", "1", "--checkpoint-every", "1")
    partial = partial_checkpoint(tmp_path / "editor", 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_from_command_line(tmp_path, main, "--max-steps", "3", "--resume-from-checkpoint", str(partial))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.endswith("\n") and error.splitlines()[-1].startswith("malmen-hf train: error: ")
    assert "not a complete malmen-hf checkpoint" in error.splitlines()[-1]


def train_from_command_line(tmp_path, main, *options):
    tokenizer = tiny.gpt2_tokenizer()
    tiny.gpt2_model(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = [json.dumps({"prompt": r.prompt, "target": r.target, "rephrases": list(r.rephrases)}) for r in TRAIN]
    (tmp_path / "facts.jsonl").write_text("\n".join(lines))
    main([
        "train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "facts.jsonl"), "--rank", "4",
        "--output-dir", str(tmp_path / "editor"), "--facts-per-step", "4", "--eval-fraction", "0.25",
        "--eval-facts", "5", "--lr-init", "0.1", "--no-progress", *options,
    ])  # fmt: skip


def test_a_time_budget_stops_after_a_complete_step_that_resumes(tmp_path):
    run(tmp_path, max_time_s=1e-9)  # used up by the first step
    history = json.loads((tmp_path / "training_history.json").read_text())
    assert [record["step"] for record in history] == [1] and "ES" in history[0]  # validated at the stop
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    editor = run(tmp_path, resume_from_checkpoint=True)
    assert editor.config.training["steps"] == 4
    assert [record["step"] for record in json.loads((tmp_path / "training_history.json").read_text())] == [1, 2, 3, 4]
