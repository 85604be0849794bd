"""Byte-level BPE tokenizer: training, loading, saving, special tokens, chat template, and the
token→bytes table. It does not read corpora (data/documents.py) or write token shards
(data/shards.py).

Built on Hugging Face `tokenizers` and saved as `tokenizer.json`, so `transformers` loads it
unchanged (`AutoTokenizer.from_pretrained(dir)` gives a `PreTrainedTokenizerFast`).

Special tokens take ids 0..5, in this order:

    id  token            use
    0   <|bos|>          document separator: prepended to every document in the token shards,
                         and the first token of every chat
    1   <|user|>         starts a user turn
    2   <|assistant|>    starts an assistant turn (and is the generation prompt)
    3   <|system|>       starts a system turn
    4   <|end|>          ends a chat turn; a chat model stops generating on it (eos)
    5   <|pad|>          padding; never trained on

Chat layout: `<|bos|>` then, for each message, `<|role|>` + content tokens + `<|end|>`; with a
generation prompt, a trailing `<|assistant|>`. No newlines or other glue tokens are added.

Pipeline: no normalizer (so decode(encode(s)) == s for every string); the Qwen2 split regex
(the GPT-4 pattern with single digits, which llama.cpp knows as `tokenizer.ggml.pre = "qwen2"`);
then GPT-2's byte-to-character mapping; ByteLevel decoder. The initial alphabet is all 256
bytes, so every string is encodable without an unknown token.

Special-token literals in text: `Tokenizer.encode` turns "<|end|>" appearing in raw text into
ordinary byte-level tokens, never into id 4, so user text cannot inject control tokens. This
uses the backend's `encode_special_tokens = True` (the flag `transformers` calls
`split_special_tokens`); it is not serialized into tokenizer.json. Special ids enter a
sequence only through code that adds them on purpose (`render_chat`, the shard writer).
The `transformers` side is left with the library's default (literals *are* matched), because
`apply_chat_template` renders the chat to a string and then tokenizes it: splitting there
would break the template. So the two agree on every string without special-token literals,
and on chats whose contents contain none.

Nothing is added by `encode`: there is no post-processor, so `transformers`' default
`add_special_tokens=True` adds nothing either and both sides give identical ids.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_json, atomic_write_text

SPECIAL_TOKENS = ("<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>")
SPECIAL_NAMES = ("bos", "user", "assistant", "system", "end", "pad")
CHAT_ROLES = ("system", "user", "assistant")

# Qwen2's tokenizer.json pattern, verbatim: GPT-4's cl100k split with \p{N} instead of
# \p{N}{1,3}. A GGUF export names it "qwen2" and llama.cpp applies the same split.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The same layout as `render_chat`, for `transformers`' apply_chat_template (checked by
# tests/test_tokenizer.py).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def with_chat_template(tokenizer_config: dict) -> dict:
    """A copy of a `transformers` tokenizer_config.json dict with `CHAT_TEMPLATE` and the
    special tokens it relies on (bos opens a chat, eos is `<|end|>`, the turn end a chat model
    stops on), for every writer of a tokenizer_config (`Tokenizer.save`, exports)."""
    return {**tokenizer_config, "chat_template": CHAT_TEMPLATE, "bos_token": "<|bos|>", "eos_token": "<|end|>",
            "pad_token": "<|pad|>"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte→character map used by byte-level BPE (printable bytes map to themselves,
    the rest to U+0100 onwards). `tokenizers` applies it internally but does not expose it,
    and we need its inverse to recover a token's raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _new_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
    """Train byte-level BPE on `texts`. `vocab_size` counts the 6 special tokens and the 256
    byte tokens; a small corpus may yield fewer tokens than asked (no pair left that occurs
    `min_frequency` times). Word counting runs on all cores (Rust threads); merges are serial."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise CandorError(f"tokenizer.vocab_size={vocab_size} is too small: it must be at least {floor} "
                          "(6 special tokens + 256 bytes)")
    tok = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(texts) if isinstance(texts, Sequence) else None
    n_chars = 0

    def counted():
        nonlocal n_chars
        for t in texts:
            n_chars += len(t)
            yield t

    tok.train_from_iterator(counted(), trainer=trainer, length=length)
    if not n_chars:
        raise CandorError("no text to train a tokenizer on: the documents were empty (curate a source first)")
    return Tokenizer(tok)


class Tokenizer:
    """A trained candorlm tokenizer. Create with `train_tokenizer` or `Tokenizer.load`."""

    def __init__(self, backend: tokenizers.Tokenizer, json_text: str | None = None):
        # json_text is exactly what save() writes, so `sha256` is the hash of tokenizer.json.
        self._json = json_text if json_text is not None else backend.to_str(pretty=True)
        for i, t in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(t) != i:
                raise CandorError(f"not a candorlm tokenizer: special token {t} should have id {i}, "
                                  f"has {backend.token_to_id(t)}")
        backend.encode_special_tokens = True  # see the module docstring; not serialized
        self._tok = backend
        self._bytes: list[bytes] | None = None
        self._sorted: tuple[list[bytes], list[int]] | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory holding tokenizer.json, or from the file itself."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise CandorError(f"no tokenizer at {path}: "
                              "expected a directory containing tokenizer.json, or the file itself")
        try:
            text = f.read_text(encoding="utf-8")
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises plain Exception with a serde message
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise CandorError(f"{f} is not a valid tokenizer.json: {first}") from None
        return cls(backend, text)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json for `transformers` (atomically each)."""
        d = Path(directory)
        atomic_write_text(d / "tokenizer.json", self._json)
        atomic_write_json(d / "tokenizer_config.json", with_chat_template({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            # transformers' cleanup removes spaces before punctuation: decoding would not be lossless.
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }))

    # --- encoding and decoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, special-token literals stay plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel on the backend's Rust threads (all cores unless
        RAYON_NUM_THREADS is set)."""
        fast = getattr(self._tok, "encode_batch_fast", None)  # no offsets: ~1.5x faster; tokenizers >= 0.21
        enc = (fast or self._tok.encode_batch)(list(texts), add_special_tokens=False)
        return [e.ids for e in enc]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their literal strings unless skip_special.
        Ids outside the vocabulary are skipped."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of a chat in the layout of the module docstring. Contents are encoded with
        `encode`, so a special-token literal inside a message stays plain text."""
        ids = [self.bos_id]
        end = self.special_ids["end"]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise CandorError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise CandorError(f"message {i}: content must be a string, got {type(content).__name__}")
            ids.append(self.special_ids[role])
            ids.extend(self.encode(content))
            ids.append(end)
        if add_generation_prompt:
            ids.append(self.special_ids["assistant"])
        return ids

    # --- vocabulary facts

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def special_ids(self) -> dict[str, int]:
        """Short name → id: bos, user, assistant, system, end, pad (role names are chat roles)."""
        return {n: i for i, n in enumerate(SPECIAL_NAMES)}

    @property
    def sha256(self) -> str:
        """sha256 of tokenizer.json as `save` writes it (and as `load` read it)."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def _byte_table(self) -> list[bytes]:
        if self._bytes is None:
            table = [b""] * self.vocab_size
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                if i < len(SPECIAL_TOKENS):
                    table[i] = token.encode("utf-8")
                    continue
                try:
                    table[i] = bytes(_CHAR_TO_BYTE[c] for c in token)
                except KeyError:
                    raise CandorError(f"not a byte-level tokenizer: token {i} {token!r} "
                                      "has a character outside the byte alphabet") from None
            self._bytes = table
        return self._bytes

    def id_to_bytes(self, i: int) -> bytes:
        """The raw bytes token `i` stands for (the UTF-8 literal for a special token). A token
        may hold part of a multi-byte character, so decode a stream by joining bytes."""
        return self._byte_table()[i]

    def ids_starting_with(self, prefix: bytes) -> list[int]:
        """Ids of the non-special tokens whose bytes start with `prefix` (token healing's
        candidates), by bisection in the byte strings sorted once: those tokens are one
        contiguous run of the sorted order."""
        if self._sorted is None:
            table = self._byte_table()
            order = sorted(range(len(SPECIAL_TOKENS), len(table)), key=table.__getitem__)
            self._sorted = ([table[i] for i in order], order)
        keys, order = self._sorted
        start = bisect.bisect_left(keys, prefix)
        end = start
        while end < len(keys) and keys[end].startswith(prefix):
            end += 1
        return order[start:end]

    def token_bytes(self) -> np.ndarray:
        """int32 array, one entry per id: the byte length of the token; 0 for special tokens
        (they stand for no text). sum(token_bytes[ids]) == len(text.encode()) for bits-per-byte."""
        lengths = np.array([len(b) for b in self._byte_table()], dtype=np.int32)
        lengths[: len(SPECIAL_TOKENS)] = 0
        return lengths

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
