"""Scheduled publishing: a batch with a `publish_at` waits in MySQL as `scheduled`, holding no
queue entry, worker or browser, and is queued by the reaper when it is due.

Admission and promotion run in-process against real MariaDB and Redis; the timing and
restart tests run `topn.py serve` with its workers (the `noop` platform: what is under test
is when tasks start, not how they publish)."""

import concurrent.futures
import dataclasses
import datetime
import threading
import zoneinfo

import pytest

from conftest import WsgiClient, all_finished, articles, batch, count_tasks, delete_prefix, http, wait_until, \
    web_app
from publishers import load_publishers
from scheduler import Keys, Scheduler, parse_publish_at

CREATE = '/api/publish/create_batch'
CANCEL = '/api/publish/tasks/cancel'
UTC = datetime.timezone.utc
SHANGHAI = zoneinfo.ZoneInfo('Asia/Shanghai')


def now():
    return datetime.datetime.now(UTC)


def stored(db, task_ids):
    with db.transaction() as cur:
        cur.execute('SELECT task_id, status, publish_at, started_at, attempt FROM publish_tasks WHERE task_id IN %s '
                    'ORDER BY id', (tuple(task_ids),))
        return cur.fetchall()


def redis_holds(redis_client, config, user_id):
    keys = Keys(config.redis_prefix)
    return redis_client.lrange(keys.queue(user_id), 0, -1) + redis_client.zrange(keys.delayed, 0, -1)


def schedule(client, user, when, n=2, **extra):
    response = client.post(CREATE, batch(n, publish_at=when.isoformat(), **extra), headers=user.headers)
    assert response.status == 200, response.body[:500]
    return response.json


def make_due(db, task_ids):
    with db.transaction() as cur:
        cur.execute('UPDATE publish_tasks SET publish_at = NOW(3) - INTERVAL 1 SECOND WHERE task_id IN %s',
                    (tuple(task_ids),))


# -- admission ---------------------------------------------------------------------------------

def test_a_batch_for_later_is_stored_scheduled_with_its_time_and_queued_nowhere(
        client, db, make_user, redis_client, config):
    alice = make_user('alice')
    when = (now() + datetime.timedelta(hours=3)).replace(microsecond=0)

    answer = schedule(client, alice, when.astimezone(SHANGHAI))

    task_ids = answer['task_ids']
    assert datetime.datetime.fromisoformat(answer['publish_at']) == when
    assert 'scheduled' in answer['message']
    assert [(row['status'], row['publish_at']) for row in stored(db, task_ids)] == [
        ('scheduled', when.replace(tzinfo=None))] * 2
    assert redis_holds(redis_client, config, alice.id) == []
    shown = client.get('/api/publish/tasks/status?task_ids=' + ','.join(task_ids), headers=alice.headers).json
    assert [(task['status'], datetime.datetime.fromisoformat(task['publish_at'])) for task in shown['tasks']] == [
        ('scheduled', when)] * 2
    listed = client.get('/api/publish/tasks/list?status=scheduled', headers=alice.headers).json
    assert listed['total'] == 2


def test_a_time_without_an_offset_is_read_in_the_display_timezone(client, db, make_user):
    alice = make_user('alice')
    tomorrow_nine = (now().astimezone(SHANGHAI) + datetime.timedelta(days=1)).replace(
        hour=9, minute=0, second=0, microsecond=0)

    response = client.post(CREATE, batch(1, publish_at=tomorrow_nine.strftime('%Y-%m-%dT%H:%M')),
                           headers=alice.headers)

    assert response.status == 200, response.body
    row, = stored(db, response.json['task_ids'])
    assert row['publish_at'] == tomorrow_nine.astimezone(UTC).replace(tzinfo=None)
    assert parse_publish_at('2027-01-01T09:00', 'UTC', now=datetime.datetime(2026, 12, 4, tzinfo=UTC)) == \
        datetime.datetime(2027, 1, 1, 9, tzinfo=UTC)


@pytest.mark.parametrize('publish_at, code', [
    ('next tuesday', 'invalid_publish_at'),
    (1733300000, 'invalid_publish_at'),
    ('2026-13-40T25:00:00+08:00', 'invalid_publish_at'),
    ('past', 'publish_at_in_past'),
    ('too-far', 'publish_at_too_far'),
], ids=['words', 'a-number', 'no-such-day', 'an-hour-ago', 'ninety-one-days-ahead'])
def test_a_bad_publish_at_is_refused_with_its_code_and_creates_nothing(client, db, make_user, redis_client,
                                                                      config, publish_at, code):
    alice = make_user('alice')
    publish_at = {'past': (now() - datetime.timedelta(hours=1)).isoformat(),
                  'too-far': (now() + datetime.timedelta(days=91)).isoformat()}.get(publish_at, publish_at)

    response = client.post(CREATE, batch(2, publish_at=publish_at), headers=alice.headers)

    assert response.status == 400
    assert response.json['error']['code'] == code
    assert count_tasks(db) == 0 and redis_holds(redis_client, config, alice.id) == []


def test_a_publish_at_a_few_seconds_past_publishes_now(client, db, make_user, redis_client, config):
    alice = make_user('alice')

    answer = schedule(client, alice, now() - datetime.timedelta(seconds=3))

    assert [row['status'] for row in stored(db, answer['task_ids'])] == ['pending', 'pending']
    assert redis_holds(redis_client, config, alice.id) == answer['task_ids']


def test_scheduled_tasks_count_against_a_limit_of_their_own_not_the_unfinished_one(config, db, redis_client,
                                                                                   make_user):
    small = dataclasses.replace(config, user_max_scheduled=15, user_rate=100)
    client = WsgiClient(web_app(small, db, Scheduler(small, db, redis_client, load_publishers(small))))
    alice = make_user('alice')
    later = now() + datetime.timedelta(hours=1)
    client.post(CREATE, batch(10), headers=alice.headers)

    schedule(client, alice, later, n=10)
    refused = client.post(CREATE, batch(6, publish_at=later.isoformat()), headers=alice.headers)

    assert refused.status == 429 and refused.json['error']['code'] == 'too_many_scheduled'
    assert len(schedule(client, alice, later, n=5)['task_ids']) == 5
    assert count_tasks(db, alice.id) == 25


# -- promotion and cancelling ---------------------------------------------------------------

def test_due_tasks_are_queued_once_even_by_two_reapers_at_once(client, db, make_user, redis_client, config):
    alice, bob = make_user('alice'), make_user('bob')
    later = now() + datetime.timedelta(hours=1)
    task_ids = {user.id: schedule(client, user, later, n=10)['task_ids'] for user in (alice, bob)}
    make_due(db, task_ids[alice.id] + task_ids[bob.id])
    reapers = [Scheduler(config, db.__class__(config.mysql), redis_client, load_publishers(config)) for _ in range(2)]
    start = threading.Barrier(2)

    def reap(scheduler):
        start.wait()
        return scheduler.queue_due_scheduled()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        promoted = list(pool.map(reap, reapers))

    assert sum(promoted) == 20
    for user_id, ids in task_ids.items():
        assert redis_holds(redis_client, config, user_id) == ids
        assert {row['status'] for row in stored(db, ids)} == {'pending'}


def test_tasks_not_yet_due_stay_scheduled_through_reaper_passes(client, db, make_user, redis_client, config,
                                                              scheduler):
    alice = make_user('alice')
    task_ids = schedule(client, alice, now() + datetime.timedelta(minutes=5))['task_ids']

    for _ in range(3):
        scheduler.reap()
    scheduler.rebuild_queues()

    assert {row['status'] for row in stored(db, task_ids)} == {'scheduled'}
    assert redis_holds(redis_client, config, alice.id) == []


def test_a_cancelled_scheduled_task_is_never_queued(client, db, make_user, redis_client, config, scheduler):
    alice = make_user('alice')
    kept, cancelled = schedule(client, alice, now() + datetime.timedelta(hours=1))['task_ids']

    response = client.post(CANCEL, {'task_id': cancelled}, headers=alice.headers)
    make_due(db, [kept, cancelled])
    scheduler.reap()

    assert response.status == 200 and response.json['status'] == 'cancelled'
    assert [row['status'] for row in stored(db, [kept, cancelled])] == ['pending', 'cancelled']
    assert redis_holds(redis_client, config, alice.id) == [kept]


def test_metrics_show_scheduled_tasks_per_user_and_the_next_due_time(client, make_user):
    admin, alice, bob = make_user('root', admin=True), make_user('alice'), make_user('bob')
    soon, later = now() + datetime.timedelta(hours=1), now() + datetime.timedelta(hours=2)
    schedule(client, alice, later, n=3)
    schedule(client, bob, soon.replace(microsecond=0), n=2)

    figures = client.get('/api/metrics', headers=admin.headers).json
    prometheus = client.get('/metrics', headers=admin.headers).body.decode()

    assert figures['scheduled_per_user'] == {'alice': 3, 'bob': 2}
    assert figures['tasks_by_status']['scheduled'] == 5
    assert datetime.datetime.fromisoformat(figures['next_scheduled_at']) == soon.replace(microsecond=0)
    assert 'topn_scheduled_tasks{user="alice"} 3' in prometheus
    assert 'topn_scheduled_tasks{user="bob"} 2' in prometheus
    assert f'topn_next_scheduled_timestamp_seconds {soon.replace(microsecond=0).timestamp()}' in prometheus


# -- through the service ---------------------------------------------------------------------

def submit(service, user, payload):
    status, body = http('POST', service.url + CREATE, payload, user.headers)
    assert status == 200, body
    return body['task_ids']


def test_scheduled_tasks_start_within_seconds_of_their_time_and_never_before(start_service, make_user, db):
    service = start_service(TOPN_REAPER_INTERVAL=0.5)
    users = [make_user(f'user{i}') for i in range(3)]
    due = now() + datetime.timedelta(seconds=5)
    task_ids = {user.name: submit(service, user, batch(10, publish_at=due.isoformat())) for user in users}
    every_id = [task_id for ids in task_ids.values() for task_id in ids]

    assert {row['status'] for row in stored(db, every_id)} == {'scheduled'}
    for user in users:
        wait_until(lambda: all_finished(service, user, task_ids[user.name]), timeout=30, message='the batch')
    rows = stored(db, every_id)
    assert {row['attempt'] for row in rows} == {1}
    starts = [row['started_at'].replace(tzinfo=UTC) for row in rows]
    assert min(starts) >= due.replace(microsecond=due.microsecond // 1000 * 1000)
    assert max(starts) - due < datetime.timedelta(seconds=5), max(starts) - due


def test_scheduled_tasks_survive_a_restart_and_redis_emptied_and_a_cancelled_one_never_runs(
        start_service, make_user, db, config, redis_client):
    service = start_service()
    alice = make_user('alice')
    due = now() + datetime.timedelta(seconds=6)
    task_ids = submit(service, alice, {'platforms': ['noop'], 'publish_at': due.isoformat(),
                                       'articles': articles(4)})
    status, _ = http('POST', service.url + CANCEL, {'task_id': task_ids[-1]}, alice.headers)
    assert status == 200

    assert service.stop() == 0
    delete_prefix(redis_client, config.redis_prefix)
    service = start_service()
    done = wait_until(lambda: all_finished(service, alice, task_ids), timeout=40, message='the scheduled tasks')

    assert [task['status'] for task in done] == ['success', 'success', 'success', 'cancelled']
    rows = stored(db, task_ids)
    assert all(row['started_at'].replace(tzinfo=UTC) >= due.replace(microsecond=0) for row in rows[:3])
    for task_id in task_ids[:3]:
        assert [h['outcome'] for h in db.history(task_id)] == ['success']
    assert list(db.history(task_ids[-1])) == [] and rows[-1]['attempt'] == 0
