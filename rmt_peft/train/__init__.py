"""Training: YAML recipes (recipe.py), the segment curriculum (curriculum.py) and the engine on
Hugging Face's Trainer (trainer.py); ``command.py`` adds ``rmt-peft train`` and ``validate``."""
