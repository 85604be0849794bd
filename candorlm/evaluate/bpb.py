"""Bits per byte: the validation figure pretraining logs and `candor eval` prints.

The summed next-token cross-entropy over fixed validation windows, in bits, divided by the
UTF-8 bytes the scored target tokens stand for; the first token of each window is context
only. Unlike a per-token loss it is comparable across tokenizers (nanochat's convention).
Special tokens stand for no text (0 bytes) and are left out of both sums.

It does not choose the windows (data/loader.eval_windows spreads them over the split), run
benchmark tasks, or put the model back in any mode but the one it found.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from candorlm.data.loader import eval_windows
from candorlm.data.shards import check_tokenizer, load_meta


def token_bytes_for(tokenizer_dir, tokens_dir=None) -> torch.Tensor:
    """The tokenizer's token -> byte-length table; with tokens_dir, after checking that those
    shards were made with this tokenizer."""
    from candorlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    if tokens_dir is not None:
        check_tokenizer(load_meta(tokens_dir), tok, tokens_dir, tokenizer_dir)
    return torch.as_tensor(np.asarray(tok.token_bytes(), dtype=np.int64))


@torch.no_grad()
def evaluate_bpb(model, tokens: np.ndarray, token_bytes: torch.Tensor, seq_len: int, max_tokens: int,
                 batch_size: int, amp_dtype=None, device="cpu") -> dict:
    """{"val_bpb": bits per byte, "val_loss": mean nats per scored token, "val_tokens": tokens
    scored} over at most max_tokens targets of the windows eval_windows gives."""
    was_training = model.training
    model.eval()
    nats, nbytes, ntok = 0.0, 0, 0
    for x, y in eval_windows(tokens, seq_len, max_tokens, batch_size):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.split(":")[0], dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(x, y, reduction="none").float()
        b = token_bytes.to(device)[y]
        keep = b > 0
        nats += loss[keep].sum().item()
        nbytes += int(b.sum().item())
        ntok += int(keep.sum().item())
    model.train(was_training)
    return {"val_bpb": nats / math.log(2) / max(1, nbytes), "val_loss": nats / max(1, ntok), "val_tokens": ntok}
