"""Import a source file as it was at another commit, to time it beside the working tree's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"


def module_at_commit(commit: str, path: str, name: str) -> ModuleType:
    """``path`` (relative to the repository) of ``commit``, imported as ``<name>_<commit>``.

    The module's own imports resolve against the working tree, unless the caller swaps an entry
    of ``sys.modules`` around the call. It is registered in ``sys.modules`` (dataclasses look
    their module up).
    """
    source = subprocess.run(
        ["git", "show", f"{commit}:{path}"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"{name}_{commit}.py"
    target.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{name}_{commit}", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
