"""Training: YAML recipes (recipe.py), the segment curriculum (curriculum.py), one training curve
across its stages (tracking.py) and the engine on Hugging Face's Trainer (trainer.py);
``command.py`` adds ``rmt-peft train``, ``validate`` and ``recipes``; ``python -m rmt_peft.train``
(``__main__.py``) is the launchers' entry."""
