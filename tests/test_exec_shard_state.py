"""A shard's decisions on exact message sequences, without MPI: each message's actions.
Gradients are floats here (the shard only sums and divides them)."""
import pytest

from executor.shard_state import (DONE, EXPECT, FETCH, Apply, ApplyMean, Checkpoint, Drop, LbfgsShardState, Reply,
                                  ShardState, Step, Stop, push_step, push_tag)


def feed(state, *messages):
    """The actions of each message (source, tag, payload), in order."""
    return [state.on(*m) for m in messages]


def push(worker, step, grad):
    return worker, push_tag(step), grad


# --- async: Downpour, DC-ASGD ----------------------------------------------------------------------
def test_two_workers_push_then_fetch_each_push_is_applied_and_each_fetch_answered():
    s = ShardState({0, 1})
    assert feed(s, (0, FETCH, 0), (1, FETCH, 0), push(0, 0, 1.0), push(1, 0, 2.0), (0, FETCH, 1), (1, FETCH, 1)) == [
        [Reply(0, 0)], [Reply(1, 0)], [Apply(0, 0, 1.0)], [Apply(1, 0, 2.0)], [Reply(0, 1)], [Reply(1, 1)]]
    assert s.applied == 2 and not s.stopped


def test_an_async_applys_staleness_is_the_updates_since_the_workers_fetch_was_answered():
    """U39: execute's JSON had no staleness (the simulator's does): each apply counts the
    updates the shard applied since the pushing worker's last answered fetch."""
    s = ShardState({0, 1})
    feed(s, (0, FETCH, 0), (1, FETCH, 0), push(0, 0, 1.0), push(1, 0, 1.0), (0, FETCH, 1), push(0, 1, 1.0),
         push(0, 2, 1.0), (1, FETCH, 1), push(1, 1, 1.0))
    assert s.staleness == [0, 1, 0, 1, 0]


def test_a_done_from_a_worker_that_pushes_elsewhere_does_not_stop_the_shard():
    """U50: with a layers split on two shards each slot pushes to one; the other slot's
    DONE counted and stopped a shard before its own worker was done."""
    s = ShardState({1})
    assert feed(s, (0, DONE, 0)) == [[]] and not s.stopped
    assert feed(s, (1, DONE, 0)) == [[Stop()]] and s.stopped


def test_a_worker_says_done_to_the_shards_it_pushes_to_sandblaster_to_all():
    """U50: a DONE to a shard that does not count it stayed unreceived at the end and the
    job ended killed after its summary; Sandblaster's shards count every worker's."""
    from executor.psrank import ShardClient

    class Comm:
        def __init__(self):
            self.sent = []

        def Send(self, buf, dest, tag):
            self.sent.append((dest, tag))
    for to_all, want in ((False, [(7, DONE)]), (True, [(7, DONE), (8, DONE)])):
        comm = Comm()
        ShardClient(comm, [7, 8], [["a run"], []], 32, done_to_all=to_all).done()
        assert comm.sent == want


def test_done_from_every_live_worker_stops_and_a_crashed_one_is_not_waited_for():
    s = ShardState({0, 1, 2}, silent={2})             # worker 2 crashed
    assert feed(s, push(2, 0, 5.0), (0, DONE, 0), (1, DONE, 0)) == [[Apply(2, 0, 5.0)], [], [Stop()]]
    assert s.stopped and s.applied == 1               # what the crashed worker pushed before still counts


def test_an_async_push_is_applied_with_its_step_past_the_tags_wrap():
    """Push tags repeat every PUSH_STEP_TAGS (10,000) steps; a worker's pushes come in order
    of step, n_push steps apart (fewer than 10,000), so each is the first step from its
    latest one that the tag stands for."""
    s = ShardState({0, 1})
    assert feed(s, push(0, 3, 1.0), push(0, 9_999, 1.0), push(1, 7, 2.0), push(0, 10_003, 1.0),
                push(0, 19_990, 1.0)) == [
        [Apply(0, 3, 1.0)], [Apply(0, 9_999, 1.0)], [Apply(1, 7, 2.0)], [Apply(0, 10_003, 1.0)],
        [Apply(0, 19_990, 1.0)]]


def test_no_live_worker_is_stopped_from_the_start():
    assert ShardState(set()).stopped


def test_a_checkpoint_every_two_updates_counts_the_resumed_ones():
    s = ShardState({0}, checkpoint_every=2, applied=40)
    assert feed(s, push(0, 0, 1.0), push(0, 1, 1.0), (0, FETCH, 2), push(0, 2, 1.0), push(0, 3, 1.0)) == [
        [Apply(0, 0, 1.0)], [Apply(0, 1, 1.0), Checkpoint(42)], [Reply(0, 2)], [Apply(0, 2, 1.0)],
        [Apply(0, 3, 1.0), Checkpoint(44)]]


# --- SSP -------------------------------------------------------------------------------------------
def test_ssp_bound_1_holds_the_fetch_of_a_worker_two_steps_ahead_until_the_slow_one_catches_up():
    """A worker's clock is the step of its latest fetch: the slow one's push alone frees
    nobody, its fetch of the next step does."""
    s = ShardState({0, 1}, staleness_bound=1)
    assert feed(s, (0, FETCH, 0), (1, FETCH, 0), push(0, 0, 1.0), (0, FETCH, 1), push(0, 1, 1.0),
                (0, FETCH, 2), push(1, 0, 3.0), (1, FETCH, 1)) == [
        [Reply(0, 0)], [Reply(1, 0)], [Apply(0, 0, 1.0)], [Reply(0, 1)], [Apply(0, 1, 1.0)],
        [],                                            # 2 - 0 > 1: held
        [Apply(1, 0, 3.0)],                            # still held: worker 1's clock is 0
        [Reply(0, 2), Reply(1, 1)]]                    # in the order the fetches came


def test_ssp_a_finished_worker_holds_nobody_back():
    s = ShardState({0, 1}, staleness_bound=0)
    assert feed(s, (1, FETCH, 0), (0, FETCH, 0), (0, FETCH, 1), (1, DONE, 0), (0, FETCH, 2), (0, DONE, 0)) == [
        [],                                            # bound 0: worker 0 has not fetched step 0 yet
        [Reply(1, 0), Reply(0, 0)], [], [Reply(0, 1)], [Reply(0, 2)], [Stop()]]


# --- sync ------------------------------------------------------------------------------------------
def test_sync_answers_a_fetch_of_step_s_once_step_s_minus_1_is_applied():
    s = ShardState({0, 1}, sync_replicas=2)
    assert feed(s, (0, FETCH, 0), push(0, 0, 1.0), (0, FETCH, 1), push(1, 0, 3.0), (1, FETCH, 1)) == [
        [Reply(0, 0)], [], [], [ApplyMean(0, (0, 1), 2.0), Reply(0, 1)], [Reply(1, 1)]]
    assert s.applied == 1 and s.step_done == 0


def test_sync_with_quorum_2_of_3_applies_two_pushes_and_drops_the_third():
    s = ShardState({0, 1, 2}, sync_replicas=3, quorum=2)
    assert feed(s, push(0, 0, 1.0), (0, FETCH, 1), push(1, 0, 3.0), push(2, 0, 100.0), (2, FETCH, 1),
                push(2, 1, 4.0), push(0, 1, 6.0)) == [
        [], [], [ApplyMean(0, (0, 1), 2.0), Reply(0, 1)], [Drop(2, 0)], [Reply(2, 1)],
        [], [ApplyMean(1, (0, 2), 5.0)]]
    assert s.applied == 2


def test_sync_a_replica_counts_once_every_slot_of_it_has_pushed():
    s = ShardState({0, 1, 2, 3}, sync_replicas=2, replica_of=lambda rank: rank // 2)   # slots 0, 1 of two replicas
    assert feed(s, push(0, 0, 1.0), push(2, 0, 2.0), push(3, 0, 3.0), push(1, 0, 4.0)) == [
        [], [], [], [ApplyMean(0, (0, 1), 5.0)]]


def test_sync_the_mean_leaves_out_the_pieces_of_a_replica_not_complete():
    """Three replicas of two slots (ranks 2r, 2r+1), quorum 2: replica 2's first piece
    comes before the quorum is met, yet is neither summed nor counted."""
    s = ShardState(range(6), sync_replicas=3, quorum=2, replica_of=lambda rank: rank // 2)
    assert feed(s, push(0, 0, 1.0), push(2, 0, 2.0), push(4, 0, 100.0), push(1, 0, 3.0), push(3, 0, 4.0),
                push(5, 0, 100.0)) == [
        [], [], [], [], [ApplyMean(0, (0, 1), 5.0), Drop(4, 0)], [Drop(5, 0)]]


def test_sync_a_crashed_workers_pushes_count_while_it_lives():
    s = ShardState({0, 1, 2}, sync_replicas=3, quorum=2, silent={2})    # worker 2 crashes at step 1
    assert feed(s, push(2, 0, 5.0), push(0, 0, 1.0), push(1, 0, 9.0), push(1, 1, 2.0), push(0, 1, 4.0)) == [
        [], [ApplyMean(0, (0, 2), 3.0)], [Drop(1, 0)], [], [ApplyMean(1, (0, 1), 3.0)]]


def test_sync_sums_in_replica_order_whichever_push_comes_first():
    a, b, c = 0.1, 0.2, 0.3                            # (a + b) + c != (c + b) + a in floats
    logs = [feed(ShardState({0, 1, 2}, sync_replicas=3), *[push(w, 0, g) for w, g in order])
            for order in (((0, a), (1, b), (2, c)), ((2, c), (1, b), (0, a)))]
    assert logs[0][-1] == logs[1][-1] == [ApplyMean(0, (0, 1, 2), ((a + b) + c) / 3)]


def test_push_tags_wrap_and_a_late_push_is_taken_for_the_step_before():
    assert push_tag(10_001) == push_tag(1)
    assert push_step(push_tag(10_001), 10_001) == 10_001
    assert push_step(push_tag(9_999), 10_000) == 9_999
    s = ShardState({0, 1}, sync_replicas=2, quorum=1)
    s.step_done = 9_999                                # steps 0 .. 9999 applied
    assert feed(s, push(1, 9_999, 1.0), push(0, 10_000, 2.0)) == [[Drop(1, 9_999)], [ApplyMean(10_000, (0,), 2.0)]]


def test_shard_refuses_an_unknown_tag_and_bad_counts():
    with pytest.raises(ValueError, match=r"tag\(=99\) is neither a push"):
        ShardState({0}).on(0, 99, None)
    with pytest.raises(ValueError, match=r"quorum\(=4\) must be between 0 and sync_replicas\(=3\)"):
        ShardState({0}, sync_replicas=3, quorum=4)
    with pytest.raises(ValueError, match=r"staleness_bound\(=-1\) must be >= 0"):
        ShardState({0}, staleness_bound=-1)


# --- Sandblaster's L-BFGS shard ----------------------------------------------------------------------
def test_lbfgs_shard_steps_along_the_sum_over_units_once_the_expected_pushes_are_in():
    s = LbfgsShardState(workers=2, units=4)
    assert feed(s, (0, FETCH, 0), (1, FETCH, 0), push(0, 0, 3.0), (0, FETCH, 1), push(1, 0, 5.0),
                (9, EXPECT, 2)) == [
        [Reply(0, 0)], [Reply(1, 0)], [], [], [], [Step(0, 2.0), Reply(0, 1)]]


def test_lbfgs_shard_an_expect_before_the_pushes_waits_for_them_and_zero_pushes_step_on_zero():
    s = LbfgsShardState(workers=1, units=2)
    assert feed(s, (9, EXPECT, 1), (9, EXPECT, 0), push(0, 0, 4.0), (9, EXPECT, -1), (0, DONE, 0)) == [
        [], [], [Step(0, 2.0), Step(1, 0.0)], [], [Stop()]]     # 0: every replica was lost


def test_lbfgs_shard_stops_after_expect_minus_1_the_last_step_and_every_done():
    s = LbfgsShardState(workers=2, units=1)
    assert feed(s, push(0, 0, 1.0), (0, DONE, 0), (9, EXPECT, 1), (9, EXPECT, -1), (0, FETCH, 1), (1, DONE, 0)) == [
        [], [], [Step(0, 1.0)], [], [Reply(0, 1)], [Stop()]]
    assert s.stopped and s.applied == 1


def test_lbfgs_shard_refuses_an_unknown_tag():
    with pytest.raises(ValueError, match=r"tag\(=99\) is neither FETCH"):
        LbfgsShardState(workers=1, units=1).on(0, 99, None)


def test_ssp_waits_for_a_crashed_worker_until_its_last_fetch_then_not():
    """R53: a crashed replica's workers are silent (their DONE never comes), but until the
    step of their last fetch before the crash they run and bound the others as before;
    after it, nobody waits for them (without a step: from the start, as before)."""
    s = ShardState({0, 1}, staleness_bound=0, silent={0}, silent_until={0: 1})
    assert feed(s, (1, FETCH, 0), (0, FETCH, 0), (1, FETCH, 1), (0, FETCH, 1), (1, FETCH, 2), (1, DONE, 0)) == [
        [],                                            # worker 0 has not fetched step 0 yet: held
        [Reply(1, 0), Reply(0, 0)], [],                # step 1 held for worker 0 too
        [Reply(1, 1), Reply(0, 1)],                    # worker 0's last fetch: it bounds nobody now
        [Reply(1, 2)], [Stop()]]
    loose = ShardState({0, 1}, staleness_bound=0, silent={0})
    assert feed(loose, (1, FETCH, 0), (1, FETCH, 1)) == [[Reply(1, 0)], [Reply(1, 1)]]
