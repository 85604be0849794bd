"""Recovery fine-tune of a pruned model: a short AdamW run over the training shards in which the
pruned weights stay zero: their gradients are masked (so they count neither in the clipping
norm nor in AdamW's moments) and the mask is applied again after every step, so no optimizer
arithmetic can revive them.

A plain loop, not the pretraining loop: no checkpoints, no resume, no evaluation, no time
budget; every parameter trains (the remaining weights, embedding and norms).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from candorlm.data.loader import TrainBatches
from candorlm.data.shards import check_tokenizer, load_meta, open_split
from candorlm.device import autocast_dtype

DEFAULT_LR = 3e-4  # a tenth of pretraining's AdamW lr (train.lr 3e-3): the model is near a minimum already
BATCH_SIZE = 16
GRAD_CLIP = 1.0


def check_tokens(tokens_dir, model_dir, split: str) -> np.ndarray:
    """The split of tokens_dir, after checking it was made with model_dir's tokenizer."""
    from candorlm.tokenizer import Tokenizer

    check_tokenizer(load_meta(tokens_dir), Tokenizer.load(model_dir), tokens_dir, model_dir)
    return open_split(tokens_dir, split)


def recover(model: nn.Module, masks: dict[str, torch.Tensor], tokens_dir, steps: int, lr: float | None = None,
            seq_len: int | None = None, batch_size: int = BATCH_SIZE, seed: int = 0,
            log=lambda *a: None) -> list[float]:
    """Train `model` for `steps` AdamW steps (lr decaying linearly to 0) with the weights that
    `masks` (module name -> bool, True = kept) drop held at zero. Returns the loss per step."""
    lr = lr or DEFAULT_LR
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    batches = TrainBatches(open_split(tokens_dir, "train"), seq_len, batch_size, seed)
    weights = {name: model.get_submodule(name).weight for name in masks}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = autocast_dtype("cpu", "auto")
    model.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / steps)
        x, y = batches.get(step)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, y)
        loss.backward()
        for name, w in weights.items():
            w.grad.mul_(masks[name])
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(masks[name])
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            log(f"recovery step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    model.eval()
    return losses
