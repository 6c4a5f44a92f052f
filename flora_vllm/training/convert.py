"""Convert a PEFT LoRA adapter into a FLoRA adapter of a chosen rank, by a weighted fit.

LoRA adds, FLoRA multiplies: a LoRA module gives W0 + ΔW with ΔW = s · B A (s = lora_alpha / r,
or lora_alpha / sqrt(r) with rslora); a FLoRA module gives W0 ∘ (B' A'). So the conversion
looks, per module, for the rank-r factors minimising the error in the weight

    || W0 ∘ (B' A') − (W0 + ΔW) ||_F²  =  Σ_ij W0_ij² · ((B' A')_ij − M_ij)²,   M = (W0 + ΔW) / W0,

a least-squares fit of the multiplicative factor M with weights W0². It is solved by alternating
least squares: with A' fixed, each row of B' is an r×r weighted least-squares problem in closed
form, then likewise each column of A'. We never divide by W0: the right-hand sides use
W0 ∘ (W0 + ΔW) = W0² ∘ M, so an entry with W0 = 0 simply has weight 0 (no FLoRA factor can
change it, and the fit does not try) and a near-zero W0 gets the small weight its error deserves.

This is an approximation, and it can be poor: a rank-r multiplicative correction is not a rank-r
additive one. W0 ∘ (B' A') can only rescale entries of W0 (never move a zero), and ΔW = W0 ∘ (M − 1)
is low-rank only when M is. The report gives, per module and overall, the relative error
|| W0 ∘ (B' A') − (W0 + ΔW) ||_F / || ΔW ||_F: 0 is exact, 1 is no better than dropping the
adapter. ALS starts from the truncated SVD of M (regularised to 1 where W0 is ~0), each sweep
can only lower the error, and a fit worse than the identity factor (which scores exactly 1) is
replaced by it, so the error never exceeds 1. ALS finds a local minimum, not always the best
one. Check the report before serving a converted adapter.

Runs in: the CLI process (`flora-vllm convert`), offline; no vLLM import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from flora_vllm.adapter import save_adapter
from flora_vllm.ops.torch_ops import dense_flora_weight

LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
REPORT_NAME = "conversion_report.json"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class LoRAConversionError(ValueError):
    """A LoRA folder that cannot be converted; the message lists every problem."""

    def __init__(self, adapter: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Cannot convert {adapter}: {len(problems)} problem(s):\n{lines}")


@dataclass
class LoRAModule:
    """One LoRA module: a [r, in], b [out, r] and the scale s, so ΔW = s · b @ a."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """ΔW = s · B A, [out, in], in float64."""
        return self.scale * (self.b.double() @ self.a.double())


def _pattern_value(pattern: Mapping[str, float], path: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a path ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def read_lora(lora_dir: str) -> tuple[dict, dict[str, LoRAModule]]:
    """Read a PEFT LoRA folder: its config and module path -> factors with PEFT's scale.

    Raises:
        LoRAConversionError listing every feature FLoRA cannot express (DoRA, trained biases,
        embedding LoRA, modules_to_save, fan_in_fan_out) and every malformed tensor.
    """
    cfg_path = os.path.join(lora_dir, LORA_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No adapter config at {cfg_path}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora) has a magnitude vector FLoRA cannot express")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r}: trained biases cannot be converted")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} hold full weights, not LoRA")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (Conv1D weights) is not supported; FLoRA adapts nn.Linear")
    files = [os.path.join(lora_dir, n) for n in LORA_WEIGHTS]
    files = [p for p in files if os.path.isfile(p)]
    if not files:
        problems.append(f"no weights file ({' or '.join(LORA_WEIGHTS)})")
        raise LoRAConversionError(lora_dir, problems)
    if files[0].endswith(".safetensors"):
        with safe_open(files[0], framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = torch.load(files[0], map_location="cpu", weights_only=True)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            problems.append(f"tensor {key!r} is not a linear LoRA factor (lora_A / lora_B)")
            continue
        pairs.setdefault(m["path"], {})[m["ab"]] = t
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    modules = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"module {path!r} lacks lora_{'AB'.replace(''.join(pair), '')}")
            continue
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(
                f"module {path!r}: lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)} are not [r, in] and [out, r]"
            )
            continue
        r = a.shape[0]
        mod_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, path, alpha))
        scale = mod_alpha / math.sqrt(r) if rslora else mod_alpha / r
        modules[path] = LoRAModule(a, b, scale)
    if not modules and not problems:
        problems.append("no LoRA modules found")
    if problems:
        raise LoRAConversionError(lora_dir, problems)
    return cfg, modules


def load_base_weights(base_model_dir: str, paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """W0 [out, in] of each module path, read lazily from the model's safetensors files (one
    tensor at a time, so a large model need not fit in memory), else via transformers."""
    weight_map: dict[str, str] = {}
    index = os.path.join(base_model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.isdir(base_model_dir):
        for name in sorted(os.listdir(base_model_dir)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(base_model_dir, name), framework="pt") as f:
                    weight_map.update({k: name for k in f.keys()})
    if all(f"{p}.weight" in weight_map for p in paths):
        out = {}
        for p in paths:
            file = os.path.join(base_model_dir, weight_map[f"{p}.weight"])
            with safe_open(file, framework="pt") as f:
                out[p] = f.get_tensor(f"{p}.weight")
        return out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    mods = dict(model.named_modules())
    missing = [p for p in paths if not isinstance(mods.get(p), torch.nn.Linear)]
    if missing:
        raise LoRAConversionError(
            base_model_dir, [f"module {p!r} is not an nn.Linear of this model" for p in missing]
        )
    return {p: mods[p].weight.detach() for p in paths}


def _initial_a(wsq: torch.Tensor, wt: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """A start for A [rank, in]: the top right singular vectors of M = W0∘T / W0², regularised
    to M ≈ 1 (the identity) where W0² is tiny, since those entries carry almost no weight."""
    reg = 1e-3 * float(wsq.mean()) + 1e-300
    m = (wt + reg) / (wsq + reg)  # [out, in]
    k = min(rank, *m.shape)
    if min(m.shape) <= 2048:
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:  # randomized SVD for large layers, seeded
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(m, q=k + 8, niter=4)
        vh = v.T
    a = torch.zeros(rank, m.shape[1], dtype=torch.float64)
    a[:k] = s[:k].sqrt().unsqueeze(1) * vh[:k]
    if rank > k:  # more components than the matrix has: extra rows get random directions
        gen = torch.Generator().manual_seed(seed)
        a[k:] = torch.randn(rank - k, m.shape[1], generator=gen, dtype=torch.float64)
    return a


def fit_flora(
    w0: torch.Tensor,
    target: torch.Tensor,
    rank: int,
    iters: int = 50,
    tol: float = 1e-7,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` factors minimising ||W0 ∘ (B A) − target||_F by alternating least squares.

    Args:
        w0: [out, in] frozen weight.
        target: [out, in] weight to reach (W0 + ΔW).
        iters: at most this many (B, A) sweeps.
        tol: stop when a sweep lowers the squared error by less than this fraction of itself
            (or once the relative error is below 1e-12).
    Returns:
        a [rank, in], b [out, rank] (float64, no scale: W0 ∘ (b @ a) approximates target) and the
        relative error ||W0 ∘ (b a) − target|| / ||target − W0|| (0 if both are 0).
    """
    w0, target = w0.double(), target.double()
    out_f, in_f = w0.shape
    wsq = w0 * w0  # [out, in] weights of the fit of M
    wt = w0 * target  # [out, in] = W0² ∘ M, with no division by W0
    a = _initial_a(wsq, wt, rank, seed)
    b = torch.zeros(out_f, rank, dtype=torch.float64)
    ref = float((target - w0).pow(2).sum())
    eye = torch.eye(rank, dtype=torch.float64)

    def solve(weights: torch.Tensor, rhs_w: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        # rows x_i of X [n, r] minimising Σ_j weights_ij (x_i · fixed[:, j] − M_ij)²
        outer = (fixed.unsqueeze(1) * fixed.unsqueeze(0)).reshape(rank * rank, -1)  # [r², m]
        gram = (weights @ outer.T).view(-1, rank, rank)  # [n, r, r]
        rhs = rhs_w @ fixed.T  # [n, r]
        # A tiny ridge keeps rows whose weights are all (near) zero solvable; it barely moves
        # the others (relative 1e-12 of the largest Gram diagonal).
        diag = gram.diagonal(dim1=1, dim2=2)
        ridge = 1e-12 * float(diag.max()) + 1e-300
        return torch.linalg.solve(gram + ridge * eye, rhs.unsqueeze(-1)).squeeze(-1)

    def err() -> float:
        return float((dense_flora_weight(w0, a, b) - target).pow(2).sum())

    prev = math.inf
    for _ in range(max(iters, 1)):
        b = solve(wsq, wt, a)  # [out, r]
        a = solve(wsq.T, wt.T, b.T).T  # [r, in]
        cur = err()
        if cur <= 1e-24 * ref or prev - cur <= tol * cur:
            break
        prev = cur
    if err() > ref:  # never worse than dropping the adapter: fall back to the identity
        a, b = torch.zeros_like(a), torch.zeros_like(b)
        a[0], b[:, 0] = 1.0, 1.0
    # Balance each component (b_k c, a_k / c leaves b a unchanged) so neither factor is huge.
    c = (b.norm(dim=0) / math.sqrt(out_f)) / (a.norm(dim=1) / math.sqrt(in_f)).clamp(min=1e-300)
    c = c.clamp(min=1e-300).sqrt()
    a, b = a * c.unsqueeze(1), b / c.unsqueeze(0)
    rel = math.sqrt(err() / ref) if ref > 0 else (0.0 if err() == 0 else math.inf)
    return a, b, rel


@dataclass
class ConversionReport:
    """Relative fit error ||W0 ∘ (B'A') − (W0 + ΔW)||_F / ||ΔW||_F per module and overall."""

    rank: int
    modules: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    delta_norms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON written as conversion_report.json."""
        return {
            "rank": self.rank,
            "overall_relative_error": self.overall,
            "modules": {
                p: {"relative_error": e, "lora_delta_norm": self.delta_norms[p]}
                for p, e in self.modules.items()
            },
        }

    def table(self) -> str:
        """A plain-text table, one module per line, then the overall error."""
        width = max(len(p) for p in self.modules)
        rows = [f"{'module':<{width}}  rel. error  ||ΔW||_F"]
        rows += [
            f"{p:<{width}}  {e:10.4f}  {self.delta_norms[p]:.4g}" for p, e in self.modules.items()
        ]
        rows.append(f"{'overall':<{width}}  {self.overall:10.4f}")
        return "\n".join(rows)


def convert_lora_to_flora(
    lora_dir: str,
    base_model_dir: str,
    out_dir: str,
    rank: int = 1,
    iters: int = 50,
    progress: bool = True,
) -> ConversionReport:
    """Fit a rank-`rank` FLoRA adapter to a PEFT LoRA adapter, module by module, and write it
    (with `flora_alpha = rank`, so the stored factors are the fitted ones) plus
    `conversion_report.json` to `out_dir`. Returns the fit errors; see the module docstring for
    why they can be large."""
    from tqdm.auto import tqdm

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}")
    cfg, modules = read_lora(lora_dir)
    weights = load_base_weights(base_model_dir, list(modules))
    problems = [
        f"module {p!r}: LoRA ΔW is {[m.b.shape[0], m.a.shape[1]]}, base weight is "
        f"{list(weights[p].shape)}"
        for p, m in modules.items()
        if tuple(weights[p].shape) != (m.b.shape[0], m.a.shape[1])
    ]
    if problems:
        raise LoRAConversionError(lora_dir, problems)
    report = ConversionReport(rank)
    factors = {}
    num = den = 0.0
    bar = tqdm(modules.items(), desc=f"LoRA -> FLoRA r={rank}", unit="module", disable=not progress)
    for path, mod in bar:
        w0 = weights[path].double()
        delta = mod.delta()
        a, b, rel = fit_flora(w0, w0 + delta, rank, iters)
        dn = float(delta.norm())
        report.modules[path], report.delta_norms[path] = rel, dn
        num, den = num + (rel * dn) ** 2, den + dn**2
        factors[path] = (a.float(), b.float())
        bar.set_postfix(rel_err=f"{rel:.3g}")
    report.overall = math.sqrt(num / den) if den > 0 else 0.0
    base_name = cfg.get("base_model_name_or_path") or base_model_dir
    save_adapter(out_dir, factors, rank, float(rank), base_name)
    with open(os.path.join(out_dir, REPORT_NAME), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`flora-vllm convert LORA BASE --output DIR [--rank R] [--iters N]`."""
    p = argparse.ArgumentParser(
        prog="flora-vllm convert",
        description="Approximate a PEFT LoRA adapter by a FLoRA adapter (weighted ALS fit); "
        "prints the relative error per module (0 = exact, 1 = no better than the base model).",
    )
    p.add_argument("lora_dir", help="PEFT LoRA adapter folder")
    p.add_argument("base_model", help="the base model folder the LoRA was trained on")
    p.add_argument("--output", "-o", required=True, help="FLoRA adapter folder to write")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--iters", type=int, default=50, help="alternating least-squares sweeps")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    report = convert_lora_to_flora(
        args.lora_dir, args.base_model, args.output, args.rank, args.iters
    )
    print(report.table())
    print(f"saved FLoRA adapter (rank {args.rank}) and {REPORT_NAME} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
