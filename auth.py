"""Passwords, API tokens, web sessions and the wrong-password throttle.

Only hashes of secrets are stored: a leaked database gives away no password, API token
or session. The session cookie holds a random token; its CSRF token, kept beside the
session's hash, must come back with every state-changing request a page makes.
"""

import functools
import hashlib
import hmac
import secrets

from errors import Forbidden

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
PASSWORD_MAX_CHARS = 1024
SESSION_COOKIE = 'topn_session'
CSRF_HEADER = 'X-CSRF-Token'
CSRF_FIELD = 'csrf_token'


def hash_password(password):
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode('utf-8'), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f'scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}'


def verify_password(password, stored):
    try:
        scheme, n, r, p, salt, digest = stored.split('$')
    except ValueError:
        return False
    if scheme != 'scrypt':
        return False
    candidate = hashlib.scrypt(password.encode('utf-8'), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


def check_login_password(password, user):
    """True when `password` is the password of `user` (a row with password_hash, or None).
    An unknown user costs the same scrypt run as a known one, so timing does not tell
    which user names exist."""
    if not isinstance(password, str) or len(password) > PASSWORD_MAX_CHARS:
        password = ''
    stored = user['password_hash'] if user else _placeholder_hash()
    try:
        matches = verify_password(password, stored)
    except UnicodeEncodeError:
        return False
    return matches and user is not None


@functools.cache
def _placeholder_hash():
    return hash_password(secrets.token_urlsafe(16))


def new_token():
    return 'topn_' + secrets.token_urlsafe(32)


def token_hash(token):
    """Tokens are long random strings, so a plain SHA-256 is enough to look them up safely."""
    return hashlib.sha256(token.encode('utf-8')).hexdigest()


# -- web sessions ----------------------------------------------------------------------

def open_session(db, user_id, ttl):
    """A new session for `user_id`: returns (cookie token, CSRF token)."""
    token, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    db.create_session(user_id, token_hash(token), csrf_token, ttl)
    return token, csrf_token


def session_user(db, token):
    """The user row (with `csrf_token`) of a live session, or None."""
    if not token or len(token) > 100:
        return None
    return db.session_user(token_hash(token))


def close_session(db, token):
    if token and len(token) <= 100:
        db.delete_session(token_hash(token))


def require_csrf(user, given):
    """A state-changing request must carry its session's CSRF token (header or form field)."""
    if not csrf_matches(user['csrf_token'], given):
        raise Forbidden('csrf_failed', f'send the CSRF token of your session in the {CSRF_HEADER} header '
                                       f'or the {CSRF_FIELD} field')


def csrf_matches(expected, given):
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode('utf-8'), given.encode('utf-8', 'surrogateescape'))


# -- wrong passwords -------------------------------------------------------------------

class LoginThrottle:
    """Counts wrong passwords per login subject in Redis (keys under `key_prefix`).

    After `max_failures` wrong passwords in a row the subject is locked out until
    `lockout` seconds have passed since the last one; a right password resets the count.
    The subject is the user id when the name exists, else the folded name, so spelling
    a name another way (MySQL compares names case-insensitively) shares the count."""

    def __init__(self, redis_client, key_prefix, max_failures, lockout):
        self.redis = redis_client
        self.key_prefix = key_prefix
        self.max_failures = max_failures
        self.lockout = lockout

    @staticmethod
    def subject(name, user):
        if user is not None:
            return f'user:{user["id"]}'
        folded = name.strip().casefold().encode('utf-8', 'surrogateescape')
        return 'name:' + hashlib.sha256(folded).hexdigest()

    def locked_for(self, subject):
        """Seconds until `subject` may try again; 0 when it may now."""
        key = self.key_prefix + subject
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        failures, ttl_ms = pipe.execute()
        if failures is None or int(failures) < self.max_failures:
            return 0
        return max(1, round(ttl_ms / 1000)) if ttl_ms and ttl_ms > 0 else 1

    def record_failure(self, subject):
        key = self.key_prefix + subject
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.pexpire(key, int(self.lockout * 1000))
        failures, _ = pipe.execute()
        return failures

    def clear(self, subject):
        self.redis.delete(self.key_prefix + subject)
