"""Several processes: applying DDP / FSDP2 / tensor parallelism / activation checkpointing /
compile to a built model (parallelize.py), and the process-group runtime (runtime.py)."""
