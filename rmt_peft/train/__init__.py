"""Training: the segment curriculum (curriculum.py), one training curve across its stages
(tracking.py), the divergence guard (guard.py), the run lock (lock.py) and the engine on Hugging
Face's Trainer (trainer.py); ``command.py`` adds ``rmt-peft train``, ``validate`` and ``recipes``;
``python -m rmt_peft.train`` (``__main__.py``) is the launchers' entry. The recipes it runs are
``rmt_peft.recipe`` (``recipe.py`` here keeps the old import path); the run folder it writes is
described in ``rmt_peft.runs``."""
