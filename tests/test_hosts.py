"""Several hosts on one database: each supervisor's row, heartbeat and workers in the figures,
the host of every attempt, one host id per live supervisor, and the remote browser sessions
of dead workers and silent hosts ended for them."""

import dataclasses
import os
import signal
import subprocess
import sys

import pytest
from selenium import webdriver
from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection

import auth
from conftest import ROOT, all_succeeded, batch, create, free_port, http, http_text, wait_until
from hosts import HostIdInUse, HostPresence
from pool import CHROMEDRIVER, CHROMIUM, browser_options


def hosts_by_id(service, admin):
    status, body = http('GET', service.url + '/api/metrics', headers=admin.headers)
    assert status == 200, body
    return {host['host']: host for host in body['hosts']}


def test_every_host_is_in_the_figures_with_its_workers_and_a_stopped_one_is_said_stopped(
        start_service, make_user):
    admin = make_user('root', admin=True)
    web = start_service('--no-workers', TOPN_HOST_ID='web-1')
    workers = start_service('--no-web', TOPN_HOST_ID='worker-1', TOPN_WORKERS=2)

    wait_until(lambda: len(hosts_by_id(web, admin).get('worker-1', {}).get('workers', [])) == 2, timeout=20,
               message='the worker host to report its two workers')
    hosts = hosts_by_id(web, admin)
    assert hosts['web-1']['state'] == 'up' and hosts['web-1']['web'] and hosts['web-1']['workers'] == []
    assert hosts['worker-1']['state'] == 'up' and not hosts['worker-1']['web']
    assert sorted(hosts['worker-1']['workers']) == sorted(f'worker-1:{pid}' for pid in workers.worker_pids())

    workers.stop()
    assert hosts_by_id(web, admin)['worker-1']['state'] == 'stopped'
    text = http_text(web.url + '/metrics', headers=admin.headers)[1]
    assert 'topn_host_up{host="web-1"} 1' in text and 'host="worker-1"' not in text


def test_a_host_whose_heartbeats_stopped_is_shown_silent_in_the_figures_the_page_and_prometheus(
        start_service, make_user, db):
    admin = make_user('root', admin=True)
    web = start_service('--no-workers', TOPN_HOST_ID='web-1')
    workers = start_service('--no-web', TOPN_HOST_ID='worker-1', TOPN_WORKERS=1)
    wait_until(lambda: hosts_by_id(web, admin).get('worker-1', {}).get('workers'), timeout=20,
               message='the worker host to report')

    workers.kill_whole_host()

    wait_until(lambda: hosts_by_id(web, admin)['worker-1']['state'] == 'silent', timeout=20,
               message='the killed host to be seen silent')
    assert hosts_by_id(web, admin)['worker-1']['silent_seconds'] >= 2  # TOPN_LEASE_TTL of the tests
    text = http_text(web.url + '/metrics', headers=admin.headers)[1]
    assert 'topn_host_up{host="worker-1"} 0' in text
    token, _ = auth.open_session(db, admin.id, 600)
    page = http_text(web.url + '/fragments/metrics', headers={'Cookie': f'{auth.SESSION_COOKIE}={token}'})[1]
    assert 'data-host="worker-1" data-state="silent"' in page and '无心跳' in page


def test_every_attempt_names_the_host_and_worker_that_ran_it(start_service, make_user, db):
    service = start_service(TOPN_HOST_ID='alpha', TOPN_WORKERS=2)
    alice = make_user('alice')
    task_ids = create(service, alice, batch(4))
    wait_until(lambda: all_succeeded(service, alice, task_ids), timeout=30, message='the tasks to succeed')

    pids = set(service.worker_pids())
    for task_id in task_ids:
        status, body = http('GET', f'{service.url}/api/publish/tasks/{task_id}', headers=alice.headers)
        attempt, = body['task']['attempts']
        host, _, pid = attempt['worker'].rpartition(':')
        assert attempt['host'] == host == 'alpha' and int(pid) in pids


def test_a_second_supervisor_under_a_live_hosts_id_refuses_to_start_and_changes_nothing(
        start_service, config, db):
    first = start_service('--no-web', TOPN_HOST_ID='twin', TOPN_WORKERS=1)
    wait_until(lambda: db.host('twin') is not None, message='the first supervisor to join')
    before = db.host('twin')

    second = subprocess.run([sys.executable, str(ROOT / 'topn.py'), 'serve', '--no-web'], cwd=ROOT,
                            env={**first.env, 'TOPN_BIND': f'127.0.0.1:{free_port()}'},
                            capture_output=True, text=True, timeout=60)

    assert second.returncode == 1
    assert "the host id 'twin' is in use by a live supervisor on this machine" in second.stderr
    assert f'pid {first.process.pid}' in second.stderr
    assert db.host('twin')['pid'] == before['pid'] == first.process.pid


def test_a_host_restarted_after_a_power_cut_joins_again_at_once_and_finishes_its_tasks(
        start_service, make_user, db):
    alice = make_user('alice')
    first = start_service(TOPN_HOST_ID='phoenix', TOPN_NOOP_DELAY=2, TOPN_WORKERS=1)
    task_ids = create(first, alice, batch(2))
    wait_until(lambda: db.history(task_ids[0]), message='a running task')
    first.kill_whole_host()

    again = start_service(TOPN_HOST_ID='phoenix', TOPN_WORKERS=2)

    wait_until(lambda: all_succeeded(again, alice, task_ids), timeout=30, message='the tasks to succeed')
    assert db.host('phoenix')['pid'] == again.process.pid
    assert [h['outcome'] for h in db.history(task_ids[0])] == ['lost', 'success']


@pytest.fixture
def webdriver_endpoint(tmp_path):
    """A chromedriver serving WebDriver on a port of its own: a remote endpoint that ends
    sessions by DELETE /session/<id> as a Grid does."""
    port = free_port()
    process = subprocess.Popen([CHROMEDRIVER, f'--port={port}', f'--log-path={tmp_path / "chromedriver.log"}'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    wait_until(lambda: _answers(url), message='chromedriver to answer')
    yield url
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _answers(url):
    try:
        http('GET', url + '/status', timeout=1)
        return True
    except OSError:
        return False


def remote_browser(url):
    options = browser_options()
    options.binary_location = CHROMIUM
    return webdriver.Remote(command_executor=ChromiumRemoteConnection(url, vendor_prefix='goog', browser_name='chrome'),
                            options=options)


def test_the_remote_sessions_of_a_silent_host_are_ended_by_a_live_one_and_forgotten(
        config, db, webdriver_endpoint):
    live_config = dataclasses.replace(config, host_id='survivor', webdriver_url=webdriver_endpoint, lease_ttl=2)
    survivor = HostPresence(live_config, db, os.getpid())
    survivor.join(web=False)
    db.join_as_host('goner', 'another machine', 4242, False)
    driver = remote_browser(webdriver_endpoint)
    db.session_started(driver.session_id, 'goner:4242')
    mine = remote_browser(webdriver_endpoint)
    db.session_started(mine.session_id, 'survivor:1')
    try:
        survivor.end_orphan_sessions()
        assert db.sessions_of_host('goner') == [driver.session_id], 'a host heard from lately keeps its sessions'

        with db.transaction() as cur:
            cur.execute("UPDATE hosts SET heartbeat_at = NOW(3) - INTERVAL 10 SECOND WHERE host_id = 'goner'")
        survivor._last_sweep = float('-inf')
        survivor.end_orphan_sessions()

        assert db.sessions_of_host('goner') == []
        with pytest.raises(Exception, match='(?i)session'):
            driver.title
        assert mine.execute_script('return 1') == 1 and db.sessions_of_host('survivor') == [mine.session_id]
    finally:
        mine.quit()


def test_a_dead_workers_remote_sessions_are_ended_by_its_supervisor(config, db, webdriver_endpoint):
    presence = HostPresence(dataclasses.replace(config, host_id='here', webdriver_url=webdriver_endpoint), db, 1)
    driver = remote_browser(webdriver_endpoint)
    db.session_started(driver.session_id, 'here:777')

    presence.end_sessions_of_worker('here:777')

    assert db.sessions_of_worker('here:777') == []
    with pytest.raises(Exception, match='(?i)session'):
        driver.title


def test_a_host_id_held_by_a_live_supervisor_on_another_machine_is_refused(config, db):
    db.join_as_host('shared', 'another machine boot 1234', 99, False)
    presence = HostPresence(dataclasses.replace(config, host_id='shared'), db, os.getpid())

    with pytest.raises(HostIdInUse, match="in use by a live supervisor on another machine boot 1234"):
        presence.join(web=False)


def test_a_host_with_another_secret_key_than_the_others_refuses_to_start(start_service, config, db, tmp_path):
    start_service('--no-web', TOPN_HOST_ID='first', TOPN_SECRET_KEY='the key of the team', TOPN_WORKERS=1)
    wait_until(lambda: db.host('first') is not None, timeout=20, message='the first host to join')

    second = subprocess.run([sys.executable, str(ROOT / 'topn.py'), 'serve', '--no-web'], cwd=ROOT,
                            env={**os.environ, 'TOPN_MYSQL_URL': config.mysql_url, 'TOPN_REDIS_URL': config.redis_url,
                                 'TOPN_REDIS_PREFIX': config.redis_prefix, 'TOPN_HOST_ID': 'second',
                                 'TOPN_STATE_DIR': str(tmp_path / 'second')},
                            capture_output=True, text=True, timeout=60)

    assert second.returncode == 1
    assert 'set TOPN_SECRET_KEY to the same value on every host' in second.stderr


def reapers_of_hosts(config, db, redis_client, count):
    from publishers import load_publishers
    from scheduler import Scheduler
    return [Scheduler(dataclasses.replace(config, host_id=f'host-{i}'), db, redis_client, load_publishers(config))
            for i in range(count)]


def all_at_once(functions):
    """Run the functions in threads released together; their results in order."""
    import threading
    barrier, results = threading.Barrier(len(functions)), [None] * len(functions)

    def run(index):
        barrier.wait()
        results[index] = functions[index]()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_reapers_of_several_hosts_at_once_take_each_dead_hosts_task_back_once(
        config, db, redis_client, scheduler, make_user):
    alice = make_user('alice')
    task_ids = scheduler.submit_batch(alice.id, batch(6))
    for _ in task_ids:
        assert scheduler.claim('dead-host:1') is not None
    with db.transaction() as cur:
        cur.execute("UPDATE publish_tasks SET lease_expires_at = NOW(3) - INTERVAL 1 SECOND")

    reapers = reapers_of_hosts(config, db, redis_client, 3)
    taken_back = all_at_once([reaper.requeue_overdue_attempts for reaper in reapers])

    assert sum(taken_back) == 6
    for task_id in task_ids:
        assert [h['outcome'] for h in db.history(task_id)] == ['lost']
        assert db.task_for_user(alice.id, task_id)['retry_count'] == 1


def test_reapers_of_several_hosts_at_once_queue_each_due_scheduled_task_once(
        config, db, redis_client, scheduler, make_user):
    import datetime
    alice = make_user('alice')
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)).isoformat()
    task_ids = scheduler.submit_batch(alice.id, {**batch(5), 'publish_at': soon})
    with db.transaction() as cur:
        cur.execute("UPDATE publish_tasks SET publish_at = NOW(3) - INTERVAL 1 SECOND")

    reapers = reapers_of_hosts(config, db, redis_client, 3)
    queued = all_at_once([reaper.queue_due_scheduled for reaper in reapers])

    assert sum(queued) == 5
    assert sorted(redis_client.lrange(scheduler.keys.queue(alice.id), 0, -1)) == sorted(task_ids)
