"""The package's shape: no import circle, and each folder keeps to its concern."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "mnist_exp"
# The command lines, `python -m mnist_exp.train` and the rest: nothing in a folder imports them.
# Tests marked `process` (a command, a server, a browser), parametrized cases counted one each.
MAX_PROCESS_TESTS = 25
COMMANDS = ("mnist_exp.train", "mnist_exp.rerun", "mnist_exp.compare", "mnist_exp.predict")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[str]:
    """Every module of ours that `path` imports, at its top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import mod` imports pkg.mod when that is a module of ours
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in MODULES:
                yield name


GRAPH = {name: set(_imports(path)) - {name} for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_back() -> None:
    """No import circle between modules, counting imports made inside functions."""
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


def test_no_folder_imports_itself_back() -> None:
    """Folders depend one way: training <- report <- tracking <- search <- runner <- the
    commands (`mnist_exp.train`, ...) and `api`."""
    folders: dict[str, set[str]] = {}
    for module, imported in GRAPH.items():
        folder = ".".join(module.split(".")[:2])
        folders.setdefault(folder, set()).update(".".join(m.split(".")[:2]) for m in imported)
    folders = {k: v - {k} for k, v in folders.items()}
    assert _cycle(folders) is None, " -> ".join(_cycle(folders) or [])


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        (
            "training",
            ("hydra", "omegaconf", "mlflow", "optuna", "mnist_exp.tracking", "mnist_exp.runner"),
        ),
        (
            "tracking",
            ("torch", "optuna", "mnist_exp.training", "mnist_exp.search", "mnist_exp.runner"),
        ),
        ("tracking", COMMANDS),
        # The search (Optuna, its study, the sweeper) knows no torch and no run's insides.
        ("search", ("torch", "mnist_exp.training", "mnist_exp.runner", *COMMANDS)),
        ("config", ("torch", "mlflow", "mnist_exp.training", "mnist_exp.runner")),
        ("runner", (*COMMANDS, "mnist_exp.api")),
    ],
)
def test_each_folder_knows_nothing_of_what_it_must_not(folder: str, forbidden: tuple) -> None:
    """The loop knows no Hydra, MLflow or Optuna; tracking no torch or Optuna; config no torch;
    the search no torch."""
    for path in (PACKAGE / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                hit = [f for f in forbidden if name == f or name.startswith(f"{f}.")]
                assert not hit, f"{path.relative_to(ROOT)} imports {name}"


def test_at_most_25_tests_start_a_process(request: pytest.FixtureRequest) -> None:
    """The suite runs in pytest's process but for what only a process shows (conftest fails a
    test that starts one unmarked); counted among the tests collected with this one."""
    marked = [i.nodeid for i in request.session.items if i.get_closest_marker("process")]
    assert len(marked) <= MAX_PROCESS_TESTS, marked


def test_no_two_modules_share_a_name() -> None:
    """A module's file name says what it holds, once: `trial.py` twice was two things."""
    seen: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            seen.setdefault(path.name, []).append(path.relative_to(PACKAGE).as_posix())
    assert not {k: v for k, v in seen.items() if len(v) > 1}


@pytest.mark.process
def test_the_command_line_imports_neither_torch_nor_mlflow_before_its_run() -> None:
    """A bad override is refused at once, and the tracker imports MLflow while the run imports
    torch: neither may load with the command-line modules (a module-level import once did)."""
    script = (
        "import sys, mnist_exp.train; "
        "print(sorted({'torch', 'mlflow', 'optuna'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
