"""The toy GPT decoder and the attention adapters it can use."""

from models.attention import ADAPTERS, AttentionAdapter, adapter_for, adapters_for, collator_for, get_adapter
from models.fused import fuse
from models.gpt import GPT, PRESETS, GPTConfig, lm_loss

__all__ = [
    "ADAPTERS",
    "AttentionAdapter",
    "adapter_for",
    "adapters_for",
    "collator_for",
    "get_adapter",
    "fuse",
    "GPT",
    "PRESETS",
    "GPTConfig",
    "lm_loss",
]
