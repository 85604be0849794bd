"""lm-evaluation-harness runs local tasks (`dataset_path: json`) through the `candor` model type,
with all three request types, and its log-likelihoods equal the task runner's on the same items."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import lm_eval
except ImportError:  # pragma: no cover
    lm_eval = None

ITEMS = [{"q": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "gold": 0},
         {"q": "import", "choices": ["os", "json", "sys"], "gold": 2},
         {"q": "for i in", "choices": ["range(10):", "x y z", "):"], "gold": 0}]


def write_tasks(d):
    data = d / "items.jsonl"
    data.write_text("\n".join(json.dumps(it) for it in ITEMS) + "\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (d / "mc.yaml").write_text("task: candor_mc\n" + common + "output_type: multiple_choice\n"
                               "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
                               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "roll.yaml").write_text("task: candor_roll\n" + common + "output_type: loglikelihood_rolling\n"
                                 "doc_to_text: ''\ndoc_to_target: '{{q}}'\n"
                                 "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (d / "gen.yaml").write_text("task: candor_gen\n" + common + "output_type: generate_until\n"
                                "doc_to_text: '{{q}}'\ndoc_to_target: '{{choices[gold]}}'\n"
                                "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
                                "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_runs_local_tasks_and_agrees_with_the_task_runner(eval_model, tmp_path):
    if lm_eval is None:
        from conftest import missing

        missing("lm-eval")
    import candorlm.evaluate.harness  # noqa: F401  registers `candor`
    from candorlm.evaluate.scoring import Scorer
    from candorlm.evaluate.tasks import Task, score_multiple_choice

    write_tasks(tmp_path)
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="candor", model_args=f"model={eval_model},precision=fp32",
                                  tasks=["candor_mc", "candor_roll", "candor_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    res = out["results"]
    assert set(res) >= {"candor_mc", "candor_roll", "candor_gen"}
    samples = sorted(out["samples"]["candor_mc"], key=lambda s: s["doc_id"])
    harness_ll = [[r[0][0] for r in s["resps"]] for s in samples]
    task = Task("mc", "multiple_choice", ITEMS, context="q", choices="choices", gold="gold", choice_prefix=" ")
    scorer = Scorer.from_dir(eval_model, precision="fp32")
    ours = score_multiple_choice(scorer, task)
    for a, b in zip(harness_ll, ours["loglikelihoods"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert res["candor_mc"]["acc,none"] == pytest.approx(ours["acc"].mean())
    assert res["candor_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"].mean())
    roll = sorted(out["samples"]["candor_roll"], key=lambda s: s["doc_id"])
    want = [-float(n.sum()) for n in scorer.token_nats([scorer.tokenizer.encode(it["q"]) for it in ITEMS])]
    assert [s["resps"][0][0] for s in roll] == pytest.approx(want, abs=1e-4)
    gen = sorted(out["samples"]["candor_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == [scorer.generate(it["q"], until=["\n"], max_new_tokens=8) for it in ITEMS]


@pytest.mark.parametrize("command", ["lm_eval", "candor lm-eval"])
def test_the_lm_eval_command_line_finds_the_candor_model(eval_model, tmp_path, command):
    """The harness's own `lm_eval` script (the installed candorlm-lm-eval.pth registers the model
    type when the harness imports its registry) and `candor lm-eval` alike."""
    if lm_eval is None:
        from conftest import missing

        missing("lm-eval")
    write_tasks(tmp_path)
    argv = ([str(Path(sys.executable).parent / "lm_eval")] if command == "lm_eval"
            else [sys.executable, "-m", "candorlm", "lm-eval"])
    p = subprocess.run([*argv, "--model", "candor", "--model_args", f"model={eval_model}", "--tasks", "candor_mc",
                        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "candor_mc" in p.stdout and "acc" in p.stdout
