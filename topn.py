"""TOP_N: publish many articles to content platforms at once, reliably.

    python topn.py serve [--no-web] [--no-workers]   the service: supervisor, workers, web
    python topn.py initdb                            create the database and tables
    python topn.py adduser NAME --password PW [--admin] [--vip]
    python topn.py submit FILE... --user NAME [--platform P]... [--urgent] [--at TIME]
    python topn.py status [--user NAME]
    python topn.py account set USER PLATFORM --cookies 'a=1; b=2'   (or --cookies-file FILE)
    python topn.py account set USER zhihu --cookies '...' [--column c_123]
    python topn.py account set USER wordpress --site URL --username U --password P
    python topn.py account check USER PLATFORM
    python topn.py sandbox                           the local sandbox platform
    python topn.py demo                              local demo: a demo user, then serve

Configuration comes from TOPN_* environment variables (see config.py and README).
"""

import argparse
import datetime
import gc
import json
import logging
import multiprocessing
import multiprocessing.managers
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import zoneinfo

import bottle
import redis
import waitress

import api
import auth
import pages
import sandbox
import web
from accounts import AccountStore, LoginChecker, SecretKeyMismatch, check_secret_key, load_secret_key
from config import Config, ConfigError
from db import Database, DatabaseUnavailable
from errors import Refused
from hosts import HostIdInUse, HostPresence
from pool import (browser_marker, find_browser_processes, kill_browser_processes, kill_until_gone, lease_registry,
                  local_leases, working_limit)
from publishers import load_publishers
from content import articles_from_markdown
from scheduler import Scheduler, connect_redis
from worker import worker_id_for, worker_main

log = logging.getLogger('topn')

BOOT_WINDOW = 5.0
BOOT_FAILURES_TOLERATED = 3
DEMO_USER, DEMO_PASSWORD = 'demo', 'demo'
DEMO_ADMIN = 'admin'


# -- the web app -----------------------------------------------------------------------

def make_app(config, db, scheduler, login_checker):
    """The whole web app: the JSON API (api.py) and the pages (pages.py) side by side, on
    one Bottle app with one answer for Bottle's own errors."""
    app = bottle.Bottle()
    api.Api(config, db, scheduler).mount(app)
    site = pages.Pages(config, db, scheduler, login_checker.store, login_checker)
    site.mount(app)

    def routing_error(error):
        return site.routing_error_page(error) if web.wants_html() else api.routing_error_answer(error)

    for status in (400, 404, 405, 413, 500):
        app.error(status)(routing_error)
    app.add_hook('after_request', web.add_security_headers)
    return app


def browser_leases(manager, config):
    """The machine's browser leases and work permits (pool.py states the rule)."""
    return lease_registry(manager, config.max_drivers,
                          working_limit(config.max_drivers, config.working_per_core, remote=bool(config.webdriver_url)))


# -- the supervisor ------------------------------------------------------------------

class Supervisor:
    """Forks the workers, restarts the ones that die, runs the reaper, and serves the web
    app from a thread. Signal handlers only set a flag; `run()` does the work, one
    `loop_once()` per reaper interval."""

    def __init__(self, config, run_web=True, run_workers=True, worker_target=None):
        self.config = config
        self.worker_target = worker_target or _worker_entry
        self.run_web = run_web
        self.run_workers = run_workers
        self.stop_requested = False
        self.exit_code = 0
        self.workers = {}
        self.boot_failures = {}
        self.web_server = None
        self.manager = None
        self.leases = None
        self.login_checker = None
        self.db = Database(config.mysql)
        self.redis = connect_redis(config.redis_url)
        self.scheduler = Scheduler(config, self.db, self.redis, load_publishers(config))
        self.presence = HostPresence(config, self.db, os.getpid())

    def run(self):
        """`gc.freeze()` once everything is built: the long-lived objects then stay out of
        the collector's full passes, which otherwise paused a 100-row table render for
        ~30 ms about once in 80 (bench/web.py)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        try:
            self.start()
        except (HostIdInUse, SecretKeyMismatch) as error:
            log.error('%s', error)
            return 1
        gc.freeze()
        while not self.stop_requested:
            self.loop_once()
            time.sleep(self.config.reaper_interval)
        self.shutdown()
        return self.exit_code

    def start(self):
        """This host's row among the hosts first (a supervisor that finds a database in use
        by other hosts simply joins them), then the browser leases (the web app's login
        checks and the workers share them), then the web app, then the workers."""
        check_secret_key(self.db, load_secret_key(self.config))
        self.presence.join(web=self.run_web)
        self._start_lease_registry()
        if self.run_web:
            self._start_web()
        if self.run_workers:
            for slot in range(self.config.workers):
                self._spawn(slot)
        log.info('supervisor %s of host %s running: web=%s workers=%d', os.getpid(), self.config.host_id,
                 self.run_web, self.config.workers if self.run_workers else 0)

    def loop_once(self):
        """One turn of the supervisor: replace dead workers, one reaper pass, the heartbeat."""
        if self.run_workers:
            self._replace_dead_workers()
            self.scheduler.reap_and_log_errors()
            self.presence.end_orphan_sessions()
        self.presence.beat([self._worker_id(process.pid) for process, _ in self.workers.values()])

    def _worker_id(self, pid):
        return worker_id_for(self.config.host_id, pid)

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    # -- web -------------------------------------------------------------------------

    def _start_web(self):
        host, port = self.config.bind_host_port
        store = AccountStore(self.db, load_secret_key(self.config))
        self.login_checker = LoginChecker(self.config, store, self.leases)
        app = make_app(self.config, self.db, self.scheduler, self.login_checker)
        self.web_server = waitress.create_server(
            app, host=host, port=port, threads=self.config.web_threads,
            max_request_body_size=self.config.max_request_bytes, ident='topn')
        threading.Thread(target=self.web_server.run, name='web', daemon=True).start()
        log.info('serving on http://%s:%d/', host, port)

    # -- workers -----------------------------------------------------------------------

    def _start_lease_registry(self):
        """The machine-wide browser cap: a semaphore in a manager process the workers share.
        The manager ignores SIGINT so a Ctrl-C reaches only the supervisor, which drains."""
        self.manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context('fork'))
        self.manager.start(initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        self.leases = browser_leases(self.manager, self.config)

    def _spawn(self, slot):
        process = multiprocessing.get_context('fork').Process(
            target=self.worker_target, args=(self.config, self.leases), name=f'topn-worker-{slot}', daemon=False)
        process.start()
        self.workers[slot] = (process, time.monotonic())

    def _replace_dead_workers(self):
        for slot, (process, started) in list(self.workers.items()):
            if process.is_alive():
                continue
            process.join()
            lived = time.monotonic() - started
            log.warning('worker %s (pid %s) %s after %.1f s; restarting it',
                        slot, process.pid, describe_exit(process.exitcode), lived)
            self._clean_up_after(process.pid)
            if lived < BOOT_WINDOW and process.exitcode != 0:
                self.boot_failures[slot] = self.boot_failures.get(slot, 0) + 1
            else:
                self.boot_failures[slot] = 0
            if self.boot_failures[slot] >= BOOT_FAILURES_TOLERATED:
                log.error('worker %s died %d times within %.0f s of starting; giving up instead of spinning',
                          slot, self.boot_failures[slot], BOOT_WINDOW)
                self.exit_code = 1
                self.stop_requested = True
                return
            self._spawn(slot)

    def _clean_up_after(self, pid):
        """A worker is gone: kill the browsers it left behind, return their leases, and let
        the reaper take its tasks back now instead of at lease expiry."""
        marker = browser_marker(self.config.browser_namespace, pid, self.config.browser_root)
        killed = len(find_browser_processes(marker))
        if not kill_until_gone(marker, timeout=5):
            log.error('browser processes of dead worker pid %s survive SIGKILL', pid)
        shutil.rmtree(marker, ignore_errors=True)
        returned = self.leases.release_all_of(pid)
        if killed or returned:
            log.warning('worker pid %s left %d browser processes and %d leases; cleaned up', pid, killed, returned)
        try:
            released = self.db.expire_leases_of(self._worker_id(pid))
            if released:
                log.warning('%d tasks of the dead worker go back to the queue', released)
            self.presence.end_sessions_of_worker(self._worker_id(pid))
        except DatabaseUnavailable as error:
            log.warning('could not release the dead worker\'s leases now (%s); they expire on their own', error)

    # -- shutdown ----------------------------------------------------------------------

    def shutdown(self):
        log.info('stopping: no new work; running tasks have %.0f s to finish', self.config.shutdown_grace)
        if self.web_server is not None:
            self.web_server.close()
        if self.login_checker is not None:
            self.login_checker.close()
        for process, _ in self.workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace
        for process, _ in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process, _ in self.workers.values():
            if process.is_alive():
                log.warning('worker pid %s did not finish in time; killing it (the reaper requeues its task)',
                            process.pid)
                process.kill()
                process.join()
                self._clean_up_after(process.pid)
        kill_browser_processes(os.path.join(self.config.browser_root, self.config.browser_namespace) + '/')
        self.manager.shutdown()
        self.presence.leave()
        log.info('stopped')


def _worker_entry(config, leases):
    name_this_process('topn-worker')
    configure_logging(config.log_level)
    worker_main(config, leases)


def name_this_process(name):
    """So that ps, top and pgrep tell the workers from the supervisor (Linux only)."""
    try:
        with open('/proc/self/comm', 'w') as comm:
            comm.write(name)
    except OSError:
        pass


def describe_exit(exitcode):
    if exitcode is None:
        return 'is still running'
    if exitcode < 0:
        return f'was killed by {signal.Signals(-exitcode).name}'
    return f'exited with code {exitcode}'


# -- commands ------------------------------------------------------------------------

def cmd_serve(config, args):
    Database(config.mysql).initialize()
    return Supervisor(config, run_web=not args.no_web, run_workers=not args.no_workers).run()


def cmd_initdb(config, args):
    Database(config.mysql).initialize()
    print(json.dumps({'database': config.mysql['database'], 'schema': 'applied'}))


def cmd_adduser(config, args):
    token = auth.new_token()
    db = Database(config.mysql)
    if db.user_by_name(args.name) is not None:
        raise CommandError(f'user {args.name!r} exists already')
    user_id = db.create_user(args.name, auth.hash_password(args.password), auth.token_hash(token),
                             is_admin=args.admin, is_vip=args.vip)
    print(json.dumps({'user_id': user_id, 'name': args.name, 'token': token, 'admin': args.admin, 'vip': args.vip}))


def cmd_submit(config, args):
    db = Database(config.mysql)
    user = db.user_by_name(args.user)
    if user is None:
        raise CommandError(f'no user {args.user!r}')
    payload = batch_from_files(args.files, args.platform, args.urgent, args.at)
    scheduler = Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))
    task_ids = scheduler.submit_batch(user['id'], payload)
    print(json.dumps({'task_ids': task_ids}))


def cmd_status(config, args):
    db = Database(config.mysql)
    scheduler = Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))
    report = scheduler.metrics()
    if args.user:
        user = db.user_by_name(args.user)
        if user is None:
            raise CommandError(f'no user {args.user!r}')
        rows, _ = db.task_page(user['id'], limit=50)
        report['tasks'] = [{'task_id': r['task_id'], 'status': r['status'], 'progress': r['progress'],
                            'title': r['article_title'], 'result_url': r['result_url'],
                            'error': r['error_message']} for r in rows]
    print(json.dumps(report, ensure_ascii=False, indent=2, default=web.iso8601))


def cmd_account(config, args):
    db = Database(config.mysql)
    user = db.user_by_name(args.user)
    if user is None:
        raise CommandError(f'no user {args.user!r}')
    publisher = load_publishers(config).get(args.platform)
    if publisher is None or not publisher.needs_browser:
        raise CommandError(f'{args.platform!r} is not a platform that takes a login')
    store = AccountStore(db, load_secret_key(config))
    if args.action == 'set':
        store.save(user['id'], publisher, login_fields_from(args, publisher))
        print(json.dumps({'user': args.user, 'platform': args.platform, 'stored': True}))
        return 0
    checker = LoginChecker(config, store, local_leases(1, 1))
    try:
        ok, detail = checker.check(publisher, user['id'])
    finally:
        checker.close()
    print(json.dumps({'user': args.user, 'platform': args.platform, 'ok': ok, 'detail': detail}, ensure_ascii=False))
    return {True: 0, False: 1, None: 3}[ok]


def login_fields_from(args, publisher):
    """The login a user gives on the command line, as the publisher's `login_fields`."""
    given = {
        'cookies': read_file(args.cookies_file) if args.cookies_file else args.cookies,
        'site': args.site,
        'username': args.username,
        'password': read_file(args.password_file).strip() if args.password_file else args.password,
        'column': args.column,
    }
    flags = {'cookies': '--cookies "a=1; b=2" (or --cookies-file FILE)', 'site': '--site URL',
             'username': '--username NAME', 'password': '--password PW (or --password-file FILE)'}
    missing = [flags[name] for name in publisher.login_fields
               if not given.get(name) and name not in publisher.optional_login_fields]
    if missing:
        raise CommandError(f'{publisher.name} needs {", ".join(missing)}')
    return {name: given[name] for name in publisher.login_fields if given.get(name)}


def read_file(path):
    return pathlib.Path(path).read_text(encoding='utf-8-sig')


def cmd_sandbox(config, args):
    host, port = config.sandbox_bind.rsplit(':', 1)
    log.info('sandbox platform on http://%s:%s/', host, port)
    sandbox.serve(config.sandbox_bind)


def cmd_demo(config, args):
    """Everything on one box for a first look: the sandbox platform, a demo user with a
    sandbox login, and the service. Prints where to go and what to type."""
    db = Database(config.mysql)
    db.initialize()
    start_sandbox(config)
    token = auth.new_token()
    user = demo_user(db, DEMO_USER, DEMO_PASSWORD, token)
    admin_password = auth.new_token()[:12]
    demo_user(db, DEMO_ADMIN, admin_password, auth.new_token(), admin=True)
    cookies = sandbox_session(config.sandbox_url, DEMO_USER, DEMO_PASSWORD)
    AccountStore(db, load_secret_key(config)).save(user['id'], load_publishers(config)['sandbox'],
                                                   {'cookies': cookies})
    host, port = config.bind_host_port
    url = f'http://{host}:{port}'
    zone = zoneinfo.ZoneInfo(config.display_timezone)
    in_a_minute = (datetime.datetime.now(zone) + datetime.timedelta(minutes=1)).isoformat(timespec='seconds')
    print(f'\nTOP_N is starting on {url}/\n'
          f'  demo login:        {DEMO_USER} / {DEMO_PASSWORD}\n'
          f'  admin login:       {DEMO_ADMIN} / {admin_password}  (live figures on {url}/admin; new each start)\n'
          f'  API token:         {token}\n'
          f'  sandbox platform:  {config.sandbox_url}/  (published articles: {config.sandbox_url}/api/articles)\n'
          f'  publish two articles to the sandbox and to noop (a platform that publishes nowhere), a minute from now:\n'
          f'    curl -s -H "Authorization: Bearer {token}" \\\n'
          f'      -d \'{{"platforms": ["sandbox", "noop"], "publish_at": "{in_a_minute}", '
          f'"articles": [{{"title": "你好，TOP_N", "content": "# 第一篇\\n\\n正文"}}, '
          f'{{"title": "Second", "content": "**bold** body"}}]}}\' \\\n'
          f'      {url}/api/publish/create_batch\n'
          f'    curl -s -H "Authorization: Bearer {token}" {url}/api/publish/tasks/list\n', flush=True)
    return Supervisor(config).run()


def demo_user(db, name, password, token, admin=False):
    """The demo's user `name`, made if missing; its password and API token set anew."""
    user = db.user_by_name(name)
    if user is None:
        db.create_user(name, auth.hash_password(password), auth.token_hash(token), admin)
        return db.user_by_name(name)
    db.set_user_password(user['id'], auth.hash_password(password))
    db.set_user_token(user['id'], auth.token_hash(token))
    return user


def start_sandbox(config):
    """Serve the sandbox platform from a child process unless something already answers there."""
    try:
        urllib.request.urlopen(config.sandbox_url + '/api/faults', timeout=1).close()
        return
    except OSError:
        pass
    multiprocessing.get_context('fork').Process(
        target=sandbox.serve, args=(config.sandbox_bind,), name='topn-sandbox', daemon=True).start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(config.sandbox_url + '/api/faults', timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise CommandError(f'the sandbox platform did not start on {config.sandbox_bind}')


def sandbox_session(base_url, name, password):
    """A logged-in sandbox session as a cookie string, creating the sandbox account if needed."""
    def post(path):
        request = urllib.request.Request(base_url + path, json.dumps({'name': name, 'password': password}).encode(),
                                         {'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    try:
        post('/api/accounts')
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise
    return post('/api/session')['cookies']


def batch_from_files(paths, platforms, urgent, publish_at=None):
    """One JSON batch file (the API's create_batch shape), or Markdown files split into
    articles as the page splits them (`articles_from_markdown`). `platforms` (the --platform
    options, any number) and `publish_at` replace what a JSON file says."""
    paths = [pathlib.Path(p) for p in paths]
    if len(paths) == 1 and paths[0].suffix == '.json':
        payload = json.loads(read_file(paths[0]))
    else:
        payload = {'articles': [a for p in paths for a in articles_from_markdown(read_file(p), p.stem)]}
    if platforms:
        payload.pop('platform', None)
        payload.pop('platforms', None)
        payload.update({'platform': platforms[0]} if len(platforms) == 1 else {'platforms': platforms})
    if urgent:
        payload['priority'] = 'urgent'
    if publish_at:
        payload['publish_at'] = publish_at
    return payload


class CommandError(Exception):
    pass


def configure_logging(level='INFO'):
    logging.basicConfig(level=level.upper(), force=True,
                        format='%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s')
    # waitress warns once per request queued behind busy threads: thousands of lines a
    # minute under load, and the requests are served anyway.
    logging.getLogger('waitress.queue').setLevel(logging.ERROR)


def build_parser():
    parser = argparse.ArgumentParser(prog='topn.py', description='TOP_N: publish many articles at once.')
    commands = parser.add_subparsers(dest='command', required=True)
    serve = commands.add_parser('serve', help='run the supervisor, its workers and the web app')
    serve.add_argument('--no-web', action='store_true', help='workers and reaper only')
    serve.add_argument('--no-workers', action='store_true', help='web app only')
    serve.set_defaults(run=cmd_serve)
    commands.add_parser('initdb', help='create the database and apply schema.sql').set_defaults(run=cmd_initdb)
    adduser = commands.add_parser('adduser', help='create a user and print its API token')
    adduser.add_argument('name')
    adduser.add_argument('--password', required=True)
    adduser.add_argument('--admin', action='store_true')
    adduser.add_argument('--vip', action='store_true', help='more dispatch turns per round (TOPN_VIP_TURNS)')
    adduser.set_defaults(run=cmd_adduser)
    submit = commands.add_parser('submit', help='submit a batch from a JSON file or Markdown files')
    submit.add_argument('files', nargs='+')
    submit.add_argument('--user', required=True)
    submit.add_argument('--platform', action='append', default=[],
                        help='a platform to publish to; give it again for more')
    submit.add_argument('--urgent', action='store_true')
    submit.add_argument('--at', metavar='TIME', default=None,
                        help='publish then, not now: ISO 8601, e.g. 2026-12-04T09:00 (read in '
                             'TOPN_DISPLAY_TIMEZONE unless it has an offset)')
    submit.set_defaults(run=cmd_submit)
    status = commands.add_parser('status', help='print queue and task figures as JSON')
    status.add_argument('--user')
    status.set_defaults(run=cmd_status)
    account = commands.add_parser('account', help="store or check a user's login on a platform")
    account.add_argument('action', choices=('set', 'check'))
    account.add_argument('user')
    account.add_argument('platform')
    account.add_argument('--cookies', help='the cookies of a logged-in session: "name=value; name2=value2"')
    account.add_argument('--cookies-file', help='a file holding that cookie string')
    account.add_argument('--site', help='the site to publish to (WordPress): https://blog.example.com')
    account.add_argument('--username', help='the user name to log in with (WordPress)')
    account.add_argument('--password', help='the password to log in with (WordPress)')
    account.add_argument('--password-file', help='a file holding that password')
    account.add_argument('--column', help='the column to file every published article into (Zhihu, optional): '
                                          'its id or its URL, https://www.zhihu.com/column/c_...')
    account.set_defaults(run=cmd_account)
    commands.add_parser('sandbox', help='serve the local sandbox platform on TOPN_SANDBOX_BIND').set_defaults(
        run=cmd_sandbox)
    commands.add_parser('demo', help='create the demo user and run everything locally').set_defaults(run=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        config = Config.from_env()
        configure_logging(config.log_level)
        return args.run(config, args) or 0
    except (ConfigError, CommandError, DatabaseUnavailable) as error:
        print(f'topn: {error}', file=sys.stderr)
        return 2
    except redis.RedisError as error:
        print(f'topn: Redis is not answering: {error}', file=sys.stderr)
        return 2
    except Refused as refusal:
        print(f'topn: {refusal.code}: {refusal.message}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
