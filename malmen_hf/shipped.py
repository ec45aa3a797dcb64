"""
What ships inside the package: the editors released with malmen-hf, by short name, and a small CounterFact sample.

The editors live in the repository's `editors/` folder, their one home: a wheel (or `pip install git+...`) installs
that folder as `malmen_hf/editors`, and a checkout or editable install reads it in place. So a released editor loads
by its short name wherever malmen-hf is installed, as a base model loads by its short name (see
`malmen_hf.offline_models`):

```python
>>> from malmen_hf import MalmenEditorModel
>>> editor = MalmenEditorModel.from_pretrained("malmen-smollm2-135m-counterfact")
```

This module uses the standard library only: it is also imported by `modeling_malmen.py` where that file runs as Hub
remote code (then no editor is shipped and every name is returned as it is).
"""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_EDITOR = "malmen-smollm2-135m-counterfact"
"""The short name of the editor trained for the default base model (`"smollm2-135m"`)."""
COUNTERFACT_SAMPLE = PACKAGE_DIR / "sample_data" / "counterfact-train-512.json"
"""The first 512 records of CounterFact's training split (MIT license; see `sample_data/README.md`)."""
COUNTERFACT_EVAL = PACKAGE_DIR / "sample_data" / "counterfact-eval-1000.json"
"""The first 1,000 records of CounterFact's evaluation split, held out from every editor's training (MIT license): the
default facts of `malmen-hf demo` and `malmen-hf eval`."""


def package_data_dir(name: str) -> Path | None:
    """
    A data folder installed inside the package (`malmen_hf/<name>`, from a wheel), else the repository's `<name>`
    beside the package (a checkout or an editable install); `None` when neither exists.
    """
    for folder in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if folder.is_dir():
            return folder
    return None


def shipped_editors() -> dict[str, Path]:
    """The editors released with malmen-hf: short name (the folder's name) -> folder."""
    folder = package_data_dir("editors")
    if folder is None:
        return {}
    return {path.name: path for path in sorted(folder.iterdir()) if (path / "config.json").is_file()}


def resolve_editor(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """
    The folder of a released editor given by its short name (see [`shipped_editors`]); anything else (a local
    folder, a Hub id) is returned unchanged. An existing local folder wins over a short name of the same spelling.
    """
    if not isinstance(name_or_path, str) or os.path.isdir(name_or_path):
        return name_or_path
    folder = shipped_editors().get(name_or_path)
    return str(folder) if folder is not None else name_or_path


__all__ = [
    "COUNTERFACT_EVAL",
    "COUNTERFACT_SAMPLE",
    "DEFAULT_EDITOR",
    "package_data_dir",
    "resolve_editor",
    "shipped_editors",
]
