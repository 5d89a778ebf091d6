"""The pages keep their promises: sessions and CSRF, slow and limited wrong passwords,
isolation between users, escaping, refusals in words, and a task table that stops polling.

In-process through WSGI against real MariaDB and Redis, with a client that keeps cookies
as a browser does. No worker runs, so tasks stay where a test puts them.
"""

import dataclasses
import html.parser
import http.cookies
import io
import json
import sys
import time
import uuid

import pytest

from accounts import AccountStore
from conftest import SECRET, Sandbox, batch, count_tasks, web_app
from db import Database
from publishers import load_publishers
from scheduler import Keys, Scheduler

PASSWORD = 'secret'
LOGIN_DELAY = 0.3


# -- a browser-like client ---------------------------------------------------------------

@dataclasses.dataclass
class PageResponse:
    status: int
    headers: list
    body: bytes

    @property
    def text(self):
        return self.body.decode('utf-8')

    def header(self, name):
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return values[0] if values else None

    def set_cookies(self):
        return [value for key, value in self.headers if key.lower() == 'set-cookie']

    @property
    def scan(self):
        return PageScan.of(self.text)


class Browser:
    """Calls the WSGI app in-process and keeps its cookies, as a browser on one site does."""

    def __init__(self, app):
        self.app = app
        self.cookies = {}
        self.csrf_token = None

    def request(self, method, path, data=b'', content_type='', headers=None):
        path, _, query = path.partition('?')
        environ = {
            'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': query,
            'SERVER_NAME': 'test', 'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(data), 'wsgi.errors': sys.stderr,
            'wsgi.version': (1, 0), 'wsgi.multithread': True, 'wsgi.multiprocess': False, 'wsgi.run_once': False,
            'CONTENT_LENGTH': str(len(data)), 'CONTENT_TYPE': content_type, 'HTTP_ACCEPT': 'text/html',
        }
        if self.cookies:
            environ['HTTP_COOKIE'] = '; '.join(f'{name}={value}' for name, value in self.cookies.items())
        for name, value in (headers or {}).items():
            environ['HTTP_' + name.upper().replace('-', '_')] = value
        captured = {}

        def start_response(status, response_headers, exc_info=None):
            captured['status'] = int(status.split()[0])
            captured['headers'] = list(response_headers)

        chunks = self.app(environ, start_response)
        body = b''.join(chunks)
        if hasattr(chunks, 'close'):
            chunks.close()
        response = PageResponse(captured['status'], captured['headers'], body)
        self._keep_cookies(response)
        return response

    def _keep_cookies(self, response):
        for raw in response.set_cookies():
            for name, morsel in http.cookies.SimpleCookie(raw).items():
                if morsel['max-age'] == '0' or (morsel['expires'] and '1970' in morsel['expires']):
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def get(self, path, htmx=False, headers=None):
        return self.request('GET', path, headers={**(headers or {}), **({'HX-Request': 'true'} if htmx else {})})

    def post(self, path, fields=(), files=(), csrf=True, htmx=False, headers=None):
        """A form post: multipart for the batch form (as its enctype says) or when there are
        files ((name, filename, bytes)), urlencoded otherwise."""
        fields = list(fields)
        if csrf and self.csrf_token:
            fields.append(('csrf_token', self.csrf_token))
        headers = {**(headers or {}), **({'HX-Request': 'true'} if htmx else {})}
        if files or path.startswith('/batches'):
            data, content_type = multipart(fields, files)
        else:
            from urllib.parse import urlencode
            data, content_type = urlencode(fields).encode(), 'application/x-www-form-urlencoded'
        return self.request('POST', path, data, content_type, headers)

    def log_in(self, name, password=PASSWORD):
        response = self.post('/login', [('username', name), ('password', password)])
        assert response.status == 303, (response.status, response.text[:300])
        self.csrf_token = self.get('/').scan.csrf_token
        return response


def multipart(fields, files):
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + content + b'\r\n')
    parts.append(f'--{boundary}--\r\n'.encode())
    return b''.join(parts), f'multipart/form-data; boundary={boundary}'


class PageScan(html.parser.HTMLParser):
    """What a test needs from a page: task rows, form fields, options, the CSRF token."""

    def __init__(self):
        super().__init__()
        self.rows, self.titles, self.contents, self.platforms = [], [], [], []
        self.csrf_token = None
        self.triggers = {}
        self._in_select = self._in_textarea = None

    @classmethod
    def of(cls, text):
        scan = cls()
        scan.feed(text)
        scan.close()
        return scan

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if 'data-task-id' in attrs and tag == 'tr':
            self.rows.append({'task_id': attrs['data-task-id'], 'status': attrs['data-status']})
        if 'id' in attrs and 'hx-trigger' in attrs:
            self.triggers[attrs['id']] = attrs['hx-trigger']
        if tag == 'input' and attrs.get('name') == 'title':
            self.titles.append(attrs.get('value', ''))
        if tag == 'input' and attrs.get('name') == 'csrf_token':
            self.csrf_token = attrs['value']
        if tag == 'textarea' and attrs.get('name') == 'content':
            self._in_textarea = []
        if tag == 'select':
            self._in_select = attrs.get('name')
        if tag == 'input' and attrs.get('type') == 'checkbox' and attrs.get('name') == 'platform':
            self.platforms.append(attrs['value'])

    def handle_endtag(self, tag):
        if tag == 'textarea' and self._in_textarea is not None:
            self.contents.append(''.join(self._in_textarea).removeprefix('\n'))
            self._in_textarea = None
        if tag == 'select':
            self._in_select = None

    def handle_data(self, data):
        if self._in_textarea is not None:
            self._in_textarea.append(data)

    def row(self, task_id):
        return next(row for row in self.rows if row['task_id'] == task_id)


# -- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture
def site(config, db, scheduler, tmp_path):
    """make(**settings) -> a Browser on a fresh app with those settings."""
    def make(**overrides):
        settings = {'login_failure_delay': LOGIN_DELAY, 'secret_key': SECRET, 'state_dir': str(tmp_path / 'state'),
                    **overrides}
        app_config = dataclasses.replace(config, **settings)
        return Browser(web_app(app_config, db, Scheduler(app_config, db, scheduler.redis,
                                                           load_publishers(app_config))))
    return make


@pytest.fixture
def browser(site):
    return site()


def store_login(db, config, user, platform='sandbox', cookies='sbx_session=s3cr3t-session-value'):
    AccountStore(db, SECRET).save(user.id, load_publishers(config)[platform], {'cookies': cookies})


def article_fields(*articles, platform='sandbox'):
    fields = [('platform', platform)]
    for title, content in articles:
        fields += [('title', title), ('content', content)]
    return fields


def task_status(db, task_id):
    with db.transaction() as cur:
        cur.execute('SELECT status FROM publish_tasks WHERE task_id = %s', (task_id,))
        return cur.fetchone()['status']


def fail_with_evidence(db, config, task_id, state_dir):
    """Run one attempt of a task to failure the way a worker records it, with evidence files."""
    attempt = db.start_attempt(task_id, 'test-worker', config.lease_ttl)['attempt']
    assert db.end_attempt(task_id, attempt, 'failed', 'failed', error='平台拒绝了这篇文章')
    db.record_evidence(task_id, attempt, {'screenshot.png': b'\x89PNG\r\n\x1a\nnot-really-a-png',
                                          'page.html': b'<html><script>alert(1)</script></html>',
                                          'url.txt': b'http://platform.example/write'})
    return attempt


# -- logging in ----------------------------------------------------------------------------

def test_right_password_opens_an_httponly_samesite_session_and_shows_the_page(browser, make_user):
    make_user('alice')

    response = browser.post('/login', [('username', 'alice'), ('password', PASSWORD)])

    assert response.status == 303 and response.header('Location') == '/'
    [cookie] = response.set_cookies()
    assert cookie.startswith('topn_session=')
    attributes = {part.strip().lower() for part in cookie.split(';')}
    assert {'httponly', 'samesite=lax', 'path=/'} <= attributes
    page = browser.get('/')
    assert page.status == 200
    assert 'alice' in page.text and 'id="batch-form"' in page.text and 'id="tasks"' in page.text


def test_pages_without_a_session_send_the_browser_to_the_login_form(browser):
    assert browser.get('/').header('Location') == '/login'
    assert browser.get('/accounts').status == 303
    fragment = browser.get('/fragments/tasks', htmx=True)
    assert fragment.status == 401 and fragment.header('HX-Redirect') == '/login'
    login = browser.get('/login')
    assert login.status == 200
    assert 'name="username"' in login.text and 'name="password"' in login.text and 'action="/login"' in login.text


def test_wrong_password_is_refused_and_slowed_by_the_configured_delay(browser, make_user):
    make_user('alice')

    started = time.monotonic()
    response = browser.post('/login', [('username', 'alice'), ('password', 'wrong')])
    elapsed = time.monotonic() - started

    assert response.status == 401
    assert '用户名或密码不正确' in response.text
    assert elapsed >= LOGIN_DELAY
    assert response.set_cookies() == [] and browser.get('/').status == 303


def test_unknown_user_is_refused_with_the_same_words_and_delay(browser):
    started = time.monotonic()
    response = browser.post('/login', [('username', 'nobody'), ('password', 'whatever')])

    assert response.status == 401 and '用户名或密码不正确' in response.text
    assert time.monotonic() - started >= LOGIN_DELAY


def test_repeated_wrong_passwords_lock_the_name_out_even_for_the_right_password(site, make_user, redis_client, config):
    browser = site(login_max_failures=3, login_failure_delay=0.01, login_lockout=60)
    make_user('alice')

    statuses = [browser.post('/login', [('username', 'alice'), ('password', f'guess{i}')]).status for i in range(3)]
    locked = browser.post('/login', [('username', 'ALICE'), ('password', PASSWORD)])

    assert statuses == [401, 401, 429]
    assert locked.status == 429 and '暂时锁定' in locked.text and int(locked.header('Retry-After')) > 0
    assert browser.get('/').status == 303
    assert list(redis_client.scan_iter(match=f'{config.redis_prefix}:login:failures:*'))


def test_right_password_resets_the_count_of_wrong_ones(site, make_user):
    browser = site(login_max_failures=3, login_failure_delay=0.01)
    make_user('alice')
    for _ in range(2):
        assert browser.post('/login', [('username', 'alice'), ('password', 'wrong')]).status == 401

    browser.log_in('alice')
    for _ in range(2):
        assert browser.post('/login', [('username', 'alice'), ('password', 'wrong')]).status == 401
    assert browser.post('/login', [('username', 'alice'), ('password', PASSWORD)]).status == 303


def test_logging_out_ends_the_session_on_the_server(browser, make_user):
    make_user('alice')
    browser.log_in('alice')
    stolen = dict(browser.cookies)

    assert browser.post('/logout').status == 303

    assert browser.get('/').status == 303
    browser.cookies = stolen
    assert browser.get('/').header('Location') == '/login'


# -- CSRF ------------------------------------------------------------------------------------

def test_post_without_the_csrf_token_is_refused_with_403_and_creates_nothing(browser, make_user, db, config):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')
    fields = article_fields(('标题', '正文'))

    missing = browser.post('/batches', fields, csrf=False)
    wrong = browser.post('/batches', fields + [('csrf_token', 'not-the-token')], csrf=False)
    wrong_header = browser.post('/batches', fields, csrf=False, htmx=True, headers={'X-CSRF-Token': 'nope'})

    assert [missing.status, wrong.status, wrong_header.status] == [403, 403, 403]
    assert '页面已过期' in missing.text and 'Traceback' not in missing.text
    assert count_tasks(db) == 0
    assert browser.post('/batches', fields, csrf=False, headers={'X-CSRF-Token': browser.csrf_token}).status == 303
    assert count_tasks(db) == 1


def test_cancel_logout_and_account_posts_need_the_csrf_token_too(browser, make_user, db, config, scheduler):
    alice = make_user('alice')
    store_login(db, config, alice)
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    browser.log_in('alice')

    assert browser.post(f'/tasks/{task_id}/cancel', csrf=False).status == 403
    assert browser.post('/accounts/sandbox/delete', csrf=False).status == 403
    assert browser.post('/logout', csrf=False).status == 403
    assert task_status(db, task_id) == 'pending'
    assert [row['platform'] for row in db.accounts_of(alice.id)] == ['sandbox']
    assert browser.get('/').status == 200


def test_api_takes_the_session_cookie_and_needs_the_csrf_header_to_post(browser, make_user, db):
    make_user('alice')
    browser.log_in('alice')
    body = json.dumps(batch(1)).encode()

    refused = browser.request('POST', '/api/publish/create_batch', body, 'application/json')
    accepted = browser.request('POST', '/api/publish/create_batch', body, 'application/json',
                               {'X-CSRF-Token': browser.csrf_token})
    listing = browser.get('/api/publish/tasks/list')

    assert refused.status == 403 and json.loads(refused.body)['error']['code'] == 'csrf_failed'
    assert accepted.status == 200
    assert [t['task_id'] for t in json.loads(listing.body)['tasks']] == json.loads(accepted.body)['task_ids']


# -- the batch form --------------------------------------------------------------------------

def test_batch_form_submits_every_article_through_the_scheduler(browser, make_user, db, config, redis_client):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('第一篇', '正文 **一**'), ('', ''), ('Second', 'body\r\ntwo'))
                            + [('priority', 'urgent')], htmx=True)

    assert response.status == 200, response.text[:500]
    assert response.header('HX-Trigger') == 'tasks-changed'
    assert '已提交 2 个发布任务' in response.text
    with db.transaction() as cur:
        cur.execute('SELECT task_id, article_title, article_content, platform, priority, status FROM publish_tasks '
                    'WHERE user_id = %s ORDER BY id', (alice.id,))
        rows = cur.fetchall()
    assert [(r['article_title'], r['article_content'], r['platform'], r['priority'], r['status']) for r in rows] == [
        ('第一篇', '正文 **一**', 'sandbox', 'urgent', 'pending'), ('Second', 'body\ntwo', 'sandbox', 'urgent', 'pending')]
    queued = redis_client.lrange(Keys(config.redis_prefix).queue(alice.id), 0, -1)
    assert sorted(queued) == sorted(r['task_id'] for r in rows)


@pytest.mark.parametrize('articles, words', [
    ([(f't{i}', 'b') for i in range(11)], '一批最多 10 篇文章'),
    ([('ok', 'b'), ('x' * 501, 'b')], '第 2 篇文章的标题太长了'),
    ([('ok', 'b'), ('ok', 'b'), ('no body', '   ')], '第 3 篇文章缺少正文'),
    ([('', 'a body without a title')], '第 1 篇文章缺少标题'),
    ([('big', 'x' * (1024 * 1024 + 1))], '第 1 篇文章的正文太大了'),
    ([], '请至少填写一篇文章'),
], ids=['eleven-articles', 'title-too-long', 'empty-body', 'no-title', 'body-too-large', 'empty'])
def test_batch_over_the_limits_shows_a_chinese_message_next_to_the_form_and_creates_nothing(
        browser, make_user, db, config, articles, words):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(*articles), htmx=True)

    assert response.status == 400
    assert words in response.text
    assert 'id="batch-form"' in response.text and 'role="alert"' in response.text
    assert count_tasks(db) == 0


def test_batch_refused_by_the_active_limit_keeps_the_articles_and_says_why(browser, make_user, db, config, scheduler):
    alice = make_user('alice')
    store_login(db, config, alice)
    scheduler.submit_batch(alice.id, batch(9, platform='sandbox'))
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('留下的标题', '正文一'), ('第二个', '正文二')), htmx=True)

    assert response.status == 429 and response.header('Retry-After')
    assert '每个平台同时最多只能有 10 个未完成的任务' in response.text and '「沙盒平台」' in response.text
    assert response.scan.titles == ['留下的标题', '第二个'] and response.scan.contents == ['正文一', '正文二']
    assert count_tasks(db) == 9


def test_topics_typed_into_the_batch_form_are_stored_with_each_of_its_tasks(browser, make_user, db, config):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('第一篇', '一'), ('第二篇', '二'))
                            + [('topics', ' Python，机器学习、 Python ')], htmx=True)

    assert response.status == 200, response.text[:500]
    with db.transaction() as cur:
        cur.execute('SELECT topics FROM publish_tasks WHERE user_id = %s ORDER BY id', (alice.id,))
        assert [json.loads(row['topics']) for row in cur.fetchall()] == [['Python', '机器学习']] * 2


def test_too_many_topics_are_refused_in_words_and_the_typed_topics_stay_in_the_form(browser, make_user, db, config):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('第一篇', '一')) + [('topics', '一,二,三,四,五,六')], htmx=True)

    assert response.status == 400 and '话题写得不对：最多 5 个' in response.text
    assert 'value="一,二,三,四,五,六"' in response.text
    assert count_tasks(db) == 0


def test_platform_select_lists_only_platforms_with_a_stored_login(site, make_user, db, config):
    alice, _bob = make_user('alice'), make_user('bob')
    store_login(db, config, alice)
    alice_browser, bob_browser = site(), site()
    alice_browser.log_in('alice')
    bob_browser.log_in('bob')

    assert alice_browser.get('/').scan.platforms == ['sandbox']
    bob_page = bob_browser.get('/')
    assert bob_page.scan.platforms == [] and '平台账号' in bob_page.text
    refused = bob_browser.post('/batches', article_fields(('t', 'b'), platform='noop'), htmx=True)
    assert refused.status == 400 and '你还没有添加「noop」的账号' in refused.text
    assert count_tasks(db) == 0


def test_uploaded_markdown_files_fill_titles_and_bodies(browser, make_user, db, config):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')
    with_heading = '\ufeff前言一行\n\n# 第一篇的标题\n\n正文第一段\n\n```\n# 代码里的注释\n```\n'.encode()
    without_heading = '## 小标题\n\n没有一级标题的正文\n'.encode()

    response = browser.post('/batches/form', article_fields(('', '')),
                            files=[('files', '第一篇.md', with_heading), ('files', '无标题笔记.txt', without_heading)],
                            htmx=True)

    assert response.status == 200, response.text[:500]
    assert response.scan.titles == ['第一篇的标题', '无标题笔记']
    assert response.scan.contents == ['前言一行\n\n正文第一段\n\n```\n# 代码里的注释\n```', '## 小标题\n\n没有一级标题的正文']
    assert count_tasks(db) == 0


def test_files_uploaded_with_the_submit_become_articles_of_the_batch(browser, make_user, db, config):
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('打出来的', '正文')),
                            files=[('files', 'a.md', '# 文件里的\n\n内容'.encode())], htmx=True)

    assert response.status == 200
    with db.transaction() as cur:
        cur.execute('SELECT article_title, article_content FROM publish_tasks ORDER BY id')
        assert [(r['article_title'], r['article_content']) for r in cur.fetchall()] == [
            ('打出来的', '正文'), ('文件里的', '内容')]


def test_an_upload_that_is_not_markdown_utf8_or_a_real_picture_is_refused_in_words(browser, make_user, db, config):
    make_user('alice')
    browser.log_in('alice')

    binary = browser.post('/batches/form', article_fields(('', '')), files=[('files', 'x.md', b'\xff\xfe\x00bad')],
                          htmx=True)
    other = browser.post('/batches/form', article_fields(('', '')), files=[('files', 'cat.pdf', b'%PDF-1.4')],
                         htmx=True)
    fake = browser.post('/batches/form', article_fields(('', '')), files=[('files', 'cat.png', b'%PDF-1.4')],
                        htmx=True)

    assert '不是 UTF-8 编码的文本文件' in binary.text
    assert '不是 .md、.txt 文件或图片' in other.text
    assert '不是 PNG、JPEG、GIF 或 WebP 图片' in fake.text, 'a picture is judged by its bytes'


def test_form_adds_and_removes_article_slots_without_submitting(browser, make_user, db):
    make_user('alice')
    browser.log_in('alice')

    added = browser.post('/batches/form', article_fields(('一', '1')) + [('slot_change', 'add')], htmx=True)
    three = article_fields(('一', '1'), ('二', '2'), ('三', '3'))
    removed = browser.post('/batches/form', three + [('slot_change', 'remove:1')], htmx=True)

    assert added.scan.titles == ['一', '']
    assert removed.scan.titles == ['一', '三'] and removed.scan.contents == ['1', '3']
    assert count_tasks(db) == 0


# -- the task table --------------------------------------------------------------------------

def test_task_table_stops_polling_when_nothing_is_unfinished_and_polls_while_something_is(
        browser, make_user, scheduler):
    alice = make_user('alice')
    browser.log_in('alice')

    idle = browser.get('/fragments/tasks', htmx=True)
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    busy = browser.get('/fragments/tasks', htmx=True)
    cancelled = browser.post(f'/tasks/{task_id}/cancel', htmx=True)
    after = browser.get('/fragments/tasks', htmx=True)

    assert idle.status == 286 and 'every 2s' not in idle.scan.triggers['tasks']
    assert 'tasks-changed from:body' in idle.scan.triggers['tasks']
    assert busy.status == 200 and busy.scan.triggers['tasks'].startswith('every 2s')
    assert cancelled.status == 200 and 'every 2s' not in cancelled.scan.triggers['tasks']
    assert after.status == 286 and after.scan.rows == [{'task_id': task_id, 'status': 'cancelled'}]


def test_task_rows_show_status_progress_link_error_evidence_and_the_right_buttons(
        browser, make_user, scheduler, db, config, tmp_path):
    alice = make_user('alice')
    published, failed, waiting = scheduler.submit_batch(alice.id, batch(3, prefix='文章'))
    attempt = db.start_attempt(published, 'test-worker', config.lease_ttl)['attempt']
    db.set_progress(published, attempt, 60)
    db.end_attempt(published, attempt, 'success', 'success', result_url='http://platform.example/p/1')
    fail_with_evidence(db, config, failed, tmp_path / 'state')
    browser.log_in('alice')

    page = browser.get('/fragments/tasks', htmx=True)

    assert page.scan.rows == [{'task_id': waiting, 'status': 'pending'}, {'task_id': failed, 'status': 'failed'},
                              {'task_id': published, 'status': 'success'}]
    rows = {task_id: row_html(page.text, task_id) for task_id in (published, failed, waiting)}
    assert 'href="http://platform.example/p/1"' in rows[published] and 'value="100"' in rows[published]
    assert '已发布' in rows[published] and '/cancel' not in rows[published] and '/retry' not in rows[published]
    assert '平台拒绝了这篇文章' in rows[failed] and '/retry' in rows[failed]
    assert f'/api/publish/tasks/{failed}/evidence/1/screenshot.png' in rows[failed]
    assert '等待中' in rows[waiting] and '/cancel' in rows[waiting] and 'value="0"' in rows[waiting]
    assert '1 / 4' in rows[failed] and '0 / 4' in rows[waiting]


def test_a_published_tasks_note_is_shown_with_its_link(browser, make_user, scheduler, db, config):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    attempt = db.start_attempt(task_id, 'test-worker', config.lease_ttl)['attempt']
    db.end_attempt(task_id, attempt, 'success', 'success', result_url='http://platform.example/p/1',
                   note='知乎没有与标题匹配的话题，文章已按无话题发布')
    browser.log_in('alice')

    row = row_html(browser.get('/fragments/tasks', htmx=True).text, task_id)
    detail = browser.get(f'/tasks/{task_id}').text

    assert 'class="note">知乎没有与标题匹配的话题，文章已按无话题发布' in row
    assert '知乎没有与标题匹配的话题' in detail


def row_html(text, task_id):
    start = text.index(f'data-task-id="{task_id}"')
    return text[start:text.index('</tr>', start)]


def test_a_script_in_a_title_renders_as_text(browser, make_user, scheduler):
    alice = make_user('alice')
    evil = '<script>alert(1)</script>'
    [task_id] = scheduler.submit_batch(alice.id, {'platform': 'noop', 'articles': [{'title': evil, 'content': evil}]})
    browser.log_in('alice')

    for response in (browser.get('/fragments/tasks', htmx=True), browser.get('/'), browser.get(f'/tasks/{task_id}')):
        assert evil not in response.text
        assert '&lt;script&gt;alert(1)&lt;/script&gt;' in response.text


def test_a_script_typed_into_the_form_comes_back_escaped(browser, make_user):
    make_user('alice')
    browser.log_in('alice')
    evil = '"><script>alert(1)</script>'

    response = browser.post('/batches/form', article_fields((evil, '</textarea><script>alert(2)</script>')), htmx=True)

    assert '<script>' not in response.text
    assert response.scan.titles == [evil] and response.scan.contents == ['</textarea><script>alert(2)</script>']


def test_cancel_and_retry_from_the_table(browser, make_user, scheduler, db):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    browser.log_in('alice')

    cancelled = browser.post(f'/tasks/{task_id}/cancel', htmx=True)
    retried = browser.post(f'/tasks/{task_id}/retry', htmx=True)
    again = browser.post(f'/tasks/{task_id}/retry', htmx=True)

    assert cancelled.scan.rows == [{'task_id': task_id, 'status': 'cancelled'}] and '任务已取消' in cancelled.text
    assert retried.scan.rows == [{'task_id': task_id, 'status': 'pending'}] and '重新排队' in retried.text
    assert again.status == 409 and '只有失败或已取消的任务可以重试' in again.text
    assert task_status(db, task_id) == 'pending'


def test_task_table_filters_by_status_and_pages(site, make_user, scheduler):
    browser = site(user_max_active=100, user_rate=100)
    alice = make_user('alice')
    app_scheduler = Scheduler(dataclasses.replace(scheduler.config, user_max_active=100, user_rate=100),
                              scheduler.db, scheduler.redis, load_publishers(scheduler.config))
    task_ids = app_scheduler.submit_batch(alice.id, batch(10)) + app_scheduler.submit_batch(alice.id, batch(10))
    task_ids += app_scheduler.submit_batch(alice.id, batch(5))
    for task_id in task_ids[:3]:
        scheduler.cancel(alice.id, task_id)
    browser.log_in('alice')

    first = browser.get('/fragments/tasks', htmx=True).scan.rows
    second = browser.get('/fragments/tasks?page=2', htmx=True).scan.rows
    cancelled = browser.get('/fragments/tasks?status=cancelled', htmx=True).scan.rows
    bad = browser.get('/fragments/tasks?status=bogus', htmx=True)

    newest_first = list(reversed(task_ids))
    assert [r['task_id'] for r in first] == newest_first[:20]
    assert [r['task_id'] for r in second] == newest_first[20:]
    assert [r['task_id'] for r in cancelled] == list(reversed(task_ids[:3]))
    assert bad.status == 400 and bad.header('HX-Retarget') == '#flash' and '未知的任务状态' in bad.text


# -- isolation -------------------------------------------------------------------------------

def test_another_users_task_cannot_be_seen_cancelled_retried_or_its_evidence_fetched(
        site, make_user, scheduler, db, config, tmp_path):
    alice, _bob = make_user('alice'), make_user('bob')
    pending, failed = scheduler.submit_batch(alice.id, batch(2))
    fail_with_evidence(db, config, failed, tmp_path / 'state')
    alice_browser, bob_browser = site(), site()
    alice_browser.log_in('alice')
    bob_browser.log_in('bob')
    evidence = f'/api/publish/tasks/{failed}/evidence/1/screenshot.png'

    assert bob_browser.get('/fragments/tasks', htmx=True).scan.rows == []
    assert pending not in bob_browser.get('/').text
    assert bob_browser.get(f'/tasks/{pending}').status == 404
    assert bob_browser.post(f'/tasks/{pending}/cancel', htmx=True).status == 404
    assert bob_browser.post(f'/tasks/{failed}/retry', htmx=True).status == 404
    assert bob_browser.post(f'/tasks/{pending}/cancel').status == 404
    assert bob_browser.get(evidence).status == 404
    assert bob_browser.get(f'/api/publish/tasks/{pending}').status == 404
    assert json.loads(bob_browser.get(f'/api/publish/tasks/status?task_ids={pending},{failed}').body)['tasks'] == []
    missing = bob_browser.post(f'/tasks/{uuid.uuid4()}/cancel', htmx=True)
    assert missing.status == 404 and '没有找到这个任务' in missing.text
    assert [task_status(db, pending), task_status(db, failed)] == ['pending', 'failed']
    assert alice_browser.get(f'/tasks/{pending}').status == 200
    assert alice_browser.get(evidence).body.startswith(b'\x89PNG')


def test_evidence_pages_are_served_in_a_sandbox_without_scripts(browser, make_user, scheduler, db, config, tmp_path):
    alice = make_user('alice')
    [task_id] = scheduler.submit_batch(alice.id, batch(1))
    fail_with_evidence(db, config, task_id, tmp_path / 'state')
    browser.log_in('alice')

    response = browser.get(f'/api/publish/tasks/{task_id}/evidence/1/page.html')

    assert response.status == 200
    assert response.header('Content-Security-Policy') == 'sandbox'
    assert response.header('X-Content-Type-Options') == 'nosniff'


# -- platform logins ---------------------------------------------------------------------------

def test_account_cookies_are_saved_replaced_and_deleted_and_never_shown_back(browser, make_user, db):
    alice = make_user('alice')
    browser.log_in('alice')

    saved = browser.post('/accounts/sandbox', [('cookies', 'sbx_session=first-SECRET-value')], htmx=True)
    replaced = browser.post('/accounts/sandbox', [('cookies', 'sbx_session=second-SECRET-value; other=1')], htmx=True)
    page = browser.get('/accounts')

    assert saved.status == 200 and '已保存' in saved.text
    assert replaced.status == 200
    for response in (saved, replaced, page):
        assert 'SECRET' not in response.text
    assert 'SECRET' not in db.account_secret(alice.id, 'sandbox')
    assert AccountStore(db, SECRET).load(alice.id, 'sandbox') == {
        'cookies': [('sbx_session', 'second-SECRET-value'), ('other', '1')]}
    assert browser.get('/').scan.platforms == ['sandbox']

    deleted = browser.post('/accounts/sandbox/delete', htmx=True)
    assert deleted.status == 200 and '已删除' in deleted.text
    assert list(db.accounts_of(alice.id)) == []


def test_zhihu_column_is_saved_with_the_login_shown_back_in_its_field_and_optional(browser, make_user, db):
    alice = make_user('alice')
    browser.log_in('alice')
    cookies = 'z_c0=SECRET1; d_c0=SECRET2; _xsrf=SECRET3; __zse_ck=SECRET4'

    saved = browser.post('/accounts/zhihu', [('cookies', cookies),
                                             ('column', 'https://www.zhihu.com/column/c_1234567890')], htmx=True)
    page = browser.get('/accounts')
    refused = browser.post('/accounts/zhihu', [('cookies', cookies), ('column', '我的专栏')], htmx=True)
    without = browser.post('/accounts/zhihu', [('cookies', cookies), ('column', '')], htmx=True)

    assert saved.status == 200 and 'name="column" value="c_1234567890"' in page.text
    assert 'SECRET' not in saved.text + page.text
    assert refused.status == 400 and '专栏请写专栏的编号' in refused.text
    assert without.status == 200
    assert 'column' not in AccountStore(db, SECRET).load(alice.id, 'zhihu')


def test_account_cookies_without_the_required_names_are_refused_in_words(browser, make_user, db):
    alice = make_user('alice')
    browser.log_in('alice')

    missing = browser.post('/accounts/zhihu', [('cookies', 'z_c0=1; d_c0=2')], htmx=True)
    garbled = browser.post('/accounts/zhihu', [('cookies', 'just some text')], htmx=True)
    unknown = browser.post('/accounts/noop', [('cookies', 'a=1')], htmx=True)

    assert missing.status == 400 and '缺少必需的 Cookie：_xsrf, __zse_ck' in missing.text
    assert garbled.status == 400 and 'Cookie 的格式不对' in garbled.text
    assert unknown.status == 404
    assert list(db.accounts_of(alice.id)) == []


def test_accounts_page_offers_wordpress_with_site_user_name_and_password_and_never_shows_the_password(
        browser, make_user, db, wordpress_site):
    alice = make_user('alice')
    wordpress_site.add_user('alice_wp', 'SECRET-pw-value')
    browser.log_in('alice')

    page = browser.get('/accounts')
    form = page.text[page.text.index('data-platform="wordpress"'):]
    form = form[:form.index('</article>')]
    refused = browser.post('/accounts/wordpress', [('site', 'http://127.0.0.1:9/'), ('username', 'alice_wp'),
                                                   ('password', 'SECRET-pw-value')], htmx=True)
    saved = browser.post('/accounts/wordpress', [('site', wordpress_site.url), ('username', 'alice_wp'),
                                                 ('password', 'SECRET-pw-value')], htmx=True)

    for name, kind in (('site', 'url'), ('username', 'text'), ('password', 'password')):
        assert f'type="{kind}" name="{name}"' in form
    assert refused.status == 400 and '无法保存这个登录' in refused.text
    assert saved.status == 200 and '已保存' in saved.text
    assert wordpress_site.url in saved.text and 'alice_wp' in saved.text, 'site and user name are shown again'
    assert 'SECRET' not in saved.text + browser.get('/accounts').text
    assert AccountStore(db, SECRET).load(alice.id, 'wordpress') == {
        'site': wordpress_site.url, 'username': 'alice_wp', 'password': 'SECRET-pw-value'}
    assert browser.get('/').scan.platforms == ['wordpress']


def test_account_check_asks_the_sandbox_platform_in_a_real_browser(site, make_user, tmp_path):
    platform = Sandbox()
    try:
        cookies = platform.session_for('alice')
        browser = site(sandbox_url=platform.url, browser_root=str(tmp_path / 'browsers'))
        make_user('alice')
        browser.log_in('alice')
        browser.post('/accounts/sandbox', [('cookies', cookies)], htmx=True)

        working = browser.post('/accounts/sandbox/check', htmx=True)
        browser.post('/accounts/sandbox', [('cookies', 'sbx_session=expired-or-made-up')], htmx=True)
        expired = browser.post('/accounts/sandbox/check', htmx=True)
    finally:
        platform.server.close()

    assert working.status == 200 and '登录有效' in working.text, working.text[:800]
    assert '登录已失效' in expired.text
    assert cookies not in working.text + expired.text


# -- admin -------------------------------------------------------------------------------------

def test_admin_page_and_metrics_are_refused_to_a_user_who_is_not_an_admin(site, make_user, client):
    alice = make_user('alice')
    browser = site()
    browser.log_in('alice')

    for path in ('/admin', '/fragments/metrics', '/metrics', '/api/metrics'):
        assert browser.get(path).status == 403, path
    assert client.get('/metrics', headers=alice.headers).status == 403
    assert '只有管理员' in browser.get('/admin').text


def test_admin_sees_live_metrics_and_prometheus_text(site, make_user, scheduler, client):
    boss, alice = make_user('boss', admin=True), make_user('alice')
    scheduler.submit_batch(alice.id, batch(2))
    browser = site()
    browser.log_in('boss')

    page = browser.get('/admin')
    fragment = browser.get('/fragments/metrics', htmx=True)
    prometheus = client.get('/metrics', headers=boss.headers)
    by_session = browser.get('/metrics')
    as_json = json.loads(browser.get('/api/metrics').body)

    assert page.status == 200 and 'id="metrics"' in page.text and 'every 2s' in page.text
    assert fragment.status == 200 and 'alice' in fragment.text
    assert prometheus.status == 200 and prometheus.headers['Content-Type'].startswith('text/plain; version=0.0.4')
    text = prometheus.body.decode()
    assert 'topn_tasks{status="pending"} 2' in text and 'topn_queue_length{user="alice"} 2' in text
    assert 'topn_browsers_max 8' in text and by_session.status == 200
    assert as_json['browser_pool'] == {'working': 0, 'idle': 0, 'max': 8}
    assert as_json['tasks_by_status']['pending'] == 2


# -- limits and errors ---------------------------------------------------------------------------

def test_a_request_body_over_the_limit_is_refused_with_413_and_creates_nothing(site, make_user, db, config):
    browser = site(max_request_bytes=2000)
    alice = make_user('alice')
    store_login(db, config, alice)
    browser.log_in('alice')

    response = browser.post('/batches', article_fields(('big', 'x' * 3000)), htmx=True)

    assert response.status == 413 and '提交的内容太大了' in response.text
    assert count_tasks(db) == 0


def test_errors_reach_the_browser_as_a_short_page_without_a_trace(site, make_user, db, monkeypatch):
    browser = site()
    make_user('alice')
    browser.log_in('alice')

    def broken(*args, **kwargs):
        raise RuntimeError('a bug with a secret detail')
    monkeypatch.setattr(db, 'task_page', broken)
    page = browser.get('/')
    fragment = browser.get('/fragments/tasks', htmx=True)
    unknown = browser.get('/no-such-page')

    assert page.status == 500 and '服务器出错了' in page.text
    assert fragment.status == 500 and fragment.header('HX-Retarget') == '#flash'
    for response in (page, fragment):
        assert 'Traceback' not in response.text and 'secret detail' not in response.text
    assert unknown.status == 404 and '页面不存在' in unknown.text and '<html' in unknown.text


def test_mysql_away_answers_503_in_words(config, redis_client):
    app_config = dataclasses.replace(config, mysql_url='mysql://root@127.0.0.1:1/nothing')
    away = Database(app_config.mysql, connect_timeout=1)
    app = web_app(app_config, away, Scheduler(app_config, away, redis_client, load_publishers(app_config)))
    browser = Browser(app)
    browser.cookies['topn_session'] = 'anything'

    response = browser.get('/')

    assert response.status == 503 and '数据库暂时无法访问' in response.text


def test_pages_send_a_content_policy_and_no_store(browser, make_user):
    make_user('alice')
    browser.log_in('alice')

    page = browser.get('/')
    htmx = browser.get('/static/htmx-2.0.11.min.js')

    policy = page.header('Content-Security-Policy')
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.header('Cache-Control') == 'no-store'
    assert htmx.status == 200 and 'immutable' in htmx.header('Cache-Control')
    assert b'htmx' in htmx.body[:200]
