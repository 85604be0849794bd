"""Packaging beyond pyproject.toml: one file at the root of site-packages.

`candorlm-lm-eval.pth` makes lm-evaluation-harness's own `lm_eval` command know model type
`candor` (candorlm/lm_eval_plugin.py says how and what it costs). Files at a wheel's root land in
site-packages, so both wheels carry it there: the regular one through build_py's output
directory, the editable one (`pip install -e .`) written into the wheel beside its own .pth."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "candorlm-lm-eval.pth"


class BuildPy(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)))


class EditableWheel(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir, PTH.name))


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
