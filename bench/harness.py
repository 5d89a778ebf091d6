"""What every benchmark needs to start TOP_N's service and measure it.

- the service (`topn.py serve`, as operators run it) and the sandbox platform, each in its own
  process group on a free loopback port, the service on a throwaway MySQL database, Redis key
  prefix and browser namespace, always stopped and removed afterwards;
- the JSON API as a script sees it, and the warm-up the noop benchmarks measure after;
- the /proc readers: processes with their CPU ticks, memory (RSS, PSS), the machine's CPU;
- the report's shared parts: runs repeated past a failure, percentiles, medians over runs,
  machine facts, the code under test, and logging progress to stderr.

The benchmarks are scripts (`.venv/bin/python bench/NAME.py`): they import this module from
their own folder, and none of them imports another.
"""

import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
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
PER_RUN_SETTINGS = ('TOPN_MYSQL_URL', 'TOPN_REDIS_URL', 'TOPN_REDIS_PREFIX', 'TOPN_BROWSER_NAMESPACE',
                    'TOPN_BIND')
START_TIMEOUT = 30.0
STOP_TIMEOUT = 40.0
REQUEST_TIMEOUT = 30.0
STATUS_IDS_PER_CALL = 200
WARMUP_TASKS = 8
TERMINAL = ('success', 'failed', 'cancelled')

PUBLISH_LATENCY_MS = 500
SANDBOX_START_TIMEOUT = 15.0
SANDBOX_STOP_TIMEOUT = 10.0

MYSQL_NAMES = ('mariadbd', 'mysqld')
REDIS_NAMES = ('redis-server',)
CLOCK_TICKS = os.sysconf('SC_CLK_TCK')
PAGE_KB = os.sysconf('SC_PAGE_SIZE') // 1024


def log(message):
    """Progress goes to stderr, so that stdout carries nothing but the JSON report."""
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


# -- the service and the sandbox ------------------------------------------------------------

def start_process_group(command, log_path, env=None):
    """`command` from the project's folder in a process group of its own, its output to
    `log_path`, so that `stop_process_group` can end everything it starts."""
    with open(log_path, 'w') as log_file:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


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
    """`topn.py serve` in its own process group, with its own database, key prefix and browser
    namespace (the same random name), so that runs never see each other's tasks or browsers."""

    def __init__(self, settings, log_path):
        suffix = secrets.token_hex(4)
        self.database = f'topn_bench_{suffix}'
        self.prefix = self.namespace = f'topn-bench-{suffix}'
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        self.env = {**os.environ, **settings,
                    'TOPN_MYSQL_URL': 'mysql://{user}@{host}:{port}/'.format(**MYSQL) + self.database,
                    'TOPN_REDIS_URL': REDIS_URL, 'TOPN_REDIS_PREFIX': self.prefix,
                    'TOPN_BROWSER_NAMESPACE': self.namespace, 'TOPN_BIND': f'127.0.0.1:{self.port}'}
        self.process = None

    def start(self):
        self.process = start_process_group([sys.executable, 'topn.py', 'serve'], self.log_path, self.env)
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

    def command(self, what, *args):
        """`topn.py ARGS` with this service's settings, as an operator runs it; its stdout.
        `what` names the command in the error, which must not show the secrets in ARGS."""
        done = subprocess.run([sys.executable, 'topn.py', *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'topn.py {what} exited with {done.returncode}: {done.stderr.strip()[-2000:]}')
        return done.stdout

    def add_user(self, name, password=None):
        """Create a user the way operators do; returns its API token."""
        output = self.command(f'adduser {name}', 'adduser', name, '--password', password or secrets.token_hex(8))
        return json.loads(output)['token']

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


def is_error_line(line):
    """An ERROR record of the service log, or a traceback that reached it unformatted."""
    return ' ERROR ' in line or line.startswith('Traceback')


@contextlib.contextmanager
def running_service(settings, log_path):
    service = Service(settings, log_path)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        service.clean_up()


def inherited_settings(set_by_benchmark=()):
    """The caller's TOPN_* variables, passed on to the service so that a benchmark can measure
    other settings without being edited; not those a run sets itself."""
    return {name: value for name, value in os.environ.items()
            if name.startswith('TOPN_') and name not in PER_RUN_SETTINGS and name not in set_by_benchmark}


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class Sandbox:
    """`python -m sandbox` on a free loopback port, in its own process group, answering each
    publish after PUBLISH_LATENCY_MS as a remote platform would."""

    def __init__(self, log_path):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        self.process = None

    def start(self):
        self.process = start_process_group([sys.executable, '-m', 'sandbox', '--bind', f'127.0.0.1:{self.port}'],
                                           self.log_path)
        deadline = time.monotonic() + SANDBOX_START_TIMEOUT
        while True:
            try:
                self.call('GET', '/api/faults')
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'the sandbox did not start; see {self.log_path}') from None
                time.sleep(0.1)
        self.call('POST', '/api/faults', {'publish_latency_ms': PUBLISH_LATENCY_MS})

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def session_cookies(self, name, password):
        """A new sandbox account and a logged-in session of it, as a cookie string."""
        self.call('POST', '/api/accounts', {'name': name, 'password': password})
        return self.call('POST', '/api/session', {'name': name, 'password': password})['cookies']

    def articles(self):
        return self.call('GET', '/api/articles')['articles']

    def stop(self):
        if self.process is not None:
            stop_process_group(self.process, SANDBOX_STOP_TIMEOUT, 'the sandbox')


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

    def submit(self, token, platform_name, articles):
        """Send one batch until it is accepted; returns its task ids."""
        while True:
            status, answer, headers = self.call('POST', '/api/publish/create_batch', token,
                                                {'platform': platform_name, 'articles': articles})
            if status == 200 and answer['success']:
                return answer['task_ids']
            if status not in (429, 503):
                raise RuntimeError(f'create_batch answered {status}: {answer}')
            self._count_refusal(status)
            time.sleep(min(5.0, float(headers.get('Retry-After', 1))))

    def create_batch(self, token, count, title='bench'):
        """One noop batch of `count` articles; returns its task ids."""
        articles = [{'title': f'{title} {i}', 'content': f'body of {title} {i}'} for i in range(count)]
        return self.submit(token, 'noop', articles)

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


def warm_up(service, client):
    """Single-task noop batches from a user of their own, sent in parallel, so that every web
    thread and most worker slots open their connections before anything is measured."""
    token, = service.add_users(['warmup'])
    with concurrent.futures.ThreadPoolExecutor(WARMUP_TASKS) as pool:
        list(pool.map(lambda _: client.create_batch(token, 1, 'warm-up'), range(WARMUP_TASKS)))
    wait_until_succeeded(client, {token: WARMUP_TASKS}, 0.05, completion_timeout(WARMUP_TASKS))


# -- processes, memory and CPU, from /proc ------------------------------------------------------

class Proc:
    __slots__ = ('pid', 'ppid', 'comm', 'ticks', 'start', 'cmdline')

    def __init__(self, pid, ppid, comm, ticks, start, cmdline):
        self.pid, self.ppid, self.comm, self.ticks, self.start, self.cmdline = pid, ppid, comm, ticks, start, cmdline


def list_processes():
    """{pid: Proc} of every process on the machine now; utime+stime in clock ticks."""
    found = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stat_file:
                stat = stat_file.read()
            with open(f'/proc/{entry}/cmdline', 'rb') as cmdline_file:
                cmdline = cmdline_file.read()
        except OSError:
            continue
        close = stat.rindex(b')')
        fields = stat[close + 2:].split()
        found[int(entry)] = Proc(int(entry), int(fields[1]), stat[stat.index(b'(') + 1:close].decode(errors='replace'),
                                 int(fields[11]) + int(fields[12]), int(fields[19]), cmdline)
    return found


def descendants(root, processes):
    """The pids of `root` and everything below it in the process tree."""
    children = {}
    for proc in processes.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, stack = set(), [root] if root in processes else []
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def rss_kb(pid):
    try:
        with open(f'/proc/{pid}/statm') as statm:
            return int(statm.read().split()[1]) * PAGE_KB
    except OSError:
        return 0


def pss_kb(pid):
    try:
        with open(f'/proc/{pid}/smaps_rollup') as rollup:
            for line in rollup:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_cpu_ticks():
    """(busy, total) jiffies of all CPUs since boot."""
    with open('/proc/stat') as stat:
        values = [int(value) for value in stat.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def busy_percent(before, after):
    """The machine's CPU busy share between two `machine_cpu_ticks()` readings."""
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else None


# -- figures and the report ---------------------------------------------------------------------

def timestamp(value):
    return datetime.datetime.fromisoformat(value).timestamp()


def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def repeat_runs(count, run_once, label='run'):
    """`run_once(number)` for number 1 .. count. A run that raises is kept as {'error': ...}
    and the others still run: one bad run should not cost the figures of the rest."""
    runs = []
    for number in range(1, count + 1):
        log(f'{label} {number}/{count}')
        try:
            runs.append(run_once(number))
        except Exception as error:
            log(f'{label} {number} failed: {type(error).__name__}: {error}')
            runs.append({'error': f'{type(error).__name__}: {error}'})
    return runs


def medians(runs, nested=False):
    """The figures of one run, each number the median over the runs that finished and have it,
    each yes/no figure how many of them said yes. Lists, text and missing values are left
    out, and so are dicts, unless `nested`: then they are summarized the same way."""
    finished = [run for run in runs if 'error' not in run]
    return _summary(finished, nested) if finished else {}


def _summary(dicts, nested):
    summary = {}
    for key in dicts[0]:
        values = [figures.get(key) for figures in dicts]
        if all(isinstance(value, bool) for value in values):
            summary[key] = f'{sum(values)}/{len(values)}'
        elif all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            summary[key] = round(statistics.median(values), 3)
        elif nested and all(isinstance(value, dict) for value in values):
            summary[key] = _summary(values, nested)
    return summary


def machine_facts():
    return {'nproc': os.cpu_count(), 'python': platform.python_version(), 'platform': platform.platform()}


def code_under_test():
    """The commit, and the files that differ from it: the numbers belong to this tree."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout
    return {'commit': git('rev-parse', 'HEAD').strip() or None,
            'changed_files': [line[3:] for line in git('status', '--porcelain').splitlines()]}
