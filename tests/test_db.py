"""The MySQL layer's promises: transactions that MySQL rolled back are run again, safely; the
schema speaks the vocabulary of tasks.py."""

import re

import pymysql

import tasks
from conftest import MYSQL_HOST, MYSQL_PORT, ROOT


def raw_connection(database):
    return pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', database=database)


def test_transaction_rolled_back_by_a_lock_wait_timeout_is_run_again(db, make_user, mysql_database):
    """Another transaction holds the row we need; MySQL gives up our wait (error 1205, the
    same family as a deadlock: the server rolled back, the connection lives). The layer
    rolls back the whole transaction, runs it again, and this time the row is free."""
    alice = make_user('alice')
    holder = raw_connection(mysql_database)
    with holder.cursor() as cur:
        cur.execute('SELECT id FROM users WHERE id = %s FOR UPDATE', (alice.id,))
    runs = []

    def work(cur):
        runs.append(1)
        if len(runs) == 2:
            holder.commit()
        cur.execute('SET SESSION innodb_lock_wait_timeout = 1')
        cur.execute('UPDATE users SET is_vip = 1 WHERE id = %s', (alice.id,))
        return 'done'

    assert db.run_transaction(work) == 'done'
    holder.close()

    assert len(runs) == 2
    assert db.vip_user_ids() == {alice.id}


def connection_id(db):
    def ask(cur):
        cur.execute('SELECT CONNECTION_ID() AS id')
        return cur.fetchone()['id']
    return db.run_transaction(ask)


def test_transaction_on_a_killed_connection_is_run_again_on_a_new_one(db, make_user, mysql_database):
    alice = make_user('alice')
    killed = connection_id(db)
    killer = raw_connection(mysql_database)
    with killer.cursor() as cur:
        cur.execute(f'KILL CONNECTION {int(killed)}')
    killer.close()

    assert db.user_by_name('alice')['id'] == alice.id
    assert connection_id(db) != killed


def test_schema_enums_hold_exactly_the_statuses_outcomes_and_priorities_of_tasks_py():
    schema = (ROOT / 'schema.sql').read_text()

    def enum_of(column):
        values = re.search(rf'\n\s*{column}\s+ENUM\(([^)]*)\)', schema).group(1)
        return tuple(value.strip().strip("'") for value in values.split(','))

    assert enum_of('status') == tasks.STATUSES
    assert enum_of('outcome') == tasks.OUTCOMES
    assert enum_of('priority') == tasks.PRIORITIES


def test_initialize_adds_the_topics_and_note_columns_to_a_database_made_before_them(db, mysql_database):
    """A database from before issue 15 lacks publish_tasks.topics and .result_note; applying
    schema.sql again (what `topn.py initdb` does) adds them and keeps the rows."""
    def columns():
        with db.transaction() as cur:
            cur.execute("SELECT column_name AS name FROM information_schema.columns "
                        "WHERE table_schema = %s AND table_name = 'publish_tasks'", (mysql_database,))
            return {row['name'] for row in cur.fetchall()}

    with db.transaction() as cur:
        cur.execute('ALTER TABLE publish_tasks DROP COLUMN topics, DROP COLUMN result_note')
    try:
        assert not {'topics', 'result_note'} & columns()
    finally:
        db.initialize()

    assert {'topics', 'result_note'} <= columns()
