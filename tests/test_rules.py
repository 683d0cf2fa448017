"""The rules every store backend applies, as pure functions over job records: claim, recover, expire, dedupe."""

from __future__ import annotations

from asyncjobs import rules
from asyncjobs.models import Job, JobIds, Status, start, succeed

new_id = JobIds()


def job(task: str = "t", *, status: Status = Status.QUEUED, attempts: int = 0, max_attempts: int = 1,
        seq: int = 0) -> Job:
    return Job(id=new_id(), task=task, params=b"{}", status=status, priority=0, created_at=0.0,
               expires_at=100.0, run_at=0.0, max_attempts=max_attempts, attempts=attempts, seq=seq)


def test_pick_claimable_keeps_order_limit_and_each_tasks_room():
    candidates = [job("a", seq=1), job("b", seq=2), job("a", seq=3), job("c", seq=4), job("b", seq=5)]
    started = rules.pick_claimable(candidates, {"a": 1, "b": None, "c": 0}, limit=3, now=5.0)
    assert [(j.task, j.seq) for j in started] == [("a", 1), ("b", 2), ("b", 5)]
    assert all(j.status is Status.RUNNING and j.started_at == 5.0 and j.attempts == 1 for j in started)
    assert rules.pick_claimable(candidates, {"a": None}, limit=0, now=5.0) == []


def test_recover_requeues_with_attempts_left_else_fails_as_interrupted():
    running = start(job(max_attempts=2), 1.0)
    again = rules.recover_one(running, 9.0, retention_s=60)
    assert again.status is Status.QUEUED and again.run_at == 9.0
    spent = start(job(max_attempts=1), 1.0)
    failed = rules.recover_one(spent, 9.0, retention_s=60)
    assert failed.status is Status.FAILED and failed.error == {"type": "interrupted", "message": rules.INTERRUPTED}
    assert failed.expires_at == 69.0


def test_expired_outcome_cancels_queued_stops_running_and_drops_terminal():
    queued = job()
    canceled = rules.expired_outcome(queued, 200.0)
    assert canceled is not None and canceled.status is Status.CANCELED and canceled.expires_at == 100.0
    assert rules.expired_outcome(start(job(), 1.0), 200.0) is None
    done = succeed(start(job(), 1.0), 2.0, result=b"1", result_type=None, retention_s=1)
    assert rules.expired_outcome(done, 200.0) is done


def test_dedupe_order_key_then_equal_then_queue_then_owner():
    a, b = job(), job()
    assert rules.dedupe(same_key=a, equal=b, admit=False, owner_queued=9, max_queued_for_owner=1) == \
        (rules.Dedupe.IDEMPOTENCY, a)
    assert rules.dedupe(same_key=None, equal=b, admit=False, owner_queued=9, max_queued_for_owner=1) == \
        (rules.Dedupe.REUSE, b)
    assert rules.dedupe(same_key=None, equal=None, admit=False, owner_queued=0, max_queued_for_owner=1) == \
        (rules.Dedupe.REFUSED, None)
    assert rules.dedupe(same_key=None, equal=None, admit=True, owner_queued=1, max_queued_for_owner=1) == \
        (rules.Dedupe.QUOTA, None)
    assert rules.dedupe(same_key=None, equal=None, admit=True, owner_queued=0, max_queued_for_owner=1) is None
    assert rules.dedupe(same_key=None, equal=None, admit=True, owner_queued=None, max_queued_for_owner=0) is None


def test_virtual_start_takes_turns():
    assert rules.virtual_start(owner_last=None, floor=0) == 0
    assert rules.virtual_start(owner_last=41, floor=3) == 42  # a backlog goes on from its own last job
    assert rules.virtual_start(owner_last=None, floor=7) == 7  # a newcomer starts at the current turn


def test_a_lease_is_lost_when_another_node_held_it_and_it_ran_out():
    running = start(job(), 1.0)
    mine = rules.pick_claimable([job()], {}, 1, 1.0, node="a")[0]
    assert not rules.lease_lost(mine, 5.0, node="a")
    assert rules.lease_lost(mine, 5.0, node="b")  # no end: it lasts only while node a lives, and b is running
    timed = rules.pick_claimable([job()], {}, 1, 1.0, node="a", lease_until=10.0)[0]
    assert not rules.lease_lost(timed, 5.0, node="b") and rules.lease_lost(timed, 10.0, node="b")
    assert not rules.lease_lost(timed, 5.0, node="a") and rules.lease_lost(timed, 10.0, node="a")  # not renewed
    assert not rules.lease_lost(job(), 5.0, node="b")  # only running jobs hold leases
    assert rules.lease_lost(running, 5.0, node="b")
