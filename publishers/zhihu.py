"""Zhihu (知乎) column articles, published through the logged-in page's own API calls.

Zhihu has no publishing API, but its editor talks JSON to endpoints that take the session
cookies plus an `x-xsrftoken` header. The most complete public tools (zhihu_obsidian,
Wechatsync) call those endpoints directly; we do the same from inside a real browser
page, so the requests carry the browser's own cookies and fingerprint, and no editor
selector can break under us (selectors breaking is the top complaint about DOM tools).

Exactly once: Zhihu publishes a draft under the draft's own id, so the draft id is
remembered (persisted) the moment it exists and before anything is published. A later
attempt that holds it first looks at `/p/<id>`: published means done, otherwise it
continues the same draft. Publishing one draft id again cannot make a second article.
Without a remembered id nothing of ours can be out: the id is persisted before the publish
request, and a failed persist stops the attempt. Success is claimed only after the article
page itself says `published`; a lost publish answer is settled by looking at that page.

Every endpoint, JSON path and page marker lives in ENDPOINTS / ANSWERS below.
"""

import html
import json
import re
import time
import uuid
from urllib.parse import quote, urlsplit

from selenium.common.exceptions import WebDriverException

from publishers.base import LoginExpired, Publisher, PublishError
from content import text_content

# -- what we rely on at Zhihu (one place: a platform change is a one-line fix here) ----------

ENDPOINTS = {
    # (origin, path). Calls run from a page of the endpoint's own origin, so no CORS is needed;
    # 'landing' is any light page of an origin, just to stand on it.
    'landing': '/robots.txt',
    'me': ('www', '/api/v4/me'),
    'create_draft': ('zhuanlan', '/api/articles/drafts'),
    'draft': ('zhuanlan', '/api/articles/{id}/draft'),
    'topic_search': ('zhuanlan', '/api/autocomplete/topics?token={token}&max_matches=5&use_similar=0&topic_filter=1'),
    'add_topic': ('zhuanlan', '/api/articles/{id}/topics'),
    'publish': ('www', '/api/v4/content/publish'),
    'article_page': ('zhuanlan', '/p/{id}'),
}

ANSWERS = {
    'user_id': ('id',),                        # /me: logged in when present
    'user_name': ('name',),
    'draft_id': (('id',), ('article_id',)),    # draft creation, first path that answers wins
    'published': ((('message',), 'success'), (('code',), 0)),   # publish answer, either one
    'error_message': (('error', 'message'), ('message',)),
    'initial_data': 'js-initialData',          # <script id=...> on /p/<id>
    'article_state': ('initialState', 'entities', 'articles', '{id}', 'state'),
    'published_state': 'published',
    'signin_path': '/signin',
}

TITLE_MAX_CHARS = 100          # the editor's placeholder: "请输入标题（最多 100 个字）"
THROTTLED_WORDS = ('频繁', '过快', 'too many')
CAPTCHA_WORDS = ('验证码', 'captcha', '安全验证')
REQUEST_SECONDS = 20.0
PAGE_SECONDS = 30.0
VERIFY_SECONDS = 30.0          # public tools see /p/<digits> within ~30 s of publishing
RECHECK_SECONDS = 10.0         # after an unknown outcome, how long /p/<id> may lag
POLL_SECONDS = 1.0
TOPIC_QUERIES = 5

FETCH_JS = """
const [method, url, headers, body, timeoutMs, scriptId, done] = arguments;
const abort = new AbortController();
const timer = setTimeout(() => abort.abort(), timeoutMs);
fetch(url, {method, headers, body: body === null ? undefined : body, credentials: 'include',
            cache: 'no-store', signal: abort.signal})
  .then(async response => {
    let text = await response.text();
    if (scriptId !== null) {
      const node = new DOMParser().parseFromString(text, 'text/html').getElementById(scriptId);
      text = node === null ? null : node.textContent;
    }
    done({status: response.status, url: response.url, text});
  })
  .catch(error => done({status: 0, url, text: String(error)}))
  .finally(() => clearTimeout(timer));
"""


class PublishAnswerLost(Exception):
    """The publish request went out but its answer did not come back: look before deciding."""


class ZhihuPublisher(Publisher):
    name = 'zhihu'
    label = '知乎'
    needs_browser = True
    required_cookies = ('z_c0', 'd_c0', '_xsrf', '__zse_ck')

    def __init__(self, zhuanlan_url='https://zhuanlan.zhihu.com', www_url='https://www.zhihu.com'):
        self.origins = {'zhuanlan': zhuanlan_url.rstrip('/'), 'www': www_url.rstrip('/')}

    @classmethod
    def from_config(cls, config):
        return cls(zhuanlan_url=config.zhihu_url, www_url=config.zhihu_www_url)

    def article_url(self, article_id):
        return self.origins['zhuanlan'] + ENDPOINTS['article_page'][1].format(id=article_id)

    def publish(self, attempt):
        title = checked_title(attempt.title)
        body = zhihu_html(attempt.body_html)
        if not text_content(body).strip() and '<img' not in body:
            raise PublishError('正文为空，知乎不会发布空文章：请补充正文后重新提交 '
                               '(the article body is empty)', retryable=False)
        session = ZhihuSession(attempt.driver, self.origins, attempt.account, lambda: attempt.seconds_left)
        session.log_in()
        attempt.progress(30)

        article_id = remembered_draft_id(attempt)
        if article_id and session.is_published(article_id, wait=RECHECK_SECONDS if attempt.outcome_unknown else 0):
            attempt.mark_submitted()
            attempt.progress(100)
            return self.article_url(article_id)
        if article_id and not session.draft_exists(article_id):
            article_id = None
        if article_id is None:
            article_id = session.create_draft(title)
            attempt.remember_platform_ref(article_id)
        session.save_draft(article_id, title, body)
        session.add_topic(article_id, title)
        attempt.progress(60)

        attempt.mark_submitted()
        try:
            session.publish(article_id)
        except PublishAnswerLost as lost:
            lost_reason = str(lost)
        else:
            lost_reason = None
        attempt.progress(85)
        if not session.is_published(article_id, wait=VERIFY_SECONDS):
            url = self.article_url(article_id)
            if lost_reason:
                raise PublishError(f'知乎的发布应答丢失（{lost_reason}），且 {url} 尚未显示为已发布：'
                                   '下次尝试会先核对这篇文章，不会重复发文 '
                                   '(publish answer lost and the article is not published yet; the retry checks first)')
            raise PublishError(f'知乎回答发布成功，但 {url} 在 {VERIFY_SECONDS:.0f} 秒内仍未显示为已发布（可能在审核中）：'
                               '下次尝试会先核对这篇文章，不会重复发文 '
                               '(Zhihu accepted the publish but the article page does not show it published yet)')
        attempt.progress(100)
        return self.article_url(article_id)

    def check_login(self, driver, account):
        """(True, who) when the stored cookies log in, (False, why) when Zhihu says they do not.
        When Zhihu cannot be asked (network, 5xx, throttling) it raises PublishError: unknown
        is neither answer."""
        try:
            me = ZhihuSession(driver, self.origins, account, lambda: REQUEST_SECONDS).log_in()
        except LoginExpired as error:
            return False, str(error)
        return True, f'已登录知乎：{dig(me, ANSWERS["user_name"]) or dig(me, ANSWERS["user_id"])} (logged in)'


class ZhihuSession:
    """One browser's conversation with Zhihu for one account: cookies in, JSON calls out."""

    def __init__(self, driver, origins, account, seconds_left):
        self.driver = driver
        self.origins = origins
        self.cookies = dict((account or {}).get('cookies', ()))
        self.seconds_left = seconds_left

    # -- login -------------------------------------------------------------------------

    def log_in(self):
        """Put the account's cookies into the browser and ask Zhihu who we are."""
        missing = [name for name in ZhihuPublisher.required_cookies if not self.cookies.get(name)]
        if missing:
            raise LoginExpired(f'知乎 Cookie 不完整，缺少 {", ".join(missing)}：请在已登录知乎的浏览器中复制完整 Cookie，'
                               f'在账号页更新 (the stored Zhihu login lacks {", ".join(missing)})')
        self._import_cookies()
        status, me = self.call('me')
        if status == 200 and isinstance(me, dict) and dig(me, ANSWERS['user_id']):
            return me
        raise LoginExpired('知乎登录已失效：请在已登录知乎的浏览器中复制 Cookie，在账号页更新 '
                           '(the stored Zhihu cookies no longer log in)')

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
        raise PublishError('知乎创建草稿后没有返回草稿编号，稍后重试 (no draft id in Zhihu\'s answer)')

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

    def add_topic(self, draft_id, title):
        """Attach the first topic Zhihu suggests for the title (or, failing that, its words):
        without a topic Zhihu usually refuses the article."""
        for query in topic_queries(title):
            _, found = self.call('topic_search', token=quote(query, safe=''))
            if isinstance(found, list) and found and isinstance(found[0], dict):
                self.call('add_topic', id=draft_id, method='POST', body=found[0])
                return found[0]
        raise PublishError(f'知乎没有找到与标题「{title}」相关的话题，而没有话题的文章通常无法发布：'
                           '请在标题中写明主题词（如“Python”“机器学习”）后重新提交 '
                           '(no Zhihu topic matches the title; an article without a topic is usually refused)',
                           retryable=False)

    def publish(self, draft_id):
        """Ask Zhihu to publish the draft. Raises PublishAnswerLost when the answer is lost."""
        status, answer = self.call('publish', method='POST', body=publish_request(draft_id))
        if not isinstance(answer, dict):
            raise PublishAnswerLost(f'HTTP {status}, unreadable answer')
        if any(dig(answer, path) == value for path, value in ANSWERS['published']):
            return answer
        message = error_message(answer) or json.dumps(answer, ensure_ascii=False)[:200]
        if any(word in message.lower() for word in THROTTLED_WORDS):
            raise throttled(message)
        raise PublishError(f'知乎拒绝发布这篇文章：{message}。请按提示修改后重新提交 '
                           f'(Zhihu refused to publish: {message})', retryable=False)

    def is_published(self, article_id, wait=0.0):
        """True once /p/<id> says the article is published; polls up to `wait` seconds."""
        deadline = time.monotonic() + min(wait, max(0.0, self.seconds_left() - 2))
        while True:
            status, data = self.call('article_page', id=article_id, script_id=ANSWERS['initial_data'],
                                     allow=(404,))
            path = [part.format(id=article_id) for part in ANSWERS['article_state']]
            if status == 200 and isinstance(data, dict) and dig(data, path) == ANSWERS['published_state']:
                return True
            if time.monotonic() + POLL_SECONDS > deadline:
                return False
            time.sleep(POLL_SECONDS)

    # -- the one way we talk to Zhihu --------------------------------------------------

    def call(self, endpoint, method='GET', body=None, allow=(), script_id=None, **params):
        """One request from a page of the endpoint's own origin. Returns (status, decoded JSON)
        for 2xx and for statuses in `allow`; raises with a user-readable message otherwise."""
        origin_name, path = ENDPOINTS[endpoint]
        origin = self.origins[origin_name]
        url = origin + path.format(**params)
        self._stand_on(origin)
        headers = {} if script_id else {'x-requested-with': 'fetch'}
        if method != 'GET':
            headers.update({'x-xsrftoken': self.cookies['_xsrf'], 'content-type': 'application/json'})
        timeout = self._time_for(REQUEST_SECONDS)
        self.driver.set_script_timeout(timeout + 5)
        payload = None if body is None else json.dumps(body, ensure_ascii=False)
        try:
            answer = self.driver.execute_async_script(FETCH_JS, method, url, headers, payload,
                                                      int(timeout * 1000), script_id)
        except WebDriverException as error:
            raise self._failure(endpoint, 0, f'browser: {error.msg}') from error
        status, text = answer['status'], answer['text']
        if ANSWERS['signin_path'] in urlsplit(answer['url'] or '').path:
            status = 401
        data = decode_json(text)
        if 200 <= status < 300 or status in allow:
            return status, data
        raise self._failure(endpoint, status, error_message(data) or (text or '')[:200])

    def _failure(self, endpoint, status, detail):
        lost = status == 0 or status >= 500
        if endpoint == 'publish' and lost:
            return PublishAnswerLost(f'HTTP {status}: {detail}' if status else detail)
        if status == 401:
            return LoginExpired('知乎登录已失效：请在已登录知乎的浏览器中复制 Cookie，在账号页更新 '
                                f'(Zhihu answered 401 to {endpoint}: the cookies no longer log in)')
        if status == 429 or any(word in detail.lower() for word in THROTTLED_WORDS):
            return throttled(detail)
        if any(word in detail.lower() for word in CAPTCHA_WORDS):
            return PublishError(f'知乎要求人工验证：请在浏览器中登录知乎完成验证后再发布，自动发布已停止以免账号被限制 '
                                f'(Zhihu asks for a captcha on {endpoint}: {detail})', retryable=False)
        if status == 403:
            return LoginExpired(f'知乎拒绝了请求（HTTP 403：{detail}）：Cookie 可能已过期或不完整（需要 z_c0、d_c0、_xsrf、'
                                '__zse_ck），也可能触发了风控。请在浏览器中登录知乎确认账号正常，再在账号页更新 Cookie '
                                f'(Zhihu answered 403 to {endpoint})')
        if lost:
            return PublishError(f'暂时连不上知乎（{endpoint}：HTTP {status} {detail}），稍后自动重试 '
                                f'(Zhihu could not be reached: {detail})')
        return PublishError(f'知乎拒绝了请求（{endpoint}：HTTP {status}，{detail}）：请按提示修改后重新提交 '
                            f'(Zhihu refused {endpoint} with HTTP {status})', retryable=False)

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


def topic_queries(title):
    """The title itself, then its longest words: Zhihu's topic search matches names, not sentences."""
    words = [word for word in re.split(r'[\s\W_]+', title) if len(word) >= 2]
    queries = [title] + sorted(dict.fromkeys(words), key=len, reverse=True)
    return list(dict.fromkeys(queries))[:TOPIC_QUERIES]


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


def error_message(answer):
    if not isinstance(answer, dict):
        return None
    for path in ANSWERS['error_message']:
        message = dig(answer, path)
        if isinstance(message, str) and message:
            return message
    return None


def throttled(detail):
    return PublishError(f'知乎限流：这个账号操作过于频繁（{detail}），已暂停，稍后自动重试；请降低发布频率 '
                        '(Zhihu is throttling this account; will retry later)')
