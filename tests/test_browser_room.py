"""A worker slot takes a browser task only when it has a browser for it.

Real Worker objects, real Redis and MariaDB, real headless Chromium under real machine-wide
leases. The platform is a scripted stand-in that needs a browser (so the worker leases one)
and publishes without using it; what is under test is when the slot claims.
"""

import dataclasses

import pytest

from accounts import AccountStore, load_secret_key
from conftest import batch
from pool import DriverPool, kill_until_gone, lease_registry
from publishers.base import Publisher
from worker import Worker


class BrowserPlatform(Publisher):
    name = 'sandbox'
    needs_browser = True
    required_cookies = ()

    def __init__(self):
        self.published = []

    def publish(self, attempt):
        assert attempt.driver is not None
        attempt.mark_submitted()
        self.published.append(attempt.task_id)
        return f'https://platform.test/p/{attempt.task_id}'


@pytest.fixture
def browser_config(config, tmp_path):
    browser_root = str(tmp_path / 'browsers')
    yield dataclasses.replace(config, browser_root=browser_root, state_dir=str(tmp_path / 'state'))
    kill_until_gone(browser_root + '/', 10)


@pytest.fixture
def alice_with_account(make_user, db, browser_config):
    alice = make_user('alice')
    AccountStore(db, load_secret_key(browser_config)).save(alice.id, BrowserPlatform(), {'cookies': 'sbx_session=x'})
    return alice


@pytest.fixture
def make_worker(browser_config):
    workers = []

    def make(leases, platform):
        worker = Worker(browser_config, worker_id=f'room-worker-{len(workers)}', publishers={'sandbox': platform},
                        leases=leases)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close_browsers()


@pytest.fixture
def other_worker_pool(browser_config):
    pools = []

    def make(leases):
        pool = DriverPool(leases, browser_root=browser_config.browser_root, namespace='other-worker')
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def test_slot_without_browser_room_leaves_the_task_queued_until_a_lease_comes_free(
        manager, scheduler, db, alice_with_account, make_worker, other_worker_pool):
    leases = lease_registry(manager, 1, 1)
    other_worker = other_worker_pool(leases)
    other_worker.acquire()
    platform = BrowserPlatform()
    worker = make_worker(leases, platform)
    [task_id] = scheduler.submit_batch(alice_with_account.id, batch(1, platform='sandbox'))

    worker.run_one_step()

    task = db.task_for_user(alice_with_account.id, task_id)
    assert task['status'] == 'pending', 'claimed without a browser to run it'
    assert not db.history(task_id)
    assert platform.published == []

    other_worker.close()
    worker.run_one_step()

    task = db.task_for_user(alice_with_account.id, task_id)
    assert (task['status'], task['retry_count']) == ('success', 0)
    assert [attempt['outcome'] for attempt in db.history(task_id)] == ['success']
    assert platform.published == [task_id]
    assert leases.live() == 1, "the worker's browser stays warm for the next task"


def test_task_whose_browser_room_was_taken_is_given_back_unattempted_at_the_head_of_its_queue(
        manager, scheduler, db, redis_client, alice_with_account, make_worker, other_worker_pool):
    leases = lease_registry(manager, 1, 2)
    platform = BrowserPlatform()
    worker = make_worker(leases, platform)
    first, second = scheduler.submit_batch(alice_with_account.id, batch(2, platform='sandbox'))
    room = worker.driver_pool.reserve()
    assert room is not None and room.browser is None, 'leave to start a browser'
    other_worker_pool(leases).acquire()
    task = scheduler.claim(worker.worker_id)
    assert task['task_id'] == first

    worker.execute(task, room)

    row = db.task_for_user(alice_with_account.id, first)
    assert (row['status'], row['retry_count']) == ('pending', 0)
    assert not db.history(first), 'no attempt is counted'
    assert redis_client.lrange(scheduler.keys.queue(alice_with_account.id), 0, -1) == [first, second]
    assert platform.published == []
    assert leases.working() == 1, "only the other worker's driver works"
