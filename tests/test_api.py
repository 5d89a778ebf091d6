"""The JSON API keeps its promises: validation, limits, isolation and its error shape.

In-process through WSGI against real MariaDB and Redis. No worker runs, so created tasks
stay `pending` unless a test moves them with SQL.
"""

import concurrent.futures
import dataclasses
import datetime
import json
import threading
import uuid

import pytest

from conftest import WsgiClient, batch, count_tasks, free_port, web_app
from db import Database
from publishers import load_publishers
from scheduler import Keys, Scheduler, connect_redis

CREATE = '/api/publish/create_batch'
STATUS = '/api/publish/tasks/status'
LIST = '/api/publish/tasks/list'
CANCEL = '/api/publish/tasks/cancel'
RETRY = '/api/publish/tasks/retry'
METRICS = '/api/metrics'
ONE_MIB = 1024 * 1024
TASK_FIELDS = {'task_id', 'status', 'progress', 'article_title', 'platform', 'created_at', 'started_at',
               'completed_at', 'result_url', 'error_message', 'retry_count'}


# -- helpers ---------------------------------------------------------------------------

def header(response, name):
    """HTTP header names are case-insensitive (Bottle sends `Www-Authenticate`)."""
    matches = [value for key, value in response.headers.items() if key.lower() == name.lower()]
    return matches[0] if matches else None


def assert_no_html_or_traceback(response):
    text = response.body.decode('utf-8')
    assert 'Traceback' not in text
    assert 'File "' not in text
    assert '<html' not in text.lower() and '<!doctype' not in text.lower()


def assert_error(response, status, code):
    assert response.status == status, (response.status, response.body[:500])
    assert header(response, 'Content-Type').startswith('application/json')
    body = response.json
    assert body['success'] is False
    assert body['error']['code'] == code, body
    assert isinstance(body['error']['message'], str) and body['error']['message']
    assert_no_html_or_traceback(response)
    return body['error']


def task_row(db, task_id):
    with db.transaction() as cur:
        cur.execute('SELECT * FROM publish_tasks WHERE task_id = %s', (task_id,))
        return cur.fetchone()


def set_task(db, task_id, **columns):
    assignments = ', '.join(f'{name} = %s' for name in columns)
    with db.transaction() as cur:
        cur.execute(f'UPDATE publish_tasks SET {assignments} WHERE task_id = %s', (*columns.values(), task_id))


def create(client, user, n=1, **extra):
    response = client.post(CREATE, batch(n, **extra), headers=user.headers)
    assert response.status == 200, response.body[:500]
    return response.json['task_ids']


def queued_ids(redis_client, config, user):
    return redis_client.lrange(Keys(config.redis_prefix).queue(user.id), 0, -1)


def app_client(config, db, redis_client):
    return WsgiClient(web_app(config, db, Scheduler(config, db, redis_client, load_publishers(config))))


def parse_utc(value):
    parsed = datetime.datetime.fromisoformat(value)
    assert parsed.utcoffset() == datetime.timedelta(0), value
    return parsed


# -- create_batch ----------------------------------------------------------------------

def test_create_batch_answers_task_ids_and_stores_pending_rows(client, db, make_user, config, redis_client):
    alice = make_user('alice')

    response = client.post(CREATE, batch(3), headers=alice.headers)

    assert response.status == 200
    body = response.json
    assert body['success'] is True
    assert isinstance(body['message'], str) and body['message']
    task_ids = body['task_ids']
    assert len(task_ids) == 3 and len(set(task_ids)) == 3
    for i, task_id in enumerate(task_ids):
        uuid.UUID(task_id)
        row = task_row(db, task_id)
        assert row['user_id'] == alice.id
        assert row['status'] == 'pending'
        assert row['article_title'] == f'article {i}'
        assert row['article_content'] == f'body of article {i}'
        assert row['platform'] == 'noop'
        assert row['priority'] == 'normal'
        assert row['retry_count'] == 0 and row['max_retries'] == config.max_retries
        assert row['started_at'] is None and row['completed_at'] is None
    assert queued_ids(redis_client, config, alice) == task_ids


def test_urgent_priority_is_stored_on_every_task_of_the_batch(client, db, make_user):
    alice = make_user('alice')

    task_ids = create(client, alice, 2, priority='urgent')

    assert [task_row(db, task_id)['priority'] for task_id in task_ids] == ['urgent', 'urgent']


def test_cjk_and_emoji_title_round_trips_exactly_through_status(client, db, make_user):
    alice = make_user('alice')
    title, content = '你好，世界 🎉', '第一段：正文 ✨ and ASCII\n第二段 🚀'

    response = client.post(CREATE, {'platform': 'noop', 'articles': [{'title': title, 'content': content}]},
                           headers=alice.headers)
    assert response.status == 200
    task_id, = response.json['task_ids']

    status = client.get(f'{STATUS}?task_ids={task_id}', headers=alice.headers)
    assert status.status == 200
    assert status.json['tasks'][0]['article_title'] == title
    assert task_row(db, task_id)['article_title'] == title
    assert task_row(db, task_id)['article_content'] == content


def test_title_is_stored_without_surrounding_whitespace(client, db, make_user):
    alice = make_user('alice')

    response = client.post(CREATE, {'platform': 'noop', 'articles': [{'title': '  \t spaced out \n', 'content': 'x'}]},
                           headers=alice.headers)

    assert response.status == 200
    assert task_row(db, response.json['task_ids'][0])['article_title'] == 'spaced out'


def one_article(**fields):
    return {'platform': 'noop', 'articles': [{'title': 'a title', 'content': 'a body', **fields}]}


INVALID_BATCHES = [
    ('no-articles-key', {'platform': 'noop'}, 'empty_batch'),
    ('empty-articles', {'platform': 'noop', 'articles': []}, 'empty_batch'),
    ('articles-not-a-list', {'platform': 'noop', 'articles': {'title': 't', 'content': 'c'}}, 'empty_batch'),
    ('eleven-articles', batch(11), 'batch_too_large'),
    ('empty-title', one_article(title=''), 'empty_title'),
    ('whitespace-title', one_article(title=' \t\n\u3000 '), 'empty_title'),
    ('missing-title', {'platform': 'noop', 'articles': [{'content': 'a body'}]}, 'empty_title'),
    ('title-not-a-string', one_article(title=42), 'empty_title'),
    ('title-501-chars', one_article(title='t' * 501), 'title_too_long'),
    ('title-501-cjk-chars', one_article(title='标' * 501), 'title_too_long'),
    ('empty-content', one_article(content=''), 'empty_content'),
    ('whitespace-content', one_article(content='  \n\t '), 'empty_content'),
    ('missing-content', {'platform': 'noop', 'articles': [{'title': 'a title'}]}, 'empty_content'),
    ('content-1MiB-plus-1-byte', one_article(content='a' * (ONE_MIB + 1)), 'content_too_large'),
    ('unknown-platform', {**one_article(), 'platform': 'myspace'}, 'unknown_platform'),
    ('missing-platform', {'articles': one_article()['articles']}, 'unknown_platform'),
    ('bad-priority', {**one_article(), 'priority': 'asap'}, 'invalid_priority'),
    ('upper-case-priority', {**one_article(), 'priority': 'URGENT'}, 'invalid_priority'),
    ('article-not-an-object', {'platform': 'noop', 'articles': ['just a string']}, 'invalid_article'),
    ('article-id-string', one_article(article_id='7'), 'invalid_article_id'),
    ('article-id-zero', one_article(article_id=0), 'invalid_article_id'),
    ('article-id-bool', one_article(article_id=True), 'invalid_article_id'),
    ('topics-not-a-list', {**one_article(), 'topics': 'Python'}, 'invalid_topics'),
    ('six-topics', {**one_article(), 'topics': ['a', 'b', 'c', 'd', 'e', 'f']}, 'invalid_topics'),
    ('topic-not-a-string', one_article(topics=[7]), 'invalid_topics'),
    ('topic-51-chars', one_article(topics=['话' * 51]), 'invalid_topics'),
]


@pytest.mark.parametrize('payload, code', [case[1:] for case in INVALID_BATCHES],
                         ids=[case[0] for case in INVALID_BATCHES])
def test_invalid_batch_is_refused_with_400_and_its_code_and_creates_nothing(
        client, db, make_user, config, redis_client, payload, code):
    alice = make_user('alice')

    response = client.post(CREATE, payload, headers=alice.headers)

    assert_error(response, 400, code)
    assert count_tasks(db) == 0
    assert queued_ids(redis_client, config, alice) == []


def test_topics_of_the_batch_go_to_every_article_that_names_none_of_its_own(client, make_user):
    alice = make_user('alice')
    payload = {'platform': 'noop', 'topics': [' Python ', 'Python', '编程'], 'articles': [
        {'title': 'one', 'content': 'x'}, {'title': 'two', 'content': 'x', 'topics': ['机器学习']},
        {'title': 'three', 'content': 'x', 'topics': []}]}

    task_ids = client.post(CREATE, payload, headers=alice.headers).json['task_ids']

    found = client.get(STATUS + '?task_ids=' + ','.join(task_ids), headers=alice.headers).json['tasks']
    assert [task['topics'] for task in found] == [['Python', '编程'], ['机器学习'], ['Python', '编程']]
    untopical = client.post(CREATE, batch(1), headers=alice.headers).json['task_ids']
    assert client.get(STATUS + '?task_ids=' + untopical[0], headers=alice.headers).json['tasks'][0]['topics'] is None


def test_batch_of_ten_articles_is_accepted(client, db, make_user):
    alice = make_user('alice')

    assert len(create(client, alice, 10)) == 10
    assert count_tasks(db, alice.id) == 10


def test_title_of_500_characters_is_accepted_and_kept_whole(client, db, make_user):
    alice = make_user('alice')
    title = '标题🎉' * 166 + '题🎉'
    assert len(title) == 500

    response = client.post(CREATE, one_article(title=title), headers=alice.headers)

    assert response.status == 200, response.body[:300]
    assert task_row(db, response.json['task_ids'][0])['article_title'] == title


def test_body_of_exactly_one_mib_in_utf8_is_accepted(client, db, make_user):
    alice = make_user('alice')
    content = '你' * 349525 + 'a'
    assert len(content.encode('utf-8')) == ONE_MIB

    response = client.post(CREATE, one_article(content=content), headers=alice.headers)

    assert response.status == 200, response.body[:300]
    with db.transaction() as cur:
        cur.execute('SELECT LENGTH(article_content) AS bytes, CHAR_LENGTH(article_content) AS chars '
                    'FROM publish_tasks WHERE task_id = %s', (response.json['task_ids'][0],))
        assert cur.fetchone() == {'bytes': ONE_MIB, 'chars': 349526}


def test_body_limit_counts_utf8_bytes_not_characters(client, db, make_user):
    alice = make_user('alice')
    content = '你' * 349525 + 'ab'
    assert len(content) < ONE_MIB < len(content.encode('utf-8'))

    response = client.post(CREATE, one_article(content=content), headers=alice.headers)

    assert_error(response, 400, 'content_too_large')
    assert count_tasks(db) == 0


def test_batch_where_only_the_third_article_is_bad_creates_none_of_them(client, db, make_user, config, redis_client):
    alice = make_user('alice')
    payload = batch(5)
    payload['articles'][2]['content'] = '   '

    response = client.post(CREATE, payload, headers=alice.headers)

    error = assert_error(response, 400, 'empty_content')
    assert error['article_index'] == 2
    assert count_tasks(db) == 0
    assert queued_ids(redis_client, config, alice) == []


@pytest.mark.parametrize('raw', [b'{"platform": "noop", "articles": [', b'', b'not json at all',
                                 b"{'platform': 'noop'}", b'\xff\xfe{"platform": "noop"}'],
                         ids=['truncated', 'empty', 'text', 'single-quotes', 'not-utf8'])
def test_invalid_json_is_refused_with_400_invalid_json(client, db, make_user, raw):
    alice = make_user('alice')

    response = client.request('POST', CREATE, raw=raw, headers=alice.headers)

    assert_error(response, 400, 'invalid_json')
    assert count_tasks(db) == 0


@pytest.mark.parametrize('raw', [b'[]', b'[{"platform": "noop"}]', b'"a string"', b'null', b'42'],
                         ids=['empty-list', 'list', 'string', 'null', 'number'])
def test_json_body_that_is_not_an_object_is_refused_with_400_invalid_body(client, db, make_user, raw):
    alice = make_user('alice')

    response = client.request('POST', CREATE, raw=raw, headers=alice.headers)

    assert_error(response, 400, 'invalid_body')
    assert count_tasks(db) == 0


@pytest.mark.parametrize('platform', [['noop'], {'name': 'noop'}], ids=['list', 'object'])
def test_platform_that_is_not_a_string_is_refused_with_400_unknown_platform(client, db, make_user, platform):
    alice = make_user('alice')

    response = client.post(CREATE, {**one_article(), 'platform': platform}, headers=alice.headers)

    assert_error(response, 400, 'unknown_platform')
    assert count_tasks(db) == 0


@pytest.mark.parametrize('raw', [
    b'[' * 100000,
    b'{"platform": "noop", "articles": [{"title": "t", "content": "c", "article_id": ' + b'9' * 5000 + b'}]}',
], ids=['nested-100000-deep', 'integer-of-5000-digits'])
def test_json_the_parser_cannot_take_is_refused_with_400_invalid_json_not_a_server_error(
        client, db, make_user, raw):
    alice = make_user('alice')

    response = client.request('POST', CREATE, raw=raw, headers=alice.headers)

    assert_error(response, 400, 'invalid_json')
    assert count_tasks(db) == 0


@pytest.mark.parametrize('article', [{'title': 't', 'content': '\\ud800 lone surrogate'},
                                     {'title': '\\udfff lone surrogate', 'content': 'c'}],
                         ids=['in-body', 'in-title'])
def test_lone_surrogate_in_an_article_is_refused_with_400_not_a_server_error(client, db, make_user, article):
    alice = make_user('alice')
    raw = ('{"platform": "noop", "articles": [{"title": "%s", "content": "%s"}]}'
           % (article['title'], article['content'])).encode()

    response = client.request('POST', CREATE, raw=raw, headers=alice.headers)

    assert response.status == 400, (response.status, response.body)
    assert response.json['error']['code'] != 'internal_error'
    assert_no_html_or_traceback(response)
    assert count_tasks(db) == 0


# -- article ownership -------------------------------------------------------------------

def insert_article(db, user_id, title='stored article'):
    with db.transaction() as cur:
        cur.execute('INSERT INTO articles (user_id, title, content) VALUES (%s, %s, %s)',
                    (user_id, title, 'stored body'))
        return cur.lastrowid


def test_article_id_of_another_users_article_answers_404_and_creates_nothing(client, db, make_user):
    alice, bob = make_user('alice'), make_user('bob')
    article_id = insert_article(db, alice.id)
    payload = {'platform': 'noop', 'articles': [{'title': 'mine', 'content': 'x'},
                                                {'title': 'stolen', 'content': 'x', 'article_id': article_id}]}

    response = client.post(CREATE, payload, headers=bob.headers)

    assert_error(response, 404, 'article_not_found')
    assert count_tasks(db) == 0
    unknown = client.post(CREATE, one_article(article_id=article_id + 1000), headers=bob.headers)
    assert_error(unknown, 404, 'article_not_found')
    assert count_tasks(db) == 0


def test_own_article_id_is_accepted_and_kept_on_the_task(client, db, make_user):
    alice = make_user('alice')
    article_id = insert_article(db, alice.id)

    response = client.post(CREATE, one_article(article_id=article_id), headers=alice.headers)

    assert response.status == 200, response.body
    task_id, = response.json['task_ids']
    assert task_row(db, task_id)['article_id'] == article_id
    status = client.get(f'{STATUS}?task_ids={task_id}', headers=alice.headers).json
    assert status['tasks'][0]['article_id'] == article_id


# -- limits ------------------------------------------------------------------------------

def test_batch_that_would_pass_ten_unfinished_tasks_is_refused_whole_with_429_and_retry_after(
        client, db, make_user):
    alice = make_user('alice')
    create(client, alice, 8)

    response = client.post(CREATE, batch(3), headers=alice.headers)

    assert_error(response, 429, 'too_many_active')
    assert int(header(response, 'Retry-After')) >= 1
    assert count_tasks(db, alice.id) == 8
    create(client, alice, 2)
    assert count_tasks(db, alice.id) == 10
    assert_error(client.post(CREATE, batch(1), headers=alice.headers), 429, 'too_many_active')
    assert count_tasks(db, alice.id) == 10


def test_cancelled_tasks_free_room_under_the_active_limit(client, db, make_user):
    alice = make_user('alice')
    task_ids = create(client, alice, 10)

    assert client.post(CANCEL, {'task_id': task_ids[0]}, headers=alice.headers).status == 200

    assert len(create(client, alice, 1)) == 1
    assert count_tasks(db, alice.id) == 11


def test_active_limit_is_per_user(client, db, make_user):
    alice, bob = make_user('alice'), make_user('bob')
    create(client, alice, 10)
    assert_error(client.post(CREATE, batch(1), headers=alice.headers), 429, 'too_many_active')

    assert len(create(client, bob, 10)) == 10
    assert count_tasks(db, alice.id) == 10 and count_tasks(db, bob.id) == 10


def test_passing_twenty_created_tasks_in_a_minute_is_refused_with_429_rate_limited(
        config, db, redis_client, make_user):
    client = app_client(dataclasses.replace(config, user_max_active=100), db, redis_client)
    alice, bob = make_user('alice'), make_user('bob')
    create(client, alice, 10)
    create(client, alice, 10)

    response = client.post(CREATE, batch(1), headers=alice.headers)

    assert_error(response, 429, 'rate_limited')
    assert 1 <= int(header(response, 'Retry-After')) <= config.user_rate_window
    assert count_tasks(db, alice.id) == 20
    assert len(create(client, bob, 10)) == 10
    assert count_tasks(db, alice.id) == 20


def test_cancelled_tasks_still_count_toward_the_rate_limit(client, db, make_user):
    alice = make_user('alice')
    for _ in range(2):
        for task_id in create(client, alice, 10):
            assert client.post(CANCEL, {'task_id': task_id}, headers=alice.headers).status == 200

    response = client.post(CREATE, batch(1), headers=alice.headers)

    assert_error(response, 429, 'rate_limited')
    assert count_tasks(db, alice.id) == 20


def test_parallel_batches_never_pass_the_active_limit(client, db, make_user):
    alice = make_user('alice')
    start = threading.Barrier(6)

    def submit():
        start.wait()
        return client.post(CREATE, batch(3), headers=alice.headers).status

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(lambda _: submit(), range(6)))

    assert statuses == [200, 200, 200, 429, 429, 429]
    assert count_tasks(db, alice.id) == 9


# -- authentication ----------------------------------------------------------------------

API_ENDPOINTS = [
    ('POST', CREATE, batch(1)),
    ('GET', f'{STATUS}?task_ids={uuid.uuid4()}', None),
    ('GET', LIST, None),
    ('POST', CANCEL, {'task_id': str(uuid.uuid4())}),
    ('POST', RETRY, {'task_id': str(uuid.uuid4())}),
    ('GET', f'/api/publish/tasks/{uuid.uuid4()}', None),
    ('GET', METRICS, None),
]


@pytest.mark.parametrize('authorization', [None, 'Bearer topn_not-a-real-token', 'Basic {token}', 'Bearer',
                                           'Bearer   ', '{token}', 'Token {token}'],
                         ids=['missing', 'wrong-token', 'basic-scheme', 'scheme-only', 'blank-token',
                              'no-scheme', 'token-scheme'])
def test_request_without_a_valid_bearer_token_answers_401_on_every_endpoint(client, db, make_user, authorization):
    alice = make_user('alice', admin=True)
    headers = {} if authorization is None else {'Authorization': authorization.format(token=alice.token)}

    for method, path, body in API_ENDPOINTS:
        response = client.request(method, path, body=body, headers=headers)
        assert_error(response, 401, 'unauthorized')
        assert header(response, 'WWW-Authenticate') == 'Bearer'
    assert count_tasks(db) == 0


def test_bearer_scheme_is_case_insensitive(client, make_user):
    alice = make_user('alice')

    response = client.post(CREATE, batch(1), headers={'Authorization': f'bearer {alice.token}'})

    assert response.status == 200


# -- tasks/status ----------------------------------------------------------------------

def test_status_returns_every_field_of_the_requested_tasks(client, make_user, config):
    alice = make_user('alice')
    task_ids = create(client, alice, 2, priority='urgent')
    before = datetime.datetime.now(datetime.timezone.utc)

    response = client.get(f'{STATUS}?task_ids={",".join(task_ids)}', headers=alice.headers)

    assert response.status == 200
    tasks = response.json['tasks']
    assert [task['task_id'] for task in tasks] == task_ids
    for i, task in enumerate(tasks):
        assert TASK_FIELDS <= set(task)
        assert task['status'] == 'pending'
        assert task['progress'] == 0
        assert task['article_title'] == f'article {i}'
        assert task['platform'] == 'noop'
        assert task['priority'] == 'urgent'
        assert task['started_at'] is None and task['completed_at'] is None
        assert task['result_url'] is None and task['error_message'] is None
        assert task['retry_count'] == 0 and task['max_retries'] == config.max_retries
        assert abs(parse_utc(task['created_at']) - before) < datetime.timedelta(minutes=1)


def test_status_times_are_iso8601_with_a_utc_offset(client, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    set_task(db, task_id, started_at=datetime.datetime(2024, 5, 6, 7, 8, 9, 123000))
    assert client.post(CANCEL, {'task_id': task_id}, headers=alice.headers).status == 200

    task = client.get(f'{STATUS}?task_ids={task_id}', headers=alice.headers).json['tasks'][0]

    assert task['started_at'] == '2024-05-06T07:08:09.123+00:00'
    created, completed = parse_utc(task['created_at']), parse_utc(task['completed_at'])
    assert created <= completed
    assert parse_utc(task['started_at']) == datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, datetime.timezone.utc)


def test_status_leaves_out_unknown_and_other_users_task_ids(client, make_user):
    alice, bob = make_user('alice'), make_user('bob')
    mine, = create(client, alice, 1)
    theirs, = create(client, bob, 1)
    wanted = [mine, theirs, str(uuid.uuid4()), 'not-a-uuid']

    response = client.get(f'{STATUS}?task_ids={",".join(wanted)}', headers=alice.headers)

    assert response.status == 200
    assert [task['task_id'] for task in response.json['tasks']] == [mine]


@pytest.mark.parametrize('query', ['', '?task_ids=', '?task_ids=,%20,,', '?other=1'],
                         ids=['no-query', 'empty', 'only-commas', 'other-parameter'])
def test_status_without_task_ids_answers_400_missing_task_ids(client, make_user, query):
    alice = make_user('alice')

    assert_error(client.get(STATUS + query, headers=alice.headers), 400, 'missing_task_ids')


def test_status_takes_200_ids_and_refuses_201_with_400(client, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    ids = [task_id] + [str(uuid.uuid4()) for _ in range(200)]

    accepted = client.get(f'{STATUS}?task_ids={",".join(ids[:200])}', headers=alice.headers)
    refused = client.get(f'{STATUS}?task_ids={",".join(ids)}', headers=alice.headers)

    assert accepted.status == 200 and [t['task_id'] for t in accepted.json['tasks']] == [task_id]
    assert_error(refused, 400, 'too_many_task_ids')


# -- tasks/list --------------------------------------------------------------------------

def seven_tasks(client, user):
    return create(client, user, 2, prefix='first') + create(client, user, 3, prefix='second') + \
        create(client, user, 2, prefix='third')


def test_list_reports_total_page_and_limit_newest_first(client, make_user):
    alice, bob = make_user('alice'), make_user('bob')
    task_ids = seven_tasks(client, alice)
    create(client, bob, 2)

    body = client.get(LIST, headers=alice.headers).json

    assert body['success'] is True
    assert (body['total'], body['page'], body['limit']) == (7, 1, 20)
    assert [task['task_id'] for task in body['tasks']] == list(reversed(task_ids))
    assert TASK_FIELDS <= set(body['tasks'][0])


def test_list_pages_through_every_task_once(client, make_user):
    alice = make_user('alice')
    task_ids = seven_tasks(client, alice)

    pages = [client.get(f'{LIST}?limit=3&page={page}', headers=alice.headers).json for page in (1, 2, 3, 4)]

    assert [len(page['tasks']) for page in pages] == [3, 3, 1, 0]
    assert all(page['total'] == 7 and page['limit'] == 3 for page in pages)
    assert [page['page'] for page in pages] == [1, 2, 3, 4]
    seen = [task['task_id'] for page in pages for task in page['tasks']]
    assert seen == list(reversed(task_ids))


def test_list_filters_by_status(client, make_user):
    alice = make_user('alice')
    task_ids = create(client, alice, 5)
    for task_id in task_ids[1:3]:
        client.post(CANCEL, {'task_id': task_id}, headers=alice.headers)

    cancelled = client.get(f'{LIST}?status=cancelled', headers=alice.headers).json
    pending = client.get(f'{LIST}?status=pending', headers=alice.headers).json
    running = client.get(f'{LIST}?status=running', headers=alice.headers).json

    assert cancelled['total'] == 2
    assert [task['task_id'] for task in cancelled['tasks']] == [task_ids[2], task_ids[1]]
    assert pending['total'] == 3 and {t['status'] for t in pending['tasks']} == {'pending'}
    assert running['total'] == 0 and running['tasks'] == []


@pytest.mark.parametrize('query, code', [
    ('status=bogus', 'invalid_status'), ('status=PENDING', 'invalid_status'),
    ('page=0', 'invalid_page'), ('page=-1', 'invalid_page'), ('page=abc', 'invalid_page'),
    ('page=1.5', 'invalid_page'),
    ('limit=0', 'invalid_limit'), ('limit=101', 'invalid_limit'), ('limit=ten', 'invalid_limit'),
    ('limit=-5', 'invalid_limit'),
])
def test_list_with_a_bad_query_answers_400_with_its_code(client, make_user, query, code):
    alice = make_user('alice')

    assert_error(client.get(f'{LIST}?{query}', headers=alice.headers), 400, code)


def test_list_accepts_a_limit_of_100(client, make_user):
    alice = make_user('alice')
    create(client, alice, 2)

    body = client.get(f'{LIST}?limit=100', headers=alice.headers).json

    assert body['limit'] == 100 and len(body['tasks']) == 2


def test_list_page_past_the_end_answers_an_empty_page(client, make_user):
    alice = make_user('alice')
    create(client, alice, 2)

    response = client.get(f'{LIST}?page=1000000', headers=alice.headers)

    assert response.status == 200, (response.status, response.body)
    assert response.json['tasks'] == [] and response.json['total'] == 2


def test_absurd_page_number_answers_400_instead_of_reaching_mysql(client, make_user):
    alice = make_user('alice')

    response = client.get(f'{LIST}?page=100000000000000000000', headers=alice.headers)

    assert response.status == 400 and response.json['error']['code'] == 'invalid_page'


# -- cancel and retry --------------------------------------------------------------------

def test_cancelling_a_pending_task_marks_it_cancelled_and_takes_it_off_the_queue(
        client, db, make_user, config, redis_client):
    alice = make_user('alice')
    task_ids = create(client, alice, 2)

    response = client.post(CANCEL, {'task_id': task_ids[0]}, headers=alice.headers)

    assert response.status == 200
    assert response.json['success'] is True
    assert response.json['task_id'] == task_ids[0] and response.json['status'] == 'cancelled'
    row = task_row(db, task_ids[0])
    assert row['status'] == 'cancelled' and row['completed_at'] is not None
    assert task_row(db, task_ids[1])['status'] == 'pending'
    assert queued_ids(redis_client, config, alice) == [task_ids[1]]


def test_cancelling_a_cancelled_task_again_answers_409_task_finished(client, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    client.post(CANCEL, {'task_id': task_id}, headers=alice.headers)
    before = task_row(db, task_id)

    response = client.post(CANCEL, {'task_id': task_id}, headers=alice.headers)

    assert_error(response, 409, 'task_finished')
    assert task_row(db, task_id) == before


@pytest.mark.parametrize('status', ['success', 'failed'])
def test_cancelling_a_finished_task_answers_409_and_leaves_it_alone(client, db, make_user, status):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    set_task(db, task_id, status=status, completed_at=datetime.datetime(2024, 1, 1))
    before = task_row(db, task_id)

    assert_error(client.post(CANCEL, {'task_id': task_id}, headers=alice.headers), 409, 'task_finished')
    assert task_row(db, task_id) == before


def test_cancelling_a_running_task_asks_its_worker_to_stop(client, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    set_task(db, task_id, status='running', attempt=1, worker_id='w-1')

    response = client.post(CANCEL, {'task_id': task_id}, headers=alice.headers)

    assert response.status == 200
    assert response.json['status'] == 'running' and response.json['cancel_requested'] is True
    row = task_row(db, task_id)
    assert row['status'] == 'running' and row['cancel_requested'] == 1


@pytest.mark.parametrize('path', [CANCEL, RETRY])
@pytest.mark.parametrize('raw', [b'{}', b'{"task_id": ""}', b'{"task_id": 5}', b'{"id": "x"}', b'[]', b'"abc"'],
                         ids=['empty-object', 'empty-id', 'number-id', 'other-key', 'list', 'string'])
def test_cancel_and_retry_without_a_task_id_answer_400_missing_task_id(client, db, make_user, path, raw):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)

    assert_error(client.request('POST', path, raw=raw, headers=alice.headers), 400, 'missing_task_id')
    assert task_row(db, task_id)['status'] == 'pending'


@pytest.mark.parametrize('path', [CANCEL, RETRY])
def test_cancel_and_retry_of_an_unknown_task_answer_404_task_not_found(client, make_user, path):
    alice = make_user('alice')

    assert_error(client.post(path, {'task_id': str(uuid.uuid4())}, headers=alice.headers), 404, 'task_not_found')


def test_retrying_a_cancelled_task_makes_it_pending_and_queues_it_again(client, db, make_user, config, redis_client):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    client.post(CANCEL, {'task_id': task_id}, headers=alice.headers)
    assert queued_ids(redis_client, config, alice) == []

    response = client.post(RETRY, {'task_id': task_id}, headers=alice.headers)

    assert response.status == 200
    assert response.json['task_id'] == task_id and response.json['status'] == 'pending'
    row = task_row(db, task_id)
    assert row['status'] == 'pending' and row['retry_count'] == 0 and row['completed_at'] is None
    assert queued_ids(redis_client, config, alice) == [task_id]


def test_retrying_a_failed_task_restores_its_retries_and_clears_its_error(client, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    set_task(db, task_id, status='failed', retry_count=3, progress=40, error_message='platform said no',
             completed_at=datetime.datetime(2024, 1, 1))

    assert client.post(RETRY, {'task_id': task_id}, headers=alice.headers).status == 200

    task = client.get(f'{STATUS}?task_ids={task_id}', headers=alice.headers).json['tasks'][0]
    assert task['status'] == 'pending' and task['retry_count'] == 0 and task['progress'] == 0
    assert task['error_message'] is None and task['completed_at'] is None


@pytest.mark.parametrize('status', ['pending', 'running', 'retry', 'success'])
def test_retrying_a_task_that_is_not_failed_or_cancelled_answers_409_task_not_retryable(
        client, db, make_user, status):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)
    set_task(db, task_id, status=status)
    before = task_row(db, task_id)

    assert_error(client.post(RETRY, {'task_id': task_id}, headers=alice.headers), 409, 'task_not_retryable')
    assert task_row(db, task_id) == before


def test_retry_is_refused_with_429_when_it_would_pass_the_active_limit(client, db, make_user):
    alice = make_user('alice')
    task_ids = create(client, alice, 10)
    client.post(CANCEL, {'task_id': task_ids[0]}, headers=alice.headers)
    create(client, alice, 1)

    response = client.post(RETRY, {'task_id': task_ids[0]}, headers=alice.headers)

    assert_error(response, 429, 'too_many_active')
    assert header(response, 'Retry-After')
    assert task_row(db, task_ids[0])['status'] == 'cancelled'


# -- task detail ---------------------------------------------------------------------------

def test_task_detail_returns_the_task_with_its_attempts(client, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)

    fresh = client.get(f'/api/publish/tasks/{task_id}', headers=alice.headers)
    assert fresh.status == 200
    assert fresh.json['task']['task_id'] == task_id and fresh.json['task']['attempts'] == []
    assert TASK_FIELDS <= set(fresh.json['task'])

    with db.transaction() as cur:
        cur.execute("INSERT INTO publish_history (task_id, attempt, worker_id, host_id, started_at, ended_at, outcome, "
                    "error) VALUES (%s, 1, 'alpha:11', 'alpha', '2024-05-06 07:08:09.000', '2024-05-06 07:08:11.500', "
                    "'failed', 'boom'), (%s, 2, 'beta:22', 'beta', '2024-05-06 07:09:00.000', NULL, 'running', NULL)",
                    (task_id, task_id))
    attempts = client.get(f'/api/publish/tasks/{task_id}', headers=alice.headers).json['task']['attempts']

    assert [(a['attempt'], a['host'], a['worker'], a['outcome'], a['error']) for a in attempts] == [
        (1, 'alpha', 'alpha:11', 'failed', 'boom'), (2, 'beta', 'beta:22', 'running', None)]
    assert attempts[0]['started_at'] == '2024-05-06T07:08:09.000+00:00'
    assert parse_utc(attempts[0]['ended_at']) - parse_utc(attempts[0]['started_at']) == \
        datetime.timedelta(seconds=2.5)
    assert attempts[1]['ended_at'] is None


def test_task_detail_of_an_unknown_task_answers_404_task_not_found(client, make_user):
    alice = make_user('alice')

    assert_error(client.get(f'/api/publish/tasks/{uuid.uuid4()}', headers=alice.headers), 404, 'task_not_found')


# -- isolation -----------------------------------------------------------------------------

def test_another_users_task_id_answers_404_on_every_endpoint_exactly_like_an_unknown_id(client, db, make_user):
    alice, bob = make_user('alice'), make_user('bob')
    pending, cancelled = create(client, alice, 2)
    client.post(CANCEL, {'task_id': cancelled}, headers=alice.headers)
    rows_before = [task_row(db, pending), task_row(db, cancelled)]
    unknown = str(uuid.uuid4())

    def answers(task_id, other):
        return [
            client.post(CANCEL, {'task_id': task_id}, headers=bob.headers),
            client.post(RETRY, {'task_id': other}, headers=bob.headers),
            client.get(f'/api/publish/tasks/{task_id}', headers=bob.headers),
        ]

    for theirs, random_one in zip(answers(pending, cancelled), answers(unknown, unknown)):
        error = assert_error(theirs, 404, 'task_not_found')
        random_error = assert_error(random_one, 404, 'task_not_found')
        masked = error['message'].replace(pending, 'ID').replace(cancelled, 'ID')
        assert masked == random_error['message'].replace(unknown, 'ID')
    status = client.get(f'{STATUS}?task_ids={pending},{cancelled}', headers=bob.headers)
    assert status.status == 200 and status.json['tasks'] == []
    for state in ('', '?status=pending', '?status=cancelled'):
        listing = client.get(LIST + state, headers=bob.headers).json
        assert listing['total'] == 0 and listing['tasks'] == []
    assert [task_row(db, pending), task_row(db, cancelled)] == rows_before


# -- metrics -------------------------------------------------------------------------------

def test_metrics_are_forbidden_to_users_who_are_not_admins(client, make_user):
    alice = make_user('alice', vip=True)

    assert_error(client.get(METRICS, headers=alice.headers), 403, 'forbidden')


def insert_finished_task(db, user_id, status, seconds):
    with db.transaction() as cur:
        cur.execute(
            'INSERT INTO publish_tasks (task_id, user_id, article_title, article_content, platform, status, '
            "started_at, completed_at) VALUES (%s, %s, 'old', 'old', 'noop', %s, "
            "'2024-01-01 00:00:00', '2024-01-01 00:00:00' + INTERVAL %s SECOND)",
            (str(uuid.uuid4()), user_id, status, seconds))


def test_metrics_report_task_figures_for_an_admin(client, db, make_user):
    admin, alice, bob, carol = make_user('root', admin=True), make_user('alice'), make_user('bob'), make_user('carol')
    create(client, alice, 3)
    bob_ids = create(client, bob, 2)
    client.post(CANCEL, {'task_id': bob_ids[0]}, headers=bob.headers)
    for status, seconds in (('success', 1), ('success', 2), ('success', 3), ('failed', 9)):
        insert_finished_task(db, carol.id, status, seconds)

    response = client.get(METRICS, headers=admin.headers)

    assert response.status == 200
    body = response.json
    assert body['success'] is True
    assert body['active_users'] == 2
    assert body['total_tasks'] == 9
    assert body['running_tasks'] == 0
    assert body['tasks_by_status'] == {'pending': 4, 'running': 0, 'success': 3, 'failed': 1, 'retry': 0,
                                       'cancelled': 1, 'scheduled': 0}
    assert body['queue_length_per_user'] == {'alice': 3, 'bob': 1}
    assert body['scheduled_per_user'] == {} and body['next_scheduled_at'] is None
    assert body['success_rate'] == 0.75
    assert body['avg_task_seconds'] == 2.0


def test_metrics_with_no_finished_tasks_report_no_rates(client, make_user):
    admin = make_user('root', admin=True)

    body = client.get(METRICS, headers=admin.headers).json

    assert body['total_tasks'] == 0 and body['active_users'] == 0
    assert body['queue_length_per_user'] == {}
    assert body['success_rate'] is None and body['avg_task_seconds'] is None


# -- services down -------------------------------------------------------------------------

def test_healthz_reports_mysql_and_redis_ok(client):
    response = client.get('/healthz')

    assert response.status == 200
    assert response.json == {'success': True, 'mysql': 'ok', 'redis': 'ok'}


def redis_down_client(config, db):
    scheduler = Scheduler(config, db, connect_redis(f'redis://127.0.0.1:{free_port()}/0'), load_publishers(config))
    return WsgiClient(web_app(config, db, scheduler))


def test_healthz_answers_503_when_redis_is_down(config, db):
    response = redis_down_client(config, db).get('/healthz')

    assert response.status == 503
    assert response.json['success'] is False
    assert response.json['mysql'] == 'ok' and response.json['redis'].startswith('down')


def test_create_batch_answers_503_redis_unavailable_when_redis_is_down_and_creates_nothing(config, db, make_user):
    alice = make_user('alice')

    response = redis_down_client(config, db).post(CREATE, batch(2), headers=alice.headers)

    assert_error(response, 503, 'redis_unavailable')
    assert header(response, 'Retry-After')
    assert count_tasks(db) == 0


def test_cancel_still_works_in_mysql_while_redis_is_down(client, config, db, make_user):
    alice = make_user('alice')
    task_id, = create(client, alice, 1)

    response = redis_down_client(config, db).post(CANCEL, {'task_id': task_id}, headers=alice.headers)

    assert response.status == 200 and response.json['status'] == 'cancelled'
    assert task_row(db, task_id)['status'] == 'cancelled'


def mysql_down_client(config, redis_client):
    down = Database({**config.mysql, 'port': free_port()}, connect_timeout=2)
    return WsgiClient(web_app(config, down, Scheduler(config, down, redis_client, load_publishers(config))))


def test_tasks_list_answers_503_database_unavailable_when_mysql_is_down(config, redis_client, make_user):
    alice = make_user('alice')

    response = mysql_down_client(config, redis_client).get(LIST, headers=alice.headers)

    assert_error(response, 503, 'database_unavailable')
    assert header(response, 'Retry-After')


def test_healthz_answers_503_when_mysql_is_down(config, redis_client):
    response = mysql_down_client(config, redis_client).get('/healthz')

    assert response.status == 503
    assert response.json['redis'] == 'ok' and response.json['mysql'].startswith('down')


# -- request size, routes and error shape ----------------------------------------------------

def test_body_over_max_request_bytes_answers_413_body_too_large_and_creates_nothing(config, db, redis_client,
                                                                                      make_user):
    client = app_client(dataclasses.replace(config, max_request_bytes=1000), db, redis_client)
    alice = make_user('alice')
    payload = json.dumps(one_article(content='x' * 100)).encode()
    at_limit = payload + b' ' * (1000 - len(payload))

    over = client.request('POST', CREATE, raw=at_limit + b' ', headers=alice.headers)
    assert_error(over, 413, 'body_too_large')
    assert count_tasks(db) == 0

    assert client.request('POST', CREATE, raw=at_limit, headers=alice.headers).status == 200
    assert count_tasks(db) == 1


@pytest.mark.parametrize('method, path', [('GET', '/nope'), ('GET', '/api/nope'), ('POST', '/api/publish/create'),
                                          ('GET', '/api/publish/tasks/a/b')])
def test_unknown_route_answers_json_404_not_found(client, make_user, method, path):
    alice = make_user('alice')

    assert_error(client.request(method, path, headers=alice.headers), 404, 'not_found')


@pytest.mark.parametrize('method, path, allowed', [
    ('GET', CREATE, 'POST'), ('PUT', CREATE, 'POST'), ('POST', LIST, 'GET'), ('DELETE', STATUS, 'GET'),
    ('POST', METRICS, 'GET'), ('POST', '/healthz', 'GET'), ('DELETE', f'/api/publish/tasks/{uuid.uuid4()}', 'GET'),
])
def test_wrong_method_answers_json_405(client, db, make_user, method, path, allowed):
    alice = make_user('alice')

    response = client.request(method, path, body=batch(1), headers=alice.headers)

    assert_error(response, 405, 'method_not_allowed')
    assert allowed in header(response, 'Allow')
    assert count_tasks(db) == 0
