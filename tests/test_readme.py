"""README.md and docs/ against the code: they name what exists, and what they name exists.

- the README's layout table has a row for every folder of `mnist_exp/` and the top level,
  and no row for anything missing; its quick start still holds the two commands CI and
  newcomers run; it stays short (16 KB);
- docs/reference.md names every option of every config group, and every metric and tag name
  of `mnist_exp/names.py`;
- every `mnist-*` command is an entry point of pyproject.toml, every `python -m mnist_exp.*`
  a runnable module, every project path a file or folder, and every `mnist-train` command's
  overrides compose into a config that passes the range checks; the Python example's error
  is the one `train` raises.

Nothing here trains or starts a process: it reads files, composes configs and has `train`
refuse a value.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from mnist_exp import UserError, api, names
from mnist_exp.config.checks import check_config
from mnist_exp.config.paths import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
PACKAGE = ROOT / "mnist_exp"
# The top-level folders the layout table names beside the package.
TOP_LEVEL = ("conf/", "scripts/", "tests/", "outputs/", "mlruns/", "docs/")
README_MAX_BYTES = 16 * 1024
QUICK_START = ("bash scripts/setup.sh && .venv/bin/mnist-train", "bash scripts/test.sh")
NOT_COMMANDS = {"mnist-exp"}  # the project's name, not a command


def _section(title: str, path: Path = README) -> str:
    """The text of a document's `## title` section, up to the next `## ` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", path.read_text(), re.M | re.S)
    assert found, f"{path.name} has no '## {title}' section"
    return found.group(1)


def _layout_rows() -> list[str]:
    """The first cell of each row of the Layout section's tables, without its backticks."""
    return re.findall(r"^\|\s*`([^`]+)`\s*\|", _section("Layout"), re.M)


def _folders() -> set[str]:
    """What the table must name: the package and each of its sub-packages, as `mnist_exp/x/`."""
    return {f"{path.parent.relative_to(ROOT).as_posix()}/" for path in PACKAGE.rglob("__init__.py")}


def _documents() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in (README, *DOCS.glob("*.md"))]


def _entry_points() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: command name -> `module:function`."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section.group(1), re.M))


def _module_file(module: str) -> Path | None:
    """The file `python -m module` runs, if the module is ours and exists."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _train_commands() -> list[tuple[str, ...]]:
    """The arguments of every `mnist-train` command in the README and docs/performance.md.

    A command ends at a backtick, a table cell, a comment or the end of the line.
    """
    pattern = r"\bmnist-train((?: +[^\s`|#]+)*)"
    return sorted(
        {tuple(shlex.split(a)) for _, text in _documents() for a in re.findall(pattern, text)}
    )


def test_layout_table_names_every_folder_of_the_package_and_the_top_level() -> None:
    missing = sorted((_folders() | set(TOP_LEVEL)) - set(_layout_rows()))
    assert not missing, f"README.md's layout table has no row for {missing}"


def test_layout_table_names_nothing_that_is_not_there() -> None:
    rows = _layout_rows()
    assert len(rows) == len(set(rows)), "README.md's layout table names a folder twice"
    gone = [row for row in rows if not (row.endswith("/") and (ROOT / row).is_dir())]
    assert not gone, f"README.md's layout table names {gone}, which are not folders here"


def test_the_readme_stays_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes: keep it to the tour (at most {README_MAX_BYTES}); "
        f"reference material goes in docs/reference.md"
    )


def test_the_reference_names_every_option_of_every_group() -> None:
    table = _section("Configuration", REFERENCE)
    rows = {m[0]: m[1] for m in re.findall(r"^\| `([\w/]+)` \| ([^|]*) \|", table, re.M)}
    for group in sorted(p for p in (ROOT / "conf").rglob("*") if p.is_dir()):
        name = group.relative_to(ROOT / "conf").as_posix()
        if name in ("hydra", "hydra/help"):
            continue  # Hydra's own node, and --help's text: nothing to choose
        assert name in rows, f"docs/reference.md's configuration table has no row for {name}"
        for option in sorted(f.stem for f in group.glob("*.yaml")):
            assert f"`{option}`" in rows[name], f"docs/reference.md: {name} lacks `{option}`"


def test_the_python_examples_error_is_the_one_train_raises(tmp_path: Path) -> None:
    """The README's `except UserError` example prints what `train` raises (refused before it
    trains: nothing but its run folder, here under tmp_path, is made)."""
    example = re.search(
        r"^try:\n    train\((\[.*?\])\)\nexcept UserError as exc:\n    # (.*)\n    print\(exc\)$",
        _section("Tour"),
        re.M,
    )
    assert example, "README.md's Tour has no `try: train([...]) except UserError` example"
    overrides = [*ast.literal_eval(example.group(1)), f"hydra.run.dir={tmp_path}/run"]
    with pytest.raises(UserError) as refused:
        api.train(overrides)
    assert str(refused.value) == example.group(2)


def test_the_reference_names_every_metric_and_tag() -> None:
    text = _section("What every run leaves in MLflow", REFERENCE)
    named = {
        value
        for key, value in vars(names).items()
        if isinstance(value, str) and key.endswith(("_TAG", "_S", "_LOSS", "_ACCURACY"))
    }
    named |= {names.EPOCH, names.TRAIN_IMAGES_PER_S, names.SWEEP_JOBS, names.SWEEP_FINISHED}
    named |= {names.SWEEP_FAILED, names.TRIALS_COMPLETE, names.TRIALS_PRUNED}
    named |= {names.TRIALS_FAILED, names.RUN_LOG, names.REQUIREMENTS, names.FINAL_WEIGHTS}
    named |= {names.BEST_EPOCH, names.TEST_ACCURACY_LAST_EPOCH, names.BEST_WEIGHTS}
    named |= {names.best_metric(names.VAL_ACCURACY)}
    missing = sorted(n for n in named if n not in text)
    assert not missing, f"docs/reference.md does not say what these are: {missing}"


def test_quick_start_holds_the_two_commands() -> None:
    first = re.search(r"^## (.+)$", README.read_text(), re.M)
    assert first and first.group(1) == "Quick start", "README must open on its quick start"
    blocks = re.findall(r"^```bash\n(.*?)^```", _section("Quick start"), re.M | re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    for command in QUICK_START:
        assert command in lines, f"README.md's quick start lost `{command}`"
    assert (ROOT / "scripts" / "setup.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()


def test_every_mnist_command_is_an_entry_point() -> None:
    scripts = _entry_points()
    named = {m for _, text in _documents() for m in re.findall(r"\bmnist-[a-z]+\b", text)}
    named -= NOT_COMMANDS
    assert named, "README.md names no mnist-* command"
    unknown = sorted(named - set(scripts))
    assert not unknown, f"{unknown} named in the docs are not in pyproject's [project.scripts]"
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        path = _module_file(module)
        assert path, f"{command} = {target}: no module {module}"
        assert re.search(rf"^def {function}\(", path.read_text(), re.M), (
            f"{command} = {target}: {path.relative_to(ROOT)} defines no {function}()"
        )


def test_every_python_m_module_is_runnable() -> None:
    pattern = r"python -m (mnist_exp[\w.]*)"
    named = {m for _, text in _documents() for m in re.findall(pattern, text)}
    assert named, "README.md names no `python -m mnist_exp.*` command"
    for module in sorted(named):
        path = _module_file(module)
        assert path, f"`python -m {module}` is named in the docs, but there is no such module"
        assert path.name == "__main__.py" or '__name__ == "__main__"' in path.read_text(), (
            f"`python -m {module}`: {path.relative_to(ROOT)} does nothing when run"
        )


def test_every_project_path_named_exists() -> None:
    pattern = r"(?<![\w./-])((?:conf|scripts|tests|docs|mnist_exp)/[\w./-]*[\w/])"
    missing = [
        (name, path)
        for name, text in _documents()
        for path in sorted(set(re.findall(pattern, text)))
        if not (ROOT / path).exists()
    ]
    assert not missing, f"paths named in the docs that do not exist: {missing}"


@pytest.mark.parametrize("args", _train_commands(), ids=lambda args: " ".join(args) or "defaults")
def test_every_mnist_train_command_composes(args: tuple[str, ...]) -> None:
    """Its overrides compose and pass the range checks (a sweep: its first job)."""
    sweep = "-m" in args
    overrides = []
    for arg in args:
        if "=" not in arg:  # flags (-m, --cfg) and their values
            continue
        key, _, value = arg.partition("=")
        if sweep and re.match(r"(tag|choice|range|interval)\(", value):
            continue  # a search space: Optuna draws the value
        if sweep and "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    check_config(compose_config(overrides))


@pytest.mark.parametrize("image_size", [28, 32])
def test_the_readmes_own_model_fits_the_image_size_it_is_given(image_size: int) -> None:
    """The `TinyNet` of 'Your own model', as a user copies it: built as the runner builds it
    (`num_classes` and `image_size`), one score per class for images of that size."""
    import torch

    (code,) = re.findall(r"```python\n(.*?class TinyNet.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the README's own example
    net = namespace["TinyNet"](num_classes=10, image_size=image_size)
    assert net(torch.rand(2, 1, image_size, image_size)).shape == (2, 10)
