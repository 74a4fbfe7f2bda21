"""Generated sections of the Markdown docs: text between ``<!-- name:start … -->`` and
``<!-- name:end -->`` is rewritten by a script, the prose around it is left alone."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str, writer: str) -> None:
    """Replace the ``name`` section of ``path`` with ``text`` (append it if the file lacks it)."""
    start, end = f"<!-- {name}:start (written by {writer}) -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.strip()}\n{end}"
    existing = path.read_text() if path.exists() else ""
    if start in existing and end in existing:
        before = existing.split(start, 1)[0]
        after = existing.split(end, 1)[1]
        path.write_text(before + section + after)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(existing + ("\n" if existing else "") + section + "\n")
