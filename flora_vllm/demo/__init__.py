"""The real-model demo (CLI process): SmolLM2-135M-Instruct fetched from the package registry,
its shipped adapters (`adapters/`), their data rules and training recipe, and the scored run."""
