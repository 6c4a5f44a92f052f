"""Native vLLM model implementations registered by the flora-vllm plugin."""
