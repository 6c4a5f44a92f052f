"""Plots of the benchmark JSON files (matplotlib, imported lazily: without it nothing is drawn).

    serving (serving_bench.py): output tok/s and TPOT against rank, one row per adapter count N,
        one line per mode (base flat), the inflection rank (FLoRA tok/s < LoRA's) marked.
    layer (layer_bench.py): time / base time against rank, one panel per (shape, tokens), one
        line per path, the measured and the cost model's inflection (vs the paper's bmm) marked.
    served_layer (served_layer_bench.py): per served layer, time / vLLM's packed GEMM against
        tokens (one line per path) and the FLoRA path's parts per T (stacked bars).

The benchmark scripts call these at the end; re-plot a saved file with
`python benchmarks/plot.py benchmarks/results/<file>.json [--out file.png]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # noqa: E402

MODE_STYLE = {
    "base": {"color": "black", "linestyle": "--"},
    "base-lora": {"color": "grey", "linestyle": "-."},
    "lora": {"color": "tab:blue", "marker": "s"},
    "flora": {"color": "tab:red", "marker": "o"},
    "mixed": {"color": "tab:purple", "marker": "^"},
    "dora": {"color": "tab:cyan", "marker": "D"},
    "ia3": {"color": "tab:green", "linestyle": ":"},
}
PATH_STYLE = {
    "flora_torch": {"color": "tab:red", "marker": "o"},
    "flora_triton": {"color": "darkred", "marker": "*"},
    "lora_bmm": {"color": "tab:blue", "marker": "s"},
    "lora_gathered": {"color": "tab:cyan", "marker": "v"},
    "vllm_lora_torch": {"color": "tab:green", "marker": "^"},
    "vllm_lora_triton": {"color": "darkgreen", "marker": "D"},
}


def _log2_ranks(ax: Any, ranks: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank")


def plot_serving(result: dict[str, Any], png: str) -> str | None:
    """Output throughput and median TPOT vs rank per mode, one row per adapter count."""
    plt = common.pyplot()
    if plt is None:
        return None
    runs = [r for r in result["runs"] if r.get("metrics")]
    ranks = sorted({r["rank"] for r in runs if r["rank"] is not None})
    counts = sorted({r["num_adapters"] for r in runs if r["num_adapters"]}) or [0]
    base = next((r for r in runs if r["mode"] == "base"), None)
    panels = (("output_throughput", "output tok/s"), ("median_tpot_ms", "median TPOT (ms)"))
    fig, axes = plt.subplots(
        len(counts), 2, figsize=(11, 3.6 * len(counts)), squeeze=False, constrained_layout=True
    )
    for row, n in enumerate(counts):
        infl = result.get("summary", {}).get(str(n), {}).get("inflection_rank")
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for mode in ("lora", "flora", "mixed", "dora"):
                pts = sorted(
                    (r["rank"], r["metrics"].get(key))
                    for r in runs
                    if r["mode"] == mode and r["num_adapters"] == n
                    and r["metrics"].get(key) is not None
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=mode, **MODE_STYLE[mode])
            if base and base["metrics"].get(key) is not None:
                ax.axhline(
                    base["metrics"][key], label="plain vLLM (LoRA off)", **MODE_STYLE["base"]
                )
            base_lora = next(
                (r for r in runs if r["mode"] == "base-lora" and r["num_adapters"] == n), None
            )
            if base_lora and base_lora["metrics"].get(key) is not None:
                ax.axhline(
                    base_lora["metrics"][key], label="base requests, adapters on",
                    **MODE_STYLE["base-lora"],
                )
            ia3 = next((r for r in runs if r["mode"] == "ia3" and r["num_adapters"] == n), None)
            if ia3 and ia3["metrics"].get(key) is not None:
                ax.axhline(ia3["metrics"][key], label="IA3 (no rank)", **MODE_STYLE["ia3"])
            if infl:
                ax.axvline(infl, color="grey", linestyle=":", linewidth=2)
                ax.annotate(
                    f" inflection r={infl}", (infl, 0.03), xycoords=("data", "axes fraction"),
                    ha="left", fontsize=8, color="grey",
                )
            if ranks:
                _log2_ranks(ax, ranks)
            ax.set_ylabel(label)
            ax.set_title(f"N = {n} adapters: {label}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    model = result.get("model", {})
    fig.suptitle(
        f"{model.get('arch', '')} {model.get('params_m', '')}M params, "
        f"{result.get('workload', {}).get('name', '')} workload, "
        f"FLORA_EXECUTION={result.get('settings', {}).get('flora_execution', '')}",
        fontsize=11,
    )
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_layer(result: dict[str, Any], png: str) -> str | None:
    """Time / base time vs rank per path, one panel per (shape, tokens)."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = result["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    ranks = sorted({r["rank"] for r in rows})
    fits = {(m["shape"], m["tokens"], m["flora"], m["lora"]): m for m in result["cost_model"]}
    fig, axes = plt.subplots(
        len(shapes), len(tokens), figsize=(3.2 * len(tokens), 2.8 * len(shapes)),
        squeeze=False, constrained_layout=True,
    )
    for i, shape in enumerate(shapes):
        for j, n_tok in enumerate(tokens):
            ax = axes[i][j]
            pts = [r for r in rows if r["shape"] == shape and r["tokens"] == n_tok]
            for path, style in PATH_STYLE.items():
                xy = sorted(
                    (r["rank"], r["median_us"][path] / r["median_us"]["base"])
                    for r in pts
                    if r["median_us"].get(path) and r["median_us"].get("base")
                )
                if xy:
                    ax.plot(*zip(*xy, strict=True), label=path, **style)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="base")
            flora = "flora_triton" if (shape, n_tok, "flora_triton", "lora_bmm") in fits else (
                "flora_torch"
            )
            fit = fits.get((shape, n_tok, flora, "lora_bmm"))
            if fit and fit.get("measured_inflection"):
                ax.axvline(fit["measured_inflection"], color="grey", linestyle=":", linewidth=2)
            if fit and fit.get("predicted_inflection"):
                ax.axvline(fit["predicted_inflection"], color="orange", linestyle="--")
            _log2_ranks(ax, ranks)
            ax.set_yscale("log")
            ax.set_title(f"{shape} T={n_tok}", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("time / base")
    axes[0][0].legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(
        f"one adapted linear layer, every token its own adapter ({s['device']}, {s['dtype']})\n"
        "inflection vs lora_bmm: grey dotted measured, orange dashed cost model (Eq. 7)",
        fontsize=10,
    )
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


SERVED_STYLE = {
    "base_tokens": {"color": "grey", "linestyle": "-.", "marker": "."},
    "flora_all_1": {"color": "tab:red", "marker": "o"},
    "flora_all_T": {"color": "darkred", "marker": "s"},
    "flora_half_1": {"color": "tab:orange", "marker": "o", "linestyle": ":"},
    "flora_half_T": {"color": "tab:brown", "marker": "s", "linestyle": ":"},
    "flora_tied_T": {"color": "tab:purple", "marker": "*"},
    "lora_1": {"color": "tab:cyan", "marker": "^"},
    "lora_T": {"color": "tab:blue", "marker": "v"},
}
PART_COLORS = {
    "gather": "tab:olive", "scale_in": "tab:orange", "gemm": "tab:blue", "scale_out": "tab:red",
    "cat": "tab:purple", "dtype": "tab:pink", "bias": "tab:cyan", "finite": "tab:gray",
    "other_ops": "tab:brown", "python": "black",
}


def plot_served_layer(result: dict[str, Any], png: str) -> str | None:
    """Left: time / packed GEMM vs T per path; right: parts of `flora_all_T` per T, in units of
    the packed GEMM's profiled time (stacked bars)."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = result["results"]
    layers = list(dict.fromkeys((r["model"], r["layer"]) for r in rows))
    fig, axes = plt.subplots(
        len(layers), 2, figsize=(11, 2.6 * len(layers)), squeeze=False, constrained_layout=True
    )
    for i, (model, name) in enumerate(layers):
        pts = sorted((r for r in rows if (r["model"], r["layer"]) == (model, name)),
                     key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in pts]
        ax = axes[i][0]
        for path, style in SERVED_STYLE.items():
            xy = [(r["tokens"], r["times"][path]["ratio_to_packed"]) for r in pts
                  if path in r["times"]]
            if xy:
                ax.plot(*zip(*xy, strict=True), label=path, **style)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="packed GEMM")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens)
        ax.set_xticklabels([str(t) for t in tokens])
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / packed GEMM")
        ax.set_title(f"{model} {name} {pts[0]['out_slices']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax = axes[i][1]
        for j, r in enumerate(pts):
            parts = r["breakdown"].get("flora_all_T")
            ref = r["breakdown"].get("packed_gemm", {}).get("profiled_wall_us")
            if not parts or not ref:
                continue
            bottom = 0.0
            for part, color in PART_COLORS.items():
                v = parts.get(part, 0.0) / ref
                ax.bar(j, v, bottom=bottom, color=color, label=part if j == 0 else None)
                bottom += v
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(pts)))
        ax.set_xticklabels([str(t) for t in tokens])
        ax.set_xlabel("tokens T")
        ax.set_ylabel("flora_all_T parts / packed")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=6, ncol=2)
    axes[0][1].legend(fontsize=6, ncol=2)
    s = result["settings"]
    fig.suptitle(
        f"served layers (real <Base>WithFLoRA, vLLM CPU GEMM), rank 1, {s['dtype']}, "
        f"{s['torch_threads']} threads", fontsize=10,
    )
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("result", help="a JSON file written by serving_bench.py or layer_bench.py")
    ap.add_argument("--out", help="PNG path (default: next to the JSON)")
    args = ap.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    png = args.out or args.result.removesuffix(".json") + ".png"
    plot = {"serving": plot_serving, "layer": plot_layer, "served_layer": plot_served_layer}[
        result["kind"]
    ]
    written = plot(result, png)
    if written:
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
