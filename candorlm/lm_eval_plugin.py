"""Model type `candor` for lm-evaluation-harness's own `lm_eval` command.

The harness (0.4) finds models only in its registry and loads no plugins, so
`lm_eval --model candor` could not find this package's adapter (evaluate/harness.py). The
installed `candorlm-lm-eval.pth` (setup.py puts it in site-packages) imports this module when
the interpreter starts; it imports nothing heavy, only adds an import hook that, once
`lm_eval.api.registry` has been imported (by the harness, if ever), registers `candor` there as
a lazy placeholder, "candorlm.evaluate.harness:CandorLM". The adapter, torch and the model are
loaded only when the harness asks for that model type. A process that never imports lm_eval
pays for one entry in `sys.meta_path`, which removes itself when the registry is imported.

    lm_eval --model candor --model_args model=runs/demo/base --tasks TASKS [harness flags]
"""

from __future__ import annotations

import sys

REGISTRY = "lm_eval.api.registry"
TARGET = "candorlm.evaluate.harness:CandorLM"


def register(registry) -> None:
    """Register the placeholder in an imported lm_eval.api.registry (a no-op if `candor` is there)."""
    if "candor" not in registry.model_registry:
        registry.model_registry.register("candor", target=TARGET)


class _Hook:  # a meta path finder (importlib.abc would add ~10 ms to every interpreter start)
    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module, run=run):
            run(module)
            try:
                register(module)
            except Exception as e:  # a harness whose registry changed shape: say so, never break it
                print(f"candorlm: could not register model type 'candor' with lm_eval: {e}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Add the hook (idempotent); register at once when the registry is already imported."""
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


install()
