"""Zhihu through the whole service: `topn.py serve` with its workers and their real headless
Chromium, publishing to the LOCAL STAND-IN of Zhihu (tests/zhihu_standin.py), never to zhihu.com,
which these machines cannot reach. Tasks go in through the JSON API, logins are stored as
`account set` stores them, and what the user sees is read back through the API.
"""

import json
import urllib.request

import pytest

from accounts import AccountStore, parse_cookies
from conftest import SECRET, http, run_topn, wait_until, zhihu_environment
from publishers import load_publishers

PAUSE = 2   # TOPN_ZHIHU_PAUSE: seconds before a retry after risk control, throttling or a review


@pytest.fixture
def zhihu_service(start_service, standin, tmp_path):
    """The service publishing to the stand-in, with no pacing between publishes of one account."""
    def start(**env):
        settings = {**zhihu_environment(standin), 'TOPN_SECRET_KEY': SECRET, 'TOPN_STATE_DIR': str(tmp_path / 'state'),
                    'TOPN_BROWSER_ROOT': str(tmp_path / 'browsers'), 'TOPN_PACING_ZHIHU': 0,
                    'TOPN_ZHIHU_PAUSE': PAUSE, 'TOPN_WORKERS': 2, **env}
        return start_service(**settings)
    return start


@pytest.fixture
def zhihu_writer(make_user, db, config, standin):
    """A TOP_N user with a Zhihu account at the stand-in, its login stored as `account set` stores it."""
    store = AccountStore(db, SECRET)
    publisher = load_publishers(config)['zhihu']

    def make(name, column=None):
        user = make_user(name)
        user.cookies = standin.add_account(name)
        store.save(user.id, publisher, {'cookies': user.cookies, 'column': column})
        return user
    return make


def submit(service, user, articles, **batch):
    status, body = http('POST', service.url + '/api/publish/create_batch',
                        {'platform': 'zhihu', 'articles': articles, **batch}, user.headers)
    assert status == 200, body
    return body['task_ids']


def task_of(service, user, task_id):
    status, body = http('GET', f'{service.url}/api/publish/tasks/{task_id}', headers=user.headers)
    assert status == 200, body
    return body['task']


def finished(service, user, task_ids):
    found = [task_of(service, user, task_id) for task_id in task_ids]
    return found if all(task['status'] in ('success', 'failed', 'cancelled') for task in found) else None


def wait_finished(service, user, task_ids, timeout=120):
    return wait_until(lambda: finished(service, user, task_ids), timeout=timeout, message='the Zhihu tasks')


def article(title, **extra):
    return {'title': title, 'content': f'# {title}\n\n正文第一段。\n\n- 一\n- 二\n', **extra}


def test_chinese_title_with_no_matching_topic_publishes_and_the_task_says_so(zhihu_service, zhihu_writer, standin):
    service = zhihu_service()
    alice = zhihu_writer('alice')
    [task_id] = submit(service, alice, [article('今天的晚饭吃什么')])

    [task] = wait_finished(service, alice, [task_id])

    assert task['status'] == 'success', task
    [published] = standin.published(alice.cookies)
    assert published['topics'] == []
    assert task['result_url'] == f'{standin.urls["zhuanlan"]}/p/{published["id"]}'
    assert 'without a topic' in task['result_note']


def test_topics_named_for_the_batch_and_for_one_article_are_attached(zhihu_service, zhihu_writer, standin):
    service = zhihu_service()
    alice = zhihu_writer('alice')
    task_ids = submit(service, alice, [article('今天的晚饭吃什么'), article('周末随笔', topics=['Python 入门'])],
                      topics=['机器学习', '编程'])

    tasks = wait_finished(service, alice, task_ids)

    assert [task['status'] for task in tasks] == ['success', 'success'], tasks
    assert [task['topics'] for task in tasks] == [['机器学习', '编程'], ['Python 入门']]
    topics_by_title = {a['title']: [topic['name'] for topic in a['topics']] for a in standin.published(alice.cookies)}
    assert topics_by_title == {'今天的晚饭吃什么': ['机器学习', '编程'], '周末随笔': ['Python 入门']}


def test_signature_refusal_10003_is_retried_after_its_pause_and_never_called_an_expired_login(
        zhihu_service, zhihu_writer, standin, db):
    service = zhihu_service()
    alice = zhihu_writer('alice')
    standin.refuse(1, 403, 10003, '请求参数异常，请升级客户端后重试')
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    [task] = wait_finished(service, alice, [task_id])

    assert task['status'] == 'success' and task['retry_count'] == 1, task
    first, second = db.history(task_id)
    assert first['outcome'] == 'failed' and 'not an expired login' in first['error']
    assert '登录已失效' not in first['error']
    assert (second['started_at'] - first['ended_at']).total_seconds() >= PAUSE
    [answer] = [f for e in task['evidence'] if e['attempt'] == 1 for f in e['files'] if f.endswith('answer.json')]
    with urllib.request.urlopen(urllib.request.Request(service.url + answer, headers=alice.headers)) as response:
        assert json.loads(response.read())['error']['code'] == 10003
    assert len(standin.published(alice.cookies)) == 1


def test_stale_zse_ck_is_refreshed_the_task_publishes_and_the_fresh_cookie_is_stored(
        zhihu_service, zhihu_writer, standin, db):
    service = zhihu_service()
    alice = zhihu_writer('alice')
    standin.expire_zse_ck()
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    [task] = wait_finished(service, alice, [task_id])

    assert task['status'] == 'success' and task['retry_count'] == 0, task
    stored = dict(AccountStore(db, SECRET).load(alice.id, 'zhihu')['cookies'])
    assert stored['__zse_ck'] != dict(parse_cookies(alice.cookies))['__zse_ck']
    assert standin.zse_ck_works(stored['__zse_ck'])


def test_publish_answer_without_a_url_still_ends_with_the_articles_own_url(zhihu_service, zhihu_writer, standin):
    service = zhihu_service()
    alice = zhihu_writer('alice')
    standin.answer_without_url = True
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    [task] = wait_finished(service, alice, [task_id])

    [published] = standin.published(alice.cookies)
    assert task['status'] == 'success', task
    assert task['result_url'] == f'{standin.urls["zhuanlan"]}/p/{published["id"]}'


@pytest.mark.parametrize('visibility, seen', [('author_only', 'isVisible=False'),
                                              ('soft_404', '你似乎来到了没有知识存在的荒原')])
def test_an_article_a_reader_cannot_see_is_not_counted_as_published(
        zhihu_service, zhihu_writer, standin, visibility, seen):
    service = zhihu_service(TOPN_MAX_RETRIES=0, TOPN_ZHIHU_VERIFY_WAIT=3)
    alice = zhihu_writer('alice')
    standin.new_article_visibility = visibility
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    [task] = wait_finished(service, alice, [task_id])

    assert task['status'] == 'failed' and task['result_url'] is None, task
    assert seen in task['error_message']
    assert len(standin.published(alice.cookies)) == 1   # Zhihu holds it; a reader does not see it


def test_an_article_under_review_is_reported_as_under_review(zhihu_service, zhihu_writer, standin):
    service = zhihu_service(TOPN_ZHIHU_PAUSE=600)
    alice = zhihu_writer('alice')
    standin.new_article_visibility = 'review'
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    task = wait_until(lambda: (found := task_of(service, alice, task_id))['status'] == 'retry' and found,
                      timeout=120, message='the review to be reported')

    assert 'under review' in task['error_message'] and '该文章正在审核中' in task['error_message']
    assert task['result_url'] is None


def test_the_accounts_column_receives_the_published_article(zhihu_service, zhihu_writer, standin):
    service = zhihu_service()
    alice = zhihu_writer('alice', column='https://www.zhihu.com/column/c_1234567890')
    standin.add_column(alice.cookies, 'c_1234567890')
    [task_id] = submit(service, alice, [article('为什么学 Python')])

    [task] = wait_finished(service, alice, [task_id])

    [published] = standin.published(alice.cookies)
    assert task['status'] == 'success', task
    assert standin.column_items('c_1234567890') == [published['id']]
    assert 'c_1234567890' in task['result_note']


def test_account_set_takes_a_column_and_account_check_stores_the_cookies_zhihus_page_refreshed(
        config, make_user, db, standin, tmp_path):
    make_user('alice')
    cookies = standin.add_account('alice')
    env = {**zhihu_environment(standin), 'TOPN_SECRET_KEY': SECRET, 'TOPN_BROWSER_ROOT': str(tmp_path / 'browsers')}
    stored = run_topn(config, 'account', 'set', 'alice', 'zhihu', '--cookies', cookies,
                      '--column', 'https://www.zhihu.com/column/c_1234567890', **env)
    standin.expire_zse_ck()

    checked = run_topn(config, 'account', 'check', 'alice', 'zhihu', **env)

    assert stored.returncode == 0, stored.stderr
    assert checked.returncode == 0, checked.stderr
    assert 'refreshed' in json.loads(checked.stdout)['detail']
    login = AccountStore(db, SECRET).load(db.user_by_name('alice')['id'], 'zhihu')
    assert login['column'] == 'c_1234567890'
    assert standin.zse_ck_works(dict(login['cookies'])['__zse_ck'])
