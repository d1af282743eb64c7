"""rmt-peft: Recurrent Memory Transformer on frozen (8-bit / 4-bit) backbones with LoRA.

The public names below load on first use (PEP 562), so ``import rmt_peft`` and ``rmt-peft --help``
do not import torch and transformers until something needs them.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("rmt-peft")
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "0.0.0+unknown"

# The lowest transformers that passes the tests (pyproject.toml says the same); an older one fails
# in the middle of a run, so it is refused here, at import, with what to do. Read from the package
# metadata: importing transformers here would slow every ``rmt-peft --help``.
MIN_TRANSFORMERS = "5.17.0"


def _check_transformers() -> None:
    from packaging.version import Version

    try:
        found = version("transformers")
    except PackageNotFoundError:
        return  # the import that needs it will say so
    if Version(found) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"rmt-peft needs transformers>={MIN_TRANSFORMERS}, found {found}: "
                          f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")


_check_transformers()

# public name -> the module that defines it
_EXPORTS = {"MemoryConfig": "memory", "RMTModel": "recurrent", "RMTOutput": "recurrent",
            "MemoryStream": "recurrent", "MemoryState": "memory_state", "StreamResult": "recurrent",
            "segment_bounds": "recurrent", "stream_tokens": "recurrent", "load_backbone": "backbones", "lora_config": "adapters",
            "trainable_summary": "adapters"}

__all__ = [*_EXPORTS, "hub", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; "X as X" marks a re-export
    from . import hub as hub
    from .adapters import lora_config as lora_config
    from .adapters import trainable_summary as trainable_summary
    from .backbones import load_backbone as load_backbone
    from .memory import MemoryConfig as MemoryConfig
    from .memory_state import MemoryState as MemoryState
    from .recurrent import MemoryStream as MemoryStream
    from .recurrent import RMTModel as RMTModel
    from .recurrent import RMTOutput as RMTOutput
    from .recurrent import StreamResult as StreamResult
    from .recurrent import segment_bounds as segment_bounds
    from .recurrent import stream_tokens as stream_tokens


def __getattr__(name: str):
    if name == "hub":
        return importlib.import_module(".hub", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rmt_peft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
