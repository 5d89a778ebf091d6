"""Zhihu (知乎) column articles, published through the logged-in page's own API calls.

Zhihu has no publishing API, but its editor talks JSON to endpoints that take the session
cookies. The most complete public tools (zhihu_obsidian, Wechatsync) call those endpoints
directly; we do the same from inside a real browser page, so the requests carry the
browser's own cookies and fingerprint, and no editor selector can break under us (selectors
breaking is the top complaint about DOM tools).

Fresh cookies: `__zse_ck` expires on a schedule and only Zhihu's own page script renews it
(a challenge page's script sets it and reloads). So before anything else a real Zhihu page
is opened, the page zhihu_obsidian opens for the same reason, and given time to settle;
cookies its script changed are stored back (encrypted), so the next task starts from them.

Exactly once: Zhihu publishes a draft under the draft's own id, so the draft id is
remembered (persisted) the moment it exists and before anything is published. A later
attempt that holds it first looks at `/p/<id>`: published means done, otherwise it
continues the same draft. Publishing one draft id again cannot make a second article.
Without a remembered id nothing of ours can be out: the id is persisted before the publish
request, and a failed persist stops the attempt.

Verified as a reader: success is claimed only once `/p/<id>`, read without the account's
cookies, shows in its js-initialData the article published, visible, normal, by this
account and at its URL (the checks of Wechatsync's publication-inspection/zhihu.ts); a
page titled 「你似乎来到了没有知识存在的荒原」 is a not-found page even when it answers 200.
The URL is built from the draft id, so a publish answer without one (since 2025-09) is fine.

Pictures: Zhihu shows only pictures on its own image host, so each one goes up by its bytes
as the editor uploads a pasted file: its md5 to api.zhihu.com/images (Zhihu may already have
it), the bytes to the signed OSS upload host, then the upload reported and the picture polled
until Zhihu can show it; the body then points at picx.zhimg.com only.

Topics are optional (the real editor publishes with `topics: []`): the user's named topics,
else the first suggestion for the title or one of its words, else none, said in the task's
result. Every refusal has a kind in REFUSALS, with its own words and retry rule; an expired
login is only what /api/v4/me says it is. Endpoints, JSON paths and page markers live in
ENDPOINTS / ANSWERS below.
"""

import base64
import collections
import email.utils
import functools
import hashlib
import hmac
import html
import json
import logging
import re
import time
import uuid
from urllib.parse import quote, urlsplit

import jieba
from selenium.common.exceptions import WebDriverException

import images
from content import text_content
from publishers.base import BadAccount, LoginExpired, Publisher, PublishError
from publishers.browser import rehost_pictures, upload_bytes, wait_for

# -- what we rely on at Zhihu (one place: a platform change is a one-line fix here) ----------

ENDPOINTS = {
    # (origin, path). Calls run from a page of the endpoint's own origin, so no CORS is needed;
    # 'landing' is any light page of an origin, just to stand on it.
    'landing': '/robots.txt',
    'refresh_page': ('www', '/question/19550225'),   # a real page, whose script renews __zse_ck
    'me': ('www', '/api/v4/me'),
    'create_draft': ('zhuanlan', '/api/articles/drafts'),
    'draft': ('zhuanlan', '/api/articles/{id}/draft'),
    'topic_search': ('zhuanlan', '/api/autocomplete/topics?token={token}&max_matches=5&use_similar=0&topic_filter=1'),
    'add_topic': ('zhuanlan', '/api/articles/{id}/topics'),
    'publish': ('www', '/api/v4/content/publish'),
    'article_page': ('zhuanlan', '/p/{id}'),
    'column_items': ('www', '/api/v4/columns/{column}/items'),
    'image': ('api', '/images'),                                  # a picture by its md5: where to put it
    'image_uploaded': ('api', '/images/{id}/uploading_status'),
    'image_status': ('api', '/images/{id}'),
}

IMAGE_BUCKET = 'zhihu-pics'    # the OSS bucket behind zhihu-pics-upload.zhimg.com, part of what is signed

ANSWERS = {
    'user_id': ('id',),                        # /me: logged in when present
    'user_name': ('name',),
    'draft_id': (('id',), ('article_id',)),    # draft creation, first path that answers wins
    'published': ((('message',), 'success'), (('code',), 0)),   # publish answer, either one
    'error_code': (('error', 'code'), ('code',)),
    'error_message': (('error', 'message'), ('message',)),
    'topic_name': ('name',),
    'initial_data': 'js-initialData',          # <script id=...> on /p/<id> and other pages
    'article': ('initialState', 'entities', 'articles', '{id}'),
    'author_id': ('author', 'id'),
    'article_url': ('url',),
    # What a public article says of itself, field by field (Wechatsync's checker).
    'public_article': (('type', 'article'), ('articleType', 'normal'), ('state', 'published'),
                       ('status', 0), ('isVisible', True), ('isNormal', True)),
    'not_found_title': '你似乎来到了没有知识存在的荒原',  # HTTP 200 "soft 404"
    'signin_path': '/signin',
    'image_id': ('upload_file', 'image_id'),
    'image_key': ('upload_file', 'object_key'),
    'image_known': (('upload_file', 'state'), 1),   # Zhihu has these bytes already: nothing to send
    'upload_token': ('upload_token',),              # access_id, access_key, access_token
    'image_status': ('status',),                    # 'success' once the picture can be shown
}

SIGNATURE_CODES = (10003,)     # 请求参数异常，请升级客户端后重试: the call wanted the editor's x-zse-96 signature
SIGNATURE_WORDS = ('请求参数异常', '升级客户端')
THROTTLED_WORDS = ('频繁', '过快', 'too many')
CAPTCHA_WORDS = ('验证码', 'captcha', '安全验证')
REVIEW_WORDS = ('审核', 'review')
# Words that split out of titles but name no topic; digits-only words are skipped too.
TOPIC_STOP_WORDS = frozenset(('为什么', '什么', '怎么', '怎样', '如何', '哪些', '哪个', '我们', '你们', '他们',
                              '自己', '一个', '一些', '这个', '那个', '这些', '那些', '可以', '没有', '还是',
                              '就是', '以及', '关于', '今天', '现在', '真的'))

# Why Zhihu said no: (what the user reads, the English for the log, retry?, after a pause?).
# A pause is the account's TOPN_ZHIHU_PAUSE, doubled for each attempt already made.
REFUSALS = {
    'risk_control': ('知乎的风控拦下了这次请求（{detail}）。这不是登录失效，不用重新粘贴 Cookie；已暂停，{pause}后自动重试。'
                     '若反复出现，请在浏览器中打开知乎确认账号正常，并降低发布频率',
                     'Zhihu risk control refused {endpoint}; not an expired login; retrying after a pause',
                     True, True),
    'signature': ('知乎要求这次请求带上网页编辑器的签名（{detail}），公开的发布工具都不计算这个签名，这通常是风控临时收紧。'
                  '这不是登录失效；已暂停，{pause}后自动重试',
                  'Zhihu refused {endpoint} for want of a request signature; not an expired login; retrying '
                  'after a pause', True, True),
    'challenge': ('知乎打开的是验证页面，页面脚本没能通过验证（{detail}）：已暂停，{pause}后自动重试',
                  'Zhihu answered {endpoint} with a challenge page that did not clear; retrying after a pause',
                  True, True),
    'captcha': ('知乎要求人工验证（{detail}）：请在浏览器中登录知乎完成验证，然后在任务页点“重试”。'
                '自动发布已停止，以免账号被限制',
                'Zhihu asks for a captcha on {endpoint}; a person must solve it', False, False),
    'throttled': ('知乎限流：这个账号操作过于频繁（{detail}），已暂停，{pause}后自动重试；请降低发布频率',
                  'Zhihu is throttling this account on {endpoint}; retrying after a pause', True, True),
    'refused': ('知乎拒绝了这次请求（{detail}）：请按提示修改后重新提交',
                'Zhihu refused {endpoint}', False, False),
}

TITLE_MAX_CHARS = 100          # the editor's placeholder: "请输入标题（最多 100 个字）"
REQUEST_SECONDS = 20.0
PICTURE_SECONDS = 60.0         # one picture's bytes to the image host, and Zhihu processing it
PAGE_SECONDS = 30.0
REFRESH_SECONDS = 15.0         # how long a real page gets for its script to renew __zse_ck
RECHECK_SECONDS = 10.0         # after an unknown outcome, how long /p/<id> may lag
POLL_SECONDS = 1.0
PAGE_POLL_SECONDS = 0.25
TOPIC_QUERIES = 6

# One request from the page. JSON calls return the answer's text; a page (`asPage`) comes
# back as its title, its js-initialData text and a little of its visible text. Anonymous
# reads send no cookies at all (credentials 'omit'), as a reader without an account.
FETCH_JS = """
const [method, url, headers, body, timeoutMs, asPage, dataId, credentials, done] = arguments;
const abort = new AbortController();
const timer = setTimeout(() => abort.abort(), timeoutMs);
fetch(url, {method, headers, body: body === null ? undefined : body, credentials, cache: 'no-store',
            signal: abort.signal})
  .then(async response => {
    const text = await response.text();
    if (!asPage) return done({status: response.status, url: response.url, text});
    const page = new DOMParser().parseFromString(text, 'text/html');
    const data = page.getElementById(dataId);
    page.querySelectorAll('script, style').forEach(node => node.remove());
    done({status: response.status, url: response.url, title: page.title,
          initialData: data === null ? null : data.textContent,
          text: page.body ? page.body.textContent.replace(/\\s+/g, ' ').trim().slice(0, 500) : ''});
  })
  .catch(error => done({status: 0, url, text: String(error)}))
  .finally(() => clearTimeout(timer));
"""

# The page the browser is on, as far as the cookie refresh needs to know.
PAGE_STATE_JS = """
const text = document.body ? document.body.innerText.slice(0, 300) : '';
return {url: location.href, title: document.title, text,
        initialData: document.getElementById(arguments[0]) !== null};
"""


class PublishAnswerLost(Exception):
    """The publish request went out but its answer did not come back: look before deciding."""


class ZhihuRefused(PublishError):
    """Zhihu said no. `kind` (a key of REFUSALS) names why, so callers need not read words."""

    def __init__(self, kind, endpoint, detail, pause=0.0, answer=None):
        words, english, retryable, pauses = REFUSALS[kind]
        pause = pause if pauses else 0.0
        super().__init__(f'{words.format(detail=detail, pause=duration(pause))} '
                         f'({english.format(endpoint=endpoint)}: {detail})',
                         retryable=retryable, refused=True, retry_after=pause, answer=answer)
        self.kind = kind


class ArticleNotPublic(PublishError):
    """Zhihu took the article but a reader does not see it published: under review
    (retried after a pause, to look again, never to publish again) or hidden (not retried)."""

    def __init__(self, message, under_review, pause=0.0):
        super().__init__(message, retryable=under_review, retry_after=pause if under_review else 0.0)
        self.under_review = under_review


Verdict = collections.namedtuple('Verdict', 'kind detail')   # kind: published, missing, under_review, hidden


class ZhihuPublisher(Publisher):
    name = 'zhihu'
    label = '知乎'
    needs_browser = True
    login_fields = ('cookies', 'column')
    optional_login_fields = ('column',)
    required_cookies = ('z_c0', 'd_c0', '_xsrf', '__zse_ck')

    def __init__(self, zhuanlan_url='https://zhuanlan.zhihu.com', www_url='https://www.zhihu.com',
                 api_url='https://api.zhihu.com', upload_url='https://zhihu-pics-upload.zhimg.com',
                 pictures_url='https://picx.zhimg.com', pause=300.0, verify_wait=30.0):
        self.origins = {'zhuanlan': zhuanlan_url.rstrip('/'), 'www': www_url.rstrip('/'), 'api': api_url.rstrip('/')}
        self.picture_hosts = {'upload': upload_url.rstrip('/'), 'pictures': pictures_url.rstrip('/')}
        self.pause = pause
        self.verify_wait = verify_wait

    @classmethod
    def from_config(cls, config):
        return cls(zhuanlan_url=config.zhihu_url, www_url=config.zhihu_www_url, api_url=config.zhihu_api_url,
                   upload_url=config.zhihu_upload_url, pictures_url=config.zhihu_pictures_url,
                   pause=config.zhihu_pause, verify_wait=config.zhihu_verify_wait)

    def article_url(self, article_id):
        return self.origins['zhuanlan'] + ENDPOINTS['article_page'][1].format(id=article_id)

    def check_account(self, fields):
        if 'column' in fields:
            fields = {**fields, 'column': column_id(fields['column'])}
        return fields

    def publish(self, attempt):
        title = checked_title(attempt.title)
        if not text_content(attempt.body_html).strip() and '<img' not in attempt.body_html:
            raise PublishError('正文为空，知乎不会发布空文章：请补充正文后重新提交 '
                               '(the article body is empty)', retryable=False)
        pause = self.pause * 2 ** max(0, attempt.number - 1)
        session = ZhihuSession(attempt.driver, self.origins, attempt.account, lambda: attempt.seconds_left, pause,
                               self.picture_hosts)
        session.log_in()
        if session.refreshed_cookies:
            attempt.remember_account({'cookies': session.refreshed_cookies})
        attempt.progress(30)

        article_id = remembered_draft_id(attempt)
        if article_id:
            verdict = session.verify(article_id, wait=RECHECK_SECONDS if attempt.outcome_unknown else 0)
            if verdict.kind == 'published':
                attempt.mark_submitted()
                return self._published(attempt, session, article_id)
            if verdict.kind != 'missing':
                raise self.not_public(article_id, verdict, session.pause)
            if not session.draft_exists(article_id):
                article_id = None
        body = zhihu_html(rehost_pictures(attempt, session.upload_picture, start=30, end=50))
        if article_id is None:
            article_id = session.create_draft(title)
            attempt.remember_platform_ref(article_id)
        session.save_draft(article_id, title, body)
        attach_topics(attempt, session, article_id, title)
        attempt.progress(60)

        attempt.mark_submitted()
        try:
            session.publish(article_id)
        except PublishAnswerLost as lost:
            lost_reason = str(lost)
        else:
            lost_reason = None
        attempt.progress(85)
        verdict = session.verify(article_id, wait=self.verify_wait)
        if verdict.kind == 'missing':
            url = self.article_url(article_id)
            if lost_reason:
                raise PublishError(f'知乎的发布应答丢失（{lost_reason}），且读者在 {url} 还看不到这篇文章（{verdict.detail}）：'
                                   '下次尝试会先核对这篇文章，不会重复发文 '
                                   '(publish answer lost and the article is not public yet; the retry checks first)')
            raise PublishError(f'知乎回答发布成功，但读者在 {self.verify_wait:.0f} 秒内仍看不到 {url}（{verdict.detail}）：'
                               '下次尝试会先核对这篇文章，不会重复发文 '
                               '(Zhihu accepted the publish but a reader does not see the article yet)')
        if verdict.kind != 'published':
            raise self.not_public(article_id, verdict, session.pause)
        return self._published(attempt, session, article_id)

    def not_public(self, article_id, verdict, pause):
        """What to say of an article Zhihu holds that a reader does not see published."""
        url = self.article_url(article_id)
        if verdict.kind == 'under_review':
            return ArticleNotPublic(f'知乎正在审核这篇文章（知乎的原话：「{verdict.detail}」），审核通过后才会在 {url} 公开：'
                                    f'{duration(pause)}后再去核对，不会重复发文 '
                                    f'(the article is under review at Zhihu: {verdict.detail})',
                                    under_review=True, pause=pause)
        return ArticleNotPublic(f'知乎收下了这篇文章，但读者看不到它（{verdict.detail}），例如只有作者自己可见：'
                                f'请在知乎打开 {url} 查看原因 (Zhihu holds the article but a reader does not see it '
                                f'published: {verdict.detail})', under_review=False)

    def _published(self, attempt, session, article_id):
        """The URL of an article a reader sees published, once it is filed into the account's
        column (if it has one; a column that refuses is said in the task's note)."""
        url = self.article_url(article_id)
        column = (attempt.account or {}).get('column')
        if column:
            try:
                session.file_into_column(column, article_id)
                attempt.note(f'已收入专栏 {column} (filed into column {column})')
            except PublishError as error:
                attempt.note(f'文章已发布，但没能收入专栏 {column}：{error}')
        attempt.progress(100)
        return url

    def check_login(self, driver, account):
        """(True, who) when the stored cookies log in, (False, why) when Zhihu says they do
        not; cookies Zhihu's page refreshed on the way are put into `account` (the caller
        stores them). When Zhihu cannot be asked (network, 5xx, throttling) it raises
        PublishError: unknown is neither answer."""
        session = ZhihuSession(driver, self.origins, account, lambda: REQUEST_SECONDS + REFRESH_SECONDS, self.pause)
        try:
            me = session.log_in()
        except LoginExpired as error:
            return False, str(error)
        who = dig(me, ANSWERS['user_name']) or dig(me, ANSWERS['user_id'])
        if session.refreshed_cookies:
            account['cookies'] = [tuple(pair) for pair in session.refreshed_cookies]
            return True, f'已登录知乎：{who}；知乎页面刷新了 Cookie，已保存 (logged in; Zhihu refreshed the cookies)'
        return True, f'已登录知乎：{who} (logged in)'


class ZhihuSession:
    """One browser's conversation with Zhihu for one account: cookies in, JSON calls out."""

    def __init__(self, driver, origins, account, seconds_left, pause=0.0, picture_hosts=None):
        self.driver = driver
        self.origins = origins
        self.picture_hosts = picture_hosts or {}
        self.cookies = dict((account or {}).get('cookies', ()))
        self.stored_cookies = dict(self.cookies)
        self.seconds_left = seconds_left
        self.pause = pause
        self.author_id = None

    @property
    def refreshed_cookies(self):
        """The session's cookies as [[name, value]] when Zhihu's page changed any, else None."""
        if self.cookies == self.stored_cookies:
            return None
        return [[name, value] for name, value in self.cookies.items()]

    # -- login -------------------------------------------------------------------------

    def log_in(self):
        """Put the account's cookies into the browser, let a real page refresh them, and ask
        Zhihu who we are. Only /api/v4/me decides that a login has expired."""
        missing = [name for name in ZhihuPublisher.required_cookies if not self.cookies.get(name)]
        if missing:
            raise LoginExpired(f'知乎 Cookie 不完整，缺少 {", ".join(missing)}：请在已登录知乎的浏览器中复制完整 Cookie，'
                               f'在账号页更新 (the stored Zhihu login lacks {", ".join(missing)})')
        self._import_cookies()
        self.refresh_cookies()
        me = self.who_am_i()
        if me is None:
            raise LoginExpired('知乎登录已失效：请在已登录知乎的浏览器中复制 Cookie，在账号页更新 '
                               '(the stored Zhihu cookies no longer log in)')
        self.author_id = str(dig(me, ANSWERS['user_id']))
        return me

    def who_am_i(self):
        """/api/v4/me's answer when the session is logged in, None when Zhihu says it is not."""
        status, me = self.call('me', allow=(401,))
        if status == 200 and isinstance(me, dict) and dig(me, ANSWERS['user_id']):
            return me
        return None

    def refresh_cookies(self):
        """Open a real Zhihu page and give its own script the time to renew `__zse_ck` (on a
        challenge page the script sets it and reloads); then take the new values of the
        login's cookies from the browser. A page that stays a challenge is a refusal of its own kind."""
        url = self.origins['www'] + ENDPOINTS['refresh_page'][1]
        self.driver.set_page_load_timeout(self._time_for(PAGE_SECONDS))
        try:
            self.driver.get(url)
        except WebDriverException as error:
            raise PublishError(f'浏览器打不开 {url}，稍后自动重试 (the browser could not open {url}: '
                               f'{error.msg})') from error
        deadline = time.monotonic() + self._time_for(REFRESH_SECONDS)
        page = None
        while True:
            page = self._page_state() or page
            if page and (page['initialData'] or ANSWERS['signin_path'] in urlsplit(page['url']).path):
                break
            if time.monotonic() > deadline:
                seen = f'「{page["title"]}」{page["text"][:80]}' if page else 'the page never loaded'
                kind = 'captcha' if page and has_words((page['title'] + page['text']).lower(), CAPTCHA_WORDS) \
                    else 'challenge'
                raise ZhihuRefused(kind, 'refresh_page', seen, self.pause)
            time.sleep(PAGE_POLL_SECONDS)
        browser = {cookie['name']: cookie['value'] for cookie in self.driver.get_cookies()}
        changed = {name: value for name, value in browser.items() if self.cookies.get(name) not in (None, value)}
        if changed:
            self.cookies.update(changed)
            self._import_cookies()

    def _page_state(self):
        try:
            return self.driver.execute_script(PAGE_STATE_JS, ANSWERS['initial_data'])
        except WebDriverException:
            return None   # the page is reloading under its own script

    def _import_cookies(self):
        """Cookies for the parent domain both origins share (.zhihu.com), set from one page
        of it; without a shared parent, host-only cookies on a page of each host."""
        origins_by_host = {}
        for origin in self.origins.values():
            origins_by_host.setdefault(urlsplit(origin).hostname, origin)
        domain = cookie_domain(*origins_by_host)
        for origin in list(origins_by_host.values())[:1] if domain else origins_by_host.values():
            self._stand_on(origin)
            self.driver.delete_all_cookies()
            for name, value in self.cookies.items():
                cookie = {'name': name, 'value': value, 'path': '/', 'secure': origin.startswith('https:')}
                self.driver.add_cookie({**cookie, 'domain': domain} if domain else cookie)

    # -- drafts, topics, publishing ----------------------------------------------------

    def create_draft(self, title):
        _, answer = self.call('create_draft', method='POST', body={'title': title, 'content': '', 'delta_time': 0})
        for path in ANSWERS['draft_id']:
            draft_id = dig(answer, path) if isinstance(answer, dict) else None
            if draft_id is not None and re.fullmatch(r'\d+', str(draft_id)):
                return str(draft_id)
        raise PublishError('知乎创建草稿后没有返回草稿编号，稍后重试 (no draft id in Zhihu\'s answer)',
                           answer=json.dumps(answer, ensure_ascii=False))

    def draft_exists(self, draft_id):
        status, _ = self.call('draft', id=draft_id, allow=(404,))
        return status != 404

    def save_draft(self, draft_id, title, body):
        self.call('draft', id=draft_id, method='PATCH', body={'title': title, 'content': body})
        _, saved = self.call('draft', id=draft_id)
        if not isinstance(saved, dict) or html.unescape(str(saved.get('title'))).strip() != title \
                or not str(saved.get('content') or '').strip():
            raise PublishError('知乎草稿保存后读回的标题或正文不一致，未发布，稍后重试 '
                               '(the saved draft did not read back with our title and body)')

    def find_topic(self, query):
        """Zhihu's best suggestion for `query` whose name and the query contain one another
        (an exact name first), or None."""
        _, found = self.call('topic_search', token=quote(query, safe=''))
        suggestions = [topic for topic in found if isinstance(topic, dict)] if isinstance(found, list) else []
        return matching_topic(query, suggestions)

    def add_topic(self, draft_id, topic):
        self.call('add_topic', id=draft_id, method='POST', body=topic)

    def publish(self, draft_id):
        """Ask Zhihu to publish the draft. Raises PublishAnswerLost when the answer is lost or
        says neither yes nor no: the article page then decides."""
        status, answer = self.call('publish', method='POST', body=publish_request(draft_id))
        if not isinstance(answer, dict) or not any(dig(answer, path) == value for path, value in ANSWERS['published']):
            raise PublishAnswerLost(f'HTTP {status}, an answer we do not understand')
        return answer

    def verify(self, article_id, wait=0.0):
        """What a reader without an account sees at /p/<id>, looking again for up to `wait`
        seconds while the article is not there yet (a fresh article's page may lag)."""
        deadline = time.monotonic() + min(wait, max(0.0, self.seconds_left() - 2))
        while True:
            verdict = self.reader_verdict(article_id)
            if verdict.kind != 'missing' or time.monotonic() + POLL_SECONDS > deadline:
                return verdict
            time.sleep(POLL_SECONDS)

    def reader_verdict(self, article_id):
        origin = self.origins['zhuanlan']
        url = origin + ENDPOINTS['article_page'][1].format(id=article_id)
        page = self._fetch(origin, url, 'article_page', as_page=True, anonymous=True)
        return reader_verdict(page, article_id, self.author_id, url)

    def upload_picture(self, picture):
        """Put one picture on Zhihu's image host as its editor does with a pasted file, and
        return the URL Zhihu shows it at. Zhihu knows pictures by their md5, so bytes it
        already has are not sent again."""
        _, answer = self.call('image', method='POST',
                              body={'image_hash': hashlib.md5(picture.data).hexdigest(), 'source': 'article'})
        image_id, object_key = dig(answer, ANSWERS['image_id']), dig(answer, ANSWERS['image_key'])
        if not image_id or not isinstance(object_key, str) or not re.fullmatch(r'[\w.-]+', object_key):
            raise PublishError('知乎没有给出图片的上传位置，稍后自动重试 (no image id or object key in Zhihu\'s answer)',
                               answer=json.dumps(answer, ensure_ascii=False))
        known_path, known = ANSWERS['image_known']
        if dig(answer, known_path) != known:
            self._send_to_image_host(object_key, picture, dig(answer, ANSWERS['upload_token']) or {})
            self.call('image_uploaded', id=image_id, method='PUT', body={'upload_result': 'success'})
        wait_for(lambda: self._picture_ready(image_id), self._time_for(PICTURE_SECONDS), 'Zhihu to process the picture',
                 interval=PAGE_POLL_SECONDS)
        extension = '' if '.' in object_key else '.' + images.EXTENSIONS[picture.mime]
        return f'{self.picture_hosts["pictures"]}/{object_key}{extension}'

    def _send_to_image_host(self, object_key, picture, token):
        """The picture's bytes to Zhihu's OSS upload host, signed with the upload token Zhihu gave,
        from a page of that host (no cross-origin request)."""
        origin = self.picture_hosts['upload']
        date = email.utils.formatdate(usegmt=True)
        oss_headers = {'x-oss-date': date, 'x-oss-security-token': str(token.get('access_token', ''))}
        signature = oss_signature(str(token.get('access_key', '')), 'PUT', picture.mime, date, oss_headers,
                                  f'/{IMAGE_BUCKET}/{object_key}')
        headers = {'Content-Type': picture.mime, **oss_headers,
                   'Authorization': f'OSS {token.get("access_id", "")}:{signature}'}
        self._stand_on(origin)
        status, text = upload_bytes(self.driver, 'PUT', f'{origin}/{object_key}', picture.data, headers,
                                    timeout=self._time_for(PICTURE_SECONDS))
        if not 200 <= status < 300:
            raise PublishError(f'知乎图床没有收下图片（HTTP {status}：{text[:160]}），稍后自动重试 '
                               f'(Zhihu\'s image host refused the upload: HTTP {status})',
                               retryable=status == 0 or status >= 500 or status == 403)

    def _picture_ready(self, image_id):
        _, answer = self.call('image_status', id=image_id)
        status = dig(answer, ANSWERS['image_status'])
        if status in ('fail', 'failed'):
            raise PublishError(f'知乎处理图片失败（{json.dumps(answer, ensure_ascii=False)[:160]}）'
                               '(Zhihu could not process the picture)', retryable=False)
        return status == 'success'

    def file_into_column(self, column, article_id):
        self.call('column_items', column=quote(column, safe=''), method='POST',
                  body={'type': 'article', 'id': article_id})

    # -- the one way we talk to Zhihu --------------------------------------------------

    def call(self, endpoint, method='GET', body=None, allow=(), **params):
        """One JSON request with the session's cookies, from a page of the endpoint's own
        origin. Returns (status, decoded JSON) for statuses in `allow` and for 2xx answers
        that are not refusals (HTTP 200 with a non-zero `code` is one); raises saying what
        happened otherwise."""
        origin_name, path = ENDPOINTS[endpoint]
        origin = self.origins[origin_name]
        headers = {'x-requested-with': 'fetch'}
        if method != 'GET':
            headers.update({'x-xsrftoken': self.cookies.get('_xsrf', ''), 'content-type': 'application/json'})
        payload = None if body is None else json.dumps(body, ensure_ascii=False)
        answer = self._fetch(origin, origin + path.format(**params), endpoint, method, headers, payload)
        status, text = answer['status'], answer['text']
        data = decode_json(text)
        if status in allow or (200 <= status < 300 and not refused_with_200(data)):
            return status, data
        raise self._failure(endpoint, status, data, text)

    def _fetch(self, origin, url, endpoint, method='GET', headers=None, payload=None, as_page=False,
               anonymous=False):
        self._stand_on(origin)
        timeout = self._time_for(REQUEST_SECONDS)
        self.driver.set_script_timeout(timeout + 5)
        try:
            answer = self.driver.execute_async_script(
                FETCH_JS, method, url, headers or {}, payload, int(timeout * 1000), as_page, ANSWERS['initial_data'],
                'omit' if anonymous else 'include')
        except WebDriverException as error:
            raise self._failure(endpoint, 0, None, f'browser: {error.msg}') from error
        if ANSWERS['signin_path'] in urlsplit(answer['url'] or '').path:
            answer['status'] = 401
        return answer

    def _failure(self, endpoint, status, data, text):
        """The exception for an answer that is not what we asked for."""
        detail = answer_summary(status, data, text)
        evidence = text if data is not None else None
        lost = status == 0 or status >= 500
        if endpoint == 'publish' and lost:
            return PublishAnswerLost(detail)
        if status == 401:
            if endpoint != 'me' and self.who_am_i() is not None:
                return ZhihuRefused('risk_control', endpoint, detail, self.pause, evidence)
            return LoginExpired('知乎登录已失效：请在已登录知乎的浏览器中复制 Cookie，在账号页更新 '
                                f'(Zhihu answered 401 to {endpoint}: the cookies no longer log in)')
        kind = refusal_kind(status, data, text)
        if kind is None and lost:
            return PublishError(f'暂时连不上知乎（{endpoint}：{detail}），稍后自动重试 '
                                f'(Zhihu could not be reached: {detail})', answer=evidence)
        return ZhihuRefused(kind or 'refused', endpoint, detail, self.pause, evidence)

    def _stand_on(self, origin):
        """Be on a page of `origin`, so calls to it are same-origin and carry its cookies."""
        if self._current_origin() == origin:
            return
        self.driver.set_page_load_timeout(self._time_for(PAGE_SECONDS))
        try:
            self.driver.get(origin + ENDPOINTS['landing'])
        except WebDriverException as error:
            raise PublishError(f'浏览器打不开 {origin}，稍后自动重试 (the browser could not open {origin}: '
                               f'{error.msg})') from error
        if self._current_origin() != origin:
            raise PublishError(f'打开 {origin} 时被转到了 {self.driver.current_url}，稍后自动重试 '
                               f'(opening {origin} landed elsewhere)')

    def _current_origin(self):
        parts = urlsplit(self.driver.current_url)
        return f'{parts.scheme}://{parts.netloc}'

    def _time_for(self, most):
        return max(1.0, min(most, self.seconds_left()))


# -- what we decide from Zhihu's answers ------------------------------------------------------

def refused_with_200(data):
    """A 2xx answer that is a refusal all the same: a non-zero `code`, or an `error` object."""
    if not isinstance(data, dict):
        return False
    code = data.get('code')
    return isinstance(data.get('error'), dict) or (code not in (None, 0, '0') and data.get('message') != 'success')


def refusal_kind(status, data, text):
    """The REFUSALS kind of a refusal we recognise, or None."""
    words = (error_message(data) or text or '').lower()
    if status == 429 or has_words(words, THROTTLED_WORDS):
        return 'throttled'
    if has_words(words, CAPTCHA_WORDS):
        return 'captcha'
    if error_code(data) in SIGNATURE_CODES or has_words(words, SIGNATURE_WORDS):
        return 'signature'
    if status == 403:
        return 'risk_control'
    return None


def reader_verdict(page, article_id, author_id, expected_url):
    """What /p/<id>, read without cookies (`page` from FETCH_JS), says of our article."""
    status, title = page['status'], page.get('title') or ''
    if status == 0:
        return Verdict('missing', f'unreachable: {page.get("text", "")[:120]}')
    if status in (404, 410) or ANSWERS['not_found_title'] in title:
        return Verdict('missing', f'HTTP {status}「{title}」')
    path = [part.format(id=article_id) for part in ANSWERS['article']]
    article = dig(decode_json(page.get('initialData')), path)
    if not isinstance(article, dict):
        words = review_words([title, page.get('text') or ''])
        if words:
            return Verdict('under_review', words)
        return Verdict('missing', f'HTTP {status}, no article data「{title}」')
    if author_id is not None and str(dig(article, ANSWERS['author_id'])) != author_id:
        return Verdict('hidden', f'the page names another author ({dig(article, ANSWERS["author_id"])})')
    differing = [f'{name}={article.get(name)!r}' for name, value in ANSWERS['public_article']
                 if article.get(name) != value]
    if not same_url(dig(article, ANSWERS['article_url']), expected_url):
        differing.append(f'url={dig(article, ANSWERS["article_url"])!r}')
    if not differing:
        return Verdict('published', '')
    words = review_words(strings_of({key: value for key, value in article.items()
                                     if key not in ('title', 'content', 'excerpt')}))
    if words:
        return Verdict('under_review', words)
    return Verdict('hidden', ', '.join(differing))


def review_words(texts):
    """The texts that speak of a review (审核, review), joined; '' when none does."""
    found = [text.strip() for text in texts if has_words(text.lower(), REVIEW_WORDS)]
    return ' / '.join(dict.fromkeys(found))[:200]


def strings_of(value):
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings_of(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings_of(item)]
    return []


def same_url(url, expected):
    """The same page, whatever the scheme: Zhihu writes its own URLs as http or https."""
    if not isinstance(url, str):
        return False
    found, wanted = urlsplit(url), urlsplit(expected)
    return (found.netloc, found.path.rstrip('/')) == (wanted.netloc, wanted.path.rstrip('/'))


def answer_summary(status, data, text):
    """HTTP status, Zhihu's code and its message, short enough for an error message."""
    parts = [f'HTTP {status}' if status else 'no answer']
    code = error_code(data)
    if code not in (None, 0):
        parts.append(f'code {code}')
    message = error_message(data) or (text or '')[:120].strip()
    if message:
        parts.append(message)
    return '，'.join(parts)


# -- topics ---------------------------------------------------------------------------------------

def attach_topics(attempt, session, article_id, title):
    """The topics the user named, or else the first that Zhihu suggests for the title or one
    of its words; none when nothing matches (Zhihu publishes without). The task's note says
    which, or that there is none."""
    if attempt.topics:
        found = {name: session.find_topic(name) for name in attempt.topics}
        chosen = list({topic.get('id'): topic for topic in found.values() if topic is not None}.values())
        missing = [name for name, topic in found.items() if topic is None]
    else:
        chosen, missing = [], []
        for query in topic_queries(title):
            topic = session.find_topic(query)
            if topic is not None:
                chosen = [topic]
                break
    for topic in chosen:
        session.add_topic(article_id, topic)
    names = '、'.join(str(dig(topic, ANSWERS['topic_name'])) for topic in chosen)
    if missing:
        attempt.note(f'知乎上没有找到话题「{"、".join(missing)}」，没有添加 (no such Zhihu topic: {", ".join(missing)})')
    if chosen:
        attempt.note(f'话题：{names}' + ('' if attempt.topics else '（按标题自动匹配）') + f' (topics: {names})')
    elif attempt.topics:
        attempt.note('文章已按无话题发布 (published without a topic)')
    else:
        attempt.note('知乎没有与标题匹配的话题，文章已按无话题发布 (no Zhihu topic matches the title; '
                     'published without a topic)')


def matching_topic(query, suggestions):
    """The suggestion named `query` (case and spaces aside), else the first whose name and the
    query contain one another; None when none does."""
    def key(text):
        return re.sub(r'\s+', '', str(text)).lower()
    wanted = key(query)
    named = [(key(dig(topic, ANSWERS['topic_name']) or ''), topic) for topic in suggestions]
    for name, topic in named:
        if name and name == wanted:
            return topic
    for name, topic in named:
        if name and (name in wanted or wanted in name):
            return topic
    return None


def topic_queries(title):
    """The title itself, then its words, longest first: Zhihu's topic search matches names, not
    sentences, and a Chinese title has no spaces between its words, so it is split by jieba."""
    words = [word.strip() for word in word_splitter().lcut(title)]
    words = [word for word in words if len(word) >= 2 and not word.isdigit() and word not in TOPIC_STOP_WORDS
             and re.search(r'\w', word)]
    queries = [title] + sorted(dict.fromkeys(words), key=len, reverse=True)
    return list(dict.fromkeys(queries))[:TOPIC_QUERIES]


@functools.cache
def word_splitter():
    """jieba's Chinese word splitter, made on first use (it loads its dictionary then, about
    a second), and quiet: its progress lines are not our log's."""
    jieba.setLogLevel(logging.WARNING)
    return jieba.Tokenizer()


# -- what we send ---------------------------------------------------------------------------------

def remembered_draft_id(attempt):
    """The draft id an earlier attempt remembered, or None."""
    ref = attempt.platform_ref
    if not ref:
        return None
    if not re.fullmatch(r'\d+', str(ref)):
        raise PublishError(f'这个任务记录的知乎草稿编号 {ref!r} 无法识别，为避免重复发文已停止：请检查后重新提交 '
                           '(the remembered Zhihu draft id is not a number)', retryable=False)
    return str(ref)


def checked_title(title):
    """The title as Zhihu will show it; a title over Zhihu's limit is refused, never cut."""
    title = (title or '').strip()
    if not title:
        raise PublishError('标题为空：知乎文章必须有标题 (the title is empty)', retryable=False)
    if len(title) > TITLE_MAX_CHARS:
        raise PublishError(f'标题有 {len(title)} 个字，超过知乎的 {TITLE_MAX_CHARS} 字上限：请缩短标题后重新提交，'
                           f'我们不会擅自截断 (the title has {len(title)} characters; Zhihu allows '
                           f'{TITLE_MAX_CHARS})', retryable=False)
    return title


def column_id(text):
    """A column as Zhihu's API names it (c_1234567890, or an older column's own name), from
    that name or the column's URL (https://www.zhihu.com/column/c_..., zhuanlan.zhihu.com/...)."""
    text = (text or '').strip()
    if '/' in text:
        text = urlsplit(text if '://' in text else 'https://' + text).path.rstrip('/').rsplit('/', 1)[-1]
    if not re.fullmatch(r'[A-Za-z0-9_-]{1,100}', text):
        raise BadAccount('专栏请写专栏的编号（如 c_1234567890）或专栏的网址 '
                         '(a column is its id, such as c_1234567890, or its URL)')
    return text


def publish_request(draft_id):
    """The body Zhihu's own editor sends to publish a column article (zhihu_obsidian's shape)."""
    settings = {'column': None, 'commentPermission': 'anyone', 'disclaimer_type': 'none',
                'disclaimer_status': 'close', 'table_of_contents_enabled': False,
                'commercial_report_info': {'commercial_types': []}, 'commercial_zhitask_bind_info': None,
                'canReward': False}
    return {'action': 'article', 'data': {
        'publish': {'traceId': f'{int(time.time() * 1000)},{uuid.uuid4()}'},
        'extra_info': {'publisher': 'pc', 'pc_business_params': json.dumps(settings)},
        'draft': {'disabled': 1, 'id': draft_id, 'isPublished': False},
        'commentsPermission': {'comment_permission': 'anyone'},
        'creationStatement': {'disclaimer_type': 'none', 'disclaimer_status': 'close'},
        'contentsTables': {'table_of_contents_enabled': False},
        'commercialReportInfo': {'isReport': 0},
        'appreciate': {'can_reward': False, 'tagline': ''},
        'hybridInfo': {},
    }}


BLOCK_TAGS = r'(?:p|h[1-6]|ul|ol|li|blockquote|table|thead|tbody|tr|th|td|figure|figcaption|hr|div|pre)'


def zhihu_html(body_html):
    """Our rendered Markdown as Zhihu's editor stores it: code as <pre lang="x"><code>, images in
    <figure>, tables in its table block, and no empty paragraphs or newlines between blocks
    (Zhihu turns those into blank lines)."""
    chunks = re.split(r'(<pre\b.*?</pre>)', body_html, flags=re.S)
    return ''.join(_zhihu_code(chunk) if chunk.startswith('<pre') else _zhihu_flow(chunk) for chunk in chunks)


def _zhihu_code(block):
    return re.sub(r'^<pre><code class="language-([\w+#.-]+)">',
                  lambda m: f'<pre lang="{html.escape(m.group(1))}"><code>', block)


def _zhihu_flow(fragment):
    fragment = re.sub(r'<p>\s*(<img\b[^>]*>)\s*</p>', r'<figure>\1</figure>', fragment)
    fragment = re.sub(r'(?<!<figure>)(<img\b[^>]*>)(?!</figure>)', r'<figure>\1</figure>', fragment)
    fragment = re.sub(r'<table>(.*?)</table>', _zhihu_table, fragment, flags=re.S)
    fragment = re.sub(r'<p>(?:\s|&nbsp;|<br\s*/?>)*</p>', '', fragment)
    fragment = re.sub(rf'(</?{BLOCK_TAGS}\b[^>]*>)\s+', r'\1', fragment)
    fragment = re.sub(rf'\s+(?=</?{BLOCK_TAGS}\b)', '', fragment)
    return fragment.replace('\n', ' ')


def _zhihu_table(match):
    rows = re.findall(r'<tr>.*?</tr>', match.group(1), flags=re.S)
    return ('<table data-draft-node="block" data-draft-type="table" data-size="normal" '
            f'data-row-style="normal"><tbody>{"".join(rows)}</tbody></table>')


# -- small helpers --------------------------------------------------------------------------------

def oss_signature(access_key, verb, content_type, date, oss_headers, resource):
    """Aliyun OSS's header signature (version 1): base64 HMAC-SHA1, keyed with the upload
    token's access key, of the verb, MD5 (none), type, date, x-oss-* headers and resource."""
    canonical_headers = ''.join(f'{name.lower()}:{value}\n' for name, value in sorted(oss_headers.items()))
    text = f'{verb}\n\n{content_type}\n{date}\n{canonical_headers}{resource}'
    return base64.b64encode(hmac.new(access_key.encode(), text.encode(), hashlib.sha1).digest()).decode()


def cookie_domain(*hosts):
    """The parent domain every host shares ('.zhihu.com' for zhuanlan. and www.), or None when
    they are one host, IP addresses, or share nothing: then each host gets its own cookies."""
    if len(set(hosts)) == 1 or any(re.fullmatch(r'[\d.]+|\[.*\]', host) for host in hosts):
        return None
    labels = [host.split('.')[::-1] for host in hosts]
    common = []
    for parts in zip(*labels):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return '.' + '.'.join(reversed(common)) if len(common) >= 2 else None


def dig(data, path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def decode_json(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def first_of(answer, paths, kind):
    if not isinstance(answer, dict):
        return None
    for path in paths:
        value = dig(answer, path)
        if isinstance(value, kind) and not isinstance(value, bool) and value not in ('', None):
            return value
    return None


def error_message(answer):
    return first_of(answer, ANSWERS['error_message'], str)


def error_code(answer):
    code = first_of(answer, ANSWERS['error_code'], (int, str))
    return int(code) if isinstance(code, str) and code.isdigit() else code


def has_words(text, words):
    return any(word in text for word in words)


def duration(seconds):
    """A pause in the words the user reads: '45 秒', '5 分钟'."""
    return f'{seconds:.0f} 秒' if seconds < 120 else f'{seconds / 60:.0f} 分钟'
