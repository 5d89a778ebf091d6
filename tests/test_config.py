"""Every TOPN_* setting is read once, has its documented default, and is refused by name when unusable."""

import dataclasses
import os

import pytest

from config import Config, ConfigError, parse_mysql_url

NUMERIC_SETTINGS = [field.name for field in dataclasses.fields(Config) if field.type in (int, float, 'int', 'float')]


def variable(name):
    return 'TOPN_' + name.upper()


def test_from_env_with_an_empty_environment_gives_the_documented_defaults():
    config = Config.from_env({})

    assert config.mysql_url == 'mysql://root@127.0.0.1:3306/topn'
    assert config.redis_url == 'redis://127.0.0.1:6379/0'
    assert config.redis_prefix == 'topn'
    assert config.bind == '127.0.0.1:8080'
    assert config.workers == 4
    assert config.worker_slots == 2
    assert config.user_max_active == 10
    assert config.user_rate == 20
    assert config.user_rate_window == 60
    assert config.batch_max == 10
    assert config.title_max_chars == 500
    assert config.body_max_bytes == 1024 * 1024
    assert config.max_retries == 3
    assert config.retry_backoff == 2.0
    assert config.task_timeout == 300.0
    assert config.noop_fail_rate == 0.0
    assert config.mysql == {'host': '127.0.0.1', 'port': 3306, 'user': 'root', 'password': '', 'database': 'topn'}
    assert config.bind_host_port == ('127.0.0.1', 8080)


def test_topn_variables_override_the_defaults_with_their_types():
    config = Config.from_env({
        'TOPN_MYSQL_URL': 'mysql://app:pw@db.internal:3307/topn_prod',
        'TOPN_REDIS_URL': 'redis://cache.internal:6380/2',
        'TOPN_REDIS_PREFIX': 'prod',
        'TOPN_BIND': '0.0.0.0:9000',
        'TOPN_WORKERS': '8',
        'TOPN_WORKER_SLOTS': '3',
        'TOPN_USER_MAX_ACTIVE': '25',
        'TOPN_USER_RATE': '50',
        'TOPN_MAX_RETRIES': '0',
        'TOPN_RETRY_BACKOFF': '0.5',
        'TOPN_TASK_TIMEOUT': '90',
        'TOPN_LEASE_TTL': '12.5',
        'TOPN_HEARTBEAT_INTERVAL': '2',
        'TOPN_NOOP_FAIL_RATE': '1',
    })

    assert config.mysql == {'host': 'db.internal', 'port': 3307, 'user': 'app', 'password': 'pw',
                            'database': 'topn_prod'}
    assert (config.redis_url, config.redis_prefix) == ('redis://cache.internal:6380/2', 'prod')
    assert config.bind_host_port == ('0.0.0.0', 9000)
    assert (config.workers, config.worker_slots, config.user_max_active, config.user_rate, config.max_retries) == \
        (8, 3, 25, 50, 0)
    assert all(isinstance(value, int) for value in (config.workers, config.user_rate, config.max_retries))
    assert (config.retry_backoff, config.task_timeout, config.lease_ttl, config.heartbeat_interval) == \
        (0.5, 90.0, 12.5, 2.0)
    assert isinstance(config.task_timeout, float)
    assert config.noop_fail_rate == 1.0


def test_from_env_reads_the_process_environment_by_default(monkeypatch):
    for name in [name for name in os.environ if name.startswith('TOPN_')]:
        monkeypatch.delenv(name)
    monkeypatch.setenv('TOPN_WORKERS', '7')
    monkeypatch.setenv('TOPN_USER_RATE', '33')

    config = Config.from_env()

    assert (config.workers, config.user_rate, config.worker_slots) == (7, 33, 2)


def test_variables_without_the_exact_topn_name_are_ignored():
    config = Config.from_env({'WORKERS': '9', 'topn_workers': '9', 'TOPN_WORKERS_EXTRA': '9'})

    assert config.workers == 4


def assert_refused(environ, *names):
    with pytest.raises(ConfigError) as refused:
        Config.from_env(environ)
    for name in names:
        assert name in str(refused.value)
    return str(refused.value)


@pytest.mark.parametrize('name, raw', [('TOPN_WORKERS', 'abc'), ('TOPN_WORKERS', '1.5'), ('TOPN_WORKERS', ''),
                                       ('TOPN_USER_RATE', 'twenty'), ('TOPN_RETRY_BACKOFF', 'fast'),
                                       ('TOPN_TASK_TIMEOUT', '5m'), ('TOPN_MAX_REQUEST_BYTES', '16MB')])
def test_a_value_that_is_not_a_number_is_refused_naming_the_variable(name, raw):
    message = assert_refused({name: raw}, name)

    assert repr(raw) in message


@pytest.mark.parametrize('name', NUMERIC_SETTINGS)
def test_a_negative_value_is_refused_naming_the_variable(name):
    assert_refused({variable(name): '-1'}, variable(name))


@pytest.mark.parametrize('name', ['worker_slots', 'web_threads', 'user_max_active', 'user_rate', 'batch_max',
                                  'task_timeout', 'vip_turns'])
def test_zero_is_refused_where_a_setting_must_be_positive(name):
    assert_refused({variable(name): '0'}, variable(name))


@pytest.mark.parametrize('raw', ['1.01', '2', 'nan'])
def test_a_fail_rate_above_one_is_refused(raw):
    assert_refused({'TOPN_NOOP_FAIL_RATE': raw}, 'TOPN_NOOP_FAIL_RATE')


@pytest.mark.parametrize('raw', ['0', '0.5', '1'])
def test_a_fail_rate_between_zero_and_one_is_accepted(raw):
    assert Config.from_env({'TOPN_NOOP_FAIL_RATE': raw}).noop_fail_rate == float(raw)


@pytest.mark.parametrize('lease, heartbeat', [('5', '5'), ('5', '6'), ('1', '0')])
def test_a_lease_not_longer_than_the_heartbeat_is_refused(lease, heartbeat):
    assert_refused({'TOPN_LEASE_TTL': lease, 'TOPN_HEARTBEAT_INTERVAL': heartbeat},
                   'TOPN_LEASE_TTL', 'TOPN_HEARTBEAT_INTERVAL')


def test_a_lease_longer_than_the_heartbeat_is_accepted():
    config = Config.from_env({'TOPN_LEASE_TTL': '5.1', 'TOPN_HEARTBEAT_INTERVAL': '5'})

    assert (config.lease_ttl, config.heartbeat_interval) == (5.1, 5.0)


@pytest.mark.parametrize('url', [
    'postgres://root@127.0.0.1:5432/topn', 'mysql://root@127.0.0.1:3306', 'mysql://root@127.0.0.1:3306/',
    'not a url', '', '127.0.0.1:3306/topn', 'mysql://root@127.0.0.1:notaport/topn',
    'mysql://root@127.0.0.1:99999/topn',
], ids=['postgres', 'no-database', 'empty-database', 'text', 'empty', 'no-scheme', 'port-not-a-number',
        'port-out-of-range'])
def test_a_malformed_mysql_url_is_refused_naming_the_variable(url):
    assert_refused({'TOPN_MYSQL_URL': url}, 'TOPN_MYSQL_URL')


@pytest.mark.parametrize('bind', ['localhost', '127.0.0.1:http', '127.0.0.1:70000'])
def test_a_bind_address_without_a_usable_port_is_refused_naming_the_variable(bind):
    assert_refused({'TOPN_BIND': bind}, 'TOPN_BIND')


@pytest.mark.parametrize('url', ['localhost:6379', 'http://127.0.0.1:6379/0'])
def test_a_malformed_redis_url_is_refused_naming_the_variable(url):
    assert_refused({'TOPN_REDIS_URL': url}, 'TOPN_REDIS_URL')


def test_an_empty_redis_prefix_is_refused():
    assert_refused({'TOPN_REDIS_PREFIX': ''}, 'TOPN_REDIS_PREFIX')


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- parse_mysql_url -----------------------------------------------------------------------

def test_parse_mysql_url_splits_user_password_host_port_and_database():
    assert parse_mysql_url('mysql://bob:s3cret@db.example.com:3307/topn_prod') == {
        'host': 'db.example.com', 'port': 3307, 'user': 'bob', 'password': 's3cret', 'database': 'topn_prod'}


def test_parse_mysql_url_decodes_a_percent_encoded_user_and_password():
    parsed = parse_mysql_url('mysql://app%40corp:p%40ss%3Aw%2Fd%23%25x@10.0.0.5:3310/topn')

    assert parsed['user'] == 'app@corp'
    assert parsed['password'] == 'p@ss:w/d#%x'
    assert (parsed['host'], parsed['port'], parsed['database']) == ('10.0.0.5', 3310, 'topn')


def test_parse_mysql_url_fills_in_root_no_password_and_port_3306():
    assert parse_mysql_url('mariadb://localhost/topn') == {
        'host': 'localhost', 'port': 3306, 'user': 'root', 'password': '', 'database': 'topn'}


def test_parse_mysql_url_takes_an_ipv6_host():
    parsed = parse_mysql_url('mysql://root@[::1]:3307/topn')

    assert (parsed['host'], parsed['port']) == ('::1', 3307)


def test_the_host_id_defaults_to_the_machines_name_and_must_fit_a_worker_id():
    import socket
    assert Config.from_env({}).host_id == socket.gethostname()
    assert Config.from_env({'TOPN_HOST_ID': 'worker-2.example'}).host_id == 'worker-2.example'
    for bad in ('', 'a:b', 'x' * 65, 'has space'):
        with pytest.raises(ConfigError, match='TOPN_HOST_ID'):
            Config.from_env({'TOPN_HOST_ID': bad})


def test_idle_remote_browsers_are_quit_well_before_the_grids_session_timeout():
    assert Config.from_env({'TOPN_DRIVER_IDLE': '300'}).browser_idle_limit == 300
    remote = Config.from_env({'TOPN_WEBDRIVER_URL': 'http://grid:4444', 'TOPN_GRID_SESSION_TIMEOUT': '120'})
    assert remote.browser_idle_limit == 60
