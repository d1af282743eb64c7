"""``python -m rmt_peft.train RECIPE [key=value ...]``: ``rmt-peft train`` for launchers, from any folder.

    deepspeed --num_gpus N --module rmt_peft.train RECIPE [key=value ...]
    torchrun --nproc_per_node N -m rmt_peft.train RECIPE [key=value ...]
    accelerate launch -m rmt_peft.train RECIPE [key=value ...]

The deepspeed launcher appends ``--local_rank=K``; ``rmt-peft train`` accepts and ignores it (the
rank is in the environment as LOCAL_RANK, which is what the Trainer reads).
"""
import sys

from rmt_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
