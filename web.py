"""The Bottle app: the JSON API for scripts, and `make_app`, which also mounts the pages
people use (pages.py).

The API takes a Bearer token, or the session cookie of a logged-in page (then a POST
must carry the session's CSRF token in the X-CSRF-Token header), so the page needs no
other credential. Errors are mapped to HTTP answers in one place (`json_errors`): a
`Refused` carries its own status and stable code, MySQL or Redis being away is a 503,
anything else a 500 whose details stay in the server log.
"""

import datetime
import functools
import json
import logging
import os

import bottle
import redis

import auth
from db import DatabaseUnavailable
from scheduler import InvalidRequest, NotFound, Refused

log = logging.getLogger('topn.web')

TASK_STATUSES = ('pending', 'running', 'success', 'failed', 'retry', 'cancelled')
MAX_STATUS_IDS = 200
MAX_PAGE_SIZE = 100
MAX_PAGE = 1_000_000
SAFE_METHODS = ('GET', 'HEAD')
PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


class Unauthorized(Refused):
    status = 401


class Forbidden(Refused):
    status = 403


class BodyTooLarge(Refused):
    status = 413


def make_app(config, db, scheduler):
    """The whole web app: the JSON API here, the pages from pages.py."""
    import pages  # pages.py builds on this module's helpers, so it is imported once both exist

    app = bottle.Bottle()
    api = Api(config, db, scheduler)
    routes = [
        ('POST', '/api/publish/create_batch', api.create_batch),
        ('GET', '/api/publish/tasks/status', api.tasks_status),
        ('GET', '/api/publish/tasks/list', api.tasks_list),
        ('POST', '/api/publish/tasks/cancel', api.cancel),
        ('POST', '/api/publish/tasks/retry', api.retry),
        ('GET', '/api/publish/tasks/<task_id:re:[0-9a-f-]{36}>', api.task_detail),
        ('GET', '/api/publish/tasks/<task_id:re:[0-9a-f-]{36}>/evidence/<attempt:int>/<name>', api.evidence_file),
        ('GET', '/api/metrics', api.metrics),
        ('GET', '/metrics', api.prometheus_metrics),
        ('GET', '/healthz', api.health),
    ]
    for method, path, handler in routes:
        app.route(path, method, json_errors(handler))
    site = pages.Pages(config, db, scheduler)
    site.mount(app)

    def bottle_error(error):
        """Bottle's own errors (no such route, wrong method): JSON for the API and for
        clients that do not ask for HTML, a small page for browsers."""
        if bottle.request.path.startswith('/api/') or 'text/html' not in bottle.request.get_header('Accept', ''):
            return bottle_error_as_json(error)
        return site.bottle_error_page(error)

    for status in (400, 404, 405, 413, 500):
        app.error(status)(bottle_error)
    app.add_hook('after_request', add_security_headers)
    return app


def add_security_headers():
    """Every answer: no sniffing, no framing, no caching of anyone's data (static files
    set their own caching), and a content policy that allows only our own scripts and styles."""
    response = bottle.response
    response.set_header('X-Content-Type-Options', 'nosniff')
    response.set_header('Referrer-Policy', 'same-origin')
    response.set_header('X-Frame-Options', 'DENY')
    if 'Content-Security-Policy' not in response.headers:
        response.set_header('Content-Security-Policy',
                            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                            "form-action 'self'; frame-ancestors 'none'")
    if 'Cache-Control' not in response.headers:
        response.set_header('Cache-Control', 'no-store')


def json_errors(handler):
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Refused as refusal:
            headers = {'Retry-After': str(refusal.retry_after)} if refusal.retry_after else {}
            if refusal.status == 401:
                headers['WWW-Authenticate'] = 'Bearer'
            return error_response(refusal.status, refusal.code, refusal.message, headers)
        except DatabaseUnavailable as error:
            log.warning('%s %s: %s', bottle.request.method, bottle.request.path, error)
            return error_response(503, 'database_unavailable', 'the database is not answering; try again shortly',
                                  {'Retry-After': '5'})
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning('%s %s: Redis: %s', bottle.request.method, bottle.request.path, error)
            return error_response(503, 'redis_unavailable', 'the task queue is not answering; try again shortly',
                                  {'Retry-After': '5'})
        except bottle.HTTPResponse:
            raise
        except Exception:
            log.exception('%s %s failed', bottle.request.method, bottle.request.path)
            return error_response(500, 'internal_error', 'something went wrong on our side; it is in the server log')
    return wrapper


def error_response(status, code, message, headers=None):
    body = json.dumps({'success': False, 'error': {'code': code, 'message': message}}, ensure_ascii=False)
    response = bottle.HTTPResponse(body, status, headers or {})
    response.content_type = 'application/json; charset=utf-8'
    return response


def bottle_error_as_json(error):
    """Bottle's own errors (no such route, wrong method) in our JSON shape, without tracebacks."""
    codes = {400: 'bad_request', 404: 'not_found', 405: 'method_not_allowed', 413: 'body_too_large',
             500: 'internal_error'}
    bottle.response.content_type = 'application/json; charset=utf-8'
    message = error.body if error.status_code != 500 and isinstance(error.body, str) else 'internal error'
    return json.dumps({'success': False, 'error': {'code': codes.get(error.status_code, 'error'),
                                                   'message': message}}, ensure_ascii=False)


def json_ok(**fields):
    bottle.response.content_type = 'application/json; charset=utf-8'
    return json.dumps({'success': True, **fields}, ensure_ascii=False, default=_json_default)


def _json_default(value):
    if isinstance(value, datetime.datetime):
        return iso8601(value)
    raise TypeError(f'cannot serialize {type(value).__name__}')


def iso8601(value):
    if value is None:
        return None
    return value.replace(tzinfo=datetime.timezone.utc).isoformat(timespec='milliseconds')


EVIDENCE_FILES = ('screenshot.png', 'page.html', 'url.txt')


def task_json(row, evidence=()):
    """A task as the API shows it; `evidence` is [(attempt, [file names])] of failed attempts."""
    return {
        'task_id': row['task_id'],
        'status': row['status'],
        'progress': row['progress'],
        'article_id': row['article_id'],
        'article_title': row['article_title'],
        'platform': row['platform'],
        'priority': row['priority'],
        'created_at': iso8601(row['created_at']),
        'started_at': iso8601(row['started_at']),
        'completed_at': iso8601(row['completed_at']),
        'updated_at': iso8601(row['updated_at']),
        'result_url': row['result_url'],
        'error_message': row['error_message'],
        'retry_count': row['retry_count'],
        'max_retries': row['max_retries'],
        'evidence': [{'attempt': attempt, 'files': [evidence_url(row['task_id'], attempt, name) for name in files]}
                     for attempt, files in evidence],
    }


def evidence_url(task_id, attempt, name):
    return f'/api/publish/tasks/{task_id}/evidence/{attempt}/{name}'


def tasks_json(db, rows):
    evidence = db.evidence_of([row['task_id'] for row in rows if row['status'] in ('failed', 'retry', 'success')])
    return [task_json(row, evidence.get(row['task_id'], ())) for row in rows]


class Api:
    def __init__(self, config, db, scheduler):
        self.config = config
        self.db = db
        self.scheduler = scheduler

    # -- request helpers -----------------------------------------------------------

    def current_user(self):
        """The user of the Bearer token; without an Authorization header, the user of the
        session cookie (a POST must then carry the session's CSRF token)."""
        header = bottle.request.get_header('Authorization')
        if header is None:
            user = auth.session_user(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE))
            if user is not None:
                if bottle.request.method not in SAFE_METHODS:
                    require_csrf(user, bottle.request.get_header(auth.CSRF_HEADER))
                return user
            header = ''
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise Unauthorized('unauthorized', 'send your API token as "Authorization: Bearer <token>"')
        user = self.db.user_by_token_hash(auth.token_hash(token.strip()))
        if user is None:
            raise Unauthorized('unauthorized', 'this API token is not valid')
        return user

    def json_body(self):
        length = bottle.request.content_length
        if length > self.config.max_request_bytes:
            raise BodyTooLarge('body_too_large',
                               f'the request body is {length} bytes; '
                               f'at most {self.config.max_request_bytes} are accepted')
        raw = bottle.request.body.read(self.config.max_request_bytes + 1)
        if len(raw) > self.config.max_request_bytes:
            raise BodyTooLarge('body_too_large', f'at most {self.config.max_request_bytes} bytes are accepted')
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

    # -- routes ------------------------------------------------------------------------

    def create_batch(self):
        user = self.current_user()
        task_ids = self.scheduler.submit_batch(user['id'], self.json_body())
        return json_ok(task_ids=task_ids, message=f'{len(task_ids)} tasks queued')

    def tasks_status(self):
        user = self.current_user()
        raw = bottle.request.query.get('task_ids', '')
        task_ids = [task_id.strip() for task_id in raw.split(',') if task_id.strip()]
        if not task_ids:
            raise InvalidRequest('missing_task_ids', 'pass ?task_ids=ID,ID,...')
        if len(task_ids) > MAX_STATUS_IDS:
            raise InvalidRequest('too_many_task_ids', f'ask for at most {MAX_STATUS_IDS} tasks at once')
        rows = self.db.tasks_by_ids(user['id'], task_ids)
        return json_ok(tasks=tasks_json(self.db, rows))

    def tasks_list(self):
        user = self.current_user()
        query = bottle.request.query
        status = query.get('status') or None
        if status is not None and status not in TASK_STATUSES:
            raise InvalidRequest('invalid_status', f'status must be one of {", ".join(TASK_STATUSES)}')
        page = positive_int(query.get('page'), 'page', default=1)
        if page > MAX_PAGE:
            raise InvalidRequest('invalid_page', f'page must be at most {MAX_PAGE}')
        limit = positive_int(query.get('limit'), 'limit', default=20)
        if limit > MAX_PAGE_SIZE:
            raise InvalidRequest('invalid_limit', f'limit must be at most {MAX_PAGE_SIZE}')
        rows, total = self.db.list_tasks(user['id'], status, (page - 1) * limit, limit)
        return json_ok(tasks=tasks_json(self.db, rows), total=total, page=page, limit=limit)

    def task_detail(self, task_id):
        user = self.current_user()
        row = self.db.task_for_user(user['id'], task_id)
        if row is None:
            raise NotFound('task_not_found', f'no task {task_id}')
        attempts = [{**attempt, 'started_at': iso8601(attempt['started_at']), 'ended_at': iso8601(attempt['ended_at'])}
                    for attempt in self.db.history(task_id)]
        return json_ok(task={**tasks_json(self.db, [row])[0], 'attempts': attempts})

    def evidence_file(self, task_id, attempt, name):
        """A failed attempt's screenshot, page or URL, for the task's owner only."""
        user = self.current_user()
        if name not in EVIDENCE_FILES or self.db.task_for_user(user['id'], task_id) is None:
            raise NotFound('evidence_not_found', 'no such evidence')
        folder = os.path.join(self.config.evidence_dir, task_id, str(attempt))
        response = bottle.static_file(name, root=os.path.abspath(folder))
        if response.status_code == 404:
            raise NotFound('evidence_not_found', 'no such evidence')
        # A platform's page, saved as it was: shown in a sandbox without scripts or our origin.
        response.set_header('Content-Security-Policy', 'sandbox')
        response.set_header('Cache-Control', 'private, no-store')
        return response

    def cancel(self):
        user = self.current_user()
        task_id = self.task_id_from_body()
        outcome = self.scheduler.cancel(user['id'], task_id)
        if outcome == 'cancelled':
            return json_ok(task_id=task_id, status='cancelled', message='task cancelled')
        return json_ok(task_id=task_id, status='running', cancel_requested=True,
                       message='the task is running; it stops at its next step, unless the platform has already '
                               'accepted the article')

    def retry(self):
        user = self.current_user()
        task_id = self.task_id_from_body()
        self.scheduler.retry(user['id'], task_id)
        return json_ok(task_id=task_id, status='pending', message='task queued again')

    def admin_user(self):
        user = self.current_user()
        if not user['is_admin']:
            raise Forbidden('forbidden', 'metrics are for admin users')
        return user

    def metrics(self):
        self.admin_user()
        return json_ok(**collect_metrics(self.db, self.scheduler))

    def prometheus_metrics(self):
        self.admin_user()
        bottle.response.content_type = PROMETHEUS_CONTENT_TYPE
        return prometheus_text(collect_metrics(self.db, self.scheduler))

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


def collect_metrics(db, scheduler):
    by_status, active_users, avg_seconds = db.metrics()
    finished = by_status.get('success', 0) + by_status.get('failed', 0)
    queues = scheduler.queue_lengths()
    names = db.user_names(list(queues))
    return {
        'active_users': active_users,
        'total_tasks': sum(by_status.values()),
        'running_tasks': by_status.get('running', 0),
        'tasks_by_status': {status: by_status.get(status, 0) for status in TASK_STATUSES},
        'queue_length_per_user': {names.get(user_id, str(user_id)): n for user_id, n in queues.items()},
        'waiting_retries': scheduler.waiting_retries(),
        'success_rate': round(by_status.get('success', 0) / finished, 4) if finished else None,
        'avg_task_seconds': round(avg_seconds, 3) if avg_seconds is not None else None,
        'browser_pool': scheduler.pool_usage(scheduler.config.max_drivers),
    }


def prometheus_text(metrics):
    """`collect_metrics` in the Prometheus text exposition format (all gauges)."""
    lines = []

    def gauge(name, help_text, samples):
        lines.extend((f'# HELP topn_{name} {help_text}', f'# TYPE topn_{name} gauge'))
        for labels, value in samples:
            if value is None:
                continue
            label_text = ','.join(f'{key}="{_prometheus_label(text)}"' for key, text in labels.items())
            lines.append(f'topn_{name}{{{label_text}}} {value}' if label_text else f'topn_{name} {value}')

    gauge('active_users', 'Users with unfinished tasks.', [({}, metrics['active_users'])])
    gauge('tasks', 'Tasks by status.', [({'status': status}, n) for status, n in metrics['tasks_by_status'].items()])
    gauge('running_tasks', 'Tasks being published now.', [({}, metrics['running_tasks'])])
    gauge('queue_length', 'Task ids queued in Redis, per user.',
          [({'user': user}, n) for user, n in sorted(metrics['queue_length_per_user'].items())])
    gauge('waiting_retries', 'Tasks waiting out a retry backoff.', [({}, metrics['waiting_retries'])])
    gauge('success_ratio', 'Published tasks among finished ones (success or failed).', [({}, metrics['success_rate'])])
    gauge('task_seconds_avg', 'Average time of a published task, start to finish.',
          [({}, metrics['avg_task_seconds'])])
    pool = metrics['browser_pool']
    gauge('browsers', 'Headless browsers on the machine, by state.',
          [({'state': 'leased'}, pool['leased']), ({'state': 'idle'}, pool['idle'])])
    gauge('browsers_max', 'The cap on live browsers (TOPN_MAX_DRIVERS).', [({}, pool['max'])])
    return '\n'.join(lines) + '\n'


def _prometheus_label(text):
    return str(text).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def require_csrf(user, given):
    if not auth.csrf_matches(user['csrf_token'], given):
        raise Forbidden('csrf_failed', f'send the CSRF token of your session in the {auth.CSRF_HEADER} header '
                                       'or the csrf_token field')


def positive_int(raw, name, default):
    if raw in (None, ''):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidRequest(f'invalid_{name}', f'{name} must be a whole number of 1 or more')
    return value
