"""Log-likelihoods and generations from a model directory: the one place the evaluation runs
the model, used by the task runner, the bias probes, robustness, HumanEval and the
lm-evaluation-harness adapter alike, so their numbers agree by construction.

What it computes:
* `loglikelihood(pairs)`: for each (context, continuation), the summed log-probability of the
  continuation's tokens after `<|bos|>` + the context, and whether greedy decoding would have
  produced exactly them. Context and continuation are tokenized together and split where the
  context's own tokens end (lm-evaluation-harness's rule; a context's trailing spaces move to
  the continuation first), so "x =" + " 1" is scored as the tokens training saw.
* `token_nats(docs)`: per-token negative log-likelihoods of whole token sequences, in windows
  of the model's context with at least half a context of history after the first window.
* `generate(prompt, until)`: a completion cut at the first stop string.

Requests are scored in batches of similar length (padding on the right; causal attention keeps
padding out of real positions). It does not choose items, prompts or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_BATCH_TOKENS = 8192  # padded tokens per forward: 8192 x 8192 vocab x 4 B = 256 MiB of logits


class Scorer:
    """A loaded model (`candorlm.api.LoadedModel`) for evaluation. precision: "auto" (bf16
    where native, device.autocast_dtype), "fp32" or "bf16"."""

    def __init__(self, loaded, precision: str = "auto", max_batch_tokens: int = MAX_BATCH_TOKENS):
        from candorlm.device import autocast_dtype

        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.precision = "bf16" if self.amp_dtype == torch.bfloat16 else "fp32"
        self.max_len = self.model.cfg.max_seq_len
        self.max_batch_tokens = max_batch_tokens
        self.bos = self.tokenizer.bos_id
        self.pad = self.tokenizer.special_ids["pad"]

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", precision: str = "auto") -> "Scorer":
        from candorlm.api import load

        return cls(load(model_dir, device=device), precision=precision)

    @property
    def model_dir(self) -> Path:
        return self.loaded.model_dir

    # --- tokenization ---
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tokenizer.encode(context) if context else []
        whole = self.tokenizer.encode(context + continuation)
        return [self.bos] + whole[:len(ctx)], whole[len(ctx):]

    # --- the forward passes ---
    def _batches(self, seqs: list[list[int]]):
        """(indices, inputs (B, T), targets (B, T) with -1 past each end) for sequences of
        2 .. max_len + 1 tokens, longest first, at most max_batch_tokens padded inputs each."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        i = 0
        while i < len(order):
            longest = len(seqs[order[i]]) - 1
            batch = order[i:i + max(1, self.max_batch_tokens // max(longest, 1))]
            x = torch.full((len(batch), longest), self.pad, dtype=torch.long)
            y = torch.full((len(batch), longest), -1, dtype=torch.long)
            for r, j in enumerate(batch):
                x[r, :len(seqs[j]) - 1] = torch.tensor(seqs[j][:-1])
                y[r, :len(seqs[j]) - 1] = torch.tensor(seqs[j][1:])
            yield batch, x.to(self.device), y.to(self.device)
            i += len(batch)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _logprobs(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence of 2 .. max_len + 1 tokens, the log-softmax rows (len - 1, vocab)
        predicting seq[1:] from seq[:-1]."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for batch, x, _ in self._batches(seqs):
            with torch.no_grad(), self._autocast():
                lp = F.log_softmax(self.model(x).float(), dim=-1).cpu()
            for r, j in enumerate(batch):
                out[j] = lp[r, :len(seqs[j]) - 1]
        return out  # type: ignore[return-value]

    def _nats(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """-log p of seq[1:] for each sequence, through the model's fused head (no logits kept:
        scoring 64k tokens of an 8k vocabulary would otherwise hold 2 GB of log-probabilities)."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for batch, x, y in self._batches(seqs):
            with torch.no_grad(), self._autocast():
                nats = self.model(x, y, reduction="none").float().cpu()
            for r, j in enumerate(batch):
                out[j] = nats[r, :len(seqs[j]) - 1]
        return out  # type: ignore[return-value]

    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) for token-id pairs (the context starting
        with <|bos|>); the context keeps its end when the two exceed the model's context."""
        seqs, lengths = [], []
        for ctx, cont in pairs:
            seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
            seqs.append(seq)
            lengths.append(min(len(cont), len(seq) - 1))
        out = []
        for seq, n, lp in zip(seqs, lengths, self._logprobs(seqs), strict=True):
            targets = torch.tensor(seq[len(seq) - n:], dtype=torch.long)
            rows = lp[len(lp) - n:]
            out.append((float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())))
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_ids([self.encode_pair(c, x) for c, x in pairs])

    def token_nats(self, docs: list[list[int]]) -> list[np.ndarray]:
        """-log p of every token of each document after `<|bos|>` (the ids exclude it), in
        windows of max_len with a stride of half a context after the first."""
        L, stride = self.max_len, max(1, self.max_len // 2)
        windows, owners = [], []  # (input+target seq, how many final targets are new)
        for d, ids in enumerate(docs):
            if not len(ids):
                continue
            seq = [self.bos] + list(ids)
            end = min(len(seq), L + 1)
            windows.append((seq[:end], end - 1))
            owners.append(d)
            while end < len(seq):
                new_end = min(len(seq), end + stride)
                windows.append((seq[new_end - L - 1:new_end], new_end - end))
                owners.append(d)
                end = new_end
        parts: list[list[np.ndarray]] = [[] for _ in docs]
        for (w, new), nats, d in zip(windows, self._nats([w for w, _ in windows]), owners, strict=True):
            parts[d].append(nats[len(w) - 1 - new:].numpy())
        return [np.concatenate(p) if p else np.zeros(0) for p in parts]

    # --- generation ---
    def generate(self, prompt: str, until: list[str] | tuple[str, ...] = (), max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = 0, heal: bool = True) -> str:
        """The completion of `prompt`, cut before the first of `until`."""
        text = ""
        for piece in self.loaded.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                        heal=heal, top_k=0, top_p=1.0, repetition_penalty=1.0):
            text += piece
            cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
        return text
