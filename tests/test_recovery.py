"""Faults lose nothing and duplicate nothing: Redis emptied, leases lost, MySQL connections dropped."""

import threading

from conftest import batch, delete_prefix, kill_connections_to, wait_until
from publishers.base import Publisher


class CountingPlatform(Publisher):
    """Publishes instantly-ish and remembers every publish, so duplicates would show."""
    name = 'noop'

    def __init__(self, delay=0.0):
        self.delay = delay
        self.published = []
        self.lock = threading.Lock()

    def publish(self, attempt):
        if self.delay:
            threading.Event().wait(self.delay)
        attempt.progress(50)
        attempt.mark_submitted()
        with self.lock:
            self.published.append(attempt.task_id)
        return f'https://platform.test/p/{attempt.task_id}'


def all_succeeded(db, user, task_ids):
    rows = db.tasks_by_ids(user.id, task_ids)
    return all(row['status'] == 'success' for row in rows)


def successful_attempts(db, task_id):
    return [h for h in db.history(task_id) if h['outcome'] == 'success']


def test_tasks_survive_redis_being_emptied_and_run_once(scheduler, make_user, run_worker, db, redis_server, config):
    alice, bob = make_user('alice'), make_user('bob')
    task_ids = scheduler.submit_batch(alice.id, batch(5)) + scheduler.submit_batch(bob.id, batch(3))

    delete_prefix(redis_server, config.redis_prefix)
    platform = CountingPlatform()
    run_worker(publishers={'noop': platform})

    wait_until(lambda: all_succeeded(db, alice, task_ids[:5]) and all_succeeded(db, bob, task_ids[5:]),
               message='every task to succeed after Redis lost its queues')
    assert sorted(platform.published) == sorted(task_ids)


def test_redis_emptied_while_tasks_wait_for_retry_keeps_their_backoff(scheduler, make_user, db, redis_server, config):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    scheduler.record_failure(scheduler.claim('w'), 'boom')

    delete_prefix(redis_server, config.redis_prefix)
    scheduler.reap()

    assert scheduler.claim('w') is None
    assert [m.split(':')[1] for m in redis_server.zrange(scheduler.keys.delayed, 0, -1)] == [task_id]


def test_task_of_a_vanished_worker_is_requeued_counting_the_attempt(scheduler, make_user, run_worker, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    vanished = scheduler.claim('vanished-worker')
    assert vanished['attempt'] == 1

    platform = CountingPlatform()
    run_worker(publishers={'noop': platform})

    wait_until(lambda: all_succeeded(db, alice, [task_id]), message='the task to be taken back and finished')
    assert [h['outcome'] for h in db.history(task_id)] == ['lost', 'success']
    assert db.task_for_user(alice.id, task_id)['retry_count'] == 1
    assert platform.published == [task_id]
    assert scheduler.record_success(vanished, 'https://late.test/p/1') is None


def test_lease_renewed_by_heartbeat_is_not_taken_back_from_a_slow_but_live_worker(
        scheduler, make_user, run_worker, db, config):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    platform = CountingPlatform(delay=config.lease_ttl * 2)
    run_worker(publishers={'noop': platform})

    wait_until(lambda: all_succeeded(db, alice, [task_id]), timeout=15, message='the slow task to finish')
    assert [h['outcome'] for h in db.history(task_id)] == ['success']


def test_dropped_mysql_connections_are_reopened_and_every_task_finishes_once(
        scheduler, make_user, run_worker, db, config, mysql_database):
    alice, bob = make_user('alice'), make_user('bob')
    task_ids = scheduler.submit_batch(alice.id, batch(10)) + scheduler.submit_batch(bob.id, batch(10))
    platform = CountingPlatform(delay=0.15)
    run_worker(publishers={'noop': platform}, slots=4)

    kills = 0
    for round_ in range(4):
        wait_until(lambda: len(platform.published) >= 4 * (round_ + 1), timeout=20, message='progress')
        kills += kill_connections_to(mysql_database)

    wait_until(lambda: all_succeeded(db, alice, task_ids[:10]) and all_succeeded(db, bob, task_ids[10:]),
               timeout=30, message='every task to succeed')
    assert kills > 0
    for task_id in task_ids:
        assert len(successful_attempts(db, task_id)) == 1


def test_finished_tasks_past_the_retention_are_deleted_with_their_evidence(
        scheduler, make_user, db, config, tmp_path):
    import dataclasses
    from publishers import load_publishers
    from scheduler import Scheduler
    keeping = Scheduler(dataclasses.replace(config, retention_days=1, state_dir=str(tmp_path)), db,
                        scheduler.redis, load_publishers(config))
    alice = make_user('alice')
    old, recent, pending = keeping.submit_batch(alice.id, batch(3))
    for task_id in (old, recent):
        keeping.record_failure(keeping.claim('w'), 'boom', retryable=False)
    db.record_evidence(old, 1, {'url.txt': b'x'})
    with db.transaction() as cur:
        cur.execute('UPDATE publish_tasks SET completed_at = NOW(3) - INTERVAL 2 DAY WHERE task_id = %s', (old,))

    assert keeping.delete_expired_tasks() == 1

    assert db.task_for_user(alice.id, old) is None and not db.history(old)
    assert db.evidence_file(old, 1, 'url.txt') is None
    assert db.task_for_user(alice.id, recent)['status'] == 'failed'
    assert db.task_for_user(alice.id, pending)['status'] == 'pending'
