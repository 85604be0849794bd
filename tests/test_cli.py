"""The `candor` command end to end on a micro corpus: errors are one line with exit 2,
`candor run` chains every stage and skips current ones, and its model loads."""

import json
import sysconfig
from pathlib import Path

import pytest

from conftest import MICRO, MODULES
from helpers import candor

# the run's evaluation on a few items of each kind
EVAL = [("eval.humaneval_limit", "2"), ("eval.generate_items", "2"), ("eval.code_items", "8"),
        ("eval.max_new_tokens", "8"), ("eval.robustness_items", "4"), ("eval.lm_tokens", "1024")]



def sets(pairs):
    out = []
    for k, v in pairs:
        out += ["--set", f"{k}={v}"]
    return out


@pytest.mark.parametrize("cmd", [
    ["data", "--source", "no/such/path", "--out", "x"],
    ["run", "--source", "no/such/path.jsonl"],
    ["pretrain", "--data", "no/tokens", "--tokenizer", "no/tok", "--out", "x"],
    ["generate", "--model", "no/model", "hi"],
    ["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o", "--set", "train.nope=1"],
    ["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o", "--preset", "huge"],
    ["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o", "--set", "train.batch_size=0"],
    ["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o", "--set", "train.lr=-1"],
    ["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o", "--set", "train.dtype=fp8"],
    ["data", "--source", "stdlib", "--out", "x", "--workers", "-1"],
    ["eval", "--model", "m", "--data", "d", "--seq-len", "-5"],
    ["eval", "--model", "m"],
    ["eval", "--model", "m", "--tasks", "lm,nosuch"],
    ["card", "--model", "no/model"],
    ["run", "--set", "eval.tasks=lm,nosuch"],
])
def test_bad_input_is_one_line_and_exit_2(cmd, tmp_path):
    r = candor(*cmd, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("candor: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory source with good files, a binary file and an invalid UTF-8 file."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for m in MODULES:
        src = stdlib / m
        if src.is_file():
            (d / m.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    (d / "blob.bin.txt").write_bytes(bytes(range(256)) * 64)
    (d / "latin1.py").write_bytes("caf\xe9 = 'na\xefve'\n".encode("latin-1") * 50)
    return d


def test_run_end_to_end_then_skips(corpus, tmp_path):
    tune = [("model.max_seq_len", "256"), ("sft.max_steps", "4"), ("sft.batch_size", "4"), ("sft.eval_prompts", "2"),
            ("sft.eval_examples", "8")]  # a context the mined chats fit in
    args = ["run", "--name", "micro", "--preset", "cpu-tiny", "--source", str(corpus),
            "--runs-dir", str(tmp_path / "runs"),
            "--set", "tokenizer.vocab_size=512", *sets(MICRO + tune), *sets(EVAL)]
    r = candor(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val bits-per-byte" in r.stdout
    run = tmp_path / "runs" / "micro"
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + sum(stats["removed"].values()) + sum(stats["failed"].values())
    assert sum(stats["failed"].values()) >= 2  # the binary file and the invalid UTF-8 one, with reasons
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pretrain"]["val_bpb"] > 0
    # the SFT stage: the mined set (split by file, in the data card), chat/, base vs chat measured, two turns
    mined = json.loads((run / "instructions" / "stats.json").read_text())
    assert mined["split"]["train"] > 0 and mined["split"]["validation"] > 0
    assert "## Instruction set (fine-tuning)" in (run / "data" / "DATA_CARD.md").read_text()
    sft = summary["sft"]
    assert sft["chat_dir"] == str(run / "chat") and sft["result"]["step"] == 4
    assert (run / "chat" / "model.safetensors").is_file() and (run / "chat" / "stage.json").is_file()
    assert sft["measured"]["loss"]["base"] > 0 and sft["measured"]["loss"]["chat"] > 0
    assert sft["measured"]["write_function"]["prompts"] == 2 and len(sft["exchange"]) == 2
    assert "held-out instruction loss" in r.stderr and "two turns with the chat model" in r.stdout
    assert r.stdout.count(">>> ") == 2
    # the evaluation and the cards (tests/test_eval_card.py checks what they hold)
    assert json.loads((run / "eval" / "results.json").read_text())["humaneval"]["problems"] == 2
    assert (run / "MODEL_CARD.md").is_file() and (run / "report.md").is_file() and "model card:" in r.stdout

    import candorlm

    m = candorlm.load(run / "base")
    assert isinstance(m.generate("def ", max_new_tokens=8, temperature=0), str)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer" / "tokenizer.json"))
    assert hf.encode("def f(x):\n    return x") == m.tokenizer.encode("def f(x):\n    return x")

    # a prompt's \n typed in a shell is a newline; unset sampling flags take generation_config.json's
    gen = candor("generate", "--model", str(run / "base"), "def f(x):\\n    return", "--seed", "0",
                 "--max-new-tokens", "12")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == m.generate("def f(x):\n    return", max_new_tokens=12, seed=0) + "\n"
    raw = candor("generate", "--model", str(run / "base"), "--no-escape", "a\\n", "--temperature", "0",
                 "--max-new-tokens", "4")
    assert raw.stdout == m.generate("a\\n", max_new_tokens=4, temperature=0) + "\n"

    bad = candor("generate", "--model", str(run / "base"), "hi", "--temperature", "-1")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "temperature=-1.0" in bad.stderr, bad.stderr
    assert bad.stdout == ""
    pen = candor("generate", "--model", str(run / "base"), "def ", "--temperature", "0", "--max-new-tokens", "8",
                 "--repetition-penalty", "1.5")
    assert pen.stdout == m.generate("def ", max_new_tokens=8, temperature=0, repetition_penalty=1.5) + "\n"
    bad = candor("generate", "--model", str(run / "base"), "hi", "--repetition-penalty", "0")
    assert bad.returncode == 2 and "generation.repetition_penalty=0.0 must be > 0 (1: off)" in bad.stderr, bad.stderr

    weights = (run / "base" / "model.safetensors").read_bytes()
    r2 = candor(*args)
    assert r2.returncode == 0, r2.stderr[-3000:]
    # data, tokenizer, tokens, base, instructions, chat, eval
    assert r2.stderr.count("is current; skipped") == 7, r2.stderr
    assert (run / "base" / "model.safetensors").read_bytes() == weights

    # a changed training setting redoes pretraining only, into a clean model directory
    r3 = candor(*args, "--set", "train.max_steps=8")
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert r3.stderr.count("is current; skipped") == 4 and "[4/5] pretraining" in r3.stderr, r3.stderr
    assert "[sft] fine-tuning" in r3.stderr  # a new base model: a new chat model
    log = [json.loads(line) for line in (run / "base" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "done"] == [8]  # this run's log alone
    # --force redoes every stage
    r4 = candor(*args, "--set", "train.max_steps=8", "--force")
    assert r4.returncode == 0 and "skipped" not in r4.stderr, r4.stderr[-3000:]
    # the user's own chats replace the mined set
    own = tmp_path / "own.jsonl"
    own.write_text("".join((run / "instructions" / "train.jsonl").read_text().splitlines(keepends=True)[:40]))
    r5 = candor(*args, "--set", "train.max_steps=8", "--set", f"sft.data={own}")
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert "mining" not in r5.stderr and f"[sft] fine-tuning {run / 'base'} on {own}" in r5.stderr, r5.stderr
    assert json.loads((run / "summary.json").read_text())["sft"]["data"] == str(own)


def test_prompt_escapes():
    from candorlm.cli import unescape

    assert unescape(r"import os\n") == "import os\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"  # an escaped backslash stays one backslash
    assert unescape(r'say \"hi\"') == 'say "hi"'
    assert unescape("C:\\path\\q naïve\\") == "C:\\path\\q naïve\\"  # other backslashes are kept
