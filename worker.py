"""A worker process: a few slot threads that each claim and publish one task at a time,
and a heartbeat thread that renews the leases of the tasks this process holds.

The supervisor forks it; it opens its own MySQL and Redis connections after the fork.
SIGTERM only sets a flag: the slots stop claiming, finish what they hold, and the
process exits. `run_one_step()` is one slot step (browser room, claim, publish) and
`run_once()` one claim-and-publish, both callable from a test.
"""

import logging
import os
import signal
import threading
import time

import redis

import images
from accounts import AccountStore, AccountUnreadable, load_secret_key
from db import Database, DatabaseUnavailable
from pool import DriverPool, PoolBusy, PoolTimeout
from publishers import load_publishers
from publishers.base import (Attempt, AttemptCancelled, AttemptSuperseded, AttemptTimedOut,
                             PublishError)
from publishers.browser import capture_evidence
from scheduler import Scheduler, connect_redis

log = logging.getLogger('topn.worker')

IDLE_WAIT = 1.0
ROOM_WAIT = 0.25
MAX_ERROR_BACKOFF = 5.0


class PacingDelay(Exception):
    def __init__(self, seconds):
        super().__init__(f'wait {seconds:.1f} s')
        self.seconds = seconds


def failed_outcome(attempt):
    """A failure after the submit click leaves it open whether the platform took the
    article; the next attempt then looks before publishing again."""
    return 'unknown' if attempt.submitted else 'failed'


def worker_id_for(host_id, pid):
    return f'{host_id}:{pid}'


class Worker:
    def __init__(self, config, worker_id=None, publishers=None, leases=None):
        self.config = config
        self.worker_id = worker_id or worker_id_for(config.host_id, os.getpid())
        self.db = Database(config.mysql)
        self.redis = connect_redis(config.redis_url)
        self.publishers = publishers if publishers is not None else load_publishers(config)
        self.scheduler = Scheduler(config, self.db, self.redis, self.publishers)
        self.accounts = AccountStore(self.db, load_secret_key(config))
        self.leases = leases
        self._driver_pool = None
        self._pool_lock = threading.Lock()
        self.stopping = threading.Event()
        self.exited = threading.Event()
        self.stop_requested = False
        self.parent_pid = os.getppid()

    # -- one step --------------------------------------------------------------------

    def run_one_step(self):
        """A slot's step: reserve room for a browser, claim a task, publish it; or wait for
        room or for work. A slot asks for browser room before it claims: a task claimed and
        then kept waiting for a browser would sit idle while warm browsers idle in other
        workers. Workers without shared browser leases (tests that run workers in threads,
        without browsers) do not ask."""
        room = None
        if self.leases is not None:
            room = self.driver_pool.reserve()
            if room is None:
                self.driver_pool.wait_for_room(ROOM_WAIT)
                return
        if not self.run_once(room):
            self.scheduler.wait_for_work(IDLE_WAIT)

    def run_once(self, room=None):
        """Claim one task and publish it, using the browser `room` reserved for it if any.
        True when a task was run."""
        try:
            task = self.scheduler.claim(self.worker_id)
        except BaseException:
            self._cancel_room(room)
            raise
        if task is None:
            self._cancel_room(room)
            return False
        self.execute(task, room)
        return True

    def execute(self, task, room=None):
        task_id, number = task['task_id'], task['attempt']
        log.info('task %s attempt %s on %s: started', task_id, number, task['platform'])
        attempt = Attempt(task, self._progress_reporter(task_id, number), self.config.task_timeout,
                          remember_ref=lambda ref: self.db.set_platform_ref(task_id, number, ref),
                          save_account=lambda fields: self.accounts.update(task['user_id'], task['platform'], fields),
                          local_pictures=lambda: self._local_pictures(task_id),
                          picture_memory=PictureMemory(self.db, task['user_id'], task['platform']),
                          image_max_bytes=self.config.image_max_bytes)
        clean = False
        try:
            url = self._publish(task, attempt, room)
            clean = True
        except PoolBusy as busy:
            self.scheduler.give_back(task)
            log.info('task %s: given back unattempted, no browser after all (%s)', task_id, busy)
        except PacingDelay as delay:
            self.scheduler.defer(task, delay.seconds)
            log.info('task %s: the account must wait %.1f s between publishes; deferred', task_id, delay.seconds)
        except AttemptCancelled:
            clean = True
            self._record(self.scheduler.record_cancelled, task)
        except AttemptSuperseded:
            log.warning('task %s attempt %s: taken back by the reaper; dropping this attempt', task_id, number)
        except AttemptTimedOut as error:
            self._save_evidence(attempt)
            self._record(self.scheduler.record_failure, task, str(error), True, 'timeout')
        except PublishError as error:
            self._save_evidence(attempt, error.answer)
            outcome = 'failed' if error.refused else failed_outcome(attempt)
            self._record(self.scheduler.record_failure, task, str(error), error.retryable, outcome,
                         error.retry_after)
        except Exception as error:
            log.exception('task %s attempt %s: publisher crashed', task_id, number)
            self._save_evidence(attempt)
            self._record(self.scheduler.record_failure, task, f'{type(error).__name__}: {error}', True,
                         failed_outcome(attempt))
        else:
            self._record(self.scheduler.record_success, task, url, '；'.join(attempt.notes) or None)
        finally:
            self._cancel_room(room)
            self._hand_back_driver(attempt, clean)

    def _publish(self, task, attempt, room):
        publisher = self.publishers.get(task['platform'])
        if publisher is None:
            raise PublishError(f'this worker has no publisher for {task["platform"]!r}', retryable=False)
        if not publisher.needs_browser:
            self._cancel_room(room)
            return publisher.publish(attempt)
        attempt.account = self._account(task, publisher)
        interval = self.config.pacing_for(publisher.name)
        if interval > 0:
            wait = self.db.reserve_publish_slot(task['user_id'], publisher.name, interval)
            if wait > 0:
                raise PacingDelay(wait)
            attempt.set_submit_gate(
                lambda: self.db.claim_submit_moment(task['user_id'], publisher.name, interval))
        attempt.driver = self._lease_driver(room)
        attempt.progress(10)
        return publisher.publish(attempt)

    def _account(self, task, publisher):
        try:
            account = self.accounts.load(task['user_id'], publisher.name)
        except AccountUnreadable as error:
            raise PublishError(error.message, retryable=False) from None
        if account is None:
            raise PublishError(f'you have no {publisher.label or publisher.name} account in TOP_N yet; '
                               'add its login first', retryable=False)
        return account

    def _lease_driver(self, room):
        try:
            return self.driver_pool.acquire(self.config.driver_acquire_timeout, room=room)
        except PoolTimeout as error:
            raise PublishError(f'no browser was free: {error}') from None

    def _cancel_room(self, room):
        if room is not None:
            self.driver_pool.cancel(room)

    def _local_pictures(self, task_id):
        return {name: images.Picture(name, mime, bytes(data)) for name, mime, data in self.db.task_pictures(task_id)}

    def _save_evidence(self, attempt, answer=None):
        if attempt.driver is None:
            return
        files = capture_evidence(attempt.driver, answer)
        if files:
            try:
                self.db.record_evidence(attempt.task_id, attempt.number, files)
            except DatabaseUnavailable as error:
                log.warning('task %s attempt %s: evidence not kept: %s', attempt.task_id, attempt.number, error)

    def _hand_back_driver(self, attempt, clean):
        """A driver whose task ended cleanly is wiped and pooled; any other is quit.
        TOPN_DRIVER_REUSE=0 quits every driver (the benchmarks' fresh-browser baseline)."""
        if attempt.driver is None:
            return
        if clean and self.config.driver_reuse:
            self.driver_pool.release(attempt.driver)
        else:
            self.driver_pool.discard(attempt.driver)

    @property
    def driver_pool(self):
        """Made on first use, in the worker process, so nothing starts at fork or import."""
        with self._pool_lock:
            if self._driver_pool is None:
                self._driver_pool = self._new_driver_pool()
            return self._driver_pool

    def _new_driver_pool(self):
        return DriverPool.from_config(self.leases, self.config, sessions=SessionLog(self.db, self.worker_id))

    def _progress_reporter(self, task_id, number):
        def report(percent):
            try:
                return self.db.set_progress(task_id, number, percent)
            except DatabaseUnavailable as error:
                log.warning('task %s: progress not recorded (%s)', task_id, error)
                return False
        return report

    def _record(self, record, task, *args):
        """Write an attempt's outcome, waiting out a MySQL outage for as long as our lease
        would last. If MySQL stays away longer, the reaper takes the task back later and
        the next attempt looks on the platform before publishing again."""
        deadline = time.monotonic() + self.config.lease_ttl
        delay = 0.2
        while True:
            try:
                result = record(task, *args)
                break
            except DatabaseUnavailable as error:
                if time.monotonic() > deadline:
                    log.error('task %s: could not record the outcome of attempt %s: %s',
                              task['task_id'], task['attempt'], error)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if result is None:
            log.warning('task %s attempt %s: outcome not recorded, the task was taken back',
                        task['task_id'], task['attempt'])
        else:
            log.info('task %s attempt %s: %s', task['task_id'], task['attempt'], result)

    # -- the process -----------------------------------------------------------------

    def run(self):
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        slots = self.start_threads()
        log.info('worker %s started with %d slots', self.worker_id, len(slots))
        while any(slot.is_alive() for slot in slots):
            if self.stop_requested or os.getppid() != self.parent_pid:
                self.stopping.set()
            time.sleep(0.2)
        self.exited.set()
        self.close_browsers()
        log.info('worker %s stopped', self.worker_id)

    def start_threads(self):
        """Start the heartbeat and the slot threads; returns the slots. `stopping` ends them."""
        threading.Thread(target=self.heartbeat_loop, name='heartbeat', daemon=True).start()
        slots = [threading.Thread(target=self.slot_loop, name=f'slot-{i}', daemon=True)
                 for i in range(self.config.worker_slots)]
        for slot in slots:
            slot.start()
        return slots

    def close_browsers(self):
        if self._driver_pool is not None:
            self._driver_pool.close()

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def slot_loop(self):
        failures = 0
        while not self.stopping.is_set():
            try:
                self.run_one_step()
                failures = 0
            except (DatabaseUnavailable, redis.RedisError) as error:
                failures += 1
                log.warning('worker %s: %s; retrying', self.worker_id, error)
                self.stopping.wait(min(MAX_ERROR_BACKOFF, 0.2 * 2 ** failures))
            except Exception:
                failures += 1
                log.exception('worker %s: unexpected error in the claim loop', self.worker_id)
                self.stopping.wait(min(MAX_ERROR_BACKOFF, 0.2 * 2 ** failures))

    def heartbeat_loop(self):
        """Renew leases until the slots have exited, draining included."""
        while not self.exited.wait(self.config.heartbeat_interval):
            try:
                if self._driver_pool is not None:
                    self._driver_pool.quit_idle()
                    self.scheduler.report_pool(self.worker_id, self._driver_pool.stats(),
                                               ttl=self.config.heartbeat_interval * 3)
                self.db.renew_leases(self.worker_id, self.config.lease_ttl)
            except (DatabaseUnavailable, redis.RedisError) as error:
                log.warning('worker %s: heartbeat failed: %s', self.worker_id, error)
            except Exception:
                log.exception('worker %s: heartbeat failed', self.worker_id)


class SessionLog:
    """The remote browser sessions of one worker, kept in MySQL: if this worker or its whole
    host dies, a supervisor still alive ends them at the Grid (`end_orphan_sessions`) instead
    of leaving their slots taken until the Grid's session timeout. Losing a row to a MySQL
    outage only means the Grid's timeout ends that session."""

    def __init__(self, db, worker_id):
        self.db, self.worker_id = db, worker_id

    def started(self, session_id):
        try:
            self.db.session_started(session_id, self.worker_id)
        except DatabaseUnavailable as error:
            log.warning('remote session %s not recorded: %s', session_id, error)

    def ended(self, session_id):
        try:
            self.db.session_ended(session_id)
        except DatabaseUnavailable as error:
            log.warning('the end of remote session %s not recorded: %s', session_id, error)


class PictureMemory:
    """What pictures one account already has on its platform, kept in MySQL."""

    def __init__(self, db, user_id, platform):
        self.db, self.user_id, self.platform = db, user_id, platform

    def get(self, picture, place):
        return self.db.rehosted_picture(self.user_id, self.platform, place, picture.sha256)

    def put(self, picture, place, url):
        self.db.remember_rehosted_picture(self.user_id, self.platform, place, picture.sha256, url)


def worker_main(config, leases):
    """Entry point of a forked worker process."""
    Worker(config, leases=leases).run()
