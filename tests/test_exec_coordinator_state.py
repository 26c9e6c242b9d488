"""Sandblaster's coordinator on exact message sequences, without MPI: each message's (or
each quiet moment's) actions.  Replicas are named by their leaders' ranks; times are in
seconds."""
import pytest

from executor.coordinator_state import ACK, READY, RESULT, Assign, CoordinatorState, End, Expect
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
    assert c.on(0, RESULT, (0, 0), 3.5) == [End(0, 0, (0,)), End(2, 0, (1, 2, 3)), Expect(2), Expect(-1), Stop()]
    assert c.stopped and c.listening() == []
    assert (c.units_run, c.backup_copies, len(c.live)) == (5, 1, 2)


def test_backup_copies_go_to_the_unfinished_unit_with_fewest_copies():
    c = CoordinatorState([0, 1, 2], batches=1, units=2, backup_tasks=True, timeout_s=10.0)
    assert ready(c, 0, 1, 2) == [[], [], [Assign(0, 0, 0), Assign(1, 0, 1), Assign(2, 0, 0, backup=True)]]
    assert c.on(0, RESULT, (0, 0), 1.0) == [Assign(0, 0, 1, backup=True)]
    assert c.on(2, RESULT, (0, 0), 1.5) == [Assign(2, 0, 1, backup=True)]   # unit 0 is won: a third copy of 1
    assert c.on(1, RESULT, (0, 1), 2.0) == [End(0, 0, (0,)), End(1, 0, (1,)), End(2, 0, ()), Expect(3),
                                            Expect(-1), Stop()]
    assert (c.units_run, c.backup_copies) == (5, 3)


def test_a_silent_replicas_unit_goes_back_to_the_queue_after_the_timeout():
    c = CoordinatorState([0, 1], batches=2, units=3, backup_tasks=False, timeout_s=1.0)
    assert ready(c, 0, 1) == [[], [Assign(0, 0, 0), Assign(1, 0, 1)]]
    assert c.on(1, RESULT, (0, 1), 0.5) == [Assign(1, 0, 2)]
    assert c.on(1, RESULT, (0, 2), 0.9) == []          # no backup tasks: replica 1 waits
    assert c.tick(1.0) == []                           # 1.0 s is not longer than the timeout
    assert c.tick(1.01) == [Assign(1, 0, 0)]           # replica 0 is dropped; its unit 0 goes to replica 1
    assert c.on(1, RESULT, (0, 0), 1.5) == [End(1, 0, (0, 1, 2)), Expect(1)]
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
    assert c.on(1, RESULT, (0, 0), 3.0) == [End(1, 0, (0, 1)), Expect(1), Expect(-1), Stop()]


def test_the_first_batch_waits_startup_s_for_ready_later_batches_timeout_s():
    """Replica 1 is given up on while starting; its READY, late, comes in batch 1, where
    the coordinator waits timeout_s for the others and takes it back."""
    c = CoordinatorState([0, 1], batches=2, units=2, backup_tasks=False, timeout_s=1.0, startup_s=60.0)
    assert ready(c, 0, now=5.0) == [[]]
    assert c.tick(64.0) == [] and c.tick(65.5) == [Assign(0, 0, 0)]    # replica 1 never started: gone
    assert c.on(0, RESULT, (0, 0), 66.0) == [Assign(0, 0, 1)]
    assert c.on(0, RESULT, (0, 1), 67.0) == [End(0, 0, (0, 1)), Expect(1)]
    assert ready(c, 1, 0, now=70.0) == [[], []]         # ready {0, 1}, live {0}: wait
    assert c.tick(70.5) == [] and c.tick(71.5) == [Assign(0, 1, 0), Assign(1, 1, 1)]


def test_acks_a_lost_replica_before_end_gives_its_unit_back_and_is_not_expected():
    """Two slots per replica (leaders 0 and 2): each live replica brings two pushes."""
    c = CoordinatorState([0, 2], batches=1, units=2, backup_tasks=False, timeout_s=10.0, pushes_per_replica=2,
                         acks=True)
    assert ready(c, 0, 2) == [[], [Assign(0, 0, 0), Assign(2, 0, 1)]]
    assert c.listening() == [(None, RESULT), (None, ACK)]
    assert c.on(2, ACK, (0, 0), 1.0) == []             # replica 2 lost: unit 1 is queued, nobody is free
    assert c.on(0, RESULT, (0, 0), 2.0) == [Assign(0, 0, 1)]
    assert c.on(0, RESULT, (0, 1), 3.0) == [End(0, 0, (0, 1))]
    assert c.listening() == [(0, ACK)]
    assert c.on(0, ACK, (0, 1), 3.5) == [Expect(2), Expect(-1), Stop()]


def test_acks_a_replica_lost_after_end_does_not_count_in_expect():
    c = CoordinatorState([0, 2, 4], batches=2, units=3, backup_tasks=False, timeout_s=10.0, pushes_per_replica=2,
                         acks=True)
    assert ready(c, 4, 2, 0) == [[], [], [Assign(0, 0, 0), Assign(2, 0, 1), Assign(4, 0, 2)]]
    assert [c.on(r, RESULT, (0, r // 2), 1.0) for r in (4, 0, 2)] == [
        [], [], [End(0, 0, (0,)), End(2, 0, (1,)), End(4, 0, (2,))]]
    assert c.listening() == [(0, ACK), (2, ACK), (4, ACK)]
    assert [c.on(r, ACK, (0, r != 2), 2.0) for r in (4, 2, 0)] == [[], [], [Expect(4)]]
    assert c.live == {0, 4} and c.listening() == [(None, READY)]


def test_end_comes_only_after_the_last_unit():
    c = CoordinatorState([0], batches=1, units=3, backup_tasks=True, timeout_s=10.0)
    assert ready(c, 0) == [[Assign(0, 0, 0)]]
    assert [c.on(0, RESULT, (0, u), 1.0 + u) for u in range(3)] == [
        [Assign(0, 0, 1)], [Assign(0, 0, 2)], [End(0, 0, (0, 1, 2)), Expect(1), Expect(-1), Stop()]]


def test_coordinator_refuses_a_tag_out_of_phase_and_bad_counts():
    c = CoordinatorState([0], batches=1, units=1, backup_tasks=False, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"tag\(=33\) from rank 0 is not taken in phase 'ready'"):
        c.on(0, RESULT, (0, 0), 0.0)
    with pytest.raises(ValueError, match=r"units\(=0\)"):
        CoordinatorState([0], batches=1, units=0, backup_tasks=False, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"at least one replica"):
        CoordinatorState([], batches=1, units=1, backup_tasks=False, timeout_s=1.0)
