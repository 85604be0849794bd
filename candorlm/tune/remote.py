"""A running `candor serve` as the model of `candor chat --url URL`: the few things the chat's
conversation logic (tune/chat.py: Chat) asks of a model, answered over HTTP with the standard
library. The context window is the server's (/v1/models), chats are rendered by the server's
/tokenize, answers stream from /v1/completions with the rendered ids as the prompt, so the
window logic is the same as with a local model. Generates nothing itself.

Stopping an answer (Ctrl-C) closes the connection, and the server cancels the request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

from candorlm.config import GenerationConfig
from candorlm.errors import CandorError
from candorlm.tokenizer import SPECIAL_NAMES


class RemoteModel:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        self.url, self.key, self.timeout = url.rstrip("/"), api_key, timeout
        [info] = self._json("GET", "/v1/models")["data"]
        self.name = info["id"]
        self.config = SimpleNamespace(max_seq_len=info["max_model_len"])
        self.generation_config = GenerationConfig.from_dict(info.get("generation_config") or {})
        self.tokenizer = _RemoteTokenizer(self)

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {e.code}"
            raise CandorError(f"the server at {self.url} answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise CandorError(f"cannot reach a server at {self.url}: {getattr(e, 'reason', e)}") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())

    def sampling(self, **settings) -> GenerationConfig:
        return self.generation_config.updated(**settings)

    def stream_ids(self, ids: list[int], stop_ids: set[int] | None = None, **settings):
        """Text pieces of the answer to the prompt `ids`, as the server streams them."""
        g = self.sampling(**settings)
        body = {"model": self.name, "prompt": list(ids), "stream": True, "max_tokens": g.max_new_tokens,
                "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
                "repetition_penalty": g.repetition_penalty, "seed": g.seed, "stop_token_ids": sorted(stop_ids or [])}
        with self._open("POST", "/v1/completions", body) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise CandorError(f"the server stopped the answer: {event['error']['message']}")
                for choice in event["choices"]:
                    if choice["text"]:
                        yield choice["text"]


class _RemoteTokenizer:
    """What Chat asks of a tokenizer: the chat layout (rendered by the server) and the special ids."""

    def __init__(self, model: RemoteModel):
        self.model = model
        self.special_ids = {n: i for i, n in enumerate(SPECIAL_NAMES)}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.model._json("POST", "/tokenize", {"model": self.model.name, "messages": messages,
                                                      "add_generation_prompt": add_generation_prompt})["tokens"]
