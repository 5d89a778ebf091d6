"""The Bottle app: the JSON API for scripts (and, later, the pages people use).

Errors are mapped to HTTP answers in one place (`json_errors`): a `Refused` carries its
own status and stable code, MySQL or Redis being away is a 503, anything else a 500
whose details stay in the server log.
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


class Unauthorized(Refused):
    status = 401


class Forbidden(Refused):
    status = 403


class BodyTooLarge(Refused):
    status = 413


def make_app(config, db, scheduler):
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
        ('GET', '/healthz', api.health),
    ]
    for method, path, handler in routes:
        app.route(path, method, json_errors(handler))
    for status in (400, 404, 405, 413, 500):
        app.error(status)(bottle_error_as_json)
    return app


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
        header = bottle.request.get_header('Authorization', '')
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
                               f'the request body is {length} bytes; at most {self.config.max_request_bytes} are accepted')
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
        page = _positive_int(query.get('page'), 'page', default=1)
        if page > MAX_PAGE:
            raise InvalidRequest('invalid_page', f'page must be at most {MAX_PAGE}')
        limit = _positive_int(query.get('limit'), 'limit', default=20)
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

    def metrics(self):
        user = self.current_user()
        if not user['is_admin']:
            raise Forbidden('forbidden', 'metrics are for admin users')
        return json_ok(**collect_metrics(self.db, self.scheduler))

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
    }


def _positive_int(raw, name, default):
    if raw in (None, ''):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidRequest(f'invalid_{name}', f'{name} must be a whole number of 1 or more')
    return value
