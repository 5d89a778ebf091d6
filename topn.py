"""TOP_N: publish many articles to content platforms at once, reliably.

    python topn.py serve [--no-web] [--no-workers]   the service: supervisor, workers, web
    python topn.py initdb                            create the database and tables
    python topn.py adduser NAME --password PW [--admin] [--vip]
    python topn.py submit FILE... --user NAME [--platform P] [--urgent]
    python topn.py status [--user NAME]
    python topn.py demo                              local demo: a demo user, then serve

Configuration comes from TOPN_* environment variables (see config.py and README).
"""

import argparse
import json
import logging
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time

import redis
import waitress

import auth
from config import Config, ConfigError
from db import Database, DatabaseUnavailable
from publishers import load_publishers
from scheduler import Refused, Scheduler, connect_redis
from web import collect_metrics, make_app
from worker import worker_id_for, worker_main

log = logging.getLogger('topn')

BOOT_WINDOW = 5.0
BOOT_FAILURES_TOLERATED = 3
DEMO_USER, DEMO_PASSWORD = 'demo', 'demo'


# -- the supervisor ------------------------------------------------------------------

class Supervisor:
    """Forks the workers, restarts the ones that die, runs the reaper, and serves the web
    app from a thread. Signal handlers only set a flag; `run()` does the work."""

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
        self.db = Database(config.mysql)
        self.redis = connect_redis(config.redis_url)
        self.scheduler = Scheduler(config, self.db, self.redis, load_publishers(config))

    def run(self):
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        if self.run_web:
            self._start_web()
        if self.run_workers:
            for slot in range(self.config.workers):
                self._spawn(slot)
        log.info('supervisor %s running: web=%s workers=%d', os.getpid(), self.run_web,
                 self.config.workers if self.run_workers else 0)
        while not self.stop_requested:
            if self.run_workers:
                self._replace_dead_workers()
                self.scheduler.reap_and_log_errors()
            time.sleep(self.config.reaper_interval)
        self._shutdown()
        return self.exit_code

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    # -- web -------------------------------------------------------------------------

    def _start_web(self):
        host, port = self.config.bind_host_port
        app = make_app(self.config, self.db, self.scheduler)
        self.web_server = waitress.create_server(
            app, host=host, port=port, threads=self.config.web_threads,
            max_request_body_size=self.config.max_request_bytes, ident='topn')
        threading.Thread(target=self.web_server.run, name='web', daemon=True).start()
        log.info('serving on http://%s:%d/', host, port)

    # -- workers -----------------------------------------------------------------------

    def _spawn(self, slot):
        process = multiprocessing.get_context('fork').Process(
            target=self.worker_target, args=(self.config,), name=f'topn-worker-{slot}', daemon=False)
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
            self._release_leases_of(process.pid)
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

    def _release_leases_of(self, pid):
        try:
            released = self.db.expire_leases_of(worker_id_for(pid))
            if released:
                log.warning('%d tasks of the dead worker go back to the queue', released)
        except DatabaseUnavailable as error:
            log.warning('could not release the dead worker\'s leases now (%s); they expire on their own', error)

    # -- shutdown ----------------------------------------------------------------------

    def _shutdown(self):
        log.info('stopping: no new work; running tasks have %.0f s to finish', self.config.shutdown_grace)
        if self.web_server is not None:
            self.web_server.close()
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
                self._release_leases_of(process.pid)
        log.info('stopped')


def _worker_entry(config):
    configure_logging()
    worker_main(config)


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
    payload = batch_from_files(args.files, args.platform, args.urgent)
    scheduler = Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))
    task_ids = scheduler.submit_batch(user['id'], payload)
    print(json.dumps({'task_ids': task_ids}))


def cmd_status(config, args):
    db = Database(config.mysql)
    scheduler = Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))
    report = collect_metrics(db, scheduler)
    if args.user:
        user = db.user_by_name(args.user)
        if user is None:
            raise CommandError(f'no user {args.user!r}')
        rows, total = db.list_tasks(user['id'], limit=50)
        report['tasks'] = [{'task_id': r['task_id'], 'status': r['status'], 'progress': r['progress'],
                            'title': r['article_title'], 'result_url': r['result_url'],
                            'error': r['error_message']} for r in rows]
    print(json.dumps(report, ensure_ascii=False, indent=2))


def cmd_demo(config, args):
    """Set up a demo user (password and a fresh token printed) and run the whole service."""
    db = Database(config.mysql)
    db.initialize()
    token = auth.new_token()
    user = db.user_by_name(DEMO_USER)
    if user is None:
        db.create_user(DEMO_USER, auth.hash_password(DEMO_PASSWORD), auth.token_hash(token))
    else:
        db.set_user_token(user['id'], auth.token_hash(token))
    host, port = config.bind_host_port
    print(f'\nTOP_N is starting on http://{host}:{port}/\n'
          f'  demo login: {DEMO_USER} / {DEMO_PASSWORD}\n'
          f'  API token:  {token}\n'
          f'  try:  curl -s -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\\n'
          f'          -d \'{{"platform": "noop", "articles": [{{"title": "你好", "content": "第一篇"}}]}}\' \\\n'
          f'          http://{host}:{port}/api/publish/create_batch\n', flush=True)
    return Supervisor(config).run()


def batch_from_files(paths, platform, urgent):
    """One JSON batch file (the API's create_batch shape), or Markdown files in which
    every top-level `# heading` starts an article (a file without one is one article
    titled by its file name)."""
    paths = [pathlib.Path(p) for p in paths]
    if len(paths) == 1 and paths[0].suffix == '.json':
        payload = json.loads(paths[0].read_text(encoding='utf-8-sig'))
        if platform:
            payload['platform'] = platform
    else:
        payload = {'platform': platform, 'articles': [a for p in paths for a in markdown_articles(p)]}
    if urgent:
        payload['priority'] = 'urgent'
    return payload


def markdown_articles(path):
    articles, title, body, in_code = [], None, [], False
    for line in path.read_text(encoding='utf-8-sig').splitlines():
        if line.lstrip().startswith('```'):
            in_code = not in_code
        if line.startswith('# ') and not in_code:
            if title is not None or '\n'.join(body).strip():
                articles.append({'title': title or path.stem, 'content': '\n'.join(body).strip()})
            title, body = line[2:].strip(), []
        else:
            body.append(line)
    articles.append({'title': title or path.stem, 'content': '\n'.join(body).strip()})
    return articles


class CommandError(Exception):
    pass


def configure_logging():
    logging.basicConfig(level=os.environ.get('TOPN_LOG_LEVEL', 'INFO'),
                        format='%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s')


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
    submit.add_argument('--platform', default=None)
    submit.add_argument('--urgent', action='store_true')
    submit.set_defaults(run=cmd_submit)
    status = commands.add_parser('status', help='print queue and task figures as JSON')
    status.add_argument('--user')
    status.set_defaults(run=cmd_status)
    commands.add_parser('demo', help='create the demo user and run everything locally').set_defaults(run=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        config = Config.from_env()
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
