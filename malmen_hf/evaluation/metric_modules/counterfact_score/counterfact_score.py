"""CounterFact's probability comparisons (efficacy, paraphrase, neighborhood), as an `evaluate` module."""

import datasets
import evaluate

from malmen_hf.evaluation.metrics import probability_wins

_DESCRIPTION = """
CounterFact's scores compare, per prompt, the probability of two answers: `score` is the share of prompts where the
first answer's mean log-probability per token is above the second's. Efficacy (edit prompts) and paraphrase
(rephrasings) pass the new target first and the ground truth second; neighborhood (unrelated prompts) passes the ground
truth first, since there the truth should stay ahead.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): Mean log-probability per token of the answer that should win, one per prompt.
    references (`list[float]`): The same for the answer it is compared with.
Returns:
    score (`float`): Share of prompts where the prediction's log-probability is the larger one.
    mean_margin (`float`): Mean of `prediction - reference` (in nats per token).
Example:
    >>> metric = evaluate.load(malmen_hf.evaluation.metrics.evaluate_module_path("counterfact_score"))
    >>> metric.compute(predictions=[-1.0, -3.0], references=[-2.0, -2.0])
    {'score': 0.5, 'mean_margin': 0.0}
"""

_CITATION = """
@inproceedings{meng2022rome,
  title={Locating and Editing Factual Associations in {GPT}},
  author={Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan},
  booktitle={NeurIPS},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CounterfactScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        wins = probability_wins(predictions, references)
        margins = [first - second for first, second in zip(predictions, references, strict=True)]
        return {"score": sum(wins) / len(wins), "mean_margin": sum(margins) / len(margins)}
