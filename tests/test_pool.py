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
import pool as pool_module
from pool import (CpuSampler, DriverPool, PoolBusy, PoolTimeout, browser_marker, kill_browser_processes,
                  kill_until_gone, lease_registry, visited_origins)

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
        settings.setdefault('cpu_sampler', lambda over=None: 0.0)
        pool = DriverPool(leases, browser_root=browser_root, instance=f'test{len(pools)}', **settings)
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
    leases = lease_registry(manager, 1)
    pool = make_pool(leases, max_drivers=1)
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
    assert leases.in_use() == 1


# -- the machine-wide cap -------------------------------------------------------------------------

def _churn_drivers(leases, browser_root, report):
    """A worker process with 2 slot threads: one acquires, holds and releases a driver twice
    (the second time it gets its own back), the other acquires, holds and discards one. With
    cpus=8 CPU admission never holds a driver back: this is about the cap alone."""
    pool = DriverPool(leases, max_drivers=3, browser_root=browser_root, instance='cap', cpus=8,
                      cpu_sampler=lambda over=None: 0.0)
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
    leases = lease_registry(manager, 3)
    context = multiprocessing.get_context('fork')
    report = context.Queue()
    marker = browser_root + '/cap/'
    seen = {'chromedriver': 0, 'browsers': 0, 'leases': 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            seen['chromedriver'] = max(seen['chromedriver'], len(chromedrivers(marker)))
            seen['browsers'] = max(seen['browsers'], len(driver_folders(marker)))
            seen['leases'] = max(seen['leases'], leases.in_use())

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
    assert leases.in_use() == 0
    assert processes(marker) == {}


def test_acquire_raises_pool_timeout_when_the_cap_is_reached(manager, make_pool):
    leases = lease_registry(manager, 1)
    pool = make_pool(leases, max_drivers=1)
    other_worker = make_pool(leases, max_drivers=1)
    driver = pool.acquire()

    started = time.monotonic()
    with pytest.raises(PoolTimeout, match='browser cap reached'):
        pool.acquire(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    with pytest.raises(PoolTimeout, match='browser cap reached'):
        other_worker.acquire(timeout=0.3)

    pool.release(driver)
    assert pool.acquire(timeout=0.5) is driver
    assert leases.in_use() == 1


def test_leases_are_counted_per_process_and_a_dead_workers_leases_go_back(manager):
    leases = lease_registry(manager, 3)
    assert leases.take(1001, timeout=0) and leases.take(1001, timeout=0) and leases.take(1002, timeout=0)
    assert not leases.take(1003, timeout=0.05)
    copy = pickle.loads(pickle.dumps(leases))
    assert copy.in_use() == 3

    assert copy.release_all_of(1001) == 2
    assert leases.in_use() == 1
    leases.give_back(1002)
    assert leases.in_use() == 0
    with pytest.raises(ValueError):
        leases.give_back(1002)
    assert [leases.take(pid, timeout=0) for pid in (1, 2, 3, 4)] == [True, True, True, False]


# -- idle, dead and orphaned browsers ----------------------------------------------------------------

def test_idle_drivers_are_quit_after_idle_seconds(manager, make_pool):
    leases = lease_registry(manager, 2)
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
    assert leases.in_use() == 0
    assert pool.stats() == {'live': 0, 'leased': 0, 'idle': 0, 'reserved': 0, 'max': 8, 'leases_in_use': 0,
                            'working': 0}


def test_driver_whose_browser_was_killed_is_replaced_on_next_acquire(manager, make_pool):
    leases = lease_registry(manager, 2)
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
    assert leases.in_use() == 1
    assert pool.stats()['live'] == 1


def _start_two_drivers_and_hang(leases, browser_root, report):
    pool = DriverPool(leases, browser_root=browser_root, instance='orphans', cpu_sampler=lambda over=None: 0.0)
    pool.acquire()
    pool.acquire()
    report.put('ready')
    threading.Event().wait()


def test_killed_worker_leaves_no_orphans_once_the_supervisor_cleans_up(manager, browser_root):
    leases = lease_registry(manager, 4)
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
    assert leases.in_use() == 0


def test_closed_pool_leaves_no_processes(manager, make_pool):
    leases = lease_registry(manager, 3)
    pool = make_pool(leases)
    pool.release(pool.acquire())
    pool.acquire()
    pool.acquire()
    assert len(driver_folders(pool.marker)) == 2
    assert pool.stats()['working'] == 2

    pool.close()

    assert processes(pool.marker) == {}
    assert not os.path.exists(pool.marker)
    assert leases.in_use() == 0
    assert leases.working() == 0


# -- CPU admission --------------------------------------------------------------------------------

def test_two_drivers_per_core_always_work_and_more_only_while_the_cpu_has_room_for_them(
        manager, make_pool, monkeypatch):
    monkeypatch.setattr(pool_module, 'START_WINDOW', 0.0)
    leases = lease_registry(manager, 3)
    reading = {'percent': 99.0, 'samples': 0}

    def sampler(over=None):
        reading['samples'] += 1
        return reading['percent']

    pool = make_pool(leases, max_drivers=3, cpus=1, cpu_busy_percent=85, cpu_sampler=sampler)
    first, second = pool.acquire(), pool.acquire()
    assert reading['samples'] == 0, 'up to two drivers per core the CPU is not even looked at'
    with pytest.raises(PoolTimeout, match=r'CPU busy: 99% .*with 2 drivers working.*about 148% > 85%'):
        pool.acquire(timeout=0.3)
    assert leases.in_use() == 2

    waiting = {}
    thread = threading.Thread(target=lambda: waiting.setdefault('driver', pool.acquire(timeout=20)))
    thread.start()
    samples = reading['samples']
    wait_until(lambda: reading['samples'] > samples + 1, timeout=5, message='acquire() to wait on the CPU')
    reading['percent'] = 50.0  # the third would take it to about 75%
    thread.join(20)
    assert waiting['driver'] not in (first, second)
    assert leases.in_use() == 3

    with pytest.raises(PoolTimeout, match='browser cap reached'):
        pool.acquire(timeout=0.3)
    assert pool.stats()['working'] == 3


def test_an_idle_browser_takes_one_more_task_until_the_cpu_is_saturated(manager, make_pool, monkeypatch):
    monkeypatch.setattr(pool_module, 'START_WINDOW', 0.0)
    monkeypatch.setattr(pool_module, 'COUNTS_MAX_AGE', 0.0)
    leases = lease_registry(manager, 3)
    reading = {'percent': 0.0}
    pool = make_pool(leases, max_drivers=3, cpus=1, cpu_busy_percent=85,
                     cpu_sampler=lambda over=None: reading['percent'])
    drivers = [pool.acquire(), pool.acquire(), pool.acquire()]
    for driver in drivers:
        pool.release(driver)

    reading['percent'] = 90.0  # too busy to start a third browser (about 135%), not to use an idle one
    pool.acquire(), pool.acquire()
    third = pool.acquire(timeout=0.3)
    assert third in drivers
    pool.release(third)
    reading['percent'] = 96.0
    with pytest.raises(PoolTimeout, match=r'CPU busy: 96% with 2 drivers working on this machine: saturated'):
        pool.acquire(timeout=0.3)
    assert pool.stats()['idle'] == 1


def test_no_more_than_three_drivers_per_core_work_however_idle_the_cpu(manager, make_pool, monkeypatch):
    monkeypatch.setattr(pool_module, 'START_WINDOW', 0.0)
    leases = lease_registry(manager, 4)
    pool = make_pool(leases, max_drivers=4, cpus=1, cpu_sampler=lambda over=None: 0.0)
    pool.acquire(), pool.acquire(), pool.acquire()

    with pytest.raises(PoolTimeout, match='3 drivers work on this machine, 3 per CPU'):
        pool.acquire(timeout=0.3)
    assert leases.in_use() == 3


def test_an_idle_browser_in_another_worker_is_used_before_a_new_one_starts(manager, make_pool):
    leases = lease_registry(manager, 4)
    worker_a, worker_b = make_pool(leases), make_pool(leases)
    worker_a.release(worker_a.acquire())

    assert worker_b.reserve() is None
    with pytest.raises(PoolTimeout, match='1 browsers are idle in other worker processes'):
        worker_b.acquire(timeout=0.3)
    room = worker_a.reserve()
    assert room is not None and room.browser is not None
    worker_a.cancel(room)
    assert leases.in_use() == 1
    assert leases.working() == 0


def test_browsers_always_admitted_start_at_once_and_one_more_waits_until_the_last_start_shows_in_the_cpu(
        manager, make_pool, monkeypatch):
    monkeypatch.setattr(pool_module, 'START_WINDOW', 30.0)
    leases = lease_registry(manager, 4)
    pool = make_pool(leases, cpus=1)
    pool.acquire(timeout=5), pool.acquire(timeout=5)  # within 30 s: no start waited for the last one

    with pytest.raises(PoolTimeout, match='another browser is starting or just started'):
        pool.acquire(timeout=0.3)
    assert leases.in_use() == 2


def test_a_reserved_idle_browser_is_set_aside_until_used_or_cancelled(manager, make_pool):
    leases = lease_registry(manager, 2)
    pool = make_pool(leases)
    driver = pool.acquire()
    pool.release(driver)

    room = pool.reserve()
    assert room.browser is not None
    assert pool.stats()['idle'] == 0 and pool.stats()['reserved'] == 1
    assert leases.working() == 1, 'a reserved browser counts as working machine-wide'
    assert pool.acquire(room=room) is driver
    pool.cancel(room)  # spent: nothing happens
    assert pool.stats()['leased'] == 1 and pool.stats()['reserved'] == 0
    pool.release(driver)
    assert leases.working() == 0


def test_a_start_room_whose_lease_another_worker_took_raises_pool_busy(manager, make_pool):
    leases = lease_registry(manager, 1)
    pool, other_worker = make_pool(leases), make_pool(leases)
    room = pool.reserve()
    assert room is not None and room.browser is None
    other_worker.acquire()

    with pytest.raises(PoolBusy, match='took the last browser lease'):
        pool.acquire(room=room)
    assert leases.working() == 1
    assert pool.stats()['live'] == 0


def test_cpu_sampler_reads_proc_stat_once_per_window():
    now = [10.0]
    readings = iter([(100, 1000), (150, 1100), (230, 1200)])
    reads = []

    def read():
        reads.append(now[0])
        return next(readings)

    def sleep(seconds):
        now[0] += seconds

    sampler = CpuSampler(window=0.5, read=read, clock=lambda: now[0], sleep=sleep)
    assert sampler() == 50.0
    now[0] += 0.3
    assert sampler() == 50.0
    now[0] += 0.3
    assert sampler() == 80.0
    assert reads == pytest.approx([10.0, 10.5, 11.1])
    assert 0.0 <= CpuSampler(window=0.05)() <= 100.0


# -- a remote chromedriver -------------------------------------------------------------------------

def test_remote_webdriver_url_drivers_hold_leases_and_are_wiped(manager, make_pool, origins):
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    chromedriver = subprocess.Popen(['/usr/bin/chromedriver', f'--port={port}'], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    leases = lease_registry(manager, 1)
    pool = make_pool(leases, webdriver_url=url)
    try:
        wait_until(lambda: answers(url + '/status'), timeout=10, message='the remote chromedriver to answer')
        driver = pool.acquire()
        assert leases.in_use() == 1
        load_user_page(driver, origins[0] + '/user')
        pool.release(driver)
        assert pool.acquire() is driver
        assert state_on(driver, origins[0]) == NOTHING
        pool.discard(driver)
        assert leases.in_use() == 0
    finally:
        pool.close()
        chromedriver.kill()
        chromedriver.wait()
