"""The refusals a request can meet, and how every error answers over HTTP.

A `Refused` is a request we will not carry out; nothing was changed. It carries its HTTP
status, a stable `code` for scripts and a message for people. `http_error()` is the one
mapping from any exception to (status, code, retry-after): the JSON API and the pages both
render from it, so changing a status is one edit here.
"""

import redis

from db import DatabaseUnavailable


class Refused(Exception):
    status = 400

    def __init__(self, code, message, retry_after=None, article=None, platform=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.article = article  # which article of a batch (from 0), when one is at fault
        self.platform = platform  # which platform of a batch, when one is at fault


class InvalidRequest(Refused):
    status = 400


class Unauthorized(Refused):
    status = 401


class Forbidden(Refused):
    status = 403


class NotFound(Refused):
    status = 404


class Conflict(Refused):
    status = 409


class BodyTooLarge(Refused):
    status = 413


class LimitReached(Refused):
    status = 429


class Unavailable(Refused):
    """Something we need for this request (a browser, a platform) cannot be had right now."""
    status = 503


# Bottle's own errors (no such route, wrong method, a body over its limit) by status.
ROUTING_CODES = {400: 'bad_request', 404: 'not_found', 405: 'method_not_allowed', 413: 'body_too_large'}

MESSAGES = {
    'database_unavailable': 'the database is not answering; try again shortly',
    'redis_unavailable': 'the task queue is not answering; try again shortly',
    'internal_error': 'something went wrong on our side; it is in the server log',
}
OUTAGE_RETRY_AFTER = 5


def http_error(error):
    """(HTTP status, code, retry-after seconds or None) for any exception a request raised.
    Anything unexpected is a 500 whose details belong in the server log, not the answer."""
    if isinstance(error, Refused):
        return error.status, error.code, error.retry_after
    if isinstance(error, DatabaseUnavailable):
        return 503, 'database_unavailable', OUTAGE_RETRY_AFTER
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return 503, 'redis_unavailable', OUTAGE_RETRY_AFTER
    return 500, 'internal_error', None


def message_of(error, code):
    """The message for people that goes with `http_error`'s code."""
    return error.message if isinstance(error, Refused) else MESSAGES[code]


def is_outage(code):
    """A service we depend on is away: worth a warning in the log, not a stack trace."""
    return code in ('database_unavailable', 'redis_unavailable')
