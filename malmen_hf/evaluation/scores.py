"""
The names of the scores and what each measures. Standard library only: the command line checks `--scores` and model
cards order their columns with these before torch is imported (the scores themselves are in `metrics.py`).
"""

from collections.abc import Iterable

DEFAULT_SCORES = ("ES", "GS", "LS")
SCORES = {
    "ES": "edit success: teacher-forced token accuracy of the new target on the edit prompts",
    "GS": "generalization: the same on the rephrasings",
    "LS": "locality: share of locality answer positions whose argmax is unchanged by the edit",
    "LS_acc": "locality as accuracy: teacher-forced token accuracy of the dataset's locality answers",
    "ES_greedy": "greedy exact match: share of edit prompts whose greedy continuation is the new target",
    "GS_greedy": "the same on the rephrasings",
    "CF_efficacy": "CounterFact efficacy: share of edit prompts where P(new target) > P(ground truth)",
    "CF_paraphrase": "CounterFact paraphrase: the same on the rephrasings",
    "CF_neighborhood": "CounterFact neighborhood: share of locality prompts where P(ground truth) > P(new target)",
}
"""Every score [`~metrics.scores_of_model`] can compute, with what it measures. All are means over facts, in
`[0, 1]`."""


def check_scores(names: Iterable[str]) -> None:
    """
    Raises:
        `ValueError`: If a name is not one of [`SCORES`] (the message lists the unknown names and the known ones).
    """
    unknown = sorted(set(names) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown scores {unknown}; the known ones are {list(SCORES)}")
