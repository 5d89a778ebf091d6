"""Each user's platform logins, encrypted at rest, and the check that a stored login still works.

A login is a few fields: the cookies of a logged-in session (Zhihu, the sandbox), or a site
with a user name and password (WordPress), which may gain session cookies once a task has
logged in. The fields a platform takes are its publisher's `login_fields`. They are stored
as one encrypted JSON object; cookies are parsed here, once, and publishers get them as
[(name, value)] pairs.

The key comes from TOPN_SECRET_KEY. On a box where it is not set, a random key is made
once in TOPN_STATE_DIR/secret.key (mode 0600), so a local demo works and a database dump
alone never holds usable logins. Secrets are decrypted only inside the processes that
publish or check for their owner, and are never logged or sent back over HTTP.
"""

import base64
import hashlib
import json
import os
import pathlib
import threading

from cryptography.fernet import Fernet, InvalidToken
from selenium.common.exceptions import WebDriverException

from errors import Conflict, InvalidRequest, LimitReached, Unavailable
from pool import DriverPool, PoolBusy, PoolClosed, PoolTimeout
from publishers.base import BadAccount, PublishError

COOKIE_LIMIT = 16 * 1024
FIELD_LIMIT = 2048
CHECKS_AT_ONCE = 2


class AccountError(InvalidRequest):
    """A login we cannot store; the message says what to fix. Nothing was stored."""

    def __init__(self, message, code='invalid_account'):
        super().__init__(code, message)


class AccountUnreadable(Conflict):
    """A stored login that this TOPN_SECRET_KEY cannot decrypt: only storing it again helps."""

    def __init__(self, platform):
        super().__init__('account_unreadable', f'the stored {platform} login cannot be decrypted with this '
                                               'TOPN_SECRET_KEY; store it again')


def load_secret_key(config):
    if config.secret_key:
        return config.secret_key
    path = pathlib.Path(config.state_dir) / 'secret.key'
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'w') as key_file:
            key_file.write(base64.urlsafe_b64encode(os.urandom(32)).decode())
    return path.read_text().strip()


class SecretKeyMismatch(Exception):
    """This host's TOPN_SECRET_KEY is not the key the database's logins are encrypted with."""


def check_secret_key(db, secret_key):
    """Refuse to run with a key other than the one every other host uses: its workers could
    read no stored login. Only a digest of the key is kept, under its own label."""
    digest = hashlib.sha256(b'topn secret key check\0' + secret_key.encode()).hexdigest()
    if db.agreed_setting('secret_key_check', digest) != digest:
        raise SecretKeyMismatch(
            'this host\'s secret key is not the one the stored logins are encrypted with; set TOPN_SECRET_KEY '
            'to the same value on every host (a host without it makes its own in TOPN_STATE_DIR/secret.key)')


def parse_cookies(text):
    """'a=1; b=2' (what a browser's devtools copy gives) -> [('a', '1'), ('b', '2')]."""
    if not isinstance(text, str) or not text.strip():
        raise AccountError('the cookie string is empty; paste it as "name=value; name2=value2"', 'invalid_cookies')
    if len(text) > COOKIE_LIMIT:
        raise AccountError(f'the cookie string is over {COOKIE_LIMIT} characters', 'invalid_cookies')
    pairs = []
    for part in text.replace('\n', ';').split(';'):
        if not part.strip():
            continue
        name, sep, value = part.strip().partition('=')
        if not sep or not name.strip():
            raise AccountError(f'"{part.strip()[:40]}" is not name=value', 'invalid_cookies')
        pairs.append((name.strip(), value.strip()))
    return pairs


def _blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


def missing_cookies(publisher, pairs):
    names = {name for name, _ in pairs}
    return [name for name in publisher.required_cookies if name not in names]


class AccountStore:
    def __init__(self, db, secret_key):
        self.db = db
        self.fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest()))

    def save(self, user_id, publisher, fields):
        """Store (or replace) a user's login for a platform, after checking it: `fields` are
        the publisher's `login_fields`, cookies as the string a browser's devtools copy."""
        stored = self.checked_fields(publisher, fields)
        self.db.save_account(user_id, publisher.name, self._encrypt(stored))

    def checked_fields(self, publisher, fields):
        """The fields to store, or AccountError saying what is wrong with them. An optional
        field left empty is not stored."""
        given = {name: fields.get(name) for name in publisher.login_fields}
        fields = {name: value for name, value in given.items()
                  if name not in publisher.optional_login_fields or not _blank(value)}
        for name, value in fields.items():
            if not isinstance(value, str) or not value.strip():
                raise AccountError(f'{publisher.label or publisher.name} needs {name}', f'missing_{name}')
            if name != 'cookies' and len(value) > FIELD_LIMIT:
                raise AccountError(f'{name} is over {FIELD_LIMIT} characters', f'invalid_{name}')
        if 'cookies' in fields:
            fields['cookies'] = parse_cookies(fields['cookies'])
            missing = missing_cookies(publisher, fields['cookies'])
            if missing:
                raise AccountError(f'{publisher.label or publisher.name} needs the cookies {", ".join(missing)}; '
                                   'copy them from a logged-in browser', 'invalid_cookies')
        try:
            return publisher.check_account(fields)
        except BadAccount as error:
            raise AccountError(str(error)) from None

    def load(self, user_id, platform):
        """The user's login for `platform` as its fields (cookies as [(name, value)]), or None."""
        secret = self.db.account_secret(user_id, platform)
        if secret is None:
            return None
        try:
            plain = self.fernet.decrypt(secret.encode()).decode()
        except InvalidToken:
            raise AccountUnreadable(platform) from None
        fields = json.loads(plain)
        if 'cookies' in fields:
            fields['cookies'] = [tuple(pair) for pair in fields['cookies']]
        return fields

    def optional_fields(self, user_id, publisher):
        """The stored optional fields of a login (not secret: a column name), for showing the
        user what they chose; {} when none are stored or the login cannot be read."""
        if not publisher.optional_login_fields:
            return {}
        try:
            stored = self.load(user_id, publisher.name) or {}
        except AccountUnreadable:
            return {}
        return {name: stored[name] for name in publisher.optional_login_fields if name in stored}

    def update(self, user_id, platform, fields):
        """Merge fresher fields (session cookies a task or a check got) into a stored login."""
        stored = self.load(user_id, platform)
        if stored is not None:
            self.db.replace_account_secret(user_id, platform, self._encrypt({**stored, **fields}))

    def _encrypt(self, fields):
        return self.fernet.encrypt(json.dumps(fields, ensure_ascii=False).encode()).decode()


class LoginChecker:
    """Asks a platform, in a real browser, whether a user's stored login still works, and
    stores the session cookies the platform refreshed meanwhile.

    Its browsers come from a DriverPool under the machine-wide leases, so checks count
    against TOPN_MAX_DRIVERS like the workers' browsers; at most CHECKS_AT_ONCE run at a time.
    Selenium and pool failures become `Unavailable` here, so callers handle refusals only.
    """

    def __init__(self, config, store, leases):
        self.config = config
        self.store = store
        self.leases = leases
        self._slots = threading.BoundedSemaphore(CHECKS_AT_ONCE)
        self._pool = None
        self._pool_lock = threading.Lock()

    def check(self, publisher, user_id):
        """(ok, detail), recorded on the account; ok is None when the platform could not be
        asked (network, throttling), which says nothing about the login."""
        account = self.store.load(user_id, publisher.name)
        if account is None:
            return False, f'no {publisher.name} account stored'
        if not self._slots.acquire(blocking=False):
            raise LimitReached('checks_busy', 'other login checks are running; try again in a few seconds',
                               retry_after=5)
        checked = dict(account)
        try:
            ok, detail = self._ask(publisher, checked)
        finally:
            self._slots.release()
        refreshed = {name: value for name, value in checked.items() if account.get(name) != value}
        if ok and refreshed:
            self.store.update(user_id, publisher.name, refreshed)
        if ok is not None:
            self.store.db.record_account_check(user_id, publisher.name, ok, detail)
        return ok, detail

    def _ask(self, publisher, account):
        try:
            pool = self._driver_pool()
            driver = pool.acquire(self.config.driver_acquire_timeout)
        except (PoolTimeout, PoolBusy, PoolClosed, WebDriverException, TimeoutError) as error:
            raise Unavailable('browser_unavailable', f'no browser could be had for the check: {error}') from None
        try:
            return publisher.check_login(driver, account)
        except PublishError as error:
            return None, f'could not ask the platform: {error}'
        except WebDriverException as error:
            return None, f'the browser failed during the check: {error.msg}'
        finally:
            pool.release(driver)

    def _driver_pool(self):
        """Made on first use, in the process that checks (the supervisor, after it forked)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = DriverPool.from_config(self.leases, self.config)
            return self._pool

    def close(self):
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
