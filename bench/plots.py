"""PNG plots from recorded results: GB/s against hidden size (LayerNorm), TFLOP/s against sequence length
(attention), TFLOP/s against tokens (GELU FFN), tokens/s per implementation (the whole model).

Each benchmark stores the plotted quantities in its rows' `extra` (e.g. {"hidden": 768, "tokens": 4096}); a plot
has one panel per value of the panel keys (e.g. head dim and causal for attention) and one line per implementation,
for the forward+backward pass and the first dtype recorded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# op -> (x key in a row's extra, x label, log x, panel keys)
LINE_PLOTS = {
    "layer_norm": ("hidden", "hidden size", True, ("tokens",)),
    "attention": ("seq_len", "sequence length", True, ("head_dim", "causal", "dropout_p")),
    "linear_gelu": ("tokens", "tokens", True, ("d_model", "d_ff")),
}


def _load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data["environment"], data["rows"]


def draw_line_plot(path: Path, op: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, log_x, panel_keys = LINE_PLOTS[op]
    env, rows = _load(path)
    rows = [r for r in rows if r["pass_"] == "fwd+bwd" and key in r.get("extra", {})]
    if not rows:
        return None
    dtype = rows[0]["dtype"]
    panels: dict[tuple, dict[str, dict[float, float]]] = {}
    for r in rows:
        if r["dtype"] == dtype:
            panel = tuple(r["extra"].get(k) for k in panel_keys)
            panels.setdefault(panel, {}).setdefault(r["impl"], {})[r["extra"][key]] = r["metric"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], sorted(panels.items(), key=lambda item: str(item[0]))):
        for impl, points in sorted(series.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=impl)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel(rows[0]["unit"])
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{op} fwd+bwd, {dtype}: {env['device']}", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_bar_plot(path: Path, op: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env, rows = _load(path)
    rows = [r for r in rows if r["pass_"] == "fwd+bwd"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(rows)))
    ax.barh([f"{r['impl']} {r['shape']} {r['dtype']}" for r in rows], [r["metric"] for r in rows])
    ax.set_xlabel(rows[0]["unit"])
    ax.set_title(f"{op} fwd+bwd: {env['device']}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_all(folder: Path) -> list[Path]:
    """Draws a plot for each recorded result in `folder`; returns the files written (none without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    for path in sorted(Path(folder).glob("*.json")):
        if "environment" not in json.loads(path.read_text()):
            continue  # a training run's record kept beside the benchmarks (finetune.json, translation.json)
        op = path.stem
        out = draw_line_plot(path, op) if op in LINE_PLOTS else draw_bar_plot(path, op)
        if out is not None:
            written.append(out)
    return written
