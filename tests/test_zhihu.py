"""The Zhihu publisher keeps its promises, tested with real headless Chromium against a LOCAL STAND-IN
of Zhihu (tests/zhihu_standin.py, served by conftest's `standin` fixture), never against zhihu.com,
which these machines cannot reach. tests/test_zhihu_service.py runs the same flows through the
whole service.
"""

import dataclasses
import json
import time
from datetime import datetime

import pytest

import config
import publishers.zhihu as zhihu
from accounts import parse_cookies
from content import render_markdown
from publishers.base import Attempt, BadAccount, LoginExpired, PublishError
from publishers.zhihu import ArticleNotPublic, ZhihuPublisher, ZhihuRefused, reader_verdict, topic_queries, zhihu_html

PAUSE = 7.0

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

@pytest.fixture
def publisher(standin):
    settings = dataclasses.replace(config.Config(), zhihu_url=standin.urls['zhuanlan'],
                                   zhihu_www_url=standin.urls['www'], zhihu_api_url=standin.urls['api'],
                                   zhihu_upload_url=standin.urls['upload'],
                                   zhihu_pictures_url=standin.urls['pictures'], zhihu_pause=PAUSE)
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
    saved_logins: list


@pytest.fixture
def make_attempt(driver):
    def make(cookies, title='为什么学 Python 🐍', content=ARTICLE, platform_ref=None, earlier=(),
             on_remember=None, timeout=60, topics=None, column=None, pictures=None, picture_memory=None):
        progress, refs, saved_logins = [], [], []

        def remember(ref):
            refs.append(ref)
            if on_remember:
                on_remember(ref)

        task = {'task_id': 1, 'user_id': 1, 'article_title': title, 'article_content': content,
                'platform': 'zhihu', 'attempt': len(earlier) + 1, 'earlier_attempts': list(earlier),
                'platform_ref': platform_ref, 'topics': topics}
        account = {'cookies': parse_cookies(cookies), **({'column': column} if column else {})}
        attempt = Attempt(task, lambda percent: progress.append(percent) or False, timeout,
                          remember_ref=remember, driver=driver, account=account, save_account=saved_logins.append,
                          local_pictures=lambda: pictures or {}, picture_memory=picture_memory)
        return Run(attempt, progress, refs, saved_logins)
    return make


def lost_earlier_attempt():
    return {'outcome': 'lost', 'started_at': datetime(2024, 1, 1, 12, 0, 0)}


def article_id_of(url):
    return url.rsplit('/', 1)[-1]


# -- publishing ----------------------------------------------------------------------------------

def test_chinese_title_without_a_matching_topic_is_published_without_one_and_says_so(
        standin, publisher, make_attempt):
    """Against the local stand-in: when Zhihu suggests no topic for the title or any of its words,
    the article is published with none (as Zhihu's editor allows) and the task's note says so."""
    cookies = standin.add_account('writer')
    run = make_attempt(cookies, title='今天的晚饭吃什么')

    url = publisher.publish(run.attempt)

    [article] = standin.published(cookies)
    assert article['topics'] == [] and url.endswith(f'/p/{article["id"]}')
    assert any('without a topic' in note for note in run.attempt.notes)
    searched = [path for method, path in standin.calls if path == '/api/autocomplete/topics']
    assert len(searched) == len(topic_queries('今天的晚饭吃什么')) > 1


def test_named_topics_are_attached_and_a_name_zhihu_lacks_is_noted(standin, publisher, make_attempt):
    """Against the local stand-in: the topics the user named are attached by Zhihu's exact names, in
    place of any automatic choice; a name Zhihu has no topic for is said in the note."""
    cookies = standin.add_account('writer')
    run = make_attempt(cookies, title='今天的晚饭吃什么', topics=['机器学习', 'python', '不存在的话题'])

    publisher.publish(run.attempt)

    [article] = standin.published(cookies)
    assert [topic['name'] for topic in article['topics']] == ['机器学习', 'Python']
    assert any('不存在的话题' in note for note in run.attempt.notes)


def test_publish_answer_without_a_url_ends_with_the_article_url_built_from_the_draft_id(
        standin, publisher, make_attempt):
    """Against the local stand-in: since 2025-09 Zhihu's publish answer may carry no URL; the URL is
    /p/<draft id> on the configured origin, verified there."""
    cookies = standin.add_account('writer')
    standin.answer_without_url = True
    run = make_attempt(cookies)

    url = publisher.publish(run.attempt)

    [article] = standin.published(cookies)
    assert url == f'{standin.urls["zhuanlan"]}/p/{article["id"]}' == f'{standin.urls["zhuanlan"]}/p/{run.refs[0]}'

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


def test_throttled_account_fails_retryably_after_a_pause_with_a_throttling_message(
        standin, publisher, make_attempt):
    """Against the local stand-in: a 429 "操作过于频繁" answer is a retryable failure that waits out
    the pause and says the account is being throttled; nothing is published."""
    cookies = standin.add_account('writer')
    standin.refuse(10, 429, 10005, '操作过于频繁，请稍后再试')

    with pytest.raises(ZhihuRefused) as refused:
        publisher.publish(make_attempt(cookies).attempt)

    assert refused.value.kind == 'throttled'
    assert refused.value.retryable and refused.value.retry_after == PAUSE
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


# -- refusals, each with its own rule ----------------------------------------------------------------

def test_signature_refusal_10003_pauses_keeps_the_answer_and_is_not_an_expired_login(
        standin, publisher, make_attempt):
    """Against the local stand-in: a 403 with code 10003 "请求参数异常" (Zhihu wanting a signature) is
    retried after the pause, is not called an expired login, and keeps Zhihu's answer as evidence."""
    cookies = standin.add_account('writer')
    standin.refuse(1, 403, 10003, '请求参数异常，请升级客户端后重试')

    with pytest.raises(ZhihuRefused) as refused:
        publisher.publish(make_attempt(cookies).attempt)

    assert refused.value.kind == 'signature' and not isinstance(refused.value, LoginExpired)
    assert refused.value.retryable and refused.value.retry_after == PAUSE
    assert '登录已失效' not in str(refused.value)
    assert json.loads(refused.value.answer)['error']['code'] == 10003


def test_risk_control_403_and_a_401_while_still_logged_in_are_risk_control_not_expired_logins(
        standin, publisher, make_attempt):
    """Against the local stand-in: a bare 403, and a 401 on a write while /api/v4/me still says the
    session is logged in, are risk control: retried after the pause, never a login error."""
    cookies = standin.add_account('writer')
    kinds = []
    for status in (403, 401):
        standin.refuse(1, status, 40362, '您当前请求存在异常，暂时限制本次访问')
        with pytest.raises(ZhihuRefused) as refused:
            publisher.publish(make_attempt(cookies).attempt)
        kinds.append((refused.value.kind, refused.value.retry_after, isinstance(refused.value, LoginExpired)))

    assert kinds == [('risk_control', PAUSE, False)] * 2


def test_http_200_with_a_nonzero_code_is_a_refusal_that_says_zhihus_code_and_is_not_retried(
        standin, publisher, make_attempt):
    """Against the local stand-in: Zhihu refuses with HTTP 200 and a non-zero `code`; the attempt
    fails for good with Zhihu's code and words, and its JSON answer is kept."""
    cookies = standin.add_account('writer')
    standin.refuse(1, 200, 4031, '内容含有不适宜发布的信息')

    with pytest.raises(ZhihuRefused) as refused:
        publisher.publish(make_attempt(cookies).attempt)

    assert refused.value.kind == 'refused' and not refused.value.retryable
    assert '4031' in str(refused.value) and '内容含有不适宜发布的信息' in str(refused.value)
    assert json.loads(refused.value.answer) == {'code': 4031, 'message': '内容含有不适宜发布的信息'}
    assert standin.published(cookies) == []


# -- fresh cookies --------------------------------------------------------------------------------

def test_stale_zse_ck_is_renewed_by_zhihus_page_script_remembered_and_the_article_published(
        standin, publisher, make_attempt):
    """Against the local stand-in: after __zse_ck expired, the real page's script renews it before any
    API call; the fresh cookies are handed back to be stored, and the article is published."""
    cookies = standin.add_account('writer')
    standin.expire_zse_ck()
    run = make_attempt(cookies)

    publisher.publish(run.attempt)

    [saved] = run.saved_logins
    fresh = dict(saved['cookies'])
    assert fresh['__zse_ck'] != dict(parse_cookies(cookies))['__zse_ck']
    assert standin.zse_ck_works(fresh['__zse_ck'])
    assert fresh['z_c0'] == dict(parse_cookies(cookies))['z_c0']
    assert len(standin.published(cookies)) == 1


def test_a_challenge_page_that_never_clears_is_a_challenge_refusal_before_any_api_call(
        standin, publisher, make_attempt, monkeypatch):
    """Against the local stand-in: when the page's script never gets past its challenge, the attempt
    stops with the challenge rule (retry after the pause), not as an expired login."""
    monkeypatch.setattr(zhihu, 'REFRESH_SECONDS', 3.0)
    cookies = standin.add_account('writer')
    standin.expire_zse_ck()
    standin.challenge_passes = False

    with pytest.raises(ZhihuRefused) as refused:
        publisher.publish(make_attempt(cookies).attempt)

    assert refused.value.kind == 'challenge' and refused.value.retry_after == PAUSE
    assert standin.calls == []


def test_check_login_tells_a_refreshed_login_from_an_expired_one(standin, publisher, driver):
    """Against the local stand-in: the login check renews a stale __zse_ck through the page and says
    so, putting the fresh cookies into the account; an expired z_c0 is said to be expired."""
    live, gone = standin.add_account('writer'), standin.add_account('sleeper')
    standin.expire(gone)
    standin.expire_zse_ck()
    account = {'cookies': parse_cookies(live)}

    ok, detail = publisher.check_login(driver, account)

    assert ok and 'refreshed' in detail
    assert standin.zse_ck_works(dict(account['cookies'])['__zse_ck'])
    ok, detail = publisher.check_login(driver, {'cookies': parse_cookies(gone)})
    assert not ok and '登录已失效' in detail


# -- verification as a reader ---------------------------------------------------------------------

def test_article_only_its_author_sees_is_not_counted_as_published(standin, publisher, make_attempt):
    """Against the local stand-in: the author's own session sees the article, a reader without
    cookies sees isVisible false; the attempt fails for good instead of claiming success."""
    cookies = standin.add_account('writer')
    standin.new_article_visibility = 'author_only'

    with pytest.raises(ArticleNotPublic) as hidden:
        publisher.publish(make_attempt(cookies).attempt)

    assert not hidden.value.under_review and not hidden.value.retryable
    assert 'isVisible=False' in str(hidden.value)


def test_soft_404_page_is_not_counted_as_published(standin, publisher, make_attempt, monkeypatch):
    """Against the local stand-in: /p/<id> answers HTTP 200 titled 「你似乎来到了没有知识存在的荒原」;
    that is a page not found, so the attempt fails (to look again later), not succeeds."""
    publisher.verify_wait = 3.0
    cookies = standin.add_account('writer')
    standin.new_article_visibility = 'soft_404'

    with pytest.raises(PublishError) as missing:
        publisher.publish(make_attempt(cookies).attempt)

    assert missing.value.retryable and not isinstance(missing.value, ArticleNotPublic)
    assert '你似乎来到了没有知识存在的荒原' in str(missing.value)


def test_article_under_review_is_reported_in_zhihus_words_and_looked_at_again_after_the_pause(
        standin, publisher, make_attempt):
    """Against the local stand-in: an article Zhihu holds for review is neither published nor failed:
    the attempt says so in Zhihu's words and is retried after the pause; the retry only looks."""
    cookies = standin.add_account('writer')
    standin.new_article_visibility = 'review'
    run = make_attempt(cookies)

    with pytest.raises(ArticleNotPublic) as review:
        publisher.publish(run.attempt)

    assert review.value.under_review and review.value.retryable and review.value.retry_after == PAUSE
    assert '该文章正在审核中' in str(review.value)
    calls_before = len(standin.calls)
    with pytest.raises(ArticleNotPublic):
        publisher.publish(make_attempt(cookies, platform_ref=run.refs[0], earlier=[lost_earlier_attempt()]).attempt)
    assert not [call for call in standin.calls[calls_before:] if call[0] != 'GET']
    assert len(standin.drafts_of(cookies)) == 1


def test_reader_verdict_requires_every_public_field_the_author_and_the_url():
    """Pure decision (no browser): each field a reader's page must show, one at a time."""
    url = 'https://zhuanlan.zhihu.com/p/7'
    article = {'id': '7', 'type': 'article', 'articleType': 'normal', 'state': 'published', 'status': 0,
               'isVisible': True, 'isNormal': True, 'url': 'http://zhuanlan.zhihu.com/p/7', 'author': {'id': 'me'}}

    def verdict(**changes):
        data = {'initialState': {'entities': {'articles': {'7': {**article, **changes}}}}}
        return reader_verdict({'status': 200, 'title': 't', 'initialData': json.dumps(data), 'text': ''},
                              '7', 'me', url).kind

    assert verdict() == 'published'
    for field, value in (('state', 'draft'), ('status', 1), ('isVisible', False), ('isNormal', False),
                         ('articleType', 'paid'), ('url', 'https://zhuanlan.zhihu.com/p/8'), ('author', {'id': 'x'})):
        assert verdict(**{field: value}) == 'hidden', field
    assert verdict(isVisible=False, reviewInfo={'tips': '审核中'}) == 'under_review'
    soft_404 = {'status': 200, 'title': '你似乎来到了没有知识存在的荒原 - 知乎', 'initialData': None, 'text': ''}
    assert reader_verdict(soft_404, '7', 'me', url).kind == 'missing'


# -- topics and columns ---------------------------------------------------------------------------

def test_topic_queries_split_a_chinese_title_into_words():
    """Pure (no browser): a Chinese title has no spaces; jieba splits it, function words are dropped."""
    queries = topic_queries('用Python写爬虫的十个技巧')

    assert queries[0] == '用Python写爬虫的十个技巧'
    assert {'Python', '爬虫', '技巧'} <= set(queries)
    assert '的' not in queries and '为什么' not in topic_queries('为什么学 Python')


def test_published_article_is_filed_into_the_accounts_column(standin, publisher, make_attempt):
    """Against the local stand-in: an account with a column gets each published article added to it."""
    cookies = standin.add_account('writer')
    standin.add_column(cookies, 'c_1234567890')
    run = make_attempt(cookies, column='c_1234567890')

    url = publisher.publish(run.attempt)

    assert standin.column_items('c_1234567890') == [article_id_of(url)]
    assert any('c_1234567890' in note for note in run.attempt.notes)


def test_column_that_refuses_the_article_leaves_it_published_and_says_so(standin, publisher, make_attempt):
    """Against the local stand-in: a column of someone else refuses the article; the article stays
    published (a retry would not help) and the note says the column did not take it."""
    cookies, other = standin.add_account('writer'), standin.add_account('other')
    standin.add_column(other, 'c_99')
    run = make_attempt(cookies, column='c_99')

    publisher.publish(run.attempt)

    assert len(standin.published(cookies)) == 1 and standin.column_items('c_99') == []
    assert any('c_99' in note and '没能收入专栏' in note for note in run.attempt.notes)


def test_column_is_stored_as_its_id_from_an_id_or_a_url_and_nonsense_is_refused():
    """Pure (no browser): `account set --column` takes the id or the column's URL."""
    publisher = ZhihuPublisher()
    for given in ('c_1234567890', 'https://www.zhihu.com/column/c_1234567890', 'zhuanlan.zhihu.com/c_1234567890/'):
        assert publisher.check_account({'cookies': [], 'column': given})['column'] == 'c_1234567890'
    with pytest.raises(BadAccount):
        publisher.check_account({'cookies': [], 'column': '我的专栏'})


# -- pictures ------------------------------------------------------------------------------------

PICTURE_ARTICLE = '开头 ![一](a.png)\n\n中间 ![二](images/b.png)\n\n再一次 ![一again](a.png)\n'


def stored_pictures():
    from images import picture_from_bytes
    from test_pictures import LOCAL_A, LOCAL_B
    return {name: picture_from_bytes(name, data, 1 << 20) for name, data in
            (('a.png', LOCAL_A), ('images/b.png', LOCAL_B))}


class RememberedPictures:
    """The worker's per-account memory of re-hosted pictures, kept in a dict for one test."""

    def __init__(self):
        self.urls = {}

    def get(self, picture, place):
        return self.urls.get((picture.sha256, place))

    def put(self, picture, place, url):
        self.urls[(picture.sha256, place)] = url


def image_sources(content):
    import re
    return re.findall(r'<img [^>]*src="([^"]*)"', content)


def test_pictures_go_up_by_their_bytes_and_the_article_shows_only_zhihus_copies(standin, publisher, make_attempt):
    cookies = standin.add_account('writer')
    pictures = stored_pictures()
    run = make_attempt(cookies, title='带图的文章', content=PICTURE_ARTICLE, pictures=pictures,
                       picture_memory=RememberedPictures())

    publisher.publish(run.attempt)

    [article] = standin.published(cookies)
    sources = image_sources(article['content'])
    assert len(sources) == 3 and all(src.startswith(standin.urls['pictures'] + '/v2-') for src in sources)
    assert [standin.hosted_picture(src) for src in sources] == [
        ('image/png', pictures['a.png'].data), ('image/png', pictures['images/b.png'].data),
        ('image/png', pictures['a.png'].data)]
    assert len(standin.picture_uploads) == 2, 'a picture used twice goes up once'
    assert 'a.png' not in article['content']
    assert [p for p in run.progress if 30 < p <= 50] == [40, 50], 'each upload is a progress step'


def test_a_failed_upload_names_its_picture_and_the_retry_uploads_none_twice(standin, publisher, make_attempt):
    cookies = standin.add_account('writer')
    memory = RememberedPictures()
    standin.fail_picture_upload = 2   # a.png goes up, the upload of images/b.png fails
    first = make_attempt(cookies, title='带图的文章', content=PICTURE_ARTICLE, pictures=stored_pictures(),
                         picture_memory=memory)

    with pytest.raises(PublishError) as failed:
        publisher.publish(first.attempt)
    second = make_attempt(cookies, title='带图的文章', content=PICTURE_ARTICLE, pictures=stored_pictures(),
                          picture_memory=memory, earlier=[{'outcome': 'failed'}])
    publisher.publish(second.attempt)

    assert 'images/b.png' in str(failed.value) and failed.value.retryable
    assert standin.published(cookies)[0]['title'] == '带图的文章' and len(standin.published(cookies)) == 1
    assert len(standin.picture_uploads) == len(set(standin.picture_uploads)) == 2, 'none went up twice'


def test_bytes_zhihu_already_has_are_not_sent_again(standin, publisher, make_attempt):
    first, second = standin.add_account('first'), standin.add_account('second')
    for cookies in (first, second):
        publisher.publish(make_attempt(cookies, title='同一张图', content='![一](a.png)\n\n正文',
                                       pictures=stored_pictures(), picture_memory=RememberedPictures()).attempt)

    assert len(standin.picture_uploads) == 1, 'Zhihu knew the md5 the second time'
    assert image_sources(standin.published(first)[0]['content']) == image_sources(standin.published(second)[0]['content'])


def test_an_upload_with_a_wrong_signature_is_refused_by_the_image_host(standin, publisher, make_attempt, monkeypatch):
    cookies = standin.add_account('writer')
    monkeypatch.setattr(zhihu, 'IMAGE_BUCKET', 'another-bucket')

    with pytest.raises(PublishError) as failed:
        publisher.publish(make_attempt(cookies, title='带图的文章', content='![一](a.png)\n\n正文',
                                       pictures=stored_pictures(), picture_memory=RememberedPictures()).attempt)

    assert 'a.png' in str(failed.value) and 'HTTP 403' in str(failed.value)
    assert standin.published(cookies) == [] and standin.picture_uploads == []
