"""`candor chat --model DIR`: a multi-turn conversation with a model in the terminal, the
answer streamed as it is generated. No server, no batching (serve/ does those); with
`--url URL` the model is a running `candor serve` (tune/remote.py) and the rest is the same.

Commands: /reset, /system TEXT, /save FILE, /help, /exit. Ctrl-C while the model answers
stops the answer and keeps the conversation; at the prompt, a Ctrl-C right after another one
(or after a stopped answer), /exit or end of input (Ctrl-D) leaves.

The context window. The model sees the system prompt and as many of the latest turns as fit
in its max_seq_len with room left for an answer (max_new_tokens, at most half the window);
when the conversation outgrows that, the oldest turns leave the context (the system prompt
never does), the screen says so, and they do not come back. An answer ends at the
end-of-turn token (or any other special token), or when the window is full: generation
never shifts the context mid-answer.
/save writes every turn, including those no longer in the context.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_bytes

HELP = """commands:
  /reset        start a new conversation (the system prompt stays)
  /system TEXT  set the system prompt (/system alone removes it)
  /save FILE    append this conversation to FILE as one {"messages": [...]} JSONL line (SFT data)
  /help         this list
  /exit         leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while the model answers stops the answer."""


class Chat:
    """A conversation with a loaded model (candorlm.api.LoadedModel) and its context window;
    no terminal here (`run_chat` is the terminal)."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int | None = None, **sampling):
        settings = model.sampling(max_new_tokens=max_new_tokens, heal=False, **sampling)  # checked
        if settings.max_new_tokens < 1:
            raise CandorError(f"max_new_tokens={settings.max_new_tokens} must be >= 1 for a chat")
        self.model = model
        self.max_len = model.config.max_seq_len
        self.max_new_tokens = settings.max_new_tokens
        # An answer ends at <|end|>; any other special token (a role token, <|bos|>, <|pad|>)
        # cannot be part of one either, and would otherwise be printed as its literal.
        self.sampling = {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
                         "repetition_penalty": settings.repetition_penalty, "seed": settings.seed,
                         "stop_ids": set(model.tokenizer.special_ids.values())}
        self.system = None
        self.turns: list[dict] = []  # every user and assistant message, oldest first
        self.first = 0  # turns[first:] are in the context
        if system:
            self.set_system(system)

    def messages(self) -> list[dict]:
        """The whole conversation, as /save writes it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def _prompt(self, turns: list[dict]) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.model.tokenizer.render_chat(head + turns, add_generation_prompt=True)

    def reset(self) -> None:
        self.turns, self.first = [], 0

    def set_system(self, text: str | None) -> None:
        old, self.system = self.system, text or None
        if len(self._prompt([])) >= self.max_len // 2:
            self.system = old
            raise CandorError(f"that system prompt takes half or more of the model's {self.max_len}-token context")

    def fit(self) -> tuple[list[int], int]:
        """The prompt ids of the context, after dropping the oldest turns until an answer has
        room; and how many messages were dropped. Turns alternate user, assistant (`answer`
        adds them so), and go in pairs: the context always starts with a user's turn, and
        the latest one stays."""
        room = min(self.max_new_tokens, self.max_len // 2)
        dropped = 0
        ids = self._prompt(self.turns[self.first:])
        while len(ids) + room > self.max_len and self.first + 2 < len(self.turns):
            self.first += 2
            dropped += 2
            ids = self._prompt(self.turns[self.first:])
        return ids, dropped

    def answer(self, text: str, on_text: Callable[[str], None], on_drop: Callable[[int], None] = lambda n: None) -> str:
        """Add the user's message, stream the answer through on_text, add it; returns it.
        An exception, Ctrl-C's KeyboardInterrupt included, ends the answer and propagates:
        what was shown is kept as the answer, or, with nothing shown, the user's message is
        taken back."""
        self.turns.append({"role": "user", "content": text})
        ids, dropped = self.fit()
        if len(ids) >= self.max_len:
            self.turns.pop()
            raise CandorError(f"that message is too long: the prompt would be {len(ids)} tokens, "
                              f"the model's context {self.max_len}")
        if dropped:
            on_drop(dropped)
        pieces: list[str] = []
        try:
            for piece in self.model.stream_ids(ids, max_new_tokens=min(self.max_new_tokens, self.max_len - len(ids)),
                                               **self.sampling):
                pieces.append(piece)
                on_text(piece)
        except BaseException:
            if pieces:
                self.turns.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.turns.pop()
            raise
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        return self.turns[-1]["content"]

    def save(self, path: str | Path) -> int:
        """Append the conversation to the JSONL file `path` as one `messages` record (the file is
        rewritten whole, so a crash never leaves half a line). Returns the messages written."""
        if not any(m["role"] == "assistant" for m in self.turns):
            raise CandorError("nothing to save yet: the conversation has no answer")
        path = Path(path)
        old = path.read_bytes() if path.is_file() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        msgs = self.messages()
        atomic_write_bytes(path, old + (json.dumps({"messages": msgs}, ensure_ascii=False) + "\n").encode("utf-8"))
        return len(msgs)


def _command(chat: Chat, line: str, out) -> bool:
    """Run a /command; False when it asks to leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    try:
        if name == "/reset":
            chat.reset()
            out.write("[a new conversation]\n")
        elif name == "/system":
            chat.set_system(arg)
            out.write(f"[system prompt {'set' if arg else 'removed'}]\n")
        elif name == "/save":
            if not arg:
                raise CandorError("/save needs a file name: /save FILE")
            n = chat.save(arg)
            out.write(f"[{n} messages appended to {arg}]\n")
        elif name == "/help":
            out.write(HELP + "\n")
        else:
            out.write(f"[unknown command {name}; /help lists them]\n")
    except (CandorError, OSError) as e:
        out.write(f"[error: {e}]\n")
    return True


def run_chat(model_dir: str | Path | None, system: str | None = None, max_new_tokens: int | None = None,
             input_fn: Callable[[str], str] = input, out=None, url: str | None = None, api_key: str | None = None,
             **sampling) -> None:
    """The terminal loop of `candor chat` (see the module docstring), with the model directory
    `model_dir`, or with the server at `url` (tune/remote.py; api_key for its /v1). sampling:
    temperature, top_k, top_p, seed, repetition_penalty; None takes the model's generation_config.json."""
    from candorlm.api import load
    from candorlm.tune.remote import RemoteModel

    out = out or sys.stdout
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops an answer even when the shell that started us ignored SIGINT (a
        # background job of a non-interactive shell inherits SIG_IGN, and Python then never
        # raises KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if input_fn is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    model = RemoteModel(url, api_key) if url else load(model_dir)
    chat = Chat(model, system, max_new_tokens, **{k: v for k, v in sampling.items() if v is not None})
    out.write(f"[chatting with {url or model_dir}, a {chat.max_len}-token context; /help lists the commands]\n")
    out.flush()
    interrupted = False  # the last event was a Ctrl-C: another one at the prompt leaves

    def dropped(n: int) -> None:
        out.write(f"[the conversation outgrew the {chat.max_len}-token context: the {n} oldest messages "
                  "are no longer seen by the model]\n")

    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            if interrupted:
                out.write("\n")
                return
            out.write("\n[Ctrl-C again, /exit or Ctrl-D to leave]\n")
            out.flush()
            interrupted = True
            continue
        interrupted = False
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(chat, line, out):
                return
            out.flush()
            continue
        try:
            chat.answer(line, lambda piece: (out.write(piece), out.flush()), dropped)
            out.write("\n")
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
            interrupted = True
        except CandorError as e:
            out.write(f"[error: {e}]\n")
        out.flush()
