"""Native vLLM model implementations the plugin registers (worker process): StarCoder
(GPTBigCode) with its qkv as one packed layer that LoRA and FLoRA both adapt."""
