"""Making FLoRA adapters in the training process: train with transformers, convert a trained
LoRA (both on `flora_vllm.ops`' math; no vLLM import)."""
