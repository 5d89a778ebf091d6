"""Each user's platform logins (for Zhihu: the cookies of a logged-in session), encrypted at rest.

The key comes from TOPN_SECRET_KEY. On a box where it is not set, a random key is made
once in TOPN_STATE_DIR/secret.key (mode 0600), so a local demo works and a database dump
alone never holds usable cookies. Secrets are decrypted only inside the worker that
publishes for their owner, and are never logged or sent back over HTTP.
"""

import base64
import hashlib
import os
import pathlib

from cryptography.fernet import Fernet, InvalidToken

COOKIE_LIMIT = 16 * 1024


class AccountError(ValueError):
    """Credentials we cannot store or read; the message says what to fix."""


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


def parse_cookies(text):
    """'a=1; b=2' (what a browser's devtools copy gives) -> [('a', '1'), ('b', '2')]."""
    if not isinstance(text, str) or not text.strip():
        raise AccountError('the cookie string is empty; paste it as "name=value; name2=value2"')
    if len(text) > COOKIE_LIMIT:
        raise AccountError(f'the cookie string is over {COOKIE_LIMIT} characters')
    pairs = []
    for part in text.replace('\n', ';').split(';'):
        if not part.strip():
            continue
        name, sep, value = part.strip().partition('=')
        if not sep or not name.strip():
            raise AccountError(f'"{part.strip()[:40]}" is not name=value')
        pairs.append((name.strip(), value.strip()))
    return pairs


class AccountStore:
    def __init__(self, db, secret_key):
        self.db = db
        self.fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest()))

    def save(self, user_id, publisher, cookies):
        """Store (or replace) a user's login for a platform, after checking its shape."""
        pairs = parse_cookies(cookies)
        missing = [name for name in publisher.required_cookies if name not in dict(pairs)]
        if missing:
            raise AccountError(f'{publisher.label or publisher.name} needs the cookies {", ".join(missing)}; '
                               'copy them from a logged-in browser')
        normalized = '; '.join(f'{name}={value}' for name, value in pairs)
        self.db.save_account(user_id, publisher.name, self.fernet.encrypt(normalized.encode()).decode())

    def load(self, user_id, platform):
        """The user's credentials for `platform` as {'cookies': ...}, or None when there are none."""
        row = self.db.account_secret(user_id, platform)
        if row is None:
            return None
        try:
            return {'cookies': self.fernet.decrypt(row.encode()).decode()}
        except InvalidToken:
            raise AccountError(f'the stored {platform} login cannot be decrypted with this TOPN_SECRET_KEY; '
                               'store it again') from None


def check_login(config, db, store, publisher, user_id):
    """Ask the platform, in a real browser, whether the user's stored login still works.
    Records the answer on the account and returns (ok, detail); ok is None when the
    platform could not be asked (network, throttling), which says nothing about the login."""
    import multiprocessing
    from pool import DriverPool, lease_registry
    from publishers.base import PublishError

    account = store.load(user_id, publisher.name)
    if account is None:
        return False, f'no {publisher.name} account stored'
    with multiprocessing.Manager() as manager:
        pool = DriverPool(lease_registry(manager, 1), max_drivers=1, webdriver_url=config.webdriver_url or None,
                          browser_root=config.browser_root, instance=f'{config.redis_prefix}-check')
        try:
            ok, detail = publisher.check_login(pool.acquire(config.driver_acquire_timeout), account)
        except PublishError as error:
            return None, f'could not ask the platform: {error}'
        finally:
            pool.close()
    db.record_account_check(user_id, publisher.name, ok, detail)
    return ok, detail
