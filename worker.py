"""A worker process: a few slot threads that each claim and publish one task at a time,
and a heartbeat thread that renews the leases of the tasks this process holds.

The supervisor forks it; it opens its own MySQL and Redis connections after the fork.
SIGTERM only sets a flag: the slots stop claiming, finish what they hold, and the
process exits. `run_once()` is one claim-and-publish step, callable from a test.
"""

import logging
import os
import signal
import socket
import threading
import time

import redis

from db import Database, DatabaseUnavailable
from publishers import load_publishers
from publishers.base import (Attempt, AttemptCancelled, AttemptSuperseded, AttemptTimedOut,
                             PublishError)
from scheduler import Scheduler, connect_redis

log = logging.getLogger('topn.worker')

IDLE_WAIT = 1.0
MAX_ERROR_BACKOFF = 5.0


def worker_id_for(pid, host=None):
    return f'{host or socket.gethostname()}:{pid}'


class Worker:
    def __init__(self, config, worker_id=None, publishers=None):
        self.config = config
        self.worker_id = worker_id or worker_id_for(os.getpid())
        self.db = Database(config.mysql)
        self.redis = connect_redis(config.redis_url)
        self.publishers = publishers if publishers is not None else load_publishers(config)
        self.scheduler = Scheduler(config, self.db, self.redis, self.publishers)
        self.stopping = threading.Event()
        self.exited = threading.Event()
        self.stop_requested = False
        self.parent_pid = os.getppid()

    # -- one step --------------------------------------------------------------------

    def run_once(self):
        """Claim one task and publish it. True when a task was run."""
        task = self.scheduler.claim(self.worker_id)
        if task is None:
            return False
        self.execute(task)
        return True

    def execute(self, task):
        task_id, number = task['task_id'], task['attempt']
        log.info('task %s attempt %s on %s: started', task_id, number, task['platform'])
        attempt = Attempt(task, self._progress_reporter(task_id, number), self.config.task_timeout)
        publisher = self.publishers.get(task['platform'])
        try:
            if publisher is None:
                raise PublishError(f'this worker has no publisher for {task["platform"]!r}', retryable=False)
            url = publisher.publish(attempt)
        except AttemptCancelled:
            self._record(self.scheduler.record_cancelled, task)
        except AttemptSuperseded:
            log.warning('task %s attempt %s: taken back by the reaper; dropping this attempt', task_id, number)
        except AttemptTimedOut as error:
            self._record(self.scheduler.record_failure, task, str(error), True, 'timeout')
        except PublishError as error:
            self._record(self.scheduler.record_failure, task, str(error), error.retryable)
        except Exception as error:
            log.exception('task %s attempt %s: publisher crashed', task_id, number)
            self._record(self.scheduler.record_failure, task, f'{type(error).__name__}: {error}')
        else:
            self._record(self.scheduler.record_success, task, url)

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
        if result is None or result is False:
            log.warning('task %s attempt %s: outcome not recorded, the task was taken back',
                        task['task_id'], task['attempt'])
        else:
            log.info('task %s attempt %s: %s', task['task_id'], task['attempt'],
                     result if isinstance(result, str) else record.__name__.removeprefix('record_'))

    # -- the process -----------------------------------------------------------------

    def run(self):
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        slots = [threading.Thread(target=self.slot_loop, name=f'slot-{i}', daemon=True)
                 for i in range(self.config.worker_slots)]
        heartbeat = threading.Thread(target=self.heartbeat_loop, name='heartbeat', daemon=True)
        heartbeat.start()
        for slot in slots:
            slot.start()
        log.info('worker %s started with %d slots', self.worker_id, len(slots))
        while any(slot.is_alive() for slot in slots):
            if self.stop_requested or os.getppid() != self.parent_pid:
                self.stopping.set()
            time.sleep(0.2)
        self.exited.set()
        log.info('worker %s stopped', self.worker_id)

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def slot_loop(self):
        failures = 0
        while not self.stopping.is_set():
            try:
                if not self.run_once():
                    self.scheduler.wait_for_work(IDLE_WAIT)
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
                self.db.renew_leases(self.worker_id, self.config.lease_ttl)
            except DatabaseUnavailable as error:
                log.warning('worker %s: heartbeat failed: %s', self.worker_id, error)
            except Exception:
                log.exception('worker %s: heartbeat failed', self.worker_id)


def worker_main(config):
    """Entry point of a forked worker process."""
    Worker(config).run()
