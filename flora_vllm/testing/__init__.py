"""Tiny random models, tokenizers and adapters built locally, for tests, benchmarks and
`flora-vllm demo --tiny` (no hub, no network).

Runs in: the test or benchmark process, before any server starts.
"""
