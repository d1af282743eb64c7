"""Training: the curriculum run (trainer.py: ``CurriculumRun``'s phases, ``run``) on Hugging Face's
Trainer as the step engine (engine.py: its overrides, adapter-only saves), what a recipe trains
(build.py: model and tokenizer; datasets.py: samples per stage; arguments.py: each stage's
TrainingArguments), the segment curriculum (curriculum.py), the best weights by length
(keep_best.py), one training curve across the stages (tracking.py), the divergence guard
(guard.py) and the run lock (lock.py); ``command.py`` adds ``rmt-peft train``, ``validate`` and
``recipes``; ``python -m rmt_peft.train`` (``__main__.py``) is the launchers' entry. The recipes it
runs are ``rmt_peft.recipe`` (``recipe.py`` here keeps the old import path); the run folder it
writes is ``rmt_peft.runs``'s."""
