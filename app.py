"""
The browser demo of malmen-hf: write facts into SmolLM2-135M with the editor released for it, see its answers before
and after, undo the edit, and download it.

```bash
pip install "malmen-hf[app]"   # in a clone: pip install -e ".[app]"
python app.py                  # then open http://127.0.0.1:7860
```

The same file runs as a Hugging Face Space (see `space/README.md`).
"""

import argparse
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from malmen_hf import EditRequest, load_edit_requests, revert_edits
from malmen_hf.demo import (
    DEFAULT_MODEL,
    DEMO_SCORES,
    HAND_WRITTEN_FACTS,
    EditComparison,
    edit_and_compare,
    load_editable_model,
)
from malmen_hf.evaluation.metrics import greedy_answers
from malmen_hf.shipped import COUNTERFACT_EVAL, DEFAULT_EDITOR

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_SHOWN = 50  # facts whose answers are shown: greedy decoding of every fact of a large edit would take longer
KEPT_ARTIFACTS = 8  # saved edits kept for download (the page's copy is in Gradio's cache, cleared after an hour)
ARTIFACT_NAME = "malmen-edits"
FACT_COLUMNS = ["prompt", "subject", "new target", "from"]
ANSWER_COLUMNS = ["prompt", "new target", "answer before", "answer after", "answer after revert"]
SCORE_COLUMNS = ["score (over all edited facts)", "before", "after"]
YOURS = "you"

Fact = tuple[str, EditRequest]  # (where it comes from: `YOURS` or "CounterFact #i", the fact)


class EditingDemo:
    """
    The model, its editor and its edits behind the page: what the page's buttons call.

    The model is loaded on first use (an edit, or `model_and_tokenizer()`), not when the page is built. Every edit is
    made on the original model: an edit still applied, from this page or another visitor's, is reverted first.

    Args:
        model_name_or_path (`str`, defaults to `"smollm2-135m"`): the base model (see `load_editable_model`).
        editor_name_or_path (`str`, defaults to the editor released for SmolLM2-135M): its editor.
        counterfact (`str` or `os.PathLike`, defaults to the held-out CounterFact sample shipped with malmen-hf): the
            CounterFact records offered on the page.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        editor_name_or_path: str = DEFAULT_EDITOR,
        counterfact: str | Path = COUNTERFACT_EVAL,
    ):
        self.model_name_or_path = model_name_or_path
        self.editor_name_or_path = editor_name_or_path
        self.counterfact = load_edit_requests(counterfact, "counterfact")
        self._loaded = None
        # One edit or revert at a time: they change the weights that every visitor's requests read.
        self._lock = threading.RLock()
        self._artifacts = tempfile.TemporaryDirectory(prefix="malmen-hf-app-")

    def model_and_tokenizer(
        self, status: Callable[[str], None] = lambda message: None
    ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
        """The model, with its editor attached, and its tokenizer, loaded on the first call."""
        with self._lock:
            if self._loaded is None:
                self._loaded = load_editable_model(self.model_name_or_path, self.editor_name_or_path, status=status)
            return self._loaded

    def counterfact_choices(self) -> list[tuple[str, int]]:
        """The dropdown's entries: `"prompt → new target (was: ground truth)"`, valued by record index."""
        return [
            (f"{request.prompt} → {request.target} (was: {request.ground_truth})", index)
            for index, request in enumerate(self.counterfact)
        ]

    def add_fact(self, facts: list[Fact], prompt: str, subject: str, target: str) -> tuple:
        """Adds a fact typed on the page; returns the facts, their table and the emptied text boxes."""
        prompt, subject, target = (" ".join((text or "").split()) for text in (prompt, subject, target))
        if not prompt or not target:
            raise refusal("Write a prompt and its new target, e.g. “The capital of Japan is” and “Madrid”.")
        if subject and subject not in prompt:
            raise refusal(f"The subject must be written as it appears in the prompt: “{subject}” is not in it.")
        if any(request.prompt == prompt for _, request in facts):
            raise refusal(f"“{prompt}” is already in the list: remove it first (Clear) to give it another target.")
        facts = [*facts, (YOURS, EditRequest(prompt, target, subject=subject or None))]
        return facts, fact_rows(facts), "", "", ""

    def add_counterfact(self, facts: list[Fact], picked: list[int] | None, count: float | None) -> tuple:
        """
        Adds the CounterFact records picked in the dropdown and then the first `count` ones not in the list yet;
        returns the facts, their table and the emptied dropdown.
        """
        if not picked and not count:
            raise refusal("Pick CounterFact facts in the list, or say how many of the first ones to add.")
        listed = {request.prompt for _, request in facts}
        added = [index for index in picked or [] if self.counterfact[index].prompt not in listed]
        listed |= {self.counterfact[index].prompt for index in added}
        others = [index for index, request in enumerate(self.counterfact) if request.prompt not in listed]
        added += others[: max(0, int(count or 0))]
        facts = [*facts, *((f"CounterFact #{index}", self.counterfact[index]) for index in added)]
        return facts, fact_rows(facts), []

    def apply(self, facts: list[Fact], progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (Gradio's way)
        """
        Edits the model with all `facts` in one `apply_edits` call and saves the edit for download; returns the
        status line, the answers, the scores, the file and the edit (the page's state).
        """
        if not facts:
            raise refusal("Add at least one fact first: write one, or pick CounterFact facts.")

        def status(message: str) -> None:
            progress(None, desc=message)

        requests = [request for _, request in facts]
        with self._lock:
            model, tokenizer = self.model_and_tokenizer(status)
            revert_edits(model)  # each edit starts from the original model
            try:
                edit = edit_and_compare(model, tokenizer, requests, requests[:MAX_SHOWN], status=status)
            except ValueError as error:  # bad facts for this editor: the weights are as they were
                raise refusal(f"The edit was refused: {error}") from None
            artifact = self._save(edit)
        handle = edit.handle
        summary = (
            f"Edited {handle.num_facts} facts ({handle.num_tokens} target tokens) in one call, {edit.seconds:.2f} s, "
            f"{len(handle.modules)} layers. Answers of the first {min(len(requests), MAX_SHOWN)} facts:"
        )
        download = gr.DownloadButton(value=artifact, visible=True)
        return summary, answer_rows(edit.answers), score_rows(edit), download, edit

    def revert(self, edit: EditComparison | None) -> tuple:
        """Reverts the page's edit; returns the status line, the answers with those after the revert, and the state."""
        if edit is None:
            raise refusal("There is no edit to revert: apply one first.")
        with self._lock:
            if not edit.handle.applied:
                raise refusal("This edit is no longer applied: it was reverted, or replaced by a newer edit.")
            edit.handle.revert()
            model, tokenizer = self.model_and_tokenizer()
            restored = greedy_answers(model, tokenizer, [row["prompt"] for row in edit.answers])
        same = restored == [row["before"] for row in edit.answers]
        summary = "Reverted: every edited weight is back, bit for bit" + (
            "; every answer is the one from before the edit." if same else ", BUT SOME ANSWERS DIFFER FROM BEFORE."
        )
        return summary, answer_rows(edit.answers, restored), edit

    def _save(self, edit: EditComparison) -> str:
        """The edit saved with `handle.save` and zipped (one folder, `malmen-edits/`); older files are removed."""
        folder = Path(tempfile.mkdtemp(dir=self._artifacts.name))
        edit.handle.save(folder / ARTIFACT_NAME)
        archive = shutil.make_archive(str(folder / ARTIFACT_NAME), "zip", folder, ARTIFACT_NAME)
        shutil.rmtree(folder / ARTIFACT_NAME)
        # The page serves its own copy: only the newest few are kept here, so that disk use stays bounded.
        older = sorted(Path(self._artifacts.name).iterdir(), key=lambda path: path.stat().st_mtime)[:-KEPT_ARTIFACTS]
        for path in older:
            shutil.rmtree(path, ignore_errors=True)
        return archive

    def build(self) -> gr.Blocks:
        """The page (a `gr.Blocks`); `.launch()` serves it."""
        initial = [(YOURS, EditRequest(prompt, target)) for prompt, target in HAND_WRITTEN_FACTS]
        with gr.Blocks(title="malmen-hf: edit facts in a language model", delete_cache=(3600, 3600)) as page:
            gr.Markdown(intro(self.model_name_or_path, self.editor_name_or_path))
            facts = gr.State(initial)
            edit = gr.State(None)
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", placeholder="The Eiffel Tower is located in", elem_id="prompt")
                subject = gr.Textbox(label="Subject (optional)", placeholder="The Eiffel Tower", elem_id="subject")
                target = gr.Textbox(label="New target", placeholder="Rome", elem_id="target")
            add = gr.Button("Add fact")
            with gr.Row():
                picked = gr.Dropdown(
                    self.counterfact_choices(), multiselect=True, label="CounterFact facts", elem_id="picked"
                )
                count = gr.Number(0, label="and the first N others", minimum=0, maximum=len(self.counterfact))
            add_counterfact = gr.Button("Add CounterFact facts")
            table = gr.Dataframe(fact_rows(initial), headers=FACT_COLUMNS, label="Facts to edit", elem_id="facts")
            with gr.Row():
                apply = gr.Button("Apply edits", variant="primary")
                clear = gr.Button("Clear the facts")
            summary = gr.Markdown(elem_id="summary")
            answers = gr.Dataframe(
                headers=ANSWER_COLUMNS,
                label="Greedy answers",
                wrap=True,
                column_widths=["28%", "12%", "20%", "20%", "20%"],
                max_height=800,
                elem_id="answers",
            )
            scores = gr.Dataframe(headers=SCORE_COLUMNS, label="Scores", elem_id="scores")
            gr.Markdown(SCORES_NOTE)
            with gr.Row():
                revert = gr.Button("Revert the edit")
                download = gr.DownloadButton("Download the edit", visible=False)

            add.click(self.add_fact, [facts, prompt, subject, target], [facts, table, prompt, subject, target])
            add_counterfact.click(self.add_counterfact, [facts, picked, count], [facts, table, picked])
            clear.click(lambda: ([], fact_rows([])), None, [facts, table])
            apply.click(self.apply, facts, [summary, answers, scores, download, edit])
            revert.click(self.revert, edit, [summary, answers, edit])
        return page


def refusal(message: str) -> gr.Error:
    """What the page shows for input it cannot use: the message, without a traceback on the console."""
    return gr.Error(message, print_exception=False)


def fact_rows(facts: list[Fact]) -> list[list[str]]:
    return [[request.prompt, request.subject or "", request.target, source] for source, request in facts]


def answer_rows(answers: list[dict[str, str]], restored: list[str] | None = None) -> list[list[str]]:
    restored = restored or [""] * len(answers)
    return [
        [row["prompt"], row["target"], row["before"], row["after"], again]
        for row, again in zip(answers, restored, strict=True)
    ]


def score_rows(edit: EditComparison) -> list[list[str]]:
    def shown(value: float) -> str:
        return f"{value:.3f}" if value == value else "n/a"  # NaN: no fact has what the score needs

    before, after = edit.scores_before, edit.scores_after
    return [[f"{name} ({key})", shown(before[key]), shown(after[key])] for key, name in DEMO_SCORES.items()]


def intro(model_name_or_path: str, editor_name_or_path: str) -> str:
    return f"""# Edit facts in a language model with MALMEN

Write facts (a prompt and its new target) or pick some from CounterFact, then apply them all at once: the editor
(`{editor_name_or_path}`) turns them into one weight update of the model (`{model_name_or_path}`). The greedy answers
show what changed; *Revert* restores every weight bit for bit. *Download* gives the edit itself: unzip it and apply it
to a fresh copy of the model with `malmen_hf.load_edits(model, "{ARTIFACT_NAME}")`."""


SCORES_NOTE = """ES: share of the new targets' tokens the model predicts after the prompt; GS: the same after
rephrasings of it; LS: share of answers to unrelated prompts that stay the same; *greedy*: the generated answer is the
new target. GS and LS need rephrasings and unrelated prompts: CounterFact facts have them, typed ones do not."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--model", default=DEFAULT_MODEL, help="short name, local folder or Hub id")
    parser.add_argument("--editor", default=DEFAULT_EDITOR, help="a released editor's short name or a saved editor")
    parser.add_argument("--host", help="address to serve on (default: 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port to serve on (default: 7860, or $GRADIO_SERVER_PORT)")
    args = parser.parse_args(argv)
    demo = EditingDemo(args.model, args.editor)
    demo.model_and_tokenizer(print)  # now, not on the first visitor's first edit
    demo.build().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
