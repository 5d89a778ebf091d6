"""Headless Chromium for the workers: a pool of warm browsers per worker process, under one
machine-wide cap.

Every live browser holds exactly one lease from `SharedLeases`, a semaphore the supervisor
creates with `lease_registry()` before it forks the workers. The lease is taken before the
browser starts and given back only once the browser has quit and its processes are gone, so
at most `max_drivers` browsers exist on the machine whatever the workers do, and the
supervisor can return the leases of a worker that was SIGKILLed (`release_all_of`).

Each worker process owns one `DriverPool`, shared by its slot threads. A slot `reserve()`s
room before it claims a task (an idle browser set aside, or leave to start one; the rules
for starting and for CPU admission are in `_refuse_start` and `_cpu_refusal`), then
`acquire()`s its driver with that room, publishes, and `release()`s it (its cookies, storage
and extra windows are wiped and it goes back to idle) or `discard()`s it after a failure
mid-task. A driver serves one task at a time.

Finding a worker's browser processes. Chromium's children re-parent to init (zygotes linger
~2 s after `quit()`, crashpad handlers always), so walking the process tree from the worker
misses them. Instead every process a driver starts carries a path in its command line:
    {browser_root}/{instance}/w{worker_pid}/{n}/
chromedriver through `--log-path`, chromium, its zygotes, renderers and utilities through
`--user-data-dir`, and the two crashpad handlers through `--database`, which Chromium takes
from the BREAKPAD_DUMP_LOCATION environment variable (without it they point at
~/.config/chromium and carry no marker). Scanning /proc/*/cmdline for the path finds them
all, even after the worker itself died: `kill_browser_processes(browser_marker(...))`.
"""

import collections
import itertools
import logging
import multiprocessing.util
import os
import shutil
import signal
import threading
import time
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection

log = logging.getLogger('topn.pool')

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
DEFAULT_BROWSER_ROOT = '/tmp/topn-browsers'

# Measured in research/browsers.md: the lean set saves ~70 MB per browser (331 vs 402 MB for
# one, 1063 vs 1513 MB for eight), most of it by not preloading the omnibox popup renderer.
# With --disable-gpu the GPU process only composites in software; --in-process-gpu makes it a
# thread of the browser process, one process and one IPC hop less per frame (bench/browser.py,
# six pairs run alternately: median 0.95x the wall time and 0.96x the CPU per task).
BASE_FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
              '--disable-background-networking', '--disable-component-update', '--disable-sync',
              '--no-first-run')
LEAN_FLAGS = ('--in-process-gpu', '--renderer-process-limit=1', '--disable-software-rasterizer',
              '--disable-site-isolation-trials',
              '--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup,SpareRendererForSitePerProcess,'
              'IsolateOrigins,site-per-process')
WINDOW_SIZE = '--window-size=1280,900'

HEALTH_TIMEOUT = 3.0
QUIT_TIMEOUT = 5.0
WIPE_TIMEOUT = 15.0
PROCESS_EXIT_TIMEOUT = 5.0
LEASE_POLL = 0.25
ROOM_POLL = 0.25
COUNTS_MAX_AGE = 0.05
# A new browser is judged on the CPU over START_WINDOW seconds since the last start ended,
# not on one short reading: working browsers leave brief gaps (all waiting on the platform
# at once) that one more would not fill.
START_WINDOW = 2.0
# CPU admission (DriverPool._cpu_refusal): two working browsers per CPU always, never more
# than three, whatever the CPU reads; in between, an idle browser takes a task while the CPU
# is not saturated.
ALWAYS_WORKING_PER_CPU = 2
MOST_WORKING_PER_CPU = 3
SATURATED_PERCENT = 95

_driver_numbers = itertools.count()


class PoolTimeout(Exception):
    """acquire() found no driver it was allowed to hand out before its timeout."""


class PoolBusy(Exception):
    """The room reserve() found was gone when the browser was to start (another worker took
    the last lease or started a browser meanwhile). Give the task back and wait for room."""


class PoolClosed(Exception):
    """The pool was closed; it hands out no more drivers."""


class WipeFailed(Exception):
    """A browser still carried state after wipe_browser_state(); it must not serve anyone else."""


# -- machine-wide leases ---------------------------------------------------------------

def lease_registry(manager, max_drivers):
    """The supervisor's one registry of browser leases, built from a started
    `multiprocessing.Manager()` before the workers are forked."""
    return SharedLeases(manager.BoundedSemaphore(max_drivers), manager.dict(), manager.dict(), manager.dict(),
                        manager.Value('d', 0.0), max_drivers)


class SharedLeases:
    """Manager proxies shared by every pool on the machine: a semaphore of `max_drivers`
    leases, {pid: leases held} so the supervisor can return a dead worker's leases, and
    {pid: drivers handed out}, {pid: browsers starting} and when the last start ended
    (time.monotonic(), one clock for every process on the machine) for admission.

    A worker only writes its own pid's entries. The semaphore is taken before the count goes
    up and the count goes down before the semaphore is given back, so a worker killed between
    the two steps can leak a lease (the cap shrinks by one) but never lets the cap be exceeded.
    """

    def __init__(self, semaphore, held, working, starting, last_start, max_drivers):
        self.max_drivers = max_drivers
        self._semaphore = semaphore
        self._held = held
        self._working = working
        self._starting = starting
        self._last_start = last_start
        self._new_lock()

    def _new_lock(self):
        """A lock per process: a forked child must not inherit one held by a parent's thread."""
        self._lock = threading.Lock()
        multiprocessing.util.register_after_fork(self, SharedLeases._reset_lock)

    def _reset_lock(self):
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state['_lock']
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._new_lock()

    def take(self, pid, timeout):
        """Take one lease for process `pid`, waiting up to `timeout` seconds. True when taken."""
        if not self._semaphore.acquire(True, max(0.0, timeout)):
            return False
        with self._lock:
            self._held[pid] = self._held.get(pid, 0) + 1
        return True

    def give_back(self, pid):
        with self._lock:
            count = self._held.get(pid, 0)
            if count <= 0:
                raise ValueError(f'process {pid} holds no browser lease to give back')
            if count == 1:
                del self._held[pid]
            else:
                self._held[pid] = count - 1
        self._semaphore.release()

    def release_all_of(self, pid):
        """Give back every lease a dead worker held; returns how many. Kill its browsers first
        (`kill_browser_processes(browser_marker(instance, pid))`): a lease stands for a browser."""
        with self._lock:
            count = self._held.pop(pid, 0)
            self._working.pop(pid, None)
            self._starting.pop(pid, None)
        for _ in range(count):
            self._semaphore.release()
        return count

    def in_use(self):
        """Leases held machine-wide, i.e. live browsers."""
        return sum(self._held.values())

    def begin_work(self, pid):
        """Count one more driver handed out (or set aside for a task) by `pid`."""
        self._count(self._working, pid, +1)

    def end_work(self, pid):
        self._count(self._working, pid, -1)

    def working(self):
        """Drivers handed out machine-wide (busy with a task, not idle in a pool)."""
        return sum(self._working.values())

    def begin_start(self, pid):
        """Count one more browser starting in `pid`."""
        self._count(self._starting, pid, +1)

    def end_start(self, pid, started=True):
        self._count(self._starting, pid, -1)
        if started:
            self._last_start.value = time.monotonic()

    def starting(self):
        return sum(self._starting.values())

    def seconds_since_last_start(self):
        return time.monotonic() - self._last_start.value

    def _count(self, counts, pid, step):
        with self._lock:
            count = counts.get(pid, 0) + step
            if count <= 0:
                counts.pop(pid, None)
            else:
                counts[pid] = count


# -- CPU ---------------------------------------------------------------------------------

def read_cpu_times(path='/proc/stat'):
    """(busy, total) jiffies of all CPUs together since boot."""
    with open(path) as stat:
        values = [int(value) for value in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuSampler:
    """Machine-wide CPU busy percent from /proc/stat, over the last `window` seconds or, when
    asked, over a longer span (`over`): the busy share between the newest reading and the
    newest one at least that much older.

    One reading serves every caller for `window` seconds, and the readings of the last
    `HISTORY` windows are kept for the longer spans. When the newest reading is too old to
    describe the present, the sampler starts over and waits one window for a fresh one;
    callers only ask when the machine already runs as many drivers as it has CPUs.
    """

    HISTORY = 20

    def __init__(self, window=0.5, read=read_cpu_times, clock=time.monotonic, sleep=time.sleep):
        self.window = window
        self._read, self._clock, self._sleep = read, clock, sleep
        self._lock = threading.Lock()
        self._readings = collections.deque(maxlen=self.HISTORY)

    def __call__(self, over=None):
        with self._lock:
            self._refresh()
            newest_at, (busy, total) = self._readings[-1]
            span = max(over or 0.0, self.window)
            base_at, (busy_before, total_before) = self._readings[0]
            for reading_at, reading in reversed(self._readings):
                if newest_at - reading_at >= span:
                    busy_before, total_before = reading
                    break
            elapsed_total = total - total_before
            return 100.0 * (busy - busy_before) / elapsed_total if elapsed_total > 0 else 0.0

    def _refresh(self):
        now = self._clock()
        if not self._readings or now - self._readings[-1][0] > 4 * self.window:
            self._readings.clear()
            self._readings.append((now, self._read()))
            self._sleep(self.window)
            self._readings.append((self._clock(), self._read()))
        elif now - self._readings[-1][0] >= self.window:
            self._readings.append((now, self._read()))


# -- the pool ------------------------------------------------------------------------------

class Room:
    """What `DriverPool.reserve()` set aside for one browser task: an idle browser of the
    pool (`browser`), or leave to start one (`browser` is None). Used once, by acquire() or
    cancel()."""
    __slots__ = ('browser', 'spent')

    def __init__(self, browser):
        self.browser = browser
        self.spent = False


class _Browser:
    __slots__ = ('driver', 'folder', 'idle_since')

    def __init__(self, driver, folder):
        self.driver = driver
        self.folder = folder
        self.idle_since = None


class DriverPool:
    """The browsers of one worker process, shared by its slot threads.

    Create it after the fork, in the process that uses it. A worker slot first asks for room
    (`reserve()`: an idle browser set aside, or leave to start one under a machine-wide lease),
    then claims a task, then `acquire(room=...)`s its driver; `acquire()` without a room waits
    for one. Every driver goes back through `release()` (wiped, then idle) or `discard()`
    (quit). Drivers idle for longer than `idle_seconds` are quit by `quit_idle()`, which the
    worker calls now and then and which acquire() and release() call on the way.

    `cpu_sampler` returns the machine's CPU busy percent (default: `CpuSampler()`), `cpus`
    the number of CPUs (default: os.cpu_count()), which the CPU admission scales with; both
    are here for tests.
    """

    def __init__(self, leases, *, max_drivers=8, idle_seconds=300, webdriver_url=None,
                 browser_root=DEFAULT_BROWSER_ROOT, instance='topn', cpu_busy_percent=85,
                 clock=time.monotonic, cpu_sampler=None, cpus=None):
        self.max_drivers = max_drivers
        self.idle_seconds = idle_seconds
        self.cpu_busy_percent = cpu_busy_percent
        self.webdriver_url = webdriver_url
        self.pid = os.getpid()
        self.marker = browser_marker(instance, self.pid, browser_root)
        self._leases = leases
        self._clock = clock
        self._cpu_sampler = cpu_sampler or CpuSampler()
        cpus = cpus or os.cpu_count() or 1
        self._always_admitted = ALWAYS_WORKING_PER_CPU * cpus
        self._most_working = MOST_WORKING_PER_CPU * cpus
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._counts_lock = threading.Lock()
        self._counts = (0, 0)
        self._counts_at = None
        self._browsers = {}
        self._idle = []
        self._reserved = set()
        self._handed_out = set()
        self._starting = 0
        self._start_rooms = 0
        self._closed = False

    # -- handing drivers out -----------------------------------------------------------

    def reserve(self):
        """Room for one browser task right now, set aside for the caller, or None.

        A worker slot asks before it claims a task, so that a task is taken only by a slot
        that can run it at once (a task claimed and then kept waiting for a browser would be
        better off in another worker). The room is an idle browser of this pool, or leave to
        start one (see `_refuse_start`). Hand it to `acquire(room=...)` or back to `cancel()`.
        When None, `wait_for_room()` and ask again.
        """
        room, _ = self._try_reserve()
        return room

    def _try_reserve(self):
        """(room, None) or (None, why not)."""
        self._check_usable()
        with self._lock:
            browser = self._idle.pop() if self._idle else None
            if browser is not None:
                self._reserved.add(browser)
        if browser is not None:
            refusal = self._refuse_work()
            if refusal is None:
                self._leases.begin_work(self.pid)
                return Room(browser), None
            self._back_to_idle(browser, since=browser.idle_since, wake=False)
            return None, refusal
        with self._lock:
            local = len(self._browsers) + self._starting + self._start_rooms
            if local >= self.max_drivers:
                return None, (f'browser cap reached: this process has {local} browsers live or starting '
                              f'(at most {self.max_drivers})')
            self._start_rooms += 1
        refusal = self._refuse_start()
        if refusal is None:
            return Room(None), None
        with self._lock:
            self._start_rooms -= 1
        return None, refusal

    def _refuse_work(self):
        """Why a browser may not take one more task now, or None (see `_cpu_refusal`)."""
        return self._cpu_refusal(self._machine_counts()[1])

    def _machine_counts(self):
        """(leases in use, drivers working) machine-wide, at most COUNTS_MAX_AGE old. Every
        slot asks before every claim, tasks without a browser included, and each count is a
        round trip to the one manager process; a start re-reads them fresh (`_start_for_room`)."""
        with self._counts_lock:
            now = self._clock()
            if self._counts_at is None or now - self._counts_at > COUNTS_MAX_AGE:
                self._counts = (self._leases.in_use(), self._leases.working())
                self._counts_at = now
            return self._counts

    def _refuse_start(self):
        """Why a new browser may not start now, or None. A start costs ~0.5 CPU-second (0.43
        measured alone, plus a slower first task) and ~130 MB, so a browser starts only when
        no warm one could do the work instead: the machine is under the cap and no browser
        idles in another worker (that worker takes the task). Up to the drivers always
        admitted (`_cpu_refusal`), browsers start at once, side by side: a batch gets going
        without waiting on one start after another. Beyond that the CPU decides, so no other
        browser may be starting or have just started (its CPU must show first), and the CPU
        over the last START_WINDOW seconds must have room for one more working driver."""
        leases = self._leases
        in_use, working = self._machine_counts()
        if in_use >= leases.max_drivers:
            return (f'browser cap reached: {in_use} of the {leases.max_drivers} browser leases on this machine '
                    f'are held')
        if in_use > working:
            return f'{in_use - working} browsers are idle in other worker processes; they take the work first'
        if working >= self._always_admitted and (leases.starting() or
                                                 leases.seconds_since_last_start() < START_WINDOW):
            return 'another browser is starting or just started on this machine; its CPU shows before one more starts'
        return self._cpu_refusal(working, over=START_WINDOW)

    def _cpu_refusal(self, working, over=None):
        """Why the CPU cannot take one more working driver beside `working`, or None; `over`
        is given for a start (see below).

        The cap is a ceiling, not a target. Measured on 2 cores (bench/ceiling.py, the sandbox
        work with its 500 ms platform wait), 4 working browsers leave the CPU a third idle
        while tasks wait on the platform, 6 do the most work, and 8 do no more than 6 but
        take the service over 1.5 GB of memory; CPU-bound work goes fastest with about two per
        core (browsers.md). So two per core always work, never more than three per core, and
        in between:
        - an idle browser takes one more task while the CPU reads under SATURATED_PERCENT
          over the last 0.5 s: a task tops up CPU that would idle, and CPU-bound work, which
          saturates the CPU, stays at two per core;
        - a new browser starts only while the CPU, over the last `over` seconds, would stay at
          most `cpu_busy_percent` busy with one more working browser (busy x (n + 1) / n). A
          start costs ~0.5 CPU-second and ~130 MB and lasts, so it waits for room for a whole
          browser.
        """
        if working < self._always_admitted:
            return None
        if working >= self._most_working:
            return (f'{working} drivers work on this machine, {MOST_WORKING_PER_CPU} per CPU: more would finish '
                    f'later, not sooner')
        busy = self._cpu_sampler(over)
        if over is None:
            if busy < SATURATED_PERCENT:
                return None
            return f'CPU busy: {busy:.0f}% with {working} drivers working on this machine: saturated'
        expected = busy * (working + 1) / working
        if expected <= self.cpu_busy_percent:
            return None
        return (f'CPU busy: {busy:.0f}% over the last {over:g} s with {working} drivers working on this machine; '
                f'one more would take it to about {expected:.0f}% > {self.cpu_busy_percent}%')

    def cancel(self, room):
        """Give back a room that was not used (the claim found no task, or one that needs no
        browser). Does nothing for a room already used or cancelled."""
        if room is None or room.spent:
            return
        room.spent = True
        if room.browser is None:
            with self._room:
                self._start_rooms -= 1
                self._room.notify_all()
            return
        with self._lock:
            still_reserved = room.browser in self._reserved
        if still_reserved:
            self._back_to_idle(room.browser, since=room.browser.idle_since)
            self._leases.end_work(self.pid)

    def wait_for_room(self, timeout):
        """Sleep until a browser of this pool comes back or goes, or `timeout` seconds pass."""
        with self._room:
            self._room.wait(timeout)

    def acquire(self, timeout=30, room=None):
        """A driver for one task, from `room` (see `reserve`) or, without one, from the first
        room that comes free within `timeout` seconds; PoolTimeout after that, saying why
        (the cap, the CPU). With a room, PoolBusy when another worker took the last lease or
        the start's turn meanwhile: give the task back and wait for room."""
        self._check_usable()
        if room is not None:
            return self._take(room)
        deadline = self._clock() + timeout
        while True:
            room = self._wait_for_reservation(timeout, deadline)
            try:
                return self._take(room)
            except PoolBusy as busy:
                if self._clock() >= deadline:
                    raise PoolTimeout(f'waited {timeout:g} s for a browser: {busy}') from None
                self.wait_for_room(ROOM_POLL)

    def _take(self, room):
        if room.spent:
            raise ValueError('this room was already used or cancelled')
        room.spent = True
        if room.browser is not None:
            browser = self._healthy(room.browser)
            if browser is None:
                browser = self._start_for_room(work_counted=True)
        else:
            with self._lock:
                self._start_rooms -= 1
            browser = self._start_for_room(work_counted=False)
        with self._lock:
            self._handed_out.add(browser)
        self.quit_idle()
        return browser.driver

    def _wait_for_reservation(self, timeout, deadline):
        while True:
            room, refusal = self._try_reserve()
            if room is not None:
                return room
            if self._clock() >= deadline:
                raise PoolTimeout(f'waited {timeout:g} s for a browser: {refusal}')
            self.wait_for_room(min(ROOM_POLL, max(0.0, deadline - self._clock())))

    def _healthy(self, browser):
        """The reserved idle browser, or None after quitting it when it failed its health check."""
        with self._lock:
            self._reserved.discard(browser)
        if is_healthy(browser.driver):
            return browser
        log.warning('an idle browser failed its health check; replacing it')
        self._destroy(browser)
        return None

    def _start_for_room(self, work_counted):
        """Start a browser for a room that had leave to start one (or whose idle browser was
        dead). Between reserve() and now other workers may have started browsers too: the
        start goes ahead only if it is still within the drivers always admitted or the only
        one starting, and a lease comes free within a short poll; PoolBusy otherwise."""
        if not work_counted:
            self._leases.begin_work(self.pid)
        self._leases.begin_start(self.pid)
        with self._lock:
            self._starting += 1
        started = False
        try:
            working, starting = self._leases.working(), self._leases.starting()
            if working > self._always_admitted and starting > 1:
                raise PoolBusy(f'{starting} browsers are starting and {working} drivers work on this machine')
            if not self._leases.take(self.pid, LEASE_POLL):
                raise PoolBusy('another worker took the last browser lease')
            browser = self._start_browser()
            started = True
            return browser
        except BaseException:
            self._leases.end_work(self.pid)
            raise
        finally:
            with self._room:
                self._starting -= 1
                self._room.notify_all()
            self._leases.end_start(self.pid, started)

    def _start_browser(self):
        """Start a driver under the lease the caller holds; give the lease back if it fails."""
        folder = None if self.webdriver_url else f'{self.marker}{next(_driver_numbers)}/'
        try:
            driver = self._start_driver(folder)
        except BaseException:
            self._give_back_after_exit(folder)
            raise
        browser = _Browser(driver, folder)
        with self._lock:
            self._browsers[id(driver)] = browser
        if self._closed:
            self._destroy(browser)
            raise PoolClosed('the pool was closed while a browser was starting')
        return browser

    def _start_driver(self, folder):
        os.environ.setdefault('SE_OFFLINE', 'true')
        options = browser_options()
        if self.webdriver_url:
            connection = ChromiumRemoteConnection(self.webdriver_url, vendor_prefix='goog', browser_name='chrome')
            return webdriver.Remote(command_executor=connection, options=options)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder + 'profile')
        options.binary_location = CHROMIUM
        options.add_argument(f'--user-data-dir={folder}profile')
        service = Service(CHROMEDRIVER, log_output=folder + 'chromedriver.log', service_args=['--log-level=WARNING'],
                          env={**os.environ, 'BREAKPAD_DUMP_LOCATION': folder + 'crashes'})
        return webdriver.Chrome(service=service, options=options)

    # -- taking drivers back ---------------------------------------------------------------

    def release(self, driver):
        """Take a driver back after a task: wipe its state, then keep it idle for the next
        one. A driver that cannot be wiped is discarded instead."""
        browser = self._handed_back(driver)
        if browser is None:
            return
        try:
            call_with_timeout(lambda: wipe_browser_state(driver), WIPE_TIMEOUT)
        except Exception as error:
            log.warning('discarding a browser whose state could not be wiped: %s', error)
            self._destroy(browser)
        else:
            self._back_to_idle(browser, since=self._clock())
        finally:
            self._leases.end_work(self.pid)
        self.quit_idle()

    def _back_to_idle(self, browser, since, wake=True):
        """Put a browser (back) among the idle ones, or quit it if the pool closed meanwhile.
        `wake` the slots waiting for room, except when the CPU just refused it: they would
        be refused too, and wake each other in a loop."""
        with self._room:
            self._reserved.discard(browser)
            keep = not self._closed and id(browser.driver) in self._browsers
            if keep:
                browser.idle_since = since
                self._idle.append(browser)
                if wake:
                    self._room.notify_all()
        if not keep:
            self._destroy(browser)

    def discard(self, driver):
        """Quit a driver that must not serve again (a task failed mid-way, the browser crashed)."""
        browser = self._handed_back(driver)
        if browser is None:
            return
        try:
            self._destroy(browser)
        finally:
            self._leases.end_work(self.pid)

    def _handed_back(self, driver):
        with self._lock:
            browser = self._browsers.get(id(driver))
            if browser is None or browser not in self._handed_out:
                log.warning('a driver this pool did not hand out (or already took back) was returned; ignored')
                return None
            self._handed_out.discard(browser)
            return browser

    def quit_idle(self):
        """Quit the drivers idle for longer than `idle_seconds`; returns how many."""
        now = self._clock()
        with self._lock:
            stale = [browser for browser in self._idle if now - browser.idle_since > self.idle_seconds]
            self._idle = [browser for browser in self._idle if browser not in stale]
        for browser in stale:
            self._destroy(browser)
        return len(stale)

    def close(self):
        """Quit every driver this pool owns, handed out or idle. The pool hands out no more."""
        with self._room:
            self._closed = True
            browsers = list(self._browsers.values())
            working = len(self._handed_out) + len(self._reserved)
            self._idle.clear()
            self._handed_out.clear()
            self._reserved.clear()
            self._room.notify_all()
        for browser in browsers:
            self._destroy(browser)
        for _ in range(working):
            self._leases.end_work(self.pid)
        try:
            os.rmdir(self.marker)
        except OSError:
            pass

    def stats(self):
        with self._lock:
            counts = {'live': len(self._browsers), 'leased': len(self._handed_out),
                      'idle': len(self._idle), 'reserved': len(self._reserved), 'max': self.max_drivers}
        return {**counts, 'leases_in_use': self._leases.in_use(), 'working': self._leases.working()}

    # -- ending a browser --------------------------------------------------------------------

    def _destroy(self, browser):
        """Quit a browser, make sure its processes are gone, then give its lease back."""
        with self._lock:
            if self._browsers.pop(id(browser.driver), None) is None:
                return
        try:
            call_with_timeout(browser.driver.quit, QUIT_TIMEOUT)
        except Exception as error:
            log.warning('quitting a browser failed (%s); killing its processes', error)
        self._give_back_after_exit(browser.folder)
        service = getattr(browser.driver, 'service', None)
        if service is not None and service.process is not None:
            service.process.poll()
        with self._room:
            self._room.notify_all()

    def _give_back_after_exit(self, folder):
        if folder is not None:
            if not kill_until_gone(folder, PROCESS_EXIT_TIMEOUT):
                log.error('browser processes under %s survived SIGKILL for %.0f s; keeping their lease',
                          folder, PROCESS_EXIT_TIMEOUT)
                return
            shutil.rmtree(folder, ignore_errors=True)
        self._leases.give_back(self.pid)

    def _check_usable(self):
        if self._closed:
            raise PoolClosed('the pool is closed')
        if os.getpid() != self.pid:
            raise RuntimeError('a DriverPool belongs to the process that created it; create one after fork')


# -- browsers --------------------------------------------------------------------------------

def browser_options():
    options = webdriver.ChromeOptions()
    for flag in BASE_FLAGS + LEAN_FLAGS + (WINDOW_SIZE,):
        options.add_argument(flag)
    return options


def is_healthy(driver):
    """A cheap round trip through chromedriver to the page; False for a dead or hung browser."""
    try:
        return call_with_timeout(lambda: driver.execute_script('return 1'), HEALTH_TIMEOUT) == 1
    except Exception:
        return False


def cdp(driver, command, params=None):
    """One DevTools command, for local and remote Chromium drivers alike."""
    return driver.execute('executeCdpCommand', {'cmd': command, 'params': params or {}})['value']


def visited_origins(driver):
    """The http(s) origins in the back/forward history of every open window."""
    origins = set()
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        for entry in cdp(driver, 'Page.getNavigationHistory')['entries']:
            parts = urlsplit(entry['url'])
            if parts.scheme in ('http', 'https'):
                origins.add(f'{parts.scheme}://{parts.netloc}')
    return origins


def wipe_browser_state(driver):
    """Leave nothing of one user for the next: one window on about:blank with no history, no
    cookies, no storage.

    Extra windows are closed and the last one is sent to about:blank first, so no page of the
    user can write again after the clearing, and its back/forward history (and with it any
    page kept in the back/forward cache) is reset. Then every cookie of every origin
    (`Network.clearBrowserCookies`; `delete_all_cookies()` only clears the current host), all
    storage of every origin (`Storage.clearDataForOrigin` with origin `*`: measured on
    Chromium 156 to clear cookies, local and session storage, IndexedDB and Cache Storage of
    all origins, not only of the visited ones), again origin by origin for the origins in the
    windows' history (the documented use, in case `*` ever stops meaning "all"), and the HTTP
    cache. Raises WipeFailed when cookies, windows or history are left.
    """
    origins = visited_origins(driver)
    windows = driver.window_handles
    for handle in windows[:-1]:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(windows[-1])
    driver.get('about:blank')
    cdp(driver, 'Page.resetNavigationHistory')
    cdp(driver, 'Network.clearBrowserCookies')
    cdp(driver, 'Storage.clearDataForOrigin', {'origin': '*', 'storageTypes': 'all'})
    for origin in sorted(origins):
        cdp(driver, 'Storage.clearDataForOrigin', {'origin': origin, 'storageTypes': 'all'})
    cdp(driver, 'Network.clearBrowserCache')
    cookies_left = len(cdp(driver, 'Network.getAllCookies')['cookies'])
    windows_left = len(driver.window_handles)
    history_left = len(cdp(driver, 'Page.getNavigationHistory')['entries'])
    if cookies_left or windows_left != 1 or history_left != 1:
        raise WipeFailed(f'{cookies_left} cookies, {windows_left} windows and {history_left} history entries '
                         f'left after wiping')


def call_with_timeout(function, seconds):
    """function() from a helper thread; TimeoutError if it has not returned after `seconds`
    (it keeps running in the background; a driver it was talking to gets killed)."""
    outcome = {}

    def run():
        try:
            outcome['value'] = function()
        except BaseException as error:
            outcome['error'] = error

    thread = threading.Thread(target=run, name='topn-pool-call', daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f'{getattr(function, "__qualname__", function)} did not return within {seconds:g} s')
    if 'error' in outcome:
        raise outcome['error']
    return outcome.get('value')


# -- browser processes -------------------------------------------------------------------------

def browser_marker(instance, pid, browser_root=DEFAULT_BROWSER_ROOT):
    """The path every browser process of worker `pid` carries in its command line."""
    return os.path.join(browser_root, instance, f'w{pid}') + '/'


def find_browser_processes(marker):
    """{pid: command line} of every process on the machine whose command line contains `marker`.
    Chromium rewrites its children's command lines into one space-separated string."""
    needle = marker.encode()
    found = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if needle in command:
            found[int(entry)] = command.replace(b'\0', b' ').decode(errors='replace').strip()
    return found


def kill_browser_processes(marker):
    """SIGKILL every process whose command line contains `marker`; returns how many were found."""
    found = find_browser_processes(marker)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(found)


def kill_until_gone(marker, timeout):
    """Kill the processes carrying `marker` until none is left. False if some outlive `timeout`.
    A killed process waiting to be reaped has an empty command line and counts as gone."""
    deadline = time.monotonic() + timeout
    while kill_browser_processes(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
