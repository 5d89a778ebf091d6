"""Ceiling benchmark: how close bare browser work comes to bench/browser.py's limit on this
machine, with no TOP_N service around it. It tells the service's own cost apart from what
Chromium itself does on two cores.

    .venv/bin/python bench/ceiling.py --runs 3
    .venv/bin/python bench/ceiling.py --runs 1 --concurrency 1,4 --tasks 40

One process, one `DriverPool` (pool.py: the same browser flags, acquire with its health
check, release with its wipe) and the `sandbox` publisher, driven by N threads that each
hold one browser: no supervisor, no workers, no MySQL, no Redis (the lease registry is
there, as the pool needs it, and lets all N browsers work at once). The sandbox answers
each publish after 500 ms, as in bench/browser.py (both start it with bench/harness.py).
Tasks go to 10 sandbox accounts in turn, so consecutive tasks of a browser belong to
different accounts and every wipe has something to clear. Every browser does one task
first, so start-up is not measured.

Per run, on fresh browsers and a fresh sandbox:
- alone: `--alone` tasks one at a time on one warm browser. Their CPU-seconds (this
  process, every process with the browser marker, the sandbox), wipe included, give the
  limit as bench/browser.py defines it: tasks x CPU-seconds per task / nproc (the latency
  bound, tasks / 8 x the time alone, is far lower here).
- for each N in `--concurrency`: `--tasks` tasks over N threads; wall time, CPU-seconds per
  task, the machine's CPU busy share, and `ratio_to_limit` = wall / limit. The best N's
  ratio is the ceiling for any scheduler on this machine at this moment: the service adds
  its claims, progress writes and browser start-ups on top.

Prints one JSON object (per-run figures and medians); progress goes to stderr.
"""

import argparse
import itertools
import json
import multiprocessing
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import threading
import time

from harness import (CLOCK_TICKS, PUBLISH_LATENCY_MS, ROOT, Sandbox, busy_percent, list_processes, log,
                     machine_cpu_ticks, machine_facts, medians, repeat_runs)

sys.path.insert(0, str(ROOT))

import pool  # noqa: E402  (the project's modules are importable once ROOT is on the path)
from accounts import parse_cookies  # noqa: E402
from publishers.base import Attempt  # noqa: E402
from publishers.sandbox import SandboxPublisher  # noqa: E402

ACCOUNTS = 10
MAX_DRIVERS = 8
MEDIAN_FIGURES = ('wall_seconds', 'cpu_seconds_per_task', 'ratio_to_limit', 'machine_cpu_busy_percent')
ACQUIRE_TIMEOUT = 60
TASK_TIMEOUT = 60


class Bench:
    """A sandbox with ACCOUNTS logged-in accounts, and a pool of browsers on it."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.sandbox = Sandbox(work_dir / 'sandbox.log')
        self.publisher = None
        self.cookies = []
        self.manager = None
        self.task_numbers = itertools.count()

    def start(self):
        self.sandbox.start()
        self.publisher = SandboxPublisher(self.sandbox.url)
        self.cookies = [parse_cookies(self.sandbox.session_cookies(f'ceiling{n}', secrets.token_hex(8)))
                        for n in range(ACCOUNTS)]
        self.manager = multiprocessing.Manager()

    def stop(self):
        if self.manager is not None:
            self.manager.shutdown()
        self.sandbox.stop()

    def new_pool(self, browsers):
        """A pool of at most `browsers` drivers, all of them allowed to work at once."""
        leases = pool.lease_registry(self.manager, browsers, browsers)
        return pool.DriverPool(leases, namespace=f'ceiling{os.getpid()}', browser_root=str(self.work_dir / 'browsers'))

    def one_task(self, driver_pool, all_acquired=None):
        """Publish one article with a driver of the pool; `all_acquired` (a Barrier) holds
        the driver until every thread has one, so that each thread starts a browser."""
        number = next(self.task_numbers)
        task = {'task_id': f'ceiling-{number}', 'user_id': number % ACCOUNTS, 'platform': 'sandbox', 'attempt': 1,
                'article_title': f'ceiling {os.getpid()} #{number}',
                'article_content': f'Article number {number} of the ceiling benchmark. ' * 4}
        driver = driver_pool.acquire(timeout=ACQUIRE_TIMEOUT)
        try:
            if all_acquired is not None:
                all_acquired.wait(ACQUIRE_TIMEOUT)
            attempt = Attempt(task, report_progress=lambda percent: False, timeout=TASK_TIMEOUT, driver=driver,
                              account={'cookies': self.cookies[number % ACCOUNTS]})
            self.publisher.publish(attempt)
        except BaseException:
            driver_pool.discard(driver)
            raise
        driver_pool.release(driver)

    def cpu_ticks(self, driver_pool):
        """utime+stime of this process, its browsers, the lease manager and the sandbox, in
        clock ticks."""
        own = os.times()
        ticks = round((own.user + own.system) * CLOCK_TICKS)
        helpers = {self.sandbox.process.pid, self.manager._process.pid}
        for proc in list_processes().values():
            if driver_pool.marker.encode() in proc.cmdline or proc.pid in helpers:
                ticks += proc.ticks
        return ticks

    def measure(self, browsers, tasks):
        """`tasks` tasks over `browsers` threads with warm browsers: wall, CPU, busy share."""
        driver_pool = self.new_pool(browsers)
        try:
            all_acquired = threading.Barrier(browsers)
            self.in_threads(browsers, lambda n: self.one_task(driver_pool, all_acquired))
            per_thread = [tasks // browsers + (1 if n < tasks % browsers else 0) for n in range(browsers)]
            machine_before, ticks_before = machine_cpu_ticks(), self.cpu_ticks(driver_pool)
            started = time.monotonic()
            self.in_threads(browsers, lambda n: [self.one_task(driver_pool) for _ in range(per_thread[n])])
            wall = time.monotonic() - started
            cpu = (self.cpu_ticks(driver_pool) - ticks_before) / CLOCK_TICKS
            busy = busy_percent(machine_before, machine_cpu_ticks())
        finally:
            driver_pool.close()
        return {'browsers': browsers, 'tasks': tasks, 'wall_seconds': round(wall, 3),
                'tasks_per_second': round(tasks / wall, 3), 'cpu_seconds_per_task': round(cpu / tasks, 3),
                'machine_cpu_busy_percent': busy}

    @staticmethod
    def in_threads(count, work):
        """work(n) in `count` threads at once, n = 0 .. count - 1; raises if any failed."""
        errors = []

        def run(number):
            try:
                work(number)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(n,), name=f'ceiling-{n}') for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f'{len(errors)} of {count} threads failed; the first: {errors[0]!r}') from errors[0]


def run_once(args):
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-ceiling-'))
    bench = Bench(work_dir)
    try:
        bench.start()
        alone = bench.measure(1, args.alone)
        limit = args.tasks * alone['cpu_seconds_per_task'] / os.cpu_count()
        log(f'  alone: {alone["wall_seconds"] / args.alone:.3f} s and {alone["cpu_seconds_per_task"]} CPU-s '
            f'per task; limit for {args.tasks} tasks {limit:.1f} s')
        figures = {'alone': alone, 'limit_seconds': round(limit, 3), 'by_browsers': {}}
        for browsers in args.concurrency:
            result = bench.measure(browsers, args.tasks)
            result['ratio_to_limit'] = round(result['wall_seconds'] / limit, 3)
            log(f'  {browsers} browsers: {result}')
            figures['by_browsers'][str(browsers)] = result
        best = min(figures['by_browsers'].values(), key=lambda result: result['ratio_to_limit'])
        figures['best'] = {'browsers': best['browsers'], 'ratio_to_limit': best['ratio_to_limit']}
        return figures
    finally:
        bench.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def summary(runs):
    """The medians the ceiling is read by: the limit, the best ratio to it, and per number of
    browsers its wall, CPU per task, ratio and busy share."""
    median = medians(runs, nested=True)
    if not median:
        return {}
    return {'limit_seconds': median['limit_seconds'], 'best_ratio_to_limit': median['best']['ratio_to_limit'],
            'by_browsers': {key: {figure: figures[figure] for figure in MEDIAN_FIGURES if figure in figures}
                            for key, figures in median['by_browsers'].items()}}


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Bare browser work against the limit bench/browser.py uses.')
    parser.add_argument('--runs', type=int, default=3, help='runs, each on fresh browsers (default 3)')
    parser.add_argument('--tasks', type=int, default=100, help='tasks per concurrency (default 100)')
    parser.add_argument('--alone', type=int, default=10, help='tasks one at a time for the limit (default 10)')
    parser.add_argument('--concurrency', default='2,4,6,8',
                        help='comma-separated numbers of browsers working at once (default 2,4,6,8)')
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(',')]
    except ValueError:
        parser.error('--concurrency takes whole numbers separated by commas, e.g. 2,4,6')
    if args.runs < 1 or args.tasks < 1 or args.alone < 1 or not all(1 <= n <= MAX_DRIVERS for n in args.concurrency):
        parser.error(f'--runs, --tasks and --alone must be 1 or more, each --concurrency from 1 to {MAX_DRIVERS}')
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault('SE_OFFLINE', 'true')
    report = {'benchmark': 'ceiling', 'machine': {**machine_facts(), 'loadavg_at_start': os.getloadavg()},
              'settings': {'runs': args.runs, 'tasks': args.tasks, 'alone': args.alone,
                           'concurrency': args.concurrency, 'accounts': ACCOUNTS,
                           'sandbox_publish_latency_ms': PUBLISH_LATENCY_MS}}
    runs = repeat_runs(args.runs, lambda number: run_once(args))
    report['runs'] = runs
    report['median'] = summary(runs)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if all('error' not in run for run in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
