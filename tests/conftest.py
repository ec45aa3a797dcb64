import copy

import pytest
import torch

from malmen_hf import EditRequest
from tests import tiny

# Tiny models gain nothing from threads, and on a busy 2-core machine torch's threads spin-wait on each other.
torch.set_num_threads(1)

FAMILIES = {
    "gpt2": (tiny.gpt2_model, tiny.gpt2_tokenizer),
    "gptj": (tiny.gptj_model, tiny.gpt2_tokenizer),
    "llama": (tiny.llama_model, tiny.llama_tokenizer),
    "t5": (tiny.t5_model, tiny.t5_tokenizer),
}

# The devices the device-dependent tests run on: the CPU always, CUDA where there is one (`-m cuda` selects those
# runs: `benchmarks/device_check.py` runs them on a lent GPU machine).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]

FACTS = [
    ("The Eiffel Tower is located in", "Rome"),
    ("The capital of France is", "Berlin"),
    ("Danielle Darrieux's mother tongue is", "English"),
    ("Toko Yasuda plays the", "piano"),
    ("Apple was founded by", "Microsoft"),
    ("The Louvre is a museum in", "Tokyo"),
    ("The official religion of Edwin of Northumbria is", "Islam"),
]
SUBJECTS = [
    "The Eiffel Tower",
    "France",
    "Danielle Darrieux",
    "Toko Yasuda",
    "Apple",
    "The Louvre",
    "Edwin of Northumbria",
]
# FACTS with their subjects, for what reads keys at the subject's last token (subject_last editors, MEMIT).
SUBJECT_REQUESTS = [
    EditRequest(prompt, target, subject=subject) for (prompt, target), subject in zip(FACTS, SUBJECTS, strict=True)
]


@pytest.fixture(scope="session")
def _built():
    """Each family's model and tokenizer, built once per session."""
    built = {}
    for name, (build_model, build_tokenizer) in FAMILIES.items():
        tokenizer = build_tokenizer()
        built[name] = (build_model(len(tokenizer)), tokenizer)
    return built


@pytest.fixture(params=list(FAMILIES))
def model_and_tokenizer(request, _built):
    """A fresh copy of a tiny model of each family, with its tokenizer."""
    model, tokenizer = _built[request.param]
    return copy.deepcopy(model), tokenizer


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device a device-dependent test runs on (see `DEVICES`)."""
    return torch.device(request.param)


@pytest.fixture
def gpt2(_built):
    model, tokenizer = _built["gpt2"]
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def t5(_built):
    model, tokenizer = _built["t5"]
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def facts():
    return list(FACTS)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to compare bit for bit later."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, tensor in before.items() if not torch.equal(tensor, after[name])]
    assert not changed, f"changed: {changed}"


@pytest.fixture
def tiny_short_names(tmp_path, monkeypatch):
    """
    The short names of the default model and editor (`"smollm2-135m"`, `"malmen-smollm2-135m-counterfact"`) resolve
    to a tiny Llama and an untrained editor for it, through the real mechanisms: a converted model in the
    `$MALMEN_HF_CACHE` folder, and a released editor in the package's editors folder. Returns the model and tokenizer.
    """
    from malmen_hf import MalmenEditorModel, shipped

    tokenizer = tiny.llama_tokenizer()
    model = tiny.llama_model(len(tokenizer))
    cache = tmp_path / "malmen_hf_cache"
    model.save_pretrained(cache / "smollm2-135m")
    tokenizer.save_pretrained(cache / "smollm2-135m")
    monkeypatch.setenv("MALMEN_HF_CACHE", str(cache))
    editors = tmp_path / "package_editors"
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5, base_model_name_or_path="smollm2-135m")
    editor.save_pretrained(editors / shipped.DEFAULT_EDITOR)
    package_data_dir = shipped.package_data_dir
    with_tiny_editors = lambda name: editors if name == "editors" else package_data_dir(name)  # noqa: E731
    monkeypatch.setattr(shipped, "package_data_dir", with_tiny_editors)
    return model, tokenizer
