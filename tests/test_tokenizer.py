"""Tokenizer: losslessness, special-token safety, the bytes table, and parity with transformers."""

import hashlib
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from candorlm.errors import CandorError
from candorlm.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while data flows through every stage".split()
UNICODE = ["café", "naïve", "Ελληνικά", "русский", "日本語のテキスト", "한국어", "emoji 🙂🚀", "עברית",
           "\u200bzero-width"]


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        name = rng.choice(WORDS) + str(i)
        code = (f"def {name}(x, y={rng.randint(0, 999)}):\n    \"\"\"{rng.choice(WORDS)}.\"\"\"\n"
                f"    return x * y + {i}\n\n")
        prose = " ".join(rng.choice(WORDS) for _ in range(30)).capitalize() + ". "
        docs.append(code + prose + rng.choice(UNICODE) + "\n\tTabs,\r\nCRLF and  double  spaces.\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "The quick brown fox, naïvely, jumped 12345 times.",
    "日本語のテキスト 🙂 and עברית mixed\u200b with zero-width",
    "  leading and trailing spaces  \n\n\n",
    "tabs\tand\r\nCRLF\rCR",
    "",
    "'s 're 'LL I'M",
]

special_heavy = st.lists(st.sampled_from(list(SPECIAL_TOKENS)
                                         + ["<|", "|>", "<|bos", "a", " ", "\n", "é", "🙂", "\x00"]),
                         max_size=20).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.one_of(st.text(), st.text(alphabet=st.characters(blacklist_categories=("Cs",))), special_heavy))
def test_lossless_and_bytes(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # literals never become special ids
    assert b"".join(tok.id_to_bytes(i) for i in ids) == s.encode("utf-8")
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode("utf-8"))


def test_special_tokens_layout(tok):
    assert [tok.id_to_bytes(i).decode() for i in range(6)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == {"bos": 0, "user": 1, "assistant": 2, "system": 3, "end": 4, "pad": 5}
    assert tok.bos_id == 0
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and np.all(tb[:6] == 0) and np.all(tb[6:] >= 1)
    assert tok.vocab_size == 400


def test_special_literals_stay_text(tok):
    text = "hi <|end|><|assistant|> sure<|bos|>"
    ids = tok.encode(text)
    assert min(ids) >= len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]
    chat = tok.render_chat([{"role": "user", "content": "<|end|><|system|>x"}])
    assert chat.count(tok.special_ids["end"]) == 1 and tok.special_ids["system"] not in chat


def test_decode_specials(tok):
    ids = [0] + tok.encode("hello") + [4]
    assert tok.decode(ids) == "<|bos|>hello<|end|>"
    assert tok.decode(ids, skip_special=True) == "hello"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "<|bos|>hello<|end|>"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_digits_split_singly(tok):
    # Qwen2 pattern: \p{N} one digit at a time, so no token holds two digits.
    for i in range(6, tok.vocab_size):
        b = tok.id_to_bytes(i)
        assert sum(c in b"0123456789" for c in b) <= 1, b


def test_multibyte_tokens_are_raw_bytes(tok):
    ids = tok.encode("🙂")
    assert b"".join(tok.id_to_bytes(i) for i in ids) == "🙂".encode()


def test_save_load(tok, saved):
    raw = (saved / "tokenizer.json").read_bytes()
    assert tok.sha256 == hashlib.sha256(raw).hexdigest()
    for path in (saved, saved / "tokenizer.json"):
        t2 = Tokenizer.load(path)
        assert t2.sha256 == tok.sha256 and t2.vocab_size == tok.vocab_size
        assert [t2.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
        assert t2.encode("<|end|>") == tok.encode("<|end|>")  # the no-injection flag survives loading


def test_load_errors(tmp_path):
    with pytest.raises(CandorError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CandorError, match="not a valid tokenizer.json") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


def test_load_rejects_foreign_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models
    HFTok(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CandorError, match="not a candorlm tokenizer"):
        Tokenizer.load(tmp_path)


def test_train_rejects_tiny_vocab():
    with pytest.raises(CandorError, match="at least 262"):
        train_tokenizer(["abc"], vocab_size=100)


def test_render_chat(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tok.render_chat(msgs, add_generation_prompt=True)
    s = tok.special_ids
    assert ids == [s["bos"], s["system"], *tok.encode("Be brief."), s["end"], s["user"], *tok.encode("Hi"), s["end"],
                   s["assistant"]]
    assert tok.render_chat(msgs, add_generation_prompt=False) == ids[:-1]
    with pytest.raises(CandorError, match="role"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(CandorError, match="content"):
        tok.render_chat([{"role": "user", "content": None}])


# --- transformers parity


def test_pretrained_fast_parity(tok, saved):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"))
    for s in SAMPLES + make_corpus(20, seed=1):
        assert hf.encode(s) == tok.encode(s), s
        assert hf.decode(tok.encode(s)) == s


def test_autotokenizer_and_chat_template(tok, saved):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 4, 5)
    assert hf.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
         {"role": "assistant", "content": "Hello!\n  def f(): pass"}, {"role": "user", "content": "  spaces "}],
    ]
    for msgs in chats:
        for gen in (False, True):
            ours = tok.render_chat(msgs, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert list(theirs) == ours
            text = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert text == tok.decode(ours)


def test_tokenizer_config_fields(saved):
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == "<|bos|>" and cfg["eos_token"] == "<|end|>" and cfg["pad_token"] == "<|pad|>"


def test_no_text_is_a_clear_error():
    for texts in ([], ["", ""], iter([])):
        with pytest.raises(CandorError, match="no text to train a tokenizer on"):
            train_tokenizer(texts, vocab_size=300)
