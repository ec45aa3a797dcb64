"""
Saves killed (SIGKILL) at random points: an editor's `save_pretrained`, an edit artifact's `handle.save` and a training
checkpoint. Afterwards the folder holds either the previous complete state or the new complete state, and it loads
(or training resumes from it).

Each save runs in a forked child that kills itself at its N-th Python or C function call (`sys.setprofile`), for
random N between the first call and the last of a whole save: points inside file writes, between them, and around
the final rename.
"""

import copy
import os
import random
import shutil
import signal
import sys
import threading
import time

import pytest
import torch
from tqdm import std as tqdm_std

from malmen_hf import MalmenEditorModel, load_edits
from malmen_hf.training.checkpoints import checkpoint_folder, complete_checkpoints, load_checkpoint, save_checkpoint
from tests.conftest import FACTS, snapshot
from tests.test_modeling import trained_looking_editor
from tests.test_trainer import fresh_accelerate, run  # noqa: F401 (fresh_accelerate: the fixture, used below)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
KILLS = 6


def count_calls(save) -> int:
    """How many function calls one whole `save` makes."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += 1

    sys.setprofile(profile)
    try:
        save()
    finally:
        sys.setprofile(None)
    return calls


def killed_at(call_number: int, save) -> bool:
    """Runs `save` in a forked child that kills itself at its `call_number`-th function call; whether it did."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            _use_a_private_tqdm_lock()
            calls = 0

            def profile(frame, event, arg):
                nonlocal calls
                calls += 1
                if calls == call_number:
                    os.kill(os.getpid(), signal.SIGKILL)

            sys.setprofile(profile)
            save()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while (result := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the saving child hung")
        time.sleep(0.005)
    return os.WIFSIGNALED(result[1])


def _use_a_private_tqdm_lock() -> None:
    """
    tqdm's write lock holds a multiprocessing lock, which a forked child shares with its parent: a child killed while
    holding it (a progress bar is being created) would leave every later progress bar of the test session waiting
    forever. The child takes a lock of its own.
    """
    lock = threading.RLock()
    classes, pending = set(), [tqdm_std.tqdm]
    while pending:
        cls = pending.pop()
        classes.add(cls)
        pending.extend(cls.__subclasses__())
    for cls in classes:
        cls._lock = lock  # what `tqdm.set_lock` sets, on each class that may already hold the shared one


def calls_in_a_child(save) -> int:
    """How many function calls one whole `save` makes in a forked child, where the kills happen (a save there can
    make a few calls fewer than in the parent, which has taken the slow path of some first calls already)."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _use_a_private_tqdm_lock()
            os.write(writing, str(count_calls(save)).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        count = int(pipe.read())
    os.waitpid(pid, 0)
    return count


def kill_points(save, seed, prepare=lambda: None) -> list[int]:
    """Where to kill `save` (run after `prepare`, as the test will): calls sampled from those it makes in a child."""
    prepare()
    save()  # the first save imports and caches what later ones reuse
    prepare()
    total = calls_in_a_child(save)
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, total), KILLS - 1)) + [total - 1]


def states_equal(first, second) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_a_killed_editor_save_leaves_the_old_or_the_new_editor(tmp_path):
    folder = tmp_path / "editor"
    old, new = trained_looking_editor(), trained_looking_editor(aggregation="sum")
    with torch.no_grad():
        for tensor in new.state_dict().values():
            tensor.add_(1)
    outcomes, kills = set(), 0
    for point in kill_points(lambda: new.save_pretrained(tmp_path / "scratch"), seed=0):
        old.save_pretrained(folder)
        kills += killed_at(point, lambda: new.save_pretrained(folder))
        loaded = MalmenEditorModel.from_pretrained(folder)  # complete, or this raises
        state = loaded.state_dict()
        outcome = "old" if states_equal(state, old.state_dict()) else "new"
        assert states_equal(state, (old if outcome == "old" else new).state_dict())
        assert loaded.config.aggregation == (old if outcome == "old" else new).config.aggregation
        outcomes.add(outcome)
    assert kills >= KILLS - 1 and "old" in outcomes


def test_a_killed_edit_save_leaves_the_old_or_the_new_artifact(gpt2, tmp_path):
    model, tokenizer = gpt2
    fresh = copy.deepcopy(model)
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    old = editor.apply_edits(model, FACTS[:2], tokenizer=tokenizer)
    old_weights = snapshot(model)
    old.save(tmp_path / "old")
    old.revert()
    new = editor.apply_edits(model, FACTS[2:4], tokenizer=tokenizer)
    new_weights = snapshot(model)
    folder, kills = tmp_path / "edit", 0
    save_old = lambda: load_edits(copy.deepcopy(fresh), tmp_path / "old").save(folder)  # noqa: E731
    for point in kill_points(lambda: new.save(folder), seed=1, prepare=save_old):
        save_old()
        kills += killed_at(point, lambda: new.save(folder))
        target = copy.deepcopy(fresh)
        handle = load_edits(target, folder)  # complete and untampered, or this raises
        assert states_equal(snapshot(target), old_weights) or states_equal(snapshot(target), new_weights)
        assert [fact.prompt for fact in handle.facts] in ([p for p, _ in FACTS[:2]], [p for p, _ in FACTS[2:4]])
    assert kills >= KILLS - 1


def test_a_killed_checkpoint_save_leaves_a_complete_checkpoint_to_resume_from(tmp_path):
    output_dir = tmp_path / "run"
    run(output_dir, max_steps=1, log_with=None)
    checkpoints = output_dir / "checkpoints"
    editor = MalmenEditorModel.from_pretrained(output_dir)
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-3)
    state = load_checkpoint(checkpoint_folder(checkpoints, 1), editor, optimizer)
    state["step"] = 2
    save = lambda folder: save_checkpoint(folder, editor, optimizer, state)  # noqa: E731
    kills, second = 0, checkpoint_folder(checkpoints, 2)
    for point in kill_points(lambda: save(tmp_path / "scratch" / "step_00000002"), seed=2):
        shutil.rmtree(second, ignore_errors=True)  # the old state: step 1 only
        kills += killed_at(point, lambda: save(second))
        # Old (no step-2 folder at all) or new (a complete one that loads): never a partial folder at its name.
        # (A killed save may leave its hidden temporary folder, which the next save removes.)
        visible = sorted(path.name for path in checkpoints.iterdir() if not path.name.startswith("."))
        assert visible in (["step_00000001"], ["step_00000001", "step_00000002"])
        assert not second.exists() or complete_checkpoints(checkpoints)[-1] == second
        if second.exists():
            load_checkpoint(second, copy.deepcopy(editor), torch.optim.Adam(editor.parameters(), lr=1e-3))
    assert kills >= KILLS - 1
    resumed = run(output_dir, max_steps=3, log_with=None, resume_from_checkpoint=True)
    assert resumed.config.training["steps"] == 3
