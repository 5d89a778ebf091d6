"""Pipeline benchmark: how many noop tasks per second TOP_N moves end to end, and how
fairly it shares the worker slots between users.

    .venv/bin/python bench/pipeline.py --runs 3
    .venv/bin/python bench/pipeline.py --scenarios bulk --runs 1 --bulk-users 10 --bulk-per-user 20

Every run starts the real service (`topn.py serve`, as operators run it) on a free
loopback port against a throwaway MySQL database and Redis key prefix, creates its users
with `topn.py adduser`, drives it only through the JSON API, and always stops it and
removes the database and the keys afterwards. A warm-up burst from its own user runs
first, so that connections opened on first use (one per web thread and per worker slot)
are not measured. Times come from the task rows (MySQL's clock), except where a figure
is called client-side.

- team: 10 users send one batch of 10 noop tasks each, all at once.
- bulk: many users (100 x 100 tasks by default, batches of 10) submitted from a few
  client threads as fast as the API accepts them, per-user limits raised.
- fairness: TOPN_NOOP_DELAY=1; user A sends 10 tasks, then user B one. B should wait
  about one task length and at most one of A's turns (A's 9th task may start first,
  round-robin puts B right after it), so B starts before A's backlog is done.

Prints one JSON object to stdout (per-run figures and their medians, machine facts,
settings); progress goes to stderr; the service logs stay in a temp directory.
TOPN_* variables in the environment (TOPN_WORKERS, ...) are passed on to the service.
"""

import argparse
import concurrent.futures
import contextlib
import json
import pathlib
import queue
import sys
import tempfile
import threading
import time

from harness import (SERVICE_DEFAULTS, Client, code_under_test, completion_timeout, inherited_settings, is_error_line,
                     log, machine_facts, medians, percentile, repeat_runs, running_service, timestamp,
                     wait_until_succeeded, warm_up)

BATCH_SIZE = 10
TEAM_USERS, TEAM_TASKS = 10, 10
BULK_LIMITS = {'TOPN_USER_MAX_ACTIVE': '1000', 'TOPN_USER_RATE': '100000', 'TOPN_USER_RATE_WINDOW': '60'}
BULK_CLIENTS = 4
FAIRNESS_A_TASKS = 10


# -- figures from task rows --------------------------------------------------------------------

def pipeline_figures(rows):
    """End-to-end rate and dispatch latency (started_at - created_at) from server timestamps."""
    succeeded = [row for row in rows if row['status'] == 'success']
    if len(succeeded) != len(rows):
        raise RuntimeError(f'{len(rows) - len(succeeded)} of {len(rows)} tasks did not succeed')
    created = [timestamp(row['created_at']) for row in rows]
    started = [timestamp(row['started_at']) for row in rows]
    completed = [timestamp(row['completed_at']) for row in rows]
    span = max(completed) - min(created)
    dispatch_ms = [1000 * (s - c) for s, c in zip(started, created)]
    return {
        'tasks': len(rows),
        'server_span_s': round(span, 3),
        'server_tasks_per_s': round(len(rows) / span, 1),
        'dispatch_p50_ms': round(percentile(dispatch_ms, 50), 1),
        'dispatch_p99_ms': round(percentile(dispatch_ms, 99), 1),
        'retries': sum(row['retry_count'] for row in rows),
    }


# -- scenarios ----------------------------------------------------------------------------------

def team(service, client, args):
    tokens = service.add_users([f'team{i}' for i in range(TEAM_USERS)])
    go = threading.Barrier(TEAM_USERS)

    def submit(token):
        go.wait()
        sent = time.monotonic()
        return sent, client.create_batch(token, TEAM_TASKS)

    with concurrent.futures.ThreadPoolExecutor(TEAM_USERS) as pool:
        submitted = list(pool.map(submit, tokens))
    first_sent = min(sent for sent, _ in submitted)
    seen_done = wait_until_succeeded(client, {token: TEAM_TASKS for token in tokens}, 0.01,
                                     completion_timeout(TEAM_USERS * TEAM_TASKS))
    rows = [row for token, (_, ids) in zip(tokens, submitted) for row in client.task_rows(token, ids)]
    client_wall = seen_done - first_sent
    return {**pipeline_figures(rows), 'client_wall_s': round(client_wall, 3),
            'client_tasks_per_s': round(len(rows) / client_wall, 1)}


def bulk(service, client, args):
    users, per_user = args.bulk_users, args.bulk_per_user
    log(f'  creating {users} users')
    tokens = service.add_users([f'bulk{i}' for i in range(users)])
    batches = [(token, min(BATCH_SIZE, per_user - start))
               for start in range(0, per_user, BATCH_SIZE) for token in tokens]
    log(f'  submitting {users * per_user} tasks in {len(batches)} batches from {BULK_CLIENTS} threads')
    started = time.monotonic()
    task_ids = submit_all(client, batches)
    submit_time = time.monotonic() - started
    log(f'  submitted in {submit_time:.1f} s; waiting for completion')
    wait_until_succeeded(client, {token: per_user for token in tokens}, 0.5, completion_timeout(users * per_user))
    rows = [row for token in tokens for row in client.task_rows(token, task_ids[token])]
    return {**pipeline_figures(rows), 'submit_s': round(submit_time, 3),
            'submit_tasks_per_s': round(len(rows) / submit_time, 1)}


def submit_all(client, batches):
    """Send (token, size) batches from BULK_CLIENTS threads; returns {token: task ids}."""
    work = queue.SimpleQueue()
    for batch in batches:
        work.put(batch)
    task_ids = {token: [] for token, _ in batches}

    def send():
        with contextlib.suppress(queue.Empty):
            while True:
                token, size = work.get_nowait()
                task_ids[token].extend(client.create_batch(token, size))

    with concurrent.futures.ThreadPoolExecutor(BULK_CLIENTS) as pool:
        try:
            for future in [pool.submit(send) for _ in range(BULK_CLIENTS)]:
                future.result()
        except BaseException:
            drain(work)
            raise
    return task_ids


def drain(work):
    """Leave the sender threads nothing more to send, so an error or Ctrl-C stops them."""
    with contextlib.suppress(queue.Empty):
        while True:
            work.get_nowait()


def fairness(service, client, args):
    token_a, token_b = service.add_users(['fair_a', 'fair_b'])
    ids_a = client.create_batch(token_a, FAIRNESS_A_TASKS, 'A')
    ids_b = client.create_batch(token_b, 1, 'B')
    wait_until_succeeded(client, {token_a: len(ids_a), token_b: 1}, 0.1, completion_timeout(FAIRNESS_A_TASKS + 1))
    rows_a = client.task_rows(token_a, ids_a)
    row_b, = client.task_rows(token_b, ids_b)
    a_starts = sorted(timestamp(row['started_at']) for row in rows_a)
    b_start = timestamp(row_b['started_at'])
    a_span = max(timestamp(row['completed_at']) for row in rows_a) - min(timestamp(row['created_at']) for row in rows_a)
    b_created = timestamp(row_b['created_at'])
    turns_waited = sum(b_created < start < b_start for start in a_starts)
    return {
        'b_wait_s': round(b_start - b_created, 3),
        'a_total_s': round(a_span, 3),
        'b_start_rank': 1 + sum(start <= b_start for start in a_starts),
        'a_tasks_started_while_b_waited': turns_waited,
        'b_within_one_turn': turns_waited <= 1,
        'b_started_before_a_backlog_ended': b_start < a_starts[-1],
    }


SCENARIOS = {
    'team': (team, {'TOPN_NOOP_DELAY': '0'}),
    'bulk': (bulk, {'TOPN_NOOP_DELAY': '0', **BULK_LIMITS}),
    'fairness': (fairness, {'TOPN_NOOP_DELAY': '1'}),
}


# -- running and reporting ------------------------------------------------------------------------

def service_settings(scenario):
    """Bench defaults, then the caller's TOPN_* variables, then what the scenario needs."""
    return {**SERVICE_DEFAULTS, **inherited_settings(), **SCENARIOS[scenario][1]}


def run_once(scenario, number, args, log_dir):
    measure = SCENARIOS[scenario][0]
    log_path = log_dir / f'{scenario}-{number}.log'
    with running_service(service_settings(scenario), log_path) as service:
        client = Client(service.url)
        warm_up(service, client)
        started = time.monotonic()
        figures = measure(service, client, args)
        figures['run_s'] = round(time.monotonic() - started, 1)
        figures['refusals'] = {str(status): n for status, n in sorted(client.refusals.items())}
    lines = service.logged_lines()
    figures['service_log_warnings'] = sum(' WARNING ' in line for line in lines)
    figures['service_log_errors'] = sum(map(is_error_line, lines))
    for line in lines[:5]:
        log(f'  service log: {line}')
    log(f'{scenario}: {json.dumps(figures)}')
    return figures


def run_scenario(scenario, args, log_dir):
    runs = repeat_runs(args.runs, lambda number: run_once(scenario, number, args, log_dir), f'{scenario}: run')
    return {'runs': runs, 'median': medians(runs), 'service_settings': service_settings(scenario)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Benchmark the TOP_N pipeline end to end with noop tasks.')
    parser.add_argument('--scenarios', default='team,bulk,fairness',
                        help='comma-separated, from: ' + ', '.join(SCENARIOS))
    parser.add_argument('--runs', type=int, default=3, help='runs per scenario, each on a fresh service')
    parser.add_argument('--bulk-users', type=int, default=100)
    parser.add_argument('--bulk-per-user', type=int, default=100)
    args = parser.parse_args(argv)
    args.scenarios = [name.strip() for name in args.scenarios.split(',') if name.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f'unknown scenarios: {", ".join(sorted(unknown))}')
    return args


def main(argv=None):
    args = parse_args(argv)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-'))
    log(f'service logs go to {log_dir}')
    started = time.monotonic()
    report = {'machine': machine_facts(), 'code': code_under_test(), 'service_logs': str(log_dir),
              'settings': {'runs': args.runs, 'bulk_users': args.bulk_users, 'bulk_per_user': args.bulk_per_user,
                           'bulk_client_threads': BULK_CLIENTS, 'batch_size': BATCH_SIZE}}
    try:
        report['scenarios'] = {scenario: run_scenario(scenario, args, log_dir) for scenario in args.scenarios}
    except KeyboardInterrupt:
        log('interrupted; the service was stopped and its database and Redis keys removed')
        return 130
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
