"""
Measuring edits: ES / GS / LS and the CounterFact scores (`metrics.py`, with their `evaluate` modules in
`metric_modules/`), and the model cards that report them (`cards.py`).
"""
