"""Headless Chromium for the workers: a pool of warm browsers per worker process, under
machine-wide leases.

The rule, in one sentence: at most `max_drivers` browsers live on the machine, at most
`max_working` of them work at once (`working_limit`: TOPN_WORKING_PER_CORE per CPU core,
never more than TOPN_MAX_DRIVERS; browsers elsewhere, behind a remote WebDriver, count only
against TOPN_MAX_DRIVERS), and a new browser starts only when no browser idles anywhere.

Both limits are semaphores in `SharedLeases`, which the supervisor creates with
`lease_registry()` before it forks the workers. A browser lease is taken before a browser
starts and given back only once it has quit and its processes are gone; a work permit is
taken when a slot reserves room for a task and given back once its browser is wiped (or
gone). The supervisor returns both kinds for a worker that was SIGKILLed (`release_all_of`).

Each worker process owns one `DriverPool`, shared by its slot threads. A slot `reserve()`s
room before it claims a task (an idle browser set aside, or leave to start one), then
`acquire()`s its driver with that room, publishes, and `release()`s it (cookies, storage and
extra windows wiped, then idle) or `discard()`s it after a failure mid-task. Each browser is
in exactly one state: starting, idle, working, wiping or closing.

Browsers behind a remote WebDriver (TOPN_WEBDRIVER_URL, a Selenium Grid): the Grid's slots
are the cluster-wide cap and `max_drivers` this host's share of them. A Grid queues a
new-session request while its slots are taken, so a remote room holds a browser already
started (or an idle one checked alive) before any task is claimed; a session the Grid ended
fails the task's next command, the task is retried as after any browser crash, and the
pool replaces the browser. Idle sessions are quit before the Grid's session timeout
(`Config.browser_idle_limit`), all of them on close(), and each is recorded through
`sessions` so that another host can end those of a worker or host that died.

Finding a worker's browser processes. Chromium's children re-parent to init (zygotes linger
~2 s after `quit()`, crashpad handlers always), so walking the process tree from the worker
misses them. Instead every process a driver starts carries a path in its command line:
    {browser_root}/{namespace}/w{worker_pid}/{n}/
chromedriver through `--log-path`, chromium, its zygotes, renderers and utilities through
`--user-data-dir`, and the two crashpad handlers through `--database`, which Chromium takes
from the BREAKPAD_DUMP_LOCATION environment variable (without it they point at
~/.config/chromium and carry no marker). Scanning /proc/*/cmdline for the path finds them
all, even after the worker itself died: `kill_browser_processes(browser_marker(...))`.
"""

import itertools
import logging
import multiprocessing.util
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection

log = logging.getLogger('topn.pool')

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'

# Measured on our 2-core build machines: the lean set saves ~70 MB per browser (331 vs 402 MB for
# one, 1063 vs 1513 MB for eight), most of it by not preloading the omnibox popup renderer.
# With --disable-gpu the GPU process only composites in software; --in-process-gpu makes it a
# thread of the browser process, one process and one IPC hop less per frame
# (docs/performance.md: 0.95x the wall time and 0.96x the CPU per task).
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
REMOTE_RETRY_PAUSE = 2.0  # after a remote WebDriver refused a new session (one down, not one full)

STARTING, IDLE, WORKING, WIPING, CLOSING = 'starting', 'idle', 'working', 'wiping', 'closing'

_driver_numbers = itertools.count()


class PoolTimeout(Exception):
    """acquire() found no driver it was allowed to hand out before its timeout."""


class PoolBusy(Exception):
    """The room reserve() found was gone when the browser was to start (another worker took
    the last lease meanwhile). Give the task back and wait for room."""


class PoolClosed(Exception):
    """The pool was closed; it hands out no more drivers."""


class WipeFailed(Exception):
    """A browser still carried state after wipe_browser_state(); it must not serve anyone else."""


# -- machine-wide leases ---------------------------------------------------------------

def working_limit(max_drivers, working_per_core, remote=False, cores=None):
    """How many browsers may work at once on this machine. On 2 cores the sandbox work, which
    waits 0.5 s on the platform per task, did the most with 6 (3 per core) and no more with 8,
    which took the service over 1.5 GB (docs/performance.md). Browsers behind a remote
    WebDriver use another machine's CPUs: only the cap counts for them."""
    if remote:
        return max_drivers
    return max(1, min(max_drivers, working_per_core * (cores or os.cpu_count() or 1)))


def lease_registry(manager, max_drivers, max_working):
    """The supervisor's one registry of browser leases and work permits, built from a started
    `multiprocessing.Manager()` before the workers are forked."""
    return SharedLeases(manager.BoundedSemaphore(max_drivers), manager.BoundedSemaphore(max_working),
                        manager.dict(), manager.dict(), max_drivers, max_working)


def local_leases(max_drivers, max_working):
    """The same registry for the threads of one process (a command that checks one login)."""
    return SharedLeases(threading.BoundedSemaphore(max_drivers), threading.BoundedSemaphore(max_working),
                        {}, {}, max_drivers, max_working)


class SharedLeases:
    """Two semaphores shared by every pool on the machine (`max_drivers` browser leases and
    `max_working` work permits) and, per process id, how many of each it holds, so the
    supervisor can return a dead worker's.

    A worker only writes its own pid's entries. A semaphore is taken before its count goes up
    and the count goes down before it is given back, so a worker killed between the two steps
    can leak one (the limit shrinks by one) but never lets a limit be exceeded.
    """

    def __init__(self, browsers, permits, held, working, max_drivers, max_working):
        self.max_drivers = max_drivers
        self.max_working = max_working
        self._browsers = browsers
        self._permits = permits
        self._held = held
        self._working = working
        self._new_lock()

    def _new_lock(self):
        """A lock per process: a forked child must not inherit one held by a parent's thread."""
        self._lock = threading.Lock()
        multiprocessing.util.register_after_fork(self, SharedLeases._new_lock)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state['_lock']
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._new_lock()

    def take_browser(self, pid, timeout):
        """One browser lease for process `pid`, waiting up to `timeout` seconds. True when taken."""
        if not self._browsers.acquire(True, max(0.0, timeout)):
            return False
        self._count(self._held, pid, +1)
        return True

    def give_back_browser(self, pid):
        self._count(self._held, pid, -1)
        self._browsers.release()

    def take_permit(self, pid):
        """One work permit for `pid` if one is free now. True when taken."""
        if not self._permits.acquire(False):
            return False
        self._count(self._working, pid, +1)
        return True

    def give_back_permit(self, pid):
        self._count(self._working, pid, -1)
        self._permits.release()

    def release_all_of(self, pid):
        """Give back every lease and permit a dead worker held; returns how many browser leases.
        Kill its browsers first (`kill_browser_processes(browser_marker(...))`): a lease stands
        for a browser."""
        with self._lock:
            browsers = self._held.pop(pid, 0)
            permits = self._working.pop(pid, 0)
        for _ in range(browsers):
            self._browsers.release()
        for _ in range(permits):
            self._permits.release()
        return browsers

    def live(self):
        """Browser leases held machine-wide: live browsers, starting ones included."""
        return sum(self._held.values())

    def working(self):
        """Work permits held machine-wide: browsers at work or being wiped, and rooms to start one."""
        return sum(self._working.values())

    def _count(self, counts, pid, step):
        with self._lock:
            count = counts.get(pid, 0) + step
            if count < 0:
                raise ValueError(f'process {pid} gives back more than it holds')
            if count == 0:
                counts.pop(pid, None)
            else:
                counts[pid] = count


# -- the pool ------------------------------------------------------------------------------

class Room:
    """What `DriverPool.reserve()` set aside for one browser task, under one work permit: an
    idle browser of the pool (`browser`), or leave to start one (`browser` is None). Used once,
    by acquire() or cancel()."""
    __slots__ = ('browser', 'spent')

    def __init__(self, browser):
        self.browser = browser
        self.spent = False


class _Browser:
    __slots__ = ('driver', 'folder', 'state', 'idle_since')

    def __init__(self, folder):
        self.driver = None
        self.folder = folder
        self.state = STARTING
        self.idle_since = None


class DriverPool:
    """The browsers of one worker process, shared by its slot threads.

    Create it after the fork, in the process that uses it. A worker slot first asks for room
    (`reserve()`), then claims a task, then `acquire(room=...)`s its driver; `acquire()`
    without a room waits for one. Every driver goes back through `release()` (wiped, then
    idle) or `discard()` (quit). Drivers idle for longer than `idle_seconds` are quit by
    `quit_idle()`, which the worker calls now and then and which release() calls on the way.
    """

    def __init__(self, leases, *, idle_seconds=300, webdriver_url=None, browser_root, namespace,
                 sessions=None, clock=time.monotonic):
        self.idle_seconds = idle_seconds
        self.webdriver_url = webdriver_url
        self.sessions = sessions or NoSessionLog()
        self.pid = os.getpid()
        self.marker = browser_marker(namespace, self.pid, browser_root)
        self._leases = leases
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._browsers = []
        self._start_rooms = 0
        self._closed = False
        self._remote_failure = None
        self._remote_retry_at = float('-inf')

    @classmethod
    def from_config(cls, leases, config, sessions=None):
        return cls(leases, idle_seconds=config.browser_idle_limit, webdriver_url=config.webdriver_url or None,
                   browser_root=config.browser_root, namespace=config.browser_namespace, sessions=sessions)

    # -- handing drivers out -----------------------------------------------------------

    def reserve(self):
        """Room for one browser task right now, set aside for the caller, or None.

        A worker slot asks before it claims a task, so that a task is taken only by a slot
        that can run it at once (a task claimed and then kept waiting for a browser would be
        better off in another worker). Hand the room to `acquire(room=...)` or back to
        `cancel()`. When None, `wait_for_room()` and ask again.
        """
        room, _ = self._try_reserve()
        return room

    def _try_reserve(self):
        """(room, None) or (None, why not)."""
        self._check_usable()
        leases = self._leases
        if not leases.take_permit(self.pid):
            return None, f'{leases.max_working} browsers work on this machine already, the most allowed'
        with self._lock:
            browser = self._newest_idle()
            if browser is not None:
                browser.state = WORKING
        if browser is not None:
            if not self.webdriver_url or is_healthy(browser.driver):
                return Room(browser), None
            log.warning('an idle remote browser no longer answers (its session was ended); replacing it')
            self._destroy(browser)
        refusal = self._refuse_start()
        if refusal is not None:
            leases.give_back_permit(self.pid)
            return None, refusal
        if self.webdriver_url:
            return self._reserve_remote_start()
        with self._lock:
            self._start_rooms += 1
        return Room(None), None

    def _reserve_remote_start(self):
        """A Grid may queue a new-session request for as long as its session-request-timeout,
        so a remote browser is started before any task is claimed for it: a request waiting
        for a slot holds no task, and a Grid with no slot free fails no task."""
        if self._clock() < self._remote_retry_at:
            self._leases.give_back_permit(self.pid)
            return None, f'the WebDriver endpoint gave no browser a moment ago: {self._remote_failure}'
        try:
            browser = self._start_browser()
        except (PoolBusy, PoolClosed) as error:
            self._leases.give_back_permit(self.pid)
            return None, str(error)
        except Exception as error:
            self._leases.give_back_permit(self.pid)
            if self._remote_failure is None:
                log.warning('no browser from %s (retrying every %g s): %s', self.webdriver_url,
                            REMOTE_RETRY_PAUSE, first_line(error))
            self._remote_failure = first_line(error)
            self._remote_retry_at = self._clock() + REMOTE_RETRY_PAUSE
            return None, f'the WebDriver endpoint gave no browser: {self._remote_failure}'
        if self._remote_failure is not None:
            log.info('%s gives browsers again', self.webdriver_url)
            self._remote_failure = None
        return Room(browser), None

    def _newest_idle(self):
        """The idle browser that worked last (the warmest), or None. Call with the lock held."""
        idle = [browser for browser in self._browsers if browser.state == IDLE]
        return max(idle, key=lambda browser: browser.idle_since) if idle else None

    def _refuse_start(self):
        """Why no browser may start now, or None. A start costs ~0.5 CPU-second and ~130 MB,
        so it happens only when no browser idles anywhere: with our permit counted, more
        live browsers than permits means one is idle in another worker, which takes the task."""
        live, working = self._leases.live(), self._leases.working()
        if live >= self._leases.max_drivers:
            return f'all {self._leases.max_drivers} browser leases of this machine are held'
        if live > working - 1:
            return f'{live - working + 1} browsers idle in other worker processes; they take the work first'
        return None

    def cancel(self, room):
        """Give back a room that was not used (the claim found no task, or one that needs no
        browser). Does nothing for a room already used or cancelled."""
        if room is None or room.spent:
            return
        room.spent = True
        with self._changed:
            if self._closed:
                return  # close() gave its permit back
            if room.browser is None:
                self._start_rooms -= 1
            elif room.browser.state == WORKING:
                room.browser.state = IDLE
                if room.browser.idle_since is None:  # started for this room, never used
                    room.browser.idle_since = self._clock()
            self._changed.notify_all()
        self._leases.give_back_permit(self.pid)

    def wait_for_room(self, timeout):
        """Sleep until a browser of this pool comes back or goes, or `timeout` seconds pass.
        Room freed by another worker is not signalled here: callers poll."""
        with self._changed:
            self._changed.wait(timeout)

    def acquire(self, timeout=30, room=None):
        """A driver for one task, from `room` (see `reserve`) or, without one, from the first
        room that comes free within `timeout` seconds; PoolTimeout after that, saying why.
        With a room, PoolBusy when another worker took the last browser lease meanwhile: give
        the task back and wait for room."""
        self._check_usable()
        if room is not None:
            return self._take(room)
        deadline = self._clock() + timeout
        while True:
            room, refusal = self._try_reserve()
            if room is not None:
                try:
                    return self._take(room)
                except PoolBusy as busy:
                    refusal = str(busy)
            if self._clock() >= deadline:
                raise PoolTimeout(f'waited {timeout:g} s for a browser: {refusal}')
            self.wait_for_room(min(ROOM_POLL, max(0.0, deadline - self._clock())))

    def _take(self, room):
        if room.spent:
            raise ValueError('this room was already used or cancelled')
        room.spent = True
        if room.browser is None:
            with self._lock:
                self._start_rooms -= 1
        elif self.webdriver_url or is_healthy(room.browser.driver):
            return room.browser.driver  # a remote room's browser was checked or started just now
        else:
            log.warning('an idle browser failed its health check; replacing it')
            self._destroy(room.browser)
        try:
            return self._start_browser().driver
        except BaseException:
            self._leases.give_back_permit(self.pid)
            raise

    def _start_browser(self):
        """Start a browser under a new lease (the caller holds the work permit)."""
        if not self._leases.take_browser(self.pid, LEASE_POLL):
            raise PoolBusy('another worker took the last browser lease')
        browser = _Browser(None if self.webdriver_url else f'{self.marker}{next(_driver_numbers)}/')
        with self._lock:
            self._browsers.append(browser)
        try:
            browser.driver = self._start_driver(browser.folder)
        except BaseException:
            self._forget(browser)
            self._give_back_after_exit(browser.folder)
            raise
        if self.webdriver_url:
            self.sessions.started(browser.driver.session_id)
        with self._lock:
            closed = self._closed
            browser.state = CLOSING if closed else WORKING
        if closed:
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
        browser = self._handed_back(driver, WIPING)
        if browser is None:
            return
        try:
            call_with_timeout(lambda: wipe_browser_state(driver), WIPE_TIMEOUT)
        except Exception as error:
            log.warning('discarding a browser whose state could not be wiped: %s', error)
            self._destroy(browser)
        else:
            with self._changed:
                keep = not self._closed
                browser.state, browser.idle_since = (IDLE, self._clock()) if keep else (CLOSING, None)
                self._changed.notify_all()
            if not keep:
                self._destroy(browser)
        finally:
            self._leases.give_back_permit(self.pid)
        self.quit_idle()

    def discard(self, driver):
        """Quit a driver that must not serve again (a task failed mid-way, the browser crashed)."""
        browser = self._handed_back(driver, CLOSING)
        if browser is None:
            return
        try:
            self._destroy(browser)
        finally:
            self._leases.give_back_permit(self.pid)

    def _handed_back(self, driver, state):
        with self._lock:
            browser = next((b for b in self._browsers if b.driver is driver and b.state == WORKING), None)
            if browser is None:
                log.warning('a driver this pool did not hand out (or already took back) was returned; ignored')
                return None
            browser.state = state
            return browser

    def quit_idle(self):
        """Quit the drivers idle for longer than `idle_seconds`; returns how many."""
        now = self._clock()
        with self._lock:
            stale = [b for b in self._browsers if b.state == IDLE and now - b.idle_since > self.idle_seconds]
            for browser in stale:
                browser.state = CLOSING
        for browser in stale:
            self._destroy(browser)
        return len(stale)

    def close(self):
        """Quit every driver this pool owns, whatever its state. The pool hands out no more.
        The permits of rooms and drivers not handed back yet go back now; a browser being wiped
        gives its own back, and one still starting quits itself once started."""
        with self._changed:
            self._closed = True
            permits = self._start_rooms + sum(b.state == WORKING for b in self._browsers)
            self._start_rooms = 0
            browsers = [b for b in self._browsers if b.state not in (STARTING, WIPING)]
            for browser in browsers:
                browser.state = CLOSING
            self._changed.notify_all()
        for browser in browsers:
            self._destroy(browser)
        for _ in range(permits):
            self._leases.give_back_permit(self.pid)
        try:
            os.rmdir(self.marker)
        except OSError:
            pass

    def stats(self):
        with self._lock:
            states = [browser.state for browser in self._browsers]
        counts = {state: states.count(state) for state in (STARTING, IDLE, WORKING, WIPING, CLOSING)}
        return {**counts, 'live': len(states), 'leases_in_use': self._leases.live(),
                'working_machine_wide': self._leases.working(), 'max': self._leases.max_drivers,
                'max_working': self._leases.max_working}

    # -- ending a browser --------------------------------------------------------------------

    def _destroy(self, browser):
        """Quit a browser, make sure its processes are gone, then give its lease back."""
        if not self._forget(browser):
            return
        try:
            call_with_timeout(browser.driver.quit, QUIT_TIMEOUT)
        except Exception as error:
            log.warning('quitting a browser failed (%s); killing its processes', first_line(error))
        if self.webdriver_url:
            self.sessions.ended(browser.driver.session_id)
        self._give_back_after_exit(browser.folder)
        service = getattr(browser.driver, 'service', None)
        if service is not None and service.process is not None:
            service.process.poll()

    def _forget(self, browser):
        with self._changed:
            if browser not in self._browsers:
                return False
            self._browsers.remove(browser)
            self._changed.notify_all()
            return True

    def _give_back_after_exit(self, folder):
        if folder is not None:
            if not kill_until_gone(folder, PROCESS_EXIT_TIMEOUT):
                log.error('browser processes under %s survived SIGKILL for %.0f s; keeping their lease',
                          folder, PROCESS_EXIT_TIMEOUT)
                return
            shutil.rmtree(folder, ignore_errors=True)
        self._leases.give_back_browser(self.pid)

    def _check_usable(self):
        if self._closed:
            raise PoolClosed('the pool is closed')
        if os.getpid() != self.pid:
            raise RuntimeError('a DriverPool belongs to the process that created it; create one after fork')


class NoSessionLog:
    """Where a pool says which remote sessions it holds; this one forgets. The worker's
    (`worker.SessionLog`) keeps them in MySQL, so that another host can end the sessions of
    a host that died."""

    def started(self, session_id):
        pass

    def ended(self, session_id):
        pass


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


def first_line(error):
    """An exception in one line: WebDriver errors carry a multi-line stack trace of the server."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def end_remote_session(webdriver_url, session_id, timeout=10):
    """End a session at a WebDriver endpoint without holding its driver (`DELETE /session/<id>`),
    for sessions whose owner died. A session already gone is no error (404, or 200 from an
    endpoint for which ending is idempotent)."""
    request = urllib.request.Request(f'{webdriver_url.rstrip("/")}/session/{session_id}', method='DELETE')
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise


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

def browser_marker(namespace, pid, browser_root):
    """The path every browser process of worker `pid` carries in its command line."""
    return os.path.join(browser_root, namespace, f'w{pid}') + '/'


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
