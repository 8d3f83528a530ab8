"""Character and style LoRAs: upload validation (`validation`), base models (`bases`), hot-swap (`adapters`).

The generation method itself is `generation.methods.lora.LoraMethod`.
"""

from generation.lora.adapters import CHARACTER_SLOT, STYLE_SLOT, AdapterManager
from generation.lora.bases import BASES, BaseSpec, require_base
from generation.lora.validation import InvalidLora, LoraInfo, inspect_lora, max_lora_bytes

__all__ = [
    "BASES",
    "CHARACTER_SLOT",
    "STYLE_SLOT",
    "AdapterManager",
    "BaseSpec",
    "InvalidLora",
    "LoraInfo",
    "inspect_lora",
    "max_lora_bytes",
    "require_base",
]
