"""MODEL_CARD.md for a model directory, in the Hugging Face model-card format: YAML metadata
(license, tags, and `model-index` results) rendered with `huggingface_hub.ModelCard`, then
intended and out-of-scope use, training data (with the data card's audit and CDA), training
procedure and compute, results with their intervals, bias by group, robustness, limitations.

Every number it shows is read from the evaluation's results.json (evaluate/suite.py, which
copies the training and data facts there too) and printed as stored, so a reader, or a test,
can find each one in that file. It computes nothing and evaluates nothing.
"""

from __future__ import annotations

from pathlib import Path

from candorlm.fileio import atomic_write_text

INTENDED = ("Research and teaching: a small, fully documented language model whose data, training and evaluation "
            "can be read end to end; completing short Python snippets in the style of the standard library; a "
            "baseline for measuring what curation, tuning and compression change.")
OUT_OF_SCOPE = ("Any decision about people (hiring, credit, health, law); producing code that runs unreviewed; "
                "facts or advice of any kind; languages other than English and Python; any use where the "
                "figures below, measured on small templated probes, would be taken as evidence of safety.")
LIMITATIONS = (
    "The model is small and trained briefly: it completes code plausibly more often than correctly (see HumanEval).",
    "The bias probes are templates with binary gender in the coreference, pair and BBQ probes; a small gap on "
    "them does not show an unbiased model, only one that does not show these biases on these templates.",
    "Held-out code tasks come from files of the same standard library: they measure in-distribution skill.",
    "Robustness attacks are character edits and suffixes without a second model; adversarial search would find "
    "larger drops.",
    "Intervals are percentile-bootstrap intervals over items; they do not cover the variance of training itself "
    "(another seed would give another model).",
)


def _v(x) -> str:
    return "n/a" if x is None else str(x)


def _est(e: dict | None) -> str:
    if not e:
        return "n/a"
    return f"{_v(e['value'])} ({_v(e['ci'][0])} to {_v(e['ci'][1])}, n {_v(e['n'])})"


def _table(headers, rows) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def _index(res: dict, name: str):
    """model-index entries: (task type, dataset, metric, value)."""
    from huggingface_hub import EvalResult

    out = []

    def add(dataset, metric, value, task_type="text-generation"):
        if value is not None:
            out.append(EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset,
                                  metric_type=metric, metric_value=value))
    lm = res.get("lm")
    if lm:
        add("held-out", "bits_per_byte", lm["bpb"]["value"])
        add("held-out", "perplexity", lm["perplexity"]["value"])
    for t, r in sorted(res.get("tasks", {}).items()):
        for m in ("acc", "acc_norm", "pass"):
            if m in r:
                add(t, m, r[m]["value"])
    he = res.get("humaneval")
    if he:
        for k in sorted(x for x in he if x.startswith("pass@")):
            add("openai_humaneval", k, he[k]["value"])
    bias = res.get("bias")
    if bias:
        add("candor-bias-coreference", "pro_anti_gap", bias["coreference"]["all"]["gap"]["value"])
        add("candor-bias-pairs", "stereotyped_share", bias["pairs"]["stereotyped_share"]["value"])
    return out


def _training_data(res: dict) -> list[str]:
    d = res.get("training_data")
    out = ["## Training data", ""]
    if not d:
        return out + ["Not recorded (the evaluation was not given the curated corpus)."]
    out.append(f"Curated corpus: {_v(d.get('kept'))} documents kept of {_v(d.get('read'))} read; its data card "
               f"([{d.get('data_card')}]({d.get('data_card')})) lists what each filter removed and why.")
    for key, title in (("corpus", "Representation audit of the corpus"), ("after_cda", "After augmentation")):
        a = d.get(key)
        if a:
            out.append(f"- {title}: {'**skewed**' if a['skewed'] else 'not skewed'}; occupation skew score "
                       f"{_v(a['occupation_score'])} bits, male/female word ratio {_v(a['gender_ratio_bits'])} bits "
                       f"(threshold {_v(a['threshold_bits'])} bits).")
    cda = d.get("cda")
    out.append(f"- Counterfactual augmentation: {'gender CDA applied, ' + _v(cda.get('docs_added')) + ' swapped copies added' if cda else 'not used'}.")  # noqa: E501
    return out


def _compute(res: dict) -> list[str]:
    hw, tr = res.get("hardware", {}), res.get("training", {})
    out = ["## Training procedure and compute", ""]
    cfg = res.get("model_config", {})
    out.append(f"Decoder-only transformer (candorlm, Qwen3-compatible): {_v(cfg.get('n_layers'))} layers of "
               f"{_v(cfg.get('d_model'))}, {_v(cfg.get('n_heads'))} heads ({_v(cfg.get('n_kv_heads'))} key/value), "
               f"context {_v(cfg.get('max_seq_len'))}, vocabulary {_v(cfg.get('vocab_size'))}; "
               f"{_v(res.get('params'))} parameters.")
    rows = [[stage, _v(r.get("step")), _v(r.get("tokens_seen")), _v(r.get("train_time_s")), _v(r.get("tok_s")),
             _v(r.get("mfu"))] for stage, r in tr.items() if stage != "energy"]
    if rows:
        out += ["", *_table(["stage", "steps", "tokens", "seconds", "tokens/s", "MFU"], rows)]
    out += ["", f"Hardware: {hw.get('cpu')} ({_v(hw.get('threads'))} threads; native bf16: "
                f"{_v(hw.get('native_bf16'))}; GPU: {_v(hw.get('cuda'))}). "
                f"Evaluation precision: {res.get('precision')}."]
    e = tr.get("energy")
    if e:
        out.append(f"Energy: about {_v(e['watt_hours'])} Wh for {_v(e['train_time_s'])} s of training, an estimate: "
                   f"{e['assumption']} ({_v(e['assumed_watts'])} W assumed).")
    return out


def _results(res: dict) -> list[str]:
    out = ["## Evaluation results", "", "Each figure: value (95% percentile-bootstrap interval, items).", ""]
    rows = []
    lm = res.get("lm")
    if lm:
        rows.append(["held-out text", "bits per byte", _est(lm["bpb"])])
        rows.append(["held-out text", "perplexity (per token)", _est(lm["perplexity"])])
    for t, r in sorted(res.get("tasks", {}).items()):
        for m in ("acc", "acc_norm", "pass"):
            if m in r:
                rows.append([t, m + (f" (chance {r['chance']})" if m == "acc" and "chance" in r else ""), _est(r[m])])
    he = res.get("humaneval")
    if he:
        for k in sorted(x for x in he if x.startswith("pass@")):
            rows.append([f"HumanEval ({he['problems']} of {he['of']} problems)", k, _est(he[k])])
    out += _table(["evaluation", "metric", "value"], rows) if rows else ["No evaluation was run."]
    for name, why in sorted(res.get("skipped", {}).items()):
        out.append(f"- Not run: {name} ({why}).")
    return out


def _bias(res: dict) -> list[str]:
    b = res.get("bias")
    out = ["## Bias", ""]
    if not b:
        return out + ["Not measured."]
    out.append("Probes from candorlm's templates (candorlm/evaluate/data/bias_probes.json, sources listed there).")
    rows = []
    for style, r in b["coreference"].items():
        rows.append([f"coreference, {style}", "all occupations", _est(r["pro_accuracy"]), _est(r["anti_accuracy"]),
                     _est(r["gap"])])
        for g, gr in r["by_group"].items():
            rows.append([f"coreference, {style}", g, _est(gr["pro_accuracy"]), _est(gr["anti_accuracy"]),
                         _est(gr["gap"])])
    out += ["", "Occupation-pronoun coreference (WinoBias style; gap = pro - anti accuracy, 0 is unbiased; within "
                "one group of occupations the gap also carries any default pronoun):", "",
            *_table(["probe", "group", "pro-stereotypical accuracy", "anti-stereotypical accuracy", "gap"], rows)]
    out += ["", "Share of answers that are \" he\" whatever the context (ideal 0.5): "
            + "; ".join(f"{s} {_est(r['he_share'])}" for s, r in b["coreference"].items()) + "."]
    p = b["pairs"]
    out += ["", "Minimal pairs (CrowS-Pairs style): the stereotyped sentence is likelier in "
                f"{_est(p['stereotyped_share'])} of pairs (ideal {p['ideal']}).", "",
            *_table(["axis", "stereotyped share"], [[a, _est(e)] for a, e in p["by_group"].items()])]
    q = b["bbq"]
    out += ["", "Ambiguous vs disambiguated questions (BBQ style):", "",
            *_table(["context", "accuracy", "bias score", "answered unknown"],
                    [[k, _est(v["accuracy"]), _est(v["bias_score"]), _v(v["answered_unknown"])] for k, v in q.items()])]
    out += ["", "Descriptor likelihood (HolisticBias style; bits per byte of templated sentences, lower is likelier):",
            "", *_table(["axis", "spread (max - min)", "likeliest", "least likely"],
                        [[a, _v(v["disparity_bits_per_byte"]), v["likeliest"], v["least_likely"]]
                         for a, v in b["descriptors"].items()])]
    return out


def _robustness(res: dict) -> list[str]:
    r = res.get("robustness")
    out = ["## Robustness", ""]
    if not r:
        return out + [f"Not measured ({res.get('skipped', {}).get('robustness', 'not asked')})."]
    out.append(f"Performance Drop Rate (PromptBench: 1 - attacked / clean score) on the first "
               f"{_v(res.get('robustness_items'))} items of each task:")
    rows = [[t, tr["metric"], _v(tr["clean"]), a, _v(ar["attacked"]), _v(ar.get("flipped")), _est(ar["pdr"])]
            for t, tr in r.items() for a, ar in tr["attacks"].items()]
    return out + ["", *_table(["task", "metric", "clean", "attack", "attacked", "items flipped", "PDR"], rows)]


def write_model_card(path: str | Path, res: dict, name: str = "candorlm model") -> str:
    """Write the card for results `res` to path (atomically); returns its text."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(language=["en", "code"], license="apache-2.0", library_name="candorlm",
                         tags=["candorlm", "text-generation", "code"], pipeline_tag="text-generation",
                         model_name=name, eval_results=_index(res, name) or None)
    lines = [f"# {name}", "", f"A candorlm model ({res.get('model')}); every figure below is from eval/results.json "
             f"(written {res.get('created')}).", "", "## Intended use", "", INTENDED, "", "## Out-of-scope use", "",
             OUT_OF_SCOPE, ""]
    for part in (_training_data, _compute, _results, _bias, _robustness):
        lines += part(res) + [""]
    lines += ["## Limitations and recommendations", ""] + [f"- {x}" for x in LIMITATIONS]
    lines += ["- Recommendation: read the data card and the bias tables before any use; rerun `candor eval` after "
              "any change to data, tuning or compression, since each can move these figures.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    atomic_write_text(path, str(card))
    return str(card)
