"""
Property test: random sequences of apply / revert / save + load_edits and failing calls, on tiny GPT-2, Llama and T5
models in float32 and bfloat16; after every step each parameter is compared bit for bit with the state it should be in.
"""

import copy
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from malmen_hf import MalmenEditorModel, load_edits, revert_edits
from tests import tiny
from tests.conftest import FACTS, snapshot
from tests.test_apply_edits import TRAINING_FREE

BUILDERS = {
    "gpt2": (tiny.gpt2_model, tiny.gpt2_tokenizer),
    "llama": (tiny.llama_model, tiny.llama_tokenizer),
    "t5": (tiny.t5_model, tiny.t5_tokenizer),
}
_BUILT = {}

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.lists(st.sampled_from(range(len(FACTS))), min_size=1, max_size=3, unique=True)),
        st.tuples(
            st.sampled_from(
                [
                    "revert",
                    "revert_all",
                    "save_and_load",
                    "bad_facts",
                    "non_finite_editor",
                    "tampered_load",
                    "revert_out_of_order",
                ]
            ),
            st.just([]),
        ),  # fmt: skip
    ),
    min_size=1,
    max_size=6,
)


def built(family, dtype):
    """A model, its tokenizer and a training-free editor per family and dtype, built once."""
    if (family, dtype) not in _BUILT:
        build_model, build_tokenizer = BUILDERS[family]
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer)).to(dtype)
        lr, log_lambda = TRAINING_FREE[family]
        editor = MalmenEditorModel.for_model(model, rank=4, lr_init=lr, log_lambda_init=log_lambda)
        _BUILT[family, dtype] = model, tokenizer, editor
    return _BUILT[family, dtype]


class Run:
    """The model under test, the state every parameter should be in, and the applied edits with their way back."""

    def __init__(self, family, dtype, folder: Path):
        base, self.tokenizer, self.editor = built(family, dtype)
        self.model = copy.deepcopy(base)
        self.original = snapshot(self.model)
        self.expected = self.original
        self.stack = []  # (handle, the state before it)
        self.folder = folder

    def check(self):
        after = self.model.state_dict()
        assert after.keys() == self.expected.keys()
        changed = [name for name, tensor in self.expected.items() if not torch.equal(tensor, after[name])]
        assert not changed, f"differ from the expected state: {changed}"
        assert [handle for handle, _ in self.stack] == getattr(self.model, "_malmen_edit_handles", [])

    def apply(self, indices):
        before = self.expected
        handle = self.editor.apply_edits(self.model, [FACTS[i] for i in indices], tokenizer=self.tokenizer)
        self.stack.append((handle, before))
        self.expected = snapshot(self.model)
        assert self.expected.keys() == before.keys()
        # The edit changed the edited layers' weights, each of them, and nothing else.
        changed = {name for name, tensor in before.items() if not torch.equal(tensor, self.expected[name])}
        assert changed == {f"{name}.weight" for name in self.editor.config.edit_modules}

    def revert(self):
        if not self.stack:
            assert revert_edits(self.model) == 0
            return
        handle, before = self.stack.pop()
        handle.revert()
        self.expected = before

    def revert_all(self):
        assert revert_edits(self.model) == len(self.stack)
        self.stack, self.expected = [], self.original

    def save_and_load(self):
        """Saves the newest edit, reverts it, and loads it back: the same weights, bit for bit."""
        if not self.stack:
            return
        handle, before = self.stack.pop()
        handle.save(self.folder)
        handle.revert()
        assert all(torch.equal(before[name], tensor) for name, tensor in self.model.state_dict().items())
        self.stack.append((load_edits(self.model, self.folder), before))

    def bad_facts(self):
        with pytest.raises(ValueError, match="two targets"):
            self.editor.apply_edits(self.model, [FACTS[0], (FACTS[0][0], "Oslo")], tokenizer=self.tokenizer)

    def non_finite_editor(self):
        broken = copy.deepcopy(self.editor)
        with torch.no_grad():
            next(iter(broken.nets.values())).lr.fill_(float("nan"))
        with pytest.raises(ValueError, match="no weight was changed"):
            broken.apply_edits(self.model, FACTS[:2], tokenizer=self.tokenizer)

    def tampered_load(self):
        """An artifact whose facts were changed by hand is refused, whatever the model's state."""
        if not self.stack:
            return
        self.stack[-1][0].save(self.folder)
        manifest = json.loads((self.folder / "edit_manifest.json").read_text())
        manifest["facts"][0]["target"] = "tampered"
        (self.folder / "edit_manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="was modified after it was saved"):
            load_edits(self.model, self.folder)

    def revert_out_of_order(self):
        if len(self.stack) < 2:
            return
        with pytest.raises(RuntimeError, match="revert those first"):
            self.stack[0][0].revert()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(BUILDERS))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_random_sequences_keep_every_parameter_where_it_should_be(family, dtype, steps):
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 edits may leave a layer unchanged, with a warning: not what is tested
        run = Run(family, dtype, Path(folder) / "edit")
        for operation, indices in steps:
            if operation == "apply":
                run.apply(indices)
            else:
                getattr(run, operation)()
            run.check()
        run.revert_all()
        run.check()
