"""The WordPress publisher keeps its promises, tested with real headless Chromium against a real
WordPress from Debian's package (tests/wordpress_site.py), each test as its own user on the site."""

import dataclasses
import http.server
import itertools
import re
import threading
import urllib.request
from datetime import datetime, timezone

import pytest

from conftest import free_port, wait_until
from publishers.base import Attempt, AttemptSuperseded, BadAccount, LoginExpired, PublishError
from publishers.wordpress import WordPressPublisher

TITLE = '为什么学 Python 🐍'
ARTICLE = """## 第一步：安装

Python 的语法**简单**，也很*优雅*；用 `pip install` 装包 😀。

- 安装解释器
- 写第一个脚本

1. 读文档
2. 动手

```python
def hello(name):
    return f"你好, {name} <3"
```

参考 [官方文档](https://docs.python.org/3/)。

![WordPress 标志](SITE/wp-includes/images/w-logo-blue.png)

| 版本 | 发布 |
| --- | --- |
| 3.12 | 2023 |
"""

names = itertools.count(1)


@dataclasses.dataclass
class Run:
    """One attempt as the worker would make it, with what it reported."""
    attempt: Attempt
    progress: list
    refs: list
    saved: list


@pytest.fixture
def publisher():
    return WordPressPublisher.from_config(None)


@pytest.fixture
def author(wordpress_site):
    """A fresh Author on the site: (user name, password)."""
    username = f'writer{next(names)}'
    wordpress_site.add_user(username, 'pw-' + username)
    return username, 'pw-' + username


@pytest.fixture
def make_attempt(headless_browser, wordpress_site):
    def make(username, password, title=TITLE, content=None, cookies=None, platform_ref=None, earlier=(),
             stop_at=None, site=None):
        progress, refs, saved = [], [], []

        def report(percent):
            progress.append(percent)
            return None if percent == stop_at else False

        wipe_browser(headless_browser)
        task = {'task_id': 1, 'user_id': 1, 'article_title': title,
                'article_content': content or ARTICLE.replace('SITE', wordpress_site.url), 'platform': 'wordpress',
                'attempt': len(earlier) + 1, 'earlier_attempts': list(earlier), 'started_at': utc_now(),
                'platform_ref': platform_ref}
        account = {'site': site or wordpress_site.url, 'username': username, 'password': password}
        if cookies is not None:
            account['cookies'] = cookies
        attempt = Attempt(task, report, 60, remember_ref=refs.append, driver=headless_browser, account=account,
                          save_account=saved.append)
        return Run(attempt, progress, refs, saved)
    return make


def wipe_browser(driver):
    """What a leased browser looks like: no cookies, no page."""
    driver.execute_cdp_cmd('Network.clearBrowserCookies', {})
    driver.get('about:blank')


def utc_now():
    return datetime.now(timezone.utc).replace(tzinfo=None)


def earlier_attempt(run, outcome='lost'):
    return {'outcome': outcome, 'started_at': run.attempt.started_at}


def page(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


# -- publishing ----------------------------------------------------------------------------------

def test_markdown_article_is_published_under_its_author_with_formatting_cjk_and_emoji(
        wordpress_site, publisher, author, make_attempt):
    run = make_attempt(*author)

    url = publisher.publish(run.attempt)

    [post] = wordpress_site.posts(author=author[0])
    assert (post['status'], post['title'], post['link']) == ('publish', TITLE, url)
    assert run.refs == [str(post['id'])]
    assert run.progress == [30, 55, 60, 85, 100], 'the picture by URL is uploaded in a step of its own'
    status, html = page(url)
    assert status == 200
    body = html[html.index('wp-block-post-content'):]
    for rendered in ('<h2>第一步：安装</h2>', '<strong>简单</strong>', '<em>优雅</em>', '<code>pip install</code>',
                     '<li>安装解释器</li>', '<ol>', '<pre><code class="language-python">def hello(name):',
                     'return f&quot;你好, {name} &lt;3&quot;', '<a href="https://docs.python.org/3/">官方文档</a>',
                     '<th>版本</th>', '<td>3.12</td>', '😀'):
        assert rendered in body
    [image] = re.findall(r'<img [^>]*>', body)
    assert f'src="{wordpress_site.url}/wp-content/uploads/' in image, 're-hosted in the media library'
    assert 'alt="WordPress 标志"' in image
    assert TITLE in html
    assert '<br' not in body[:body.index('</table>')]


def test_fresh_login_remembers_the_session_cookies_and_the_next_task_reuses_them(
        wordpress_site, publisher, author, make_attempt):
    first = make_attempt(*author)
    publisher.publish(first.attempt)
    [remembered] = first.saved
    names_saved = [name for name, _ in remembered['cookies']]
    assert any(name.startswith('wordpress_logged_in_') for name in names_saved)
    assert wordpress_site.session_count(author[0]) == 1

    second = make_attempt(*author, title='第二篇', cookies=remembered['cookies'])
    publisher.publish(second.attempt)

    assert second.saved == []
    assert wordpress_site.session_count(author[0]) == 1
    assert [post['status'] for post in wordpress_site.posts(author=author[0])] == ['publish', 'publish']


def test_session_ended_by_wordpress_leads_to_a_fresh_login_and_new_cookies_remembered(
        wordpress_site, publisher, author, make_attempt):
    first = make_attempt(*author)
    publisher.publish(first.attempt)
    old_cookies = first.saved[0]['cookies']
    wordpress_site.end_sessions(author[0])

    second = make_attempt(*author, title='会话结束之后', cookies=old_cookies)
    url = publisher.publish(second.attempt)

    [remembered] = second.saved
    assert remembered['cookies'] != old_cookies
    assert wordpress_site.session_count(author[0]) == 1
    assert wordpress_site.posts(author=author[0])[-1]['link'] == url


def test_wrong_password_is_a_login_expired_error_that_says_so(wordpress_site, publisher, author, make_attempt):
    run = make_attempt(author[0], 'not-the-password')

    with pytest.raises(LoginExpired) as raised:
        publisher.publish(run.attempt)

    assert '用户名或密码错误' in str(raised.value) and 'user name or password is wrong' in str(raised.value)
    assert not raised.value.retryable
    assert wordpress_site.posts(author=author[0]) == []


def test_contributor_gets_a_non_retryable_error_naming_the_roles_that_can_publish(
        wordpress_site, publisher, make_attempt):
    contributor = f'contributor{next(names)}'
    wordpress_site.add_user(contributor, 'pw-contributor', role='contributor')
    run = make_attempt(contributor, 'pw-contributor')

    with pytest.raises(PublishError) as raised:
        publisher.publish(run.attempt)

    assert not raised.value.retryable
    assert 'contributor' in str(raised.value) and 'Author/Editor/Administrator' in str(raised.value)
    assert wordpress_site.posts(author=contributor) == []


def test_site_that_does_not_answer_is_a_retryable_error_naming_it(publisher, author, make_attempt):
    site = f'http://127.0.0.1:{free_port()}'
    run = make_attempt(*author, site=site)

    with pytest.raises(PublishError) as raised:
        publisher.publish(run.attempt)

    assert raised.value.retryable
    assert site in str(raised.value)


def test_post_the_site_refuses_is_an_error_quoting_the_site(wordpress_site, publisher, author, make_attempt):
    wordpress_site.set_fault('refuse_publish', '本站不接受这篇文章')
    try:
        with pytest.raises(PublishError) as raised:
            publisher.publish(make_attempt(*author).attempt)
    finally:
        wordpress_site.clear_faults()

    assert '本站不接受这篇文章' in str(raised.value)
    assert not raised.value.retryable and raised.value.refused
    assert [post['status'] for post in wordpress_site.posts(author=author[0])] == ['draft']


# -- exactly once ---------------------------------------------------------------------------------

@pytest.mark.parametrize('keeps_ref', [True, False], ids=['retry-holds-the-ref', 'retry-without-a-ref'])
def test_lost_publish_answer_then_a_second_attempt_still_makes_exactly_one_post(
        wordpress_site, publisher, author, make_attempt, keeps_ref):
    wordpress_site.set_fault('lose_publish_answer', True)
    try:
        first = make_attempt(*author)
        first_url = publisher.publish(first.attempt)
    finally:
        wordpress_site.clear_faults()
    retry = make_attempt(*author, platform_ref=first.refs[0] if keeps_ref else None,
                         earlier=[earlier_attempt(first, 'unknown')], cookies=first.saved[0]['cookies'])

    assert publisher.publish(retry.attempt) == first_url

    [post] = wordpress_site.posts(author=author[0])
    assert (post['status'], post['link']) == ('publish', first_url)
    assert retry.progress == [30, 100]


@pytest.mark.parametrize('keeps_ref', [True, False], ids=['retry-holds-the-ref', 'retry-without-a-ref'])
def test_leftover_draft_of_an_earlier_attempt_is_published_not_duplicated(
        wordpress_site, publisher, author, make_attempt, keeps_ref):
    first = make_attempt(*author, stop_at=60)
    with pytest.raises(AttemptSuperseded):
        publisher.publish(first.attempt)
    [draft] = wordpress_site.posts(author=author[0])
    assert draft['status'] == 'draft'
    retry = make_attempt(*author, platform_ref=first.refs[0] if keeps_ref else None,
                         earlier=[earlier_attempt(first)])

    url = publisher.publish(retry.attempt)

    [post] = wordpress_site.posts(author=author[0])
    assert (post['id'], post['status'], post['link']) == (draft['id'], 'publish', url)
    assert retry.refs == ([] if keeps_ref else [str(draft['id'])])


def test_earlier_post_with_the_same_title_but_another_body_is_not_taken_for_ours(
        wordpress_site, publisher, author, make_attempt):
    other_id = wordpress_site.add_post(author[0], TITLE, '<p>另一篇文章</p>', status='publish')
    first = make_attempt(*author, stop_at=30)
    with pytest.raises(AttemptSuperseded):
        publisher.publish(first.attempt)
    retry = make_attempt(*author, earlier=[earlier_attempt(first)])

    url = publisher.publish(retry.attempt)

    other, ours = wordpress_site.posts(author=author[0])
    assert other['id'] == other_id
    assert (ours['status'], ours['link']) == ('publish', url)


def test_slow_publish_answer_comes_after_the_post_is_already_published(
        wordpress_site, publisher, author, make_attempt):
    """The slow_publish fault, which the worker tests use to kill a browser mid-publish, holds
    the answer to the publisher's own publishing request, after WordPress saved the post."""
    run = make_attempt(*author)
    outcome = {}
    wordpress_site.set_fault('slow_publish', 4)
    try:
        thread = threading.Thread(target=lambda: outcome.update(url=publisher.publish(run.attempt)))
        thread.start()
        wait_until(lambda: [post['status'] for post in wordpress_site.posts(author=author[0])] == ['publish'],
                   timeout=20, message='the post to be published')
        assert thread.is_alive() and 85 not in run.progress
        thread.join(30)
    finally:
        wordpress_site.clear_faults()

    assert outcome['url'] == wordpress_site.posts(author=author[0])[0]['link']


# -- the account and the login check --------------------------------------------------------------

def test_check_account_normalizes_a_real_site_and_keeps_the_login(wordpress_site, publisher):
    fields = publisher.check_account({'site': f' {wordpress_site.url}/wp-admin/ ', 'username': ' writer ',
                                      'password': ' p w '})

    assert fields == {'site': wordpress_site.url, 'username': 'writer', 'password': ' p w '}


@pytest.mark.parametrize('site, says', [
    ('ftp://example.test', 'http(s) URL'),
    ('not a url', 'http(s) URL'),
    ('{nothing}', 'nothing answers'),
    ('{other}', 'does not look like WordPress'),
])
def test_check_account_refuses_what_is_not_a_wordpress_site(publisher, other_site, site, says):
    site = site.format(nothing=f'http://127.0.0.1:{free_port()}', other=other_site)

    with pytest.raises(BadAccount) as raised:
        publisher.check_account({'site': site, 'username': 'writer', 'password': 'secret'})

    assert says in str(raised.value)


def test_check_account_requires_a_user_name_and_a_password(wordpress_site, publisher):
    for username, password in (('', 'secret'), ('writer', '')):
        with pytest.raises(BadAccount):
            publisher.check_account({'site': wordpress_site.url, 'username': username, 'password': password})


def test_check_login_answers_who_is_logged_in_or_why_not(wordpress_site, publisher, author, headless_browser):
    account = {'site': wordpress_site.url, 'username': author[0], 'password': author[1]}

    assert publisher.check_login(headless_browser, account) == (
        True, f'logged in as {author[0]} at {wordpress_site.url}')
    wipe_browser(headless_browser)
    ok, why = publisher.check_login(headless_browser, {**account, 'password': 'wrong'})
    assert not ok and 'user name or password is wrong' in why


@pytest.fixture(scope='module')
def other_site():
    """A web server that answers 200 to everything, and is not WordPress."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Type', 'text/html')
            self.end_headers()
            self.wfile.write(b'<html><body>Just a page.</body></html>')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    thread.join(5)
