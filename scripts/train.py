"""``deepspeed scripts/train.py RECIPE [key=value ...]``: ``rmt-peft train`` as a launcher script.

    deepspeed --num_gpus N scripts/train.py RECIPE [key=value ...]
    torchrun --nproc_per_node N scripts/train.py RECIPE [key=value ...]

The same entry as ``python -m rmt_peft.train`` (``rmt_peft/train/__main__.py``), for launchers
and habits that take a script path; it needs the package importable (``pip install -e .`` in a
checkout). The deepspeed launcher appends ``--local_rank=K``; ``rmt-peft train`` accepts it (the
rank is in the environment as LOCAL_RANK, which is what the Trainer reads).
"""
import sys

from rmt_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
