"""Admission under concurrency and dispatch order, against real MariaDB and Redis."""

import concurrent.futures

from conftest import batch
from errors import LimitReached


def claim_order(scheduler, names_by_id, worker_id='w'):
    order = []
    while (task := scheduler.claim(worker_id)) is not None:
        order.append(names_by_id[task['user_id']])
    return order


def test_twenty_parallel_one_article_requests_admit_at_most_ten(scheduler, make_user, db):
    alice = make_user('alice')

    def submit(i):
        try:
            return scheduler.submit_batch(alice.id, batch(1, prefix=f'parallel {i}'))
        except LimitReached as refusal:
            return refusal.code

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(submit, range(20)))

    accepted = [r for r in results if isinstance(r, list)]
    assert len(accepted) == 10
    assert sorted(r for r in results if isinstance(r, str)) == ['too_many_active'] * 10
    rows, _ = db.task_page(alice.id, limit=100)
    assert len(rows) == 10


def test_parallel_batches_never_pass_the_sliding_rate_window(config, db, redis_client, make_user):
    import dataclasses
    from publishers import load_publishers
    from scheduler import Scheduler
    relaxed = dataclasses.replace(config, user_max_active=1000)
    scheduler = Scheduler(relaxed, db, redis_client, load_publishers(relaxed))
    bob = make_user('bob')

    def submit(i):
        try:
            return len(scheduler.submit_batch(bob.id, batch(3, prefix=f'b{i}')))
        except LimitReached as refusal:
            assert refusal.code == 'rate_limited' and refusal.retry_after >= 1
            return 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        created = sum(pool.map(submit, range(12)))

    assert created == 18  # six batches of 3; a seventh would pass 20 in the window
    assert len(db.task_page(bob.id, limit=100)[0]) == 18


def test_users_are_served_round_robin_in_exact_order(scheduler, make_user):
    a, b, c = make_user('a'), make_user('b'), make_user('c')
    scheduler.submit_batch(a.id, batch(3))
    scheduler.submit_batch(b.id, batch(1))
    scheduler.submit_batch(c.id, batch(2))

    order = claim_order(scheduler, {a.id: 'a', b.id: 'b', c.id: 'c'})

    assert order == ['a', 'b', 'c', 'a', 'c', 'a']


def test_a_users_backlog_delays_a_newcomer_by_at_most_one_turn(scheduler, make_user):
    heavy, light = make_user('heavy'), make_user('light')
    scheduler.submit_batch(heavy.id, batch(10))
    assert scheduler.claim('w')['user_id'] == heavy.id

    scheduler.submit_batch(light.id, batch(1))

    names = {heavy.id: 'heavy', light.id: 'light'}
    assert claim_order(scheduler, names)[:2] == ['heavy', 'light']


def test_vip_user_gets_two_turns_per_round_and_nobody_starves(scheduler, make_user):
    vip, a, b = make_user('vip', vip=True), make_user('a'), make_user('b')
    scheduler.submit_batch(vip.id, batch(6))
    scheduler.submit_batch(a.id, batch(3))
    scheduler.submit_batch(b.id, batch(3))

    order = claim_order(scheduler, {vip.id: 'vip', a.id: 'a', b.id: 'b'})

    assert order == ['vip', 'vip', 'a', 'b', 'vip', 'vip', 'a', 'b', 'vip', 'vip', 'a', 'b']


def test_urgent_tasks_go_ahead_of_their_own_users_queue_only(scheduler, make_user, db):
    a, b = make_user('a'), make_user('b')
    normal_ids = scheduler.submit_batch(a.id, batch(3, prefix='normal'))
    scheduler.submit_batch(b.id, batch(1))
    urgent_ids = scheduler.submit_batch(a.id, batch(2, prefix='urgent', priority='urgent'))

    claimed = []
    while (task := scheduler.claim('w')) is not None:
        claimed.append(task['task_id'])

    a_order = [t for t in claimed if t in normal_ids + urgent_ids]
    assert a_order == urgent_ids + normal_ids
    assert claimed.index(db.task_page(b.id)[0][0]['task_id']) == 1


def test_a_task_queued_twice_in_redis_starts_only_once(scheduler, make_user, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    scheduler.enqueue(alice.id, [task_id])

    first = scheduler.claim('w1')
    second = scheduler.claim('w2')

    assert first['task_id'] == task_id and first['attempt'] == 1
    assert second is None
    assert [h['worker_id'] for h in db.history(task_id)] == ['w1']


def test_retry_promoted_before_its_backoff_ends_is_put_back_to_wait(scheduler, make_user, db, config):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    task = scheduler.claim('w')
    db.end_attempt(task_id, task['attempt'], 'retry', 'failed', error='boom', retry_in=30)
    scheduler.enqueue(alice.id, [task_id])

    assert scheduler.claim('w') is None

    assert redis_delayed_members(scheduler) == [f'{alice.id}:{task_id}']
    assert db.task_for_user(alice.id, task_id)['status'] == 'retry'


def redis_delayed_members(scheduler):
    return scheduler.redis.zrange(scheduler.keys.delayed, 0, -1)
