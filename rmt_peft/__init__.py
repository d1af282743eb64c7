"""rmt-peft: Recurrent Memory Transformer on frozen (8-bit / 4-bit) backbones with LoRA."""
from . import hub
from .adapters import lora_config, trainable_summary
from .backbones import load_backbone
from .memory import MemoryConfig
from .memory_state import MemoryState
from .recurrent import MemoryStream, RMTModel, RMTOutput, StreamResult, segment_bounds, stream_tokens

__all__ = ["MemoryConfig", "RMTModel", "RMTOutput", "MemoryStream", "MemoryState", "StreamResult", "load_backbone",
           "segment_bounds", "stream_tokens", "lora_config", "trainable_summary", "hub"]
__version__ = "0.1.0"
