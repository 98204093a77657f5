"""The GPU benchmark's result files: ``<name>.json``, ``<name>.md`` and, where matplotlib is installed,
``<name>.png`` (the GPU machine has no matplotlib: the run still succeeds without the chart)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["markdown", "write_results"]

logger = logging.getLogger(__name__)

VARIANT_NAMES = {
    "base": "base (slotted engine, no adapter)",
    "merged": "merged (adapter folded in)",
    "dynamic_1": "dynamic, 1 adapter",
    "dynamic_8": "dynamic, 8 mixed adapters",
}


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else x  # 4 significant digits
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


def markdown(r: dict[str, Any]) -> str:
    floor = r["floor"]
    modes = list(r["plan"]["step_modes"]) or [r["plan"]["step"]]
    lines = [
        f"# GPU benchmark: {r['name']}" + (" (dry run: tiny shapes on the CPU)" if r["dry_run"] else ""),
        "",
        f"Command: `{r['command']}`",
        "",
        f"Device: {r['device']}; machine: `{json.dumps(r['machine'])}`; {r['seconds']:.0f} s in all.",
        "",
        f"Engine settings from `{r['production_config']}`; step modes compared (`engine.step`): "
        f"{', '.join(modes) or '-'}"
        + (
            " (cuda_graphs runs as static here: the same padded step, uncaptured, as the CPU has no CUDA)."
            if r["dry_run"]
            else "."
        ),
        "",
        f"Bandwidth floor: {floor.get('weights_read_per_step_gb', math.nan):.3f} GB of weights read per "
        f"decode step / {floor['hbm_tb_s']} TB/s = **{floor.get('floor_ms', math.nan):.4f} ms** per step "
        f"(Qwen3-VL-8B: {floor.get('qwen3_vl_8b_weights_read_per_step_gb', math.nan):.2f} GB, "
        f"{floor.get('qwen3_vl_8b_floor_ms', math.nan):.2f} ms). A decode step gives every running row one "
        "token, so ms/token is the step's time; x floor divides it by the floor of the weights the variant "
        "reads (the base's, plus the LoRA slots its rows use).",
        "",
    ]
    if "error" in r:
        lines += [f"**The run failed**: `{r['error']}`; what was measured before is below.", ""]
    lines += [
        "## Decode ms/token (p50 of steps with exactly that many decoding rows), x the bandwidth floor",
        "",
    ]
    batches = sorted({b for m in r["decode"].values() for v in m.values() for b in v}, key=int)
    head = " | ".join(f"{m} b={b}" for b in batches for m in modes)
    lines += [f"| variant | {head} |", "|---" * (1 + len(batches) * len(modes)) + "|"]
    for variant, label in VARIANT_NAMES.items():
        cells = []
        for b in batches:
            for m in modes:
                f = r["decode"].get(m, {}).get(variant, {}).get(b)
                cells.append(f"{f['ms_per_token']:.3f} ({f['x_floor']:.1f}x)" if f else "-")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    shot = r.get("screenshot", {})
    lines += [
        "",
        f"## Time to first token: one {shot.get('size', '?')} screenshot "
        f"({shot.get('image_tokens', '?')} image tokens, {shot.get('prompt_tokens', '?')} prompt tokens), "
        "idle engine, through Scheduler.stream",
        "",
        "| step mode | variant | client ms | engine ms (submitted -> first token) |",
        "| --- | --- | --- | --- |",
    ]
    for m, variants in r["ttft"].items():
        for v, f in variants.items():
            lines.append(f"| {m} | {VARIANT_NAMES[v]} | {f['ms']:.1f} | {f['engine_ms']:.1f} |")
    lines += [
        "",
        "## Decode details",
        "",
        "| step mode | variant | batch | ms/token | p90 ms | tokens/s | floor ms | KV read GB (≈) | "
        "floor with KV ms | x floor with KV | steps | join steps | leave steps |",
        "|---" * 13 + "|",
    ]
    for m, variants in r["decode"].items():
        for v, by_batch in variants.items():
            for b, f in by_batch.items():
                lines.append(
                    f"| {m} | {v} | {b} | {f['ms_per_token']:.3f} | {f['p90_ms']:.3f} | {f['tokens_per_s']:.1f} | "
                    f"{f['floor_ms']:.4f} | {f['kv_read_gb']:.4f} | {f['floor_with_kv_ms']:.4f} | "
                    f"{f['x_floor_with_kv']:.2f} | {f['steps']} | {f['join_steps']} | {f['leave_steps']} |"
                )
    lines += ["", "## Memory and time", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| memory {k} | {v} |" for k, v in _rounded(r["memory"]).items()]
    lines += [f"| seconds {k} | {v} |" for k, v in _rounded(r["timings_s"]).items()]
    lines += [f"| skipped (time box) | {', '.join(r['skipped']) or 'nothing'} |"]
    return "\n".join(lines) + "\n"


def _chart(r: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: no chart (%s)", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(r["decode"])  # the modes measured
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4.5), squeeze=False)
    for ax, m in zip(axes[0], modes, strict=False):
        for variant, by_batch in r["decode"][m].items():
            b = sorted(by_batch, key=int)
            ax.plot([int(x) for x in b], [by_batch[x]["ms_per_token"] for x in b], marker="o", label=variant)
        ax.axhline(r["floor"]["floor_ms"], color="grey", linestyle="--", label="bandwidth floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding rows")
        ax.set_ylabel("ms / token")
        ax.set_title(f"engine.step = {m}")
        ax.legend()
    fig.suptitle(f"{r['name']} ({r['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.json and .md (and .png when matplotlib imports); the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _rounded(result)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(result))
    try:
        if _chart(result, out_dir / f"{name}.png"):
            paths.append(out_dir / f"{name}.png")
    except Exception:  # the chart is a picture of the files above, never a reason to fail the run
        logger.exception("no chart for %s", name)
    return paths
