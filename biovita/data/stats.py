"""Counts of dropped media, by table and reason, in a named Ray actor that decoders report to
and the trainer, `biovita validate` and the job read."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from biovita.data.decode import STATS_ACTOR


@ray.remote(num_cpus=0)
class MediaStats:
    """Dropped media by table and reason. Counted once per media id, however many epochs
    decode it again; `good` counts successful decodes."""

    def __init__(self) -> None:
        self.bad: dict[str, dict[str, set[str]]] = {}
        self.good: dict[str, int] = {}
        self.nodes: dict[str, set[str]] = {}  # role (decode / train) -> Ray node ids

    def add_node(self, role: str, node_id: str) -> None:
        self.nodes.setdefault(role, set()).add(node_id)

    def add(self, table: str, good: int, bad: list[tuple[str, str]], node_id: str = "") -> None:
        if node_id:
            self.add_node("decode", node_id)
        self.good[table] = self.good.get(table, 0) + good
        per = self.bad.setdefault(table, {})
        for media_id, reason in bad:
            per.setdefault(reason, set()).add(media_id)

    def snapshot(self) -> dict[str, Any]:
        return {
            "good": dict(self.good),
            "bad": {t: {r: len(ids) for r, ids in per.items()} for t, per in self.bad.items()},
            "examples": {f"{t}:{r}": sorted(ids)[:5] for t, per in self.bad.items()
                         for r, ids in per.items()},
            "nodes": {role: sorted(ids) for role, ids in self.nodes.items()},
        }

    def reset(self) -> None:
        self.__init__()


_HANDLES: dict[str, Any] = {}


def media_stats(name: str = STATS_ACTOR):
    """The named stats actor; the driver creates it and owns it (it ends with the job). The
    handle is kept here: a named actor whose last handle goes away is destroyed. It lives on
    the driver's node, which the job cannot outlive anyway: on any other node, losing that
    node lost the counts and failed the stage's end."""
    if name not in _HANDLES:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _HANDLES[name] = MediaStats.options(name=name, get_if_exists=True,
                                            scheduling_strategy=here).remote()
    return _HANDLES[name]


def drop_media_stats(name: str) -> None:
    """End a stats actor this process created (a `validate` pass's own counter)."""
    handle = _HANDLES.pop(name, None)
    if handle is not None:
        ray.kill(handle)


def bad_media_counts(name: str = STATS_ACTOR) -> dict[str, Any]:
    return ray.get(ray.get_actor(name).snapshot.remote())


def report(stats_name: str | None, table: str, good: int, bad: list[tuple[str, str]]) -> None:
    """Add a decoder's counts (fire and forget); nothing happens when nobody asked for counts."""
    if not stats_name:
        return
    if stats_name not in _HANDLES:  # one lookup per worker process, not one per batch
        try:
            _HANDLES[stats_name] = ray.get_actor(stats_name)
        except ValueError:  # no stats actor: decoding goes on regardless
            return
    _HANDLES[stats_name].add.remote(table, good, bad, ray.get_runtime_context().get_node_id())


def record_node(role: str, name: str = STATS_ACTOR) -> None:
    """Tell the job's stats actor which node this process works on (placement checks)."""
    try:
        ray.get_actor(name).add_node.remote(role, ray.get_runtime_context().get_node_id())
    except ValueError:
        pass
