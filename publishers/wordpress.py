"""WordPress sites (any self-hosted WordPress), published through the logged-in page's REST calls.

Each user stores their own site, user name and password. The browser logs in through the
site's own wp-login.php form only when the session cookies saved by an earlier task no longer
work, and the fresh cookies are saved again. Then, from a page of the site, it calls WordPress's
REST API as that user with the page's nonce (`X-WP-Nonce`), as the block editor itself does:
no editor selector can break under us, and nothing needs an application password.

Exactly once: the post is created as a draft and its id remembered (persisted) before anything
is published; the publish is an update of that draft. A later attempt that holds the id looks
at that post first (published: done; otherwise it publishes the same post). An attempt after an
earlier one that left no id looks through the account's own posts of every status since the
first attempt began for the same title and body, so neither a published post nor a leftover
draft is made twice. A lost publish answer is settled by looking at the post.

Every path, route and selector is in PATHS / ROUTES / SELECTORS below.
"""

import datetime
import html
import json
import re
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit, urlunsplit

from selenium.common.exceptions import WebDriverException

import content
from publishers.base import BadAccount, LoginExpired, Publisher, PublishError
from publishers.browser import click, fetch, import_cookies, rehost_pictures, upload_bytes, wait_for

PATHS = {
    # Answers the REST nonce as plain text to a logged-in user, '0' (HTTP 400) to anyone else:
    # one light page that both tells whether the cookies work and lets us call the REST API.
    'nonce': '/wp-admin/admin-ajax.php?action=rest-nonce',
    'login': '/wp-login.php',
    'rest': '/?rest_route=',   # works with plain permalinks too, unlike /wp-json/
}
ROUTES = {
    'me': '/wp/v2/users/me',
    'posts': '/wp/v2/posts',
    'post': '/wp/v2/posts/{id}',
    'media': '/wp/v2/media',
    'index': '/',
}
SELECTORS = {
    'user': '#user_login',
    'password': '#user_pass',
    'remember': '#rememberme',
    'submit': ('#wp-submit',),
    'error': '#login_error',
}
SESSION_COOKIE_PREFIX = 'wordpress_'          # wordpress_<hash>, wordpress_sec_<hash>, wordpress_logged_in_<hash>
LOGIN_TEST_COOKIE = 'wordpress_test_cookie'   # only the login form needs it
NONCE = re.compile(r'[0-9a-f]{10}')
OWN_STATUSES = 'publish,draft,pending'   # all an attempt of ours can leave behind
GONE_STATUSES = ('trash',)
PAGE_SIZE = 100
# How far apart the site's clock and ours may be when matching an earlier attempt's post.
CLOCK_SLACK = datetime.timedelta(seconds=120)
REQUEST_SECONDS = 30.0
PAGE_SECONDS = 30.0
LOGIN_SECONDS = 30.0
CHECK_SECONDS = 5.0
PUBLISHING_ROLES = 'Author/Editor/Administrator'

PAGE_STATE_JS = """
const navigation = performance.getEntriesByType('navigation')[0];
const error = document.querySelector(arguments[0]);
return {origin: location.origin, path: location.pathname, status: navigation ? navigation.responseStatus : 0,
        text: document.body ? document.body.innerText.trim() : '',
        error: error && error.innerText.trim() ? error.innerText.trim() : null};
"""
FILL_LOGIN_JS = """
const [userSelector, passwordSelector, rememberSelector, user, password] = arguments;
const userField = document.querySelector(userSelector), passwordField = document.querySelector(passwordSelector);
if (!userField || !passwordField) return false;
userField.value = user;
passwordField.value = password;
const remember = document.querySelector(rememberSelector);
if (remember) remember.checked = true;
return true;
"""


class WordPressPublisher(Publisher):
    name = 'wordpress'
    label = 'WordPress'
    needs_browser = True
    login_fields = ('site', 'username', 'password')

    def publish(self, attempt):
        if not attempt.title.strip():
            raise PublishError('标题为空：WordPress 文章必须有标题 (the title is empty)', retryable=False)
        session = WordPressSession(attempt.driver, attempt.account, lambda: attempt.seconds_left)
        fresh_cookies = session.log_in()
        if fresh_cookies:
            attempt.remember_account({'cookies': fresh_cookies})
        session.require_publishing_role()
        attempt.progress(30)

        post = self._earlier_post(session, attempt)
        if post is not None and post['status'] == 'publish':
            attempt.mark_submitted()
            url = session.verified_link(post)
            attempt.progress(100)
            return url
        if post is None:
            post = session.create_draft(attempt.title, wordpress_html(attempt.body_html))
            attempt.remember_platform_ref(str(post['id']))
        body = rehost_pictures(attempt, lambda picture: session.upload_media(post['id'], picture),
                               place=f'{session.site} post {post["id"]}', start=30, end=55)
        if attempt.pictures():
            session.update_draft(post['id'], wordpress_html(body))
        attempt.progress(60)

        attempt.mark_submitted()
        post = session.publish(post['id'])
        attempt.progress(85)
        url = session.verified_link(post)
        attempt.progress(100)
        return url

    def check_login(self, driver, account):
        """(True, who) when the stored cookies or password log in, (False, why) when the site says
        they do not. A site that cannot be asked raises PublishError: unknown is neither answer."""
        session = WordPressSession(driver, account, lambda: REQUEST_SECONDS)
        try:
            session.log_in()
        except LoginExpired as error:
            return False, str(error)
        return True, f'logged in as {session.me.get("username") or session.username} at {session.site}'

    def check_account(self, fields):
        site = site_url(fields.get('site'))
        username = (fields.get('username') or '').strip()
        password = fields.get('password') or ''
        if not username or not password:
            raise BadAccount('请填写 WordPress 用户名和密码 (the WordPress user name and password are both required)')
        require_wordpress_at(site)
        return {'site': site, 'username': username, 'password': password}

    def _earlier_post(self, session, attempt):
        """The post an earlier attempt made of this article, or None: the remembered one first,
        else (after any earlier attempt) a match by title and body among the account's own posts."""
        if attempt.platform_ref:
            post = session.post(remembered_post_id(attempt.platform_ref))
            if post is not None and post['status'] not in GONE_STATUSES:
                return post
        if not attempt.earlier_attempts:
            return None
        since = attempt.first_started_at - CLOCK_SLACK if attempt.first_started_at else datetime.datetime.min
        post = session.find_own_post(attempt.title, content.html_fingerprint(attempt.body_html), since)
        if post is not None and post['status'] != 'publish':
            attempt.remember_platform_ref(str(post['id']))
        return post


class WordPressSession:
    """One browser's conversation with one WordPress site for one account."""

    def __init__(self, driver, account, seconds_left):
        account = account or {}
        self.driver = driver
        try:
            self.site = site_url(account.get('site'))
        except BadAccount as error:
            raise LoginExpired(str(error)) from None
        self.username = account.get('username') or ''
        self.password = account.get('password') or ''
        self.cookies = [tuple(pair) for pair in account.get('cookies') or ()]
        self.seconds_left = seconds_left
        self.nonce = None
        self.me = None

    # -- login -------------------------------------------------------------------------

    def log_in(self):
        """Log in with the stored cookies, or with the password when they no longer work.
        Returns the new session cookies after a password login, None when the stored ones did."""
        if self.cookies:
            import_cookies(self.driver, self.site, self.cookies)
            self.nonce = self._nonce_of(self._open(self.site + PATHS['nonce']))
            if self.nonce:
                self.me = self.call('GET', 'me', context='edit')
                if self._is_account_user():
                    return None
            self.driver.delete_all_cookies()
        if not self.username or not self.password:
            raise LoginExpired(f'WordPress 账号缺少用户名或密码：请在账号页填写 {self.site} 的登录信息 '
                               f'(the stored login for {self.site} has no user name or password)')
        self.nonce = self._submit_login_form()
        self.me = self.call('GET', 'me', context='edit')
        return self._session_cookies()

    def require_publishing_role(self):
        if not (self.me.get('capabilities') or {}).get('publish_posts'):
            roles = ', '.join(self.me.get('roles') or ()) or 'none'
            raise PublishError(f'WordPress 用户 {self.username} 的角色（{roles}）不能发布文章：请站点管理员把它设为作者、'
                               f'编辑或管理员 (the user {self.username} on {self.site} has the role {roles}, which '
                               f'cannot publish posts; the role must be {PUBLISHING_ROLES})', retryable=False)

    def _is_account_user(self):
        """The stored cookies log in as the stored user, not as someone the account used to be
        (WordPress takes the e-mail address for a user name too)."""
        names = (self.me.get('username'), self.me.get('email'))
        return self.username.lower() in [str(name or '').lower() for name in names]

    def _submit_login_form(self):
        """The site's own login form, landing on the nonce page; the nonce, or why not."""
        login_url = self.site + PATHS['login'] + '?redirect_to=' + quote(self.site + PATHS['nonce'], safe='')
        self._open(login_url, expect_path=PATHS['login'])
        if not self.driver.execute_script(FILL_LOGIN_JS, SELECTORS['user'], SELECTORS['password'],
                                          SELECTORS['remember'], self.username, self.password):
            raise PublishError(f'{self.site}{PATHS["login"]} 没有登录表单，稍后自动重试 (the login page of {self.site} '
                               f'has no {SELECTORS["user"]} / {SELECTORS["password"]} form)')
        click(self.driver, SELECTORS['submit'], 'log-in button')
        state = wait_for(self._login_outcome, self._time_for(LOGIN_SECONDS), f'{self.site} to answer the log-in')
        if state['error'] is not None:
            raise LoginExpired(f'WordPress 用户名或密码错误：请在账号页更新 {self.site} 的登录信息 '
                               f'(the user name or password is wrong for {self.site}: {state["error"]})')
        if state['path'] != urlsplit(self.site + PATHS['nonce']).path:
            state = self._open(self.site + PATHS['nonce'])   # a plugin sent the log-in somewhere else
        nonce = self._nonce_of(state)
        if nonce is None:
            raise PublishError(f'登录 {self.site} 后仍未处于登录状态，稍后自动重试 '
                               f'(logged in to {self.site}, but the site does not see the login)')
        return nonce

    def _login_outcome(self):
        try:
            state = self._page_state()
        except WebDriverException:
            return None  # the page is between the form and the next one
        if state['path'].endswith(PATHS['login']) and state['error'] is None:
            return None
        return state

    def _session_cookies(self):
        cookies = {cookie['name']: cookie['value'] for cookie in self.driver.get_cookies()
                   if cookie['name'].startswith(SESSION_COOKIE_PREFIX) and cookie['name'] != LOGIN_TEST_COOKIE}
        return [[name, value] for name, value in sorted(cookies.items())]

    def _nonce_of(self, state):
        """The REST nonce the nonce page shows a logged-in user; None for a visitor."""
        if state['status'] == 200 and NONCE.fullmatch(state['text']):
            return state['text']
        if state['status'] in (400, 403) and state['text'] in ('0', '-1'):
            return None
        raise PublishError(f'{self.site} 的 {PATHS["nonce"]} 回答了 HTTP {state["status"]}，不像 WordPress，稍后自动重试 '
                           f'(the site answered HTTP {state["status"]} with {state["text"][:80]!r} where WordPress '
                           'answers its REST nonce)')

    # -- posts -------------------------------------------------------------------------

    def post(self, post_id):
        """The post as its author sees it (context=edit), or None when it is gone."""
        status, answer = self.request('GET', 'post', post_id=post_id, context='edit', allow=(404, 410))
        return None if status in (404, 410) else answer

    def find_own_post(self, title, fingerprint, since):
        """This account's newest post of any status dated `since` or later with this title and body."""
        page = 1
        while True:
            _, posts = self.request('GET', 'posts', context='edit', author=self.me['id'], status=OWN_STATUSES,
                                    orderby='date', order='desc', per_page=PAGE_SIZE, page=page, allow=(400,))
            if not isinstance(posts, list):   # 400: a page past the last one
                return None
            for post in posts:
                if post_date(post) < since:
                    return None
                if same_title(post, title) and content.html_fingerprint(post['content']['raw']) == fingerprint:
                    return post
            if len(posts) < PAGE_SIZE:
                return None
            page += 1

    def create_draft(self, title, body):
        return self.call('POST', 'posts', body={'title': title, 'content': body, 'status': 'draft'})

    def update_draft(self, post_id, body):
        return self.request('POST', 'post', post_id=post_id, body={'content': body})[1]

    def upload_media(self, post_id, picture):
        """One picture into the site's media library as an attachment of the post; its URL on the
        site's uploads."""
        url = self.site + PATHS['rest'] + ROUTES['media'] + f'&post={post_id}'
        headers = {'X-WP-Nonce': self.nonce or '', 'Content-Type': picture.mime,
                   'Content-Disposition': f'attachment; filename="{picture.file_name}"'}
        status, text = upload_bytes(self.driver, 'POST', url, picture.data, headers,
                                    timeout=self._time_for(REQUEST_SECONDS))
        answer = decode_json(text)
        if status != 201 or not isinstance(answer, dict) or not answer.get('source_url'):
            raise self._refusal('media', status, answer if answer is not None else text)
        return answer['source_url']

    def publish(self, post_id):
        """Publish the post; a lost answer is settled by looking at the post."""
        try:
            status, answer = self.request('POST', 'post', post_id=post_id, body={'status': 'publish'},
                                          allow=range(400, 600), refusal=True)
        except PublishError as error:
            status, answer = 0, str(error)
        if status == 200 and isinstance(answer, dict):
            if answer.get('status') == 'publish':
                return answer
            raise PublishError(f'WordPress 没有发布文章 {post_id}，而是把它设为了 {answer.get("status")} '
                               f'(the site kept post {post_id} as {answer.get("status")!r} instead of publishing it)',
                               retryable=False, refused=True)
        if 0 < status < 500:
            raise self._refusal('publish', status, answer, refused=True)
        post = self.post(post_id)
        if post is not None and post['status'] == 'publish':
            return post
        raise PublishError(f'{self.site} 的发布应答丢失（HTTP {status}），文章 {post_id} 尚未发布：下次尝试会先核对这篇文章，'
                           f'不会重复发文 (the publish answer was lost and post {post_id} is not published; '
                           'the retry checks it first)')

    def verified_link(self, post):
        """The post's permalink, once it answers HTTP 200 with the post's title in its HTML. The HTML
        as served, not the page as shown: WordPress's emoji script swaps emoji for images on screen."""
        link = post['link']
        if self._page_state()['origin'] != origin_of(link):
            self._open(link, expect_origin=False)
        status, page = fetch(self.driver, 'GET', link, timeout=self._time_for(PAGE_SECONDS))
        title = ' '.join(content.text_content(post['title']['rendered']).split())
        if status != 200 or title not in ' '.join(content.text_content(page).split()):
            raise PublishError(f'{link} 没有显示这篇文章（HTTP {status}），稍后自动重试核对 '
                               f'(the permalink answered HTTP {status} without the title {title!r})')
        return link

    # -- the one way we talk to the REST API -------------------------------------------

    def call(self, method, route, body=None, **params):
        return self.request(method, route, body=body, **params)[1]

    def request(self, method, route, body=None, allow=(), refusal=False, post_id=None, **query):
        """One REST call as the logged-in user, from the page we stand on. Returns (status, JSON)
        for 2xx and for statuses in `allow`; raises with the site's own message otherwise."""
        url = self.site + PATHS['rest'] + ROUTES[route].format(id=post_id)
        url += ''.join(f'&{key}={quote(str(value), safe=",")}' for key, value in query.items())
        status, text = fetch(self.driver, method, url, body, {'X-WP-Nonce': self.nonce or ''},
                             timeout=self._time_for(REQUEST_SECONDS))
        answer = decode_json(text)
        if 200 <= status < 300 or status in allow:
            return status, answer
        raise self._refusal(route, status, answer if answer is not None else text, refused=refusal)

    def _refusal(self, what, status, answer, refused=False):
        message = answer.get('message') if isinstance(answer, dict) else None
        detail = html.unescape(message) if message else str(answer or '')[:200]
        code = answer.get('code') if isinstance(answer, dict) else None
        if status == 0:
            return PublishError(f'连不上 WordPress 站点 {self.site}，稍后自动重试 (the site {self.site} does not answer: '
                                f'{detail})')
        if status >= 500:
            return PublishError(f'WordPress 站点 {self.site} 出错（HTTP {status}），稍后自动重试 '
                                f'(the site {self.site} failed with HTTP {status}: {detail})')
        if code in ('rest_cookie_invalid_nonce', 'rest_not_logged_in'):
            return PublishError(f'{self.site} 的登录在发布途中失效，稍后自动重试 (the login to {self.site} ended '
                                f'mid-way: {detail})')
        if code in ('rest_cannot_publish', 'rest_cannot_create', 'rest_cannot_edit'):
            return PublishError(f'WordPress 用户 {self.username} 没有发布权限：{detail}。角色必须是作者、编辑或管理员 '
                                f'(the site refused: {detail}; the role must be {PUBLISHING_ROLES})',
                                retryable=False, refused=refused)
        return PublishError(f'WordPress 站点拒绝了这篇文章：{detail} (the site {self.site} refused {what} with HTTP '
                            f'{status}: {detail})', retryable=False, refused=refused)

    # -- pages -------------------------------------------------------------------------

    def _open(self, url, expect_path=None, expect_origin=True):
        """Load a page of the site; its state. A site that does not answer is retryable."""
        self.driver.set_page_load_timeout(self._time_for(PAGE_SECONDS))
        try:
            self.driver.get(url)
        except WebDriverException as error:
            raise PublishError(f'连不上 WordPress 站点 {self.site}，稍后自动重试 (the site {self.site} does not '
                               f'answer: {error.msg})') from error
        state = self._page_state()
        if expect_origin and state['origin'] != origin_of(self.site):
            raise PublishError(f'打开 {url} 时被转到了 {self.driver.current_url}，稍后自动重试 '
                               f'(opening {url} landed on {self.driver.current_url})')
        if expect_path and not state['path'].endswith(expect_path):
            raise PublishError(f'打开 {url} 时被转到了 {self.driver.current_url}，稍后自动重试 '
                               f'(opening {url} landed on {self.driver.current_url})')
        return state

    def _page_state(self):
        return self.driver.execute_script(PAGE_STATE_JS, SELECTORS['error'])

    def _time_for(self, most):
        return max(1.0, min(most, self.seconds_left()))


# -- what we send and compare ---------------------------------------------------------------------

def wordpress_html(body_html):
    """Our rendered Markdown as a classic-editor post body. WordPress runs wpautop on such posts,
    which turns every newline inside a paragraph into <br>: soft line breaks become spaces here
    (inside <pre> they are kept)."""
    chunks = re.split(r'(<pre\b.*?</pre>)', body_html, flags=re.S)
    return ''.join(chunk if chunk.startswith('<pre') else chunk.replace('\n', ' ') for chunk in chunks)


def same_title(post, title):
    """WordPress stores an author's title through kses, which writes & and < as entities."""
    return html.unescape(post['title']['raw']).strip() == title.strip()


def post_date(post):
    return datetime.datetime.fromisoformat(post['date_gmt'] or post['modified_gmt']).replace(tzinfo=None)


def remembered_post_id(ref):
    if not re.fullmatch(r'\d+', str(ref)):
        raise PublishError(f'这个任务记录的 WordPress 文章编号 {ref!r} 无法识别，为避免重复发文已停止 '
                           '(the remembered WordPress post id is not a number)', retryable=False)
    return int(ref)


# -- the account ----------------------------------------------------------------------------------

def site_url(text):
    """'https://blog.example.com/wp-admin/' -> 'https://blog.example.com': the site's root, as typed."""
    parts = urlsplit((text or '').strip())
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise BadAccount(f'WordPress 站点地址必须是 http:// 或 https:// 开头的网址，例如 https://blog.example.com '
                         f'(the site must be an http(s) URL; got {text!r})')
    path = re.sub(r'/(wp-login\.php|wp-admin(/.*)?|index\.php)$', '', parts.path).rstrip('/')
    return urlunsplit((parts.scheme, parts.netloc, path, '', ''))


def origin_of(url):
    parts = urlsplit(url)
    return f'{parts.scheme}://{parts.netloc}'


def require_wordpress_at(site):
    """BadAccount unless `site` answers as WordPress: its REST index lists wp/v2, or (REST turned
    off by a plugin) its login page has the login form."""
    status, text = probe(site + PATHS['rest'] + ROUTES['index'])
    index = decode_json(text)
    if status == 200 and isinstance(index, dict) and 'wp/v2' in (index.get('namespaces') or ()):
        return
    status, text = probe(site + PATHS['login'])
    if status == 200 and 'id="user_login"' in text:
        return
    raise BadAccount(f'{site} 不是 WordPress 站点：没有 WordPress 的 REST 接口，也没有 wp-login.php 登录页 '
                     f'(the site does not look like WordPress: no REST index listing wp/v2, no login form; '
                     f'it answered HTTP {status})')


def probe(url):
    """(HTTP status, text) of a GET of `url`; BadAccount when nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=CHECK_SECONDS) as response:
            return response.status, response.read().decode('utf-8', 'replace')
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode('utf-8', 'replace')
    except OSError as error:
        site = origin_of(url)
        raise BadAccount(f'{site} 没有应答，请检查站点地址 (nothing answers at {site}: '
                         f'{getattr(error, "reason", error)})') from None


def decode_json(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
