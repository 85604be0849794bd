"""The run's evaluation and card stages: results.json, MODEL_CARD.md (Hugging Face format, which
`huggingface_hub.ModelCard.load` parses) and report.md with its charts; every number in the
card is one results.json holds, and a current stage is skipped."""

import json
import re
import shutil

import pytest

from candorlm.pipeline import card_stage, eval_stage
from conftest import micro_config

NUMBER = re.compile(r"(?<![\w@.\-/])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w%])")


def numbers_in(obj) -> set[float]:
    """Every number results.json holds: numeric values, and numbers written inside its strings
    (a timestamp, a path)."""
    out: set[float] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= numbers_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= numbers_in(v)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        out.add(float(obj))
    elif isinstance(obj, str):
        out |= {float(x) for x in NUMBER.findall(obj)}
    return out


def assert_card_numbers_are_results(card_path, results: dict) -> int:
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    have = numbers_in(results)
    for r in card.data.eval_results:
        assert float(r.metric_value) in have, (r.dataset_name, r.metric_type, r.metric_value)
    body = card.text
    found = [float(x) for x in NUMBER.findall(body)]
    missing = sorted({x for x in found if x not in have})
    assert missing == [], f"numbers in the card that results.json does not hold: {missing[:20]}"
    return len(found)


@pytest.fixture(scope="module")
def run_dir(eval_model, micro_tokens, micro_docs, tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "micro"
    shutil.copytree(eval_model, root / "base")
    shutil.copytree(micro_tokens, root / "tokens")
    shutil.copytree(micro_docs, root / "data" / "documents")
    return root


def test_eval_and_card_stages(run_dir):
    cfg = micro_config(("eval.humaneval_limit", "3"), ("eval.generate_items", "3"), ("eval.code_items", "12"),
                       ("eval.max_new_tokens", "16"), ("eval.robustness_items", "6"), ("eval.lm_tokens", "2048"),
                       ("data.val_fraction", "0.1"))
    res = eval_stage(cfg, run_dir)
    on_disk = json.loads((run_dir / "eval" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert res["model"].endswith("base")  # no chat model in this run: the base model is evaluated
    assert set(res["costs_s"]) >= {"lm", "pycomplete", "humaneval", "bias", "total"}
    assert res["lm"]["bpb"]["ci"][0] <= res["lm"]["bpb"]["value"] <= res["lm"]["bpb"]["ci"][1]
    assert res["humaneval"]["problems"] == 3 and "pass@1" in res["humaneval"]
    assert "code_body_choice" in res["tasks"] or "code_body_choice" in res["skipped"]
    assert res["robustness"] or res["skipped"]["robustness"]
    assert (run_dir / "eval" / "samples.jsonl").read_text().count("\n") == 3

    paths = card_stage(cfg, run_dir)
    n = assert_card_numbers_are_results(paths["model_card"], res)
    assert n > 50
    text = (run_dir / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Out-of-scope use", "## Training data", "## Training procedure and compute",
                    "## Evaluation results", "## Bias", "## Robustness", "## Limitations and recommendations",
                    "model-index", "Energy: about"):
        assert section in text, section
    report = (run_dir / "report.md").read_text()
    for png in ("loss.png", "bias.png", "results.png"):
        assert f"(eval/{png})" in report and (run_dir / "eval" / png).read_bytes()[:4] == b"\x89PNG"

    mtime = (run_dir / "eval" / "results.json").stat().st_mtime_ns
    eval_stage(cfg, run_dir)  # current: not evaluated again
    assert (run_dir / "eval" / "results.json").stat().st_mtime_ns == mtime


def test_a_card_number_not_in_results_is_caught(run_dir, tmp_path):
    """The checker itself: a card whose figure was changed fails it."""
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    text = (run_dir / "MODEL_CARD.md").read_text()
    bpb = str(res["lm"]["bpb"]["value"])
    bad = tmp_path / "MODEL_CARD.md"
    bad.write_text(text.replace(f"| {bpb} (", "| 9.8765 ("))
    with pytest.raises(AssertionError, match="9.8765"):
        assert_card_numbers_are_results(bad, res)


def test_the_chat_model_is_evaluated_when_the_run_has_one(tmp_path):
    from candorlm.pipeline import evaluated_model

    (tmp_path / "base").mkdir()
    assert evaluated_model(tmp_path) == tmp_path / "base"
    (tmp_path / "chat").mkdir()
    assert evaluated_model(tmp_path) == tmp_path / "base"  # an unfinished chat directory is not a model
    (tmp_path / "chat" / "model.safetensors").write_bytes(b"")
    assert evaluated_model(tmp_path) == tmp_path / "chat"
