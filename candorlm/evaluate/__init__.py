"""candorlm.evaluate: the evaluation stage (bits per byte, bpb.py)."""
