"""The FLoRA math once, pure torch (+ Triton), no vLLM import; runs in the worker (and in
training, `flora_vllm.training`):

    torch_ops.py    the per-token batched form, its dense oracle, merge of one slot
    triton_ops.py   the same op as one fused Triton kernel (CUDA; the CPU under the interpreter)
    policy.py       cost model: per adapter segment, expanded rows or a merged weight
    merge_cache.py  merged weights kept across steps under a byte budget
    opaque.py       each adapter layer as one opaque node for torch.compile
"""
