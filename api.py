"""The JSON API for scripts: submit batches, watch, cancel and retry tasks, read figures.

It takes a Bearer token, or the session cookie of a logged-in page (then a POST must carry
the session's CSRF token in the X-CSRF-Token header), so the page needs no other credential.
Every error answers in one JSON shape with the status and code `errors.http_error` gives it.
"""

import datetime
import functools
import json
import logging

import bottle
import redis

import auth
import errors
import tasks
from db import DatabaseUnavailable
from errors import BodyTooLarge, Forbidden, InvalidRequest, NotFound, Unauthorized
from web import (attempt_json, iso8601, json_error, json_error_body, json_ok, retry_after_header, task_json,
                 task_list_query)

log = logging.getLogger('topn.api')

MAX_STATUS_IDS = 200
SAFE_METHODS = ('GET', 'HEAD')
PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
EVIDENCE_TYPES = {'png': 'image/png', 'html': 'text/html; charset=utf-8', 'txt': 'text/plain; charset=utf-8',
                  'json': 'application/json; charset=utf-8'}
TASK_ID = '<task_id:re:[0-9a-f-]{36}>'


def json_errors(handler):
    """Answer whatever a handler raises as JSON: refusals with their own status and code,
    outages as 503, anything else as a 500 whose details stay in the server log."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Exception as error:
            return error_answer(error)
    return wrapper


def error_answer(error):
    status, code, retry_after = errors.http_error(error)
    if status == 500:
        log.exception('%s %s failed', bottle.request.method, bottle.request.path)
    elif errors.is_outage(code):
        log.warning('%s %s: %s', bottle.request.method, bottle.request.path, error)
    headers = retry_after_header(retry_after)
    if status == 401:
        headers['WWW-Authenticate'] = 'Bearer'
    return json_error(status, code, errors.message_of(error, code), headers, getattr(error, 'article', None),
                      getattr(error, 'platform', None))


def routing_error_answer(error):
    """Bottle's own errors (no such route, wrong method) in our JSON shape, without tracebacks;
    Bottle keeps its headers (Allow)."""
    code = errors.ROUTING_CODES.get(error.status_code, 'internal_error')
    message = error.body if code != 'internal_error' and isinstance(error.body, str) else 'internal error'
    bottle.response.content_type = 'application/json; charset=utf-8'
    return json_error_body(code, message)


class Api:
    def __init__(self, config, db, scheduler):
        self.config = config
        self.db = db
        self.scheduler = scheduler

    def mount(self, app):
        routes = [
            ('POST', '/api/publish/create_batch', self.create_batch),
            ('GET', '/api/publish/tasks/status', self.tasks_status),
            ('GET', '/api/publish/tasks/list', self.tasks_list),
            ('POST', '/api/publish/tasks/cancel', self.cancel),
            ('POST', '/api/publish/tasks/retry', self.retry),
            ('GET', f'/api/publish/tasks/{TASK_ID}', self.task_detail),
            ('GET', f'/api/publish/tasks/{TASK_ID}/evidence/<attempt:int>/<name>', self.evidence_file),
            ('GET', '/api/metrics', self.metrics),
            ('GET', '/metrics', self.prometheus_metrics),
            ('GET', '/healthz', self.health),
        ]
        for method, path, handler in routes:
            app.route(path, method, json_errors(handler))

    # -- request helpers -----------------------------------------------------------

    def current_user(self):
        """The user of the Bearer token; without an Authorization header, the user of the
        session cookie (a POST must then carry the session's CSRF token)."""
        header = bottle.request.get_header('Authorization')
        if header is None:
            user = auth.session_user(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE))
            if user is not None:
                if bottle.request.method not in SAFE_METHODS:
                    auth.require_csrf(user, bottle.request.get_header(auth.CSRF_HEADER))
                return user
            header = ''
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise Unauthorized('unauthorized', 'send your API token as "Authorization: Bearer <token>"')
        user = self.db.user_by_token_hash(auth.token_hash(token.strip()))
        if user is None:
            raise Unauthorized('unauthorized', 'this API token is not valid')
        return user

    def admin_user(self):
        user = self.current_user()
        if not user['is_admin']:
            raise Forbidden('forbidden', 'metrics are for admin users')
        return user

    def json_body(self):
        limit = self.config.max_request_bytes
        if bottle.request.content_length > limit:
            raise BodyTooLarge('body_too_large',
                               f'the request body is {bottle.request.content_length} bytes; at most {limit} are accepted')
        raw = bottle.request.body.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge('body_too_large', f'at most {limit} bytes are accepted')
        try:
            return json.loads(raw.decode('utf-8'))
        except (ValueError, RecursionError) as error:
            raise InvalidRequest('invalid_json', f'the request body is not valid UTF-8 JSON: {error}') from None

    def task_id_from_body(self):
        body = self.json_body()
        task_id = body.get('task_id') if isinstance(body, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequest('missing_task_id', 'send {"task_id": "..."}')
        return task_id

    def tasks_json(self, rows):
        evidence = self.db.evidence_of([row['task_id'] for row in rows
                                        if row['status'] in (tasks.FAILED, tasks.RETRY, tasks.SUCCESS)])
        return [task_json(row, evidence.get(row['task_id'], ())) for row in rows]

    # -- routes ------------------------------------------------------------------------

    def create_batch(self):
        user = self.current_user()
        task_ids = self.scheduler.submit_batch(user['id'], self.json_body())
        first = self.db.task_for_user(user['id'], task_ids[0])
        if first is not None and first['status'] == tasks.SCHEDULED:
            publish_at = iso8601(first['publish_at'])
            return json_ok(task_ids=task_ids, publish_at=publish_at,
                           message=f'{len(task_ids)} tasks scheduled for {publish_at}')
        return json_ok(task_ids=task_ids, message=f'{len(task_ids)} tasks queued')

    def tasks_status(self):
        user = self.current_user()
        raw = bottle.request.query.get('task_ids', '')
        task_ids = [task_id.strip() for task_id in raw.split(',') if task_id.strip()]
        if not task_ids:
            raise InvalidRequest('missing_task_ids', 'pass ?task_ids=ID,ID,...')
        if len(task_ids) > MAX_STATUS_IDS:
            raise InvalidRequest('too_many_task_ids', f'ask for at most {MAX_STATUS_IDS} tasks at once')
        return json_ok(tasks=self.tasks_json(self.db.tasks_by_ids(user['id'], task_ids)))

    def tasks_list(self):
        user = self.current_user()
        status, page, limit = task_list_query(bottle.request.query)
        rows, counts = self.db.task_page(user['id'], status, (page - 1) * limit, limit)
        total = counts.get(status, 0) if status else sum(counts.values())
        return json_ok(tasks=self.tasks_json(rows), total=total, page=page, limit=limit)

    def task_detail(self, task_id):
        user = self.current_user()
        row = self.db.task_for_user(user['id'], task_id)
        if row is None:
            raise NotFound('task_not_found', f'no task {task_id}')
        attempts = [attempt_json(attempt) for attempt in self.db.history(task_id)]
        return json_ok(task={**self.tasks_json([row])[0], 'attempts': attempts})

    def evidence_file(self, task_id, attempt, name):
        """A failed attempt's screenshot, page or URL, for the task's owner only."""
        user = self.current_user()
        if name not in tasks.EVIDENCE_FILES or self.db.task_for_user(user['id'], task_id) is None:
            raise NotFound('evidence_not_found', 'no such evidence')
        data = self.db.evidence_file(task_id, attempt, name)
        if data is None:
            raise NotFound('evidence_not_found', 'no such evidence')
        # A platform's page, saved as it was: shown in a sandbox without scripts or our origin.
        return bottle.HTTPResponse(data, 200, {
            'Content-Type': EVIDENCE_TYPES[name.rpartition('.')[2]], 'Content-Security-Policy': 'sandbox',
            'Cache-Control': 'private, no-store', 'X-Content-Type-Options': 'nosniff'})

    def cancel(self):
        user = self.current_user()
        task_id = self.task_id_from_body()
        if self.scheduler.cancel(user['id'], task_id) == tasks.CANCELLED:
            return json_ok(task_id=task_id, status=tasks.CANCELLED, message='task cancelled')
        return json_ok(task_id=task_id, status=tasks.RUNNING, cancel_requested=True,
                       message='the task is running; it stops at its next step, unless the platform has already '
                               'accepted the article')

    def retry(self):
        user = self.current_user()
        task_id = self.task_id_from_body()
        self.scheduler.retry(user['id'], task_id)
        return json_ok(task_id=task_id, status=tasks.PENDING, message='task queued again')

    def metrics(self):
        self.admin_user()
        return json_ok(**self.scheduler.metrics())

    def prometheus_metrics(self):
        self.admin_user()
        bottle.response.content_type = PROMETHEUS_CONTENT_TYPE
        return prometheus_text(self.scheduler.metrics())

    def health(self):
        checks = {}
        for name, probe in (('mysql', self.db.ping), ('redis', self.scheduler.redis.ping)):
            try:
                probe()
                checks[name] = 'ok'
            except (DatabaseUnavailable, redis.RedisError) as error:
                checks[name] = f'down: {error}'
        healthy = all(value == 'ok' for value in checks.values())
        bottle.response.status = 200 if healthy else 503
        bottle.response.content_type = 'application/json; charset=utf-8'
        return json.dumps({'success': healthy, **checks})


def prometheus_text(metrics):
    """`Scheduler.metrics()` in the Prometheus text exposition format (all gauges)."""
    lines = []

    def gauge(name, help_text, samples):
        lines.extend((f'# HELP topn_{name} {help_text}', f'# TYPE topn_{name} gauge'))
        for labels, value in samples:
            if value is None:
                continue
            label_text = ','.join(f'{key}="{_prometheus_label(text)}"' for key, text in labels.items())
            lines.append(f'topn_{name}{{{label_text}}} {value}' if label_text else f'topn_{name} {value}')

    gauge('active_users', 'Users with tasks queued or running.', [({}, metrics['active_users'])])
    gauge('tasks', 'Tasks by status.', [({'status': status}, n) for status, n in metrics['tasks_by_status'].items()])
    gauge('running_tasks', 'Tasks being published now.', [({}, metrics['running_tasks'])])
    gauge('queue_length', 'Task ids queued in Redis, per user.',
          [({'user': user}, n) for user, n in sorted(metrics['queue_length_per_user'].items())])
    gauge('waiting_retries', 'Tasks waiting out a retry backoff.', [({}, metrics['waiting_retries'])])
    gauge('scheduled_tasks', 'Tasks waiting for their publish_at, per user.',
          [({'user': user}, n) for user, n in sorted(metrics['scheduled_per_user'].items())])
    next_due = metrics['next_scheduled_at']
    gauge('next_scheduled_timestamp_seconds', 'When the next scheduled task is due (Unix time).',
          [({}, next_due and round(next_due.replace(tzinfo=datetime.timezone.utc).timestamp(), 3))])
    gauge('success_ratio', 'Published tasks among finished ones (success or failed).', [({}, metrics['success_rate'])])
    gauge('task_seconds_avg', 'Average time of a published task, start to finish.',
          [({}, metrics['avg_task_seconds'])])
    pool = metrics['browser_pool']
    gauge('browsers', 'Headless browsers on the machine, by state.',
          [({'state': 'working'}, pool['working']), ({'state': 'idle'}, pool['idle'])])
    gauge('browsers_max', 'The cap on live browsers of one host (TOPN_MAX_DRIVERS).', [({}, pool['max'])])
    hosts = metrics['hosts']
    gauge('host_up', 'Hosts heard from within TOPN_LEASE_TTL (1), silent (0); cleanly stopped ones are absent.',
          [({'host': h['host']}, int(h['state'] == 'up')) for h in hosts if h['state'] != 'stopped'])
    gauge('host_heartbeat_age_seconds', 'Seconds since each host last renewed its heartbeat.',
          [({'host': h['host']}, h['silent_seconds']) for h in hosts if h['state'] != 'stopped'])
    gauge('host_workers', 'Worker processes of each host.',
          [({'host': h['host']}, len(h['workers'])) for h in hosts if h['state'] != 'stopped'])
    gauge('host_browsers', 'Browsers of each host, by state.',
          [({'host': h['host'], 'state': state}, h['browsers'][state])
           for h in hosts if h['state'] != 'stopped' for state in ('working', 'idle')])
    return '\n'.join(lines) + '\n'


def _prometheus_label(text):
    return str(text).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')
