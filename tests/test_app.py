"""The browser demo (`app.py`), served on a tiny model and driven end to end in headless Chromium."""

import copy
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from malmen_hf import load_edits, shipped
from malmen_hf.demo import HAND_WRITTEN_FACTS
from malmen_hf.evaluation.metrics import greedy_answers
from tests.conftest import assert_bit_identical, snapshot
from tests.test_apply_edits import untrained_editor

pytest.importorskip("gradio", reason="the browser demo needs gradio: pip install -e '.[app]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install playwright"
)

# Gradio's queue calls pandas in ways pandas 3 deprecates: its warnings, not ours.
pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]
CHROMIUM_NAMES = ("chromium", "chromium-browser")  # Debian's and Ubuntu's; `make test` installs Debian's


def chromium_executable(playwright) -> str | None:
    """The system's Chromium, else the one `playwright install chromium` downloads, if either is there."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    own = Path(playwright.chromium.executable_path)
    return str(own) if own.is_file() else None


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        executable = chromium_executable(playwright)
        if executable is None:
            pytest.skip(f"no Chromium ({' or '.join(CHROMIUM_NAMES)} on PATH): apt-get install chromium")
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def served(tiny_short_names, monkeypatch):
    """
    The demo with its defaults (SmolLM2-135M and its released editor, here a tiny Llama and an editor for it, see
    `tiny_short_names`), served on a free local port. Returns the demo, its address and the unedited model.
    """
    import app

    model, tokenizer = tiny_short_names
    # An editor whose edits change a tiny model's answers (the fixture's is too weak to).
    untrained_editor(model).save_pretrained(shipped.resolve_editor(shipped.DEFAULT_EDITOR))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = app.EditingDemo()
    page = demo.build()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}", (model, tokenizer)
    page.close()


def table(page, elem_id: str) -> list[list[str]]:
    """The cells of a Gradio Dataframe, row by row, as the page shows them."""
    rows = page.locator(f"#{elem_id} [role=row]:has([role=gridcell])").all()
    return [[text.strip() for text in row.locator("[role=gridcell]").all_inner_texts()] for row in rows]


def test_a_fact_typed_in_the_browser_is_edited_shown_downloaded_and_reverted(browser, served, tmp_path):
    demo, address, (unedited, tokenizer) = served
    page = browser.new_page()
    page.set_default_timeout(120_000)  # beside other jobs on a busy CPU, the first edit loads the model
    page.goto(address)

    page.get_by_role("button", name="Revert the edit").click()
    page.get_by_text("There is no edit to revert: apply one first.").wait_for()
    page.get_by_role("button", name="Add fact").click()  # empty fields: a message, no fact
    page.get_by_text("Write a prompt and its new target").wait_for()
    page.locator("#prompt textarea").fill("The Louvre is a museum in")
    page.locator("#subject textarea").fill("The Louvre")
    page.locator("#target textarea").fill("Tokyo")
    page.get_by_role("button", name="Add fact").click()
    page.get_by_label("and the first N others").fill("2")
    page.get_by_role("button", name="Add CounterFact facts").click()
    page.get_by_text("CounterFact #1").wait_for()
    facts = table(page, "facts")
    typed = [row[:3] for row in facts if row[3] == "you"]
    assert typed == [[prompt, "", target] for prompt, target in HAND_WRITTEN_FACTS] + [
        ["The Louvre is a museum in", "The Louvre", "Tokyo"]
    ]
    assert [row[3] for row in facts[len(typed) :]] == ["CounterFact #0", "CounterFact #1"]

    page.get_by_role("button", name="Apply edits").click()
    page.get_by_text(f"Edited {len(facts)} facts").wait_for()
    model, _ = demo.model_and_tokenizer()
    edited = snapshot(model)
    answers = table(page, "answers")
    prompts = [row[0] for row in facts]
    assert [row[:2] for row in answers] == [[row[0], row[2]] for row in facts]
    assert [row[2] for row in answers] == greedy_answers(unedited, tokenizer, prompts)
    assert [row[3] for row in answers] == greedy_answers(model, tokenizer, prompts)
    assert [row[2] for row in answers] != [row[3] for row in answers]
    scores = {row[0].rsplit("(", 1)[1].rstrip(")"): row[1:] for row in table(page, "scores")}
    assert float(scores["ES"][1]) > float(scores["ES"][0])
    assert "n/a" not in scores["LS"] + scores["GS"]  # the CounterFact facts have neighbours and rephrasings

    with page.expect_download() as download:
        page.get_by_role("button", name="Download the edit").click()
    download.value.save_as(tmp_path / "edits.zip")
    with zipfile.ZipFile(tmp_path / "edits.zip") as archive:
        archive.extractall(tmp_path)
    fresh = copy.deepcopy(unedited)
    handle = load_edits(fresh, tmp_path / "malmen-edits")  # the edit, on a fresh copy of the model: the same weights
    assert_bit_identical(fresh, edited)
    assert [fact.prompt for fact in handle.facts] == prompts

    page.get_by_role("button", name="Revert the edit").click()
    page.get_by_text("Reverted: every edited weight is back").wait_for()
    assert [row[4] for row in table(page, "answers")] == [row[2] for row in answers]
    assert_bit_identical(model, snapshot(unedited))
    page.get_by_role("button", name="Revert the edit").click()
    page.get_by_text("This edit is no longer applied").wait_for()
