"""The lm-evaluation-harness adapter: model type `candor`, so the harness's tasks run on a
candorlm model directory through evaluate/scoring.py (the scorer the task runner uses, so the
two give the same log-likelihoods for the same requests).

    lm_eval --model candor --model_args model=runs/demo/base --tasks TASKS [harness flags]
    candor lm-eval --model candor --model_args model=DIR --tasks TASKS   (the same, through candor)
    import candorlm.evaluate.harness; lm_eval.simple_evaluate(model="candor", model_args="model=DIR", ...)

The harness (0.4) finds models only in its own registry and loads no plugins: the installed
`candorlm-lm-eval.pth` registers `candor` there as a lazy placeholder when the harness imports
its registry (candorlm/lm_eval_plugin.py), and importing this module registers it directly.

model_args: model (the directory), device (cpu; cuda where available), precision (auto, fp32, bf16). Requests:
loglikelihood (context, continuation), loglikelihood_rolling (the text after <|bos|>, in
windows of the model's context), generate_until (greedy unless do_sample with a temperature;
`until` and `max_gen_toks` honoured). It does not ship harness tasks or download any.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from candorlm.evaluate.scoring import Scorer


@register_model("candor")
class CandorLM(LM):
    def __init__(self, model: str, device: str = "cpu", precision: str = "auto", batch_size=None, **_ignored):
        import torch

        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # the harness's command line passes device=cuda unless told otherwise
        self.scorer = Scorer.from_dir(model, device=device, precision=precision)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        docs = [self.scorer.tokenizer.encode(r.args[0]) for r in requests]
        return [-float(n.sum()) for n in self.scorer.token_nats(docs)]

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kw.get("do_sample", False) and float(kw.get("temperature", 0) or 0) > 0
            out.append(self.scorer.generate(context, until=until, max_new_tokens=int(kw.get("max_gen_toks", 256)),
                                            temperature=float(kw["temperature"]) if sample else 0.0,
                                            seed=int(kw.get("seed", 0) or 0)))
        return out


def main(argv: list[str] | None = None) -> None:
    """The harness's command line, with `candor` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
