"""What happens to a task across attempts: retries, final failure, cancel, timeouts.

Real Worker objects (the code a worker process runs) claim from real Redis and write
to real MariaDB. The platform is a scripted stand-in whose outcome each test dictates;
the pipeline under test is the real one.
"""

import threading

import pytest

from conftest import batch, wait_until
from publishers.base import Publisher, PublishError


class ScriptedPlatform(Publisher):
    """Fails the first `failures` attempts of each task, then publishes."""
    name = 'noop'

    def __init__(self, failures=0, retryable=True, steps=0, step_gate=None):
        self.failures = failures
        self.retryable = retryable
        self.steps = steps
        self.step_gate = step_gate
        self.published = []

    def publish(self, attempt):
        for step in range(self.steps):
            if self.step_gate:
                self.step_gate.wait(5)
            attempt.progress(10 + step)
        if attempt.number <= self.failures:
            raise PublishError(f'platform said no (attempt {attempt.number})', retryable=self.retryable)
        attempt.mark_submitted()
        self.published.append(attempt.task_id)
        return f'https://platform.test/p/{attempt.task_id}'


def finished(db, user, task_id):
    task = db.task_for_user(user.id, task_id)
    return task if task['status'] in ('success', 'failed', 'cancelled') else None


def test_failed_attempts_are_retried_then_succeed(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    platform = ScriptedPlatform(failures=2)
    run_worker(publishers={'noop': platform})

    task = wait_until(lambda: finished(db, alice, task_id), message='the task to finish')

    assert task['status'] == 'success'
    assert task['retry_count'] == 2
    assert task['result_url'] == f'https://platform.test/p/{task_id}'
    assert [h['outcome'] for h in db.history(task_id)] == ['failed', 'failed', 'success']
    assert platform.published == [task_id]


def test_task_fails_for_good_after_max_retries_with_the_last_error(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    run_worker(publishers={'noop': ScriptedPlatform(failures=99)})

    task = wait_until(lambda: finished(db, alice, task_id), message='the task to fail')

    assert task['status'] == 'failed'
    assert task['retry_count'] == task['max_retries'] == 3
    assert task['error_message'] == 'platform said no (attempt 4)'
    assert [h['outcome'] for h in db.history(task_id)] == ['failed'] * 4


def test_error_a_retry_cannot_fix_fails_at_once_without_spending_retries(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    run_worker(publishers={'noop': ScriptedPlatform(failures=99, retryable=False)})

    task = wait_until(lambda: finished(db, alice, task_id), message='the task to fail')

    assert task['status'] == 'failed'
    assert task['retry_count'] == 0
    assert len(db.history(task_id)) == 1


def test_retries_back_off_exponentially_with_jitter(scheduler):
    base = scheduler.config.retry_backoff
    for retry_count, factor in enumerate((1, 2, 4)):
        delays = [scheduler.backoff(retry_count) for _ in range(200)]
        assert base * factor * 0.8 <= min(delays) <= max(delays) <= base * factor * 1.2
        assert len(set(delays)) > 100


def test_failed_attempt_waits_out_its_backoff_before_running_again(config, db, redis_client, make_user):
    import dataclasses
    from publishers import load_publishers
    from scheduler import Scheduler
    slow = Scheduler(dataclasses.replace(config, retry_backoff=30), db, redis_client, load_publishers(config))
    alice = make_user('alice')
    [task_id] = slow.submit_batch(alice.id, batch(1))
    task = slow.claim('w')

    assert slow.record_failure(task, 'boom') == 'retry'

    slow.promote_due_retries()
    assert slow.claim('w') is None
    row = db.task_for_user(alice.id, task_id)
    assert row['status'] == 'retry' and row['retry_count'] == 1
    backoff_passes(db, task_id)
    slow.promote_due_retries(now=10 ** 10)
    assert slow.claim('w')['attempt'] == 2


def backoff_passes(db, task_id):
    with db.transaction() as cur:
        cur.execute('UPDATE publish_tasks SET next_attempt_at = NOW(3) - INTERVAL 1 SECOND WHERE task_id = %s',
                    (task_id,))


def test_cancel_removes_a_pending_task_from_the_queue(scheduler, make_user, db):
    alice = make_user('alice')
    keep, drop = scheduler.submit_batch(alice.id, batch(2))

    assert scheduler.cancel(alice.id, drop) == 'cancelled'

    assert scheduler.redis.lrange(scheduler.keys.queue(alice.id), 0, -1) == [keep]
    assert db.task_for_user(alice.id, drop)['status'] == 'cancelled'
    assert scheduler.claim('w')['task_id'] == keep
    assert scheduler.claim('w') is None


def test_cancel_of_a_task_waiting_for_retry_takes_effect_at_once(scheduler, make_user, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    scheduler.record_failure(scheduler.claim('w'), 'boom')

    assert scheduler.cancel(alice.id, task_id) == 'cancelled'

    assert scheduler.redis.zcard(scheduler.keys.delayed) == 0
    assert db.task_for_user(alice.id, task_id)['status'] == 'cancelled'


def test_running_task_stops_at_its_next_step_when_cancelled(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    gate = threading.Event()
    platform = ScriptedPlatform(steps=3, step_gate=gate)
    run_worker(publishers={'noop': platform})
    wait_until(lambda: db.task_for_user(alice.id, task_id)['status'] == 'running', message='the task to run')

    assert scheduler.cancel(alice.id, task_id) == 'cancelling'
    gate.set()

    task = wait_until(lambda: finished(db, alice, task_id), message='the task to stop')
    assert task['status'] == 'cancelled'
    assert platform.published == []
    assert [h['outcome'] for h in db.history(task_id)] == ['cancelled']


def test_cancel_after_the_platform_accepted_ends_success_with_the_url(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    submitted, cancel_sent = threading.Event(), threading.Event()

    class AcceptsThenWaits(Publisher):
        name = 'noop'

        def publish(self, attempt):
            attempt.mark_submitted()
            submitted.set()
            cancel_sent.wait(5)
            attempt.progress(95)
            return 'https://platform.test/p/accepted'

    run_worker(publishers={'noop': AcceptsThenWaits()})
    submitted.wait(5)
    assert scheduler.cancel(alice.id, task_id) == 'cancelling'
    cancel_sent.set()

    task = wait_until(lambda: finished(db, alice, task_id), message='the task to finish')
    assert task['status'] == 'success'
    assert task['result_url'] == 'https://platform.test/p/accepted'


def test_cancelling_a_finished_task_is_a_conflict(scheduler, make_user, db):
    from errors import Conflict
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    scheduler.record_success(scheduler.claim('w'), 'https://platform.test/p/1')

    with pytest.raises(Conflict) as refused:
        scheduler.cancel(alice.id, task_id)

    assert refused.value.code == 'task_finished'
    assert db.task_for_user(alice.id, task_id)['status'] == 'success'


def test_attempt_past_the_task_timeout_fails_that_attempt(config, db, redis_client, make_user, run_worker):
    import dataclasses
    from publishers import load_publishers
    from publishers.noop import NoopPublisher
    from scheduler import Scheduler
    short = dataclasses.replace(config, task_timeout=0.3, max_retries=1)
    scheduler = Scheduler(short, db, redis_client, load_publishers(short))
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    worker = run_worker(publishers={'noop': NoopPublisher(delay=2)})
    worker.config = short

    task = wait_until(lambda: finished(db, alice, task_id), timeout=15, message='the task to time out')

    assert task['status'] == 'failed'
    assert [h['outcome'] for h in db.history(task_id)] == ['timeout', 'timeout']
    assert 'timed out after 0.3 s' in task['error_message']


def test_reaper_fails_an_attempt_stuck_past_the_task_timeout(config, db, redis_client, make_user):
    import dataclasses
    from publishers import load_publishers
    from scheduler import Scheduler
    short = dataclasses.replace(config, task_timeout=0.2, lease_ttl=60)
    scheduler = Scheduler(short, db, redis_client, load_publishers(short))
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    stuck = scheduler.claim('stuck-worker')

    wait_until(lambda: scheduler.requeue_overdue_attempts() == 1, message='the reaper to take the attempt back')

    row = db.task_for_user(alice.id, task_id)
    assert row['status'] == 'retry' and row['retry_count'] == 1
    assert 'timed out' in row['error_message']
    assert scheduler.record_success(stuck, 'https://late.test/p/1') is None
    assert db.task_for_user(alice.id, task_id)['result_url'] is None
