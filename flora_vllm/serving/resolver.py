"""Adapters served from a folder on first use, through vLLM's `LoRAResolverRegistry` (API server).

With adapter roots set (`flora-vllm serve --adapter-root DIR`, or FLORA_ADAPTER_ROOTS for the
plain `vllm` command), a request for `model=<name>` that nobody registered is served from
`DIR/<name>`, FLoRA and LoRA folders alike: loaded once (concurrent first requests wait for that
one load), then listed on `/v1/models` like any loaded adapter. A name leading outside the roots
is a 403, a missing folder a 404, a broken adapter a 400, each with the reason (the hooks in
`hooks.api_server` pass those through; stock vLLM would turn all but the 400 into a 404).
"""

from __future__ import annotations

import logging
import os

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from flora_vllm.config import get_config
from flora_vllm.serving.access import find_adapter_folder
from flora_vllm.serving.server import RUNTIME_ENV  # vLLM resolves unknown names only with it on

logger = logging.getLogger("flora_vllm")
NAME = "flora_vllm adapter roots"


class AdapterFolderResolver(LoRAResolver):
    """`model=<name>` -> the adapter folder `<root>/<name>` of the first root holding one."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find(self, lora_name: str) -> str | None:
        """The folder for `lora_name` (None: in no root); AdapterPathRefusedError outside."""
        return find_adapter_folder(lora_name, self.roots)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        path = self.find(lora_name)
        # lora_int_id: vLLM's resolve_lora replaces it with a fresh id before loading
        return None if path is None else LoRARequest(lora_name, 1, path)


def register_resolver() -> AdapterFolderResolver | None:
    """Register the resolver when adapter roots are set; runtime loading follows them unless
    VLLM_ALLOW_RUNTIME_LORA_UPDATING says otherwise (as `flora-vllm serve --adapter-root`)."""
    roots = get_config().adapter_roots
    if not roots:
        return None
    value = os.environ.setdefault(RUNTIME_ENV, "1")
    if value in ("", "0", "false", "False"):
        logger.warning(
            "flora_vllm: adapter roots set but %s=%s: adapters are not served from the roots "
            "on first use (only registered ones are)", RUNTIME_ENV, value,
        )
        return None
    resolver = AdapterFolderResolver(roots)
    LoRAResolverRegistry.register_resolver(NAME, resolver)
    logger.info("flora_vllm: unknown model names are served from %s", os.pathsep.join(roots))
    return resolver
