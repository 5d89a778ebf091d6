"""Everything that talks to MySQL.

Connections are per thread (pymysql connections are not thread-safe) and are opened
lazily, so a process that forks opens its own after the fork. A transaction that finds
its connection dead before COMMIT (MySQL restarted, connection killed) is run again
once on a new connection; when MySQL stays away, `DatabaseUnavailable` goes up to the
caller's boundary (the API answers 503, a worker backs off and tries again).

Every statement is parameterized. Functions that act for a user take that user's id
and put it in the WHERE clause, so one user can never reach another user's rows.
Times are UTC: each session runs with time_zone '+00:00' and MySQL's clock is the only
clock that stamps a task.
"""

import contextlib
import functools
import itertools
import json
import pathlib
import random
import threading
import time

import pymysql
import pymysql.cursors

from tasks import ACTIVE, FINISHED, SCHEDULED

SCHEMA_PATH = pathlib.Path(__file__).with_name('schema.sql')
CONNECTION_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError, ConnectionError, OSError)
CONFLICT_CODES = (1205, 1213)  # lock wait timeout, deadlock: the server rolled back, the connection lives
CONFLICT_RETRIES = 3
RESULT_NOTE_MAX_CHARS = 1000  # publish_tasks.result_note


class DatabaseUnavailable(Exception):
    """MySQL did not answer. Raised before COMMIT, nothing was written; raised by the
    COMMIT itself, the outcome is unknown (every state change is a conditional UPDATE,
    so doing it again is harmless)."""


class ConnectionLost(DatabaseUnavailable):
    """The connection died before COMMIT: the server rolled the transaction back, so
    running it again on a new connection is safe."""


class TransactionConflict(DatabaseUnavailable):
    """InnoDB chose this transaction as a deadlock victim (or its lock wait timed out)
    and rolled it back; the connection is fine and running it again is safe."""


def host_of(worker_id):
    """The host part of a worker id (`host:pid`)."""
    return worker_id.rpartition(':')[0] or worker_id


def reconnects(method):
    """Run a one-transaction method again when MySQL rolled it back: once on a fresh
    connection when the old one turns out to be dead (a MySQL restart or a killed
    connection looks like this), a few times when it lost a deadlock."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lost_connection = False
        for conflicts in itertools.count():
            try:
                return method(self, *args, **kwargs)
            except ConnectionLost:
                if lost_connection:
                    raise
                lost_connection = True
            except TransactionConflict:
                if conflicts >= CONFLICT_RETRIES:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * (conflicts + 1))
    return wrapper


class Database:
    def __init__(self, params, connect_timeout=5):
        self.params = dict(params)
        self.connect_timeout = connect_timeout
        self._local = threading.local()

    def _open(self, database=True):
        params = dict(self.params)
        if not database:
            params.pop('database')
        try:
            return pymysql.connect(
                **params, charset='utf8mb4', autocommit=False,
                cursorclass=pymysql.cursors.DictCursor,
                connect_timeout=self.connect_timeout, read_timeout=60, write_timeout=60,
                init_command="SET time_zone = '+00:00'")
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(
                f"cannot connect to MySQL at {params['host']}:{params['port']}: {error}") from error

    def _connection(self):
        conn = getattr(self._local, 'conn', None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def close(self):
        conn = getattr(self._local, 'conn', None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """Yield a cursor; commit when the block ends, roll back when it raises."""
        conn = self._connection()
        committing = False
        try:
            with conn.cursor() as cur:
                yield cur
            committing = True
            conn.commit()
        except pymysql.err.OperationalError as error:
            if error.args and error.args[0] in CONFLICT_CODES:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    conn.rollback()
                raise TransactionConflict(f'MySQL rolled the transaction back: {error}') from error
            self.close()
            raise (DatabaseUnavailable if committing else ConnectionLost)(f'MySQL failed: {error}') from error
        except CONNECTION_ERRORS as error:
            self.close()
            if committing:
                raise DatabaseUnavailable(f'lost the MySQL connection while committing: {error}') from error
            raise ConnectionLost(f'lost the MySQL connection: {error}') from error
        except BaseException:
            with contextlib.suppress(*CONNECTION_ERRORS):
                conn.rollback()
            raise

    @reconnects
    def run_transaction(self, work):
        """`work(cursor)` in one transaction, run again on a new connection if the old one was dead."""
        with self.transaction() as cur:
            return work(cur)

    @reconnects
    def ping(self):
        with self.transaction() as cur:
            cur.execute('SELECT 1')

    def initialize(self):
        """Create the database if it is missing, then apply schema.sql (idempotent)."""
        conn = self._open(database=False)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{_identifier(self.params['database'])}` "
                    'CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci')
        finally:
            conn.close()
        with self.transaction() as cur:
            for statement in schema_statements():
                cur.execute(statement)

    def drop_database(self):
        conn = self._open(database=False)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{_identifier(self.params['database'])}`")
        finally:
            conn.close()

    # -- users -----------------------------------------------------------------------

    @reconnects
    def create_user(self, name, password_hash, token_hash, is_admin=False, is_vip=False):
        with self.transaction() as cur:
            cur.execute(
                'INSERT INTO users (name, password_hash, token_hash, is_admin, is_vip) '
                'VALUES (%s, %s, %s, %s, %s)',
                (name, password_hash, token_hash, int(is_admin), int(is_vip)))
            return cur.lastrowid

    @reconnects
    def set_user_token(self, user_id, token_hash):
        with self.transaction() as cur:
            cur.execute('UPDATE users SET token_hash = %s WHERE id = %s', (token_hash, user_id))

    @reconnects
    def set_user_password(self, user_id, password_hash):
        with self.transaction() as cur:
            cur.execute('UPDATE users SET password_hash = %s WHERE id = %s', (password_hash, user_id))

    @reconnects
    def user_by_token_hash(self, token_hash):
        with self.transaction() as cur:
            cur.execute('SELECT id, name, is_admin, is_vip FROM users WHERE token_hash = %s', (token_hash,))
            return cur.fetchone()

    @reconnects
    def user_by_name(self, name):
        with self.transaction() as cur:
            cur.execute('SELECT id, name, is_admin, is_vip FROM users WHERE name = %s', (name,))
            return cur.fetchone()

    @reconnects
    def user_names(self, user_ids):
        if not user_ids:
            return {}
        with self.transaction() as cur:
            cur.execute('SELECT id, name FROM users WHERE id IN %s', (tuple(user_ids),))
            return {row['id']: row['name'] for row in cur.fetchall()}

    @reconnects
    def vip_user_ids(self):
        with self.transaction() as cur:
            cur.execute('SELECT id FROM users WHERE is_vip = 1')
            return {row['id'] for row in cur.fetchall()}

    # -- platform accounts -------------------------------------------------------------

    @reconnects
    def save_account(self, user_id, platform, secret):
        with self.transaction() as cur:
            cur.execute(
                'INSERT INTO platform_accounts (user_id, platform, secret) VALUES (%s, %s, %s) '
                'ON DUPLICATE KEY UPDATE secret = VALUES(secret), checked_at = NULL, check_ok = NULL, '
                'check_detail = NULL',
                (user_id, platform, secret))

    @reconnects
    def replace_account_secret(self, user_id, platform, secret):
        """The same login with fresher parts (session cookies a task got): its check stays."""
        with self.transaction() as cur:
            cur.execute('UPDATE platform_accounts SET secret = %s WHERE user_id = %s AND platform = %s',
                        (secret, user_id, platform))
            return cur.rowcount == 1

    @reconnects
    def account_secret(self, user_id, platform):
        with self.transaction() as cur:
            cur.execute('SELECT secret FROM platform_accounts WHERE user_id = %s AND platform = %s',
                        (user_id, platform))
            row = cur.fetchone()
            return row['secret'] if row else None

    @reconnects
    def accounts_of(self, user_id):
        """A user's platform logins without their secrets."""
        with self.transaction() as cur:
            cur.execute('SELECT platform, checked_at, check_ok, check_detail, updated_at FROM platform_accounts '
                        'WHERE user_id = %s ORDER BY platform', (user_id,))
            return cur.fetchall()

    @reconnects
    def delete_account(self, user_id, platform):
        with self.transaction() as cur:
            cur.execute('DELETE FROM platform_accounts WHERE user_id = %s AND platform = %s', (user_id, platform))
            return cur.rowcount == 1

    @reconnects
    def record_account_check(self, user_id, platform, ok, detail):
        with self.transaction() as cur:
            cur.execute('UPDATE platform_accounts SET checked_at = NOW(3), check_ok = %s, check_detail = %s '
                        'WHERE user_id = %s AND platform = %s', (int(ok), detail[:500], user_id, platform))

    @reconnects
    def reserve_publish_slot(self, user_id, platform, interval):
        """The coarse half of pacing, when a task starts: take the account's next publish
        slot so that tasks of one account start `interval` apart (the others are deferred
        without holding a browser). Returns 0 when taken, else the seconds until the slot
        is free. No account row means no pacing."""
        with self.transaction() as cur:
            cur.execute(
                'UPDATE platform_accounts SET next_publish_at = NOW(3) + INTERVAL %s MICROSECOND '
                'WHERE user_id = %s AND platform = %s AND (next_publish_at IS NULL OR next_publish_at <= NOW(3))',
                (int(interval * 1e6), user_id, platform))
            if cur.rowcount == 1:
                return 0.0
            cur.execute(
                'SELECT TIMESTAMPDIFF(MICROSECOND, NOW(3), next_publish_at) / 1e6 AS wait '
                'FROM platform_accounts WHERE user_id = %s AND platform = %s', (user_id, platform))
            row = cur.fetchone()
            return max(0.0, float(row['wait'])) if row and row['wait'] is not None else 0.0

    @reconnects
    def claim_submit_moment(self, user_id, platform, interval):
        """The precise half of pacing: the submit click itself. Returns 0 when this submit
        may go now (and records it), else the seconds since the last submit still missing."""
        with self.transaction() as cur:
            cur.execute(
                'UPDATE platform_accounts SET last_submit_at = NOW(3) WHERE user_id = %s AND platform = %s '
                'AND (last_submit_at IS NULL OR last_submit_at <= NOW(3) - INTERVAL %s MICROSECOND)',
                (user_id, platform, int(interval * 1e6)))
            if cur.rowcount == 1:
                return 0.0
            cur.execute(
                'SELECT TIMESTAMPDIFF(MICROSECOND, NOW(3), last_submit_at + INTERVAL %s MICROSECOND) / 1e6 AS wait '
                'FROM platform_accounts WHERE user_id = %s AND platform = %s',
                (int(interval * 1e6), user_id, platform))
            row = cur.fetchone()
            return max(0.0, float(row['wait'])) if row and row['wait'] is not None else 0.0

    # -- admission (called inside one transaction by the scheduler) -------------------

    @staticmethod
    def lock_user(cur, user_id):
        """Serialize admissions of one user: the row lock is held until commit."""
        cur.execute('SELECT id, is_vip FROM users WHERE id = %s FOR UPDATE', (user_id,))
        return cur.fetchone()

    @staticmethod
    def count_active(cur, user_id, platform):
        """The user's tasks on `platform` that are queued or running (scheduled ones are not)."""
        cur.execute(
            'SELECT COUNT(*) AS n FROM publish_tasks WHERE user_id = %s AND platform = %s AND status IN %s',
            (user_id, platform, ACTIVE))
        return cur.fetchone()['n']

    @staticmethod
    def count_scheduled(cur, user_id):
        cur.execute("SELECT COUNT(*) AS n FROM publish_tasks WHERE user_id = %s AND status = 'scheduled'",
                    (user_id,))
        return cur.fetchone()['n']

    @staticmethod
    def created_in_window(cur, user_id, platform, seconds):
        """How many tasks on `platform` the user created in the last `seconds`, and when the
        oldest of them leaves the window."""
        cur.execute(
            'SELECT COUNT(*) AS n, '
            'TIMESTAMPDIFF(MICROSECOND, NOW(3), MIN(created_at) + INTERVAL %s SECOND) / 1e6 AS leaves_in '
            'FROM publish_tasks WHERE user_id = %s AND platform = %s AND created_at > NOW(3) - INTERVAL %s SECOND',
            (seconds, user_id, platform, seconds))
        row = cur.fetchone()
        return row['n'], float(row['leaves_in'] or 0)

    @staticmethod
    def platforms_with_account(cur, user_id, platforms):
        if not platforms:
            return set()
        cur.execute('SELECT platform FROM platform_accounts WHERE user_id = %s AND platform IN %s',
                    (user_id, tuple(platforms)))
        return {row['platform'] for row in cur.fetchall()}

    @staticmethod
    def owned_article_ids(cur, user_id, article_ids):
        if not article_ids:
            return set()
        cur.execute('SELECT id FROM articles WHERE user_id = %s AND id IN %s', (user_id, tuple(article_ids)))
        return {row['id'] for row in cur.fetchall()}

    @staticmethod
    def insert_tasks(cur, rows):
        """Rows with a `publish_at` (naive UTC) are scheduled for then; the others are pending."""
        cur.executemany(
            'INSERT INTO publish_tasks (task_id, user_id, article_id, article_title, article_content, '
            'platform, priority, max_retries, topics, status, publish_at, batch_id, article_index) '
            'VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)',
            [(r['task_id'], r['user_id'], r['article_id'], r['title'], r['content'],
              r['platform'], r['priority'], r['max_retries'], _json_or_null(r.get('topics')),
              SCHEDULED if r.get('publish_at') else 'pending', r.get('publish_at'),
              r.get('batch_id'), r.get('article_index')) for r in rows])

    @staticmethod
    def insert_pictures(cur, task_id, pictures):
        """Store the pictures a task references by name; bytes once per content."""
        if not pictures:
            return
        cur.executemany('INSERT IGNORE INTO pictures (sha256, mime, size, data) VALUES (%s, %s, %s, %s)',
                        [(p.sha256, p.mime, len(p.data), p.data) for p in pictures])
        cur.executemany('INSERT INTO task_pictures (task_id, name, sha256) VALUES (%s, %s, %s)',
                        [(task_id, p.source, p.sha256) for p in pictures])

    # -- reading tasks for a user ----------------------------------------------------

    @reconnects
    def tasks_by_ids(self, user_id, task_ids):
        if not task_ids:
            return []
        with self.transaction() as cur:
            cur.execute(
                f'SELECT {TASK_COLUMNS} FROM publish_tasks WHERE user_id = %s AND task_id IN %s ORDER BY id',
                (user_id, tuple(task_ids)))
            return cur.fetchall()

    def task_for_user(self, user_id, task_id):
        rows = self.tasks_by_ids(user_id, [task_id])
        return rows[0] if rows else None

    @reconnects
    def history(self, task_id):
        with self.transaction() as cur:
            cur.execute(
                'SELECT attempt, host_id AS host, worker_id AS worker, worker_id, started_at, ended_at, outcome, '
                'error, result_url FROM publish_history WHERE task_id = %s ORDER BY attempt', (task_id,))
            return cur.fetchall()

    # -- user actions on tasks -------------------------------------------------------

    @reconnects
    def cancel_queued(self, user_id, task_id):
        """Cancel a task that no worker holds (queued or scheduled). True when this call cancelled it."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET status = 'cancelled', completed_at = NOW(3), next_attempt_at = NULL "
                "WHERE user_id = %s AND task_id = %s AND status IN ('pending', 'retry', 'scheduled')",
                (user_id, task_id))
            return cur.rowcount == 1

    @reconnects
    def request_cancel(self, user_id, task_id):
        """Ask the worker running a task to stop at its next step. True when the task is running."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET cancel_requested = 1 "
                "WHERE user_id = %s AND task_id = %s AND status = 'running'",
                (user_id, task_id))
            return cur.rowcount == 1

    @staticmethod
    def task_status(cur, user_id, task_id):
        """(status, platform) of the user's task, locked until commit; (None, None) when there is none."""
        cur.execute('SELECT status, platform FROM publish_tasks WHERE user_id = %s AND task_id = %s FOR UPDATE',
                    (user_id, task_id))
        row = cur.fetchone()
        return (row['status'], row['platform']) if row else (None, None)

    @staticmethod
    def reopen_task(cur, user_id, task_id):
        """Turn a failed or cancelled task back into a pending one with its retries restored."""
        cur.execute(
            "UPDATE publish_tasks SET status = 'pending', retry_count = 0, progress = 0, result_url = NULL, "
            "error_message = NULL, result_note = NULL, completed_at = NULL, next_attempt_at = NULL, "
            "cancel_requested = 0 "
            "WHERE user_id = %s AND task_id = %s AND status IN ('failed', 'cancelled')",
            (user_id, task_id))
        return cur.rowcount == 1

    # -- hosts and their remote browser sessions ----------------------------------------

    @reconnects
    def agreed_setting(self, name, value):
        """The value of `name` every host agrees on: the first host's, stored if none is yet."""
        with self.transaction() as cur:
            cur.execute('INSERT IGNORE INTO cluster_settings (name, value) VALUES (%s, %s)', (name, value))
            cur.execute('SELECT value FROM cluster_settings WHERE name = %s', (name,))
            return cur.fetchone()['value']

    @reconnects
    def host(self, host_id):
        """The host row of `host_id` with `silent_seconds` since its heartbeat, or None."""
        with self.transaction() as cur:
            cur.execute('SELECT machine, pid, stopped_at, TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(3)) / 1e6 '
                        'AS silent_seconds FROM hosts WHERE host_id = %s', (host_id,))
            row = cur.fetchone()
        if row:
            row['silent_seconds'] = float(row['silent_seconds'])
        return row

    @reconnects
    def join_as_host(self, host_id, machine, pid, web):
        with self.transaction() as cur:
            cur.execute(
                'INSERT INTO hosts (host_id, machine, pid, web, workers, started_at, heartbeat_at) '
                'VALUES (%s, %s, %s, %s, JSON_ARRAY(), NOW(3), NOW(3)) ON DUPLICATE KEY UPDATE '
                'machine = VALUES(machine), pid = VALUES(pid), web = VALUES(web), workers = JSON_ARRAY(), '
                'started_at = NOW(3), heartbeat_at = NOW(3), stopped_at = NULL',
                (host_id, machine, pid, int(web)))

    @reconnects
    def host_heartbeat(self, host_id, worker_ids):
        with self.transaction() as cur:
            cur.execute('UPDATE hosts SET heartbeat_at = NOW(3), workers = %s WHERE host_id = %s',
                        (json.dumps(sorted(worker_ids)), host_id))

    @reconnects
    def host_stopped(self, host_id):
        with self.transaction() as cur:
            cur.execute('UPDATE hosts SET stopped_at = NOW(3), workers = JSON_ARRAY() WHERE host_id = %s',
                        (host_id,))

    @reconnects
    def hosts(self, stopped_within):
        """Every host with `silent_seconds` since its last heartbeat; stopped ones only if they
        stopped less than `stopped_within` seconds ago."""
        with self.transaction() as cur:
            cur.execute(
                'SELECT host_id, machine, pid, web, workers, started_at, heartbeat_at, stopped_at, '
                'TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(3)) / 1e6 AS silent_seconds FROM hosts '
                'WHERE stopped_at IS NULL OR stopped_at > NOW(3) - INTERVAL %s SECOND ORDER BY host_id',
                (int(stopped_within),))
            rows = cur.fetchall()
        for row in rows:
            row['workers'] = json.loads(row['workers'] or '[]')
            row['silent_seconds'] = float(row['silent_seconds'])
        return rows

    @reconnects
    def session_started(self, session_id, worker_id):
        with self.transaction() as cur:
            cur.execute('INSERT IGNORE INTO browser_sessions (session_id, host_id, worker_id) VALUES (%s, %s, %s)',
                        (session_id, host_of(worker_id), worker_id))

    @reconnects
    def session_ended(self, session_id):
        with self.transaction() as cur:
            cur.execute('DELETE FROM browser_sessions WHERE session_id = %s', (session_id,))

    @reconnects
    def sessions_of_worker(self, worker_id):
        with self.transaction() as cur:
            cur.execute('SELECT session_id FROM browser_sessions WHERE worker_id = %s', (worker_id,))
            return [row['session_id'] for row in cur.fetchall()]

    @reconnects
    def sessions_of_host(self, host_id):
        with self.transaction() as cur:
            cur.execute('SELECT session_id FROM browser_sessions WHERE host_id = %s', (host_id,))
            return [row['session_id'] for row in cur.fetchall()]

    @reconnects
    def sessions_of_silent_hosts(self, silent_for):
        """Remote sessions held by hosts stopped or silent for `silent_for` seconds, or unknown."""
        with self.transaction() as cur:
            cur.execute(
                'SELECT s.session_id, s.host_id FROM browser_sessions s LEFT JOIN hosts h USING (host_id) '
                'WHERE h.host_id IS NULL OR h.stopped_at IS NOT NULL '
                'OR h.heartbeat_at < NOW(3) - INTERVAL %s MICROSECOND', (int(silent_for * 1e6),))
            return cur.fetchall()

    # -- worker side: attempts and leases --------------------------------------------

    @reconnects
    def start_attempt(self, task_id, worker_id, lease_ttl):
        """Take a queued task for `worker_id`. None when it is not claimable (already
        running elsewhere, cancelled, finished, or a retry whose backoff has not passed):
        that is what keeps a task that sits twice in Redis from running twice."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET status = 'running', attempt = attempt + 1, progress = 0, "
                "worker_id = %s, lease_expires_at = NOW(3) + INTERVAL %s MICROSECOND, "
                "started_at = NOW(3), next_attempt_at = NULL, cancel_requested = 0 "
                "WHERE task_id = %s AND status IN ('pending', 'retry') "
                "AND (next_attempt_at IS NULL OR next_attempt_at <= NOW(3))",
                (worker_id, int(lease_ttl * 1e6), task_id))
            if cur.rowcount != 1:
                return None
            cur.execute(f'SELECT {TASK_COLUMNS}, article_content, attempt, platform_ref '
                        'FROM publish_tasks WHERE task_id = %s',
                        (task_id,))
            task = cur.fetchone()
            task['topics'] = topics_of(task['topics'])
            cur.execute(
                'INSERT INTO publish_history (task_id, attempt, worker_id, host_id, started_at) '
                'VALUES (%s, %s, %s, %s, %s)',
                (task_id, task['attempt'], worker_id, host_of(worker_id), task['started_at']))
            task['earlier_attempts'] = []
            if task['attempt'] > 1:
                cur.execute(
                    "SELECT outcome, started_at FROM publish_history WHERE task_id = %s AND attempt < %s "
                    "ORDER BY attempt", (task_id, task['attempt']))
                task['earlier_attempts'] = cur.fetchall()
            return task

    @reconnects
    def task_pictures(self, task_id):
        """[(name, mime, bytes)] of the pictures a task references by name."""
        with self.transaction() as cur:
            cur.execute('SELECT t.name, p.mime, p.data FROM task_pictures t JOIN pictures p USING (sha256) '
                        'WHERE t.task_id = %s ORDER BY t.name', (task_id,))
            return [(row['name'], row['mime'], row['data']) for row in cur.fetchall()]

    @reconnects
    def rehosted_picture(self, user_id, platform, place, sha256):
        """The platform URL of a picture this account uploaded there before, or None."""
        with self.transaction() as cur:
            cur.execute('SELECT url FROM rehosted_pictures WHERE user_id = %s AND platform = %s AND place = %s '
                        'AND sha256 = %s', (user_id, platform, place[:255], sha256))
            row = cur.fetchone()
            return row['url'] if row else None

    @reconnects
    def remember_rehosted_picture(self, user_id, platform, place, sha256, url):
        with self.transaction() as cur:
            cur.execute('INSERT INTO rehosted_pictures (user_id, platform, place, sha256, url) '
                        'VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE url = VALUES(url)',
                        (user_id, platform, place[:255], sha256, url))

    @reconnects
    def set_progress(self, task_id, attempt, progress):
        """Record progress of a running attempt. Returns whether a cancel was requested,
        or None when the attempt no longer owns the task (the reaper took it back)."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET progress = %s WHERE task_id = %s AND attempt = %s AND status = 'running'",
                (progress, task_id, attempt))
            cur.execute(
                "SELECT cancel_requested FROM publish_tasks WHERE task_id = %s AND attempt = %s AND status = 'running'",
                (task_id, attempt))
            row = cur.fetchone()
            return None if row is None else bool(row['cancel_requested'])

    @reconnects
    def set_platform_ref(self, task_id, attempt, ref):
        with self.transaction() as cur:
            cur.execute("UPDATE publish_tasks SET platform_ref = %s WHERE task_id = %s AND attempt = %s "
                        "AND status = 'running'", (ref, task_id, attempt))
            return cur.rowcount == 1

    @reconnects
    def renew_leases(self, worker_id, lease_ttl):
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET lease_expires_at = NOW(3) + INTERVAL %s MICROSECOND "
                "WHERE worker_id = %s AND status = 'running'",
                (int(lease_ttl * 1e6), worker_id))
            return cur.rowcount

    @reconnects
    def expire_leases_of(self, worker_id):
        """A worker is known dead: let the reaper take its tasks back now, not at lease expiry."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET lease_expires_at = NOW(3) WHERE worker_id = %s AND status = 'running'",
                (worker_id,))
            return cur.rowcount

    @reconnects
    def end_attempt(self, task_id, attempt, status, outcome, error=None, result_url=None, retry_in=None,
                    note=None):
        """Move a running attempt to its next state: success, failed, cancelled, or retry
        (then `retry_in` seconds of backoff); `note` is what a published task's user should
        know. False when the attempt no longer owns the task, in which case nothing changed."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET status = %s, error_message = %s, result_note = %s, "
                "result_url = COALESCE(%s, result_url), "
                "progress = IF(%s = 'success', 100, progress), "
                "retry_count = retry_count + IF(%s = 'retry', 1, 0), "
                "next_attempt_at = IF(%s = 'retry', NOW(3) + INTERVAL %s MICROSECOND, NULL), "
                "completed_at = IF(%s IN ('success', 'failed', 'cancelled'), NOW(3), NULL), "
                "worker_id = NULL, lease_expires_at = NULL, cancel_requested = 0 "
                "WHERE task_id = %s AND attempt = %s AND status = 'running'",
                (status, error, note and note[:RESULT_NOTE_MAX_CHARS], result_url, status, status, status,
                 int((retry_in or 0) * 1e6), status, task_id, attempt))
            if cur.rowcount != 1:
                return False
            cur.execute(
                'UPDATE publish_history SET ended_at = NOW(3), outcome = %s, error = %s, result_url = %s '
                'WHERE task_id = %s AND attempt = %s',
                (outcome, error, result_url, task_id, attempt))
            return True

    @reconnects
    def defer_attempt(self, task_id, attempt, delay):
        """Give a claimed task back unattempted (its account must wait for pacing): no
        attempt or retry is counted, and it becomes claimable again after `delay` seconds."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE publish_tasks SET status = 'pending', attempt = attempt - 1, progress = 0, "
                "next_attempt_at = NOW(3) + INTERVAL %s MICROSECOND, worker_id = NULL, lease_expires_at = NULL "
                "WHERE task_id = %s AND attempt = %s AND status = 'running'",
                (int(delay * 1e6), task_id, attempt))
            if cur.rowcount != 1:
                return False
            cur.execute('DELETE FROM publish_history WHERE task_id = %s AND attempt = %s', (task_id, attempt))
            return True

    @reconnects
    def record_evidence(self, task_id, attempt, files):
        """Keep a failed attempt's evidence, {file name: bytes}, and list it on the attempt."""
        with self.transaction() as cur:
            cur.executemany('REPLACE INTO evidence_files (task_id, attempt, name, data) VALUES (%s, %s, %s, %s)',
                            [(task_id, attempt, name, data) for name, data in files.items()])
            cur.execute('UPDATE publish_history SET evidence = %s WHERE task_id = %s AND attempt = %s',
                        (json.dumps([name for name in files]), task_id, attempt))

    @reconnects
    def evidence_file(self, task_id, attempt, name):
        """The bytes of one evidence file, or None."""
        with self.transaction() as cur:
            cur.execute('SELECT data FROM evidence_files WHERE task_id = %s AND attempt = %s AND name = %s',
                        (task_id, attempt, name))
            row = cur.fetchone()
        return bytes(row['data']) if row else None

    @reconnects
    def evidence_of(self, task_ids):
        """{task_id: [(attempt, [file names])]} for the attempts that saved evidence."""
        if not task_ids:
            return {}
        with self.transaction() as cur:
            cur.execute('SELECT task_id, attempt, evidence FROM publish_history '
                        'WHERE task_id IN %s AND evidence IS NOT NULL ORDER BY task_id, attempt',
                        (tuple(task_ids),))
            found = {}
            for row in cur.fetchall():
                found.setdefault(row['task_id'], []).append((row['attempt'], json.loads(row['evidence'])))
            return found

    @reconnects
    def overdue_attempts(self, task_timeout):
        """Running attempts whose lease expired or that ran past the task timeout."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT task_id, user_id, attempt, retry_count, max_retries, worker_id, "
                "lease_expires_at < NOW(3) AS lease_expired "
                "FROM publish_tasks WHERE status = 'running' AND "
                "(lease_expires_at < NOW(3) OR started_at < NOW(3) - INTERVAL %s MICROSECOND)",
                (int(task_timeout * 1e6),))
            return cur.fetchall()

    @reconnects
    def promote_due_scheduled(self, limit=1000):
        """Turn scheduled tasks whose `publish_at` has come into pending ones, and return
        them (task_id, user_id, priority) to be queued. The rows are locked first, so two
        reapers at once promote each task once."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT task_id, user_id, priority FROM publish_tasks "
                "WHERE status = 'scheduled' AND publish_at <= NOW(3) ORDER BY publish_at, id LIMIT %s FOR UPDATE",
                (limit,))
            due = cur.fetchall()
            if due:
                cur.execute("UPDATE publish_tasks SET status = 'pending' WHERE status = 'scheduled' AND task_id IN %s",
                            (tuple(row['task_id'] for row in due),))
            return due

    @reconnects
    def claimable_tasks(self, task_id=None, unchanged_for=0.0):
        """Tasks that should be in Redis (all, or just `task_id` if it is one, or those whose
        row has not changed for `unchanged_for` seconds): task_id, user_id, priority, and
        due_in, the seconds until its backoff ends."""
        where, args = "status IN ('pending', 'retry')", []
        if task_id is not None:
            where += ' AND task_id = %s'
            args.append(task_id)
        if unchanged_for:
            where += ' AND updated_at < NOW(3) - INTERVAL %s MICROSECOND'
            args.append(int(unchanged_for * 1e6))
        with self.transaction() as cur:
            cur.execute(
                "SELECT task_id, user_id, priority, "
                "GREATEST(0, TIMESTAMPDIFF(MICROSECOND, NOW(3), COALESCE(next_attempt_at, NOW(3))) / 1e6) AS due_in "
                f"FROM publish_tasks WHERE {where} ORDER BY id", args)
            return cur.fetchall()

    @reconnects
    def delete_finished_before(self, days, limit=1000):
        """Delete up to `limit` tasks that finished more than `days` ago, with their
        attempts. Returns their ids (their evidence folders go too)."""
        with self.transaction() as cur:
            cur.execute(
                'SELECT task_id FROM publish_tasks WHERE status IN %s AND completed_at < NOW(3) - INTERVAL %s SECOND '
                'ORDER BY completed_at LIMIT %s', (FINISHED, int(days * 86400), limit))
            task_ids = [row['task_id'] for row in cur.fetchall()]
            if task_ids:
                cur.execute('DELETE FROM publish_tasks WHERE task_id IN %s', (tuple(task_ids),))
                cur.execute('DELETE p FROM pictures p LEFT JOIN task_pictures t ON t.sha256 = p.sha256 '
                            'WHERE t.sha256 IS NULL')
            return task_ids

    # -- figures for operators ---------------------------------------------------------

    @reconnects
    def task_figures(self):
        """(tasks by status, users with unfinished tasks, average seconds of a published task)."""
        with self.transaction() as cur:
            cur.execute('SELECT status, COUNT(*) AS n FROM publish_tasks GROUP BY status')
            by_status = {row['status']: row['n'] for row in cur.fetchall()}
            cur.execute(
                "SELECT COUNT(DISTINCT user_id) AS n FROM publish_tasks WHERE status IN %s", (ACTIVE,))
            active_users = cur.fetchone()['n']
            cur.execute(
                "SELECT AVG(TIMESTAMPDIFF(MICROSECOND, started_at, completed_at)) / 1e6 AS avg_seconds "
                "FROM publish_tasks WHERE status = 'success'")
            avg = cur.fetchone()['avg_seconds']
        return by_status, active_users, float(avg) if avg is not None else None

    @reconnects
    def scheduled_figures(self):
        """{user_id: (scheduled tasks, the earliest publish_at)} of users with scheduled tasks."""
        with self.transaction() as cur:
            cur.execute("SELECT user_id, COUNT(*) AS n, MIN(publish_at) AS next_due FROM publish_tasks "
                        "WHERE status = 'scheduled' GROUP BY user_id")
            return {row['user_id']: (row['n'], row['next_due']) for row in cur.fetchall()}

    # -- web pages: sessions, the task table, recent failures ------------------------

    @reconnects
    def login_user(self, name):
        """The user row a login checks, with its password hash (never shown anywhere)."""
        with self.transaction() as cur:
            cur.execute('SELECT id, name, password_hash, is_admin FROM users WHERE name = %s', (name,))
            return cur.fetchone()

    @reconnects
    def create_session(self, user_id, session_hash, csrf_token, ttl):
        """Open a session for `ttl` seconds; expired sessions of anyone are swept on the way."""
        with self.transaction() as cur:
            cur.execute('DELETE FROM web_sessions WHERE expires_at < NOW(3) LIMIT 1000')
            cur.execute(
                'INSERT INTO web_sessions (session_hash, user_id, csrf_token, expires_at) '
                'VALUES (%s, %s, %s, NOW(3) + INTERVAL %s MICROSECOND)',
                (session_hash, user_id, csrf_token, int(ttl * 1e6)))

    @reconnects
    def session_user(self, session_hash):
        """The user of a live session, with the session's CSRF token; None when unknown or expired."""
        with self.transaction() as cur:
            cur.execute(
                'SELECT u.id, u.name, u.is_admin, u.is_vip, s.csrf_token FROM web_sessions s '
                'JOIN users u ON u.id = s.user_id WHERE s.session_hash = %s AND s.expires_at > NOW(3)',
                (session_hash,))
            return cur.fetchone()

    @reconnects
    def delete_session(self, session_hash):
        with self.transaction() as cur:
            cur.execute('DELETE FROM web_sessions WHERE session_hash = %s', (session_hash,))

    @reconnects
    def task_page(self, user_id, status=None, offset=0, limit=20):
        """One page of a user's tasks, newest first (optionally of one status), and how many
        the user has in each status (the filter counts, the page count, and whether anything
        is unfinished), for the API's list and the page's table alike."""
        where, args = 'user_id = %s', [user_id]
        if status:
            where += ' AND status = %s'
            args.append(status)
        with self.transaction() as cur:
            cur.execute('SELECT status, COUNT(*) AS n FROM publish_tasks WHERE user_id = %s GROUP BY status',
                        (user_id,))
            counts = {row['status']: row['n'] for row in cur.fetchall()}
            cur.execute(
                f'SELECT {TASK_COLUMNS}, attempt, cancel_requested FROM publish_tasks WHERE {where} '
                'ORDER BY id DESC LIMIT %s OFFSET %s', args + [limit, offset])
            return cur.fetchall(), counts

    @reconnects
    def recent_failures(self, limit=10):
        """The tasks of any user that failed or wait for a retry, most recently changed first."""
        with self.transaction() as cur:
            cur.execute(
                'SELECT t.task_id, t.article_title, t.platform, t.status, t.error_message, t.retry_count, '
                't.updated_at, u.name AS user_name FROM publish_tasks t JOIN users u ON u.id = t.user_id '
                "WHERE t.status IN ('failed', 'retry') ORDER BY t.updated_at DESC LIMIT %s", (limit,))
            return cur.fetchall()


TASK_COLUMNS = (
    'task_id, user_id, article_id, article_title, platform, priority, status, progress, result_url, '
    'error_message, retry_count, max_retries, created_at, started_at, completed_at, updated_at, '
    'topics, result_note, publish_at, batch_id, article_index')


def _json_or_null(value):
    return None if value is None else json.dumps(value, ensure_ascii=False)


def topics_of(raw):
    """The topics column as a list of names, or None when the user named none."""
    return None if raw is None else json.loads(raw)


def schema_statements():
    lines = [line for line in SCHEMA_PATH.read_text(encoding='utf-8').splitlines()
             if not line.lstrip().startswith('--')]
    return [statement.strip() for statement in '\n'.join(lines).split(';') if statement.strip()]


def _identifier(name):
    if not name.replace('_', '').isalnum():
        raise ValueError(f'unsafe database name {name!r}')
    return name
