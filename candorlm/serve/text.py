"""Token ids to text deltas for one sequence, as they are generated: bytes of a character split
across tokens are held back until it is whole, and so is any tail that may be the start of a
stop string, so a stop string is cut out before any of it is sent.

Special tokens stand for no text here (vLLM's skip_special_tokens=True). Does not choose
tokens and does not know about the model.
"""

from __future__ import annotations

from candorlm.tokenizer import SPECIAL_TOKENS


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.pending = b""  # bytes of an unfinished character
        self.held = ""  # text that may begin a stop string

    def push(self, token: int) -> tuple[str, bool]:
        """(the text now certain, whether a stop string ended the sequence). After a stop the
        text is everything before the stop string."""
        if token >= len(SPECIAL_TOKENS):
            self.pending += self.tok.id_to_bytes(token)
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(self.pending) < 4:
                text = ""
            else:
                text = self.pending.decode("utf-8", errors="replace")
                self.pending = b""
        else:
            self.pending = b""
        if not self.stop:
            return text, False
        s = self.held + text
        cut = min((i for i in (s.find(x) for x in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return s[:cut], True
        keep = max((k for x in self.stop for k in range(min(len(x) - 1, len(s)), 0, -1) if s.endswith(x[:k])),
                   default=0)
        self.held = s[len(s) - keep:] if keep else ""
        return s[:len(s) - keep], False

    def flush(self) -> str:
        """What is still held back, at the end of the sequence (a stop string never came)."""
        out = self.held + (self.pending.decode("utf-8", errors="replace") if self.pending else "")
        self.held, self.pending = "", b""
        return out
