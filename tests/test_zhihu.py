"""The Zhihu publisher keeps its promises, tested with real headless Chromium against a LOCAL STAND-IN
of Zhihu (tests/zhihu_standin.py), never against zhihu.com, which these machines cannot reach.

The stand-in answers on two host names, zhuanlan.zhihu.localhost and www.zhihu.localhost (Chromium
resolves *.localhost to the loopback), so cookies must be set for the shared parent domain and each
call must come from a page of its own origin, as on Zhihu.
"""

import dataclasses
import threading
import time
from datetime import datetime

import pytest
import waitress

import config
from accounts import parse_cookies
from publishers.base import Attempt, LoginExpired, PublishError
from publishers.zhihu import ZhihuPublisher, zhihu_html
from content import render_markdown
from zhihu_standin import ZhihuStandIn

ZHUANLAN_HOST = 'zhuanlan.zhihu.localhost'
WWW_HOST = 'www.zhihu.localhost'

ARTICLE = """# 为什么学 Python

Python 的语法**简单**，适合入门。

- 安装解释器
- 写第一个脚本

```python
def hello(name):
    return f"你好, {name} <3"
```

结尾一段。
"""


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def standin_server():
    """One stand-in of Zhihu on waitress, on a free loopback port, for the whole module."""
    standin = ZhihuStandIn(zhuanlan_host=ZHUANLAN_HOST, www_host=WWW_HOST)
    server = waitress.create_server(standin.make_app(), host='127.0.0.1', port=0, threads=8)
    thread = threading.Thread(target=server.run, name='zhihu-standin', daemon=True)
    thread.start()
    try:
        yield standin, server.effective_port
    finally:
        server.close()
        thread.join(timeout=5)


@pytest.fixture
def standin(standin_server):
    standin, _ = standin_server
    standin.reset()
    yield standin
    standin.reset()


@pytest.fixture
def publisher(standin_server):
    _, port = standin_server
    settings = dataclasses.replace(config.Config(), zhihu_url=f'http://{ZHUANLAN_HOST}:{port}',
                                   zhihu_www_url=f'http://{WWW_HOST}:{port}')
    return ZhihuPublisher.from_config(settings)


@pytest.fixture
def driver(headless_browser):
    return headless_browser


@dataclasses.dataclass
class Run:
    """One attempt as the worker would make it, with what it reported."""
    attempt: Attempt
    progress: list
    refs: list


@pytest.fixture
def make_attempt(driver):
    def make(cookies, title='为什么学 Python 🐍', content=ARTICLE, platform_ref=None, earlier=(),
             on_remember=None, timeout=60):
        progress, refs = [], []

        def remember(ref):
            refs.append(ref)
            if on_remember:
                on_remember(ref)

        task = {'task_id': 1, 'user_id': 1, 'article_title': title, 'article_content': content,
                'platform': 'zhihu', 'attempt': len(earlier) + 1, 'earlier_attempts': list(earlier),
                'platform_ref': platform_ref}
        attempt = Attempt(task, lambda percent: progress.append(percent) or False, timeout,
                          remember_ref=remember, driver=driver, account={'cookies': parse_cookies(cookies)})
        return Run(attempt, progress, refs)
    return make


def lost_earlier_attempt():
    return {'outcome': 'lost', 'started_at': datetime(2024, 1, 1, 12, 0, 0)}


def article_id_of(url):
    return url.rsplit('/', 1)[-1]


# -- publishing ----------------------------------------------------------------------------------

def test_markdown_article_is_published_once_with_a_topic_and_a_verified_url(standin, publisher, make_attempt):
    """Against the local stand-in: a Markdown article with a CJK + emoji title comes out as one
    published article with a topic, at the canonical /p/<digits> URL."""
    cookies = standin.add_account('writer')
    run = make_attempt(cookies)

    url = publisher.publish(run.attempt)

    assert url == f'{publisher.origins["zhuanlan"]}/p/{article_id_of(url)}'
    assert article_id_of(url).isdigit()
    [article] = standin.published(cookies)
    assert article['id'] == article_id_of(url)
    assert article['title'] == '为什么学 Python 🐍'
    assert [topic['name'] for topic in article['topics']] == ['Python']
    assert '<h1>为什么学 Python</h1>' in article['content']
    assert '<li>安装解释器</li><li>写第一个脚本</li>' in article['content']
    assert len(standin.drafts_of(cookies)) == 1


def test_progress_is_reported_in_order_from_login_to_verification(standin, publisher, make_attempt):
    """Against the local stand-in: the publisher reports 30 (logged in), 60 (filled), 85 (submitted)
    and 100 (verified), in that order; 10 (leased) is the worker's, reported before publish()."""
    run = make_attempt(standin.add_account('writer'))

    publisher.publish(run.attempt)

    assert run.progress == [30, 60, 85, 100]
    assert run.attempt.submitted


def test_draft_id_is_remembered_before_anything_is_published(standin, publisher, make_attempt):
    """Against the local stand-in: the draft id is persisted the moment the draft exists, while
    nothing is published yet, so a retry can continue it instead of making another."""
    cookies = standin.add_account('writer')
    published_when_remembered = []
    run = make_attempt(cookies, on_remember=lambda ref: published_when_remembered.append(len(standin.published())))

    url = publisher.publish(run.attempt)

    assert run.refs == [article_id_of(url)]
    assert published_when_remembered == [0]


def test_retry_of_an_already_published_article_returns_its_url_and_publishes_nothing_new(
        standin, publisher, make_attempt):
    """Against the local stand-in: a second attempt holding the id of an article that is already
    published returns its URL without creating or publishing anything."""
    cookies = standin.add_account('writer')
    first_url = publisher.publish(make_attempt(cookies).attempt)
    calls_before = len(standin.calls)
    retry = make_attempt(cookies, platform_ref=article_id_of(first_url))

    assert publisher.publish(retry.attempt) == first_url

    assert len(standin.published(cookies)) == 1
    assert len(standin.drafts_of(cookies)) == 1
    assert not [call for call in standin.calls[calls_before:] if call[0] != 'GET']
    assert retry.refs == []
    assert retry.progress == [30, 100]


def test_retry_after_an_unknown_outcome_waits_for_a_lagging_article_page(standin, publisher, make_attempt):
    """Against the local stand-in: when an earlier attempt was lost after publishing and the article
    page still lags, the retry keeps looking instead of publishing again."""
    cookies = standin.add_account('writer')
    draft_id = standin.make_article(cookies, '为什么学 Python 🐍', '<p>正文</p>', page_lag=2)
    calls_before = len(standin.calls)

    url = publisher.publish(make_attempt(cookies, platform_ref=draft_id, earlier=[lost_earlier_attempt()]).attempt)

    assert article_id_of(url) == draft_id
    assert not [call for call in standin.calls[calls_before:] if call[0] != 'GET']


def test_retry_with_an_unpublished_draft_continues_that_draft(standin, publisher, make_attempt):
    """Against the local stand-in: a second attempt holding the id of an unpublished draft fills and
    publishes that draft; no second draft is made."""
    cookies = standin.add_account('writer')
    draft_id = standin.make_draft(cookies, '旧标题')
    run = make_attempt(cookies, platform_ref=draft_id)

    url = publisher.publish(run.attempt)

    assert article_id_of(url) == draft_id
    assert [draft['id'] for draft in standin.drafts_of(cookies)] == [draft_id]
    [article] = standin.published(cookies)
    assert article['title'] == '为什么学 Python 🐍'
    assert run.refs == []


def test_lost_publish_answer_is_recognised_as_success_after_verification(standin, publisher, make_attempt):
    """Against the local stand-in: Zhihu publishes but its answer is lost (502); the publisher looks
    at the article page, finds it published and reports success: exactly one article."""
    cookies = standin.add_account('writer')
    standin.lose_publish_answers = 1
    standin.page_lag = 1

    url = publisher.publish(make_attempt(cookies).attempt)

    assert [article['id'] for article in standin.published(cookies)] == [article_id_of(url)]
    assert standin.calls.count(('POST', '/api/v4/content/publish')) == 1


def test_verification_waits_until_the_article_page_shows_it_published(standin, publisher, make_attempt):
    """Against the local stand-in: when /p/<id> lags behind the publish answer, success is claimed
    only once the page says published."""
    cookies = standin.add_account('writer')
    standin.page_lag = 2
    run = make_attempt(cookies)

    url = publisher.publish(run.attempt)

    assert run.progress == [30, 60, 85, 100]
    assert [article['id'] for article in standin.published(cookies)] == [article_id_of(url)]


# -- refusals --------------------------------------------------------------------------------------

def test_expired_cookies_raise_login_expired_fast_without_drafts_or_publishing(standin, publisher, make_attempt):
    """Against the local stand-in: cookies Zhihu no longer accepts stop the attempt at the login
    check, within seconds, before any draft or publish request."""
    cookies = standin.add_account('writer')
    standin.expire(cookies)
    run = make_attempt(cookies)

    started = time.monotonic()
    with pytest.raises(LoginExpired) as refused:
        publisher.publish(run.attempt)

    assert time.monotonic() - started < 10
    assert not refused.value.retryable
    assert '登录已失效' in str(refused.value)
    assert standin.calls == [('GET', '/api/v4/me')]
    assert run.progress == [] and run.refs == []


def test_article_without_a_matching_topic_fails_without_retry_and_is_not_published(
        standin, publisher, make_attempt):
    """Against the local stand-in: when Zhihu suggests no topic, the attempt fails for good with a
    message saying so, instead of publishing something Zhihu would refuse."""
    cookies = standin.add_account('writer')
    run = make_attempt(cookies, title='今天的晚饭吃什么')

    with pytest.raises(PublishError) as refused:
        publisher.publish(run.attempt)

    assert not refused.value.retryable
    assert '话题' in str(refused.value)
    assert standin.published(cookies) == []
    assert ('POST', '/api/v4/content/publish') not in standin.calls
    assert not run.attempt.submitted


def test_throttled_account_fails_retryably_with_a_throttling_message(standin, publisher, make_attempt):
    """Against the local stand-in: a 429 "操作过于频繁" answer is a retryable failure that says the
    account is being throttled; nothing is published."""
    cookies = standin.add_account('writer')
    standin.throttled = True

    with pytest.raises(PublishError) as refused:
        publisher.publish(make_attempt(cookies).attempt)

    assert refused.value.retryable
    assert '限流' in str(refused.value) and 'throttling' in str(refused.value)
    assert standin.published(cookies) == []


def test_title_over_100_characters_is_refused_not_cut(standin, publisher, make_attempt):
    """Against the local stand-in: a 101-character title is refused for good, before any request."""
    cookies = standin.add_account('writer')

    with pytest.raises(PublishError) as refused:
        publisher.publish(make_attempt(cookies, title='题' * 101).attempt)

    assert not refused.value.retryable
    assert '101' in str(refused.value) and '100' in str(refused.value)
    assert standin.calls == []


# -- login check -----------------------------------------------------------------------------------

def test_check_login_says_true_for_a_live_session_and_false_for_expired_or_incomplete_cookies(
        standin, publisher, driver):
    """Against the local stand-in: check_login answers from Zhihu's /api/v4/me and publishes nothing."""
    live = standin.add_account('writer')
    expired = standin.add_account('sleeper')
    standin.expire(expired)
    incomplete = '; '.join(part for part in live.split('; ') if not part.startswith('__zse_ck='))

    ok, detail = publisher.check_login(driver, {'cookies': parse_cookies(live)})
    assert ok and 'writer' in detail
    assert publisher.check_login(driver, {'cookies': parse_cookies(expired)})[0] is False
    ok, detail = publisher.check_login(driver, {'cookies': parse_cookies(incomplete)})
    assert not ok and '__zse_ck' in detail
    assert {method for method, _ in standin.calls} == {'GET'}


# -- formatting ----------------------------------------------------------------------------------

def test_code_blocks_reach_zhihu_as_pre_lang(standin, publisher, make_attempt):
    """Against the local stand-in: fenced code with a language is stored as <pre lang="python"><code>,
    with no empty paragraphs or newlines between blocks."""
    cookies = standin.add_account('writer')

    publisher.publish(make_attempt(cookies).attempt)

    [article] = standin.published(cookies)
    assert '<pre lang="python"><code>def hello(name):\n    return f&quot;你好, {name} &lt;3&quot;\n</code></pre>' \
        in article['content']
    assert 'class="language-' not in article['content']
    assert '<p></p>' not in article['content'] and '>\n<' not in article['content']


def test_zhihu_html_puts_images_in_figures_and_tables_in_zhihu_table_blocks():
    """Pure conversion (no browser, no stand-in needed): images, tables and blank lines as Zhihu's
    editor stores them."""
    converted = zhihu_html(render_markdown('![图](https://pic.example/a.png)\n\n'
                                           '| a | b |\n|---|---|\n| 1 | 2 |\n\n<p> </p>\n\n行一\n行二'))

    assert converted.startswith('<figure><img alt="图" src="https://pic.example/a.png"></figure>')
    assert ('<table data-draft-node="block" data-draft-type="table" data-size="normal" data-row-style="normal">'
            '<tbody><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></tbody></table>') in converted
    assert '<p></p>' not in converted and '<p> </p>' not in converted
    assert converted.endswith('<p>行一 行二</p>')
