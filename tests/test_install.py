"""Installing: pyproject.toml declares ranges (a library's), requirements.lock holds one exact version of
each package inside those ranges (the tested set), torch stays out of the lock (installed first), and the
Makefile installs torch, then the lock, then raymeta without dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_runtime_dependencies_are_ranges_and_the_lock_pins_each_inside_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = _lock()
    for text in project["dependencies"] + project["optional-dependencies"]["mlflow"]:
        req = Requirement(text)
        assert not any(s.operator == "==" for s in req.specifier), f"{text}: a library declares a range, not a pin"
        if canonicalize_name(req.name) == "torch":
            assert "torch" not in lock  # installed first, on its own (its CPU or CUDA build)
            continue
        assert canonicalize_name(req.name) in lock, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(lock[canonicalize_name(req.name)], prereleases=True), (
            text,
            lock[canonicalize_name(req.name)],
        )
    for text in project["optional-dependencies"]["test"]:  # the test tools are in the lock too
        assert canonicalize_name(Requirement(text).name) in lock, text


def test_make_installs_torch_then_the_lock_then_raymeta_without_dependencies():
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): pyproject.toml requirements.lock")[1].split("\n\n")[0]
    steps = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert len(steps) == 3
    assert '"$(TORCH)"' in steps[0] and "-r requirements.lock" in steps[1] and "--no-deps -e ." in steps[2]
    assert re.search(r"^TORCH\s*\?=\s*torch==2\.13\.0$", (ROOT / "Makefile").read_text(), flags=re.M)
