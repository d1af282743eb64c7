"""``rmt-peft env``: the versions and devices a bug report needs (like ``transformers env``).

``versions()`` reads installed package versions from their metadata (nothing heavy is imported);
``devices()`` asks torch what it can compute on. ``summary.json`` of every run records
``versions()`` too, so a result can be traced to the software that produced it.
"""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("rmt-peft", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub",
            "tokenizers", "safetensors", "deepspeed", "bitsandbytes")


def versions() -> dict[str, str]:
    """Python, the platform and each of PACKAGES ("not installed" when absent)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def devices() -> dict[str, str]:
    """What torch computes on: CUDA devices (name, memory), the CUDA / cuDNN builds, CPU threads."""
    import torch

    found = {"cpu threads (torch)": str(torch.get_num_threads()), "cpu cores": str(os.cpu_count()),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}
    if torch.cuda.is_available():
        found["cuda (torch build)"] = str(torch.version.cuda)
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    else:
        found["cuda"] = "not available"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found["mps"] = "available"
    return found


def run(args) -> int:
    rows = {**versions(), **devices()}
    if "HF_HUB_OFFLINE" in os.environ:
        rows["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    width = max(map(len, rows))
    print("\n".join(f"- {name + ':':<{width + 1}} {value}" for name, value in rows.items()))
    return 0


def register(subparsers) -> None:
    text = "print versions and devices for a bug report"
    p = subparsers.add_parser("env", help=text, description=text + " (paste it into the issue)")
    p.set_defaults(func=run)
