"""Pipeline benchmark: how many noop tasks per second TOP_N moves end to end, and how
fairly it shares the worker slots between users.

    .venv/bin/python bench/pipeline.py --runs 3
    .venv/bin/python bench/pipeline.py --scenarios bulk --runs 1 --bulk-users 10 --bulk-per-user 20

Every run starts the real service (`topn.py serve`, as operators run it) on a free
loopback port against a throwaway MySQL database and Redis key prefix, creates its users
with `topn.py adduser`, drives it only through the JSON API, and always stops it and
removes the database and the keys afterwards. A warm-up burst from its own user runs
first, so that connections opened on first use (one per web thread and per worker slot)
are not measured. Times come from the task rows (MySQL's clock), except where a figure
is called client-side.

- team: 10 users send one batch of 10 noop tasks each, all at once.
- bulk: many users (100 x 100 tasks by default, batches of 10) submitted from a few
  client threads as fast as the API accepts them, per-user limits raised.
- fairness: TOPN_NOOP_DELAY=1; user A sends 10 tasks, then user B one. B should wait
  about one task length and at most one of A's turns (A's 9th task may start first,
  round-robin puts B right after it), so B starts before A's backlog is done.

Prints one JSON object to stdout (per-run figures and their medians, machine facts,
settings); progress goes to stderr; the service logs stay in a temp directory.
TOPN_* variables in the environment (TOPN_WORKERS, ...) are passed on to the service.
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import queue
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pymysql
import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
MYSQL = {'host': '127.0.0.1', 'port': 3306, 'user': 'root', 'password': ''}
REDIS_URL = 'redis://127.0.0.1:6379/0'
SERVICE_DEFAULTS = {'TOPN_WORKERS': '4', 'TOPN_WORKER_SLOTS': '2', 'TOPN_LOG_LEVEL': 'WARNING'}
PER_RUN_SETTINGS = ('TOPN_MYSQL_URL', 'TOPN_REDIS_URL', 'TOPN_REDIS_PREFIX', 'TOPN_BIND')
BATCH_SIZE = 10
STATUS_IDS_PER_CALL = 200
START_TIMEOUT = 30.0
STOP_TIMEOUT = 40.0
REQUEST_TIMEOUT = 30.0

WARMUP_TASKS = 8
TEAM_USERS, TEAM_TASKS = 10, 10
BULK_LIMITS = {'TOPN_USER_MAX_ACTIVE': '1000', 'TOPN_USER_RATE': '100000', 'TOPN_USER_RATE_WINDOW': '60'}
BULK_CLIENTS = 4
FAIRNESS_A_TASKS = 10


def log(message):
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


# -- the service under test ------------------------------------------------------------


def stop_process_group(process, timeout, what):
    """SIGTERM to `process`, then SIGKILL to its whole process group after `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f'{what} did not stop in {timeout:g} s; killing it')
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()

class Service:
    """`topn.py serve` in its own process group, with its own database and key prefix."""

    def __init__(self, settings, log_path):
        suffix = secrets.token_hex(4)
        self.database = f'topn_bench_{suffix}'
        self.prefix = f'topn-bench-{suffix}'
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        self.env = {**os.environ, **settings,
                    'TOPN_MYSQL_URL': 'mysql://{user}@{host}:{port}/'.format(**MYSQL) + self.database,
                    'TOPN_REDIS_URL': REDIS_URL, 'TOPN_REDIS_PREFIX': self.prefix,
                    'TOPN_BIND': f'127.0.0.1:{self.port}'}
        self.process = None

    def start(self):
        with open(self.log_path, 'w') as log_file:
            self.process = subprocess.Popen(
                [sys.executable, 'topn.py', 'serve'], cwd=ROOT, env=self.env,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f'the service exited with {self.process.returncode}; see {self.log_path}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'the service did not answer /healthz in {START_TIMEOUT:g} s; see {self.log_path}')
            time.sleep(0.1)

    def _healthy(self):
        try:
            with urllib.request.urlopen(self.url + '/healthz', timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def add_user(self, name):
        """Create a user the way operators do; returns its API token."""
        done = subprocess.run(
            [sys.executable, 'topn.py', 'adduser', name, '--password', secrets.token_hex(8)],
            cwd=ROOT, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'topn.py adduser {name} exited with {done.returncode}: {done.stderr.strip()[-2000:]}')
        return json.loads(done.stdout)['token']

    def add_users(self, names):
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            return list(pool.map(self.add_user, names))

    def stop(self):
        if self.process is not None:
            stop_process_group(self.process, STOP_TIMEOUT, 'the service')

    def clean_up(self):
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f'{self.prefix}:*', count=1000):
            client.delete(key)
        conn = pymysql.connect(**MYSQL, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS `{self.database}`')
        finally:
            conn.close()

    def logged_lines(self):
        return self.log_path.read_text(errors='replace').splitlines()


@contextlib.contextmanager
def running_service(settings, log_path):
    service = Service(settings, log_path)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        service.clean_up()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# -- the JSON API ----------------------------------------------------------------------------

class Client:
    """The API as a script sees it. Counts the refusals (429, 503) it waited out."""

    def __init__(self, url):
        self.url = url
        self.refusals = {}
        self._lock = threading.Lock()

    def call(self, method, path, token, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            'Authorization': f'Bearer {token}', 'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                return response.status, json.loads(response.read()), {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b'null'), error.headers

    def create_batch(self, token, count, title='bench'):
        """Send one noop batch until it is accepted; returns its task ids."""
        articles = [{'title': f'{title} {i}', 'content': f'body of {title} {i}'} for i in range(count)]
        while True:
            status, answer, headers = self.call('POST', '/api/publish/create_batch', token,
                                                {'platform': 'noop', 'articles': articles})
            if status == 200 and answer['success']:
                return answer['task_ids']
            if status not in (429, 503):
                raise RuntimeError(f'create_batch answered {status}: {answer}')
            self._count_refusal(status)
            time.sleep(min(5.0, float(headers.get('Retry-After', 1))))

    def _count_refusal(self, status):
        with self._lock:
            self.refusals[status] = self.refusals.get(status, 0) + 1

    def succeeded(self, token):
        status, answer, _ = self.call('GET', '/api/publish/tasks/list?status=success&limit=1', token)
        if status != 200:
            raise RuntimeError(f'tasks/list answered {status}: {answer}')
        return answer['total']

    def task_rows(self, token, task_ids):
        rows = []
        for start in range(0, len(task_ids), STATUS_IDS_PER_CALL):
            chunk = ','.join(task_ids[start:start + STATUS_IDS_PER_CALL])
            status, answer, _ = self.call('GET', f'/api/publish/tasks/status?task_ids={chunk}', token)
            if status != 200:
                raise RuntimeError(f'tasks/status answered {status}: {answer}')
            rows.extend(answer['tasks'])
        return rows


def wait_until_succeeded(client, expected, interval, timeout):
    """Watch one user at a time (the first not yet done) until every user in `expected`
    ({token: tasks}) has all its tasks in success; returns the monotonic time it saw that."""
    deadline = time.monotonic() + timeout
    pending = list(expected.items())
    while pending:
        token, count = pending[0]
        done = client.succeeded(token)
        if done >= count:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f'{len(pending)} users still had unfinished tasks after {timeout:g} s '
                               f'(the first of them: {done}/{count} succeeded)')
        time.sleep(interval)
    return time.monotonic()


def completion_timeout(tasks):
    """Generous: a pipeline slower than 10 tasks/s is reported as broken."""
    return 30.0 + tasks / 10


# -- figures from task rows --------------------------------------------------------------------

def timestamp(value):
    return datetime.datetime.fromisoformat(value).timestamp()


def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def pipeline_figures(rows):
    """End-to-end rate and dispatch latency (started_at - created_at) from server timestamps."""
    succeeded = [row for row in rows if row['status'] == 'success']
    if len(succeeded) != len(rows):
        raise RuntimeError(f'{len(rows) - len(succeeded)} of {len(rows)} tasks did not succeed')
    created = [timestamp(row['created_at']) for row in rows]
    started = [timestamp(row['started_at']) for row in rows]
    completed = [timestamp(row['completed_at']) for row in rows]
    span = max(completed) - min(created)
    dispatch_ms = [1000 * (s - c) for s, c in zip(started, created)]
    return {
        'tasks': len(rows),
        'server_span_s': round(span, 3),
        'server_tasks_per_s': round(len(rows) / span, 1),
        'dispatch_p50_ms': round(percentile(dispatch_ms, 50), 1),
        'dispatch_p99_ms': round(percentile(dispatch_ms, 99), 1),
        'retries': sum(row['retry_count'] for row in rows),
    }


# -- scenarios ----------------------------------------------------------------------------------

def warm_up(service, client):
    """Single-task batches sent in parallel, so that every web thread and most worker
    slots open their connections before anything is measured."""
    token, = service.add_users(['warmup'])
    with concurrent.futures.ThreadPoolExecutor(WARMUP_TASKS) as pool:
        list(pool.map(lambda _: client.create_batch(token, 1, 'warm-up'), range(WARMUP_TASKS)))
    wait_until_succeeded(client, {token: WARMUP_TASKS}, 0.05, completion_timeout(WARMUP_TASKS))


def team(service, client, args):
    tokens = service.add_users([f'team{i}' for i in range(TEAM_USERS)])
    go = threading.Barrier(TEAM_USERS)

    def submit(token):
        go.wait()
        sent = time.monotonic()
        return sent, client.create_batch(token, TEAM_TASKS)

    with concurrent.futures.ThreadPoolExecutor(TEAM_USERS) as pool:
        submitted = list(pool.map(submit, tokens))
    first_sent = min(sent for sent, _ in submitted)
    seen_done = wait_until_succeeded(client, {token: TEAM_TASKS for token in tokens}, 0.01,
                                     completion_timeout(TEAM_USERS * TEAM_TASKS))
    rows = [row for token, (_, ids) in zip(tokens, submitted) for row in client.task_rows(token, ids)]
    client_wall = seen_done - first_sent
    return {**pipeline_figures(rows), 'client_wall_s': round(client_wall, 3),
            'client_tasks_per_s': round(len(rows) / client_wall, 1)}


def bulk(service, client, args):
    users, per_user = args.bulk_users, args.bulk_per_user
    log(f'  creating {users} users')
    tokens = service.add_users([f'bulk{i}' for i in range(users)])
    batches = [(token, min(BATCH_SIZE, per_user - start))
               for start in range(0, per_user, BATCH_SIZE) for token in tokens]
    log(f'  submitting {users * per_user} tasks in {len(batches)} batches from {BULK_CLIENTS} threads')
    started = time.monotonic()
    task_ids = submit_all(client, batches)
    submit_time = time.monotonic() - started
    log(f'  submitted in {submit_time:.1f} s; waiting for completion')
    wait_until_succeeded(client, {token: per_user for token in tokens}, 0.5, completion_timeout(users * per_user))
    rows = [row for token in tokens for row in client.task_rows(token, task_ids[token])]
    return {**pipeline_figures(rows), 'submit_s': round(submit_time, 3),
            'submit_tasks_per_s': round(len(rows) / submit_time, 1)}


def submit_all(client, batches):
    """Send (token, size) batches from BULK_CLIENTS threads; returns {token: task ids}."""
    work = queue.SimpleQueue()
    for batch in batches:
        work.put(batch)
    task_ids = {token: [] for token, _ in batches}

    def send():
        with contextlib.suppress(queue.Empty):
            while True:
                token, size = work.get_nowait()
                task_ids[token].extend(client.create_batch(token, size))

    with concurrent.futures.ThreadPoolExecutor(BULK_CLIENTS) as pool:
        try:
            for future in [pool.submit(send) for _ in range(BULK_CLIENTS)]:
                future.result()
        except BaseException:
            drain(work)
            raise
    return task_ids


def drain(work):
    """Leave the sender threads nothing more to send, so an error or Ctrl-C stops them."""
    with contextlib.suppress(queue.Empty):
        while True:
            work.get_nowait()


def fairness(service, client, args):
    token_a, token_b = service.add_users(['fair_a', 'fair_b'])
    ids_a = client.create_batch(token_a, FAIRNESS_A_TASKS, 'A')
    ids_b = client.create_batch(token_b, 1, 'B')
    wait_until_succeeded(client, {token_a: len(ids_a), token_b: 1}, 0.1, completion_timeout(FAIRNESS_A_TASKS + 1))
    rows_a = client.task_rows(token_a, ids_a)
    row_b, = client.task_rows(token_b, ids_b)
    a_starts = sorted(timestamp(row['started_at']) for row in rows_a)
    b_start = timestamp(row_b['started_at'])
    a_span = max(timestamp(row['completed_at']) for row in rows_a) - min(timestamp(row['created_at']) for row in rows_a)
    b_created = timestamp(row_b['created_at'])
    turns_waited = sum(b_created < start < b_start for start in a_starts)
    return {
        'b_wait_s': round(b_start - b_created, 3),
        'a_total_s': round(a_span, 3),
        'b_start_rank': 1 + sum(start <= b_start for start in a_starts),
        'a_tasks_started_while_b_waited': turns_waited,
        'b_within_one_turn': turns_waited <= 1,
        'b_started_before_a_backlog_ended': b_start < a_starts[-1],
    }


SCENARIOS = {
    'team': (team, {'TOPN_NOOP_DELAY': '0'}),
    'bulk': (bulk, {'TOPN_NOOP_DELAY': '0', **BULK_LIMITS}),
    'fairness': (fairness, {'TOPN_NOOP_DELAY': '1'}),
}


# -- running and reporting ------------------------------------------------------------------------

def service_settings(scenario):
    """Bench defaults, then the caller's TOPN_* variables, then what the scenario needs."""
    inherited = {name: value for name, value in os.environ.items()
                 if name.startswith('TOPN_') and name not in PER_RUN_SETTINGS}
    return {**SERVICE_DEFAULTS, **inherited, **SCENARIOS[scenario][1]}


def run_once(scenario, number, args, log_dir):
    measure = SCENARIOS[scenario][0]
    log_path = log_dir / f'{scenario}-{number}.log'
    with running_service(service_settings(scenario), log_path) as service:
        client = Client(service.url)
        warm_up(service, client)
        started = time.monotonic()
        figures = measure(service, client, args)
        figures['run_s'] = round(time.monotonic() - started, 1)
        figures['refusals'] = {str(status): n for status, n in sorted(client.refusals.items())}
    lines = service.logged_lines()
    figures['service_log_warnings'] = sum(' WARNING ' in line for line in lines)
    figures['service_log_errors'] = sum(' ERROR ' in line or line.startswith('Traceback') for line in lines)
    for line in lines[:5]:
        log(f'  service log: {line}')
    return figures


def run_scenario(scenario, args, log_dir):
    runs = []
    for number in range(1, args.runs + 1):
        log(f'{scenario}: run {number}/{args.runs}')
        try:
            figures = run_once(scenario, number, args, log_dir)
        except Exception as error:
            log(f'{scenario}: run {number} failed: {type(error).__name__}: {error}')
            figures = {'error': f'{type(error).__name__}: {error}'}
        log(f'{scenario}: {json.dumps(figures)}')
        runs.append(figures)
    return {'runs': runs, 'median': medians(runs), 'service_settings': service_settings(scenario)}


def medians(runs):
    """Median of each number over the runs that finished; for yes/no figures, how many were yes."""
    finished = [run for run in runs if 'error' not in run]
    summary = {}
    for key, value in (finished[0].items() if finished else ()):
        values = [run[key] for run in finished]
        if isinstance(value, bool):
            summary[key] = f'{sum(values)}/{len(values)}'
        elif isinstance(value, (int, float)):
            summary[key] = round(statistics.median(values), 3)
    return summary


def machine_facts():
    return {'nproc': os.cpu_count(), 'python': platform.python_version(), 'platform': platform.platform()}


def code_under_test():
    """The commit, and the files that differ from it: the numbers belong to this tree."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout
    return {'commit': git('rev-parse', 'HEAD').strip() or None,
            'changed_files': [line[3:] for line in git('status', '--porcelain').splitlines()]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Benchmark the TOP_N pipeline end to end with noop tasks.')
    parser.add_argument('--scenarios', default='team,bulk,fairness',
                        help='comma-separated, from: ' + ', '.join(SCENARIOS))
    parser.add_argument('--runs', type=int, default=3, help='runs per scenario, each on a fresh service')
    parser.add_argument('--bulk-users', type=int, default=100)
    parser.add_argument('--bulk-per-user', type=int, default=100)
    args = parser.parse_args(argv)
    args.scenarios = [name.strip() for name in args.scenarios.split(',') if name.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f'unknown scenarios: {", ".join(sorted(unknown))}')
    return args


def main(argv=None):
    args = parse_args(argv)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-'))
    log(f'service logs go to {log_dir}')
    started = time.monotonic()
    report = {'machine': machine_facts(), 'code': code_under_test(), 'service_logs': str(log_dir),
              'settings': {'runs': args.runs, 'bulk_users': args.bulk_users, 'bulk_per_user': args.bulk_per_user,
                           'bulk_client_threads': BULK_CLIENTS, 'batch_size': BATCH_SIZE}}
    try:
        report['scenarios'] = {scenario: run_scenario(scenario, args, log_dir) for scenario in args.scenarios}
    except KeyboardInterrupt:
        log('interrupted; the service was stopped and its database and Redis keys removed')
        return 130
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
