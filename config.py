"""Every TOPN_* setting, read once from the environment into one validated object.

Defaults suit a single local box. Anything that reads configuration takes a
`Config` instance; nothing else in the code base looks at `os.environ`.
"""

import dataclasses
import os
import re
import socket
import zoneinfo
from urllib.parse import urlsplit, unquote


LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')
HOST_ID = re.compile(r'[A-Za-z0-9._-]{1,64}')


class ConfigError(ValueError):
    """A TOPN_* variable holds a value we cannot use."""


@dataclasses.dataclass(frozen=True)
class Config:
    mysql_url: str = 'mysql://root@127.0.0.1:3306/topn'
    redis_url: str = 'redis://127.0.0.1:6379/0'
    redis_prefix: str = 'topn'
    bind: str = '127.0.0.1:8080'
    web_threads: int = 8
    max_request_bytes: int = 16 * 1024 * 1024
    session_ttl: float = 12 * 3600.0
    session_cookie_secure: int = 0
    login_failure_delay: float = 1.0
    login_max_failures: int = 5
    login_lockout: float = 900.0
    display_timezone: str = 'Asia/Shanghai'
    workers: int = 4
    worker_slots: int = 2
    user_max_active: int = 10
    user_rate: int = 20
    user_rate_window: int = 60
    user_max_scheduled: int = 100
    batch_max: int = 10
    title_max_chars: int = 500
    body_max_bytes: int = 1024 * 1024
    image_max_bytes: int = 5 * 1024 * 1024
    image_max_count: int = 20
    max_retries: int = 3
    retry_backoff: float = 2.0
    unknown_outcome_settle: float = 15.0
    task_timeout: float = 300.0
    lease_ttl: float = 30.0
    heartbeat_interval: float = 5.0
    reaper_interval: float = 0.5
    reconcile_interval: float = 10.0
    shutdown_grace: float = 30.0
    retention_days: float = 30.0
    vip_turns: int = 2
    noop_delay: float = 0.0
    noop_fail_rate: float = 0.0
    max_drivers: int = 8
    driver_idle: float = 300.0
    driver_reuse: int = 1
    driver_acquire_timeout: float = 30.0
    working_per_core: int = 3
    webdriver_url: str = ''
    grid_session_timeout: float = 300.0
    host_id: str = dataclasses.field(default_factory=socket.gethostname)
    browser_root: str = '/tmp/topn-browsers'
    browser_namespace: str = 'topn'
    secret_key: str = ''
    state_dir: str = 'var'
    sandbox_bind: str = '127.0.0.1:8090'
    sandbox_url: str = 'http://127.0.0.1:8090'
    zhihu_url: str = 'https://zhuanlan.zhihu.com'
    zhihu_www_url: str = 'https://www.zhihu.com'
    zhihu_api_url: str = 'https://api.zhihu.com'
    zhihu_upload_url: str = 'https://zhihu-pics-upload.zhimg.com'
    zhihu_pictures_url: str = 'https://picx.zhimg.com'
    zhihu_pause: float = 300.0
    zhihu_verify_wait: float = 30.0
    log_level: str = 'INFO'
    pacing: tuple = (('zhihu', 60.0), ('sandbox', 0.0), ('wordpress', 0.0))

    @property
    def mysql(self):
        """The MySQL URL split into pymysql connect() arguments."""
        return parse_mysql_url(self.mysql_url)

    def pacing_for(self, platform):
        """Seconds that must pass between two publishes on one account of `platform`."""
        return dict(self.pacing).get(platform, 0.0)

    @property
    def browser_idle_limit(self):
        """Seconds an idle browser is kept. A Grid ends a session idle for its session timeout
        on its own; ours are quit well before, so no task ever meets a session ended under it."""
        if self.webdriver_url:
            return min(self.driver_idle, self.grid_session_timeout / 2)
        return self.driver_idle

    @property
    def bind_host_port(self):
        host, _, port = self.bind.rpartition(':')
        return host or '127.0.0.1', int(port)

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = 'TOPN_' + field.name.upper()
            if name in environ and field.name != 'pacing':
                values[field.name] = _convert(name, environ[name], field.type)
        values['pacing'] = _pacing_from_env(environ, dict(cls.pacing))
        config = cls(**values)
        config.validate()
        return config

    def validate(self):
        _require(self.workers >= 0, 'TOPN_WORKERS', 'must be 0 or more')
        _require(self.worker_slots >= 1, 'TOPN_WORKER_SLOTS', 'must be 1 or more')
        _require(self.web_threads >= 1, 'TOPN_WEB_THREADS', 'must be 1 or more')
        _require(self.user_max_active >= 1, 'TOPN_USER_MAX_ACTIVE', 'must be 1 or more')
        _require(self.user_rate >= 1, 'TOPN_USER_RATE', 'must be 1 or more')
        _require(self.user_max_scheduled >= 0, 'TOPN_USER_MAX_SCHEDULED', 'must be 0 or more')
        _require(self.batch_max >= 1, 'TOPN_BATCH_MAX', 'must be 1 or more')
        _require(self.max_retries >= 0, 'TOPN_MAX_RETRIES', 'must be 0 or more')
        _require(self.retry_backoff >= 0, 'TOPN_RETRY_BACKOFF', 'must be 0 or more')
        _require(self.task_timeout > 0, 'TOPN_TASK_TIMEOUT', 'must be more than 0')
        _require(self.lease_ttl > self.heartbeat_interval > 0, 'TOPN_LEASE_TTL',
                 'must be longer than TOPN_HEARTBEAT_INTERVAL, which must be more than 0')
        _require(self.vip_turns >= 1, 'TOPN_VIP_TURNS', 'must be 1 or more')
        _require(0 <= self.noop_fail_rate <= 1, 'TOPN_NOOP_FAIL_RATE', 'must be between 0 and 1')
        _require(_is_port(self.bind.rpartition(':')[2]), 'TOPN_BIND', 'must look like HOST:PORT')
        _require(_is_port(self.sandbox_bind.rpartition(':')[2]), 'TOPN_SANDBOX_BIND', 'must look like HOST:PORT')
        _require(urlsplit(self.redis_url).scheme in ('redis', 'rediss', 'unix'), 'TOPN_REDIS_URL',
                 'must look like redis://HOST:PORT/DB')
        for name in ('max_request_bytes', 'title_max_chars', 'body_max_bytes', 'image_max_bytes', 'image_max_count', 'user_rate_window',
                     'reaper_interval', 'reconcile_interval', 'driver_acquire_timeout', 'retention_days',
                     'session_ttl', 'login_lockout'):
            _require(getattr(self, name) > 0, 'TOPN_' + name.upper(), 'must be more than 0')
        for name in ('shutdown_grace', 'noop_delay', 'unknown_outcome_settle', 'login_failure_delay', 'zhihu_pause',
                     'zhihu_verify_wait'):
            _require(getattr(self, name) >= 0, 'TOPN_' + name.upper(), 'must be 0 or more')
        _require(self.redis_prefix != '', 'TOPN_REDIS_PREFIX', 'must not be empty')
        _require(self.login_max_failures >= 1, 'TOPN_LOGIN_MAX_FAILURES', 'must be 1 or more')
        _require(self.session_cookie_secure in (0, 1), 'TOPN_SESSION_COOKIE_SECURE', 'must be 0 or 1')
        _require(_is_timezone(self.display_timezone), 'TOPN_DISPLAY_TIMEZONE',
                 'must be an IANA time zone name such as Asia/Shanghai or UTC')
        _require(self.max_drivers >= 1, 'TOPN_MAX_DRIVERS', 'must be 1 or more')
        _require(self.driver_reuse in (0, 1), 'TOPN_DRIVER_REUSE', 'must be 0 or 1')
        _require(self.driver_idle > 0, 'TOPN_DRIVER_IDLE', 'must be more than 0')
        _require(self.grid_session_timeout > 0, 'TOPN_GRID_SESSION_TIMEOUT', 'must be more than 0')
        _require(HOST_ID.fullmatch(self.host_id) is not None, 'TOPN_HOST_ID',
                 'must be 1 to 64 letters, digits, dots, dashes or underscores')
        _require(self.working_per_core >= 1, 'TOPN_WORKING_PER_CORE', 'must be 1 or more')
        _require(re.fullmatch(r'[A-Za-z0-9_.-]+', self.browser_namespace) is not None, 'TOPN_BROWSER_NAMESPACE',
                 'must be letters, digits, dots, dashes or underscores (it names a folder)')
        _require(self.log_level.upper() in LOG_LEVELS, 'TOPN_LOG_LEVEL', f'must be one of {", ".join(LOG_LEVELS)}')
        self.mysql


def parse_mysql_url(url):
    parts = urlsplit(url)
    shape = 'must look like mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE'
    if parts.scheme not in ('mysql', 'mariadb') or not parts.path.strip('/'):
        raise ConfigError(f'TOPN_MYSQL_URL {url!r} {shape}')
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f'TOPN_MYSQL_URL {url!r} has a bad port; it {shape}') from None
    return {
        'host': parts.hostname or '127.0.0.1',
        'port': port or 3306,
        'user': unquote(parts.username or 'root'),
        'password': unquote(parts.password or ''),
        'database': parts.path.strip('/'),
    }


def _pacing_from_env(environ, defaults):
    """TOPN_PACING_<PLATFORM>=seconds, one variable per platform."""
    pacing = dict(defaults)
    for name, raw in environ.items():
        if name.startswith('TOPN_PACING_'):
            seconds = _convert(name, raw, float)
            _require(seconds >= 0, name, 'must be 0 or more')
            pacing[name.removeprefix('TOPN_PACING_').lower()] = seconds
    return tuple(sorted(pacing.items()))


def _convert(name, raw, kind):
    try:
        if kind in (int, 'int'):
            return int(raw)
        if kind in (float, 'float'):
            return float(raw)
    except ValueError:
        raise ConfigError(f'{name}={raw!r} is not a number') from None
    return raw


def _is_timezone(name):
    try:
        zoneinfo.ZoneInfo(name)
        return True
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False


def _is_port(text):
    return text.isdigit() and 0 <= int(text) <= 65535


def _require(condition, name, rule):
    if not condition:
        raise ConfigError(f'{name} {rule}')
