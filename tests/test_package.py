"""The package's shape: imports run one way (no cycle, no upward import), the public API, `python -m raymeta`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raymeta"

# layers, bottom up: a module may import from its own layer or a lower one
LAYERS = {
    "raymeta": 0,  # the package itself: its public names load lazily, it imports nothing
    "raymeta.errors": 0,
    "raymeta.ray_compat": 0,  # the private Ray raymeta relies on, version-gated, in one place
    # infrastructure: each module at its own layer (the package imports nothing)
    "raymeta.infra": 0,
    "raymeta.infra.paths": 0,
    "raymeta.infra.io": 0,
    "raymeta.infra.storage": 0,
    "raymeta.infra.provenance": 0,
    "raymeta.infra.hub": 0,
    "raymeta.infra.ray_session": 0,
    "raymeta.infra.cluster": 2,
    "raymeta.infra.assets": 3,
    "raymeta.infra.kube": 5,
    # the algorithm
    "raymeta.core": 1,
    # data, the model
    "raymeta.data": 2,
    "raymeta.model": 2,
    # evaluation (in this process and on Ray), the config
    "raymeta.eval": 3,
    "raymeta.config": 3,
    # running, tuning
    "raymeta.run": 4,
    "raymeta.tune": 5,
    # the command line
    "raymeta.commands": 6,
    "raymeta.cli": 6,
    "raymeta.cli_args": 0,
    "raymeta.__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported raymeta module, at module level?) for every import that runs, function-level ones included."""
    found: list[tuple[str, bool]] = []
    here = _module_name(path)

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names if a.name.split(".")[0] == "raymeta")
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and child.module.startswith("raymeta"):
                for a in child.names:  # `from raymeta.x import y` imports raymeta.x.y when y is a submodule
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in modules else child.module, top))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return [(m, top) for m, top in found if m != here]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        for target, _ in _imports(path, modules):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, except the packages this module is in
            # (Python has already started them: a package's __init__ may import its own submodules)
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own_packages
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle_in_the_package():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def _layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise AssertionError(f"{module}: no layer assigned (add it to LAYERS)")


def test_imports_only_go_down_the_layers():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target, _ in _imports(path, modules):
            if _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_core_is_pure_torch():
    """core/ imports no Ray, no file-handling layer, no command line: only torch, the stdlib and raymeta.core/errors."""
    allowed_raymeta = ("raymeta.core", "raymeta.errors")
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(("ray", "raymeta.")) or n.startswith(allowed_raymeta), f"{path.name} imports {n}"


def test_no_module_reads_fault_injection_environment_variables():
    for path in PACKAGE.rglob("*.py"):
        assert "RAYMETA_FAULT" not in path.read_text(), path


def test_modules_stay_readable_in_size():
    big = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big


def test_public_api_names():
    import raymeta as r

    for name in ("TrainConfig", "MetaConfig", "load_config", "train", "evaluate", "MetaLearner", "task_meta_gradient"):
        assert name in r.__all__ and getattr(r, name) is not None
    with pytest.raises(AttributeError):
        r.not_a_name  # noqa: B018


def test_python_dash_m_raymeta_prints_the_cli_help():
    out = subprocess.run([sys.executable, "-m", "raymeta", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: raymeta") and "train" in out.stdout and "eval" in out.stdout


def test_errors_name_the_key_as_the_user_wrote_it(tmp_path, capsys):
    """The same bad model: `--model` when a flag set it, `model` when a config file or key=value did."""
    from raymeta.cli import main
    from tests.conftest import make_data_dir

    data = make_data_dir(tmp_path / "data", k=4)
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--model", str(missing), "--data", str(data), "--setting", "toy", "--k", "4"]) == 2
    assert (
        capsys.readouterr().err
        == f"raymeta: error: --model: {missing}: folder not found (expected 'builtin', a Hugging Face model folder or hub id)\n"
    )
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {missing}\ndata: {data}\nsetting: toy\nk: 2\nout: {tmp_path / 'run'}\ndistributed: false\n")
    assert main(["train", "--quiet", str(config)]) == 2
    assert (
        capsys.readouterr().err
        == f"raymeta: error: model: {missing}: folder not found (expected 'builtin', a Hugging Face model folder or hub id)\n"
    )
    assert main(["eval", "--data", str(data), "--setting", "toy", "--truncation", "both"]) == 2
    assert capsys.readouterr().err == "raymeta: error: --truncation: expected one of metaicl, shared, got 'both'\n"
    assert not (tmp_path / "run").exists()


def test_private_ray_lives_in_ray_compat_and_is_all_there():
    """No module but `raymeta/ray_compat.py` reaches into Ray's internals; every internal it uses exists on the
    installed Ray (an upgrade that moved one fails here, loudly, before any run degrades)."""
    import ray

    from raymeta import ray_compat

    private = re.compile(r"\bray\.(?:\w+\.)*_(?:private|internal)\b|\bray\._private\b")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "ray_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if private.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, offenders
    assert ray_compat.missing() == [], f"Ray {ray.__version__} moved internals raymeta uses: {ray_compat.missing()}"
    assert ray.__version__ == ray_compat.TESTED_RAY, f"Ray {ray.__version__}: re-check raymeta/ray_compat.py, then TESTED_RAY"


def test_output_piped_into_a_reader_that_stopped_is_no_traceback(monkeypatch):
    """`raymeta ... | head`: once the reader is gone, writing raises BrokenPipeError (an OSError); the command
    ends quietly with 0 instead of a traceback."""
    import os

    from raymeta.cli import main

    read, write = os.pipe()
    os.close(read)  # the reader stopped
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w", buffering=1))
    assert main(["config", "show"]) == 0


def test_train_help_says_where_a_run_goes():
    """Ray Train is the default; `--help` must not say "on one process"."""
    from raymeta.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["train"].format_help()
    assert "one process" not in text.replace("\n", " ") or "distributed=false" in text
    assert "Ray Train" in text
