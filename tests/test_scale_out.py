"""Drills for several hosts on one Selenium Grid, against a real Grid 4 (the npm jar on
Debian's Java, browsing with Debian's chromium), real MariaDB and Redis, and the sandbox
platform. Two worker hosts are two supervisors with their own TOPN_HOST_ID on this machine.
The sandbox's own listing of what was published is the ground truth of "exactly once"."""

import collections
import threading
import time

import pytest

from conftest import SECRET, all_finished, batch, create, exactly_one_success_each, tasks, wait_until
from grid_site import remote_browser

SLOTS = 4


@pytest.fixture
def sandbox(sandbox_platform):
    return sandbox_platform


@pytest.fixture
def writers(sandbox_user):
    """`count` TOP_N users whose sandbox logins are stored."""
    return lambda count: [sandbox_user(f'writer{i}') for i in range(count)]


@pytest.fixture
def own_grid(start_grid):
    """A Grid of this test's own, stopped when the test ends (a JVM and its browsers weigh)."""
    grids = []

    def start(**settings):
        grids.append(start_grid(**settings))
        return grids[-1]
    yield start
    for running in grids:
        running.stop()


@pytest.fixture
def grid_host(start_service, sandbox, tmp_path):
    """A TOP_N host whose browsers live on `grid`; the first one started serves the web app."""
    def start(grid, host_id, *args, **env):
        settings = dict(TOPN_HOST_ID=host_id, TOPN_WEBDRIVER_URL=grid.url, TOPN_SANDBOX_URL=sandbox.url,
                        TOPN_SECRET_KEY=SECRET, TOPN_STATE_DIR=str(tmp_path / 'state'),
                        TOPN_BROWSER_ROOT=str(tmp_path / host_id), TOPN_WORKERS=2, TOPN_WORKER_SLOTS=1,
                        TOPN_MAX_DRIVERS=2, TOPN_DRIVER_ACQUIRE_TIMEOUT=60,
                        TOPN_GRID_SESSION_TIMEOUT=grid.session_timeout)
        settings.update(env)
        return start_service(*args, **settings)
    return start


def submit_batches(web, users, per_user):
    return {user.name: create(web, user, batch(per_user, platform='sandbox', prefix=f'{user.name} 文章'))
            for user in users}


def wait_for_all(web, users, submitted, timeout):
    finished = {}
    for user in users:
        finished[user.name] = wait_until(lambda: all_finished(web, user, submitted[user.name]), timeout=timeout,
                                         message=f'the articles of {user.name}')
    return finished


def assert_published_once_each(sandbox, users, per_user, finished):
    for user in users:
        assert [task['status'] for task in finished[user.name]] == ['success'] * per_user, finished[user.name]
    published = collections.Counter((article['account'], article['title']) for article in sandbox.articles())
    assert dict(published) == {(user.name, f'{user.name} 文章 {i}'): 1 for user in users for i in range(per_user)}


def hosts_of_successes(db, task_ids):
    return {attempt['host'] for task_id in task_ids for attempt in db.history(task_id)
            if attempt['outcome'] == 'success'}


def running_on(db, host_id):
    with db.transaction() as cur:
        cur.execute("SELECT task_id FROM publish_history WHERE host_id = %s AND outcome = 'running'", (host_id,))
        return [row['task_id'] for row in cur.fetchall()]


def test_three_users_over_a_four_slot_grid_with_two_worker_hosts_publish_once_each_and_both_hosts_work(
        grid, grid_host, writers, sandbox, db):
    sandbox.faults(publish_latency_ms=300)
    users = writers(3)
    alpha = grid_host(grid, 'alpha')
    beta = grid_host(grid, 'beta', '--no-web')

    submitted = submit_batches(alpha, users, 10)
    peak = PeakWatcher(grid)
    finished = wait_for_all(alpha, users, submitted, timeout=240)
    peak.stop()

    assert_published_once_each(sandbox, users, 10, finished)
    every_task = [task_id for ids in submitted.values() for task_id in ids]
    exactly_one_success_each(db, every_task)
    assert hosts_of_successes(db, every_task) == {'alpha', 'beta'}
    assert 1 <= peak.most <= SLOTS
    assert beta.stop() == 0 and alpha.stop() == 0
    wait_until(lambda: grid.live_sessions() == [], timeout=15, message='every session quit on stop')


def test_a_worker_host_killed_whole_mid_run_loses_nothing_and_its_grid_slots_come_back(
        grid, grid_host, writers, sandbox, db):
    sandbox.faults(publish_latency_ms=1500)
    users = writers(2)
    alpha = grid_host(grid, 'alpha')
    beta = grid_host(grid, 'beta', '--no-web')
    submitted = submit_batches(alpha, users, 6)
    victims = wait_until(lambda: running_on(db, 'beta'), timeout=60, message='beta to be publishing')
    beta_sessions = wait_until(lambda: db.sessions_of_host('beta'), message="beta's sessions on the Grid")

    beta.kill_whole_host()

    finished = wait_for_all(alpha, users, submitted, timeout=240)
    assert_published_once_each(sandbox, users, 6, finished)
    every_task = [task_id for ids in submitted.values() for task_id in ids]
    exactly_one_success_each(db, every_task)
    for task_id in victims:
        attempts = db.history(task_id)
        assert attempts[0]['host'] == 'beta' and attempts[0]['outcome'] == 'lost', attempts
        assert [a['host'] for a in attempts if a['outcome'] == 'success'] == ['alpha'], attempts
    wait_until(lambda: not set(beta_sessions) & set(grid.live_sessions()), timeout=30,
               message="beta's Grid sessions to be ended by alpha")
    assert db.sessions_of_host('beta') == []

    sandbox.faults(publish_latency_ms=0)
    later = create(alpha, users[0], batch(4, platform='sandbox', prefix='later'))
    done = wait_until(lambda: all_finished(alpha, users[0], later), timeout=120, message='a later batch')
    assert [task['status'] for task in done] == ['success'] * 4


def test_the_grids_node_killed_mid_run_then_started_again_retries_and_publishes_once_each(
        own_grid, grid_host, writers, sandbox, db):
    grid = own_grid(slots=SLOTS, mode='hub_and_node')
    sandbox.faults(publish_latency_ms=1500)
    users = writers(2)
    alpha = grid_host(grid, 'alpha', TOPN_MAX_DRIVERS=4, TOPN_WORKERS=4)
    submitted = submit_batches(alpha, users, 5)
    wait_until(lambda: len(running_on(db, 'alpha')) >= 2, timeout=60, message='tasks being published')

    grid.kill_node()
    time.sleep(3)
    grid.start_node()

    finished = wait_for_all(alpha, users, submitted, timeout=300)
    assert_published_once_each(sandbox, users, 5, finished)
    every_task = [task_id for ids in submitted.values() for task_id in ids]
    exactly_one_success_each(db, every_task)
    retried = [task_id for task_id in every_task if len(db.history(task_id)) > 1]
    assert retried, 'the tasks running when the node died were retried'


def test_with_the_grid_full_tasks_wait_in_the_queue_and_none_fails_for_lack_of_a_slot(
        own_grid, grid_host, writers, sandbox, db):
    grid = own_grid(slots=2, request_timeout=5)
    users = writers(1)
    holders = [remote_browser(grid.url) for _ in range(2)]  # someone else has every slot
    try:
        alpha = grid_host(grid, 'alpha', TOPN_TASK_TIMEOUT=8)
        [task_ids] = submit_batches(alpha, users, 3).values()
        time.sleep(12)  # longer than TOPN_TASK_TIMEOUT and two session-request timeouts
        statuses = {task['status'] for task in tasks(alpha, users[0], task_ids)}
        assert statuses == {'pending'}
        assert not any(db.history(task_id) for task_id in task_ids)
    finally:
        for holder in holders:
            holder.quit()

    finished = wait_until(lambda: all_finished(alpha, users[0], task_ids), timeout=120, message='the batch')
    assert [task['status'] for task in finished] == ['success'] * 3
    assert all(len(db.history(task_id)) == 1 for task_id in task_ids)


class PeakWatcher:
    """The most sessions the Grid held at once while watched."""

    def __init__(self, grid):
        self.grid, self.most, self._stop = grid, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.2):
            self.most = max(self.most, len(self.grid.live_sessions()))

    def stop(self):
        self._stop.set()
        self._thread.join()
