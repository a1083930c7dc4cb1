"""The scheduler's policy on its own: FIFO admission up to the running limit, a bounded queue, cancelled
sequences leaving at the next step (their slot counted free at once), and a drain at shutdown."""

from __future__ import annotations

import pytest

from qwen35.engine.scheduler import QueueFullError, Scheduler, Sequence, SequenceStatus


def _sequence(tag: int) -> Sequence:
    return Sequence(prompt_ids=[tag], request=None)


def test_admission_is_first_come_first_served_up_to_the_running_limit():
    scheduler = Scheduler(max_running=2, max_waiting=3)
    sequences = [_sequence(tag) for tag in range(4)]
    for sequence in sequences:
        scheduler.add(sequence)
    step = scheduler.next_step(timeout=0)
    assert step.admitted == sequences[:2] and step.running == sequences[:2]
    assert scheduler.queue_depth == 2
    scheduler.finish(sequences[0])
    step = scheduler.next_step(timeout=0)
    assert step.admitted == [sequences[2]] and step.running == [sequences[1], sequences[2]]
    assert sequences[0].status is SequenceStatus.FINISHED


def test_a_full_queue_refuses_with_a_retry_hint():
    scheduler = Scheduler(max_running=1, max_waiting=1)
    scheduler.add(_sequence(0))
    scheduler.next_step(timeout=0)
    scheduler.add(_sequence(1))
    with pytest.raises(QueueFullError) as refused:
        scheduler.add(_sequence(2))
    assert refused.value.retry_after_s >= 1 and "busy" in str(refused.value)


def test_a_cancelled_sequence_frees_its_slot_at_once_and_leaves_at_the_next_step():
    scheduler = Scheduler(max_running=1, max_waiting=0)
    first, second = _sequence(0), _sequence(1)
    scheduler.add(first)
    scheduler.next_step(timeout=0)
    with pytest.raises(QueueFullError):
        scheduler.add(second)
    scheduler.cancel(first)
    scheduler.add(second)  # accepted before the worker has even seen the cancel
    step = scheduler.next_step(timeout=0)
    assert step.dropped == [first] and step.admitted == [second] and step.running == [second]
    scheduler.cancel(first)  # twice: nothing happens
    assert scheduler.next_step(timeout=0).dropped == []


def test_waiting_sequences_can_be_cancelled_and_drain_empties_everything():
    scheduler = Scheduler(max_running=1, max_waiting=4)
    running, waiting, other = _sequence(0), _sequence(1), _sequence(2)
    for sequence in (running, waiting, other):
        scheduler.add(sequence)
    scheduler.next_step(timeout=0)
    scheduler.cancel(waiting)
    assert scheduler.next_step(timeout=0).dropped == [waiting]
    assert set(map(id, scheduler.drain())) == {id(running), id(other)}
    scheduler.close()
    assert scheduler.next_step(timeout=0) is None
    with pytest.raises(RuntimeError):
        scheduler.add(_sequence(3))


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Scheduler(max_running=0, max_waiting=1)
    with pytest.raises(ValueError):
        Scheduler(max_running=1, max_waiting=-1)


def test_background_jobs_wait_until_no_request_runs_or_waits():
    scheduler = Scheduler(max_running=2, max_waiting=2, max_background=2)
    scheduler.add_background("job a")
    assert scheduler.next_step(timeout=0).background == "job a"  # idle: offered
    running, waiting, third = _sequence(0), _sequence(1), _sequence(2)
    scheduler.add(running)
    assert scheduler.next_step(timeout=0).background is None  # a request runs (a slot is still free)
    scheduler.add(waiting)
    scheduler.add(third)
    assert scheduler.next_step(timeout=0).background is None  # and a request waits
    scheduler.finish(running)
    step = scheduler.next_step(timeout=0)
    assert step.admitted == [third] and step.background is None  # the slot went to the request
    scheduler.finish(waiting)
    scheduler.finish(third)
    assert scheduler.next_step(timeout=0).background == "job a"


def test_background_queue_drops_the_oldest_and_jobs_can_be_taken():
    scheduler = Scheduler(max_running=1, max_waiting=0, max_background=2)
    for job in ("a", "b", "c"):
        scheduler.add_background(job)
    assert scheduler.background_dropped == 1 and scheduler.background_depth == 2
    assert scheduler.take_background(lambda job: job == "c") == ["c"]
    assert scheduler.next_step(timeout=0).background == "b"
    assert scheduler.take_background(lambda job: True) == ["b"]
    step = scheduler.next_step(timeout=0)
    assert (step.admitted, step.running, step.background) == ([], [], None)
    assert scheduler.background_depth == 0


def test_calls_run_at_the_next_step_even_while_requests_run():
    scheduler = Scheduler(max_running=1, max_waiting=4)
    running = _sequence(0)
    scheduler.add(running)
    assert scheduler.next_step(timeout=0).admitted == [running]
    calls = [lambda: None, lambda: None]
    for call in calls:
        scheduler.add_call(call)
    step = scheduler.next_step(timeout=0)
    assert step.calls == calls and step.running == [running]
    assert scheduler.next_step(timeout=0).calls == []  # each runs once
    scheduler.finish(running)
    scheduler.add_call(calls[0])  # an idle worker wakes for a call
    assert scheduler.next_step(timeout=5).calls == [calls[0]]
    scheduler.add_call(calls[1])
    scheduler.close()
    assert scheduler.drop_calls() == [calls[1]] and scheduler.next_step(timeout=0) is None
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.add_call(calls[0])
