import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from malmen_hf import EditRequest, MalmenEditorModel, load_edit_requests
from malmen_hf.cli import busy_cores, main, wait_passively_when_busy
from malmen_hf.demo import DEMO_SCORES, HAND_WRITTEN_FACTS
from malmen_hf.evaluation.metrics import SCORES, edit_scores, locality_predictions, scores_of_model
from tests import tiny

RECORDS = [
    {
        "prompt": "The official religion of Edwin of Northumbria is",
        "target_new": "Islam",
        "ground_truth": "Christianity",
        "rephrase_prompt": "Edwin of Northumbria is affiliated with the religion",
        "locality_prompt": "The official religion of Paul is",
        "locality_ground_truth": "Christianity",
    },
    {
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    },
    {
        "prompt": "Autonomous University of Madrid, which is located in",
        "target_new": "Sweden",
        "ground_truth": "Spain",
        "rephrase_prompt": "Autonomous University of Madrid is located in",
        "locality_prompt": "Biure, which is located in",
        "locality_ground_truth": "Spain",
    },
]


@pytest.fixture
def saved(tmp_path):
    """A tiny model folder, an editor for it and a CounterFact file, all on disk."""
    tokenizer = tiny.gpt2_tokenizer()
    model = tiny.gpt2_model(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    MalmenEditorModel.for_model(model, rank=4, lr_init=0.5).save_pretrained(tmp_path / "editor")
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    return tmp_path, model, tokenizer


def test_eval_prints_the_scores_of_an_independent_computation(saved, capsys):
    folder, model, tokenizer = saved
    main([
        "eval", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
        "--data", str(folder / "cf.json"), "--num-facts", "2", "--offset", "1", "--json",
    ])  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    requests = load_edit_requests(folder / "cf.json")[1:3]
    before = locality_predictions(model, tokenizer, requests)
    editor = MalmenEditorModel.from_pretrained(folder / "editor")
    assert results["num_facts"] == 2
    assert results["before"] == pytest.approx(scores_of_model(model, tokenizer, requests, before, scores=list(SCORES)))
    assert results["after"] == pytest.approx(edit_scores(editor, model, tokenizer, requests, scores=list(SCORES)))


def test_demo_json_reports_the_edit_and_the_revert(saved, capsys):
    folder, model, tokenizer = saved
    main([
        "demo", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
        "--data", str(folder / "cf.json"), "--show", "1", "--json",
    ])  # fmt: skip
    output = json.loads(capsys.readouterr().out)  # stdout holds the JSON only: progress goes to stderr
    requests = load_edit_requests(folder / "cf.json") + [EditRequest(*fact) for fact in HAND_WRITTEN_FACTS]
    assert output["num_facts"] == len(requests) == 6 and output["reverted"]
    assert [row["target"] for row in output["answers"]] == [target for _, target in HAND_WRITTEN_FACTS] + ["Islam"]
    assert all(row["after_revert"] == row["before"] for row in output["answers"])
    before, scores = locality_predictions(model, tokenizer, requests), list(DEMO_SCORES)
    assert output["before"] == pytest.approx(scores_of_model(model, tokenizer, requests, before, scores=scores))
    editor = MalmenEditorModel.from_pretrained(folder / "editor")
    assert output["after"] == pytest.approx(edit_scores(editor, model, tokenizer, requests, scores=scores))


def test_eval_table_without_an_editor(saved, capsys):
    folder, _, _ = saved
    main([
        "eval", "--model", str(folder / "model"), "--data", str(folder / "cf.json"), "--num-facts", "3",
        "--scores", "ES", "LS",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "3 facts from" in out and "unedited model only" in out
    assert [line.split()[0] for line in out.splitlines()[-2:]] == ["ES", "LS"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--num-facts", "5"], "has 3 records, fewer than --offset + --num-facts"),
        (["--data", "missing.json"], "missing.json"),
    ],
)
def test_eval_bad_input_exits_with_a_one_line_error(saved, capsys, arguments, message):
    folder, _, _ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder / "model"), "--data", str(folder / "cf.json"), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after any progress bar
    assert error.startswith("malmen-hf eval: error:") and message in error


def test_card_from_eval_results_and_a_failed_write_keeps_the_old_card(saved, capsys):
    folder, _, _ = saved
    main([
        "eval", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
        "--data", str(folder / "cf.json"), "--num-facts", "3", "--scores", "ES", "LS", "--json",
    ])  # fmt: skip
    (folder / "eval.json").write_text(capsys.readouterr().out)
    main(["card", "--editor", str(folder / "editor"), "--results", str(folder / "eval.json"), "--editor-id", "org/e"])
    card = (folder / "editor" / "README.md").read_text()
    assert "| N | ES | LS |" in card and "\n| 3 | " in card and 'from_pretrained("org/e")' in card

    (folder / "bad.json").write_text(json.dumps({"rows": [{"method": "mend", "n": 1, "ES": 1.0}]}))
    with pytest.raises(SystemExit):
        main(["card", "--editor", str(folder / "editor"), "--results", str(folder / "bad.json")])
    assert "has no results for method 'malmen'" in capsys.readouterr().err
    assert (folder / "editor" / "README.md").read_text() == card
    assert [path.name for path in (folder / "editor").glob(".*")] == []


def test_eval_update_card_keeps_the_results_of_other_n(saved, capsys):
    folder, _, _ = saved
    common = ["eval", "--model", str(folder / "model"), "--editor", str(folder / "editor"), "--data",
              str(folder / "cf.json"), "--scores", "ES", "GS", "--update-card", "--json"]  # fmt: skip
    main([*common, "--num-facts", "3"])
    main([*common, "--num-facts", "1"])
    main([*common, "--num-facts", "3"])  # replaces its own row
    runs = [json.loads(chunk) for chunk in capsys.readouterr().out.replace("}\n{", "}\n\x00{").split("\x00")]
    card = (folder / "editor" / "README.md").read_text()
    assert card.count("\n| 1 | ") == 1 and card.count("\n| 3 | ") == 1
    assert f"| 3 | {runs[2]['after']['ES']:.3f} | {runs[2]['after']['GS']:.3f} |" in card
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(folder / "model"), "--data", str(folder / "cf.json"), "--update-card"])
    assert "--update-card needs --editor" in capsys.readouterr().err


def test_edit_prints_answers_and_saves_the_model_and_the_artifact(saved, capsys):
    from transformers import AutoModelForCausalLM

    from malmen_hf import load_edits
    from tests.conftest import assert_bit_identical, snapshot

    folder, model, _ = saved
    main([
        "edit", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
        "--facts", str(folder / "cf.json"), "--fact", "The capital of France is", "Berlin",
        "--save-model", str(folder / "edited"), "--save-edits", str(folder / "edits"), "--json",
    ])  # fmt: skip
    output = json.loads(capsys.readouterr().out)
    assert output["num_facts"] == 4 and output["answers"][3]["target"] == "Berlin"
    edited = AutoModelForCausalLM.from_pretrained(folder / "edited")  # an ordinary transformers model
    load_edits(model, folder / "edits")  # the artifact reproduces it on a fresh copy
    assert_bit_identical(model, snapshot(edited))


def test_edit_without_facts_fails_in_one_line(saved, capsys):
    folder, _, _ = saved
    with pytest.raises(SystemExit):
        main(["edit", "--model", str(folder / "model"), "--editor", str(folder / "editor")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "malmen-hf edit: error: no facts: give --facts FILE and/or --fact PROMPT TARGET"
    )


MISSING_TARGET = json.dumps([RECORDS[0], {key: value for key, value in RECORDS[1].items() if key != "target_new"}])


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        (["edit", "--facts", "{facts}"], MISSING_TARGET, "{facts}, record 1: missing key 'target_new'"),
        (["edit", "--facts", "{facts}"], '[{"prompt": "a", "target": ', "{facts}: cannot be read as a JSON array"),
        (["eval", "--data", "{facts}"], MISSING_TARGET, "{facts}, record 1: missing key 'target_new'"),
        (["demo", "--data", "{facts}"], MISSING_TARGET, "{facts}, record 1: missing key 'target_new'"),
        (
            ["train", "--model", "smollm2-135m", "--data", "{facts}", "--output-dir", "out"],
            MISSING_TARGET,
            "{facts}, record 1: missing key 'target_new'",
        ),
    ],
)
def test_a_bad_facts_file_fails_in_one_line_before_torch_is_imported(tmp_path, command, content, message):
    """The facts are read and checked before the slow imports (torch, transformers): a bad file fails at once."""
    facts = tmp_path / "facts.json"
    facts.write_text(content)
    command = [part.format(facts=facts) for part in command]
    script = (
        f"import sys\nfrom malmen_hf.cli import main\ntry:\n    main({command!r})\nexcept SystemExit as exit:\n"
        "    print(exit.code, sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.splitlines() == ["2 []"], result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(f"malmen-hf {command[0]}: error: {message.format(facts=facts)}")


def test_a_base_models_folder_as_editor_fails_in_one_line_with_exit_2(saved, capsys):
    folder, _, _ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--model", str(folder / "model"), "--editor", str(folder / "model"), "--fact", "A is", "B"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("malmen-hf edit: error: ") and "holds no MALMEN editor" in last_line


def test_push_an_editor_with_its_card_and_an_edit_artifact(saved, monkeypatch, capsys):
    from tests.test_hub import FakeHfApi

    folder, _, _ = saved
    FakeHfApi.calls = []
    FakeHfApi.uploaded = folder / "uploaded"
    monkeypatch.setattr("malmen_hf.modeling_malmen.HfApi", FakeHfApi)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    (folder / "editor" / "README.md").write_text("---\nlicense: mit\n---\n# My card\n")
    main(["push", "--editor", str(folder / "editor"), "--repo-id", "org/editor", "--private"])
    assert (folder / "uploaded" / "README.md").read_text().endswith("# My card\n")  # the folder's own card
    assert FakeHfApi.calls[0][:3] == ("create_repo", "org/editor", True)

    main(["edit", "--model", str(folder / "model"), "--editor", str(folder / "editor"), "--fact", "a b", "c",
          "--save-edits", str(folder / "edits")])  # fmt: skip
    FakeHfApi.uploaded = folder / "uploaded-edits"
    main(["push", "--edits", str(folder / "edits"), "--repo-id", "org/edits", "--create-pr"])
    assert sorted(FakeHfApi.calls[-1][2]) == ["edit_manifest.json", "edit_shifts.safetensors"]
    assert FakeHfApi.calls[-1][3]["create_pr"] is True
    assert "Pushed to org/edits" in capsys.readouterr().out


def _no_slow_work(monkeypatch):
    """Loading a model is the first slow step of every command: make it fail the test if it is reached."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("malmen_hf.offline_models.load_model_and_tokenizer", load)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["eval", "--editor", "missing/editor/folder"], "editor not found: missing/editor/folder is not a folder"),
        (["eval", "--editor", "org/not-cached"], "editor not found: 'org/not-cached' is not a local folder"),
        (["eval", "--model", "./missing-model"], "model not found: ./missing-model is not a folder"),
        (["edit", "--model", "smollm2-360m", "--fact", "a", "b"], "known are smollm2-135m"),
        (["demo", "--editor", "./nope"], "editor not found: ./nope is not a folder; the short names known are"),
        (["train", "--data", "missing.json", "--output-dir", "x"], "data not found: missing.json is not a file"),
        (["eval", "--scores", "ES", "XS"], "unknown scores ['XS']"),
    ],
)
def test_bad_paths_and_names_fail_at_once_with_not_found(saved, monkeypatch, capsys, arguments, message):
    folder, _, _ = saved
    _no_slow_work(monkeypatch)
    monkeypatch.setattr("malmen_hf.offline_models.hub_is_reachable", lambda: False)  # offline: no Hub retries
    command, *options = arguments
    defaults = {"--model": str(folder / "model"), "--data": str(folder / "cf.json")}
    if command == "edit":
        del defaults["--data"]
    for flag, value in defaults.items():
        if flag not in options:
            options += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"malmen-hf {command}: error: ") and message in error


def test_an_unknown_short_name_offline_lists_the_known_ones_at_once(tmp_path):
    """In a fresh process with the Hub unreachable (HF_HUB_OFFLINE), not after the Hub client's retries."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "malmen_hf.cli", "eval", "--model", "smollm2-360m", "--data", __file__],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and time.perf_counter() - start < 60
    assert result.stderr.strip().splitlines()[-1] == (
        "malmen-hf eval: error: model not found: 'smollm2-360m' is not a local folder, nor a Hub id in the local "
        "cache, and the Hugging Face Hub cannot be reached to download it; the short names known are smollm2-135m"
    )


def test_help_imports_neither_torch_nor_transformers():
    """`--help` of every command builds the parser only: torch and transformers are imported by the commands."""
    script = (
        "import sys\nfrom malmen_hf.cli import build_parser\nparser = build_parser()\n"
        "for command in ('', 'demo', 'train', 'eval', 'card', 'edit', 'push'):\n"
        "    try:\n        parser.parse_args([command, '--help'] if command else ['--help'])\n"
        "    except SystemExit:\n        pass\n"
        "assert not {'torch', 'transformers', 'datasets'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--facts-per-step" in result.stdout and "--update-card" in result.stdout


def test_eval_shows_progress_bars_on_stderr(saved, capsys):
    folder, _, _ = saved
    main([
        "eval", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
        "--data", str(folder / "cf.json"), "--num-facts", "3", "--scores", "ES", "LS", "--json",
    ])  # fmt: skip
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout holds the JSON only
    for bar in ("Scoring locality", "Scoring ES", "Scoring LS", "Editing"):
        assert bar in captured.err


def test_card_results_merge_by_dataset_and_n(saved, capsys):
    folder, _, _ = saved
    editor = ["--editor", str(folder / "editor")]
    common = ["eval", "--model", str(folder / "model"), *editor, "--data", str(folder / "cf.json"), "--json"]
    for n in (3, 1, 3):
        main([*common, "--num-facts", str(n), "--scores", "ES"])
        (folder / f"eval-{n}.json").write_text(capsys.readouterr().out)
    main(["card", *editor, "--results", str(folder / "eval-3.json"), "--dataset", "counterfact-edit"])
    main(["card", *editor, "--results", str(folder / "eval-1.json")])  # adds N = 1, keeps the dataset
    main(["card", *editor, "--results", str(folder / "eval-3.json")])  # replaces N = 3
    card = ModelCard.load(folder / "editor" / "README.md")
    assert card.data.datasets == ["counterfact-edit"]
    assert [(r.dataset_name, r.dataset_config) for r in card.data.eval_results] == [
        ("counterfact-edit", "N=1"), ("counterfact-edit", "N=3"),
    ]  # fmt: skip
    assert card.content.count("\n| 3 | ") == 1 and "Measured with `malmen-hf eval --model" in card.content
    main(["card", *editor, "--results", str(folder / "eval-1.json"), "--dataset", "zsre"])
    assert "results on counterfact-edit are replaced by results on zsre" in capsys.readouterr().err
    assert [r.dataset_config for r in ModelCard.load(folder / "editor" / "README.md").data.eval_results] == ["N=1"]


def test_demo_training_free_is_the_library_definition(saved, tiny_short_names, capsys):
    """The demo's training-free editor is `training_free_editor` with its defaults (the quality benchmark's)."""
    from malmen_hf import training_free_editor
    from malmen_hf.training.fitting import TRAINING_FREE_LOG_LAMBDA, TRAINING_FREE_LR

    folder, _, _ = saved
    model, tokenizer = tiny_short_names  # a Llama: the shipped CounterFact sample is longer than GPT-2's positions
    main(["demo", "--editor", "training-free", "--data", str(folder / "cf.json"), "--json"])
    output = json.loads(capsys.readouterr().out)
    editor = training_free_editor(model, tokenizer)
    assert (TRAINING_FREE_LR, TRAINING_FREE_LOG_LAMBDA) == (1e-3, 2)
    assert (editor.config.lr_init, editor.config.log_lambda_init) == (TRAINING_FREE_LR, TRAINING_FREE_LOG_LAMBDA)
    requests = load_edit_requests(folder / "cf.json") + [EditRequest(*fact) for fact in HAND_WRITTEN_FACTS]
    assert output["after"] == pytest.approx(edit_scores(editor, model, tokenizer, requests, scores=list(DEMO_SCORES)))


def test_edit_manifests_name_the_model_and_editor_not_local_folders(tiny_short_names, tmp_path, capsys):
    main(["edit", "--fact", "The capital of France is", "Berlin", "--save-edits", str(tmp_path / "edits")])
    manifest = json.loads((tmp_path / "edits" / "edit_manifest.json").read_text())
    assert (manifest["base_model"], manifest["editor"]) == ("smollm2-135m", "malmen-smollm2-135m-counterfact")
    assert str(tmp_path) not in json.dumps(manifest)


def test_demo_away_from_the_checkout_edits_held_out_counterfact_facts_with_the_released_editor(
    tiny_short_names, capsys
):
    """As after `pip install`: the facts shipped with the package, the editor found by its short name."""
    from malmen_hf.shipped import COUNTERFACT_EVAL

    main(["demo", "--json", "--num-facts", "20", "--show", "2"])
    captured = capsys.readouterr()
    output = json.loads(captured.out)
    assert "Editor: malmen-smollm2-135m-counterfact" in captured.err
    first = json.loads(COUNTERFACT_EVAL.read_text())[:2]
    shown = [row["target"] for row in output["answers"]]
    assert shown == [target for _, target in HAND_WRITTEN_FACTS] + [record["target_new"] for record in first]
    assert output["num_facts"] == 20 + len(HAND_WRITTEN_FACTS) and output["reverted"]
    assert output["before"]["ES"] == output["before"]["ES"]  # real scores, not NaN


def test_eval_defaults_to_the_shipped_held_out_facts(tiny_short_names, capsys):
    main(["eval", "--editor", "malmen-smollm2-135m-counterfact", "--num-facts", "8", "--scores", "ES", "--json"])
    output = json.loads(capsys.readouterr().out)
    assert output["num_facts"] == 8 and output["data"].endswith("counterfact-eval-1000.json")


def test_torch_threads_wait_passively_only_when_other_processes_keep_a_core_busy():
    quiet, busy, chosen_by_user = {}, {}, {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not wait_passively_when_busy(quiet, busy=0.2) and quiet == {}
    assert wait_passively_when_busy(busy, busy=1.0) and busy == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not wait_passively_when_busy(chosen_by_user, busy=2.0) and chosen_by_user == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures busy cores from /proc/stat")
def test_beside_a_busy_neighbour_the_command_line_sets_the_passive_policy_before_torch_loads(tmp_path):
    """A process spinning on one core is seen; a fresh CLI process says it chose PASSIVE before torch is imported."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores() >= 0.5
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        script = (
            "import os, sys\nfrom malmen_hf.cli import main\n"
            "try:\n    main(['eval', '--data', 'absent.json'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert result.stdout.split() == ["PASSIVE", "False"]
    assert "torch's threads wait passively instead of spinning" in result.stderr


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["train", "--data", "{cf}", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
        (["train", "--data", "{cf}", "--log-lambda-init", "inf"], "argument --log-lambda-init: must be a finite"),
        (["edit", "--fact", "A is", "B", "--show", "-1"], "argument --show: must be 0 or more, got -1"),
        (["eval", "--data", "{cf}", "--offset", "-1"], "argument --offset: must be 0 or more, got -1"),
        (["eval", "--data", "{cf}", "--num-facts", "0"], "argument --num-facts: must be a positive integer"),
    ],
)
def test_bad_numbers_fail_in_one_line_before_the_model_loads(saved, capsys, monkeypatch, command, message):
    from malmen_hf import offline_models

    folder, _, _ = saved
    monkeypatch.setattr(offline_models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    command = [part.format(cf=folder / "cf.json") for part in command] + ["--model", str(folder / "model")]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"after": {"ES": 1.0}, "data": "cf.json"}', "lacks num_facts, data or after"),
        ('{"rows": [1, 2]}', "its rows are not objects with an n"),
        ("[1, 2]", "is neither `malmen-hf eval --json` output nor a quality benchmark result"),
        ("{not json", "is not JSON"),
    ],
)
def test_card_with_a_malformed_results_file_fails_in_one_line(saved, capsys, content, message):
    folder, _, _ = saved
    (folder / "bad.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["card", "--editor", str(folder / "editor"), "--results", str(folder / "bad.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_an_interrupted_save_model_leaves_the_previous_folder(saved, capsys, monkeypatch):
    from transformers import PreTrainedModel

    folder, _, _ = saved
    command = ["edit", "--model", str(folder / "model"), "--editor", str(folder / "editor"),
               "--fact", "The capital of France is", "Berlin", "--save-model", str(folder / "edited")]  # fmt: skip
    main(command)
    before = {path.name: path.read_bytes() for path in (folder / "edited").iterdir()}
    original = PreTrainedModel.save_pretrained

    def interrupted(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        (Path(directory) / "config.json").write_text("{trunc")  # a config cut short, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(command)
    assert {path.name: path.read_bytes() for path in (folder / "edited").iterdir()} == before
    assert [path.name for path in folder.iterdir() if path.name.startswith(".")] == []
