"""Browser publishing through the whole service: `topn.py serve` with four workers and real
headless Chromium, publishing to the local sandbox platform (never to a real site).
The sandbox's own article listing is the ground truth: who published what, how often."""

import collections
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import SECRET, all_finished, answers, batch, create, free_port, http, tasks, wait_until
from pool import find_browser_processes

@pytest.fixture
def browser_service(start_service, sandbox_platform, tmp_path, config):
    """Start the service publishing to the sandbox; settings as TOPN_* overrides."""
    def start(*args, **env):
        settings = dict(TOPN_SANDBOX_URL=sandbox_platform.url, TOPN_SECRET_KEY=SECRET,
                        TOPN_STATE_DIR=str(tmp_path / 'state'), TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'))
        return start_service(*args, **{**settings, **env})
    return start


def browser_processes(tmp_path):
    return find_browser_processes(str(tmp_path / 'browsers') + '/')


def chromedrivers(tmp_path):
    """Live chromedriver processes. A child that chromedriver has forked but not yet exec'd
    into chromium still shows chromedriver's command line; its parent gives it away."""
    processes = browser_processes(tmp_path)
    drivers = {pid for pid, command in processes.items() if 'chromedriver' in command.split()[0]}
    return [pid for pid in drivers if parent_of(pid) not in drivers]


def parent_of(pid):
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return int(stat.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_three_users_times_ten_articles_land_exactly_once_under_the_right_account(
        browser_service, sandbox_user, sandbox_platform, tmp_path):
    service = browser_service()
    users = [sandbox_user(f'writer{i}') for i in range(3)]
    submitted = {user.name: create(service, user, batch(10, platform='sandbox', prefix=f'{user.name} 文章'))
                 for user in users}

    for user in users:
        found = wait_until(lambda: all_finished(service, user, submitted[user.name]), timeout=240,
                           message=f'the articles of {user.name}')
        assert [t['status'] for t in found] == ['success'] * 10
    published = collections.Counter((a['account'], a['title']) for a in sandbox_platform.articles())
    expected = {(user.name, f'{user.name} 文章 {i}'): 1 for user in users for i in range(10)}
    assert dict(published) == expected
    urls = {t['result_url'] for user in users for t in tasks(service, user, submitted[user.name])}
    assert urls == {a['url'] for a in sandbox_platform.articles()}


def test_never_more_chromedrivers_than_the_cap_and_none_left_after_stop(
        browser_service, sandbox_user, sandbox_platform, tmp_path):
    service = browser_service(TOPN_MAX_DRIVERS=3)
    users = [sandbox_user(f'u{i}') for i in range(2)]
    task_ids = {user.name: create(service, user, batch(6, platform='sandbox', prefix=user.name)) for user in users}
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], len(chromedrivers(tmp_path)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for user in users:
        wait_until(lambda: all_finished(service, user, task_ids[user.name]), timeout=180, message='the batch')
    stop.set()
    sampler.join()

    assert 1 <= peak[0] <= 3
    assert service.stop() == 0
    assert browser_processes(tmp_path) == {}


def test_publishes_through_a_remote_webdriver_url(browser_service, sandbox_user, sandbox_platform, tmp_path):
    """TOPN_WEBDRIVER_URL: the browsers live behind a WebDriver endpoint (here a chromedriver
    on a port), and every DevTools step of the publisher goes through that endpoint."""
    port = free_port()
    chromedriver = subprocess.Popen(['/usr/bin/chromedriver', f'--port={port}'], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: answers(f'http://127.0.0.1:{port}/status'), timeout=10,
                   message='the remote chromedriver to answer')
        service = browser_service(TOPN_WEBDRIVER_URL=f'http://127.0.0.1:{port}', TOPN_WORKERS=1)
        alice = sandbox_user('alice')
        task_ids = create(service, alice, batch(2, platform='sandbox'))

        found = wait_until(lambda: all_finished(service, alice, task_ids), timeout=90, message='the batch')

        assert [t['status'] for t in found] == ['success', 'success'], found
        assert sorted((a['account'], a['title']) for a in sandbox_platform.articles()) == [
            ('alice', 'article 0'), ('alice', 'article 1')]
        assert browser_processes(tmp_path) == {}, 'the workers started browsers of their own'
        assert service.stop() == 0
    finally:
        chromedriver.kill()
        chromedriver.wait()


def test_idle_browsers_are_quit_after_the_idle_timeout(browser_service, sandbox_user, tmp_path):
    service = browser_service(TOPN_DRIVER_IDLE=1)
    alice = sandbox_user('alice')
    task_ids = create(service, alice, batch(2, platform='sandbox'))
    wait_until(lambda: all_finished(service, alice, task_ids), timeout=90, message='the batch')

    wait_until(lambda: not browser_processes(tmp_path), timeout=15, message='idle browsers to be quit')
    assert len(service.worker_pids()) == 4


def test_chromium_killed_mid_task_is_retried_published_once_and_replaced(
        browser_service, sandbox_user, sandbox_platform, tmp_path, db):
    service = browser_service(TOPN_UNKNOWN_OUTCOME_SETTLE=5)
    sandbox_platform.faults(publish_latency_ms=3000)
    alice = sandbox_user('alice')
    [task_id] = create(service, alice, batch(1, platform='sandbox'))
    wait_until(lambda: tasks(service, alice, [task_id])[0]['progress'] >= 85, timeout=60,
               message='the publish click')

    killed = [pid for pid, command in browser_processes(tmp_path).items()
              if command.startswith('/usr/lib/chromium/chromium') and '--type=' not in command]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    sandbox_platform.faults(publish_latency_ms=0)

    [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=90, message='the retry')
    assert killed
    assert task['status'] == 'success'
    assert [a['title'] for a in sandbox_platform.articles()] == ['article 0']
    assert task['result_url'] == sandbox_platform.articles()[0]['url']
    outcomes = [h['outcome'] for h in db.history(task_id)]
    assert outcomes[-1] == 'success' and outcomes.count('success') == 1
    assert not any(pid in browser_processes(tmp_path) for pid in killed)


def test_lost_publish_response_is_recognised_and_not_published_twice(
        browser_service, sandbox_user, sandbox_platform, db):
    service = browser_service()
    sandbox_platform.faults(lost_response_rate=1.0)
    alice = sandbox_user('alice')
    task_ids = create(service, alice, batch(2, platform='sandbox'))

    found = wait_until(lambda: all_finished(service, alice, task_ids), timeout=120, message='the batch')

    assert [t['status'] for t in found] == ['success', 'success']
    assert sorted(a['title'] for a in sandbox_platform.articles()) == ['article 0', 'article 1']


def test_platform_faults_are_retried_then_fail_with_evidence(
        browser_service, sandbox_user, sandbox_platform, db, tmp_path):
    service = browser_service(TOPN_MAX_RETRIES=2)
    sandbox_platform.faults(publish_fail_rate=1.0)
    alice = sandbox_user('alice')
    [task_id] = create(service, alice, batch(1, platform='sandbox'))

    [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=120, message='the last attempt')

    assert task['status'] == 'failed' and task['retry_count'] == 2
    assert [h['outcome'] for h in db.history(task_id)] == ['failed'] * 3
    assert sandbox_platform.articles() == []
    assert [e['attempt'] for e in task['evidence']] == [1, 2, 3]
    [screenshot] = [f for f in task['evidence'][-1]['files'] if f.endswith('screenshot.png')]
    request = urllib.request.Request(service.url + screenshot, headers=alice.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read(8) == b'\x89PNG\r\n\x1a\n'


def test_evidence_answers_its_owner_only(browser_service, sandbox_user, sandbox_platform, make_user):
    service = browser_service(TOPN_MAX_RETRIES=0)
    sandbox_platform.faults(too_frequent=True)
    alice, mallory = sandbox_user('alice'), make_user('mallory')
    [task_id] = create(service, alice, batch(1, platform='sandbox'))
    [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=90, message='the attempt')
    [url] = [f for f in task['evidence'][0]['files'] if f.endswith('url.txt')]

    assert http('GET', service.url + url, headers=mallory.headers)[0] == 404
    owner = urllib.request.Request(service.url + url, headers=alice.headers)
    with urllib.request.urlopen(owner, timeout=10) as response:
        assert response.read().decode().startswith(sandbox_platform.url)
    assert 'too often' in task['error_message']


def test_expired_login_fails_fast_without_spending_retries(browser_service, sandbox_user, sandbox_platform, db):
    service = browser_service()
    alice = sandbox_user('alice')
    sandbox_platform.faults(expire_sessions=True)
    started = time.monotonic()
    [task_id] = create(service, alice, batch(1, platform='sandbox'))

    [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=60, message='the attempt')

    assert task['status'] == 'failed' and task['retry_count'] == 0
    assert '登录已失效' in task['error_message']
    assert len(db.history(task_id)) == 1
    assert time.monotonic() - started < 30
    assert sandbox_platform.articles() == []


def test_pacing_spaces_publishes_on_one_account_across_workers(browser_service, sandbox_user, sandbox_platform, db):
    """Three tasks are claimed by different workers at once; unpaced they would publish
    within a second or so of each other."""
    service = browser_service(TOPN_PACING_SANDBOX=5)
    alice = sandbox_user('alice')
    task_ids = create(service, alice, batch(3, platform='sandbox'))

    found = wait_until(lambda: all_finished(service, alice, task_ids), timeout=120, message='the paced batch')

    assert [t['status'] for t in found] == ['success'] * 3
    created = sorted(a['created_at'] for a in sandbox_platform.articles())
    gaps = [(_seconds(b) - _seconds(a)) for a, b in zip(created, created[1:])]
    assert all(gap >= 4.8 for gap in gaps), gaps
    assert all(len(db.history(task_id)) == 1 for task_id in task_ids)


def _seconds(iso):
    import datetime
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_evidence_a_worker_host_saved_is_served_by_a_web_host_of_its_own(
        browser_service, sandbox_user, sandbox_platform, tmp_path):
    web = browser_service('--no-workers', TOPN_HOST_ID='web', TOPN_STATE_DIR=str(tmp_path / 'web-state'))
    browser_service('--no-web', TOPN_HOST_ID='worker', TOPN_STATE_DIR=str(tmp_path / 'worker-state'),
                    TOPN_MAX_RETRIES=0, TOPN_WORKERS=1)
    sandbox_platform.faults(too_frequent=True)
    alice = sandbox_user('alice')
    [task_id] = create(web, alice, batch(1, platform='sandbox'))

    [task] = wait_until(lambda: all_finished(web, alice, [task_id]), timeout=90, message='the attempt')

    files = {name.rpartition('/')[2]: name for name in task['evidence'][0]['files']}
    assert {'url.txt', 'page.html', 'screenshot.png'} <= set(files)
    with urllib.request.urlopen(urllib.request.Request(web.url + files['screenshot.png'], headers=alice.headers),
                                timeout=10) as response:
        assert response.headers['Content-Type'] == 'image/png' and response.read(8) == b'\x89PNG\r\n\x1a\n'
    with urllib.request.urlopen(urllib.request.Request(web.url + files['page.html'], headers=alice.headers),
                                timeout=10) as response:
        assert response.headers['Content-Security-Policy'] == 'sandbox'
        assert b'</html>' in response.read()
