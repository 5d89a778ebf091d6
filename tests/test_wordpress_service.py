"""WordPress through the whole service: `topn.py serve` with its workers and real headless
Chromium, publishing to a real WordPress from Debian's package (tests/wordpress_site.py), which
the test set-up installed on a loopback address of its own. The site's own posts table is the
ground truth: who published what, in which status, how often."""

import collections
import itertools
import os
import signal
import subprocess
import sys

import pytest

from accounts import AccountStore
from conftest import ROOT, SECRET, all_finished, create, tasks, wait_until
from pool import find_browser_processes
from publishers import load_publishers

ARTICLE = """## 小标题

一段**加粗**和*斜体*的文字，还有 `行内代码` 🚀。

- 第一点
- 第二点

```python
print("你好")
```

[链接](https://example.com/)

| 列 | 值 |
| --- | --- |
| a | 1 |
"""
RENDERED = ('<h2>小标题</h2>', '<strong>加粗</strong>', '<em>斜体</em>', '<code>行内代码</code>', '🚀',
            '<li>第一点</li>', '<pre><code class="language-python">', '<a href="https://example.com/">链接</a>',
            '<td>a</td>')
names = itertools.count(1)


@pytest.fixture
def wordpress_service(start_service, tmp_path):
    def start(**env):
        return start_service(TOPN_SECRET_KEY=SECRET, TOPN_STATE_DIR=str(tmp_path / 'state'),
                             TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'), **env)
    return start


@pytest.fixture
def wordpress_user(make_user, db, config, wordpress_site):
    """A TOP_N user with a WordPress account of the given role, stored as `account set` stores it."""
    store = AccountStore(db, SECRET)
    publisher = load_publishers(config)['wordpress']

    def make(role='author', password=None):
        name = f'wp{next(names)}'
        wordpress_site.add_user(name, 'pw-' + name, role=role)
        user = make_user(name)
        store.save(user.id, publisher, {'site': wordpress_site.url, 'username': name,
                                        'password': password or 'pw-' + name})
        return user
    return make


def articles(prefix, n):
    return {'platform': 'wordpress', 'articles': [{'title': f'{prefix} 第{i}篇', 'content': ARTICLE}
                                                  for i in range(n)]}


def test_three_users_times_five_articles_land_once_each_under_their_authors_with_formatting(
        wordpress_service, wordpress_user, wordpress_site):
    service = wordpress_service()
    users = [wordpress_user() for _ in range(3)]
    submitted = {user.name: create(service, user, articles(user.name, 5)) for user in users}

    for user in users:
        found = wait_until(lambda: all_finished(service, user, submitted[user.name]), timeout=240,
                           message=f'the posts of {user.name}')
        assert [t['status'] for t in found] == ['success'] * 5, found
        assert {t['retry_count'] for t in found} == {0}
    posts = [post for user in users for post in wordpress_site.posts(author=user.name)]
    assert collections.Counter((p['author'], p['title'], p['status']) for p in posts) == {
        (user.name, f'{user.name} 第{i}篇', 'publish'): 1 for user in users for i in range(5)}
    for post in posts:
        for rendered in RENDERED:
            assert rendered in post['content'], (rendered, post['content'])
    urls = {t['result_url'] for user in users for t in tasks(service, user, submitted[user.name])}
    assert urls == {post['link'] for post in posts}


def test_browser_killed_mid_publish_loses_nothing_and_posts_once(
        wordpress_service, wordpress_user, wordpress_site, tmp_path, db):
    service = wordpress_service(TOPN_UNKNOWN_OUTCOME_SETTLE=2)
    alice = wordpress_user()
    wordpress_site.set_fault('slow_publish', 20)
    try:
        [task_id] = create(service, alice, articles('被杀的浏览器', 1))
        wait_until(lambda: tasks(service, alice, [task_id])[0]['progress'] >= 60 and wordpress_site.posts(
            author=alice.name), timeout=60, message='the draft and the publish request')
        killed = kill_main_browsers(tmp_path)
        wordpress_site.clear_faults()

        [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=120, message='the retry')
    finally:
        wordpress_site.clear_faults()

    assert killed
    assert task['status'] == 'success', task
    [post] = wordpress_site.posts(author=alice.name)
    assert post['status'] == 'publish' and task['result_url'] == post['link']
    outcomes = [attempt['outcome'] for attempt in db.history(task_id)]
    assert outcomes[-1] == 'success' and outcomes.count('success') == 1 and len(outcomes) >= 2


def test_a_publish_answer_lost_after_the_click_leads_to_no_second_post(
        wordpress_service, wordpress_user, wordpress_site):
    service = wordpress_service()
    alice = wordpress_user()
    wordpress_site.set_fault('lose_publish_answer', 1)
    try:
        [task_id] = create(service, alice, articles('应答丢失', 1))
        [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=120, message='the task')
    finally:
        wordpress_site.clear_faults()

    [post] = wordpress_site.posts(author=alice.name)
    assert (task['status'], task['result_url']) == ('success', post['link'])
    assert post['status'] == 'publish'


def test_a_wrong_password_fails_at_once_with_no_retries_and_no_post(
        wordpress_service, wordpress_user, wordpress_site, db):
    service = wordpress_service()
    alice = wordpress_user(password='not-the-password')
    [task_id] = create(service, alice, articles('密码错了', 1))

    [task] = wait_until(lambda: all_finished(service, alice, [task_id]), timeout=60, message='the task')

    assert (task['status'], task['retry_count']) == ('failed', 0)
    assert 'WordPress' in task['error_message'] and '密码' in task['error_message']
    assert len(db.history(task_id)) == 1
    assert wordpress_site.posts(author=alice.name) == []


def test_a_contributor_fails_at_once_saying_the_role_must_publish(wordpress_service, wordpress_user, wordpress_site):
    service = wordpress_service()
    carol = wordpress_user(role='contributor')
    [task_id] = create(service, carol, articles('投稿者', 1))

    [task] = wait_until(lambda: all_finished(service, carol, [task_id]), timeout=60, message='the task')

    assert (task['status'], task['retry_count']) == ('failed', 0)
    assert 'Author' in task['error_message']
    assert [p['status'] for p in wordpress_site.posts(author=carol.name)] == []


def test_a_session_wordpress_ended_leads_to_a_fresh_login_not_a_failure(
        wordpress_service, wordpress_user, wordpress_site, db, config):
    service = wordpress_service()
    alice = wordpress_user()
    store = AccountStore(db, SECRET)
    [first] = create(service, alice, articles('第一次', 1))
    wait_until(lambda: all_finished(service, alice, [first]), timeout=60, message='the first post')
    session_cookies = store.load(alice.id, 'wordpress')['cookies']
    assert any(name.startswith('wordpress_logged_in_') for name, _ in session_cookies)

    wordpress_site.end_sessions(alice.name)
    [second] = create(service, alice, articles('会话过期后', 1))
    [task] = wait_until(lambda: all_finished(service, alice, [second]), timeout=60, message='the second post')

    assert (task['status'], task['retry_count']) == ('success', 0)
    assert store.load(alice.id, 'wordpress')['cookies'] != session_cookies, 'the fresh login is stored'
    assert [p['status'] for p in wordpress_site.posts(author=alice.name)] == ['publish', 'publish']


def test_account_set_refuses_a_site_that_is_not_wordpress_or_answers_nothing_and_stores_nothing(
        config, make_user, db, wordpress_site, platform):
    frank = make_user('frank')
    env = {**os.environ, 'TOPN_MYSQL_URL': config.mysql_url, 'TOPN_REDIS_URL': config.redis_url,
           'TOPN_REDIS_PREFIX': config.redis_prefix, 'TOPN_SECRET_KEY': SECRET}

    def account_set(site):
        return subprocess.run([sys.executable, str(ROOT / 'topn.py'), 'account', 'set', 'frank', 'wordpress',
                               '--site', site, '--username', 'frank', '--password', 'pw'],
                              env=env, capture_output=True, text=True, timeout=60)

    nothing_there = account_set('http://127.0.0.1:9/')
    not_wordpress = account_set(platform.url)  # the sandbox platform: a site, but no WordPress

    assert nothing_there.returncode == 2 and 'invalid_account' in nothing_there.stderr, nothing_there.stderr
    assert not_wordpress.returncode == 2 and 'WordPress' in not_wordpress.stderr, not_wordpress.stderr
    assert not db.accounts_of(frank.id)
    stored = account_set(wordpress_site.url)
    assert stored.returncode == 0, stored.stderr
    assert [row['platform'] for row in db.accounts_of(frank.id)] == ['wordpress']


def kill_main_browsers(tmp_path):
    killed = [pid for pid, command in find_browser_processes(str(tmp_path / 'browsers') + '/').items()
              if command.startswith('/usr/lib/chromium/chromium') and '--type=' not in command]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    return killed
