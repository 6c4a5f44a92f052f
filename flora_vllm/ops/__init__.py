"""FLoRA kernels; `torch_ops` is the reference path used on the CPU."""
