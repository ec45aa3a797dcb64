"""Saves never replace a user's file, and saves of several processes into one folder take turns."""

import multiprocessing
import traceback

import pytest

from malmen_hf import MalmenEditorModel, load_edits
from malmen_hf.cli import main
from tests import tiny
from tests.conftest import FACTS


def hidden_leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_saving_onto_an_existing_file_is_refused_and_leaves_it(gpt2, tmp_path, capsys):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    handle = editor.apply_edits(model, FACTS[:2], tokenizer=tokenizer)
    users_file = tmp_path / "notes.txt"
    users_file.write_text("mine")
    for save in (editor.save_pretrained, handle.save):
        with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a folder: saving there would replace"):
            save(users_file)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    editor.save_pretrained(tmp_path / "editor")
    with pytest.raises(SystemExit) as exit_info:
        main([
            "edit", "--model", str(tmp_path / "model"), "--editor", str(tmp_path / "editor"),
            "--fact", "The capital of France is", "Berlin", "--save-edits", str(users_file),
        ])  # fmt: skip
    assert exit_info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err.splitlines()[-1]
    assert users_file.read_text() == "mine" and hidden_leftovers(tmp_path) == []


def _save_repeatedly(kind: str, folder: str, times: int, errors) -> None:
    try:
        tokenizer = tiny.gpt2_tokenizer()
        model = tiny.gpt2_model(len(tokenizer))
        editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
        handle = editor.apply_edits(model, FACTS[:2], tokenizer=tokenizer) if kind == "edits" else None
        for _ in range(times):
            editor.save_pretrained(folder) if kind == "editor" else handle.save(folder)
    except BaseException:
        errors.put(traceback.format_exc())


@pytest.mark.parametrize("kind", ["editor", "edits"])
def test_processes_saving_into_one_folder_each_succeed_and_leave_it_complete(tmp_path, kind):
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    folder = tmp_path / "shared"
    workers = [context.Process(target=_save_repeatedly, args=(kind, str(folder), 6, errors)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    failures = [errors.get() for _ in range(errors.qsize())]
    assert failures == [] and all(worker.exitcode == 0 for worker in workers)
    if kind == "editor":
        MalmenEditorModel.from_pretrained(folder)
    else:
        tokenizer = tiny.gpt2_tokenizer()
        load_edits(tiny.gpt2_model(len(tokenizer)), folder)
    assert hidden_leftovers(tmp_path) == []
