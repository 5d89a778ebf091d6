"""The interface every platform publisher implements, and what it is handed per attempt.

A publisher gets an `Attempt` and returns the URL of the article it verified on the
platform, or raises `PublishError`. It calls `attempt.progress(percent)` between steps:
that is where a cancel, a timeout or a lost lease stops it. Just before the step that
makes the platform accept the article it calls `attempt.mark_submitted()`: from then on
a cancel no longer stops it (the article is out; the task ends `success` with its URL).
"""

import functools
import time

import content
import images
from tasks import UNKNOWN_OUTCOMES

PACING_POLL = 0.5


class PublishError(Exception):
    """The platform refused the article or the flow broke.

    `retryable=False` for what another attempt cannot fix (an expired login, an article
    the platform rejects), so no retries are spent on it. `refused=True` when, although it
    came after the submit click, the platform certainly did not take the article (it said
    no, or we looked and it is not there): the next attempt then need not look first.
    `retry_after` is the least wait, in seconds, before a retry (a platform's risk control or
    throttling wants a pause, not the usual quick retry). `answer` is the platform's own
    answer (JSON text) to the request that failed, kept with the attempt's evidence.
    """

    def __init__(self, message, retryable=True, refused=False, retry_after=0.0, answer=None):
        super().__init__(message)
        self.retryable = retryable
        self.refused = refused
        self.retry_after = retry_after
        self.answer = answer


class BadAccount(ValueError):
    """A login a user wants to store that cannot work (a site that is not the platform, a
    field missing); the message says why in words the user can act on. Nothing is stored."""


class AttemptStopped(Exception):
    """The attempt must stop now; the worker records why."""


class AttemptCancelled(AttemptStopped):
    pass


class AttemptTimedOut(AttemptStopped):
    pass


class AttemptSuperseded(AttemptStopped):
    """The reaper took the task back (our lease expired): someone else may run it now."""


class LoginExpired(PublishError):
    """The stored login no longer works: only the user can fix it, so no retries."""

    def __init__(self, message):
        super().__init__(message, retryable=False, refused=True)


class Attempt:
    """One attempt at one task, as a publisher sees it.

    Browser publishers also get `driver` (a leased WebDriver with no state in it) and
    `account` (the user's credentials for this platform, e.g. {'cookies': 'a=1; b=2'}).
    `platform_ref` is what an earlier attempt remembered with `remember_platform_ref`
    (e.g. a draft id), so a retry can continue that draft instead of making another.
    `topics` are the topic names the user gave for the article (None when none were named).
    A publisher adds `notes` for what the user should know about a published article.
    """

    def __init__(self, task, report_progress, timeout, clock=time.monotonic,
                 remember_ref=None, driver=None, account=None, save_account=None, local_pictures=None,
                 picture_memory=None, image_max_bytes=5 * 1024 * 1024):
        self.task_id = task['task_id']
        self.user_id = task['user_id']
        self.title = task['article_title']
        self.content = task['article_content']
        self.platform = task['platform']
        self.number = task['attempt']
        self.earlier_attempts = task.get('earlier_attempts', [])
        self.started_at = task.get('started_at')
        self.platform_ref = task.get('platform_ref')
        self.topics = task.get('topics')
        self.notes = []
        self.driver = driver
        self.account = account
        self.submitted = False
        self.cancel_requested = False
        self._report_progress = report_progress
        self._remember_ref = remember_ref
        self._save_account = save_account
        self._local_pictures = local_pictures or (lambda: {})
        self._picture_memory = picture_memory
        self._image_max_bytes = image_max_bytes
        self._pictures = None
        self._submit_gate = lambda: 0
        self._last_percent = 0
        self._clock = clock
        self._deadline = clock() + timeout
        self._timeout = timeout

    @functools.cached_property
    def body_html(self):
        return content.render_markdown(self.content)

    def pictures(self):
        """The pictures the body references, in order: those sent with the article (stored
        with the task) and those by URL, fetched now. One that cannot be fetched fails the
        attempt with a message naming its URL."""
        if self._pictures is not None:
            return self._pictures
        local = self._local_pictures()
        found = []
        for source in images.sources_in(self.body_html):
            if not images.is_remote(source):
                if source not in local:
                    raise PublishError(f'图片 {source} 没有随文章保存 (the picture {source} was not stored with the '
                                       'article)', retryable=False)
                found.append(local[source])
                continue
            try:
                found.append(images.fetch_picture(source, self._image_max_bytes))
            except images.PictureUnavailable as error:
                raise PublishError(str(error), retryable=error.retryable) from None
        self._pictures = found
        return found

    def rehosted_url(self, picture, place):
        """Where this account already has `picture` on the platform (`place`: e.g. a site and
        post), or None: a retry does not upload it again."""
        return self._picture_memory.get(picture, place) if self._picture_memory else None

    def remember_rehosted(self, picture, place, url):
        if self._picture_memory:
            self._picture_memory.put(picture, place, url)

    @property
    def seconds_left(self):
        return max(0.0, self._deadline - self._clock())

    def set_submit_gate(self, gate):
        """`gate()` answers how many seconds this account must still wait before submitting."""
        self._submit_gate = gate

    def remember_platform_ref(self, ref):
        """Persist a platform-side id (a draft id) at once: if this attempt dies, the next continues it."""
        self.platform_ref = ref
        if self._remember_ref is not None:
            self._remember_ref(ref)

    def note(self, text):
        """Something the user should know about the published article (shown with its result)."""
        self.notes.append(text)

    def remember_account(self, fields):
        """Store changed login fields of this account (e.g. fresh session cookies), merged
        into what is stored, so the next task starts from them."""
        self.account = {**(self.account or {}), **fields}
        if self._save_account is not None:
            self._save_account(fields)

    @property
    def outcome_unknown(self):
        """True when an earlier attempt ended without us knowing whether the platform
        took the article (its worker vanished, it timed out, or it failed after the
        submit click): look on the platform before publishing again."""
        return any(earlier['outcome'] in UNKNOWN_OUTCOMES for earlier in self.earlier_attempts)

    @property
    def first_started_at(self):
        """When the first attempt at this task began (naive UTC): anything this account
        published with the same title and body since then may be ours."""
        starts = [earlier['started_at'] for earlier in self.earlier_attempts] + [self.started_at]
        return min(start for start in starts if start is not None) if any(starts) else None

    def progress(self, percent):
        """Record progress and stop the attempt if it was cancelled, timed out or taken back."""
        if self._clock() > self._deadline:
            raise AttemptTimedOut(f'timed out after {self._timeout:g} s')
        self._last_percent = percent
        cancel_requested = self._report_progress(percent)
        if cancel_requested is None:
            raise AttemptSuperseded('the task was taken back from this worker')
        self.cancel_requested = cancel_requested
        if cancel_requested and not self.submitted:
            raise AttemptCancelled('cancelled by the user')

    def mark_submitted(self):
        """Called right before the click or request that publishes. Waits here, still
        cancellable, while the account's pacing says the last submit was too recent."""
        while (wait := self._submit_gate()) > 0:
            self.progress(self._last_percent)
            time.sleep(min(wait, PACING_POLL))
        self.submitted = True


class Publisher:
    """Base class: `name` is the platform name users pick; `publish` does the work.

    Browser publishers set `needs_browser` and implement `check_login(driver, account)`,
    which answers (ok, detail) without publishing anything; it may change the fields of
    `account` in place (session cookies the platform refreshed), and the caller stores what
    changed. `login_fields` names what a user stores for the platform (cookies, or a site
    with a user name and password), `optional_login_fields` those of them a user may leave
    out (a column to file articles into); `required_cookies` the cookies a cookie login must
    hold. `check_account(fields)` returns the fields to store, or raises BadAccount.
    """
    name = None
    label = None
    needs_browser = False
    login_fields = ('cookies',)
    optional_login_fields = ()
    required_cookies = ()

    @classmethod
    def from_config(cls, config):
        return cls()

    def publish(self, attempt):
        raise NotImplementedError

    def check_account(self, fields):
        return fields

    def check_login(self, driver, account):
        raise NotImplementedError
