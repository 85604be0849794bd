"""candorlm: an open, transparent LLM system. `from candorlm import load` gives a model."""

__version__ = "0.1.0"


def load(model_dir, device: str = "cpu"):
    """Load a model directory (config.json, model.safetensors, tokenizer.json) for generation."""
    from candorlm.api import load as _load

    return _load(model_dir, device=device)


__all__ = ["load", "__version__"]
