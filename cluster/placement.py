"""Placement: one Ray placement-group bundle per actor (a GPU each where the cluster has them).

Ray is used for placement and lifecycle only. A placement group reserves every actor's
device up front, so a pipeline either gets all of its actors or none (no half-started
pair holding a GPU while its partner waits forever), and `spread=True` puts each actor
on its own node (STRICT_SPREAD) for multi-node runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.resources import assigned_cpus, assigned_device  # noqa: F401  (part of this module's surface)

ACCELERATORS = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class PlacementConfig:
    n_actors: int = 2
    accelerator: str = "auto"  # "auto": GPU bundles if the cluster has >= n_actors GPUs, else CPU
    cpus_per_actor: int = 1
    spread: bool = False  # True: one actor per node (STRICT_SPREAD); False: PACK
    timeout_s: float = 120.0  # how long to wait for the group to be ready
    # With spread: a node (its Ray node ID) none of the actors may share, e.g. the caller's
    # own: a Serve replica holding the target places its drafter on another node.
    apart_from: str | None = None

    def __post_init__(self) -> None:
        # bool is an int subclass: reject it explicitly so `n_actors=True` is not "1".
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n_actors) or self.n_actors < 1:
            raise ValueError(f"n_actors must be an int >= 1, got {self.n_actors!r}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {self.accelerator!r}")
        if not is_int(self.cpus_per_actor) or self.cpus_per_actor < 1:
            raise ValueError(f"cpus_per_actor must be an int >= 1, got {self.cpus_per_actor!r}")
        if not isinstance(self.spread, bool):
            raise ValueError(f"spread must be a bool, got {self.spread!r}")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")
        if self.apart_from is not None and (not self.spread or not isinstance(self.apart_from, str)
                                            or not self.apart_from):
            raise ValueError(f"apart_from (a node ID) needs spread=True, got apart_from={self.apart_from!r}, "
                             f"spread={self.spread!r}")


class PlacementError(RuntimeError):
    """The cluster cannot hold what was asked; the message says what was asked and what it has."""


def _fmt(resources: dict[str, float]) -> str:
    # Only the resources a bundle can ask for; cluster_resources() also lists memory,
    # node:<ip> markers and accelerator types, which would drown the message.
    keys = ("CPU", "GPU")
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in keys) + "}"


def plan_bundles(
    cfg: PlacementConfig, cluster_resources: dict[str, float], nodes: int
) -> tuple[list[dict[str, float]], bool]:
    """Pure: the bundles and whether they are GPU bundles.

    Raises PlacementError right away when the cluster can never satisfy them. Only totals
    are known here, so a cluster whose total suffices but no single node does (or whose
    resources are held by someone else) passes, and `place` reports it on timeout.
    """
    gpus = cluster_resources.get("GPU", 0.0)
    cpus = cluster_resources.get("CPU", 0.0)
    asked = (
        f"{cfg.n_actors} actor(s) x {cfg.cpus_per_actor} CPU, accelerator={cfg.accelerator!r}, "
        f"spread={cfg.spread}"
    )
    has = f"cluster has {_fmt(cluster_resources)} on {nodes} alive node(s)"

    if cfg.accelerator == "gpu":
        if gpus < cfg.n_actors:
            raise PlacementError(f"asked {asked}: needs {cfg.n_actors} GPU(s), {has}")
        use_gpus = True
    elif cfg.accelerator == "auto":
        use_gpus = gpus >= cfg.n_actors
    else:
        use_gpus = False

    apart = 0 if cfg.apart_from is None else 1
    if cfg.spread and nodes < cfg.n_actors + apart:
        besides = f" besides node {cfg.apart_from[:12]}'s" if apart else ""
        raise PlacementError(f"asked {asked}: spread needs {cfg.n_actors} node(s){besides}, {has}")
    if cfg.cpus_per_actor * cfg.n_actors > cpus:
        raise PlacementError(
            f"asked {asked}: needs {cfg.cpus_per_actor * cfg.n_actors} CPU(s), {has}"
        )

    bundle: dict[str, float] = {"CPU": float(cfg.cpus_per_actor)}
    if use_gpus:
        bundle["GPU"] = 1.0  # one whole device per actor: a model and its KV cache own it
    return [dict(bundle) for _ in range(cfg.n_actors)], use_gpus


@dataclass(frozen=True)
class Placement:
    group: PlacementGroup
    bundles: tuple[dict[str, float], ...]  # one per actor
    use_gpus: bool

    def actor_options(self, index: int, capture_child_tasks: bool = False) -> dict:
        """Options for `ActorClass.options(**...)`: the resources of bundle `index` and a
        strategy pinning the actor to it.

        Child tasks are not captured by default: the actor already fills its bundle, so a
        captured child task would wait forever for resources inside it.
        """
        if not 0 <= index < len(self.bundles):
            raise IndexError(f"bundle index {index} out of range for {len(self.bundles)} bundles")
        bundle = self.bundles[index]
        return {
            "num_cpus": bundle.get("CPU", 0.0),
            "num_gpus": bundle.get("GPU", 0.0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group,
                placement_group_bundle_index=index,
                placement_group_capture_child_tasks=capture_child_tasks,
            ),
        }


def _alive_nodes() -> list[dict]:
    # ray.nodes() keeps dead nodes in its table; they can hold nothing.
    return [n for n in ray.nodes() if n.get("Alive")]


def place(cfg: PlacementConfig) -> Placement:
    """Plan from ray.cluster_resources() and the alive nodes, create the group and wait
    until it is ready (up to cfg.timeout_s). On timeout remove the group, so nothing stays
    pending and grabs resources later, and raise PlacementError saying what is missing."""
    nodes = _alive_nodes()
    bundles, use_gpus = plan_bundles(cfg, ray.cluster_resources(), len(nodes))
    strategy = "STRICT_SPREAD" if cfg.spread else "PACK"
    # every node carries its ID as the label ray.io/node-id; "!ID" selects the others
    avoid = [{"ray.io/node-id": f"!{cfg.apart_from}"}] * len(bundles) if cfg.apart_from is not None else None
    group = placement_group(bundles, strategy=strategy, bundle_label_selector=avoid)
    placed = Placement(group=group, bundles=tuple(bundles), use_gpus=use_gpus)
    try:
        ready = group.wait(timeout_seconds=cfg.timeout_s)
    except BaseException:  # Ctrl-C or a lost connection: do not leave a group pending
        release(placed)
        raise
    if ready:
        return placed

    try:
        state = placement_group_table(group).get("stats", {}).get("scheduling_state", "?")
    except Exception:  # only for the message; the removal below matters more
        state = "?"
    remove_placement_group(group)
    demand = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    available = ray.available_resources()
    missing = {k: v - available.get(k, 0.0) for k, v in demand.items() if v > available.get(k, 0.0)}
    why = (
        "missing " + ", ".join(f"{k}: {v:g}" for k, v in missing.items())
        + " cluster-wide (held by other work?)"
        if missing
        else "enough in total, but no node has room for a bundle"
        + (" (STRICT_SPREAD: each on its own node)" if cfg.spread else "")
        + (f", none on node {cfg.apart_from[:12]}" if cfg.apart_from else "")
    )
    per_node = ", ".join(_fmt(n.get("Resources", {})) for n in nodes)
    raise PlacementError(
        f"placement group {strategy} of {len(bundles)} x {_fmt(bundles[0])} not ready after "
        f"{cfg.timeout_s:g}s (scheduling state {state}): {why}; available now "
        f"{_fmt(available)}, alive nodes (totals): [{per_node}]"
    )


def release(placement: Placement) -> None:
    """Remove the group (and with it any actor still in it). Idempotent, safe if Ray is down."""
    if not ray.is_initialized():
        return  # the cluster, and the group with it, is already gone
    try:
        remove_placement_group(placement.group)
    except Exception:  # already removed, or the cluster went away under us: nothing to free
        pass
