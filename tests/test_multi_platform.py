"""One article to several platforms in one batch: admission, the per-platform limits, and the
whole service publishing each article once on each platform.

Admission runs in-process through WSGI against real MariaDB and Redis; the end-to-end test
runs `topn.py serve` with real headless Chromium against the local sandbox platform and the
LOCAL STAND-IN of Zhihu (tests/zhihu_standin.py), never zhihu.com.
"""

import collections
import concurrent.futures
import dataclasses
import threading

import pytest

from accounts import AccountStore
from conftest import SECRET, WsgiClient, all_finished, articles, count_tasks, http, wait_until, web_app, \
    zhihu_environment
from publishers import load_publishers
from scheduler import Keys, Scheduler

CREATE = '/api/publish/create_batch'


def store_sandbox_login(db, config, user):
    AccountStore(db, SECRET).save(user.id, load_publishers(config)['sandbox'],
                                  {'cookies': 'sbx_session=a-session-value'})


def submit(client, user, **batch):
    return client.post(CREATE, batch, headers=user.headers)


def created(response):
    assert response.status == 200, response.body[:500]
    return response.json['task_ids']


def refused(response, status, code):
    assert response.status == status, (response.status, response.body[:500])
    return response.json['error']


def task_rows(db, user):
    with db.transaction() as cur:
        cur.execute('SELECT task_id, platform, article_title, status, batch_id, article_index FROM publish_tasks '
                    'WHERE user_id = %s ORDER BY id', (user.id,))
        return cur.fetchall()


@pytest.fixture
def writer(make_user, db, config):
    """A user with a stored sandbox login (noop needs none)."""
    user = make_user('alice')
    store_sandbox_login(db, config, user)
    return user


# -- admission -------------------------------------------------------------------------------

def test_a_batch_to_two_platforms_makes_one_task_per_article_and_platform_article_by_article(
        client, db, writer, redis_client, config):
    task_ids = created(submit(client, writer, platforms=['sandbox', 'noop'], articles=articles(3)))

    rows = task_rows(db, writer)
    assert [row['task_id'] for row in rows] == task_ids
    assert [(row['article_title'], row['platform']) for row in rows] == [
        ('article 0', 'sandbox'), ('article 0', 'noop'), ('article 1', 'sandbox'), ('article 1', 'noop'),
        ('article 2', 'sandbox'), ('article 2', 'noop')]
    assert len({row['batch_id'] for row in rows}) == 1
    assert [row['article_index'] for row in rows] == [0, 0, 1, 1, 2, 2]
    assert redis_client.lrange(Keys(config.redis_prefix).queue(writer.id), 0, -1) == task_ids
    shown = client.get('/api/publish/tasks/status?task_ids=' + ','.join(task_ids), headers=writer.headers).json
    assert [(task['platform'], task['article_index']) for task in shown['tasks']] == [
        ('sandbox', 0), ('noop', 0), ('sandbox', 1), ('noop', 1), ('sandbox', 2), ('noop', 2)]


def test_a_single_platform_still_works_as_before(client, db, writer):
    task_ids = created(submit(client, writer, platform='sandbox', articles=articles(2)))

    assert [row['platform'] for row in task_rows(db, writer)] == ['sandbox', 'sandbox']
    assert len(task_ids) == 2


@pytest.mark.parametrize('platforms, code, named', [
    (['sandbox', 'myspace'], 'unknown_platform', 'myspace'),
    (['noop', 'wordpress'], 'no_account', 'wordpress'),
    (['sandbox', 'noop', 'sandbox'], 'duplicate_platform', 'sandbox'),
], ids=['unknown', 'no-stored-login', 'twice'])
def test_a_platform_list_with_a_bad_platform_is_refused_whole_naming_it(client, db, writer, platforms, code,
                                                                         named):
    error = refused(submit(client, writer, platforms=platforms, articles=articles(2)), 400, code)

    assert error['code'] == code and error['platform'] == named
    assert named in error['message']
    assert count_tasks(db) == 0


@pytest.mark.parametrize('batch, code', [
    ({'platform': 'noop', 'platforms': ['noop']}, 'platform_and_platforms'),
    ({'platforms': []}, 'invalid_platforms'),
    ({'platforms': 'noop'}, 'invalid_platforms'),
    ({'platforms': [['noop']]}, 'unknown_platform'),
], ids=['both-fields', 'empty-list', 'not-a-list', 'not-a-name'])
def test_malformed_platform_fields_are_refused_with_their_own_code(client, db, writer, batch, code):
    refused(submit(client, writer, articles=articles(1), **batch), 400, code)

    assert count_tasks(db) == 0


def test_a_single_platform_without_a_stored_login_is_refused_at_admission(client, db, make_user):
    bob = make_user('bob')

    error = refused(submit(client, bob, platform='sandbox', articles=articles(1)), 400, 'no_account')

    assert error['platform'] == 'sandbox'
    assert count_tasks(db) == 0


# -- limits per user and platform ------------------------------------------------------------

def test_ten_articles_to_two_platforms_is_one_admissible_batch_and_the_limit_counts_per_platform(
        client, db, writer):
    assert len(created(submit(client, writer, platforms=['sandbox', 'noop'], articles=articles(10)))) == 20

    for platform in ('sandbox', 'noop'):
        error = refused(submit(client, writer, platform=platform, articles=articles(1)), 429, 'too_many_active')
        assert error['platform'] == platform
    assert count_tasks(db, writer.id) == 20


def test_a_batch_that_one_of_its_platforms_cannot_take_is_refused_whole(client, db, writer):
    created(submit(client, writer, platform='noop', articles=articles(8)))

    error = refused(submit(client, writer, platforms=['sandbox', 'noop'], articles=articles(3)), 429,
                    'too_many_active')

    assert error['platform'] == 'noop'
    assert collections.Counter(row['platform'] for row in task_rows(db, writer)) == {'noop': 8}


def test_the_rate_limit_counts_per_platform(config, db, redis_client, writer):
    roomy = dataclasses.replace(config, user_max_active=100)
    client = WsgiClient(web_app(roomy, db, Scheduler(roomy, db, redis_client, load_publishers(roomy))))
    for _ in range(2):
        created(submit(client, writer, platforms=['sandbox', 'noop'], articles=articles(10)))

    error = refused(submit(client, writer, platform='noop', articles=articles(1)), 429, 'rate_limited')

    assert error['platform'] == 'noop'
    assert count_tasks(db, writer.id) == 40


def test_parallel_multi_platform_batches_never_pass_the_per_platform_limits(client, db, writer):
    start = threading.Barrier(6)
    shapes = [['sandbox', 'noop'], ['noop'], ['sandbox'], ['noop', 'sandbox'], ['sandbox', 'noop'], ['noop']]

    def post(platforms):
        start.wait()
        return submit(client, writer, platforms=platforms, articles=articles(4)).status

    with concurrent.futures.ThreadPoolExecutor(len(shapes)) as pool:
        statuses = list(pool.map(post, shapes))

    counts = collections.Counter(row['platform'] for row in task_rows(db, writer))
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    assert counts['sandbox'] <= 10 and counts['noop'] <= 10
    admitted = [shape for shape, status in zip(shapes, statuses) if status == 200]
    assert counts == collections.Counter(platform for shape in admitted for platform in shape for _ in range(4))


# -- the whole service ---------------------------------------------------------------------------

def test_ten_articles_to_the_sandbox_and_zhihu_are_published_once_on_each(
        start_service, platform, standin, make_user, db, config, tmp_path):
    platform.call('POST', '/api/reset')
    alice = make_user('alice')
    store = AccountStore(db, SECRET)
    publishers = load_publishers(config)
    store.save(alice.id, publishers['sandbox'], {'cookies': platform.session_for('alice')})
    zhihu_cookies = standin.add_account('alice')
    store.save(alice.id, publishers['zhihu'], {'cookies': zhihu_cookies})
    service = start_service(TOPN_SANDBOX_URL=platform.url, TOPN_SECRET_KEY=SECRET, TOPN_PACING_ZHIHU=0,
                            TOPN_STATE_DIR=str(tmp_path / 'state'), TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'),
                            **zhihu_environment(standin))
    batch = [{'title': f'两个平台 {i}', 'content': f'# 第 {i} 篇\n\n正文 {i}。'} for i in range(10)]

    status, body = http('POST', service.url + CREATE, {'platforms': ['sandbox', 'zhihu'], 'articles': batch},
                        alice.headers)

    assert status == 200, body
    task_ids = body['task_ids']
    assert len(task_ids) == 20
    done = wait_until(lambda: all_finished(service, alice, task_ids), timeout=240, message='all 20 tasks')
    assert [task['status'] for task in done] == ['success'] * 20, [t['error_message'] for t in done]
    titles = [article['title'] for article in batch]
    assert sorted(a['title'] for a in platform.articles()) == sorted(titles)
    assert sorted(a['title'] for a in standin.published(zhihu_cookies)) == sorted(titles)
    by_platform = {(task['article_title'], task['platform']): task['result_url'] for task in done}
    for article in platform.articles():
        assert by_platform[(article['title'], 'sandbox')] == article['url']
    for task_id in task_ids:
        assert [h['outcome'] for h in db.history(task_id)].count('success') == 1
