"""The Python API: `candorlm.load(DIR)` returns a model that generates text."""

from __future__ import annotations

from pathlib import Path

import torch

from candorlm.config import GenerationConfig
from candorlm.generation import generate_ids
from candorlm.model.io import load_model, read_generation_config, resolve_device


class LoadedModel:
    """A model directory loaded for inference: the transformer, its tokenizer and its sampling
    defaults (`generation_config`, a config.GenerationConfig read from generation_config.json)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from candorlm.tokenizer import Tokenizer

        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, device=device)
        self.tokenizer = Tokenizer.load(self.model_dir)
        self.generation_config = read_generation_config(self.model_dir)
        sp = self.tokenizer.special_ids
        self.stop_ids = {sp["bos"], sp["end"]}

    @property
    def config(self):
        return self.model.cfg

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 heal: bool | None = None, repetition_penalty: float | None = None) -> str:
        """The completion of `prompt` (without the prompt). temperature=0 is greedy. Settings
        left None take the model directory's generation_config.json, then GenerationConfig's
        defaults."""
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
               heal: bool | None = None, repetition_penalty=None):
        """Yield the completion as text pieces; bytes of a character split across tokens are
        held back until the character is whole. heal: token healing (see `_healing`)."""
        g = self.sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, heal=heal, repetition_penalty=repetition_penalty)
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        allowed, skip = None, b""
        if g.heal:
            ids, allowed, skip = self._healing(ids)
        yield from self._text(generate_ids(self.model, ids, config=g, stop_ids=self.stop_ids, first_allowed=allowed),
                              skip)

    def stream_ids(self, ids: list[int], stop_ids: set[int] | None = None, **settings):
        """`stream` from token ids as they are, without healing: for a chat rendered with
        `tokenizer.render_chat(messages, add_generation_prompt=True)`, the answer, which ends
        at the end-of-turn token. stop_ids: default `self.stop_ids` (<|bos|>, <|end|>);
        settings: GenerationConfig's fields, None taking the model's generation_config.json."""
        g = self.sampling(**settings)
        tokens = generate_ids(self.model, ids, config=g, stop_ids=self.stop_ids if stop_ids is None else stop_ids)
        yield from self._text(tokens, b"")

    def sampling(self, **settings) -> GenerationConfig:
        """The checked sampling settings: those given (not None) over the model directory's
        generation_config.json over GenerationConfig's defaults."""
        return self.generation_config.updated(**settings)

    def _text(self, tokens, skip: bytes):
        """Token ids to text pieces, holding back the bytes of a split character; `skip`: the
        healed prompt bytes, which are the prompt's, not the completion's."""
        pending = b""
        for tok in tokens:
            pending += self.tokenizer.id_to_bytes(tok)
            if skip:
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
