"""Web benchmark: how fast the task table and the status API answer while ten people watch
their batches publish, and how many task-table requests per second the service holds.

    .venv/bin/python bench/web.py --runs 3
    .venv/bin/python bench/web.py --runs 1 --load-seconds 3     # a quick look, ~1.5 min

Every run starts the real service the way every benchmark does (bench/harness.py's
`Service`: `topn.py serve` on a free loopback port with a throwaway MySQL database and Redis
key prefix, always stopped and removed afterwards), with the `noop` platform taking TOPN_NOOP_DELAY seconds per
task (2.5 by default, --noop-delay) so that tasks stay in flight while they are watched.
Users come from `topn.py adduser` and log in through the real /login form (urllib with a
cookie jar); the CSRF token is read from the page. After that each client is a browser tab:
the session cookie, one keep-alive connection, and `HX-Request: true` on the table as htmx
sends it. A warm-up batch and a burst of table requests come first, so that connections
opened on first use (one per web thread and worker slot) are not measured.

1. team: 10 users each submit one batch of 10 noop tasks through the JSON API (session
   cookie and X-CSRF-Token), all at once. Each user then polls its table every 2 s, as the
   page does (`GET /fragments/tasks?status=&page=1`: 10 rows), and every 2 s too asks
   `GET /api/publish/tasks/status?task_ids=<its 10 ids>`, until the table answers 286
   (nothing unfinished: htmx stops polling there). Like independent browsers, each user's
   two requests come at their own random moments in the 2 s interval (seeded by the run
   number, so a run's timing pattern is the same every time the benchmark is run).
   The table's latency is also split by whether another of these requests was in flight at
   the same moment (they share the web app's one process), and the CPU-seconds of the
   supervisor (web app), the workers, mysqld and the whole machine are taken over the watch.
2. rows100: one user with 100 tasks (10 batches; TOPN_USER_MAX_ACTIVE and TOPN_USER_RATE
   are raised for the run so one user may hold them) watched from 10 sessions, each polling
   the table as the page `/?limit=100` does (`/fragments/tasks?status=&page=1&limit=100`:
   100 rows; the default page shows 20) and the status of 10 of the tasks, until 286.
3. load: with every task finished, 50 client threads in a closed loop (each sends its next
   request as soon as it has read the last answer) for --load-seconds, first on the team
   users' tables (10 rows; 5 clients per session), then on the 100-row table. Requests per
   second, p50 / p99, errors, and the CPU-seconds of the supervisor process (it serves the
   web app from its waitress threads), of mysqld and of this client meanwhile.
4. breakdown: a team table (10 rows), the 100-task user's default page (20 rows) and its
   100-row table, each rendered 200 times in this process through the WSGI app (no HTTP,
   no concurrency), timing the session lookup, the task query, the evidence query, building
   the rows, the Jinja render and the garbage collector's pauses (full collections apart):
   where a request's server time goes.

Each phase also counts the service log's warnings; waitress's "Task queue depth is N"
(a request waited because every web thread was busy) is counted apart, with the deepest N.

Latencies are client-side: from sending the request to having read the whole answer.
Every loop is bounded in time and count. Prints one JSON object to stdout (per-run figures,
their medians, settings, nproc, load average); progress goes to stderr; the service logs
stay in a temp directory. TOPN_* variables in the environment are passed on to the service.
"""

import argparse
import functools
import gc
import http.client
import http.cookiejar
import io
import json
import os
import pathlib
import random
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from unittest import mock

from harness import (CLOCK_TICKS, MYSQL_NAMES, REDIS_NAMES, REQUEST_TIMEOUT, ROOT, SERVICE_DEFAULTS, Client,
                     busy_percent, code_under_test, inherited_settings, is_error_line, list_processes, log,
                     machine_cpu_ticks, machine_facts, medians, percentile, repeat_runs, running_service, timestamp,
                     warm_up)

ONE_USER_100_TASKS = {'TOPN_USER_MAX_ACTIVE': '100', 'TOPN_USER_RATE': '1000'}
NOOP_DELAY = 2.5

USERS, TASKS_PER_USER = 10, 10
BIG_TASKS, BIG_SESSIONS, BATCH_SIZE = 100, 10, 10
STATUS_IDS = 10
POLL_INTERVAL = 2.0
LOAD_CLIENTS = 50
LOAD_SECONDS = 10.0
LOAD_MAX_REQUESTS_PER_CLIENT = 100_000
WARM_UP_REQUESTS = 20
BREAKDOWN_CALLS = 200
AIM_P99_MS = 50.0

TEAM_TABLE = '/fragments/tasks?status=&page=1'
ROWS100_TABLE = '/fragments/tasks?status=&page=1&limit=100'
STATUS_API = '/api/publish/tasks/status?task_ids='
HTMX_HEADERS = {'HX-Request': 'true', 'HX-Current-URL': '/', 'HX-Target': 'tasks', 'Accept': 'text/html'}
STOP_POLLING = 286
TABLE_OK = (200, STOP_POLLING)

SUBMIT_ATTEMPTS = 20
WATCH_TIMEOUT_BASE = 60.0
THREAD_JOIN_SLACK = 10.0
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
QUEUE_DEPTH = re.compile(r'waitress\.queue: Task queue depth is (\d+)')
ROW = re.compile(rb'<tr data-task-id="[^"]+" data-status="([a-z]+)"')


# -- a logged-in browser tab ---------------------------------------------------------------------

class Tab:
    """One session as a browser tab holds it: logged in through the /login form, the session
    cookie, the page's CSRF token, and one keep-alive connection for what it asks next."""

    def __init__(self, service, name, password):
        self.service = service
        self.name = name
        self.password = password
        self.cookie = None
        self.csrf_token = None
        self.login_seconds = None
        self.connection = None

    def log_in(self):
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        form = urllib.parse.urlencode({'username': self.name, 'password': self.password}).encode()
        started = time.perf_counter()
        with opener.open(self.service.url + '/login', timeout=REQUEST_TIMEOUT) as response:
            response.read()
        with opener.open(self.service.url + '/login', data=form, timeout=REQUEST_TIMEOUT) as response:
            page = response.read().decode()
            landed = urllib.parse.urlsplit(response.url).path
        self.login_seconds = time.perf_counter() - started
        session = [cookie.value for cookie in jar if cookie.name == 'topn_session']
        token = CSRF_FIELD.search(page)
        if landed != '/' or not session or token is None:
            raise RuntimeError(f'logging in as {self.name} did not reach the page (landed on {landed}, '
                               f'session cookie: {bool(session)}, CSRF token: {token is not None})')
        self.cookie = f'topn_session={session[0]}'
        self.csrf_token = token.group(1)
        return self

    def another_tab(self):
        """The same session in a new tab: its own connection."""
        tab = Tab(self.service, self.name, self.password)
        tab.cookie, tab.csrf_token = self.cookie, self.csrf_token
        return tab

    def request(self, method, path, body=None, headers=None):
        """(status, body bytes, seconds from sending to having read the whole answer). A
        broken connection raises; the next request opens a new one."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection('127.0.0.1', self.service.port, timeout=REQUEST_TIMEOUT)
        headers = {'Cookie': self.cookie, **(headers or {})}
        started = time.perf_counter()
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        return response.status, payload, time.perf_counter() - started

    def table(self, path):
        return self.request('GET', path, headers=HTMX_HEADERS)

    def create_batch(self, titles):
        """One noop batch through the JSON API with the session's cookie and CSRF token, sent
        again while it is refused for a moment (429, 503); returns its task ids."""
        body = json.dumps({'platform': 'noop', 'articles': [
            {'title': title, 'content': f'{title} 的正文：基准测试用的一段文字。'} for title in titles]}).encode()
        headers = {'Content-Type': 'application/json', 'X-CSRF-Token': self.csrf_token}
        for _ in range(SUBMIT_ATTEMPTS):
            status, payload, _ = self.request('POST', '/api/publish/create_batch', body, headers)
            answer = json.loads(payload)
            if status == 200 and answer['success']:
                return answer['task_ids']
            if status not in (429, 503):
                raise RuntimeError(f'create_batch for {self.name} answered {status}: {answer}')
            time.sleep(1.0)
        raise RuntimeError(f'create_batch for {self.name} was still refused after {SUBMIT_ATTEMPTS} tries')

    def task_rows(self, task_ids):
        status, payload, _ = self.request('GET', STATUS_API + ','.join(task_ids))
        if status != 200:
            raise RuntimeError(f'tasks/status for {self.name} answered {status}: {payload[:300]!r}')
        return json.loads(payload)['tasks']

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


# -- watching a batch as the page does ---------------------------------------------------------

class Watcher(threading.Thread):
    """One tab asking for its table every POLL_INTERVAL, `table_phase` seconds into each
    interval after `start`, and for its tasks' status `status_phase` seconds into it, until
    the table answers 286 (then it stops, as htmx does) or `deadline` passes."""

    def __init__(self, tab, table_path, status_ids, start, table_phase, status_phase, deadline):
        super().__init__(name=f'watch-{tab.name}', daemon=True)
        self.tab = tab
        self.table_path = table_path
        self.status_path = STATUS_API + ','.join(status_ids)
        self.status_count = len(status_ids)
        self.start_at = start
        self.phases = sorted([(table_phase, self.poll_table), (status_phase, self.poll_status)],
                             key=lambda phase: phase[0])
        self.deadline = deadline
        self.tables = []
        self.statuses = []
        self.stopped_by_286 = False

    def run(self):
        max_ticks = int((self.deadline - self.start_at) / POLL_INTERVAL) + 1
        for tick in range(max_ticks):
            for phase, poll in self.phases:
                sleep_until(self.start_at + tick * POLL_INTERVAL + phase)
                if poll():
                    self.stopped_by_286 = True
                    return

    def poll_table(self):
        """One table request; True when it says to stop polling."""
        started = time.perf_counter()
        try:
            status, body, seconds = self.tab.table(self.table_path)
        except (OSError, http.client.HTTPException) as error:
            self.tables.append({'error': type(error).__name__})
            return False
        statuses = ROW.findall(body)
        self.tables.append({'started': started, 'seconds': seconds, 'status': status, 'bytes': len(body),
                            'rows': len(statuses), 'running_rows': statuses.count(b'running'),
                            'ok': status in TABLE_OK})
        return status == STOP_POLLING

    def poll_status(self):
        """One status call; never says to stop."""
        started = time.perf_counter()
        try:
            status, body, seconds = self.tab.request('GET', self.status_path)
        except (OSError, http.client.HTTPException) as error:
            self.statuses.append({'error': type(error).__name__})
            return False
        ok = status == 200 and len(json.loads(body).get('tasks', ())) == self.status_count
        self.statuses.append({'started': started, 'seconds': seconds, 'status': status, 'bytes': len(body),
                              'ok': ok})
        return False


def sleep_until(moment):
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def watch(service, tabs, table_path, submit, noop_delay, rng):
    """Run `submit()` (it sends the batches and returns, per tab, the task ids that tab asks
    the status of), then start a Watcher per tab and wait until every table said 286. Like
    independent browsers, each tab asks at its own moments in the 2 s interval: the table
    and the status call each at a phase drawn from `rng`."""
    cpu_before, machine_before = cpu_by_group(service), machine_cpu_ticks()
    started = time.monotonic()
    status_ids = submit()
    submitted = time.monotonic()
    tasks = sum(len(ids) for ids in status_ids)
    deadline = submitted + WATCH_TIMEOUT_BASE + tasks * noop_delay
    watchers = [Watcher(tab, table_path, ids, submitted, rng.uniform(0, POLL_INTERVAL), rng.uniform(0, POLL_INTERVAL),
                        deadline) for tab, ids in zip(tabs, status_ids)]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        watcher.join(max(0.0, deadline - time.monotonic()) + THREAD_JOIN_SLACK)
    seen_done = time.monotonic()
    cpu = cpu_since(service, cpu_before)
    cpu['machine_busy_percent'] = busy_percent(machine_before, machine_cpu_ticks())
    if any(watcher.is_alive() for watcher in watchers):
        raise RuntimeError(f'the watchers did not end within {deadline - submitted + THREAD_JOIN_SLACK:.0f} s')
    rows = [row for tab, ids in zip(tabs, status_ids) for row in tab.task_rows(ids)]
    return {**watch_figures(watchers, rows, {'submit_s': round(submitted - started, 3),
                                             'window_s': round(seen_done - submitted, 3)}), 'cpu_seconds': cpu}


def watch_figures(watchers, rows, timing):
    """Latency of the table and of the status API over the whole watch, and what they showed."""
    tables = [sample for watcher in watchers for sample in watcher.tables]
    statuses = [sample for watcher in watchers for sample in watcher.statuses]
    shown = [sample for sample in tables if 'rows' in sample]
    created = [timestamp(row['created_at']) for row in rows]
    completed = [timestamp(row['completed_at']) for row in rows if row['completed_at']]
    return {
        'clients': len(watchers),
        'tasks': len(rows),
        'tasks_succeeded': sum(row['status'] == 'success' for row in rows),
        'tasks_server_span_s': round(max(completed) - min(created), 3) if completed else None,
        **timing,
        'all_tables_stopped_polling': all(watcher.stopped_by_286 for watcher in watchers),
        'table': latency_figures(tables),
        **overlap_figures(tables, statuses),
        'table_rows': [min(s['rows'] for s in shown), max(s['rows'] for s in shown)] if shown else None,
        'tables_showing_running_rows': sum(1 for s in shown if s['running_rows']),
        'status_api': latency_figures(statuses),
    }


def overlap_figures(tables, statuses):
    """The table's latency split by whether another request of this benchmark (a table or a
    status call) was in flight at the same time: the web app serves all of them from one
    process, so requests that overlap share its CPU (one core, the GIL)."""
    timed = [sample for sample in tables + statuses if 'started' in sample]
    alone, overlapping = [], []
    for table in (sample for sample in tables if 'started' in sample):
        begin, end = table['started'], table['started'] + table['seconds']
        shared = any(other is not table and other['started'] < end and begin < other['started'] + other['seconds']
                     for other in timed)
        (overlapping if shared else alone).append(table)
    return {'table_alone': latency_figures(alone), 'table_overlapping': latency_figures(overlapping)}


def latency_figures(samples):
    timed = [sample for sample in samples if 'seconds' in sample]
    ms = [1000 * sample['seconds'] for sample in timed]
    figures = {'requests': len(samples), 'errors': sum(1 for sample in samples if not sample.get('ok'))}
    if ms:
        figures.update({'p50_ms': round(percentile(ms, 50), 2), 'p90_ms': round(percentile(ms, 90), 2),
                        'p99_ms': round(percentile(ms, 99), 2), 'max_ms': round(max(ms), 2),
                        'mean_ms': round(statistics.fmean(ms), 2),
                        'bytes_p50': int(statistics.median(sample['bytes'] for sample in timed))})
    return figures


def team_phase(service, tabs, noop_delay, rng):
    """10 users send one batch of 10 each, all at once; each watches its own table and asks
    the status of its own 10 tasks."""
    go = threading.Barrier(len(tabs))
    task_ids = {}

    def submit_one(tab):
        go.wait(REQUEST_TIMEOUT)
        task_ids[tab.name] = tab.create_batch([f'团队文章 {tab.name} 第 {i + 1} 篇' for i in range(TASKS_PER_USER)])

    def submit():
        threads = [threading.Thread(target=submit_one, args=(tab,), daemon=True) for tab in tabs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT * SUBMIT_ATTEMPTS)
        if len(task_ids) != len(tabs):
            raise RuntimeError(f'only {len(task_ids)} of {len(tabs)} users got their batch accepted')
        return [task_ids[tab.name] for tab in tabs]

    return watch(service, tabs, TEAM_TABLE, submit, noop_delay, rng)


def rows100_phase(service, tabs, noop_delay, rng):
    """One user sends 100 tasks (10 batches back to back), watched from 10 sessions on the
    100-row table; each session asks the status of its own 10 of the tasks."""
    def submit():
        task_ids = []
        for batch in range(BIG_TASKS // BATCH_SIZE):
            task_ids += tabs[0].create_batch([f'长列表文章 第 {batch * BATCH_SIZE + i + 1} 篇' for i in range(BATCH_SIZE)])
        return [task_ids[i * STATUS_IDS:(i + 1) * STATUS_IDS] for i in range(len(tabs))]

    return watch(service, tabs, ROWS100_TABLE, submit, noop_delay, rng)


# -- closed-loop load ----------------------------------------------------------------------------

def closed_loop(service, tabs, path, clients, seconds):
    """`clients` threads, each with its own keep-alive connection and one of the tabs' sessions,
    GET `path` back to back for `seconds`. Requests per second, latency, errors, CPU used."""
    sessions = [tabs[index % len(tabs)].another_tab() for index in range(clients)]
    go = threading.Barrier(clients + 1)
    samples = [[] for _ in range(clients)]
    finished_at = [0.0] * clients
    window = {}

    def loop(index):
        session, mine = sessions[index], samples[index]
        go.wait(REQUEST_TIMEOUT)
        deadline = window['deadline']
        for _ in range(LOAD_MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                break
            try:
                status, body, spent = session.table(path)
                mine.append({'seconds': spent, 'bytes': len(body), 'ok': status in TABLE_OK})
            except (OSError, http.client.HTTPException) as error:
                mine.append({'error': type(error).__name__})
        finished_at[index] = time.perf_counter()
        session.close()

    threads = [threading.Thread(target=loop, args=(i,), name=f'load-{i}', daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before, client_cpu_before = cpu_by_group(service), time.process_time()
    window['deadline'] = time.perf_counter() + seconds
    started = time.perf_counter()
    go.wait(REQUEST_TIMEOUT)
    for thread in threads:
        thread.join(seconds + REQUEST_TIMEOUT + THREAD_JOIN_SLACK)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError('load clients did not stop')
    elapsed = max(finished_at) - started
    cpu = cpu_since(service, cpu_before)
    cpu['client'] = round(time.process_time() - client_cpu_before, 3)
    flat = [sample for mine in samples for sample in mine]
    answered = sum(1 for sample in flat if sample.get('ok'))
    return {
        'clients': clients,
        'seconds': round(elapsed, 3),
        'rps': round(answered / elapsed, 1),
        **latency_figures(flat),
        'cpu_seconds': cpu,
        'service_cpu_ms_per_request': round(1000 * cpu['service'] / answered, 2) if answered else None,
        'mysql_cpu_ms_per_request': round(1000 * cpu['mysql'] / answered, 2) if answered else None,
    }


def cpu_by_group(service):
    """CPU-seconds so far of the supervisor process (`service`: the web app and the reaper),
    of its children (`workers`: the worker processes and the lease manager), of mysqld and of
    redis-server."""
    seconds = {'service': 0.0, 'workers': 0.0, 'mysql': 0.0, 'redis': 0.0}
    for proc in list_processes().values():
        if proc.pid == service.process.pid:
            seconds['service'] += proc.ticks / CLOCK_TICKS
        elif proc.ppid == service.process.pid:
            seconds['workers'] += proc.ticks / CLOCK_TICKS
        elif proc.comm in MYSQL_NAMES:
            seconds['mysql'] += proc.ticks / CLOCK_TICKS
        elif proc.comm in REDIS_NAMES:
            seconds['redis'] += proc.ticks / CLOCK_TICKS
    return seconds


def cpu_since(service, before):
    return {group: round(after - before.get(group, 0.0), 3) for group, after in cpu_by_group(service).items()}


def warm_web_threads(service, tab):
    """A burst of table requests from more clients than web threads, so that every web
    thread has opened its MySQL and Redis connections before anything is measured."""
    closed_loop(service, [tab], TEAM_TABLE, 16, 0.5)
    for _ in range(WARM_UP_REQUESTS):
        tab.table(TEAM_TABLE)


# -- where the server's time goes ------------------------------------------------------------------

BREAKDOWN_PARTS = ('session_user', 'task_table', 'evidence_of', 'build_rows', 'render')
TIMED_QUERIES = {'session_user': 'session_user', 'task_table': 'task_page', 'evidence_of': 'evidence_of'}


def server_breakdown(service, tabs_by_table):
    """Render each table BREAKDOWN_CALLS times through the service's WSGI app in this
    process, one at a time, timing its parts (TIMED_QUERIES: part -> Database method) and the
    garbage collector's pauses. {table: {figure: ms, ...}}. The app's login checker gets a
    throwaway key and leases of its own: a task table decrypts no login and starts no browser."""
    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))  # the service's modules: its web.py, not this file
    from accounts import AccountStore, LoginChecker
    from config import Config
    from db import Database
    import pages
    from pool import local_leases
    from publishers import load_publishers
    from scheduler import Scheduler, connect_redis
    from topn import make_app

    config = Config.from_env(service.env)
    db = Database(config.mysql)
    spent = {}

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    for part, method in TIMED_QUERIES.items():
        setattr(db, method, timed(part, getattr(db, method)))
    scheduler = Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))
    checker = LoginChecker(config, AccountStore(db, secrets.token_hex(16)), local_leases(1, 1))
    try:
        with mock.patch.object(pages.Pages, 'task_view', timed('build_rows', pages.Pages.task_view)), \
                mock.patch.object(pages.Pages, 'render', timed('render', pages.Pages.render)), \
                GcPauses() as pauses:
            app = make_app(config, db, scheduler, checker)
            return {label: breakdown_of(app, path, tab.cookie, spent, pauses)
                    for label, (path, tab) in tabs_by_table.items()}
    finally:
        checker.close()
        db.close()


def breakdown_of(app, path, cookie, spent, pauses):
    calls = []
    for _ in range(BREAKDOWN_CALLS + 5):
        spent.clear()
        started = time.perf_counter()
        status, body = call_wsgi(app, path, cookie)
        total = time.perf_counter() - started
        if status not in TABLE_OK:
            raise RuntimeError(f'{path} answered {status} in process: {body[:300]!r}')
        calls.append({'total': total, **spent, 'rows': len(ROW.findall(body))})
        if len(calls) == 5:
            pauses.clear()  # the first calls warm up; their collections are not counted
    calls = calls[5:]
    for call in calls:
        call['other'] = call['total'] - sum(call.get(part, 0.0) for part in BREAKDOWN_PARTS)
    full = [seconds for generation, seconds in pauses.seen if generation == 2]
    return {
        'rows': calls[0]['rows'],
        'total_p50_ms': round(1000 * percentile([c['total'] for c in calls], 50), 2),
        'total_p99_ms': round(1000 * percentile([c['total'] for c in calls], 99), 2),
        'total_max_ms': round(1000 * max(c['total'] for c in calls), 2),
        **{f'{part}_p50_ms': round(1000 * statistics.median(c.get(part, 0.0) for c in calls), 2)
           for part in BREAKDOWN_PARTS + ('other',)},
        'gc_ms_per_call': round(1000 * sum(seconds for _, seconds in pauses.seen) / len(calls), 3),
        'gc_full_collections': len(full),
        'gc_full_collection_ms_p50': round(1000 * statistics.median(full), 2) if full else None,
    }


class GcPauses:
    """Records (generation, seconds) of every garbage collection while it is entered."""

    def __init__(self):
        self.seen = []
        self._started = None

    def __enter__(self):
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc_info):
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase, info):
        if phase == 'start':
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seen.append((info['generation'], time.perf_counter() - self._started))

    def clear(self):
        self.seen.clear()


def call_wsgi(app, path, cookie):
    path, _, query = path.partition('?')
    environ = {
        'REQUEST_METHOD': 'GET', 'PATH_INFO': path, 'QUERY_STRING': query, 'SERVER_NAME': '127.0.0.1',
        'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1', 'wsgi.url_scheme': 'http',
        'wsgi.input': io.BytesIO(b''), 'wsgi.errors': sys.stderr, 'wsgi.version': (1, 0),
        'wsgi.multithread': True, 'wsgi.multiprocess': False, 'wsgi.run_once': False, 'HTTP_COOKIE': cookie,
        **{'HTTP_' + name.upper().replace('-', '_'): value for name, value in HTMX_HEADERS.items()},
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer['status'] = int(status.split()[0])

    chunks = app(environ, start_response)
    body = b''.join(chunks)
    if hasattr(chunks, 'close'):
        chunks.close()
    return answer['status'], body


class ServiceLog:
    """The service log, read phase by phase."""

    def __init__(self, service):
        self.service = service
        self.seen = len(service.logged_lines())

    def since_last(self):
        lines = self.service.logged_lines()
        new, self.seen = lines[self.seen:], len(lines)
        return summarize_log(new)


def summarize_log(lines):
    """Warnings and errors. Waitress warns "Task queue depth is N" each time a request has
    to wait because every web thread is busy; those are counted apart, with the deepest N."""
    depths = [int(match.group(1)) for line in lines if (match := QUEUE_DEPTH.search(line))]
    warnings = sum(' WARNING ' in line for line in lines)
    return {'waitress_queue_warnings': len(depths), 'max_waitress_queue_depth': max(depths, default=0),
            'other_warnings': warnings - len(depths),
            'errors': sum(map(is_error_line, lines))}


# -- one run -------------------------------------------------------------------------------------------

def service_settings(args):
    """Bench defaults, then the caller's TOPN_* variables, then what this benchmark needs."""
    return {**SERVICE_DEFAULTS, **inherited_settings(), 'TOPN_NOOP_DELAY': str(args.noop_delay), **ONE_USER_100_TASKS}


def run_once(number, args, log_dir):
    load_start = os.getloadavg()
    log_path = log_dir / f'web-{number}.log'
    settings = service_settings(args)
    password = secrets.token_urlsafe(12)
    rng = random.Random(number)  # the polling phases: different in each run, the same from one invocation to the next
    with running_service(settings, log_path) as service:
        log('  warming up (a noop batch, then a burst of table requests)')
        warm_up(service, Client(service.url))
        names = [f'user{i}' for i in range(USERS)] + ['big']
        for name in names:
            service.add_user(name, password)
        team_tabs = [Tab(service, name, password).log_in() for name in names[:USERS]]
        big_tabs = [Tab(service, 'big', password).log_in() for _ in range(BIG_SESSIONS)]
        warm_web_threads(service, team_tabs[0])
        service_log = ServiceLog(service)
        log(f'  team: {USERS} users x {TASKS_PER_USER} tasks, each polling its table every {POLL_INTERVAL:g} s')
        team = {**team_phase(service, team_tabs, args.noop_delay, rng), 'service_log': service_log.since_last()}
        log(f'  team: table p50 {team["table"].get("p50_ms")} ms, p99 {team["table"].get("p99_ms")} ms')
        log(f'  rows100: 1 user x {BIG_TASKS} tasks, {BIG_SESSIONS} sessions polling the 100-row table')
        rows100 = {**rows100_phase(service, big_tabs, args.noop_delay, rng), 'service_log': service_log.since_last()}
        log(f'  rows100: table p50 {rows100["table"].get("p50_ms")} ms, p99 {rows100["table"].get("p99_ms")} ms')
        for tab in team_tabs + big_tabs:
            tab.close()
        log(f'  load: {args.load_clients} clients for {args.load_seconds:g} s on the 10-row tables, then on 100 rows')
        load_team = {**closed_loop(service, team_tabs, TEAM_TABLE, args.load_clients, args.load_seconds),
                     'service_log': service_log.since_last()}
        load_rows100 = {**closed_loop(service, big_tabs, ROWS100_TABLE, args.load_clients, args.load_seconds),
                        'service_log': service_log.since_last()}
        log(f'  load: {load_team["rps"]} and {load_rows100["rps"]} requests/s')
        breakdown = server_breakdown(service, {'team_table': (TEAM_TABLE, team_tabs[0]),
                                               'default_page_20_rows': (TEAM_TABLE, big_tabs[0]),
                                               'rows100_table': (ROWS100_TABLE, big_tabs[0])})
    lines = service.logged_lines()
    return {
        'team': team,
        'rows100': rows100,
        'load_team_tables': load_team,
        'load_rows100_table': load_rows100,
        'server_breakdown_ms': breakdown,
        'login_seconds_p50': round(statistics.median(tab.login_seconds for tab in team_tabs + big_tabs), 3),
        'service_log_whole_run': summarize_log(lines),
        'loadavg_start': [round(x, 2) for x in load_start],
        'loadavg_end': [round(x, 2) for x in os.getloadavg()],
    }


# -- reporting --------------------------------------------------------------------------------------------

def headline(median):
    """The numbers the issue asks for, from the medians."""
    if not median:
        return {}
    pick = ('requests', 'p50_ms', 'p99_ms', 'errors')
    load = ('rps', 'p50_ms', 'p99_ms', 'errors')
    return {
        'team_10_rows_table': {k: median['team']['table'].get(k) for k in pick},
        'team_status_api_10_ids': {k: median['team']['status_api'].get(k) for k in pick},
        'rows100_table': {k: median['rows100']['table'].get(k) for k in pick},
        'rows100_status_api_10_ids': {k: median['rows100']['status_api'].get(k) for k in pick},
        'load_50_clients_10_rows': {k: median['load_team_tables'].get(k) for k in load},
        'load_50_clients_100_rows': {k: median['load_rows100_table'].get(k) for k in load},
        'aim_rows100_table_p99_under_50_ms': median['rows100']['table'].get('p99_ms', float('inf')) < AIM_P99_MS,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Benchmark the TOP_N task page: table and status latency while '
                                                 'tasks run, and requests per second under closed-loop load.')
    parser.add_argument('--runs', type=int, default=3, help='runs, each on a fresh service (default 3)')
    parser.add_argument('--noop-delay', type=float, default=NOOP_DELAY,
                        help=f'seconds a noop task takes, so tasks stay in flight (default {NOOP_DELAY:g})')
    parser.add_argument('--load-clients', type=int, default=LOAD_CLIENTS, help=f'default {LOAD_CLIENTS}')
    parser.add_argument('--load-seconds', type=float, default=LOAD_SECONDS, help=f'default {LOAD_SECONDS:g}')
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load_clients < 1 or not 0 < args.load_seconds <= 300 or not 0 < args.noop_delay <= 30:
        parser.error('--runs and --load-clients must be 1 or more, --load-seconds in (0, 300], '
                     '--noop-delay in (0, 30]')
    return args


def main(argv=None):
    args = parse_args(argv)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-web-'))
    log(f'service logs go to {log_dir}')
    started = time.monotonic()
    report = {
        'benchmark': 'web',
        'machine': {**machine_facts(), 'loadavg_at_start': [round(x, 2) for x in os.getloadavg()]},
        'code': code_under_test(),
        'service_logs': str(log_dir),
        'settings': {'runs': args.runs, 'users': USERS, 'tasks_per_user': TASKS_PER_USER,
                     'rows100_tasks': BIG_TASKS, 'rows100_sessions': BIG_SESSIONS,
                     'poll_interval_s': POLL_INTERVAL,
                     'poll_phases': 'table and status call each at a uniform random phase in the interval, '
                                    'per tab; random.Random(run number)',
                     'status_ids_per_call': STATUS_IDS, 'load_clients': args.load_clients,
                     'load_seconds': args.load_seconds, 'breakdown_calls': BREAKDOWN_CALLS,
                     'team_table': TEAM_TABLE, 'rows100_table': ROWS100_TABLE,
                     'service': service_settings(args)},
    }
    try:
        runs = repeat_runs(args.runs, lambda number: run_once(number, args, log_dir))
    except KeyboardInterrupt:
        log('interrupted; the service was stopped and its database and Redis keys removed')
        return 130
    report['runs'] = runs
    report['median'] = medians(runs, nested=True)
    report['headline'] = headline(report['median'])
    report['machine']['loadavg_at_end'] = [round(x, 2) for x in os.getloadavg()]
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if all('error' not in run for run in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
