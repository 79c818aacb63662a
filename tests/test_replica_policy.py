"""How many replicas a job runs and which it gives up (vqpipe.replica_policy), in-process: no Ray."""

import pytest

from vqpipe.replica_policy import Drop, Phase, Replica, ReplicaScaler, Shape, hosts, replica_cpus

TIMEOUT = 60.0


def scaler(exactly=0, low=None, high=None):
    return ReplicaScaler(exactly, low, high, TIMEOUT)


def replicas(*phases, since=0.0):
    return [Replica(i, p, since) for i, p in enumerate(phases)]


LIVE, LOADING, REQUESTED = Phase.LIVE, Phase.LOADING, Phase.REQUESTED


def test_a_replica_lives_on_one_node_so_nodes_are_counted_one_by_one():
    gpu = Shape(cpus=4, gpus=1)
    assert hosts([{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}], gpu) == 4
    assert hosts([{"CPU": 5, "GPU": 2}], gpu) == 1  # the CPUs run out first
    assert hosts([{"CPU": 64}], gpu) == 0  # CPU nodes hold no GPU replica
    # CPU-only: 2 x 3 CPUs hold two 2-CPU replicas, not the three their 6 CPUs would in one node
    assert hosts([{"CPU": 3}, {"CPU": 3}], Shape(cpus=2, gpus=0)) == 2
    assert hosts([{"CPU": 1, "GPU": 1.0}], Shape(cpus=0.1, gpus=0.1)) == 10  # 1.0 / 0.1 is 9.999...


@pytest.mark.parametrize(
    "nodes, gpus, replicas, want",
    [
        ([{"CPU": 96, "GPU": 8}], 1, 8, 12),  # each GPU's replica gets its share of the node's CPUs
        # the smallest share, so that every replica fits
        ([{"CPU": 96, "GPU": 8}, {"CPU": 16, "GPU": 4}], 1, 12, 4),
        ([{"CPU": 4}, {"CPU": 16, "GPU": 2}], 2, 1, 16),  # CPU-only nodes don't count for GPU replicas
        ([{"CPU": 8}], 1, 1, 1),  # GPU nodes not up yet (autoscaler): the old default
        ([{"CPU": 2}], 0, 1, 2),  # CPU-only, one replica: every CPU
        ([{"CPU": 8}, {"CPU": 4}], 0, 4, 3),  # the cluster's CPUs shared by the replicas
        ([{"CPU": 8}, {"CPU": 4}], 0, 1, 8),  # ... but never more than one node has
        ([{"CPU": 2}], 0, 0, 2),  # auto on one node: one replica with every CPU, as before
        ([{"CPU": 0}, {"CPU": 8}, {"CPU": 4}], 0, 0, 4),  # auto: the smallest node's, so each node hosts one
    ],
)
def test_cpus_per_replica_default_follows_the_cluster(nodes, gpus, replicas, want):
    assert replica_cpus(nodes, gpus, replicas) == want


def test_auto_follows_the_cluster_within_min_and_max():
    assert [scaler().wanted(c) for c in (0, 1, 5)] == [1, 1, 5]  # one at least: its request may be placed
    assert [scaler(low=2, high=4).wanted(c) for c in (0, 3, 9)] == [2, 3, 4]
    assert [scaler(exactly=3).wanted(c) for c in (0, 1, 9)] == [3, 3, 3]


def test_a_node_that_joins_gets_a_replica_and_one_that_leaves_takes_its_replica_with_it():
    s = scaler()
    assert s.decide([], capacity=2, now=0).start == 2
    two = replicas(LIVE, LIVE)
    d = s.decide(two, capacity=2, now=10)
    assert d.start == 0 and d.drop == []
    assert s.decide(two, capacity=3, now=20).start == 1  # a node joined
    # a node left: its replica died and waits for Ray to restart it somewhere: given up at once, not at the
    # placement timeout; a live replica is never given up, even where the count says one too many
    restarting = [Replica(0, LIVE, 0), Replica(1, REQUESTED, 30), Replica(2, LIVE, 0)]
    d = s.decide(restarting, capacity=2, now=31)
    assert d.start == 0 and d.drop == [Drop(1, "the cluster now hosts 2")]
    assert s.decide(replicas(LIVE, LIVE, LIVE), capacity=1, now=40).drop == []


def test_when_the_cluster_shrinks_the_unplaced_newest_go_first_then_the_loading():
    s = scaler()
    pool = [Replica(0, LIVE, 0), Replica(1, LOADING, 5), Replica(2, REQUESTED, 5), Replica(3, REQUESTED, 5)]
    assert [d.index for d in s.decide(pool, capacity=2, now=6).drop] == [3, 2]
    assert [d.index for d in s.decide(pool, capacity=1, now=6).drop] == [3, 2, 1]


def test_an_unplaced_replica_is_given_up_after_the_timeout_and_asked_again_only_when_the_cluster_changes():
    """--replicas 2 --gpus-per-replica 1 on a cluster with one GPU: the second waits, is given up after the
    placement timeout, and is not asked for again (it would only wait again) until a node joins or leaves."""
    s = scaler(exactly=2)
    assert s.decide([], capacity=1, now=0).start == 2
    waiting = [Replica(0, LIVE, 3), Replica(1, REQUESTED, 0)]
    assert s.decide(waiting, capacity=1, now=TIMEOUT - 1) == s.decide(waiting, 1, now=TIMEOUT - 1)
    assert s.decide(waiting, capacity=1, now=TIMEOUT - 1).drop == []
    d = s.decide(waiting, capacity=1, now=TIMEOUT)
    assert d.drop == [Drop(1, f"not placed in {TIMEOUT:.0f}s")] and d.start == 0 and s.given_up == 1
    one = [Replica(0, LIVE, 3)]
    assert s.decide(one, capacity=1, now=TIMEOUT + 100).start == 0
    assert s.decide(one, capacity=2, now=TIMEOUT + 200).start == 1 and s.given_up == 0  # a GPU node joined


def test_no_room_at_all_gives_every_replica_up():
    s = scaler()
    assert (
        s.decide([], capacity=0, now=0).start == 1
    )  # auto asks for one anyway: an autoscaler may add a node
    d = s.decide(replicas(REQUESTED), capacity=0, now=TIMEOUT + 1)
    assert (
        [x.index for x in d.drop] == [0] and d.start == 0 and s.given_up == 1
    )  # the pool reports no capacity


def test_a_placed_replica_loading_its_model_is_not_timed_out():
    s = scaler(exactly=1)
    assert s.decide(replicas(LOADING), capacity=1, now=10 * TIMEOUT).drop == []
