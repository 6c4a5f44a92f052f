"""What one adapter slot costs in memory (`--max-loras`), for vLLM's LoRA stacks and the plugin's
FLoRA stacks, computed from layer shapes (the layer tests check the FLoRA formula against the
allocated tensors).

Every slot of `--max-loras` allocates, in every wrapped linear layer and for every output slice:
- vLLM LoRA: A [max_lora_rank, in] + B [out, max_lora_rank] in the LoRA dtype (the model's);
- FLoRA: a [R, in] + b [R, out] in fp32 (`factor_dtype`), R = FLORA_MAX_RANK or max_lora_rank;
  plus one identity slot per layer. Both kinds pay for every slot, whatever the slot holds.

Run: `python benchmarks/slot_memory.py` -> benchmarks/results/slot_memory.{json,md}
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Shape:
    """A decoder's linear layers as vLLM wraps them (qkv, o, gate_up, down per layer)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    dtype_bytes: int  # the model's dtype, which vLLM's LoRA stacks use

    def slices(self) -> list[tuple[int, int]]:
        """(in, out) of every output slice of one layer's wrapped linears."""
        head = self.hidden // self.heads
        kv = self.kv_heads * head
        h, m = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]


SHAPES = (
    # serving_bench.py's 120M benchmark LLaMA (fp32 on the CPU)
    Shape("benchmark LLaMA 120M (fp32)", 1024, 16, 16, 2816, 8, 4),
    Shape("Llama-2-7B (bf16)", 4096, 32, 32, 11008, 32, 2),
)


def per_slot(shape: Shape, rank: int, kind: str) -> int:
    """Bytes one slot of `kind` stacks costs at `rank` rows, over the whole model."""
    values = rank * sum(i + o for i, o in shape.slices()) * shape.layers
    return values * (4 if kind == "flora" else shape.dtype_bytes)


def main() -> None:
    rows = []
    for shape in SHAPES:
        for max_lora_rank, flora_rank in ((8, 8), (8, 1), (1, 1), (16, 16), (16, 1)):
            lora = per_slot(shape, max_lora_rank, "lora")
            flora = per_slot(shape, flora_rank, "flora")
            rows.append({
                "model": shape.name, "max_lora_rank": max_lora_rank, "flora_rank": flora_rank,
                "lora_mib_per_slot": lora / 2**20, "flora_mib_per_slot": flora / 2**20,
                "slot_mib": (lora + flora) / 2**20,
                "256_slots_gib": 256 * (lora + flora) / 2**30,
                "rank1_adapter_values": sum(i + o for i, o in shape.slices()) * shape.layers,
            })
    out = {"machine": common.machine_info(), "shapes": [asdict(s) for s in SHAPES], "rows": rows}
    path = common.write_json(os.path.join(RESULTS, "slot_memory.json"), out)
    lines = [
        "| model | --max-lora-rank | FLoRA rank (FLORA_MAX_RANK) | LoRA stacks / slot | "
        "FLoRA stacks / slot | one slot | 256 slots |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['max_lora_rank']} | {r['flora_rank']} | "
            f"{r['lora_mib_per_slot']:.1f} MiB | {r['flora_mib_per_slot']:.1f} MiB | "
            f"{r['slot_mib']:.1f} MiB | {r['256_slots_gib']:.1f} GiB |"
        )
    with open(os.path.join(RESULTS, "slot_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
