"""
Training editors (ALGORITHM.md step 4): the meta-gradient (`meta_gradient.py`) and its losses (`losses.py`), the
accelerate trainer (`trainer.py`, `arguments.py`, `checkpoints.py`), and what an editor learns without meta-training
(`fitting.py`: the normalizer, the preserved keys' covariance, the training-free editor).

Nothing is imported here: `malmen-hf --help` reads `arguments.py` without loading torch.
"""
