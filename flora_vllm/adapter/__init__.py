"""The FLoRA adapter folder format, a public contract (torch + safetensors, no vLLM):

    config.py  adapter_config.json (FLoRAAdapterConfig), the format's names, its errors
    files.py   what any adapter folder may hold: folders and regular files (no FIFO, device)
    load.py    load_adapter: read and check a folder for a model's modules (every problem at once)
    save.py    save_adapter: write a folder

The adapted weight is W0 ∘ ((flora_alpha / r) · B @ A); all-ones factors with alpha 1 are the
base. The names below are the format's API, used by the trainer, the converter and the worker.

Runs in: the worker (loading), the trainer and converter (writing), tests (any process).
"""

from flora_vllm.adapter.config import (
    CONFIG_NAME,
    DORA_KIND,
    PEFT_TYPE,
    WEIGHTS_NAME,
    AdapterResourcesError,
    FLoRAAdapterConfig,
    FLoRAAdapterError,
    FLoRAAdapterNotFoundError,
    load_config,
    peft_type_and_problem,
    read_peft_type,
)
from flora_vllm.adapter.files import folder_problems
from flora_vllm.adapter.load import FLoRAModuleWeights, load_adapter
from flora_vllm.adapter.save import save_adapter

__all__ = [
    "CONFIG_NAME",
    "DORA_KIND",
    "PEFT_TYPE",
    "WEIGHTS_NAME",
    "AdapterResourcesError",
    "FLoRAAdapterConfig",
    "FLoRAAdapterError",
    "FLoRAAdapterNotFoundError",
    "FLoRAModuleWeights",
    "folder_problems",
    "load_adapter",
    "load_config",
    "peft_type_and_problem",
    "read_peft_type",
    "save_adapter",
]
