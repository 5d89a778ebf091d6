"""Browser benchmark: how fast TOP_N publishes through real headless Chromium, how close that
comes to what this machine can do, what keeping browsers warm is worth, and the memory it takes.

    .venv/bin/python bench/browser.py --runs 3
    .venv/bin/python bench/browser.py --runs 1 --users 2 --per-user 3 --skip-baseline
    .venv/bin/python bench/browser.py --runs 3 --webdriver-url http://127.0.0.1:4445 --hosts 2

Workload: `--users` users (10) each send one batch of `--per-user` articles (10) to the sandbox
platform, all at once, through the JSON API (`POST /api/publish/create_batch`), with 8 browsers
(TOPN_MAX_DRIVERS=8, 4 workers x 2 slots; of them, at most TOPN_WORKING_PER_CORE per core work
at once) and the sandbox answering each publish after 500 ms (`publish_latency_ms`). Every run
does, each phase on a fresh service and a fresh sandbox:

1. main (TOPN_DRIVER_REUSE=1). The workload starts with no browser running, so browser
   start-up is part of it. `wall_seconds` is max(completed_at) - min(created_at) of its tasks
   (server clock); the sandbox's /api/articles must then hold every title exactly once. Memory
   is sampled every 0.5 s meanwhile. Then, with the browsers warm, single tasks one at a time:
   their median time alone and CPU-seconds (utime+stime over the service, its browsers, the
   sandbox, mysqld and redis-server, from just before the submit until the task's browser is
   back in the pool: through completion, plus the wipe of the browser that follows it, i.e.
   the CPU of the AFTER_COMPLETION_SECONDS after completion minus the idle rate; the mean over
   WARM_PROBES tasks) give the machine's limit for the workload:
       limit_seconds = max(tasks / drivers * warm_task_seconds, tasks * warm_task_cpu_seconds / nproc)
   Every task of the workload must wipe its browser (no user's state may reach the next),
   so that CPU is part of the work; the figures until completion alone are reported too
   (`ratio_to_limit_until_completion`).
2. baseline (TOPN_DRIVER_REUSE=0, unless --skip-baseline): the same workload, a fresh browser
   per task; speedup_vs_fresh_browser = its wall / the main wall.

With `--webdriver-url URL` (a Selenium Grid with TOPN_MAX_DRIVERS free slots, e.g. `python
grid.py standalone --port 4445 --slots 8`) a run compares where the browsers live instead, with
no warm probes and no baseline, each phase on a fresh service and sandbox whose browsers are
first warmed (one task per TOPN_MAX_DRIVERS), in alternating order (odd runs local first, even
runs the Grid phases first, so neither side always runs on the emptier machine):
1. local: the workload through local chromedriver, as above;
2. grid: the same workload with TOPN_WEBDRIVER_URL=URL: every browser is a session at the Grid;
   grid_to_local = its wall / the local wall;
3. grid_two_hosts (`--hosts 2`): the same Grid workload run by two services on one MySQL
   database and Redis key prefix, as two hosts of one installation: TOPN_HOST_ID bench-host-a
   serves the web app, bench-host-b runs `serve --no-web`, each with half of TOPN_WORKERS and of
   TOPN_MAX_DRIVERS (leases are per host, so together they ask for as many browsers as one);
   two_hosts_to_one_host = its wall / the one-host Grid wall.
Both hosts run on this machine, so the second host adds processes, not CPUs: the figure shows
what splitting the service costs or gains, not what a second machine would. Browsers behind the
Grid are the Grid's processes, outside this benchmark's groups (their CPU shows only in the
machine's busy share); the Grid's sessions are sampled instead (`max_grid_sessions`).

The service and the sandbox are started by bench/harness.py (its `Service`, `Sandbox` and
`Client`): `topn.py serve` on a free loopback port with a throwaway MySQL database, Redis key
prefix and browser namespace (TOPN_BROWSER_NAMESPACE), plus temp TOPN_STATE_DIR and
TOPN_BROWSER_ROOT, users from `topn.py adduser`, sandbox logins stored with `topn.py account
set`. The browser marker is {TOPN_BROWSER_ROOT}/{namespace}/: every process the service's
browsers start carries it in its command line. Afterwards the service is stopped (SIGTERM,
then SIGKILL), the sandbox too, the database dropped, the keys deleted, and the processes
still carrying the browser marker are counted (`leftover_browser_processes`) and killed.
Single tasks are watched by reading their row from MySQL (cheaper than the API, so the
measurement adds little CPU); everything else goes through the API.

Prints one JSON object to stdout (per-run figures, medians, settings, machine facts, and a
note on what each figure means); progress goes to stderr; service and sandbox logs stay in a
temp directory. TOPN_* variables in the environment are passed on to the service, except the
ones the benchmark must set itself.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

import pymysql

from harness import (CLOCK_TICKS, MYSQL, MYSQL_NAMES, PUBLISH_LATENCY_MS, REDIS_NAMES, ROOT, SERVICE_DEFAULTS,
                     START_TIMEOUT, TERMINAL, Client, Sandbox, Service, busy_percent, code_under_test, descendants,
                     inherited_settings, is_error_line, list_processes, log, machine_cpu_ticks, machine_facts,
                     medians, percentile, pss_kb, repeat_runs, rss_kb, start_process_group, timestamp)

sys.path.insert(0, str(ROOT))

import grid  # noqa: E402  (the project's modules are importable once ROOT is on the path)

BROWSER_DEFAULTS = {**SERVICE_DEFAULTS, 'TOPN_MAX_DRIVERS': '8', 'TOPN_PACING_SANDBOX': '0'}
SET_BY_BENCHMARK = ('TOPN_DRIVER_REUSE', 'TOPN_SANDBOX_URL', 'TOPN_SANDBOX_BIND', 'TOPN_BROWSER_ROOT',
                    'TOPN_STATE_DIR', 'TOPN_SECRET_KEY', 'TOPN_WEBDRIVER_URL', 'TOPN_HOST_ID')
HOST_IDS = ('bench-host-a', 'bench-host-b')
WARM_UP_TITLE = ' browser warm-up #'  # in the titles of the tasks that start the browsers before a workload
# Each probe's CPU is a sum of 10 ms ticks over a dozen processes, so one probe reads up to
# ~0.1 CPU-s off either way; the CPU figures are the mean over WARM_PROBES (5 probes' median
# moved by 20 % from run to run on unchanged code). What spread is left between runs is the
# shared machine's speed.
WARM_PROBES = 12
PROBE_POLL = 0.025
PROBE_TIMEOUT = 120.0
IDLE_SETTLE_SECONDS = 1.0
IDLE_MEASURE_SECONDS = 3.0
AFTER_COMPLETION_SECONDS = 1.0
SAMPLE_INTERVAL = 0.5
SAMPLER_NICENESS = 19
TIMELINE_STEP = 2.0
PSS_MAX_AGE = 5.0
PSS_REREAD_RSS_KB = 2048
PSS_REREAD_RSS_FRACTION = 0.02
STATUS_POLL = 0.5
LEFTOVER_GRACE = 5.0
GROUPS = ('service', 'browsers', 'sandbox', 'mysql', 'redis')
SERVICE_ROLES = ('supervisor', 'workers', 'manager')
UUID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}')

NOTES = {
    'wall_seconds': 'main workload, browser reuse on: max(completed_at) - min(created_at) over its tasks, '
                    'server timestamps; starts with no browser running',
    'tasks_per_second': 'tasks / wall_seconds',
    'articles_published': "articles the sandbox's /api/articles held after the main workload (want: tasks)",
    'duplicates': 'articles beyond one per title on the sandbox after the main workload (want: 0)',
    'warm_task_seconds': 'median over single tasks run one at a time with warm browsers: created_at -> completed_at',
    'warm_task_cpu_seconds': 'mean over the same single tasks: utime+stime deltas summed over the service '
                             'processes, every process with the browser marker, the sandbox, mysqld and '
                             'redis-server, from just before the submit until the browser is back in the pool '
                             '(CPU until completion was seen, plus details.warm.after_completion_cpu_seconds: '
                             'the wipe every task ends with)',
    'warm_task_cpu_seconds_until_completion': 'the same without the wipe after completion',
    'limit_seconds': 'max(tasks / max_drivers * warm_task_seconds, tasks * warm_task_cpu_seconds / nproc): '
                     'the latency bound of 8 browsers and the CPU bound of this machine',
    'ratio_to_limit': 'wall_seconds / limit_seconds (aim: <= 1.3)',
    'ratio_to_limit_until_completion': 'wall_seconds over the limit computed with '
                                       'warm_task_cpu_seconds_until_completion',
    'fresh_wall_seconds': 'the same workload with TOPN_DRIVER_REUSE=0 (a fresh browser per task)',
    'speedup_vs_fresh_browser': 'fresh_wall_seconds / wall_seconds (aim: >= 3)',
    'peak_pss_mb_service_and_browsers': 'peak, over 0.5 s samples during the main workload, of the PSS summed '
                                        "over the serve process's tree (supervisor, manager, workers) and every "
                                        'process whose command line carries the browser marker (chromedriver, '
                                        'chromium, zygotes, renderers, crashpad) (aim: < 1500)',
    'pss_mb_mysql': 'peak PSS of mysqld/mariadbd during the main workload: shared with every other user of '
                    'this machine, not only this benchmark',
    'pss_mb_redis': 'peak PSS of redis-server during the main workload: shared with every other user of '
                    'this machine, not only this benchmark',
    'pss_mb_sandbox': 'peak PSS of the sandbox process during the main workload; not in the service figure, it '
                      'stands in for a remote platform',
    'leftover_browser_processes': f'processes with the browser marker still alive {LEFTOVER_GRACE:g} s after '
                                  'the service stopped, over both phases (want: 0; they are killed afterwards)',
    'loadavg': 'the 1-minute load average when the run started and ended: the machine is shared, other '
               'sessions run browsers too',
    'details.*.cpu_seconds_by_group': 'CPU-seconds each group used during the workload (sampled every 0.5 s; '
                                      'a process that exits loses its last <= 0.5 s)',
    'details.*.service_cpu_seconds_by_process': 'the service group split: supervisor (web app, reaper), '
                                                'workers (their Selenium clients), manager (the lease registry)',
    'details.*.machine_cpu_busy_percent': 'all CPUs of the machine, from /proc/stat, over the workload, '
                                          'including other users of the machine',
    'limit_latency_bound_seconds / limit_cpu_bound_seconds': 'the two terms of limit_seconds',
    'details.*.mean_concurrency': 'sum of task run times (started_at -> completed_at) / wall_seconds',
    'details.*.running_tasks_by_second': f'mean running tasks in each {TIMELINE_STEP:g} s from the first '
                                         'submit: the ramp-up, the steady state and the tail',
    'details.*.task_run_seconds_*': 'started_at -> completed_at of the tasks, waiting for a browser (cap, '
                                    'start-up) included',
    'details.*.failed_attempts': 'attempts that did not succeed, by outcome and first line of their error; '
                                 'failed_attempt_seconds_p50 is how long they ran, retry_wait_seconds_p50 the '
                                 'gap before the next attempt of the same task',
    'details.*.browsers_started': 'browser profile folders seen in command lines during the workload',
    'details.*.max_live_drivers': 'most chromedriver processes of this service alive at one sample',
    'details.*.pss_reads / sampler_cpu_seconds': 'smaps_rollup readings taken (a process whose RSS barely '
                                                 'moved keeps its reading up to 5 s) and the CPU the sampler '
                                                 'itself used: measurement load on the same machine (its '
                                                 f'thread runs at nice {SAMPLER_NICENESS}, so it yields to the '
                                                 'system it measures)',
    'details.*.before_publish_s / after_publish_s': "started_at -> the sandbox's article created_at (log in, "
                                                    'fill, click, confirm, 0.5 s platform latency), then -> '
                                                    'completed_at (article page check, recording)',
    'details.warm.idle_cpu_per_second': 'CPU-seconds per second used with warm browsers and no task, by group',
    'details.warm.after_completion_cpu_seconds': f'CPU in the {AFTER_COMPLETION_SECONDS:g} s after a single '
                                                 'task completed, minus the idle rate: mostly the wipe of its '
                                                 'browser before it goes back to the pool',
}

GRID_NOTES = {
    'local_wall_seconds': 'the workload through local chromedriver (as wall_seconds without --webdriver-url): '
                          'max(completed_at) - min(created_at) over its tasks; starts with the browsers warm',
    'grid_wall_seconds': 'the same workload on a fresh service whose browsers are sessions at the Grid '
                         '(TOPN_WEBDRIVER_URL); starts with its sessions open and warm',
    'grid_to_local': 'grid_wall_seconds / local_wall_seconds, within one run',
    'grid_two_hosts_wall_seconds': 'the same Grid workload sent to one service but run by two: bench-host-a '
                                   '(web app and half the workers and TOPN_MAX_DRIVERS) and bench-host-b '
                                   '(serve --no-web, the other half), one MySQL database and Redis prefix',
    'two_hosts_to_one_host': 'grid_two_hosts_wall_seconds / grid_wall_seconds, within one run',
    '*_max_concurrency': 'most tasks running at one moment in that phase',
    '*_machine_cpu_busy_percent': 'all CPUs of the machine over the workload, /proc/stat: the Grid, its browsers '
                                  'and other users of the machine included',
    '*_cpu_seconds_service': 'CPU-seconds of the serve processes (all hosts) over the workload',
    'working limit': 'local browsers work at most TOPN_WORKING_PER_CORE per core at once; remote ones up to '
                     'TOPN_MAX_DRIVERS (pool.working_limit): the Grid phases may run more tasks at once',
    'details.*.browsers / pss': "the Grid's browsers are the Grid's processes, in no group of this benchmark: "
                                'the browsers group and its memory are empty in the Grid phases',
    'details.*.max_grid_sessions': 'most sessions the Grid held at one 0.5 s sample',
    'grid_sessions_left': f'sessions still at the Grid {LEFTOVER_GRACE:g} s after a service stopped, over the '
                          'phases (want: 0; they are ended afterwards)',
    'duplicates / tasks_not_succeeded / retries': 'summed over the phases of the run',
}


# -- processes ------------------------------------------------------------------------------

class ProcessGroups:
    """Sorts the machine's processes into the groups this benchmark reports: `browsers` (the
    browser marker in the command line, wherever the process hangs in the tree), `service`
    (the rest of the trees of the serve processes, one per host), `sandbox`, `mysql` and
    `redis`. Browsers behind a Grid belong to the Grid's process, in no group."""

    def __init__(self, serve_pids, marker, sandbox_pid):
        self.serve_pids = serve_pids
        self.marker = marker.encode()
        self.sandbox_pid = sandbox_pid
        self.folder = re.compile(re.escape(self.marker) + rb'w\d+/\d+/')

    def classify(self, processes):
        """{pid: group} of the processes that belong to a group."""
        tree = set().union(*(descendants(pid, processes) for pid in self.serve_pids))
        sandbox = descendants(self.sandbox_pid, processes)
        groups = {}
        for pid, proc in processes.items():
            if self.marker in proc.cmdline:
                groups[pid] = 'browsers'
            elif pid in tree:
                groups[pid] = 'service'
            elif pid in sandbox:
                groups[pid] = 'sandbox'
            elif proc.comm in MYSQL_NAMES:
                groups[pid] = 'mysql'
            elif proc.comm in REDIS_NAMES:
                groups[pid] = 'redis'
        return groups

    def cpu_snapshot(self, processes=None):
        """{(pid, start time): (group, ticks)} of the grouped processes."""
        processes = list_processes() if processes is None else processes
        return {(pid, processes[pid].start): (group, processes[pid].ticks)
                for pid, group in self.classify(processes).items()}

    def service_role(self, proc):
        """Which of the service's processes this is: the supervisor (which also serves the web
        app and runs the reaper), a worker, or the lease manager."""
        if proc.pid in self.serve_pids:
            return 'supervisor'
        return 'workers' if proc.comm == 'topn-worker' else 'manager'

    def browser_folders(self, processes):
        return {match.group() for proc in processes.values() for match in self.folder.finditer(proc.cmdline)}


def cpu_delta(before, after, groups=GROUPS):
    """CPU-seconds by group between two snapshots. A process born in between counts whole; one
    that exited in between is lost (counted in `exited`)."""
    seconds = dict.fromkeys(groups, 0.0)
    for key, (group, ticks) in after.items():
        seconds[group] += (ticks - before.get(key, (group, 0))[1]) / CLOCK_TICKS
    return {'by_group': {g: round(s, 3) for g, s in seconds.items()}, 'total': round(sum(seconds.values()), 3),
            'appeared': len(after.keys() - before.keys()), 'exited': len(before.keys() - after.keys())}


def find_marked(marker):
    needle = marker.encode()
    return [proc.pid for proc in list_processes().values() if needle in proc.cmdline and proc.pid != os.getpid()]


class Sampler(threading.Thread):
    """Every SAMPLE_INTERVAL: PSS by group, live drivers, browser folders and CPU ticks per process.

    Reading smaps_rollup is not cheap (~3-7 ms per Chromium process, 10 ms for mysqld; with 8
    browsers ~0.15 CPU-s a sample, a tenth of a 2-core machine at 0.5 s), so a process's PSS is
    read again only when it is new, its RSS (from statm, cheap) moved by more than
    PSS_REREAD_RSS_KB or PSS_REREAD_RSS_FRACTION, or its last reading is older than
    PSS_MAX_AGE; otherwise its last reading stands in. A sample whose service-and-browsers sum
    looks like a new peak has those processes read again before it counts, so that peak is
    always a sum of readings taken in one sample.
    """

    def __init__(self, groups, grid_url=None):
        super().__init__(name='sampler', daemon=True)
        self.groups = groups
        self.grid_url = grid_url
        self.max_grid_sessions = None
        self.stopping = threading.Event()
        self.samples = 0
        self.pss_reads = 0
        self.pss_cache = {}
        self.peak_kb = dict.fromkeys(GROUPS, 0)
        self.peak_service_and_browsers_kb = 0
        self.at_peak_kb = {}
        self.max_live_drivers = 0
        self.folders = set()
        self.first_ticks, self.last_ticks = {}, {}
        self.own_cpu_seconds = 0.0
        self.machine_busy_percent = None
        self._machine_start = machine_cpu_ticks()

    def run(self):
        # The sampler is the benchmark's instrument, not part of the system it measures: on a
        # saturated 2-core machine its smaps_rollup reads (~3 CPU-seconds a workload) would
        # otherwise take turns from the browsers. Its samples may come a little late instead.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAMPLER_NICENESS)
        started = time.thread_time()
        while not self.stopping.wait(SAMPLE_INTERVAL):
            self.sample()
        self.own_cpu_seconds = time.thread_time() - started

    def stop(self):
        self.stopping.set()
        self.join()
        self.sample()
        self.machine_busy_percent = busy_percent(self._machine_start, machine_cpu_ticks())

    def sample(self):
        processes = list_processes()
        grouped = {(pid, processes[pid].start): group for pid, group in self.groups.classify(processes).items()}
        for key, group in grouped.items():
            if group == 'service':
                group = self.groups.service_role(processes[key[0]])
            self.first_ticks.setdefault(key, (group, processes[key[0]].ticks if self.samples == 0 else 0))
            self.last_ticks[key] = (group, processes[key[0]].ticks)
        self.pss_cache = {key: self.pss_cache[key] for key in grouped if key in self.pss_cache}
        kb = self._pss_by_group(grouped, fresh=False)
        if kb['service'] + kb['browsers'] > self.peak_service_and_browsers_kb:
            kb = self._pss_by_group(grouped, fresh=True)
        self.samples += 1
        for group in GROUPS:
            self.peak_kb[group] = max(self.peak_kb[group], kb[group])
        if kb['service'] + kb['browsers'] > self.peak_service_and_browsers_kb:
            self.peak_service_and_browsers_kb = kb['service'] + kb['browsers']
            self.at_peak_kb = kb
        self.max_live_drivers = max(self.max_live_drivers, sum(
            1 for (pid, _), group in grouped.items() if group == 'browsers' and processes[pid].comm == 'chromedriver'))
        self.folders |= self.groups.browser_folders({pid: processes[pid] for pid, _ in grouped})
        if self.grid_url:
            with contextlib.suppress(OSError):
                self.max_grid_sessions = max(self.max_grid_sessions or 0, len(grid.live_sessions(self.grid_url)))

    def _pss_by_group(self, grouped, fresh):
        """PSS sums by group; `fresh` reads every process not already read in this sample."""
        now = time.monotonic()
        kb = dict.fromkeys(GROUPS, 0)
        for key, group in grouped.items():
            cached = self.pss_cache.get(key)
            if fresh:
                stale = group in ('service', 'browsers') and cached[3] != self.samples
            else:
                rss = rss_kb(key[0])
                stale = cached is None or now - cached[2] > PSS_MAX_AGE or abs(rss - cached[1]) > max(
                    PSS_REREAD_RSS_KB, cached[1] * PSS_REREAD_RSS_FRACTION)
            if stale:
                cached = self.pss_cache[key] = (pss_kb(key[0]), rss_kb(key[0]) if fresh else rss, now, self.samples)
                self.pss_reads += 1
            kb[group] += cached[0]
        return kb

    def figures(self):
        by_role = cpu_delta(self.first_ticks, self.last_ticks, GROUPS + SERVICE_ROLES)['by_group']
        roles = {role: by_role.pop(role) for role in SERVICE_ROLES}
        cpu = {**by_role, 'service': round(sum(roles.values()), 3)}
        return {
            'peak_pss_mb_service_and_browsers': mb(self.peak_service_and_browsers_kb),
            'pss_mb_at_peak': {'service': mb(self.at_peak_kb.get('service', 0)),
                               'browsers': mb(self.at_peak_kb.get('browsers', 0))},
            'pss_mb_mysql': mb(self.peak_kb['mysql']),
            'pss_mb_redis': mb(self.peak_kb['redis']),
            'pss_mb_sandbox': mb(self.peak_kb['sandbox']),
            'max_live_drivers': self.max_live_drivers,
            'max_grid_sessions': self.max_grid_sessions,
            'browsers_started': len(self.folders),
            'cpu_seconds_by_group': cpu,
            'service_cpu_seconds_by_process': roles,
            'cpu_seconds_total': round(sum(cpu.values()), 2),
            'machine_cpu_busy_percent': self.machine_busy_percent,
            'memory_samples': self.samples,
            'pss_reads': self.pss_reads,
            'sampler_cpu_seconds': round(self.own_cpu_seconds, 2),
        }


def mb(kb):
    return round(kb / 1024, 1)


# -- one phase: a fresh service and sandbox, the workload, the figures --------------------------

class Phase:
    """Everything one service instance needs: its sandbox, temp dirs, users and their logins;
    its browsers behind `webdriver_url` if given, and with `hosts` 2 a second host beside it."""

    def __init__(self, name, reuse, args, log_dir, webdriver_url=None, hosts=1):
        self.name = name
        self.args = args
        self.webdriver_url = webdriver_url
        self.work_dir = pathlib.Path(tempfile.mkdtemp(prefix=f'topn-bench-browser-{name}-'))
        self.sandbox = Sandbox(log_dir / f'{name}-sandbox.log')
        self.settings = {**service_settings(), 'TOPN_DRIVER_REUSE': '1' if reuse else '0',
                         'TOPN_SECRET_KEY': secrets.token_hex(16), 'TOPN_STATE_DIR': str(self.work_dir / 'state'),
                         'TOPN_BROWSER_ROOT': str(self.work_dir / 'browsers'),
                         'TOPN_SANDBOX_URL': self.sandbox.url, 'TOPN_SANDBOX_BIND': f'127.0.0.1:{self.sandbox.port}'}
        if webdriver_url:
            self.settings['TOPN_WEBDRIVER_URL'] = webdriver_url
        self.extra_hosts = []
        if hosts == 2:
            self.settings, second = split_between_hosts(self.settings, self.work_dir)
            self.service = Service(self.settings, log_dir / f'{name}-service.log')
            self.extra_hosts.append(SecondHost(self.service, second, log_dir / f'{name}-service-b.log'))
        else:
            self.service = Service(self.settings, log_dir / f'{name}-service.log')
        self.marker = os.path.join(self.settings['TOPN_BROWSER_ROOT'], self.service.namespace) + '/'
        self.client = Client(self.service.url)
        self.tag = secrets.token_hex(3)
        self.leftover = None
        self.stop_seconds = None

    def start(self):
        self.sandbox.start()
        self.service.start()
        for host in self.extra_hosts:
            host.start()
        self.groups = ProcessGroups([service.process.pid for service in self.services()], self.marker,
                                    self.sandbox.process.pid)

    def services(self):
        return [self.service] + self.extra_hosts

    def add_users(self, names):
        """TOP_N users, each with a sandbox account whose session is stored as its login. {name: token}."""
        tokens = self.service.add_users(names)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            list(pool.map(self.store_login, names))
        return dict(zip(names, tokens))

    def store_login(self, name):
        cookies = self.sandbox.session_cookies(name, secrets.token_hex(8))
        self.service.command(f'account set {name} sandbox', 'account', 'set', name, 'sandbox', '--cookies', cookies)

    def stop(self):
        """Stop the service and the sandbox, count and kill leftover browser processes, and
        remove the database, the Redis keys and the temp dirs. Safe to call after a failure."""
        started = time.monotonic()
        try:
            for service in reversed(self.services()):
                service.stop()
            self.stop_seconds = round(time.monotonic() - started, 1)
            self.leftover = self._leftover_browser_processes()
        finally:
            try:
                self.sandbox.stop()
            finally:
                self.service.clean_up()
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def _leftover_browser_processes(self):
        """Zygotes may linger ~2 s after the service stopped; whatever outlives the grace is
        counted, reported and killed by pid."""
        deadline = time.monotonic() + LEFTOVER_GRACE
        while (pids := find_marked(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            log(f'  {len(pids)} browser processes of {self.marker} outlived the service; killed them')
        return len(pids)

    def log_summary(self):
        """Warnings and errors in the service log, the most frequent messages first."""
        logged = [service for service in self.services() if service.log_path.exists()]
        if not logged:
            return None
        lines = [line for service in logged for line in service.logged_lines()]
        messages = collections.Counter()
        for line in lines:
            if ' WARNING ' in line or is_error_line(line):
                text = line.split(' ', 2)[2] if line[:4].isdigit() else line
                messages[UUID.sub('<id>', text)[:300]] += 1
        return {'warnings': sum(' WARNING ' in line for line in lines),
                'errors': sum(map(is_error_line, lines)),
                'top_messages': [{'count': n, 'message': m} for m, n in messages.most_common(8)]}


def split_between_hosts(settings, work_dir):
    """The settings of two hosts sharing one installation: each with half of TOPN_WORKERS and of
    TOPN_MAX_DRIVERS (the leases are per host, so the pair still asks the Grid for as many
    browsers as one host), a TOPN_HOST_ID, a state dir and a browser root of its own."""
    workers, drivers = int(settings['TOPN_WORKERS']), int(settings['TOPN_MAX_DRIVERS'])
    first = {**settings, 'TOPN_HOST_ID': HOST_IDS[0], 'TOPN_WORKERS': str(workers - workers // 2),
             'TOPN_MAX_DRIVERS': str(drivers - drivers // 2)}
    second = {**settings, 'TOPN_HOST_ID': HOST_IDS[1], 'TOPN_WORKERS': str(workers // 2),
              'TOPN_MAX_DRIVERS': str(drivers // 2), 'TOPN_STATE_DIR': str(work_dir / 'state-b'),
              'TOPN_BROWSER_ROOT': str(work_dir / 'browsers-b')}
    return first, second


class SecondHost(Service):
    """`topn.py serve --no-web` on another service's MySQL database and Redis key prefix: a
    second host of the same installation, workers and reaper only. The first service's
    clean-up removes the database and keys they share."""

    def __init__(self, first, settings, log_path):
        super().__init__(settings, log_path)
        self.database, self.prefix, self.namespace = first.database, first.prefix, first.namespace
        self.url = None
        self.env.update({'TOPN_MYSQL_URL': first.env['TOPN_MYSQL_URL'], 'TOPN_REDIS_PREFIX': first.prefix,
                         'TOPN_BROWSER_NAMESPACE': first.namespace})

    def start(self):
        """Start it and wait until its supervisor holds its row in `hosts`: it has no web app to ask."""
        self.process = start_process_group([sys.executable, 'topn.py', 'serve', '--no-web'], self.log_path, self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while self._registered_pid() != self.process.pid:
            if self.process.poll() is not None:
                raise RuntimeError(f'the second host exited with {self.process.returncode}; see {self.log_path}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'the second host did not register in {START_TIMEOUT:g} s; see {self.log_path}')
            time.sleep(0.1)

    def _registered_pid(self):
        conn = pymysql.connect(**MYSQL, database=self.database, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute('SELECT pid FROM hosts WHERE host_id = %s AND stopped_at IS NULL',
                            (self.env['TOPN_HOST_ID'],))
                row = cur.fetchone()
                return row[0] if row else None
        finally:
            conn.close()

    def clean_up(self):
        pass


def article_body(title):
    text = f'This is the body of "{title}", published by the TOP_N browser benchmark. '
    return f'## {title}\n\n' + (text * 3)[:200] + '\n\n**The end.**'




def submit_workload(phase, tokens):
    """Every user sends its batch at the same moment. {token: [task ids]}."""
    go = threading.Barrier(len(tokens))

    def submit(item):
        name, token = item
        titles = [f'{phase.name}-{phase.tag} {name} #{i}' for i in range(phase.args.per_user)]
        articles = [{'title': title, 'content': article_body(title)} for title in titles]
        go.wait()
        return token, phase.client.submit(token, 'sandbox', articles)

    with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
        return dict(pool.map(submit, tokens.items()))


def wait_until_finished(client, task_ids, timeout):
    """Poll one user at a time (the first with unfinished tasks) until every task is success,
    failed or cancelled. Raises TimeoutError with the statuses seen."""
    deadline = time.monotonic() + timeout
    pending = list(task_ids.items())
    while pending:
        token, ids = pending[0]
        rows = client.task_rows(token, ids)
        if all(row['status'] in TERMINAL for row in rows):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            statuses = collections.Counter(row['status'] for row in rows)
            raise TimeoutError(f'{len(pending)} users still had unfinished tasks after {timeout:g} s '
                               f'(the first of them: {dict(statuses)})')
        time.sleep(STATUS_POLL)


def run_workload(phase, tokens):
    """The measured workload on a service with no browser running yet; figures from the task
    rows, the sandbox and the sampler."""
    tasks = len(tokens) * phase.args.per_user
    sampler = Sampler(phase.groups, phase.webdriver_url)
    sampler.sample()
    sampler.start()
    load_before = os.getloadavg()[0]
    log(f'  {phase.name}: submitting {tasks} tasks from {len(tokens)} users')
    try:
        task_ids = submit_workload(phase, tokens)
        wait_until_finished(phase.client, task_ids, timeout=120 + 6 * tasks)
    finally:
        sampler.stop()
    rows_by_token = {token: phase.client.task_rows(token, ids) for token, ids in task_ids.items()}
    rows = [row for token_rows in rows_by_token.values() for row in token_rows]
    articles = [article for article in phase.sandbox.articles() if WARM_UP_TITLE not in article['title']]
    figures = {**task_figures(rows), **article_figures(articles, rows), **timeline_figures(rows, articles),
               **retry_figures(phase.client, rows_by_token),
               **sampler.figures(), 'loadavg_1m_during': [round(load_before, 2), round(os.getloadavg()[0], 2)],
               'refusals': {str(status): n for status, n in phase.client.refusals.items()}}
    figures['cpu_seconds_per_task'] = round(figures['cpu_seconds_total'] / tasks, 3)
    log(f'  {phase.name}: {figures["tasks_succeeded"]}/{tasks} succeeded in {figures["wall_seconds"]} s, '
        f'{figures["articles_published"]} articles, peak PSS {figures["peak_pss_mb_service_and_browsers"]} MB')
    return figures


def task_figures(rows):
    succeeded = [row for row in rows if row['status'] == 'success']
    figures = {'tasks': len(rows), 'tasks_succeeded': len(succeeded),
               'tasks_not_succeeded': {row['task_id']: f'{row["status"]}: {row["error_message"]}'
                                       for row in rows if row['status'] != 'success'},
               'retries': sum(row['retry_count'] for row in rows),
               'tasks_retried': sum(1 for row in rows if row['retry_count'])}
    if not succeeded:
        return {**figures, 'wall_seconds': None, 'tasks_per_second': None}
    created = [timestamp(row['created_at']) for row in rows]
    wall = max(timestamp(row['completed_at']) for row in succeeded) - min(created)
    runs = [timestamp(row['completed_at']) - timestamp(row['started_at']) for row in succeeded]
    dispatch = [timestamp(row['started_at']) - timestamp(row['created_at']) for row in succeeded]
    return {**figures, 'wall_seconds': round(wall, 3), 'tasks_per_second': round(len(succeeded) / wall, 3),
            'task_run_seconds_p50': round(percentile(runs, 50), 3),
            'task_run_seconds_p90': round(percentile(runs, 90), 3),
            'task_run_seconds_max': round(max(runs), 3),
            'dispatch_wait_seconds_p50': round(percentile(dispatch, 50), 3),
            'dispatch_wait_seconds_max': round(max(dispatch), 3),
            'mean_concurrency': round(sum(runs) / wall, 2), 'max_concurrency': max_overlap(succeeded)}


def retry_figures(client, rows_by_token):
    """What the attempts that did not succeed ended with, and the time they cost."""
    outcomes, spent, gaps = collections.Counter(), [], []
    for token, rows in rows_by_token.items():
        for row in rows:
            if not row['retry_count']:
                continue
            status, answer, _ = client.call('GET', f'/api/publish/tasks/{row["task_id"]}', token)
            if status != 200:
                raise RuntimeError(f'the task detail answered {status}: {answer}')
            attempts = answer['task']['attempts']
            for attempt, following in zip(attempts, attempts[1:]):
                error = UUID.sub('<id>', (attempt['error'] or '').splitlines()[0] if attempt['error'] else '')
                outcomes[f'{attempt["outcome"]}: {error[:200]}'] += 1
                spent.append(timestamp(attempt['ended_at']) - timestamp(attempt['started_at']))
                gaps.append(timestamp(following['started_at']) - timestamp(attempt['ended_at']))
    if not spent:
        return {'failed_attempts': {}}
    return {'failed_attempts': dict(outcomes.most_common()),
            'failed_attempt_seconds_p50': round(statistics.median(spent), 3),
            'retry_wait_seconds_p50': round(statistics.median(gaps), 3)}


def max_overlap(rows):
    events = sorted([(timestamp(row['started_at']), 1) for row in rows] +
                    [(timestamp(row['completed_at']), -1) for row in rows], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def article_figures(articles, rows):
    titles = collections.Counter(article['title'] for article in articles)
    expected = {row['article_title'] for row in rows}
    return {'articles_published': len(articles), 'duplicates': sum(n - 1 for n in titles.values()),
            'articles_missing': len(expected - titles.keys()), 'articles_unexpected': len(titles.keys() - expected),
            'articles_ok': len(articles) == len(rows) and titles.keys() == expected and max(titles.values()) == 1}


def timeline_figures(rows, articles):
    """Where a task's time goes, split at the moment the sandbox stored the article."""
    stored = {article['title']: timestamp(article['created_at']) for article in articles}
    before, after = [], []
    for row in rows:
        if row['status'] == 'success' and row['article_title'] in stored:
            before.append(stored[row['article_title']] - timestamp(row['started_at']))
            after.append(timestamp(row['completed_at']) - stored[row['article_title']])
    if not before:
        return {}
    return {'before_publish_s_p50': round(statistics.median(before), 3),
            'after_publish_s_p50': round(statistics.median(after), 3),
            'running_tasks_by_second': running_by_second(rows)}


def running_by_second(rows, step=TIMELINE_STEP):
    """Mean number of running tasks in each `step` seconds from the first submit: where the
    batch ramps up, runs full, or idles."""
    start = min(timestamp(row['created_at']) for row in rows)
    spans = [(timestamp(row['started_at']) - start, timestamp(row['completed_at']) - start)
             for row in rows if row['started_at'] and row['completed_at']]
    end = max(stop for _, stop in spans)
    buckets = []
    for first in range(0, int(end / step) + 1):
        low, high = first * step, (first + 1) * step
        busy = sum(max(0.0, min(stop, high) - max(begin, low)) for begin, stop in spans)
        buckets.append(round(busy / step, 1))
    return buckets


# -- single warm tasks --------------------------------------------------------------------------

def measure_warm_tasks(phase, token):
    """WARM_PROBES single tasks, one at a time, on the warm pool: time alone, CPU-seconds."""
    db = pymysql.connect(**MYSQL, database=phase.service.database, autocommit=True, connect_timeout=5)
    try:
        time.sleep(IDLE_SETTLE_SECONDS)
        before = phase.groups.cpu_snapshot()
        time.sleep(IDLE_MEASURE_SECONDS)
        idle = cpu_delta(before, phase.groups.cpu_snapshot())
        idle_rate = {group: seconds / IDLE_MEASURE_SECONDS for group, seconds in idle['by_group'].items()}
        probes = [warm_probe(phase, token, db, number, idle_rate) for number in range(WARM_PROBES)]
    finally:
        db.close()
    stored = {article['title']: timestamp(article['created_at']) for article in phase.sandbox.articles()}
    for probe in probes:
        row = probe.pop('row')
        if row['status'] == 'success' and row['article_title'] in stored:
            probe['before_publish_s'] = round(stored[row['article_title']] - timestamp(row['started_at']), 3)
            probe['after_publish_s'] = round(timestamp(row['completed_at']) - stored[row['article_title']], 3)
            probe['dispatch_wait_s'] = round(timestamp(row['started_at']) - timestamp(row['created_at']), 3)
    succeeded = [probe for probe in probes if probe['status'] == 'success']
    if not succeeded:
        raise RuntimeError(f'no single warm task succeeded: {probes}')
    return {
        'warm_task_seconds': round(statistics.median(p['seconds'] for p in succeeded), 3),
        'warm_task_cpu_seconds': round(statistics.mean(
            p['cpu']['total'] + p['after_completion_cpu_seconds'] for p in succeeded), 3),
        'warm_task_cpu_seconds_until_completion': round(statistics.mean(p['cpu']['total'] for p in succeeded), 3),
        'warm_task_cpu_seconds_by_group': {g: round(statistics.mean(p['cpu']['by_group'][g] for p in succeeded), 3)
                                           for g in GROUPS},
        'after_completion_cpu_seconds': round(
            statistics.mean(p['after_completion_cpu_seconds'] for p in succeeded), 3),
        **{f'{part}_p50': round(statistics.median(p[part] for p in succeeded if part in p), 3)
           for part in ('dispatch_wait_s', 'before_publish_s', 'after_publish_s') if any(part in p for p in succeeded)},
        'idle_cpu_per_second': {g: round(rate, 3) for g, rate in idle_rate.items()},
        'probes': probes,
        'probes_that_started_a_browser': sum(p['started_a_browser'] for p in probes),
    }


def warm_probe(phase, token, db, number, idle_rate):
    folders_before = browser_folders_on_disk(phase.marker)
    title = f'{phase.name}-{phase.tag} warm #{number}'
    snapshot_before = phase.groups.cpu_snapshot()
    task_id, = phase.client.submit(token, 'sandbox', [{'title': title, 'content': article_body(title)}])
    status = wait_for_row(db, task_id)
    snapshot_after = phase.groups.cpu_snapshot()
    time.sleep(AFTER_COMPLETION_SECONDS)
    tail = cpu_delta(snapshot_after, phase.groups.cpu_snapshot())
    row, = phase.client.task_rows(token, [task_id])
    seconds = timestamp(row['completed_at']) - timestamp(row['created_at']) if status == 'success' else None
    cpu = cpu_delta(snapshot_before, snapshot_after)
    idle_during_tail = sum(idle_rate.values()) * AFTER_COMPLETION_SECONDS
    return {'status': status, 'seconds': round(seconds, 3) if seconds is not None else None, 'cpu': cpu,
            'after_completion_cpu_seconds': round(tail['total'] - idle_during_tail, 3),
            'started_a_browser': bool(browser_folders_on_disk(phase.marker) - folders_before),
            'retries': row['retry_count'], 'row': row}


def wait_for_row(db, task_id):
    """Poll the task's row in MySQL until it is finished; returns its status."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    with db.cursor() as cur:
        while True:
            cur.execute('SELECT status FROM publish_tasks WHERE task_id = %s', (task_id,))
            status = cur.fetchone()[0]
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f'the single task {task_id} was still {status} after {PROBE_TIMEOUT:g} s')
            time.sleep(PROBE_POLL)


def browser_folders_on_disk(marker):
    """The browser profile folders of every worker ({marker}w{pid}/{n}/) that exist now."""
    try:
        return {f'{worker}/{n}' for worker in os.listdir(marker) for n in os.listdir(os.path.join(marker, worker))}
    except OSError:
        return set()


# -- runs ----------------------------------------------------------------------------------------

def run_phase(name, reuse, args, log_dir, warm, webdriver_url=None, hosts=1, warm_browsers=False):
    if webdriver_url:
        require_free_grid(webdriver_url, int(service_settings()['TOPN_MAX_DRIVERS']))
    phase = Phase(name, reuse, args, log_dir, webdriver_url, hosts)
    where = f'browsers at {webdriver_url}, {hosts} host(s)' if webdriver_url else 'local browsers'
    log(f'  {name}: starting the sandbox and the service (TOPN_DRIVER_REUSE={int(reuse)}, {where})')
    try:
        phase.start()
        names = [f'user{i}' for i in range(args.users)]
        tokens = phase.add_users(names + (['probe'] if warm else []) + (['warmup'] if warm_browsers else []))
        probe_token = tokens.pop('probe', None)
        warmup_token = tokens.pop('warmup', None)
        browsers_at_submit = start_browsers(phase, warmup_token) if warm_browsers else None
        figures = run_workload(phase, tokens)
        figures['browsers_at_submit'] = browsers_at_submit
        if warm:
            log(f'  {name}: {WARM_PROBES} single tasks on warm browsers')
            figures['warm'] = measure_warm_tasks(phase, probe_token)
    finally:
        log(f'  {name}: stopping the service and cleaning up')
        phase.stop()
    figures['service_stop_seconds'] = phase.stop_seconds
    figures['leftover_browser_processes'] = phase.leftover
    if webdriver_url:
        figures['grid_sessions_left'] = end_grid_sessions_left(webdriver_url)
    figures['service_log'] = phase.log_summary()
    return figures


def start_browsers(phase, token):
    """Warm the browsers before the workload: one sandbox task per TOPN_MAX_DRIVERS from a user
    of its own, waited for. A pool behind a Grid opens its sessions before any task is there,
    so without this only the local phase would pay for starting browsers. Returns how many
    browsers are open then: local chromedrivers, or sessions at the Grid."""
    count = int(service_settings()['TOPN_MAX_DRIVERS'])
    titles = [f'{phase.name}-{phase.tag}{WARM_UP_TITLE}{i}' for i in range(count)]
    log(f'  {phase.name}: warming the browsers with {count} tasks')
    task_ids = phase.client.submit(token, 'sandbox', [{'title': title, 'content': article_body(title)}
                                                      for title in titles])
    wait_until_finished(phase.client, {token: task_ids}, timeout=120 + 6 * count)
    if phase.webdriver_url:
        return len(grid.live_sessions(phase.webdriver_url))
    marker = phase.marker.encode()
    return sum(1 for proc in list_processes().values() if proc.comm == 'chromedriver' and marker in proc.cmdline)


def require_free_grid(url, drivers):
    """The Grid answers with at least `drivers` free slots, or the comparison means nothing."""
    try:
        free = grid.free_slots(url)
    except OSError as error:
        raise RuntimeError(f'no Selenium Grid answers at {url} ({error}): start one with '
                           f'`python grid.py standalone --port PORT --slots {drivers}`') from None
    if free < drivers:
        raise RuntimeError(f'the Grid at {url} has {free} free slots; the workload wants {drivers} '
                           f'(TOPN_MAX_DRIVERS): give it --slots {drivers} and no other users')


def end_grid_sessions_left(url):
    """Sessions still at the Grid LEFTOVER_GRACE s after the service stopped (want: 0): counted,
    then ended, so that the next phase finds every slot free."""
    deadline = time.monotonic() + LEFTOVER_GRACE
    while (sessions := grid.live_sessions(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for session_id in sessions:
        grid.end_session(url, session_id)
    if sessions:
        log(f'  {len(sessions)} sessions outlived the service at the Grid; ended them')
    return len(sessions)


def run_once_with_grid(number, args, log_dir):
    """The workload through local chromedriver, through the Grid at --webdriver-url and (--hosts 2)
    through the Grid from two hosts, in that order on odd runs and the reverse on even ones; each
    phase on a fresh service and sandbox."""
    load_start = os.getloadavg()[0]
    plans = {'local': dict(name=f'local{number}'),
             'grid': dict(name=f'grid{number}', webdriver_url=args.webdriver_url)}
    if args.hosts == 2:
        plans['grid_two_hosts'] = dict(name=f'grid2h{number}', webdriver_url=args.webdriver_url, hosts=2)
    order = list(plans) if number % 2 else list(reversed(plans))
    phases = {phase: run_phase(reuse=True, args=args, log_dir=log_dir, warm=False, warm_browsers=True, **plans[phase])
              for phase in order}
    walls = {name: phase['wall_seconds'] for name, phase in phases.items()}
    figures = {'local_wall_seconds': walls['local'], 'grid_wall_seconds': walls['grid'],
               'grid_to_local': ratio(walls['grid'], walls['local'])}
    if args.hosts == 2:
        figures['grid_two_hosts_wall_seconds'] = walls['grid_two_hosts']
        figures['two_hosts_to_one_host'] = ratio(walls['grid_two_hosts'], walls['grid'])
    for name, phase in phases.items():
        figures[f'{name}_browsers_at_submit'] = phase['browsers_at_submit']
        figures[f'{name}_articles_ok'] = phase['articles_ok']
        figures[f'{name}_max_concurrency'] = phase.get('max_concurrency')
        figures[f'{name}_machine_cpu_busy_percent'] = phase['machine_cpu_busy_percent']
        figures[f'{name}_cpu_seconds_service'] = phase['cpu_seconds_by_group']['service']
    figures.update({
        'duplicates': sum(phase['duplicates'] for phase in phases.values()),
        'tasks_not_succeeded': sum(phase['tasks'] - phase['tasks_succeeded'] for phase in phases.values()),
        'retries': sum(phase['retries'] for phase in phases.values()),
        'leftover_browser_processes': sum(phase['leftover_browser_processes'] or 0 for phase in phases.values()),
        'grid_sessions_left': sum(phase.get('grid_sessions_left', 0) for phase in phases.values()),
        'loadavg': [round(load_start, 2), round(os.getloadavg()[0], 2)],
        'details': phases,
    })
    log(f'run {number}: ' + json.dumps({k: v for k, v in figures.items() if k != 'details'}))
    return figures


def ratio(numerator, denominator):
    return round(numerator / denominator, 3) if numerator and denominator else None


def run_once(number, args, log_dir):
    load_start = os.getloadavg()[0]
    main = run_phase(f'main{number}', True, args, log_dir, warm=True)
    baseline = None
    if not args.skip_baseline:
        try:
            baseline = run_phase(f'fresh{number}', False, args, log_dir, warm=False)
        except Exception as error:
            log(f'  the baseline failed: {type(error).__name__}: {error}')
            baseline = {'error': f'{type(error).__name__}: {error}'}
    tasks, drivers = args.users * args.per_user, int(service_settings()['TOPN_MAX_DRIVERS'])
    warm = main['warm']
    latency_bound = tasks / drivers * warm['warm_task_seconds']
    cpu_bound = tasks * warm['warm_task_cpu_seconds'] / os.cpu_count()
    limit = max(latency_bound, cpu_bound)
    limit_until_completion = max(latency_bound, tasks * warm['warm_task_cpu_seconds_until_completion'] / os.cpu_count())
    wall = main['wall_seconds']
    fresh_wall = baseline.get('wall_seconds') if baseline else None
    finished = [phase for phase in (main, baseline) if phase and 'error' not in phase]
    figures = {
        'wall_seconds': wall,
        'tasks_per_second': main['tasks_per_second'],
        'articles_published': main['articles_published'],
        'duplicates': main['duplicates'],
        'articles_ok': main['articles_ok'],
        'warm_task_seconds': warm['warm_task_seconds'],
        'warm_task_cpu_seconds': warm['warm_task_cpu_seconds'],
        'warm_task_cpu_seconds_until_completion': warm['warm_task_cpu_seconds_until_completion'],
        'limit_seconds': round(limit, 3),
        'limit_latency_bound_seconds': round(latency_bound, 3),
        'limit_cpu_bound_seconds': round(cpu_bound, 3),
        'ratio_to_limit': round(wall / limit, 3) if wall else None,
        'ratio_to_limit_until_completion': round(wall / limit_until_completion, 3) if wall else None,
        'fresh_wall_seconds': fresh_wall,
        'speedup_vs_fresh_browser': round(fresh_wall / wall, 2) if fresh_wall and wall else None,
        'peak_pss_mb_service_and_browsers': main['peak_pss_mb_service_and_browsers'],
        'pss_mb_mysql': main['pss_mb_mysql'],
        'pss_mb_redis': main['pss_mb_redis'],
        'pss_mb_sandbox': main['pss_mb_sandbox'],
        'leftover_browser_processes': sum(phase['leftover_browser_processes'] or 0 for phase in finished),
        'tasks_not_succeeded': sum(phase['tasks'] - phase['tasks_succeeded'] for phase in finished),
        'retries': sum(phase['retries'] for phase in finished),
        'loadavg': [round(load_start, 2), round(os.getloadavg()[0], 2)],
        'details': {'main': main, 'baseline': baseline},
    }
    log(f'run {number}: ' + json.dumps({k: v for k, v in figures.items() if k != 'details'}))
    return figures


def service_settings():
    """Bench defaults, then the caller's TOPN_* variables (not those the bench sets itself)."""
    return {**BROWSER_DEFAULTS, **inherited_settings(SET_BY_BENCHMARK)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Benchmark TOP_N publishing through real headless Chromium.')
    parser.add_argument('--runs', type=int, default=3, help='runs, each on fresh services (default 3)')
    parser.add_argument('--users', type=int, default=10, help='users, one batch each (default 10)')
    parser.add_argument('--per-user', type=int, default=10, help='articles per user, at most 10 (default 10)')
    parser.add_argument('--skip-baseline', action='store_true', help='no fresh-browser baseline (no speedup figure)')
    parser.add_argument('--webdriver-url', metavar='URL',
                        help='a Selenium Grid: each run compares the workload through local chromedriver and '
                             'through it (no warm probes, no baseline)')
    parser.add_argument('--hosts', type=int, choices=(1, 2), default=1,
                        help='2: also run the Grid workload from two hosts sharing the database (needs --webdriver-url)')
    args = parser.parse_args(argv)
    if args.runs < 1 or args.users < 1 or not 1 <= args.per_user <= 10:
        parser.error('--runs and --users must be 1 or more, --per-user from 1 to 10')
    if args.hosts == 2 and not args.webdriver_url:
        parser.error('--hosts 2 runs on a Grid: give --webdriver-url')
    return args


def main(argv=None):
    args = parse_args(argv)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-browser-logs-'))
    log(f'service and sandbox logs go to {log_dir}')
    started = time.monotonic()
    report = {
        'benchmark': 'browser',
        'machine': {**machine_facts(), 'loadavg_at_start': [round(x, 2) for x in os.getloadavg()],
                    'note': 'shared machine: other sessions run browsers, MySQL and Redis work too'},
        'code': code_under_test(),
        'service_logs': str(log_dir),
        'settings': {'runs': args.runs, 'users': args.users, 'per_user': args.per_user,
                     'tasks': args.users * args.per_user, 'skip_baseline': args.skip_baseline,
                     'sandbox_publish_latency_ms': PUBLISH_LATENCY_MS, 'warm_probes': WARM_PROBES,
                     'memory_sample_interval_s': SAMPLE_INTERVAL, 'sampler_niceness': SAMPLER_NICENESS,
                     'service': {**service_settings(), 'TOPN_DRIVER_REUSE': '1 (main), 0 (baseline)'},
                     'webdriver_url': args.webdriver_url, 'hosts': args.hosts},
        'notes': GRID_NOTES if args.webdriver_url else NOTES,
    }
    if args.webdriver_url:
        report['settings']['warm_probes'] = 0
        report['settings']['service']['TOPN_DRIVER_REUSE'] = '1'
        report['settings']['two_hosts'] = {'host_ids': HOST_IDS, 'split': 'TOPN_WORKERS and TOPN_MAX_DRIVERS halved '
                                           'per host; the first serves the web app, the second runs --no-web'}
    once = run_once_with_grid if args.webdriver_url else run_once
    try:
        runs = repeat_runs(args.runs, lambda number: once(number, args, log_dir))
    except KeyboardInterrupt:
        log('interrupted; the services were stopped and their databases, keys and browsers removed')
        return 130
    report['runs'] = runs
    report['median'] = medians(runs)
    report['machine']['loadavg_at_end'] = [round(x, 2) for x in os.getloadavg()]
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if all('error' not in run for run in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
