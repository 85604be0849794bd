"""The Python API: `candorlm.load(DIR)` returns a model that generates text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from candorlm.generation import generate_ids
from candorlm.model.io import load_model, resolve_device


class LoadedModel:
    """A model directory loaded for inference: the transformer, its tokenizer and defaults."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from candorlm.tokenizer import Tokenizer

        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, device=device)
        self.tokenizer = Tokenizer.load(self.model_dir)
        gpath = self.model_dir / "generation_config.json"
        self.generation_config = json.loads(gpath.read_text()) if gpath.is_file() else {}
        sp = self.tokenizer.special_ids
        self.stop_ids = {sp["bos"], sp["end"]}

    @property
    def config(self):
        return self.model.cfg

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 heal: bool = True, repetition_penalty: float | None = None) -> str:
        """The completion of `prompt` (without the prompt). temperature=0 is greedy. Settings
        left None take the model directory's generation_config.json."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, heal, repetition_penalty))

    def _healing(self, ids: list[int]) -> tuple[list[int], torch.Tensor | None, bytes]:
        """Token healing: drop the prompt's last token and make the first generated token
        start with its bytes. A prompt ending in "def " otherwise ends on a lone-space token
        the model rarely saw, since the tokenizer attaches leading spaces to words."""
        if len(ids) < 2:
            return ids, None, b""
        tail = self.tokenizer.id_to_bytes(ids[-1])
        if not tail:
            return ids, None, b""
        allowed = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
        allowed[self.tokenizer.ids_starting_with(tail)] = True
        return ids[:-1], allowed, tail

    def stream(self, prompt: str, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
               heal: bool = True, repetition_penalty=None):
        """Yield the completion as text pieces; bytes of a character split across tokens are
        held back until the character is whole. heal: token healing (see `_healing`)."""
        g = self.generation_config
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        allowed, skip = None, b""
        if heal:
            ids, allowed, skip = self._healing(ids)
        pending = b""
        for tok in generate_ids(
            self.model, ids,
            max_new_tokens=g.get("max_new_tokens", 128) if max_new_tokens is None else max_new_tokens,
            temperature=g.get("temperature", 0.8) if temperature is None else temperature,
            top_k=g.get("top_k", 0) if top_k is None else top_k,
            top_p=g.get("top_p", 1.0) if top_p is None else top_p,
            repetition_penalty=g.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            seed=seed, stop_ids=self.stop_ids, first_allowed=allowed,
        ):
            pending += self.tokenizer.id_to_bytes(tok)
            if skip:  # the healed prompt bytes are the prompt's, not the completion's
                pending, skip = pending[len(skip):], b""
            try:
                text = pending.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data":
                    continue
                text = pending.decode("utf-8", errors="replace")
            pending = b""
            yield text
        if pending:
            yield pending.decode("utf-8", errors="replace")


def load(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    if resolve_device(device).type == "cpu":
        from candorlm.device import configure_cpu_allocator

        configure_cpu_allocator()
    return LoadedModel(model_dir, device=device)
