"""Serving: the batching inference engine (engine.py) and what it is made of."""
