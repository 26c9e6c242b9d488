"""Sandblaster's coordinator on exact message sequences, without MPI: each message's (or
each quiet moment's) actions.  Replicas are named by their leaders' ranks; times are in
seconds."""
import pytest

from executor.coordinator_state import (ACK, READY, RESULT, Assign, CoordinatorState, End, Expect, GiveUp,
                                        shard_pushes)
from executor.shard_state import Stop


def ready(state, *replicas, now=0.0):
    """The actions of each replica's READY."""
    return [state.on(r, READY, None, now) for r in replicas]


def test_four_units_two_replicas_with_backup_tasks():
    """Replica 2 is fast: it takes the queue's units, then a copy of unit 0, which replica
    0 still runs; replica 0's RESULT comes first and wins."""
    c = CoordinatorState([0, 2], batches=1, units=4, backup_tasks=True, timeout_s=10.0)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert [c.on(2, RESULT, (0, u), t) for u, t in ((1, 1.0), (2, 2.0), (3, 3.0))] == [
        [Assign(2, 0, 2)], [Assign(2, 0, 3)], [Assign(2, 0, 0, backup=True)]]
    assert c.on(0, RESULT, (0, 0), 3.5) == [End(0, 0, (0,)), End(2, 0, (1, 2, 3)), Expect((2,)), Expect((-1,)), Stop()]
    assert c.stopped and c.listening() == []
    assert (c.units_run, c.backup_copies, len(c.live)) == (5, 1, 2)


def test_backup_copies_go_to_the_unfinished_unit_with_fewest_copies():
    c = CoordinatorState([0, 1, 2], batches=1, units=2, backup_tasks=True, timeout_s=10.0)
    assert ready(c, 0, 1, 2) == [[], [], [Assign(0, 0, 0), Assign(1, 0, 1), Assign(2, 0, 0, backup=True)]]
    assert c.on(0, RESULT, (0, 0), 1.0) == [Assign(0, 0, 1, backup=True)]
    assert c.on(2, RESULT, (0, 0), 1.5) == [Assign(2, 0, 1, backup=True)]   # unit 0 is won: a third copy of 1
    assert c.on(1, RESULT, (0, 1), 2.0) == [End(0, 0, (0,)), End(1, 0, (1,)), End(2, 0, ()), Expect((3,)),
                                            Expect((-1,)), Stop()]
    assert (c.units_run, c.backup_copies) == (5, 3)


def test_a_silent_replicas_unit_goes_back_to_the_queue_after_the_timeout():
    c = CoordinatorState([0, 1], batches=2, units=3, backup_tasks=False, timeout_s=1.0)
    assert ready(c, 0, 1) == [[], [Assign(0, 0, 0), Assign(1, 0, 1)]]
    assert c.on(1, RESULT, (0, 1), 0.5) == [Assign(1, 0, 2)]
    assert c.on(1, RESULT, (0, 2), 0.9) == []          # no backup tasks: replica 1 waits
    assert c.tick(1.0) == []                           # 1.0 s is not longer than the timeout
    assert c.tick(1.01) == [Assign(1, 0, 0)]           # replica 0 is dropped; its unit 0 goes to replica 1
    assert c.on(1, RESULT, (0, 0), 1.5) == [End(1, 0, (0, 1, 2)), Expect((1,))]
    assert c.live == {1} and c.listening() == [(None, READY)]
    # batch 1: only replica 1 is waited for; replica 0's late RESULT of batch 0 is ignored
    assert ready(c, 1, now=2.0) == [[Assign(1, 1, 0)]]
    assert c.on(0, RESULT, (0, 0), 2.1) == []
    assert c.live == {1}


def test_a_replica_that_answers_late_is_live_again_and_gets_end():
    c = CoordinatorState([0, 1], batches=1, units=2, backup_tasks=False, timeout_s=1.0)
    assert ready(c, 0, 1) == [[], [Assign(0, 0, 0), Assign(1, 0, 1)]]
    assert c.tick(2.0) == []                           # both dropped; their units wait in the queue
    assert c.live == set() and list(c.queue) == [0, 1]
    assert c.on(1, RESULT, (0, 1), 2.5) == [Assign(1, 0, 0)]
    assert c.on(1, RESULT, (0, 0), 3.0) == [End(1, 0, (0, 1)), Expect((1,)), Expect((-1,)), Stop()]


def test_the_first_batch_waits_startup_s_for_ready_later_batches_timeout_s():
    """Replica 1 is given up on while starting; its READY, late, comes in batch 1, where
    the coordinator waits timeout_s for the others and takes it back."""
    c = CoordinatorState([0, 1], batches=2, units=2, backup_tasks=False, timeout_s=1.0, startup_s=60.0)
    assert ready(c, 0, now=5.0) == [[]]
    assert c.tick(64.0) == [] and c.tick(65.5) == [Assign(0, 0, 0)]    # replica 1 never started: gone
    assert c.on(0, RESULT, (0, 0), 66.0) == [Assign(0, 0, 1)]
    assert c.on(0, RESULT, (0, 1), 67.0) == [End(0, 0, (0, 1)), Expect((1,))]
    assert ready(c, 1, 0, now=70.0) == [[], []]         # ready {0, 1}, live {0}: wait
    assert c.tick(70.5) == [] and c.tick(71.5) == [Assign(0, 1, 0), Assign(1, 1, 1)]


def test_acks_a_lost_replica_before_end_gives_its_unit_back_and_is_not_expected():
    """Two slots per replica (leaders 0 and 2): each live replica brings two pushes."""
    c = CoordinatorState([0, 2], batches=1, units=2, backup_tasks=False, timeout_s=10.0, shard_pushes=(2,),
                         acks=True)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert c.listening() == [(None, RESULT), (None, ACK)]
    assert c.on(2, ACK, (0, 0), 1.0) == []             # replica 2 lost: unit 1 is queued, nobody is free
    assert c.on(0, RESULT, (0, 0), 2.0) == [Assign(0, 0, 1)]
    assert c.on(0, RESULT, (0, 1), 3.0) == [End(0, 0, (0, 1))]
    assert c.listening() == [(0, ACK)]
    assert c.on(0, ACK, (0, 1), 3.5) == [Expect((2,)), Expect((-1,)), Stop()]


def test_acks_a_replica_lost_after_end_does_not_count_in_expect():
    c = CoordinatorState([0, 2, 4], batches=2, units=3, backup_tasks=False, timeout_s=10.0, shard_pushes=(2,),
                         acks=True)
    assert ready(c, 4, 2, 0) == [[], [], [Assign(0, 0, 0), Assign(2, 0, 1), Assign(4, 0, 2)]]
    assert [c.on(r, RESULT, (0, r // 2), 1.0) for r in (4, 0, 2)] == [
        [], [], [End(0, 0, (0,)), End(2, 0, (1,)), End(4, 0, (2,))]]
    assert c.listening() == [(0, ACK), (2, ACK), (4, ACK)]
    assert [c.on(r, ACK, (0, r != 2), 2.0) for r in (4, 2, 0)] == [[], [], [Expect((4,))]]
    assert c.live == {0, 4} and c.listening() == [(None, READY)]


def test_each_shard_expects_the_pushes_of_the_slots_that_keep_parameters_on_it():
    """mlp-digits split by layers over 2 slots, 4 shards (the Plan's ps.share): slot 1's
    1290 parameters all sit on shard 3, so shards 0-2 get one push per replica, shard 3
    two.  EXPECT counted two everywhere and shards 0-2 waited forever."""
    share = ((2403, 2403, 2402, 1112), (0, 0, 0, 1290))
    assert shard_pushes(share) == (1, 1, 1, 2)
    c = CoordinatorState([0, 2], batches=2, units=2, backup_tasks=False, timeout_s=10.0,
                         shard_pushes=shard_pushes(share), acks=True)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert [c.on(r, RESULT, (0, r // 2), 1.0) for r in (0, 2)] == [[], [End(0, 0, (0,)), End(2, 0, (1,))]]
    assert [c.on(r, ACK, (0, 1), 2.0) for r in (0, 2)] == [[], [Expect((2, 2, 2, 4))]]
    # batch 1: replica 2 is lost before END; only replica 0's slots push
    assert ready(c, 0, 2, now=3.0) == [[], [Assign(0, 1, 0), Assign(2, 1, 1)]]
    assert c.on(2, ACK, (1, 0), 3.5) == []
    assert c.on(0, RESULT, (1, 0), 4.0) == [Assign(0, 1, 1)]
    assert c.on(0, RESULT, (1, 1), 4.5) == [End(0, 1, (0, 1))]
    assert c.on(0, ACK, (1, 1), 5.0) == [Expect((1, 1, 1, 2)), Expect((-1, -1, -1, -1)), Stop()]


def test_every_replica_saying_it_is_lost_gives_up_at_once():
    c = CoordinatorState([0, 2], batches=3, units=2, backup_tasks=False, timeout_s=10.0, shard_pushes=(2,),
                         acks=True)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert c.on(0, ACK, (0, 0), 1.0) == []             # replica 0 lost; replica 2 still runs unit 1
    assert c.on(2, ACK, (0, 0), 2.0) == [
        GiveUp(0, "every replica is lost (each said so) by batch 0 of 3: none is left to train")]
    assert c.stopped and c.listening() == []


def test_every_replica_lost_after_end_gives_up_before_expect():
    c = CoordinatorState([0, 2], batches=2, units=2, backup_tasks=False, timeout_s=10.0, shard_pushes=(2,),
                         acks=True)
    ready(c, 0, 2)
    assert [c.on(r, RESULT, (0, r // 2), 1.0) for r in (0, 2)] == [[], [End(0, 0, (0,)), End(2, 0, (1,))]]
    assert [c.on(r, ACK, (0, 0), 2.0) for r in (2, 0)] == [
        [], [GiveUp(0, "every replica is lost (each said so) by batch 0 of 2: none is left to train")]]


def test_with_no_replica_live_and_none_answering_the_coordinator_gives_up():
    """Dropped for silence, a replica may still answer late: the coordinator waits
    max(timeout_s, startup_s) with none live before it gives up."""
    c = CoordinatorState([0, 1], batches=2, units=2, backup_tasks=False, timeout_s=1.0, startup_s=5.0)
    assert ready(c, 0, 1) == [[], [Assign(0, 0, 0), Assign(1, 0, 1)]]
    assert c.tick(1.5) == [] and c.live == set()       # both dropped at 1.5
    assert c.tick(6.5) == []
    assert c.tick(6.51) == [GiveUp(0, "no replica is live in batch 0 of 2 and none answered for 5 s: "
                                      "none is left to train")]
    assert c.stopped and c.listening() == []


def test_a_batch_that_starts_with_no_replica_live_gives_up_if_no_ready_comes():
    """Replica 2 is dropped for silence, replica 0 wins every unit and then says it is lost:
    batch 1 has nobody live, and replica 2 (not known lost) does not send READY."""
    c = CoordinatorState([0, 2], batches=3, units=2, backup_tasks=False, timeout_s=1.0, startup_s=2.0,
                         shard_pushes=(2,), acks=True)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert c.on(0, RESULT, (0, 0), 0.5) == []
    assert c.tick(1.2) == [Assign(0, 0, 1)]            # replica 2 dropped; its unit goes to replica 0
    assert c.on(0, RESULT, (0, 1), 1.5) == [End(0, 0, (0, 1))]
    assert c.on(0, ACK, (0, 0), 1.6) == [Expect((0,))]
    assert c.listening() == [(None, READY)] and c.tick(3.6) == []
    assert c.tick(3.7) == [GiveUp(1, "no replica is live in batch 1 of 3 and none answered for 2 s: "
                                     "none is left to train")]


def test_end_comes_only_after_the_last_unit():
    c = CoordinatorState([0], batches=1, units=3, backup_tasks=True, timeout_s=10.0)
    assert ready(c, 0) == [[Assign(0, 0, 0)]]
    assert [c.on(0, RESULT, (0, u), 1.0 + u) for u in range(3)] == [
        [Assign(0, 0, 1)], [Assign(0, 0, 2)], [End(0, 0, (0, 1, 2)), Expect((1,)), Expect((-1,)), Stop()]]


def test_coordinator_refuses_a_tag_out_of_phase_and_bad_counts():
    c = CoordinatorState([0], batches=1, units=1, backup_tasks=False, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"tag\(=33\) from rank 0 is not taken in phase 'ready'"):
        c.on(0, RESULT, (0, 0), 0.0)
    with pytest.raises(ValueError, match=r"units\(=0\)"):
        CoordinatorState([0], batches=1, units=0, backup_tasks=False, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"at least one replica"):
        CoordinatorState([], batches=1, units=1, backup_tasks=False, timeout_s=1.0)
    for bad in ((), (1, -1)):
        with pytest.raises(ValueError, match=r"shard_pushes\(=\(.*\)\) must name one count >= 0 per shard"):
            CoordinatorState([0], batches=1, units=1, backup_tasks=False, timeout_s=1.0, shard_pushes=bad)
