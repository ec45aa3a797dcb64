"""Edit accuracy: the token-level score behind MALMEN's ES, GS and LS, as an `evaluate` module."""

import datasets
import evaluate

from malmen_hf.evaluation.metrics import token_match_scores

_DESCRIPTION = """
Compares predicted token ids with reference token ids, sequence by sequence. `accuracy` is the mean over sequences
of the share of positions that match: with teacher-forced argmax predictions and the new targets as references it is
the paper's ES (edit prompts) or GS (rephrasings); with the predictions after and before an edit on unrelated prompts
it is LS (agreement), and with the dataset's answers as references it is LS as accuracy. `exact_match` is the share of
sequences that match everywhere.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): Predicted token ids, one list per sequence.
    references (`list[list[int]]`): Reference token ids, one list per sequence, as long as its prediction.
Returns:
    accuracy (`float`): Mean share of matching positions per sequence.
    exact_match (`float`): Share of sequences matching at every position.
Example:
    >>> metric = evaluate.load(malmen_hf.evaluation.metrics.evaluate_module_path("edit_accuracy"))
    >>> metric.compute(predictions=[[1, 2], [3]], references=[[1, 5], [3]])
    {'accuracy': 0.75, 'exact_match': 0.5}
"""

_CITATION = """
@inproceedings{tan2024malmen,
  title={Massive Editing for Large Language Models via Meta Learning},
  author={Tan, Chenmien and Zhang, Ge and Fu, Jie},
  booktitle={ICLR},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EditAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        return token_match_scores(predictions, references)
