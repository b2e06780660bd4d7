"""What started a run, as MLflow's source tags name it in the UI: the user's command, script or
notebook, never this package's own files (the tracker process's would be MLflow's guess)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mnist_exp import names

CONSOLE = "<console>"  # Python typed in, as MLflow names it
NOTEBOOK = "<notebook>"  # a Jupyter kernel that does not say which notebook it runs


def program() -> str:
    """The program as the user typed it: `mnist-train`, or `python -m mnist_exp.train`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # python -m
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else CONSOLE


def command_source(command: str) -> dict[str, str]:
    """The source tags of a run started by `command` (a command line): its program."""
    words = command.split()
    name = " ".join(words[:3] if words[:2] == ["python", "-m"] else words[:1])
    return {names.SOURCE_NAME_TAG: name or CONSOLE, names.SOURCE_TYPE_TAG: "LOCAL"}


def caller_source() -> dict[str, str]:
    """The source tags of a run started from Python: the notebook or the script calling."""
    notebook = _notebook()
    if notebook is not None:
        return {names.SOURCE_NAME_TAG: notebook, names.SOURCE_TYPE_TAG: "NOTEBOOK"}
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else None
    name = str(script.resolve()) if script is not None and script.is_file() else CONSOLE
    return {names.SOURCE_NAME_TAG: name, names.SOURCE_TYPE_TAG: "LOCAL"}


def _notebook() -> str | None:
    """In a Jupyter kernel, the notebook's path where Jupyter Server (JPY_SESSION_NAME) or
    VS Code (`__vsc_ipynb_file__`) tells it, else `NOTEBOOK`; None outside a kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return None
    path = os.environ.get("JPY_SESSION_NAME") or shell.user_ns.get("__vsc_ipynb_file__")
    return str(path) if path else NOTEBOOK
