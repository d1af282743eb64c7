#!/usr/bin/env python
"""Entry point for launchers: ``deepspeed --num_gpus N scripts/train.py RECIPE [key=value ...]``
or ``accelerate launch scripts/train.py RECIPE [key=value ...]`` (same as ``rmt-peft train``).

The deepspeed launcher appends ``--local_rank=K``; the rank is also in the environment
(LOCAL_RANK), which is what the Trainer reads, so the flag is dropped here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rmt_peft.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["train", *argv]))
