"""DriverPool against real headless Chromium, with leases shared through a real multiprocessing
Manager and two origins served by in-test HTTP servers on loopback.

Processes are counted from /proc/*/cmdline, independently of pool.py's own scanner.
"""

import http.server
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import answers, free_port, wait_until
from pool import (DriverPool, PoolBusy, PoolTimeout, browser_marker, end_remote_session, kill_browser_processes,
                  kill_until_gone, lease_registry, visited_origins, working_limit)

USER_PAGE = b"""<!doctype html><title>loading</title><script>
document.cookie = 'user_' + location.port + '=A; max-age=3600; path=/';
localStorage.setItem('user', 'A');
sessionStorage.setItem('user', 'A');
var open = indexedDB.open('user_db_' + location.port, 1);
open.onupgradeneeded = function () { open.result.createObjectStore('drafts'); };
open.onsuccess = function () {
  open.result.close();
  caches.open('user_cache').then(function (cache) {
    return cache.put('/cached', new Response('A'));
  }).then(function () { document.title = 'ready'; });
};
</script>"""
BLANK_PAGE = b'<!doctype html><title>blank</title>'

READ_STATE = """
var done = arguments[arguments.length - 1];
Promise.all([indexedDB.databases(), caches.keys()]).then(function (found) {
  done({cookie: document.cookie, local: localStorage.length, session: sessionStorage.length,
        databases: found[0].map(function (d) { return d.name; }), caches: found[1]});
});
"""
NOTHING = {'cookie': '', 'local': 0, 'session': 0, 'databases': [], 'caches': []}


# -- fixtures --------------------------------------------------------------------------------

class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = USER_PAGE if self.path.startswith('/user') else BLANK_PAGE
        self.send_response(200)
        self.send_header('Content-Type', 'text/html')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def origins():
    """Two origins: the same pages on two loopback ports."""
    servers = [http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Pages) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f'http://127.0.0.1:{server.server_port}' for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser_root(tmp_path):
    """Where this test's browsers live; after the test, none of their processes may be left."""
    root = str(tmp_path / 'browsers')
    yield root
    left = processes(root + '/')
    kill_until_gone(root + '/', 10)
    assert not left, f'browser processes left behind: {left}'


@pytest.fixture
def make_pool(browser_root):
    """Pools in this process; each is closed after the test."""
    pools = []

    def make(leases, **settings):
        pool = DriverPool(leases, browser_root=browser_root, namespace=f'test{len(pools)}', **settings)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def processes(marker):
    """{pid: (parent pid, command line)} of the processes whose command line contains `marker`."""
    found = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as cmdline:
                command = cmdline.read().replace(b'\0', b' ').decode(errors='replace')
            with open(f'/proc/{entry}/stat') as stat:
                parent = int(stat.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in command:
            found[int(entry)] = (parent, command)
    return found


def _named(marker, program):
    """Processes running `program`. A process forks before it execs, so for an instant a child
    carries its parent's command line; those copies (parent runs the same program) are left out."""
    found = processes(marker)
    running = {pid for pid, (_, command) in found.items() if command.split()[0].endswith('/' + program)}
    return [pid for pid in running if found[pid][0] not in running]


def chromedrivers(marker):
    return _named(marker, 'chromedriver')


def browsers(marker):
    """The main chromium process of each browser: the one chromedriver started."""
    found = processes(marker)
    drivers = set(chromedrivers(marker))
    return [pid for pid, (parent, command) in found.items()
            if parent in drivers and command.split()[0].endswith('/chromium')]


def crashpad_handlers(marker):
    return _named(marker, 'chrome_crashpad_handler')


def driver_folders(marker):
    """The driver folders ({n}/ under a worker's marker) that some live process still uses."""
    pattern = re.compile(re.escape(marker) + r'((?:w\d+/)?\d+)/')
    return {match.group(1) for _, command in processes(marker).values() for match in pattern.finditer(command)}


def load_user_page(driver, url):
    driver.get(url)
    wait_until(lambda: driver.title == 'ready', timeout=10, message=f'{url} to store its state')


def state_on(driver, origin):
    driver.get(origin + '/blank')
    return driver.execute_async_script(READ_STATE)


# -- wiping ------------------------------------------------------------------------------------

def test_released_driver_is_reused_and_carries_nothing_of_the_previous_user(manager, make_pool, origins):
    leases = lease_registry(manager, 1, 1)
    pool = make_pool(leases)
    driver = pool.acquire()
    session = driver.session_id
    for origin in origins:
        load_user_page(driver, origin + '/user')
    driver.switch_to.new_window('window')
    load_user_page(driver, origins[1] + '/user?in-a-second-window')
    cookies = driver.execute_cdp_cmd('Network.getAllCookies', {})['cookies']
    assert len(cookies) == 2
    assert state_on(driver, origins[1])['local'] == 1
    assert state_on(driver, origins[0])['databases'] == [f'user_db_{origins[0].rsplit(":", 1)[1]}']
    assert visited_origins(driver) == set(origins)
    pool.release(driver)

    again = pool.acquire()

    assert again is driver and again.session_id == session
    assert len(again.window_handles) == 1
    assert again.current_url == 'about:blank'
    assert visited_origins(again) == set(), 'the back/forward history of the previous user is gone'
    assert again.execute_cdp_cmd('Network.getAllCookies', {})['cookies'] == []
    for origin in origins:
        assert state_on(again, origin) == NOTHING, origin
    assert leases.live() == 1


# -- the machine-wide cap -------------------------------------------------------------------------

def _churn_drivers(leases, browser_root, report):
    """A worker process with 2 slot threads: one acquires, holds and releases a driver twice
    (the second time it gets its own back), the other acquires, holds and discards one."""
    pool = DriverPool(leases, browser_root=browser_root, namespace='cap')
    done, errors = [], []

    def slot(rounds, give_back):
        try:
            for _ in range(rounds):
                driver = pool.acquire(timeout=45)
                driver.get('about:blank')
                give_back(driver)
                done.append(1)
        except Exception as error:
            errors.append(f'{type(error).__name__}: {error}')

    slots = [threading.Thread(target=slot, args=(2, pool.release)),
             threading.Thread(target=slot, args=(1, pool.discard))]
    for thread in slots:
        thread.start()
    for thread in slots:
        thread.join()
    pool.close()
    report.put((os.getpid(), len(done), errors))


def test_never_more_than_max_drivers_browsers_on_the_machine(manager, browser_root):
    leases = lease_registry(manager, 3, 3)
    context = multiprocessing.get_context('fork')
    report = context.Queue()
    marker = browser_root + '/cap/'
    seen = {'chromedriver': 0, 'browsers': 0, 'leases': 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            seen['chromedriver'] = max(seen['chromedriver'], len(chromedrivers(marker)))
            seen['browsers'] = max(seen['browsers'], len(driver_folders(marker)))
            seen['leases'] = max(seen['leases'], leases.live())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = [context.Process(target=_churn_drivers, args=(leases, browser_root, report)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [report.get(timeout=55) for _ in workers]
    for worker in workers:
        worker.join(10)
    stop.set()
    sampler.join()

    assert [errors for _, _, errors in results] == [[]] * 4
    assert sum(done for _, done, _ in results) == 4 * 3
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert seen == {'chromedriver': 3, 'browsers': 3, 'leases': 3}
    assert leases.live() == 0
    assert processes(marker) == {}


def test_acquire_raises_pool_timeout_when_the_cap_is_reached(manager, make_pool):
    leases = lease_registry(manager, 1, 1)
    pool = make_pool(leases)
    other_worker = make_pool(leases)
    driver = pool.acquire()

    started = time.monotonic()
    with pytest.raises(PoolTimeout, match='1 browsers work on this machine already'):
        pool.acquire(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    with pytest.raises(PoolTimeout, match='1 browsers work on this machine already'):
        other_worker.acquire(timeout=0.3)

    pool.release(driver)
    assert pool.acquire(timeout=0.5) is driver
    assert leases.live() == 1


def test_leases_are_counted_per_process_and_a_dead_workers_leases_go_back(manager):
    leases = lease_registry(manager, 3, 2)
    take = leases.take_browser
    assert take(1001, timeout=0) and take(1001, timeout=0) and take(1002, timeout=0)
    assert not take(1003, timeout=0.05)
    assert leases.take_permit(1001) and leases.take_permit(1002) and not leases.take_permit(1003)
    copy = pickle.loads(pickle.dumps(leases))
    assert (copy.live(), copy.working()) == (3, 2)

    assert copy.release_all_of(1001) == 2
    assert (leases.live(), leases.working()) == (1, 1)
    leases.give_back_browser(1002)
    leases.give_back_permit(1002)
    assert (leases.live(), leases.working()) == (0, 0)
    with pytest.raises(ValueError):
        leases.give_back_browser(1002)
    assert [take(pid, timeout=0) for pid in (1, 2, 3, 4)] == [True, True, True, False]
    assert [leases.take_permit(pid) for pid in (1, 2, 3)] == [True, True, False]


# -- idle, dead and orphaned browsers ----------------------------------------------------------------

def test_idle_drivers_are_quit_after_idle_seconds(manager, make_pool):
    leases = lease_registry(manager, 2, 2)
    now = [100.0]
    pool = make_pool(leases, idle_seconds=1, clock=lambda: now[0])
    pool.release(pool.acquire())
    assert len(chromedrivers(pool.marker)) == 1
    assert pool.stats()['idle'] == 1

    now[0] += 0.9
    assert pool.quit_idle() == 0
    now[0] += 0.2
    assert pool.quit_idle() == 1

    assert processes(pool.marker) == {}
    assert leases.live() == 0
    assert pool.stats() == {'starting': 0, 'idle': 0, 'working': 0, 'wiping': 0, 'closing': 0, 'live': 0,
                            'leases_in_use': 0, 'working_machine_wide': 0, 'max': 2, 'max_working': 2}


def test_driver_whose_browser_was_killed_is_replaced_on_next_acquire(manager, make_pool):
    leases = lease_registry(manager, 2, 2)
    pool = make_pool(leases)
    driver = pool.acquire()
    pool.release(driver)
    [browser] = browsers(pool.marker)
    os.kill(browser, signal.SIGKILL)
    wait_until(lambda: not browsers(pool.marker), timeout=5, message='the killed browser to exit')

    replacement = pool.acquire()

    assert replacement is not driver
    assert replacement.execute_script('return 1') == 1
    assert len(driver_folders(pool.marker)) == 1, 'processes of the dead browser are left'
    assert len(chromedrivers(pool.marker)) == 1
    assert len(browsers(pool.marker)) == 1
    assert leases.live() == 1
    assert pool.stats()['live'] == 1


def _start_two_drivers_and_hang(leases, browser_root, report):
    pool = DriverPool(leases, browser_root=browser_root, namespace='orphans')
    pool.acquire()
    pool.acquire()
    report.put('ready')
    threading.Event().wait()


def test_killed_worker_leaves_no_orphans_once_the_supervisor_cleans_up(manager, browser_root):
    leases = lease_registry(manager, 4, 4)
    context = multiprocessing.get_context('fork')
    report = context.Queue()
    worker = context.Process(target=_start_two_drivers_and_hang, args=(leases, browser_root, report))
    worker.start()
    assert report.get(timeout=30) == 'ready'
    marker = browser_marker('orphans', worker.pid, browser_root)
    assert len(chromedrivers(marker)) == 2
    assert len(browsers(marker)) == 2
    wait_until(lambda: len(crashpad_handlers(marker)) == 4, timeout=5,
               message='the two crashpad handlers of each browser, found by the marker')

    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    assert len(chromedrivers(marker)) == 2, 'the browsers outlive their worker until someone kills them'
    assert kill_browser_processes(marker) >= 2 + 2 + 4
    wait_until(lambda: not processes(marker), timeout=5, message='every browser process of the dead worker to exit')
    assert leases.release_all_of(worker.pid) == 2
    assert leases.live() == 0


def test_closed_pool_leaves_no_processes(manager, make_pool):
    leases = lease_registry(manager, 3, 3)
    pool = make_pool(leases)
    pool.release(pool.acquire())
    pool.acquire()
    pool.acquire()
    assert len(driver_folders(pool.marker)) == 2
    assert pool.stats()['working'] == 2

    pool.close()

    assert processes(pool.marker) == {}
    assert not os.path.exists(pool.marker)
    assert leases.live() == 0
    assert leases.working() == 0


# -- the rule: how many work, and idle before new ---------------------------------------------

def test_working_limit_is_per_core_never_over_the_cap_and_only_the_cap_for_remote_browsers():
    assert working_limit(8, 3, cores=2) == 6
    assert working_limit(8, 3, cores=4) == 8
    assert working_limit(8, 1, cores=1) == 1
    assert working_limit(8, 3, remote=True, cores=1) == 8


def test_no_more_browsers_work_at_once_than_the_working_limit_and_a_freed_one_is_reused(manager, make_pool):
    leases = lease_registry(manager, 4, 2)
    pool = make_pool(leases)
    first, second = pool.acquire(), pool.acquire()

    with pytest.raises(PoolTimeout, match='2 browsers work on this machine already'):
        pool.acquire(timeout=0.3)
    assert leases.live() == 2
    pool.release(first)
    assert pool.acquire(timeout=5) is first
    assert (leases.live(), leases.working()) == (2, 2)
    assert pool.stats()['working'] == 2


def test_an_idle_browser_in_another_worker_is_used_before_a_new_one_starts(manager, make_pool):
    leases = lease_registry(manager, 4, 4)
    worker_a, worker_b = make_pool(leases), make_pool(leases)
    worker_a.release(worker_a.acquire())

    assert worker_b.reserve() is None
    with pytest.raises(PoolTimeout, match='1 browsers idle in other worker processes'):
        worker_b.acquire(timeout=0.3)
    room = worker_a.reserve()
    assert room is not None and room.browser is not None
    worker_a.cancel(room)
    assert leases.live() == 1
    assert leases.working() == 0


def test_a_reserved_idle_browser_is_set_aside_until_used_or_cancelled(manager, make_pool):
    leases = lease_registry(manager, 2, 2)
    pool = make_pool(leases)
    driver = pool.acquire()
    pool.release(driver)

    room = pool.reserve()
    assert room.browser is not None
    assert pool.stats()['idle'] == 0 and pool.stats()['working'] == 1
    assert leases.working() == 1, 'a reserved browser counts as working machine-wide'
    assert pool.acquire(room=room) is driver
    pool.cancel(room)  # spent: nothing happens
    assert pool.stats()['working'] == 1 and leases.working() == 1
    pool.release(driver)
    assert leases.working() == 0
    other = pool.reserve()
    pool.cancel(other)
    assert pool.stats()['idle'] == 1 and leases.working() == 0


def test_a_start_room_whose_lease_another_worker_took_raises_pool_busy(manager, make_pool):
    leases = lease_registry(manager, 1, 2)
    pool, other_worker = make_pool(leases), make_pool(leases)
    room = pool.reserve()
    assert room is not None and room.browser is None
    other_worker.acquire()

    with pytest.raises(PoolBusy, match='took the last browser lease'):
        pool.acquire(room=room)
    assert leases.working() == 1
    assert pool.stats()['live'] == 0


# -- a remote chromedriver -------------------------------------------------------------------------

def test_remote_webdriver_url_drivers_hold_leases_and_are_wiped(manager, make_pool, origins):
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    chromedriver = subprocess.Popen(['/usr/bin/chromedriver', f'--port={port}'], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    leases = lease_registry(manager, 1, 1)
    pool = make_pool(leases, webdriver_url=url)
    try:
        wait_until(lambda: answers(url + '/status'), timeout=10, message='the remote chromedriver to answer')
        driver = pool.acquire()
        assert leases.live() == 1
        load_user_page(driver, origins[0] + '/user')
        pool.release(driver)
        assert pool.acquire() is driver
        assert state_on(driver, origins[0]) == NOTHING
        pool.discard(driver)
        assert leases.live() == 0
    finally:
        pool.close()
        chromedriver.kill()
        chromedriver.wait()


class RecordedSessions:
    def __init__(self):
        self.live = []

    def started(self, session_id):
        self.live.append(session_id)

    def ended(self, session_id):
        self.live.remove(session_id)


def test_a_remote_room_holds_a_started_browser_and_an_endpoint_that_is_down_holds_nothing(
        manager, make_pool, origins):
    """Before a task is claimed: a remote browser is started (a Grid may queue the request
    while its slots are taken), so a slot never holds a task while it waits for a browser."""
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    leases = lease_registry(manager, 2, 2)
    sessions = RecordedSessions()
    pool = make_pool(leases, webdriver_url=url, sessions=sessions)
    chromedriver = None
    try:
        assert pool.reserve() is None  # nothing answers there yet
        assert (leases.live(), leases.working(), pool.stats()['live']) == (0, 0, 0)

        chromedriver = subprocess.Popen(['/usr/bin/chromedriver', f'--port={port}'], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until(lambda: answers(url + '/status'), timeout=10, message='the remote chromedriver to answer')
        room = wait_until(pool.reserve, timeout=10, message='a room once the endpoint answers')
        assert room.browser is not None and room.browser.driver.session_id in sessions.live
        assert leases.live() == 1 and leases.working() == 1

        pool.cancel(room)  # the claim found no task: the browser idles, warm
        assert pool.stats()['idle'] == 1 and leases.working() == 0
        again = pool.reserve()
        assert again.browser is room.browser
        driver = pool.acquire(room=again)
        load_user_page(driver, origins[0] + '/user')
        pool.release(driver)
        assert state_on(driver, origins[0]) == NOTHING
    finally:
        pool.close()
        if chromedriver:
            chromedriver.kill()
            chromedriver.wait()
    assert sessions.live == [] and leases.live() == 0


def test_an_idle_remote_browser_whose_session_was_ended_is_replaced_before_any_claim(manager, make_pool):
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    chromedriver = subprocess.Popen(['/usr/bin/chromedriver', f'--port={port}'], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    leases = lease_registry(manager, 1, 1)
    sessions = RecordedSessions()
    pool = make_pool(leases, webdriver_url=url, sessions=sessions)
    try:
        wait_until(lambda: answers(url + '/status'), timeout=10, message='the remote chromedriver to answer')
        first = pool.reserve()
        ended = first.browser.driver.session_id
        pool.cancel(first)
        end_remote_session(url, ended)  # as a Grid's session timeout would
        end_remote_session(url, ended)  # a session already gone is no error

        replaced = pool.reserve()

        assert replaced.browser is not first.browser and replaced.browser.driver.session_id != ended
        assert sessions.live == [replaced.browser.driver.session_id] and leases.live() == 1
        pool.cancel(replaced)
    finally:
        pool.close()
        chromedriver.kill()
        chromedriver.wait()
