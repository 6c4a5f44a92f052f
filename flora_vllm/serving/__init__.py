"""The vLLM OpenAI server as a product: `flora-vllm` commands, who may load what, the roots'
resolver and per-adapter metrics (the API server process and the CLI; no engine internals)."""
