"""Everything the sandbox platform remembers: accounts, sessions, articles and the fault knobs.

All of it lives in memory behind one lock; the sandbox is a throwaway test platform.
"""

import dataclasses
import hashlib
import hmac
import itertools
import random
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .markup import body_fingerprint, sanitize_html, text_content

SESSION_COOKIE = 'sbx_session'
TITLE_MAX_CHARS = 100
FAULT_LATENCY_MAX_MS = 60_000


class SandboxError(Exception):
    """A refusal the platform explains to its caller; `code` is an English identifier, `message` is UI text."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Session:
    account: str
    expired: bool = False


@dataclass(frozen=True)
class Article:
    id: int
    account: str
    title: str
    body_html: str
    body_sha256: str
    created_at: datetime


@dataclass(frozen=True)
class Image:
    id: int
    account: str
    mime: str
    data: bytes
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class Faults:
    """Run-time knobs that make the platform misbehave the way real platforms do."""

    publish_fail_rate: float = 0.0
    publish_latency_ms: int = 0
    page_latency_ms: int = 0
    expire_sessions: bool = False
    too_frequent: bool = False
    lost_response_rate: float = 0.0
    fail_image_upload: int = 0   # N > 0: the Nth picture upload from now fails and stores nothing

    def updated(self, changes: dict) -> 'Faults':
        """Return a copy with `changes` applied; raise SandboxError('invalid_fault') naming the bad knob."""
        if not isinstance(changes, dict):
            raise SandboxError('invalid_fault', '故障参数必须是 JSON 对象')
        known = {knob.name for knob in dataclasses.fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise SandboxError('invalid_fault', f'未知的故障参数 {name}，可用：{", ".join(sorted(known))}')
            _validate_knob(name, value)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate_knob(name, value):
    if name.endswith('_rate'):
        if not _is_number(value) or not 0 <= value <= 1:
            raise SandboxError('invalid_fault', f'{name} 必须是 0 到 1 之间的数字，收到 {value!r}')
    elif name.endswith('_latency_ms'):
        if not _is_number(value) or not 0 <= value <= FAULT_LATENCY_MAX_MS:
            raise SandboxError('invalid_fault', f'{name} 必须是 0 到 {FAULT_LATENCY_MAX_MS} 之间的毫秒数，收到 {value!r}')
    elif name == 'fail_image_upload':
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
            raise SandboxError('invalid_fault', f'{name} 必须是 0 到 1000 之间的整数，收到 {value!r}')
    elif not isinstance(value, bool):
        raise SandboxError('invalid_fault', f'{name} 必须是 true 或 false，收到 {value!r}')


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Contents:
    passwords: dict = field(default_factory=dict)
    sessions: dict = field(default_factory=dict)
    articles: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)


class SandboxState:
    """The platform's memory. Every method is safe to call from waitress's worker threads.

    Article ids keep increasing across resets, so a stale article URL never names a different article.
    Pass `seed` to make the random fault knobs reproducible.
    """

    def __init__(self, seed=None):
        self._lock = threading.Lock()
        self._contents = _Contents()
        self._article_ids = itertools.count(1)
        self._image_ids = itertools.count(1)
        self._random = random.Random(seed)

    def reset(self):
        with self._lock:
            self._contents = _Contents()

    def create_account(self, name, password):
        _require_text(name, 'name')
        _require_text(password, 'password')
        with self._lock:
            if name in self._contents.passwords:
                raise SandboxError('account_exists', f'用户名 {name} 已被占用')
            self._contents.passwords[name] = password
        return name

    def log_in(self, name, password) -> str:
        """Check the password and return a new session token."""
        with self._lock:
            known = self._contents.passwords.get(name) if isinstance(name, str) else None
            if not _same_password(known, password):
                raise SandboxError('invalid_credentials', '用户名或密码错误')
            token = secrets.token_urlsafe(24)
            self._contents.sessions[token] = Session(account=name)
        return token

    def account_for(self, token) -> str:
        """The account a session token belongs to; SandboxError('not_logged_in') otherwise."""
        with self._lock:
            session = self._contents.sessions.get(token or '')
            if session is None:
                raise SandboxError('not_logged_in', '请先登录')
            if session.expired:
                raise SandboxError('not_logged_in', '登录已过期，请重新登录')
            return session.account

    def faults(self) -> Faults:
        with self._lock:
            return self._contents.faults

    def set_faults(self, changes) -> Faults:
        """Apply knob changes; turning expire_sessions on expires every session that exists right now."""
        with self._lock:
            self._contents.faults = self._contents.faults.updated(changes)
            if changes.get('expire_sessions') is True:
                for session in self._contents.sessions.values():
                    session.expired = True
            return self._contents.faults

    def happens_with(self, rate: float) -> bool:
        """True with probability `rate`: how the random fault knobs decide."""
        with self._lock:
            return self._random.random() < rate

    def publish(self, account, title, body) -> Article:
        title, body_html = _publishable(title, body)
        with self._lock:
            article = Article(
                id=next(self._article_ids),
                account=account,
                title=title,
                body_html=body_html,
                body_sha256=body_fingerprint(body_html),
                created_at=datetime.now(timezone.utc),
            )
            self._contents.articles[article.id] = article
        return article

    def store_image(self, account, mime, data) -> Image:
        """Keep an uploaded picture, as a platform's image host does; the one-shot fault refuses it."""
        if not data or not (mime or '').startswith('image/'):
            raise SandboxError('invalid_image', '只能上传图片')
        with self._lock:
            countdown = self._contents.faults.fail_image_upload
            if countdown:
                self._contents.faults = dataclasses.replace(self._contents.faults, fail_image_upload=countdown - 1)
                if countdown == 1:
                    raise SandboxError('upload_failed', '图片上传失败，请稍后再试')
            image = Image(id=next(self._image_ids), account=account, mime=mime, data=bytes(data),
                          sha256=hashlib.sha256(data).hexdigest(), created_at=datetime.now(timezone.utc))
            self._contents.images[image.id] = image
        return image

    def image(self, image_id) -> Image:
        with self._lock:
            found = self._contents.images.get(image_id)
        if found is None:
            raise SandboxError('image_not_found', '图片不存在')
        return found

    def images(self) -> list:
        with self._lock:
            return list(self._contents.images.values())

    def article(self, article_id) -> Article:
        with self._lock:
            found = self._contents.articles.get(article_id)
        if found is None:
            raise SandboxError('article_not_found', '你似乎来到了没有知识存在的荒原')
        return found

    def articles(self, account=None) -> list:
        """Published articles, oldest first; only `account`'s when given."""
        with self._lock:
            everything = list(self._contents.articles.values())
        if account is None:
            return everything
        return [article for article in everything if article.account == account]


def _same_password(known, given):
    if known is None or not isinstance(given, str):
        return False
    return hmac.compare_digest(known.encode('utf-8'), given.encode('utf-8'))


def _require_text(value, name):
    if not isinstance(value, str) or not value.strip():
        raise SandboxError('invalid_field', f'{name} 不能为空')


def _publishable(title, body):
    """The stored form of an article, or the refusal a real platform would give."""
    if not isinstance(title, str) or not isinstance(body, str):
        raise SandboxError('invalid_field', 'title 和 body 必须是字符串')
    title, body_html = title.strip(), sanitize_html(body)
    if not title or not text_content(body_html).strip():
        raise SandboxError('empty_content', '发布内容不能为空')
    if len(title) > TITLE_MAX_CHARS:
        raise SandboxError('title_too_long', f'标题最多 {TITLE_MAX_CHARS} 个字')
    return title, body_html
