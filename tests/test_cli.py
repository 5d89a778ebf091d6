"""`topn.py` as operators run it: a subprocess against this test's database and Redis prefix."""

import datetime
import json
import uuid
import zoneinfo

import pytest

import auth
from conftest import batch, free_port, run_topn
from db import Database


def assert_refused(result, *fragments):
    """Exit code 2, a one-line `topn: ...` message naming what went wrong, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr
    assert 'topn: ' in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def all_tasks(db):
    with db.transaction() as cur:
        cur.execute('SELECT task_id, user_id, article_title, article_content, platform, priority, status '
                    'FROM publish_tasks ORDER BY id')
        return cur.fetchall()


def count_tasks(db):
    return len(all_tasks(db))


# -- initdb --------------------------------------------------------------------------------

def test_initdb_twice_succeeds_and_keeps_existing_data(config, db, make_user, scheduler):
    alice = make_user('alice')
    task_ids = scheduler.submit_batch(alice.id, batch(2))

    for _ in range(2):
        result = run_topn(config, 'initdb')
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {'database': config.mysql['database'], 'schema': 'applied'}

    assert db.user_by_name('alice')['id'] == alice.id
    assert [row['task_id'] for row in all_tasks(db)] == task_ids


def test_initdb_creates_a_missing_database_with_the_task_tables(config):
    name = f'topn_cli_{uuid.uuid4().hex[:8]}'
    url = config.mysql_url.rsplit('/', 1)[0] + '/' + name
    fresh = Database({**config.mysql, 'database': name})
    try:
        result = run_topn(config, 'initdb', TOPN_MYSQL_URL=url)

        assert result.returncode == 0, result.stderr
        with fresh.transaction() as cur:
            cur.execute('SHOW TABLES')
            tables = {next(iter(row.values())) for row in cur.fetchall()}
        assert {'users', 'articles', 'publish_tasks', 'publish_history'} <= tables
    finally:
        fresh.close()
        fresh.drop_database()


# -- adduser -------------------------------------------------------------------------------

def test_adduser_prints_a_token_that_authenticates_against_the_api(config, db, client):
    result = run_topn(config, 'adduser', 'carol', '--password', 'pw-of-carol', '--admin')

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed['name'] == 'carol' and printed['admin'] is True and printed['vip'] is False
    user = db.user_by_token_hash(auth.token_hash(printed['token']))
    assert user is not None
    assert user['id'] == printed['user_id'] and user['name'] == 'carol' and user['is_admin'] == 1
    response = client.get('/api/metrics', headers={'Authorization': f'Bearer {printed["token"]}'})
    assert response.status == 200


def test_adduser_stores_only_hashes_of_the_password_and_token(config, db):
    printed = json.loads(run_topn(config, 'adduser', 'dave', '--password', 'pw-of-dave', '--vip').stdout)

    with db.transaction() as cur:
        cur.execute('SELECT password_hash, token_hash, is_vip FROM users WHERE id = %s', (printed['user_id'],))
        row = cur.fetchone()
    assert row['is_vip'] == 1 and printed['vip'] is True
    assert 'pw-of-dave' not in row['password_hash'] and auth.verify_password('pw-of-dave', row['password_hash'])
    assert row['token_hash'] == auth.token_hash(printed['token']) != printed['token']


def test_adduser_of_an_existing_name_exits_2_with_a_clear_message(config, db, make_user):
    erin = make_user('erin')

    result = run_topn(config, 'adduser', 'erin', '--password', 'other')

    assert_refused(result, "'erin'", 'exists')
    assert result.stdout == ''
    with db.transaction() as cur:
        cur.execute("SELECT COUNT(*) AS n FROM users WHERE name = 'erin'")
        assert cur.fetchone()['n'] == 1
    assert db.user_by_token_hash(auth.token_hash(erin.token))['id'] == erin.id


# -- submit --------------------------------------------------------------------------------

def test_submit_of_markdown_files_creates_pending_tasks_titled_by_their_heading(
        config, db, make_user, redis_client, tmp_path):
    frank = make_user('frank')
    first = tmp_path / 'first.md'
    first.write_text('# 第一篇 🎉\n\nHello **world**.\n\n## A sub-heading\nmore\n', encoding='utf-8')
    second = tmp_path / 'second.md'
    second.write_text('# Second post\n\nBody line.\n\n```sh\n# a shell comment, not a heading\n```\n',
                      encoding='utf-8')

    result = run_topn(config, 'submit', str(first), str(second), '--user', 'frank', '--platform', 'noop')

    assert result.returncode == 0, result.stderr
    task_ids = json.loads(result.stdout)['task_ids']
    rows = all_tasks(db)
    assert [row['task_id'] for row in rows] == task_ids
    assert [(row['user_id'], row['status'], row['platform'], row['priority']) for row in rows] == [
        (frank.id, 'pending', 'noop', 'normal')] * 2
    assert [row['article_title'] for row in rows] == ['第一篇 🎉', 'Second post']
    assert rows[0]['article_content'] == 'Hello **world**.\n\n## A sub-heading\nmore'
    assert rows[1]['article_content'] == 'Body line.\n\n```sh\n# a shell comment, not a heading\n```'
    assert redis_client.lrange(f'{config.redis_prefix}:queue:{frank.id}', 0, -1) == task_ids


def test_submit_of_markdown_without_a_heading_is_titled_by_its_file_name(config, db, make_user, tmp_path):
    make_user('frank')
    path = tmp_path / 'release-notes.md'
    path.write_text('Just a body,\nno heading.\n', encoding='utf-8')

    result = run_topn(config, 'submit', str(path), '--user', 'frank', '--platform', 'noop', '--urgent')

    assert result.returncode == 0, result.stderr
    row, = all_tasks(db)
    assert (row['article_title'], row['article_content'], row['priority']) == (
        'release-notes', 'Just a body,\nno heading.', 'urgent')


def test_submit_of_markdown_saved_with_a_utf8_bom_still_takes_its_title_from_the_heading(
        config, db, make_user, tmp_path):
    make_user('frank')
    path = tmp_path / 'windows.md'
    path.write_bytes('# Notepad title\r\n\r\nBody from Windows.\r\n'.encode('utf-8-sig'))

    result = run_topn(config, 'submit', str(path), '--user', 'frank', '--platform', 'noop')

    assert result.returncode == 0, result.stderr
    row, = all_tasks(db)
    assert row['article_title'] == 'Notepad title'
    assert row['article_content'] == 'Body from Windows.'


def test_submit_of_a_json_batch_file_creates_its_tasks(config, db, make_user, tmp_path):
    grace = make_user('grace')
    path = tmp_path / 'batch.json'
    payload = {'platform': 'noop', 'priority': 'urgent',
               'articles': [{'title': '你好，世界 🎉', 'content': '正文'}, {'title': 'two', 'content': 'body two'}]}
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding='utf-8')

    result = run_topn(config, 'submit', str(path), '--user', 'grace')

    assert result.returncode == 0, result.stderr
    rows = all_tasks(db)
    assert [row['task_id'] for row in rows] == json.loads(result.stdout)['task_ids']
    assert [(row['user_id'], row['article_title'], row['article_content'], row['priority'], row['status'])
            for row in rows] == [(grace.id, '你好，世界 🎉', '正文', 'urgent', 'pending'),
                                 (grace.id, 'two', 'body two', 'urgent', 'pending')]


def test_submit_refused_by_the_active_limit_exits_2_with_the_code_and_creates_nothing(
        config, db, make_user, scheduler, tmp_path):
    henry = make_user('henry')
    scheduler.submit_batch(henry.id, batch(9))
    path = tmp_path / 'batch.json'
    path.write_text(json.dumps(batch(2)), encoding='utf-8')

    result = run_topn(config, 'submit', str(path), '--user', 'henry')

    assert_refused(result, 'too_many_active')
    assert count_tasks(db) == 9


def test_submit_of_an_invalid_batch_exits_2_with_the_code_and_creates_nothing(config, db, make_user, tmp_path):
    make_user('henry')
    path = tmp_path / 'batch.json'
    path.write_text(json.dumps({'platform': 'noop', 'articles': [{'title': 'ok', 'content': 'x'},
                                                                 {'title': '  ', 'content': 'x'}]}))

    result = run_topn(config, 'submit', str(path), '--user', 'henry')

    assert_refused(result, 'empty_title')
    assert count_tasks(db) == 0


def test_submit_of_markdown_without_a_platform_exits_2_naming_the_platform_problem(config, db, make_user, tmp_path):
    make_user('henry')
    path = tmp_path / 'post.md'
    path.write_text('# Title\nbody\n')

    result = run_topn(config, 'submit', str(path), '--user', 'henry')

    assert_refused(result, 'unknown_platform')
    assert count_tasks(db) == 0


def test_submit_for_an_unknown_user_exits_2_and_creates_nothing(config, db, tmp_path):
    path = tmp_path / 'post.md'
    path.write_text('# Title\nbody\n')

    result = run_topn(config, 'submit', str(path), '--user', 'nobody', '--platform', 'noop')

    assert_refused(result, "'nobody'")
    assert count_tasks(db) == 0


def test_submit_while_redis_is_down_exits_2_with_a_message_and_creates_nothing(config, db, make_user, tmp_path):
    make_user('henry')
    path = tmp_path / 'post.md'
    path.write_text('# Title\nbody\n')

    result = run_topn(config, 'submit', str(path), '--user', 'henry', '--platform', 'noop',
                      TOPN_REDIS_URL=f'redis://127.0.0.1:{free_port()}/0')

    assert_refused(result)
    assert count_tasks(db) == 0


# -- status ----------------------------------------------------------------------------------

def test_status_for_a_user_prints_json_with_their_tasks(config, make_user, scheduler):
    ivy, jack = make_user('ivy'), make_user('jack')
    ivy_ids = scheduler.submit_batch(ivy.id, batch(3, prefix='ivy'))
    scheduler.submit_batch(jack.id, batch(2, prefix='jack'))
    scheduler.cancel(ivy.id, ivy_ids[0])

    result = run_topn(config, 'status', '--user', 'ivy')

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [task['task_id'] for task in report['tasks']] == list(reversed(ivy_ids))
    assert [(task['title'], task['status']) for task in report['tasks']] == [
        ('ivy 2', 'pending'), ('ivy 1', 'pending'), ('ivy 0', 'cancelled')]
    assert report['total_tasks'] == 5
    assert report['tasks_by_status']['pending'] == 4 and report['tasks_by_status']['cancelled'] == 1
    assert report['queue_length_per_user'] == {'ivy': 2, 'jack': 2}


def test_status_for_an_unknown_user_exits_2(config):
    assert_refused(run_topn(config, 'status', '--user', 'nobody'), "'nobody'")


# -- configuration and services ----------------------------------------------------------

@pytest.mark.parametrize('name, value', [('TOPN_WORKERS', 'abc'), ('TOPN_USER_RATE', '0'),
                                         ('TOPN_NOOP_FAIL_RATE', '2'), ('TOPN_MYSQL_URL', 'postgres://x@y/z')])
@pytest.mark.parametrize('command', [['initdb'], ['status']])
def test_bad_topn_setting_exits_2_with_a_message_naming_the_variable(config, name, value, command):
    result = run_topn(config, *command, **{name: value})

    assert_refused(result, name)
    assert result.stdout == ''


def test_unreachable_mysql_exits_2_with_a_message(config):
    url = f'mysql://root@127.0.0.1:{free_port()}/topn'

    result = run_topn(config, 'adduser', 'kim', '--password', 'pw', TOPN_MYSQL_URL=url)

    assert_refused(result, 'MySQL')


def test_submit_to_two_platforms_at_a_later_time_schedules_one_task_per_article_and_platform(
        config, db, make_user, tmp_path):
    from accounts import AccountStore
    from conftest import SECRET
    from publishers import load_publishers
    ivy = make_user('ivy')
    AccountStore(db, SECRET).save(ivy.id, load_publishers(config)['sandbox'], {'cookies': 'sbx_session=value'})
    path = tmp_path / 'post.md'
    path.write_text('# 定时的一篇\n\n正文\n', encoding='utf-8')
    tomorrow_nine = (datetime.datetime.now(zoneinfo.ZoneInfo('Asia/Shanghai')) + datetime.timedelta(days=1)).replace(
        hour=9, minute=0, second=0, microsecond=0)

    result = run_topn(config, 'submit', str(path), '--user', 'ivy', '--platform', 'sandbox', '--platform', 'noop',
                      '--at', tomorrow_nine.strftime('%Y-%m-%dT%H:%M'))

    assert result.returncode == 0, result.stderr
    rows = all_tasks(db)
    assert [row['task_id'] for row in rows] == json.loads(result.stdout)['task_ids']
    assert [(row['platform'], row['status']) for row in rows] == [('sandbox', 'scheduled'), ('noop', 'scheduled')]
    with db.transaction() as cur:
        cur.execute('SELECT DISTINCT publish_at FROM publish_tasks')
        (stored,), = [tuple(row.values()) for row in cur.fetchall()]
    assert stored == tomorrow_nine.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    status = run_topn(config, 'status')
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report['scheduled_per_user'] == {'ivy': 2}
    assert datetime.datetime.fromisoformat(report['next_scheduled_at']) == tomorrow_nine


def test_submit_at_a_time_that_has_passed_exits_2_and_creates_nothing(config, db, make_user, tmp_path):
    make_user('ivy')
    path = tmp_path / 'post.md'
    path.write_text('# late\n\nbody\n', encoding='utf-8')

    result = run_topn(config, 'submit', str(path), '--user', 'ivy', '--platform', 'noop', '--at', '2020-01-01T09:00')

    assert_refused(result, 'publish_at_in_past')
    assert count_tasks(db) == 0
