"""What the JSON API (api.py) and the pages (pages.py) share: how a task and its times are
shown, the paging of task lists, JSON answers, and the headers every answer carries.

The two leaves import this module and never each other; topn.py assembles them into one app.
"""

import datetime
import json

import bottle

import tasks
from db import topics_of
from errors import InvalidRequest

MAX_PAGE_SIZE = 100
MAX_PAGE = 1_000_000
DEFAULT_PAGE_SIZE = 20


# -- tasks as the outside sees them --------------------------------------------------------

def iso8601(value):
    """A naive UTC time from MySQL as ISO 8601 with its offset; None stays None."""
    if value is None:
        return None
    return value.replace(tzinfo=datetime.timezone.utc).isoformat(timespec='milliseconds')


def evidence_url(task_id, attempt, name):
    return f'/api/publish/tasks/{task_id}/evidence/{attempt}/{name}'


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
        'result_note': row['result_note'],
        'topics': topics_of(row['topics']),
        'publish_at': iso8601(row['publish_at']),
        'batch_id': row['batch_id'],
        'article_index': row['article_index'],
        'error_message': row['error_message'],
        'retry_count': row['retry_count'],
        'max_retries': row['max_retries'],
        'evidence': [{'attempt': attempt, 'files': [evidence_url(row['task_id'], attempt, name) for name in files]}
                     for attempt, files in evidence],
    }


def attempt_json(attempt):
    return {**attempt, 'started_at': iso8601(attempt['started_at']), 'ended_at': iso8601(attempt['ended_at'])}


# -- paging ---------------------------------------------------------------------------------

def task_list_query(query, default_limit=DEFAULT_PAGE_SIZE):
    """(status or None, page from 1, page size) of a task list, from a query string."""
    status = query.get('status') or None
    if status is not None and status not in tasks.STATUSES:
        raise InvalidRequest('invalid_status', f'status must be one of {", ".join(tasks.STATUSES)}')
    page = positive_int(query.get('page'), 'page', default=1)
    if page > MAX_PAGE:
        raise InvalidRequest('invalid_page', f'page must be at most {MAX_PAGE}')
    limit = positive_int(query.get('limit'), 'limit', default=default_limit)
    if limit > MAX_PAGE_SIZE:
        raise InvalidRequest('invalid_limit', f'limit must be at most {MAX_PAGE_SIZE}')
    return status, page, limit


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


# -- answers --------------------------------------------------------------------------------

def json_ok(**fields):
    bottle.response.content_type = 'application/json; charset=utf-8'
    return json.dumps({'success': True, **fields}, ensure_ascii=False, default=_json_default)


def json_error(status, code, message, headers=None, article=None, platform=None):
    response = bottle.HTTPResponse(json_error_body(code, message, article, platform), status, headers or {})
    response.content_type = 'application/json; charset=utf-8'
    return response


def json_error_body(code, message, article=None, platform=None):
    """The one shape of every error the JSON API answers with; `article_index` and
    `platform` say which part of a batch is at fault, when one is."""
    error = {'code': code, 'message': message}
    if article is not None:
        error['article_index'] = article
    if platform is not None:
        error['platform'] = platform
    return json.dumps({'success': False, 'error': error}, ensure_ascii=False)


def _json_default(value):
    if isinstance(value, datetime.datetime):
        return iso8601(value)
    raise TypeError(f'cannot serialize {type(value).__name__}')


def retry_after_header(seconds):
    return {'Retry-After': str(seconds)} if seconds else {}


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


def wants_html():
    """A browser asking for a page, rather than a script or the API."""
    return not bottle.request.path.startswith('/api/') and 'text/html' in bottle.request.get_header('Accept', '')
