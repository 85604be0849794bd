"""report.md for a run: the pictures first (loss curves from each training log, the evaluation's
results with their intervals, the bias probes by group, robustness), then where the numbers
live. It reads log.jsonl files and results.json; it computes nothing new.

Charts are matplotlib PNGs in eval/ beside results.json: loss.png, results.png, bias.png, robustness.png
(each only when there is data for it; a stale one from an earlier run is removed).
"""

from __future__ import annotations

import json
from pathlib import Path

from candorlm.report.data_card import _save

CHARTS = ("loss.png", "results.png", "bias.png", "robustness.png")


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _loss_png(logs: dict[str, Path], path: Path) -> bool:
    curves = {}
    for name, log in logs.items():
        if log.is_file():
            recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            train = [(r["step"], r["loss"]) for r in recs if "loss" in r and "step" in r]
            val = [(r["step"], r["val_bpb"]) for r in recs if r.get("event") == "eval" and "val_bpb" in r]
            if train:
                curves[name] = (train, val)
    if not curves:
        return False
    fig = _figure(10, 3.6)
    left, right = fig.subplots(1, 2)
    for name, (train, val) in curves.items():
        left.plot(*zip(*train, strict=True), label=name)
        if val:
            right.plot(*zip(*val, strict=True), marker="o", label=name)
    left.set(xlabel="step", ylabel="training loss (nats/token)", title="Training loss")
    right.set(xlabel="step", ylabel="bits per byte", title="Validation bits per byte")
    left.legend()
    if right.lines:
        right.legend()
    _save(fig, path)
    return True


def _bars(ax, labels, ests, title, xlabel, ref=None):
    vals = [e["value"] for e in ests]
    err = [[v - e["ci"][0] for v, e in zip(vals, ests, strict=True)],
           [e["ci"][1] - v for v, e in zip(vals, ests, strict=True)]]
    ax.barh(labels, vals, xerr=err, color="#4a6fb5", capsize=3)
    if ref is not None:
        ax.axvline(ref, color="black", linewidth=0.8, linestyle="--")
    ax.set(title=title, xlabel=xlabel)


def _results_png(res: dict, path: Path) -> bool:
    rows = []
    for t, r in sorted(res.get("tasks", {}).items()):
        m = "acc" if "acc" in r else "pass"
        rows.append((f"{t} ({m})", r[m]))
    for k in sorted(x for x in res.get("humaneval", {}) if x.startswith("pass@")):
        rows.append((f"HumanEval {k}", res["humaneval"][k]))
    if not rows:
        return False
    fig = _figure(7, 0.45 * len(rows) + 1.4)
    _bars(fig.add_subplot(), [r[0] for r in rows], [r[1] for r in rows], "Task scores (95% intervals)", "score")
    _save(fig, path)
    return True


def _bias_png(res: dict, path: Path) -> bool:
    b = res.get("bias")
    if not b:
        return False
    fig = _figure(11, 3.8)
    left, right = fig.subplots(1, 2)
    co = b["coreference"]
    labels = [f"{s}: {g}" for s in co for g in co[s]["by_group"]] + [f"{s}: all" for s in co]
    ests = [co[s]["by_group"][g]["gap"] for s in co for g in co[s]["by_group"]] + [co[s]["gap"] for s in co]
    _bars(left, labels, ests, "Coreference: pro - anti accuracy", "gap (0 is unbiased)", ref=0)
    p = b["pairs"]
    _bars(right, list(p["by_group"]), list(p["by_group"].values()), "Minimal pairs: stereotyped share",
          "share (ideal 0.5)", ref=0.5)
    _save(fig, path)
    return True


def _robustness_png(res: dict, path: Path) -> bool:
    r = res.get("robustness")
    if not r:
        return False
    labels = [f"{t}: {a}" for t in r for a in r[t]["attacks"]]
    ests = [r[t]["attacks"][a]["pdr"] for t in r for a in r[t]["attacks"]]
    fig = _figure(7, 0.45 * len(labels) + 1.4)
    _bars(fig.add_subplot(), labels, ests, "Performance Drop Rate by attack", "PDR (0: no drop)", ref=0)
    _save(fig, path)
    return True


def write_report(out_dir: str | Path, res: dict, logs: dict[str, Path], name: str = "run",
                 charts: str = "eval") -> str:
    """Write out_dir/report.md and its charts into out_dir/charts; returns the markdown."""
    from candorlm.fileio import atomic_write_text

    out = Path(out_dir) / charts
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for png, fn in zip(CHARTS, (lambda p: _loss_png(logs, p), lambda p: _results_png(res, p),
                                lambda p: _bias_png(res, p), lambda p: _robustness_png(res, p)), strict=True):
        made[png] = fn(out / png)
        if not made[png]:
            (out / png).unlink(missing_ok=True)
    titles = {"loss.png": "Training", "results.png": "Results", "bias.png": "Bias probes", "robustness.png":
              "Prompt robustness"}
    lines = [f"# Run report: {name}", "", "The numbers behind every chart are in eval/results.json; the model card "
             "(MODEL_CARD.md) tabulates them with their intervals, and data/DATA_CARD.md describes the corpus.", ""]
    for png, ok in made.items():
        if ok:
            lines += [f"## {titles[png]}", "", f"![{titles[png]}]({charts}/{png})", ""]
    costs = res.get("costs_s") or {}
    if costs:
        lines += ["## Evaluation cost", "", "Seconds per evaluation on this machine:", "",
                  "| evaluation | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in costs.items()] + [""]
    text = "\n".join(lines)
    atomic_write_text(Path(out_dir) / "report.md", text)
    return text
