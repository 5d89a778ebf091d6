"""The sandbox platform keeps its contract: tested against a real waitress server and real headless Chromium."""

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import pytest
import waitress
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sandbox import make_app
from sandbox.markup import sanitize_html

BROWSER_WAIT_SECONDS = 15

PASTE_HTML_INTO_EDITOR = """
const [html] = arguments;
const editor = document.getElementById('editor');
const clipboard = new DataTransfer();
clipboard.setData('text/html', html);
editor.focus();
editor.dispatchEvent(new ClipboardEvent('paste', {clipboardData: clipboard, bubbles: true, cancelable: true}));
"""


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def sandbox_server():
    """One real sandbox on waitress, on a free port, for the whole module."""
    server = waitress.create_server(make_app(), host='127.0.0.1', port=0, threads=8)
    thread = threading.Thread(target=server.run, name='sandbox-server', daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.effective_port}'
    finally:
        server.close()
        thread.join(timeout=5)


@pytest.fixture
def sandbox(sandbox_server):
    """The sandbox's base URL, emptied before and after the test."""
    call(sandbox_server, 'POST', '/api/reset')
    yield sandbox_server
    call(sandbox_server, 'POST', '/api/reset')


@pytest.fixture
def browser(headless_browser):
    return headless_browser


def call(base, method, path, payload=None, cookies=None):
    """One API call; returns (status, decoded JSON), error statuses included."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header('Content-Type', 'application/json')
    if cookies:
        request.add_header('Cookie', cookies)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


class _DoNotFollowRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch_page(base, path, form=None, cookies=None):
    """One page request without following redirects; returns (status, headers, text)."""
    data = None if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(base + path, data=data)
    if cookies:
        request.add_header('Cookie', cookies)
    opener = urllib.request.build_opener(_DoNotFollowRedirects)
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode()


def log_in_new_account(base, name='writer', password='s3cret'):
    """Create an account and return its session as a cookie string."""
    assert call(base, 'POST', '/api/accounts', {'name': name, 'password': password})[0] == 201
    status, answer = call(base, 'POST', '/api/session', {'name': name, 'password': password})
    assert status == 200
    return answer['cookies']


def publish(base, cookies, title='标题', body='<p>正文</p>'):
    return call(base, 'POST', '/api/publish', {'title': title, 'body': body}, cookies=cookies)


def set_faults(base, **knobs):
    status, answer = call(base, 'POST', '/api/faults', knobs)
    assert status == 200, answer
    return answer


def published_articles(base):
    return call(base, 'GET', '/api/articles')[1]['articles']


def sha256_hex(text):
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def elapsed_seconds(action):
    started = time.monotonic()
    action()
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------------
# Accounts and sessions
# ---------------------------------------------------------------------------------------------------


def test_account_is_created_once_and_a_duplicate_name_is_rejected(sandbox):
    assert call(sandbox, 'POST', '/api/accounts', {'name': '张三', 'password': 'pw'}) == (201, {'name': '张三'})

    status, answer = call(sandbox, 'POST', '/api/accounts', {'name': '张三', 'password': 'other'})

    assert status == 409
    assert answer['error']['code'] == 'account_exists'


@pytest.mark.parametrize(
    'payload', [{}, {'name': 'a'}, {'password': 'pw'}, {'name': '', 'password': 'pw'}, {'name': 'a', 'password': ' '}]
)
def test_account_creation_requires_a_name_and_a_password(sandbox, payload):
    status, answer = call(sandbox, 'POST', '/api/accounts', payload)

    assert status == 400
    assert answer['error']['code'] == 'invalid_field'


def test_session_cookie_identifies_the_account_on_api_me(sandbox):
    cookies = log_in_new_account(sandbox, name='writer')

    assert re.fullmatch(r'sbx_session=[\w-]+', cookies)
    assert call(sandbox, 'GET', '/api/me', cookies=cookies) == (200, {'name': 'writer'})


def test_passwords_may_be_chinese(sandbox):
    log_in_new_account(sandbox, name='作者', password='密码很长')

    assert call(sandbox, 'POST', '/api/session', {'name': '作者', 'password': '密码很长'})[0] == 200
    assert call(sandbox, 'POST', '/api/session', {'name': ['作者'], 'password': '密码很长'})[0] == 401


def test_wrong_password_gets_no_session(sandbox):
    log_in_new_account(sandbox, name='writer', password='right')

    status, answer = call(sandbox, 'POST', '/api/session', {'name': 'writer', 'password': 'wrong'})

    assert status == 401
    assert 'cookies' not in answer


@pytest.mark.parametrize('cookies', [None, 'sbx_session=forged-token'])
def test_api_me_without_a_valid_session_answers_not_logged_in(sandbox, cookies):
    status, answer = call(sandbox, 'GET', '/api/me', cookies=cookies)

    assert status == 401
    assert answer['error']['code'] == 'not_logged_in'


# ---------------------------------------------------------------------------------------------------
# Publishing and listing
# ---------------------------------------------------------------------------------------------------


def test_listed_fingerprint_is_sha256_of_the_stored_text_content(sandbox):
    cookies = log_in_new_account(sandbox, name='writer')
    body = '<p>你好，<b>世界</b> &amp; co</p>\n<ul><li>一</li><li>二</li></ul><script>alert(1)</script>'

    status, answer = publish(sandbox, cookies, title='  第一篇  ', body=body)

    assert status == 200
    [article] = published_articles(sandbox)
    assert article['id'] == answer['id']
    assert article['account'] == 'writer'
    assert article['title'] == '第一篇'
    assert article['body_sha256'] == sha256_hex('你好，世界 & co\n一二')
    assert article['url'] == answer['url'] == f'{sandbox}/p/{answer["id"]}'
    assert datetime.fromisoformat(article['created_at']).utcoffset() == timezone.utc.utcoffset(None)


def test_article_page_shows_the_sanitized_body(sandbox):
    cookies = log_in_new_account(sandbox, name='writer')
    body = '<p onclick="x()">正文<b>加粗</b><script>bad()</script></p>'
    _, answer = publish(sandbox, cookies, title='<i>标题</i>', body=body)

    status, _, page = fetch_page(sandbox, f'/p/{answer["id"]}')

    assert status == 200
    assert f'data-article-id="{answer["id"]}"' in page
    assert '<h1 class="article-title">&lt;i&gt;标题&lt;/i&gt;</h1>' in page
    assert '<div class="article-body"><p>正文<strong>加粗</strong></p></div>' in page
    assert 'writer' in page


def test_sanitizer_keeps_the_whitelist_and_drops_scripts_handlers_and_styles():
    untrusted = (
        '<p onclick="x()" style="color:red">a<a href="javascript:alert(1)">b</a>'
        '<a href="https://example.com/?a=1&b=2" target="_blank">c</a><img src="x.png" onerror="y()">'
        '<span>d</span><b>e</b><style>p { color: red }</style><img src=" java\tscript:alert(1)"></p><h2>f'
    )

    assert sanitize_html(untrusted) == (
        '<p>a<a>b</a><a href="https://example.com/?a=1&amp;b=2">c</a><img src="x.png">d<strong>e</strong></p><h2>f</h2>'
    )


def test_own_articles_are_listed_newest_first_without_other_accounts(sandbox):
    writer = log_in_new_account(sandbox, name='writer')
    other = log_in_new_account(sandbox, name='other')
    _, first = publish(sandbox, writer, title='第一篇')
    publish(sandbox, other, title='别人的')
    _, second = publish(sandbox, writer, title='第二篇')

    status, answer = call(sandbox, 'GET', '/api/me/articles', cookies=writer)

    assert status == 200
    assert [item['id'] for item in answer['articles']] == [second['id'], first['id']]
    assert {item['account'] for item in answer['articles']} == {'writer'}
    assert call(sandbox, 'GET', '/api/me/articles')[0] == 401


def test_article_ids_are_numeric_and_increasing(sandbox):
    cookies = log_in_new_account(sandbox)

    ids = [publish(sandbox, cookies, title=f'第{n}篇')[1]['id'] for n in range(3)]

    assert all(isinstance(article_id, int) for article_id in ids)
    assert ids == sorted(ids) and len(set(ids)) == 3


@pytest.mark.parametrize(
    'title, body, code',
    [
        ('', '<p>正文</p>', 'empty_content'),
        ('标题', '', 'empty_content'),
        ('标题', '<p> </p><img src="a.png">', 'empty_content'),
        ('标题', '<script>alert(1)</script>', 'empty_content'),
        ('长' * 101, '<p>正文</p>', 'title_too_long'),
    ],
)
def test_publish_rejects_empty_content_and_overlong_titles(sandbox, title, body, code):
    cookies = log_in_new_account(sandbox)

    status, answer = publish(sandbox, cookies, title=title, body=body)

    assert status == 400
    assert answer['error']['code'] == code
    assert published_articles(sandbox) == []


def test_a_title_of_exactly_100_characters_is_accepted(sandbox):
    cookies = log_in_new_account(sandbox)

    assert publish(sandbox, cookies, title='长' * 100)[0] == 200


def test_publish_without_a_session_is_refused(sandbox):
    status, answer = publish(sandbox, cookies=None)

    assert status == 401
    assert answer['error']['code'] == 'not_logged_in'
    assert published_articles(sandbox) == []


def test_reset_clears_accounts_sessions_articles_and_faults(sandbox):
    cookies = log_in_new_account(sandbox, name='writer')
    publish(sandbox, cookies)
    set_faults(sandbox, too_frequent=True, page_latency_ms=5)

    assert call(sandbox, 'POST', '/api/reset')[0] == 200

    assert published_articles(sandbox) == []
    assert call(sandbox, 'GET', '/api/me', cookies=cookies)[0] == 401
    assert call(sandbox, 'POST', '/api/accounts', {'name': 'writer', 'password': 'pw'})[0] == 201
    assert call(sandbox, 'GET', '/api/faults')[1]['too_frequent'] is False


# ---------------------------------------------------------------------------------------------------
# Fault knobs
# ---------------------------------------------------------------------------------------------------


def test_faults_set_a_subset_and_answer_the_full_knob_set(sandbox):
    answer = set_faults(sandbox, publish_fail_rate=0.25, too_frequent=True)

    assert answer == {
        'publish_fail_rate': 0.25,
        'publish_latency_ms': 0,
        'page_latency_ms': 0,
        'expire_sessions': False,
        'too_frequent': True,
        'lost_response_rate': 0.0,
        'fail_image_upload': 0,
    }
    assert call(sandbox, 'GET', '/api/faults') == (200, answer)


@pytest.mark.parametrize(
    'knobs',
    [
        {'publish_fail_rate': 1.5},
        {'lost_response_rate': -0.1},
        {'publish_fail_rate': '0.5'},
        {'publish_fail_rate': True},
        {'publish_latency_ms': -1},
        {'page_latency_ms': '100'},
        {'page_latency_ms': 3_600_000},
        {'expire_sessions': 'yes'},
        {'too_frequent': 1},
        {'no_such_knob': True},
        {'too_frequent': True, 'publish_fail_rate': 2},
    ],
)
def test_invalid_fault_knobs_are_rejected_and_change_nothing(sandbox, knobs):
    status, answer = call(sandbox, 'POST', '/api/faults', knobs)

    assert status == 400
    assert answer['error']['code'] == 'invalid_fault'
    assert answer['error']['message']
    assert call(sandbox, 'GET', '/api/faults')[1]['too_frequent'] is False


def test_faults_must_be_a_json_object(sandbox):
    status, answer = call(sandbox, 'POST', '/api/faults', [1, 2])

    assert status == 400
    assert answer['error']['code'] == 'invalid_json'


def test_fail_rate_one_answers_500_and_stores_nothing(sandbox):
    cookies = log_in_new_account(sandbox)
    set_faults(sandbox, publish_fail_rate=1.0)

    status, answer = publish(sandbox, cookies)

    assert status == 500
    assert answer['error']['code'] == 'publish_failed'
    assert published_articles(sandbox) == []


def test_lost_response_rate_one_stores_the_article_but_answers_502(sandbox):
    cookies = log_in_new_account(sandbox, name='writer')
    set_faults(sandbox, lost_response_rate=1.0)

    status, answer = publish(sandbox, cookies, title='丢失的回应', body='<p>正文</p>')

    assert status == 502
    assert answer['error']['code'] == 'response_lost'
    [mine] = call(sandbox, 'GET', '/api/me/articles', cookies=cookies)[1]['articles']
    assert (mine['title'], mine['body_sha256']) == ('丢失的回应', sha256_hex('正文'))
    assert published_articles(sandbox) == [mine]


def test_too_frequent_answers_429_in_chinese_and_stores_nothing(sandbox):
    cookies = log_in_new_account(sandbox)
    set_faults(sandbox, too_frequent=True)

    status, answer = publish(sandbox, cookies)

    assert status == 429
    assert answer['error'] == {'code': 'too_frequent', 'message': '操作过于频繁，请稍后再试'}
    assert published_articles(sandbox) == []


def test_expire_sessions_invalidates_existing_sessions_but_new_logins_work(sandbox):
    old_session = log_in_new_account(sandbox, name='writer', password='pw')

    set_faults(sandbox, expire_sessions=True)

    assert call(sandbox, 'GET', '/api/me', cookies=old_session)[1]['error']['code'] == 'not_logged_in'
    assert publish(sandbox, old_session)[0] == 401
    assert fetch_page(sandbox, '/write', cookies=old_session)[0] == 303
    new_session = call(sandbox, 'POST', '/api/session', {'name': 'writer', 'password': 'pw'})[1]['cookies']
    assert call(sandbox, 'GET', '/api/me', cookies=new_session) == (200, {'name': 'writer'})
    assert publish(sandbox, new_session)[0] == 200


def test_publish_latency_delays_the_publish_response(sandbox):
    cookies = log_in_new_account(sandbox)
    set_faults(sandbox, publish_latency_ms=300)

    assert elapsed_seconds(lambda: publish(sandbox, cookies)) >= 0.3


def test_page_latency_delays_html_pages(sandbox):
    set_faults(sandbox, page_latency_ms=300)

    assert elapsed_seconds(lambda: fetch_page(sandbox, '/login')) >= 0.3


# ---------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------


def test_write_page_redirects_to_login_without_a_session(sandbox):
    status, headers, _ = fetch_page(sandbox, '/write')

    assert status == 303
    assert headers['Location'] == f'{sandbox}/login?next=/write'


def test_login_form_sets_an_httponly_session_cookie_and_redirects_to_next(sandbox):
    log_in_new_account(sandbox, name='writer', password='pw')

    status, headers, _ = fetch_page(sandbox, '/login', form={'name': 'writer', 'password': 'pw', 'next': '/write'})

    assert status == 303
    assert headers['Location'] == f'{sandbox}/write'
    set_cookie = headers['Set-Cookie']
    assert 'HttpOnly' in set_cookie
    cookies = set_cookie.split(';')[0]
    assert call(sandbox, 'GET', '/api/me', cookies=cookies) == (200, {'name': 'writer'})
    assert 'id="editor"' in fetch_page(sandbox, '/write', cookies=cookies)[2]


def test_login_form_with_a_wrong_password_shows_an_error_and_sets_no_cookie(sandbox):
    log_in_new_account(sandbox, name='writer', password='pw')

    status, headers, page = fetch_page(sandbox, '/login', form={'name': 'writer', 'password': 'nope', 'next': '/write'})

    assert status == 200
    assert '用户名或密码错误' in page
    assert 'Set-Cookie' not in headers


def test_login_never_redirects_to_another_site(sandbox):
    log_in_new_account(sandbox, name='writer', password='pw')

    _, headers, _ = fetch_page(sandbox, '/login', form={'name': 'writer', 'password': 'pw', 'next': '//evil.example/'})

    assert headers['Location'] == f'{sandbox}/write'


def test_unknown_article_is_a_404_page_and_unknown_api_is_a_json_404(sandbox):
    assert fetch_page(sandbox, '/p/999999')[0] == 404
    assert call(sandbox, 'GET', '/api/nothing-here') == (404, {'error': {'code': 'not_found', 'message': '页面不存在'}})


# ---------------------------------------------------------------------------------------------------
# Real browser
# ---------------------------------------------------------------------------------------------------


def open_editor_with_imported_cookie(driver, base, cookies):
    """Import the session the way a user pastes cookies into TOP_N, then open the editor."""
    name, value = cookies.split('=', 1)
    driver.get(f'{base}/login')
    driver.add_cookie({'name': name, 'value': value, 'path': '/'})
    driver.get(f'{base}/write')
    assert driver.current_url == f'{base}/write'


def test_browser_paste_and_confirm_publishes_exactly_one_article(sandbox, browser):
    cookies = log_in_new_account(sandbox, name='writer')
    open_editor_with_imported_cookie(browser, sandbox, cookies)

    browser.find_element(By.ID, 'title').send_keys('沙盒发布测试')
    browser.execute_script(
        PASTE_HTML_INTO_EDITOR,
        '<h2>第一节</h2><p style="color:red">Hello <b>沙盒</b> &amp; world<script>alert(1)</script></p>'
        '<p onclick="steal()">第二段<img src="javascript:alert(1)"></p>',
    )
    assert browser.find_element(By.ID, 'editor').get_attribute('innerHTML') == (
        '<h2>第一节</h2><p>Hello <strong>沙盒</strong> &amp; world</p><p>第二段</p>'
    )
    browser.find_element(By.ID, 'publish-button').click()
    WebDriverWait(browser, BROWSER_WAIT_SECONDS).until(lambda d: d.find_element(By.ID, 'confirm-dialog').is_displayed())
    browser.find_element(By.ID, 'confirm-publish').click()
    WebDriverWait(browser, BROWSER_WAIT_SECONDS).until(lambda d: re.search(r'/p/\d+$', d.current_url))

    [article] = published_articles(sandbox)
    assert (article['title'], article['account']) == ('沙盒发布测试', 'writer')
    assert article['body_sha256'] == sha256_hex('第一节Hello 沙盒 & world第二段')
    assert browser.current_url == article['url']
    assert browser.find_element(By.CSS_SELECTOR, 'h1.article-title').text == '沙盒发布测试'
    assert '<script' not in browser.find_element(By.CSS_SELECTOR, '.article-body').get_attribute('innerHTML')


def test_browser_publishing_an_empty_body_shows_an_error_and_stores_nothing(sandbox, browser):
    cookies = log_in_new_account(sandbox)
    open_editor_with_imported_cookie(browser, sandbox, cookies)

    browser.find_element(By.ID, 'title').send_keys('只有标题')
    browser.find_element(By.ID, 'publish-button').click()

    error = browser.find_element(By.ID, 'error')
    WebDriverWait(browser, BROWSER_WAIT_SECONDS).until(lambda d: error.text == '发布内容不能为空')
    assert not browser.find_element(By.ID, 'confirm-dialog').is_displayed()
    assert browser.current_url == f'{sandbox}/write'
    assert published_articles(sandbox) == []


def test_browser_shows_the_server_refusal_and_stays_on_the_editor(sandbox, browser):
    cookies = log_in_new_account(sandbox)
    set_faults(sandbox, too_frequent=True)
    open_editor_with_imported_cookie(browser, sandbox, cookies)

    browser.find_element(By.ID, 'title').send_keys('太频繁了')
    browser.execute_script(PASTE_HTML_INTO_EDITOR, '<p>正文</p>')
    browser.find_element(By.ID, 'publish-button').click()
    WebDriverWait(browser, BROWSER_WAIT_SECONDS).until(lambda d: d.find_element(By.ID, 'confirm-dialog').is_displayed())
    browser.find_element(By.ID, 'confirm-publish').click()

    error = browser.find_element(By.ID, 'error')
    WebDriverWait(browser, BROWSER_WAIT_SECONDS).until(lambda d: error.text == '操作过于频繁，请稍后再试')
    assert browser.current_url == f'{sandbox}/write'
    assert published_articles(sandbox) == []
