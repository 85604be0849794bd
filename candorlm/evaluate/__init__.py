"""candorlm.evaluate: the evaluation stage. scoring.py runs the model (log-likelihoods, token
nats, generation) for every evaluation; lm.py, tasks.py, code_tasks.py, humaneval.py (with
sandbox.py), probes.py and robustness.py measure; harness.py adapts the scorer to
lm-evaluation-harness; suite.py is `candor eval`; bpb.py is training's validation figure."""
