"""Training metrics: model FLOPs and utilisation (MFU), the metrics files, TensorBoard events, the loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s for bf16/fp16 with fp32 accumulation, from the vendors' data
# sheets. Matched against torch.cuda.get_device_name() by substring, first match wins (so "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention: 6 per weight per token for the
    matrix products (the position embedding is a lookup, so callers pass parameters without it), plus
    12 * layers * width * context for the attention scores and their weighted sum (causal masking not discounted)."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * block_size


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): the GPU table, else a measured matrix-product rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                scale = 0.5 if dtype == torch.float32 else 1.0  # TF32 tensor cores: half the bf16 rate
                return tflops * 1e12 * scale, f"{name} data sheet"
    return measured_matmul_flops(device, dtype), f"measured {dtype} matmul on {device}"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.3) -> float:
    """The best rate of repeated square matrix products: an attainable peak where no data sheet applies."""
    size = size or (4096 if device.type == "cuda" else 1024)
    # A private generator: the training RNG (dropout masks) must not move, or a resumed run would diverge.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and, when available, TensorBoard events in <run>/tensorboard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            # A resumed run drops the records written after its checkpoint, which the continuation will redo.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.writer = None
        self.note = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                self.note = "TensorBoard events skipped: pip install tensorboard"
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_loss_curve(metrics_path: Path, png_path: Path, baseline: float | None) -> str | None:
    """Train and validation loss against step, with the unigram baseline; returns a note when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss curve skipped: pip install matplotlib"
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return None
