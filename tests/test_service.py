"""The service as operators run it: `topn.py serve`, a supervisor with four worker
processes and the web app, driven over HTTP, with real processes killed and real
Redis and MySQL faults."""

import contextlib
import os
import signal
import subprocess

import pytest
import redis as redis_lib

from conftest import (all_succeeded, batch, create, exactly_one_success_each, free_port, http, kill_connections_to,
                      tasks, wait_until)


def statuses(service, user, task_ids):
    return {task['task_id']: task for task in tasks(service, user, task_ids)}


def test_batches_from_several_users_publish_end_to_end(start_service, make_user, db):
    service = start_service()
    users = [make_user(f'user{i}') for i in range(3)]
    task_ids = {user.name: create(service, user, batch(10, prefix=user.name)) for user in users}

    for user in users:
        wait_until(lambda: all_succeeded(service, user, task_ids[user.name]), timeout=30,
                   message=f'{user.name} tasks to succeed')
        exactly_one_success_each(db, task_ids[user.name])
    assert len(service.worker_pids()) == 4


def test_killed_worker_task_is_requeued_and_published_once(start_service, make_user, db):
    service = start_service(TOPN_NOOP_DELAY=1.5)
    alice = make_user('alice')
    task_ids = create(service, alice, batch(6))
    victim = wait_until(lambda: running_task_with_worker(db, alice, task_ids), message='a running task')
    victim_pid = int(victim['worker_id'].rsplit(':', 1)[1])

    os.kill(victim_pid, signal.SIGKILL)

    wait_until(lambda: all_succeeded(service, alice, task_ids), timeout=30, message='every task to succeed')
    exactly_one_success_each(db, task_ids)
    assert [h['outcome'] for h in db.history(victim['task_id'])] == ['lost', 'success']
    assert 'killed by SIGKILL' in service.log()
    wait_until(lambda: len(service.worker_pids()) == 4, message='the supervisor to replace the worker')
    assert victim_pid not in service.worker_pids()


def running_task_with_worker(db, user, task_ids):
    def first_running(cur):
        cur.execute("SELECT task_id, worker_id FROM publish_tasks WHERE user_id = %s AND status = 'running' "
                    "AND progress > 0 LIMIT 1", (user.id,))
        return cur.fetchone()
    return db.run_transaction(first_running)


@pytest.fixture
def private_redis(tmp_path):
    """A Redis server of this test's own, so the test can restart it empty."""
    port = free_port()
    command = ['redis-server', '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
               '--dir', str(tmp_path)]
    servers = []

    def start():
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append(server)
        client = redis_lib.Redis(port=port, socket_connect_timeout=1)
        wait_until(lambda: _answers(client), message='the private Redis to start')
        return server

    def restart_empty():
        servers[-1].terminate()
        servers[-1].wait(10)
        return start()

    start()
    yield f'redis://127.0.0.1:{port}/0', restart_empty
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        server.wait()


def _answers(client):
    try:
        return client.ping()
    except redis_lib.RedisError:
        return False


def test_redis_restarted_empty_mid_run_loses_no_task_and_runs_none_twice(
        start_service, make_user, db, private_redis):
    redis_url, restart_empty = private_redis
    service = start_service(TOPN_REDIS_URL=redis_url, TOPN_NOOP_DELAY=0.5)
    alice, bob = make_user('alice'), make_user('bob')
    task_ids = create(service, alice, batch(10)) + create(service, bob, batch(10))
    wait_until(lambda: running_task_with_worker(db, alice, task_ids), message='tasks to run')

    restart_empty()

    wait_until(lambda: all_succeeded(service, alice, task_ids[:10]) and all_succeeded(service, bob, task_ids[10:]),
               timeout=60, message='every task to succeed after the Redis restart')
    exactly_one_success_each(db, task_ids)
    assert 'rebuilding them from MySQL' in service.log()


def test_mysql_connections_cut_mid_run_every_task_still_finishes_once(
        start_service, make_user, db, mysql_database):
    service = start_service(TOPN_NOOP_DELAY=1)
    alice, bob = make_user('alice'), make_user('bob')
    task_ids = create(service, alice, batch(10)) + create(service, bob, batch(10))

    for finished_before_cut in (0, 6, 12):
        wait_until(lambda: successes(db, task_ids) >= finished_before_cut and running_tasks(db),
                   timeout=20, message=f'{finished_before_cut} tasks to finish and others to run')
        assert kill_connections_to(mysql_database) > 0

    wait_until(lambda: all_succeeded(service, alice, task_ids[:10]) and all_succeeded(service, bob, task_ids[10:]),
               timeout=60, message='every task to succeed')
    exactly_one_success_each(db, task_ids)
    assert http('GET', service.url + '/healthz')[0] == 200


def running_tasks(db):
    def count(cur):
        cur.execute("SELECT COUNT(*) AS n FROM publish_tasks WHERE status = 'running'")
        return cur.fetchone()['n']
    return db.run_transaction(count)


def successes(db, task_ids):
    return sum(1 for task_id in task_ids for h in db.history(task_id) if h['outcome'] == 'success')


def test_sigterm_lets_running_tasks_finish_and_exits_zero(start_service, make_user, db):
    service = start_service(TOPN_NOOP_DELAY=2)
    alice = make_user('alice')
    task_ids = create(service, alice, batch(4))
    wait_until(lambda: len([t for t in statuses(service, alice, task_ids).values() if t['status'] == 'running']) == 4,
               message='all four tasks to run')

    service.process.send_signal(signal.SIGTERM)

    assert service.process.wait(20) == 0
    rows = db.tasks_by_ids(alice.id, task_ids)
    assert [row['status'] for row in rows] == ['success'] * 4
    assert subprocess.run(['pgrep', '-P', str(service.process.pid)], capture_output=True).stdout == b''


def test_sigterm_past_the_grace_period_leaves_the_task_for_the_reaper(start_service, make_user, db):
    service = start_service(TOPN_NOOP_DELAY=30, TOPN_SHUTDOWN_GRACE=1)
    alice = make_user('alice')
    [task_id] = create(service, alice, batch(1))
    wait_until(lambda: statuses(service, alice, [task_id])[task_id]['status'] == 'running', message='the task to run')

    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(20) == 0

    restarted = start_service(TOPN_NOOP_DELAY=0)
    wait_until(lambda: all_succeeded(restarted, alice, [task_id]), timeout=20, message='the task to finish')
    assert [h['outcome'] for h in db.history(task_id)] == ['lost', 'success']


def test_web_and_workers_can_run_as_separate_services(start_service, make_user, db):
    web = start_service('--no-workers')
    start_service('--no-web')
    alice = make_user('alice')

    task_ids = create(web, alice, batch(3))

    wait_until(lambda: all_succeeded(web, alice, task_ids), timeout=30, message='the worker service to publish')
    assert web.worker_pids() == []
