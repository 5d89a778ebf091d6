"""Fixtures: real MariaDB and Redis, each test run in a database and a key prefix of its own.

A missing service fails the test with the command that starts it; nothing is skipped.
"""

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pymysql
import pytest
import redis as redis_lib
import waitress.server

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from accounts import AccountStore  # noqa: E402
import auth  # noqa: E402
import sandbox  # noqa: E402
from config import Config  # noqa: E402
from db import Database, schema_statements  # noqa: E402
from publishers.base import PublishError  # noqa: E402
from publishers.browser import wait_for  # noqa: E402
from publishers import load_publishers  # noqa: E402
from scheduler import Scheduler, connect_redis  # noqa: E402
from tasks import FINISHED  # noqa: E402

pytest_plugins = ('wordpress_site', 'grid_site')  # a real WordPress and Selenium Grid, for the tests that need them

MYSQL_HOST = os.environ.get('TOPN_TEST_MYSQL_HOST', '127.0.0.1')
MYSQL_PORT = int(os.environ.get('TOPN_TEST_MYSQL_PORT', '3306'))
REDIS_URL = os.environ.get('TOPN_TEST_REDIS_URL', 'redis://127.0.0.1:6379/0')
SECRET = 'test-secret-key'
RUN_ID = uuid.uuid4().hex[:8]
TEST_DATABASE = f'topn_test_{RUN_ID}'
TEST_PREFIX = f'topn-test-{RUN_ID}'
START_MYSQL = 'start it with: start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd ' \
              '(or: systemctl start mariadb), or run ./dev test, which starts it'
START_REDIS = 'start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" ' \
              '(or: systemctl start redis-server), or run ./dev test, which starts it'


def wait_until(condition, timeout=10.0, interval=0.05, message='condition'):
    """Poll `condition` with the product's own poll (publishers.browser.wait_for) until it
    returns something truthy; fail the test with `message` at the deadline."""
    try:
        return wait_for(condition, timeout, message, interval)
    except PublishError as error:
        raise AssertionError(str(error)) from None


# -- services ----------------------------------------------------------------------------

@pytest.fixture(scope='session')
def mysql_database():
    try:
        conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', connect_timeout=3)
    except pymysql.err.OperationalError as error:
        pytest.fail(f'MariaDB is not answering on {MYSQL_HOST}:{MYSQL_PORT} ({error}); {START_MYSQL}', pytrace=False)
    conn.close()
    database = Database({'host': MYSQL_HOST, 'port': MYSQL_PORT, 'user': 'root', 'password': '',
                         'database': TEST_DATABASE})
    database.initialize()
    yield TEST_DATABASE
    database.drop_database()


@pytest.fixture(scope='session')
def redis_server():
    client = redis_lib.Redis.from_url(REDIS_URL, socket_connect_timeout=3, decode_responses=True)
    try:
        client.ping()
    except redis_lib.RedisError as error:
        pytest.fail(f'Redis is not answering at {REDIS_URL} ({error}); {START_REDIS}', pytrace=False)
    yield client
    delete_prefix(client, TEST_PREFIX)


def delete_prefix(client, prefix):
    for key in client.scan_iter(match=f'{prefix}:*', count=500):
        client.delete(key)


def kill_connections_to(database_name):
    """What clients see when MySQL restarts: every open connection is cut."""
    admin = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', autocommit=True)
    killed = 0
    try:
        with admin.cursor() as cur:
            cur.execute('SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()',
                        (database_name,))
            for (connection_id,) in cur.fetchall():
                try:
                    cur.execute(f'KILL CONNECTION {int(connection_id)}')
                    killed += 1
                except pymysql.err.OperationalError:
                    pass
    finally:
        admin.close()
    return killed


def schema_tables():
    """Every table schema.sql creates."""
    found = (re.match(r'CREATE TABLE IF NOT EXISTS (\w+)', statement) for statement in schema_statements())
    return [match.group(1) for match in found if match]


def empty_tables(database_name):
    """Empty every table. DELETE, not TRUNCATE: a TRUNCATE recreates the table's file (about
    50 ms for the schema, each test), a DELETE of a test's few rows takes 2 ms."""
    conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', database=database_name)
    try:
        with conn.cursor() as cur:
            cur.execute('SET FOREIGN_KEY_CHECKS = 0')
            for table in schema_tables():
                cur.execute(f'DELETE FROM {table}')
            cur.execute('SET FOREIGN_KEY_CHECKS = 1')
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def config(mysql_database, redis_server):
    """A fast configuration against this run's database and key prefix, emptied around each test."""
    empty_tables(mysql_database)
    delete_prefix(redis_server, TEST_PREFIX)
    yield Config(
        mysql_url=f'mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{mysql_database}',
        redis_url=REDIS_URL, redis_prefix=TEST_PREFIX, browser_namespace=TEST_PREFIX,
        retry_backoff=0.05, unknown_outcome_settle=0.2, lease_ttl=2.0, heartbeat_interval=0.5, reaper_interval=0.1,
        reconcile_interval=1.0, shutdown_grace=10.0)
    delete_prefix(redis_server, TEST_PREFIX)


@pytest.fixture
def db(config):
    database = Database(config.mysql)
    yield database
    database.close()


@pytest.fixture
def redis_client(config):
    return connect_redis(config.redis_url)


@pytest.fixture
def scheduler(config, db, redis_client):
    return Scheduler(config, db, redis_client, load_publishers(config))


@dataclasses.dataclass
class User:
    id: int
    name: str
    token: str

    @property
    def headers(self):
        return {'Authorization': f'Bearer {self.token}'}


@pytest.fixture
def make_user(db):
    def make(name, admin=False, vip=False, password='secret'):
        token = auth.new_token()
        user_id = db.create_user(name, auth.hash_password(password), auth.token_hash(token), admin, vip)
        return User(user_id, name, token)
    return make


def articles(n, prefix='article'):
    return [{'title': f'{prefix} {i}', 'content': f'body of {prefix} {i}'} for i in range(n)]


def batch(n, platform='noop', prefix='article', **extra):
    return {'platform': platform, 'articles': articles(n, prefix), **extra}


# -- browser leases -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def manager():
    """A started multiprocessing manager, as the supervisor starts one for the browser leases."""
    with multiprocessing.get_context('fork').Manager() as started:
        yield started


# -- a browser of the test's own -----------------------------------------------------------

@pytest.fixture
def headless_browser(monkeypatch):
    """Headless Chromium for this test alone, with the pool's flags; Selenium Manager never runs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from pool import CHROMEDRIVER, CHROMIUM, browser_options
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not pathlib.Path(binary).exists():
            pytest.fail(f'{binary} is missing: install it with `apt-get install chromium chromium-driver` '
                        '(./dev test does)', pytrace=False)
    monkeypatch.setenv('SE_OFFLINE', 'true')
    options = browser_options()
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def count_tasks(db, user_id=None):
    with db.transaction() as cur:
        if user_id is None:
            cur.execute('SELECT COUNT(*) AS n FROM publish_tasks')
        else:
            cur.execute('SELECT COUNT(*) AS n FROM publish_tasks WHERE user_id = %s', (user_id,))
        return cur.fetchone()['n']


# -- the sandbox platform --------------------------------------------------------------------

class Sandbox:
    """The sandbox platform served from a thread of the test process, on its own port."""

    def __init__(self):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.server = waitress.server.create_server(sandbox.make_app(), host='127.0.0.1', port=self.port, threads=8)
        threading.Thread(target=self.server.run, daemon=True).start()

    def call(self, method, path, body=None):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode() if body is not None else None,
                                         {'Content-Type': 'application/json'}, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def session_for(self, name):
        self.call('POST', '/api/accounts', {'name': name, 'password': 'pw-' + name})
        return self.call('POST', '/api/session', {'name': name, 'password': 'pw-' + name})['cookies']

    def articles(self):
        return self.call('GET', '/api/articles')['articles']

    def faults(self, **knobs):
        return self.call('POST', '/api/faults', knobs)


@pytest.fixture(scope='module')
def platform():
    """The sandbox platform for a module's tests, served from this process."""
    served = Sandbox()
    yield served
    served.server.close()


# -- the local stand-in of Zhihu ---------------------------------------------------------------
# It answers on Zhihu's host names under .localhost (zhuanlan.zhihu.localhost, www., api., and the
# picture hosts under zhimg.localhost; Chromium resolves *.localhost to the loopback), so cookies
# must be set for the shared parent domain and each call must come from a page of its own origin,
# as on Zhihu. It is not Zhihu.

ZHIHU_HOSTS = {'zhuanlan': 'zhuanlan.zhihu.localhost', 'www': 'www.zhihu.localhost', 'api': 'api.zhihu.localhost',
               'upload': 'zhihu-pics-upload.zhimg.localhost', 'pictures': 'picx.zhimg.localhost'}


@pytest.fixture
def sandbox_platform(platform):
    platform.call('POST', '/api/reset')
    return platform


@pytest.fixture
def sandbox_user(make_user, db, config, sandbox_platform):
    """A TOP_N user whose sandbox login is stored, as `account set` stores it."""
    store = AccountStore(db, SECRET)
    publisher = load_publishers(config)['sandbox']

    def make(name):
        user = make_user(name)
        store.save(user.id, publisher, {'cookies': sandbox_platform.session_for(name)})
        return user
    return make


@pytest.fixture(scope='module')
def standin_server():
    """One stand-in of Zhihu on waitress, on a free loopback port, for a module's tests."""
    from zhihu_standin import ZhihuStandIn
    standin = ZhihuStandIn(**{f'{kind}_host': host for kind, host in ZHIHU_HOSTS.items()})
    server = waitress.server.create_server(standin.make_app(), host='127.0.0.1', port=0, threads=8)
    thread = threading.Thread(target=server.run, name='zhihu-standin', daemon=True)
    thread.start()
    standin.urls = {kind: f'http://{host}:{server.effective_port}' for kind, host in ZHIHU_HOSTS.items()}
    try:
        yield standin
    finally:
        server.close()
        thread.join(timeout=5)


def zhihu_environment(standin):
    """The TOPN_ZHIHU_*_URL settings that point the service at the stand-in."""
    return {'TOPN_ZHIHU_URL': standin.urls['zhuanlan'], 'TOPN_ZHIHU_WWW_URL': standin.urls['www'],
            'TOPN_ZHIHU_API_URL': standin.urls['api'], 'TOPN_ZHIHU_UPLOAD_URL': standin.urls['upload'],
            'TOPN_ZHIHU_PICTURES_URL': standin.urls['pictures']}


@pytest.fixture
def standin(standin_server):
    """The stand-in of Zhihu, emptied before and after the test; `.urls` are its two origins."""
    standin_server.reset()
    yield standin_server
    standin_server.reset()


# -- the web app in-process ------------------------------------------------------------------

class WsgiClient:
    """Calls a WSGI app directly: no sockets, real request parsing."""

    def __init__(self, app):
        self.app = app

    def request(self, method, path, body=None, headers=None, raw=None):
        path, _, query = path.partition('?')
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b'')
        environ = {
            'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': query,
            'SERVER_NAME': 'test', 'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(data), 'wsgi.errors': sys.stderr,
            'wsgi.version': (1, 0), 'wsgi.multithread': True, 'wsgi.multiprocess': False,
            'wsgi.run_once': False, 'CONTENT_LENGTH': str(len(data)), 'CONTENT_TYPE': 'application/json',
        }
        for name, value in (headers or {}).items():
            environ['HTTP_' + name.upper().replace('-', '_')] = value
        captured = {}

        def start_response(status, response_headers, exc_info=None):
            captured['status'] = int(status.split()[0])
            captured['headers'] = dict(response_headers)

        chunks = self.app(environ, start_response)
        payload = b''.join(chunks)
        if hasattr(chunks, 'close'):
            chunks.close()
        return Response(captured['status'], captured['headers'], payload)

    def get(self, path, **kwargs):
        return self.request('GET', path, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.request('POST', path, body=body, **kwargs)


@dataclasses.dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


def web_app(config, db, scheduler, max_drivers=2):
    """The web app as the supervisor builds it, its login checks under leases of its own."""
    from accounts import AccountStore, LoginChecker, load_secret_key
    from pool import local_leases
    from topn import make_app
    checker = LoginChecker(config, AccountStore(db, load_secret_key(config)), local_leases(max_drivers, max_drivers))
    return make_app(config, db, scheduler, checker)


@pytest.fixture
def client(config, db, scheduler):
    return WsgiClient(web_app(config, db, scheduler))


# -- the real service in subprocesses ------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        'Content-Type': 'application/json', **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b'null')
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b'null')


def answers(url, timeout=1):
    """True when `url` answers 200 now; False while nothing listens there yet."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class Service:
    """`python topn.py serve` as operators run it, in its own process group."""

    def __init__(self, config, env, tmp_path):
        self.config = config
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = tmp_path / f'serve-{self.port}.log'
        self.env = {**os.environ, 'TOPN_HOST_ID': f'test-host-{self.port}', **env, 'TOPN_BIND': f'127.0.0.1:{self.port}'}
        self.host_id = self.env['TOPN_HOST_ID']
        self.process = None

    def start(self, *args):
        self.log_file = open(self.log_path, 'w')
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / 'topn.py'), 'serve', *args], cwd=ROOT, env=self.env,
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        if '--no-web' not in args:
            wait_until(self._healthy, timeout=20, message=f'the service to answer /healthz (log: {self.log_path})')
        return self

    def _healthy(self):
        if self.process.poll() is not None:
            raise AssertionError(f'the service exited with {self.process.returncode}:\n{self.log()}')
        try:
            return http('GET', self.url + '/healthz', timeout=2)[0] == 200
        except OSError:
            return False

    def log(self):
        return self.log_path.read_text()

    def worker_pids(self):
        output = subprocess.run(['pgrep', '-P', str(self.process.pid), '-x', 'topn-worker'],
                                capture_output=True, text=True).stdout
        return [int(pid) for pid in output.split()]

    def kill_whole_host(self):
        """SIGKILL the supervisor and every process it started at once, as a power cut would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout=30):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.log_file.close()
        return self.process.returncode


def create(service, user, payload):
    """Submit a batch to a running service through its JSON API; the new task ids."""
    status, body = http('POST', service.url + '/api/publish/create_batch', payload, user.headers)
    assert status == 200, body
    return body['task_ids']


def tasks(service, user, task_ids):
    status, body = http('GET', service.url + '/api/publish/tasks/status?task_ids=' + ','.join(task_ids),
                        headers=user.headers)
    assert status == 200, body
    return body['tasks']


def all_finished(service, user, task_ids):
    found = tasks(service, user, task_ids)
    return found if all(t['status'] in FINISHED for t in found) else None


def all_succeeded(service, user, task_ids):
    found = tasks(service, user, task_ids)
    return len(found) == len(task_ids) and all(t['status'] == 'success' for t in found)


def exactly_one_success_each(db, task_ids):
    """Every task has exactly one successful attempt."""
    for task_id in task_ids:
        outcomes = [h['outcome'] for h in db.history(task_id)]
        assert outcomes.count('success') == 1, (task_id, outcomes)


def http_text(url, headers=None, timeout=10):
    """(status, body text) of a GET whose answer is not JSON."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def run_topn(config, *args, **env):
    """Run `python topn.py ARGS` with only this test's TOPN_* settings (plus `env`) in its environment."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith('TOPN_')}
    environ.update(TOPN_MYSQL_URL=config.mysql_url, TOPN_REDIS_URL=config.redis_url,
                   TOPN_REDIS_PREFIX=config.redis_prefix, TOPN_LOG_LEVEL='WARNING')
    environ.update(env)
    return subprocess.run([sys.executable, str(ROOT / 'topn.py'), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def start_service(config, tmp_path):
    """Start `topn.py serve` against this test's database and prefix; settings as TOPN_* overrides."""
    services = []
    base_env = {
        'TOPN_MYSQL_URL': config.mysql_url, 'TOPN_REDIS_URL': config.redis_url,
        'TOPN_REDIS_PREFIX': config.redis_prefix, 'TOPN_BROWSER_NAMESPACE': config.browser_namespace,
        'TOPN_RETRY_BACKOFF': '0.05', 'TOPN_LEASE_TTL': '2',
        'TOPN_HEARTBEAT_INTERVAL': '0.5', 'TOPN_REAPER_INTERVAL': '0.1', 'TOPN_RECONCILE_INTERVAL': '1',
        'TOPN_SHUTDOWN_GRACE': '10', 'TOPN_LOG_LEVEL': 'INFO', 'TOPN_UNKNOWN_OUTCOME_SETTLE': '0.2',
    }

    def start(*args, **env):
        service = Service(config, {**base_env, **{k: str(v) for k, v in env.items()}}, tmp_path)
        services.append(service)
        return service.start(*args)

    yield start
    for service in services:
        service.stop()


@pytest.fixture
def run_worker(config, scheduler):
    """Run real Worker objects (the same code a worker process runs) in threads of this process,
    with the reaper beside them as the supervisor runs it."""
    from worker import Worker
    workers = []
    reaper_stop = threading.Event()

    def reap_until_stopped():
        while not reaper_stop.wait(config.reaper_interval):
            scheduler.reap_and_log_errors()

    threading.Thread(target=reap_until_stopped, daemon=True).start()

    def run(publishers=None, worker_id=None, slots=None):
        worker_config = dataclasses.replace(config, worker_slots=slots or config.worker_slots)
        worker = Worker(worker_config, worker_id=worker_id or f'test-worker-{len(workers)}', publishers=publishers)
        worker.threads = worker.start_threads()
        workers.append(worker)
        return worker

    yield run
    reaper_stop.set()
    for worker in workers:
        worker.stopping.set()
    for worker in workers:
        for thread in worker.threads:
            thread.join(5)
        worker.exited.set()


# -- the web pages ---------------------------------------------------------------------------
