"""`fastgpt sample --checkpoint PATH`: text from a trained model (weights, settings and tokenizer from the checkpoint)."""

from __future__ import annotations

import torch

from ..data.tokenizer import prompt_ids
from . import checkpoint as ckpt_io
from .config import PretrainConfig
from .distributed import resolve_device
from .pretrain import autocast, autocast_dtype, backend_context, build_model


def load_model(path: str, device: torch.device):
    """(model in eval mode, tokenizer, checkpoint meta) from a checkpoint, run, or checkpoints directory."""
    def build(meta, ckpt):
        model, model_config = build_model(PretrainConfig(**meta["config"]), meta["data"]["vocab_size"])
        ckpt_io.check_model_config(meta["model_config"], model_config, ckpt)
        return model

    return ckpt_io.load_trained(path, ckpt_io.LANGUAGE_MODEL, build, device)


@torch.no_grad()
def sample(checkpoint: str, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 40, top_p: float | None = None, seed: int = 0, device: str = "auto",
           backend: str | None = None) -> list[str]:
    """Continuations of `prompts`; top_k 0 (or None) and top_p None sample from the whole distribution."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    dev = resolve_device(device, 0, 1)
    with backend_context(backend, dev):
        model, tokenizer, meta = load_model(checkpoint, dev)
        amp_dtype = autocast_dtype(PretrainConfig(**{**meta["config"], "precision": "auto"}), dev)
        torch.manual_seed(seed)
        texts = []
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=dev)
            with autocast(dev, amp_dtype):
                out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                                     top_p=top_p)
            texts.append(tokenizer.decode(out[0].tolist()))
    return texts
