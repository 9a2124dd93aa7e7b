"""cluster.placement against real Ray: pure planning, fake GPUs on one node, two real nodes.

Each class shares one cluster (starting Ray costs seconds). GPUs are faked with
`num_gpus=...`: Ray hands out ids and sets CUDA_VISIBLE_DEVICES, torch has no CUDA here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import PlacementGroup, placement_group_table

from cluster.placement import (
    Placement,
    PlacementConfig,
    PlacementError,
    assigned_cpus,
    assigned_device,
    place,
    plan_bundles,
    release,
)

MB = 1024 * 1024
RAY_ARGS = dict(object_store_memory=100 * MB, include_dashboard=False, log_to_driver=False)


@ray.remote(num_cpus=0)
class Probe:
    """What an actor placed by `Placement.actor_options` sees from inside."""

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node_id": ctx.get_node_id(),
            "pg_id": ctx.get_placement_group_id(),
            "device": assigned_device(),
            "cpus": assigned_cpus(),
            "assigned": ctx.get_assigned_resources(),
        }


def probe_all(placement: Placement) -> list[dict]:
    actors = [
        Probe.options(**placement.actor_options(i)).remote() for i in range(len(placement.bundles))
    ]
    try:
        return ray.get([a.info.remote() for a in actors], timeout=60)
    finally:
        for a in actors:
            ray.kill(a)


def pending_groups() -> list[str]:
    """Groups that still wait for (or hold) resources, i.e. anything not removed."""
    return [
        pg_id for pg_id, row in placement_group_table().items() if row["state"] != "REMOVED"
    ]


def wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---------------------------------------------------------------- pure planning

CPU_ONLY = {"CPU": 4.0, "memory": 1e9, "object_store_memory": 1e8}
TWO_GPUS = {"CPU": 4.0, "GPU": 2.0}


def test_cpu_only_cluster_gives_cpu_bundles():
    bundles, use_gpus = plan_bundles(PlacementConfig(), CPU_ONLY, nodes=1)
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert use_gpus is False


def test_enough_gpus_give_one_gpu_per_bundle():
    bundles, use_gpus = plan_bundles(PlacementConfig(cpus_per_actor=2), TWO_GPUS, nodes=1)
    assert bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert use_gpus is True
    assert bundles[0] is not bundles[1]  # no shared dict a caller could mutate twice


def test_auto_falls_back_to_cpu_when_fewer_gpus_than_actors():
    bundles, use_gpus = plan_bundles(PlacementConfig(n_actors=3), TWO_GPUS, nodes=1)
    assert bundles == [{"CPU": 1.0}] * 3 and use_gpus is False


def test_accelerator_cpu_ignores_gpus():
    bundles, use_gpus = plan_bundles(PlacementConfig(accelerator="cpu"), TWO_GPUS, nodes=1)
    assert bundles == [{"CPU": 1.0}] * 2 and use_gpus is False


@pytest.mark.parametrize("resources", [CPU_ONLY, {"CPU": 4.0, "GPU": 1.0}])
def test_accelerator_gpu_without_enough_gpus_fails(resources):
    with pytest.raises(PlacementError, match=r"needs 2 GPU.*GPU: %g" % resources.get("GPU", 0)):
        plan_bundles(PlacementConfig(accelerator="gpu"), resources, nodes=1)


def test_spread_needs_a_node_per_actor():
    with pytest.raises(PlacementError, match=r"spread needs 2 node.*on 1 alive node"):
        plan_bundles(PlacementConfig(spread=True), TWO_GPUS, nodes=1)
    bundles, _ = plan_bundles(PlacementConfig(spread=True), TWO_GPUS, nodes=2)
    assert len(bundles) == 2
    apart = PlacementConfig(n_actors=1, spread=True, apart_from="a1b2c3d4e5f6a7b8")
    with pytest.raises(PlacementError, match=r"spread needs 1 node\(s\) besides node a1b2c3d4e5f6's.*on 1 alive node"):
        plan_bundles(apart, TWO_GPUS, nodes=1)
    assert plan_bundles(apart, TWO_GPUS, nodes=2)[0] == [{"CPU": 1.0, "GPU": 1.0}]  # the actors' bundles only


@pytest.mark.parametrize("kwargs", [dict(apart_from="a1b2c3d4e5f6a7b8"), dict(spread=True, apart_from=""),
                                    dict(spread=True, apart_from=7)])
def test_apart_from_needs_spread_and_a_node_id(kwargs):
    with pytest.raises(ValueError, match=r"apart_from \(a node ID\) needs spread=True"):
        PlacementConfig(n_actors=1, **kwargs)


def test_more_cpus_than_the_cluster_has_fails():
    with pytest.raises(PlacementError, match=r"needs 6 CPU.*CPU: 4"):
        plan_bundles(PlacementConfig(cpus_per_actor=3), CPU_ONLY, nodes=1)
    with pytest.raises(PlacementError, match=r"needs 1 CPU"):
        plan_bundles(PlacementConfig(n_actors=1), {}, nodes=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_actors", 0),
        ("n_actors", 1.5),
        ("n_actors", True),
        ("accelerator", "tpu"),
        ("accelerator", None),
        ("cpus_per_actor", 0),
        ("cpus_per_actor", "2"),
        ("spread", "yes"),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("timeout_s", float("inf")),
        ("timeout_s", float("nan")),
        ("timeout_s", "10"),
    ],
)
def test_bad_config_values_raise_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        PlacementConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_actor_options_rejects_a_bad_index():
    p = Placement(group=PlacementGroup.empty(), bundles=({"CPU": 1.0},), use_gpus=False)
    with pytest.raises(IndexError):
        p.actor_options(1)


def test_outside_ray_helpers_fall_back_and_release_is_safe():
    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    p = Placement(group=PlacementGroup.empty(), bundles=(), use_gpus=False)
    release(p)  # Ray down: nothing to do, no error
    assert assigned_device() == "cpu"
    assert assigned_cpus() >= 1


# ---------------------------------------------------------------- one node, fake GPUs


@pytest.fixture(scope="class")
def fake_gpu_ray():
    ray.init(address="local", num_cpus=4, num_gpus=2, **RAY_ARGS)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("fake_gpu_ray")
class TestOneNode:
    def test_gpu_bundles_give_each_actor_its_own_gpu(self):
        placement = place(PlacementConfig(timeout_s=30))
        try:
            assert placement.use_gpus
            assert placement.bundles == ({"CPU": 1.0, "GPU": 1.0},) * 2
            opts = placement.actor_options(1)
            assert (opts["num_cpus"], opts["num_gpus"]) == (1.0, 1.0)
            assert opts["scheduling_strategy"].placement_group_bundle_index == 1

            infos = probe_all(placement)
            assert [len(i["gpu_ids"]) for i in infos] == [1, 1]
            assert infos[0]["gpu_ids"] != infos[1]["gpu_ids"]
            assert [i["device"] for i in infos] == ["cpu", "cpu"]  # fake GPUs, no CUDA
            assert [i["cpus"] for i in infos] == [1, 1]
            assert all(i["assigned"] == {"CPU": 1.0, "GPU": 1.0} for i in infos)

            row = placement_group_table(placement.group)
            assert row["state"] == "CREATED" and row["strategy"] == "PACK"
            assert all(i["pg_id"] == placement.group.id.hex() for i in infos)
            assert [i["node_id"] for i in infos] == [row["bundles_to_node_id"][b] for b in (0, 1)]
        finally:
            release(placement)
            release(placement)  # idempotent
        assert pending_groups() == []

    def test_cpu_bundles_when_asked_and_assigned_cpus_follow_the_bundle(self):
        placement = place(PlacementConfig(accelerator="cpu", cpus_per_actor=2, timeout_s=30))
        try:
            assert not placement.use_gpus
            assert placement.bundles == ({"CPU": 2.0},) * 2
            assert placement.actor_options(0)["num_gpus"] == 0
            infos = probe_all(placement)
            assert [i["gpu_ids"] for i in infos] == [[], []]
            assert [i["device"] for i in infos] == ["cpu", "cpu"]
            assert [i["cpus"] for i in infos] == [2, 2]
        finally:
            release(placement)

    def test_group_that_cannot_be_ready_times_out_and_is_removed(self):
        held = place(PlacementConfig(accelerator="gpu", timeout_s=30))  # takes both GPUs
        try:
            t0 = time.monotonic()
            msg = r"not ready after 1s.*missing GPU: 1 cluster-wide"
            with pytest.raises(PlacementError, match=msg):
                place(PlacementConfig(n_actors=1, accelerator="gpu", timeout_s=1.0))
            assert time.monotonic() - t0 < 10
            assert pending_groups() == [held.group.id.hex()]
        finally:
            release(held)
        assert pending_groups() == []
        # Removal is asynchronous; once it lands, both GPUs are free (the timed-out group
        # did not get created late and keep one).
        assert wait_for(lambda: ray.available_resources().get("GPU") == 2.0)


# ---------------------------------------------------------------- two real nodes


@pytest.fixture(scope="class")
def two_nodes():
    # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster (and deletes it on
    # shutdown): a private, short temp dir keeps a `ray start` head elsewhere untouched.
    tmp = tempfile.mkdtemp(prefix="srpg", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster()
    try:
        node_args = dict(num_cpus=1, num_gpus=1, object_store_memory=80 * MB)
        cluster.add_node(include_dashboard=False, **node_args)
        cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.usefixtures("two_nodes")
class TestTwoNodes:
    def test_spread_puts_each_actor_on_its_own_node(self):
        placement = place(PlacementConfig(spread=True, timeout_s=30))
        try:
            assert placement.use_gpus
            infos = probe_all(placement)
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2
            assert {i["node_id"] for i in infos} == nodes
            assert [len(i["gpu_ids"]) for i in infos] == [1, 1]
            assert [i["device"] for i in infos] == ["cpu", "cpu"]
            assert placement_group_table(placement.group)["strategy"] == "STRICT_SPREAD"
        finally:
            release(placement)

    def test_apart_from_keeps_the_actors_off_that_node(self):
        here = ray.get_runtime_context().get_node_id()  # the driver's
        placement = place(PlacementConfig(n_actors=1, accelerator="cpu", spread=True, apart_from=here, timeout_s=30))
        try:
            assert placement.bundles == ({"CPU": 1.0},)
            [info] = probe_all(placement)
            assert info["node_id"] != here
        finally:
            release(placement)

    def test_spread_over_more_nodes_than_alive_fails_at_once(self):
        with pytest.raises(PlacementError, match="spread needs 3 node"):
            place(PlacementConfig(n_actors=3, accelerator="cpu", spread=True, timeout_s=30))
        assert pending_groups() == []

    def test_bundle_no_single_node_holds_times_out_with_a_clear_message(self):
        # Two CPUs in total passes the plan, but each node has one: only runtime can tell.
        cfg = PlacementConfig(n_actors=1, cpus_per_actor=2, timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match="enough in total, but no node has room for a bundle"):
            place(cfg)
        assert time.monotonic() - t0 < 10
        assert pending_groups() == []
