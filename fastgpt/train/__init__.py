"""GPT-1 pretraining (settings and presets, the training loop, checkpoints, metrics, sampling) and fine-tuning
(finetune.py)."""

from .config import PRESETS, PretrainConfig
from .pretrain import pretrain

__all__ = ["PRESETS", "PretrainConfig", "pretrain"]
