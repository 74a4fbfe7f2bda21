"""Where a model's layer groups are solved: ``compression.parallel``, parsed (no torch import).

``serial``: one after another on torch's own threads; ``threads`` / ``threads:N``: each group's
small CPU work split between worker threads (:func:`~.devices.worker_threads`);
``<scheme>://host:port``: one task per group on that Dask cluster (:mod:`~.dask_map`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: The forms ``compression.parallel`` accepts.
FORMS = ("serial", "threads", "threads:N", "<scheme>://host:port (a Dask scheduler)")


@dataclass(frozen=True)
class Parallel:
    """How to run the groups (``map_groups``, the builtin ``map``'s signature) and how many
    worker threads share a group's small CPU work."""

    map_groups: Callable[..., Iterable[Any]]
    threads: int


def parse_parallel(spec: str) -> Parallel:
    """The :class:`Parallel` of a ``compression.parallel`` value; ``ValueError`` naming the value
    and the accepted forms otherwise."""
    if spec == "serial":
        return Parallel(map, 1)
    if spec == "threads":
        import torch

        return Parallel(map, torch.get_num_threads())
    if isinstance(spec, str) and (match := re.fullmatch(r"threads:([1-9][0-9]*)", spec)):
        return Parallel(map, int(match.group(1)))
    if isinstance(spec, str) and re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", spec):
        from weighted_lowrank.lowrank.dask_map import dask_map

        return Parallel(dask_map(spec), 1)
    raise ValueError(f"parallel {spec!r} is not one of the forms {FORMS}")
