"""WordPress benchmark: what publishing through TOP_N's browsers costs over WordPress's own work.

    .venv/bin/python bench/wordpress.py --runs 3
    .venv/bin/python bench/wordpress.py --runs 1 --users 2 --per-user 2

Every run starts a fresh WordPress (Debian's package, tests/wordpress_site.py's `WordPressSite`:
`php -S` with four workers on a loopback address of its own, its own MariaDB database, installed
by its own installer) and publishes the same workload to it twice, one way after the other:

1. service: a fresh `topn.py serve` (bench/harness.py's `Service`: a throwaway MySQL database,
   Redis key prefix and browser namespace, temp TOPN_STATE_DIR and TOPN_BROWSER_ROOT), no
   browser running yet. `--users` users (3), each with a WordPress author of its own stored
   with `topn.py account set NAME wordpress --site URL --username U --password P`, each send one
   batch of `--per-user` articles (5) to platform `wordpress` through the JSON API, all at once.
   Each body is Markdown with headings, a list, a code block, a table, CJK text and emoji.
   `wall_seconds` is max(completed_at) - min(created_at) of the tasks, `publish_seconds_p50`
   the median of completed_at - started_at (server timestamps): the publisher logs in through
   wp-login.php in Chromium (or reuses the session cookies an earlier task saved), then, from
   the page, creates a draft, publishes it and opens its permalink. Then the service is stopped
   and its browser processes are counted and killed.
2. rest: the same number of posts, from other WordPress authors, straight to WordPress's REST
   API with no browser: per author a urllib opener with a cookie jar logs in through
   wp-login.php, which redirects to /wp-admin/admin-ajax.php?action=rest-nonce for the nonce,
   then each post is one POST /?rest_route=/wp/v2/posts with status publish and X-WP-Nonce
   (cookie + nonce, as the block editor and our publisher do; no application password). The
   posts go round-robin over the authors to as many client threads as the service has working
   browsers (min(TOPN_WORKERS x TOPN_WORKER_SLOTS, pool.working_limit)), so both sides have the
   same concurrency. `wall_seconds` runs from the first login to the last answer (each author's
   one login is inside it); `post_seconds_p50` is the median of the POSTs alone, client-side.

In both phases every expected post must be on the site exactly once, published, under its
author, with its formatting (`WordPressSite.posts`, WordPress's own PHP API); the service's
result URLs must be the posts' permalinks. The ratios service / rest of the wall times and of
the per-publish medians say what the browser (and the publisher's draft-then-publish and
permalink check) costs over WordPress's own work. The rest phase runs after the service has
stopped, so the two never share the machine.

Afterwards the WordPress instance is stopped, its database, database user, config file and
folder removed; the service's database and keys were dropped after its phase. Prints one JSON
object to stdout (per-run figures, medians over runs, settings, machine facts, the code under
test); progress goes to stderr; service logs stay in a temp directory. TOPN_* variables in the
environment are passed on to the service, except the ones the benchmark sets itself.
"""

import argparse
import collections
import concurrent.futures
import http.cookiejar
import json
import os
import pathlib
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from harness import (ROOT, SERVICE_DEFAULTS, TERMINAL, Client, Service, code_under_test, inherited_settings,
                     is_error_line, log, machine_facts, medians, percentile, repeat_runs, timestamp)

sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

from config import Config  # noqa: E402
from pool import find_browser_processes, kill_browser_processes, working_limit  # noqa: E402
from content import render_markdown  # noqa: E402
from publishers.wordpress import NONCE, PATHS, ROUTES, wordpress_html  # noqa: E402
from wordpress_site import WORDPRESS_ROOT, WordPressSite, require_wordpress  # noqa: E402

WORDPRESS_DEFAULTS = {**SERVICE_DEFAULTS, 'TOPN_MAX_DRIVERS': '8', 'TOPN_PACING_WORDPRESS': '0'}
SET_BY_BENCHMARK = ('TOPN_BROWSER_ROOT', 'TOPN_STATE_DIR', 'TOPN_SECRET_KEY')
STATUS_POLL = 0.5
LEFTOVER_GRACE = 5.0
REST_SECONDS = 60.0
# What every post must show once WordPress has stored it: the Markdown's parts, rendered.
RENDERED = ('<h2>', '<h3>', '<li>', '<pre><code class="language-python">', '<table>', '<td>中文</td>', '🚀', '😀')
ARTICLE = """## {title}

基准测试的正文：**加粗**、*斜体*和 `行内代码` 🚀✨，第 {number} 篇。

### 列表

- 第一点
- 第二点 😀
- a third point, in English

```python
print("你好, {title}")
```

| 列 | 值 |
| --- | --- |
| 中文 | {number} |
| emoji | 🎉 |
"""

NOTES = {
    'service_wall_seconds': 'max(completed_at) - min(created_at) over the tasks (server clock); the service '
                            'starts with no browser running, so browser start-up is part of it',
    'service_publish_seconds_p50': 'median of completed_at - started_at over the tasks that succeeded: getting a '
                                   'browser (start-up included), log in (password, or cookies an earlier task '
                                   'saved), draft, publish, permalink check',
    'rest_wall_seconds': 'from the first REST login to the last POST answered, client-side; the logins (one per '
                         'author) are inside it',
    'rest_post_seconds_p50': 'median of the POST /?rest_route=/wp/v2/posts calls alone, client-side',
    'wall_ratio': 'service_wall_seconds / rest_wall_seconds, per run',
    'publish_ratio': 'service_publish_seconds_p50 / rest_post_seconds_p50, per run',
    'concurrency': 'the service works with working_browsers browsers at once; the REST phase uses as many '
                   'client threads (details.rest.threads)',
    '*_posts_ok': "every expected post exactly once on the site, published, under its author, with its "
                  "formatting (WordPress's PHP API); for the service also: the result URLs are the permalinks",
    'leftover_browser_processes': f'browser processes of the service still alive {LEFTOVER_GRACE:g} s after it '
                                  'stopped (want: 0; they are killed afterwards)',
    'medians': 'each figure is the median over the runs that finished; a ratio is the median of the per-run '
               'ratios, not the ratio of the medians',
}


# -- the workload ---------------------------------------------------------------------------

def article(title, number):
    return ARTICLE.format(title=title, number=number)


def planned_titles(tag, authors, per_user):
    """{author: [titles]}: titles unique to this run and phase."""
    return {author: [f'基准 {tag} {author} 第{i}篇' for i in range(per_user)] for author in authors}


def add_wordpress_authors(site, names):
    """WordPress users with the author role; {name: password}."""
    passwords = {name: secrets.token_hex(8) for name in names}
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda name: site.add_user(name, passwords[name], role='author'), names))
    return passwords


def post_figures(site, expected, links=None):
    """Whether every expected post ({author: [titles]}) is on the site exactly once, published and
    formatted, and nothing else is; with `links`, whether they are the posts' permalinks."""
    posts = [post for author in expected for post in site.posts(author=author)]
    published = collections.Counter((post['author'], post['title']) for post in posts if post['status'] == 'publish')
    wanted = {(author, title) for author, titles in expected.items() for title in titles}
    figures = {'posts_published': sum(published.values()),
               'posts_missing': len(wanted - published.keys()),
               'posts_duplicated': sum(count - 1 for count in published.values()),
               'posts_unexpected': len(published.keys() - wanted),
               'posts_not_published': sum(1 for post in posts if post['status'] != 'publish'),
               'posts_formatting_lost': sum(1 for post in posts
                                            if not all(part in post['content'] for part in RENDERED))}
    figures['posts_ok'] = figures['posts_published'] == len(wanted) and not any(
        figures[name] for name in ('posts_missing', 'posts_duplicated', 'posts_unexpected', 'posts_not_published',
                                   'posts_formatting_lost'))
    if links is not None:
        figures['result_urls_are_permalinks'] = set(links) == {post['link'] for post in posts}
        figures['posts_ok'] = figures['posts_ok'] and figures['result_urls_are_permalinks']
    return figures


def seconds_figures(prefix, values):
    if not values:
        return {}
    return {f'{prefix}_p50': round(statistics.median(values), 3), f'{prefix}_p90': round(percentile(values, 90), 3),
            f'{prefix}_max': round(max(values), 3)}


# -- 1. through the service -------------------------------------------------------------------

def service_phase(site, args, log_dir, number):
    """A fresh service publishes the workload to `site`; its figures. The service is stopped,
    its browsers counted and killed, its database, keys and temp dirs removed."""
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix=f'topn-bench-wordpress-{number}-'))
    settings = {**service_settings(), 'TOPN_SECRET_KEY': secrets.token_hex(16),
                'TOPN_STATE_DIR': str(work_dir / 'state'), 'TOPN_BROWSER_ROOT': str(work_dir / 'browsers')}
    service = Service(settings, log_dir / f'run{number}-service.log')
    marker = os.path.join(settings['TOPN_BROWSER_ROOT'], service.namespace) + '/'
    try:
        log('  service: starting it, adding users and their WordPress logins')
        service.start()
        tokens = add_service_users(service, site, [f'topn{i}' for i in range(args.users)])
        figures = service_workload(service, site, tokens, args.per_user)
    finally:
        log('  service: stopping it and cleaning up')
        try:
            service.stop()
            leftover = leftover_browser_processes(marker)
        finally:
            service.clean_up()
            shutil.rmtree(work_dir, ignore_errors=True)
    figures['leftover_browser_processes'] = leftover
    figures['service_log'] = log_summary(service.logged_lines())
    return figures


def add_service_users(service, site, names):
    """TOP_N users, each with a WordPress author of the same name stored as its login. {name: token}."""
    passwords = add_wordpress_authors(site, names)
    tokens = service.add_users(names)

    def store_login(name):
        service.command(f'account set {name} wordpress', 'account', 'set', name, 'wordpress', '--site', site.url,
                        '--username', name, '--password', passwords[name])

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(store_login, names))
    return dict(zip(names, tokens))


def service_workload(service, site, tokens, per_user):
    """Every user sends its batch at the same moment; figures from the task rows and the site."""
    client = Client(service.url)
    expected = planned_titles(f'svc-{secrets.token_hex(3)}', tokens, per_user)
    go = threading.Barrier(len(tokens))

    def submit(name):
        articles = [{'title': title, 'content': article(title, i)} for i, title in enumerate(expected[name])]
        go.wait()
        return name, client.submit(tokens[name], 'wordpress', articles)

    tasks = len(tokens) * per_user
    log(f'  service: submitting {tasks} WordPress tasks from {len(tokens)} users')
    with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
        task_ids = dict(pool.map(submit, tokens))
    rows_by_token = wait_until_finished(client, {tokens[name]: ids for name, ids in task_ids.items()},
                                        120 + 10 * tasks)
    rows = [row for token_rows in rows_by_token.values() for row in token_rows]
    figures = {**task_figures(rows), 'failed_attempts': failed_attempts(client, rows_by_token),
               **post_figures(site, expected, [row['result_url'] for row in rows if row['status'] == 'success']),
               'refusals': {str(status): n for status, n in client.refusals.items()}}
    log(f'  service: {figures["tasks_succeeded"]}/{tasks} succeeded, wall {figures["wall_seconds"]} s, '
        f'publish p50 {figures.get("publish_seconds_p50")} s, posts ok: {figures["posts_ok"]}')
    return figures


def wait_until_finished(client, task_ids, timeout):
    """Poll one user at a time until all of `task_ids` ({token: [ids]}) are finished; {token: rows}."""
    deadline = time.monotonic() + timeout
    rows = {}
    for token, ids in task_ids.items():
        while True:
            found = client.task_rows(token, ids)
            if all(row['status'] in TERMINAL for row in found):
                rows[token] = found
                break
            if time.monotonic() > deadline:
                statuses = collections.Counter(row['status'] for row in found)
                raise TimeoutError(f'tasks still unfinished after {timeout:g} s: {dict(statuses)}')
            time.sleep(STATUS_POLL)
    return rows


def task_figures(rows):
    succeeded = [row for row in rows if row['status'] == 'success']
    figures = {'tasks': len(rows), 'tasks_succeeded': len(succeeded),
               'tasks_not_succeeded': {row['task_id']: f'{row["status"]}: {row["error_message"]}'
                                       for row in rows if row['status'] != 'success'},
               'retries': sum(row['retry_count'] for row in rows), 'wall_seconds': None}
    if not succeeded:
        return figures
    wall = max(timestamp(row['completed_at']) for row in succeeded) - min(timestamp(row['created_at']) for row in rows)
    publish = [timestamp(row['completed_at']) - timestamp(row['started_at']) for row in succeeded]
    dispatch = [timestamp(row['started_at']) - timestamp(row['created_at']) for row in succeeded]
    return {**figures, 'wall_seconds': round(wall, 3), **seconds_figures('publish_seconds', publish),
            'dispatch_wait_seconds_p50': round(statistics.median(dispatch), 3),
            'max_concurrency': max_overlap(succeeded)}


def failed_attempts(client, rows_by_token):
    """{'outcome: the first line of its error': count} over the attempts that did not succeed."""
    found = collections.Counter()
    for token, rows in rows_by_token.items():
        for row in rows:
            if not row['retry_count']:
                continue
            status, answer, _ = client.call('GET', f'/api/publish/tasks/{row["task_id"]}', token)
            if status != 200:
                raise RuntimeError(f'the task detail answered {status}: {answer}')
            for attempt in answer['task']['attempts']:
                if attempt['outcome'] != 'success':
                    error = (attempt['error'] or '').split('\n', 1)[0]
                    found[f'{attempt["outcome"]}: {error}'[:300]] += 1
    return dict(found.most_common())


def max_overlap(rows):
    events = sorted([(timestamp(row['started_at']), 1) for row in rows] +
                    [(timestamp(row['completed_at']), -1) for row in rows])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def leftover_browser_processes(marker):
    """Zygotes may linger ~2 s after the service stopped; whatever outlives the grace is counted
    and killed."""
    deadline = time.monotonic() + LEFTOVER_GRACE
    while (found := find_browser_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if found:
        log(f'  {kill_browser_processes(marker)} browser processes of {marker} outlived the service; killed them')
    return len(found)


def log_summary(lines):
    errors = [line for line in lines if is_error_line(line)]
    return {'warnings': sum(' WARNING ' in line for line in lines), 'errors': len(errors),
            'first_errors': [line[:300] for line in errors[:3]]}


def service_settings():
    """Bench defaults, then the caller's TOPN_* variables (not those the bench sets itself)."""
    return {**WORDPRESS_DEFAULTS, **inherited_settings(SET_BY_BENCHMARK)}


def working_browsers(settings):
    """How many tasks the service works on at once: its slots, under the machine's working limit."""
    config = Config.from_env({**os.environ, **settings})
    return min(config.workers * config.worker_slots,
               working_limit(config.max_drivers, config.working_per_core, remote=bool(config.webdriver_url)))


# -- 2. straight to the REST API ---------------------------------------------------------------

class RestAuthor:
    """One WordPress author without a browser: a cookie jar from wp-login.php and the REST nonce."""

    def __init__(self, site, username, password):
        self.site = site
        self.username = username
        self.password = password
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.nonce = None
        self.login_seconds = None
        self._lock = threading.Lock()

    def log_in_once(self):
        """The first caller logs in; the others wait for it and share the session."""
        with self._lock:
            if self.nonce is None:
                started = time.monotonic()
                self.nonce = self._log_in()
                self.login_seconds = time.monotonic() - started

    def _log_in(self):
        login = self.site + PATHS['login']
        self.opener.open(login, timeout=REST_SECONDS).read()   # sets wordpress_test_cookie, which the form wants
        form = urllib.parse.urlencode({'log': self.username, 'pwd': self.password, 'wp-submit': 'Log In',
                                       'testcookie': '1', 'redirect_to': self.site + PATHS['nonce']})
        with self.opener.open(login, data=form.encode(), timeout=REST_SECONDS) as response:
            text = response.read().decode('utf-8', 'replace').strip()
        if not NONCE.fullmatch(text):
            raise RuntimeError(f'logging in as {self.username} at {self.site} gave no REST nonce: {text[:200]!r}')
        return text

    def publish(self, title, body_html):
        """One POST that creates the post published; the seconds it took."""
        body = json.dumps({'title': title, 'content': body_html, 'status': 'publish'}).encode()
        request = urllib.request.Request(self.site + PATHS['rest'] + ROUTES['posts'], data=body, method='POST',
                                         headers={'Content-Type': 'application/json', 'X-WP-Nonce': self.nonce})
        started = time.monotonic()
        try:
            with self.opener.open(request, timeout=REST_SECONDS) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f'the REST API answered {error.code}: {error.read()[:300]!r}') from None
        seconds = time.monotonic() - started
        if answer.get('status') != 'publish':
            raise RuntimeError(f'the REST API left the post {answer.get("id")} as {answer.get("status")!r}')
        return seconds


def rest_phase(site, args, threads):
    """The same number of posts from other authors, straight to the REST API from `threads`
    client threads, round-robin over the authors; figures from the clock and the site."""
    names = [f'rest{i}' for i in range(args.users)]
    passwords = add_wordpress_authors(site, names)
    authors = {name: RestAuthor(site.url, name, passwords[name]) for name in names}
    expected = planned_titles(f'rest-{secrets.token_hex(3)}', names, args.per_user)
    jobs = [(name, i, expected[name][i]) for i in range(args.per_user) for name in names]

    def publish(job):
        name, number, title = job
        try:
            authors[name].log_in_once()
            return authors[name].publish(title, wordpress_html(render_markdown(article(title, number))))
        except (OSError, RuntimeError, ValueError) as error:
            return f'{type(error).__name__}: {error}'

    log(f'  rest: {len(jobs)} posts from {len(names)} authors over {threads} client threads, no browser')
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(publish, jobs))
    wall = time.monotonic() - started
    seconds = [result for result in results if isinstance(result, float)]
    logins = [author.login_seconds for author in authors.values() if author.login_seconds is not None]
    figures = {'posts': len(jobs), 'posts_answered': len(seconds),
               'errors': collections.Counter(result for result in results if isinstance(result, str)),
               'wall_seconds': round(wall, 3) if seconds else None, **seconds_figures('post_seconds', seconds),
               **seconds_figures('login_seconds', logins), 'threads': threads, **post_figures(site, expected)}
    log(f'  rest: {len(seconds)}/{len(jobs)} answered, wall {figures["wall_seconds"]} s, '
        f'post p50 {figures.get("post_seconds_p50")} s, posts ok: {figures["posts_ok"]}')
    return figures


# -- runs ------------------------------------------------------------------------------------------

def run_once(number, args, log_dir):
    load_start = os.getloadavg()[0]
    site = WordPressSite(tempfile.mkdtemp(prefix='topn-bench-wordpress-site-'))
    try:
        log('  starting a fresh WordPress')
        site.start()
        log(f'  WordPress at {site.url}')
        service = service_phase(site, args, log_dir, number)
        rest = rest_phase(site, args, working_browsers(service_settings()))
    finally:
        log('  stopping WordPress and removing its database, user, config and folder')
        site.stop()
    figures = {
        'service_wall_seconds': service['wall_seconds'],
        'service_publish_seconds_p50': service.get('publish_seconds_p50'),
        'rest_wall_seconds': rest['wall_seconds'],
        'rest_post_seconds_p50': rest.get('post_seconds_p50'),
        'wall_ratio': ratio(service['wall_seconds'], rest['wall_seconds']),
        'publish_ratio': ratio(service.get('publish_seconds_p50'), rest.get('post_seconds_p50')),
        'service_posts_ok': service['posts_ok'],
        'rest_posts_ok': rest['posts_ok'],
        'service_tasks_succeeded': service['tasks_succeeded'],
        'service_retries': service['retries'],
        'rest_login_seconds_p50': rest.get('login_seconds_p50'),
        'leftover_browser_processes': service['leftover_browser_processes'],
        'loadavg': [round(load_start, 2), round(os.getloadavg()[0], 2)],
        'details': {'service': service, 'rest': rest},
    }
    log(f'run {number}: ' + json.dumps({k: v for k, v in figures.items() if k != 'details'}, ensure_ascii=False))
    return figures


def ratio(numerator, denominator):
    return round(numerator / denominator, 2) if numerator and denominator else None


def software_versions():
    version_file = WORDPRESS_ROOT / 'wp-includes' / 'version.php'
    found = re.search(r"\$wp_version = '([^']+)'", version_file.read_text()) if version_file.exists() else None
    php = subprocess.run(['php', '-r', 'echo PHP_VERSION;'], capture_output=True, text=True).stdout
    return {'wordpress': found.group(1) if found else None, 'php': php or None}


def parse_args(argv):
    parser = argparse.ArgumentParser(description='Benchmark TOP_N publishing to a real WordPress through headless '
                                                 "Chromium against WordPress's own REST API with no browser.")
    parser.add_argument('--runs', type=int, default=3, help='runs, each on a fresh service and WordPress (default 3)')
    parser.add_argument('--users', type=int, default=3, help='users, one batch each (default 3)')
    parser.add_argument('--per-user', type=int, default=5, help='articles per user, at most 10 (default 5)')
    args = parser.parse_args(argv)
    if args.runs < 1 or args.users < 1 or not 1 <= args.per_user <= 10:
        parser.error('--runs and --users must be 1 or more, --per-user from 1 to 10')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        require_wordpress()
    except pytest.fail.Exception as missing:
        print(f'bench/wordpress.py: {missing}', file=sys.stderr)
        return 2
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-bench-wordpress-logs-'))
    log(f'service logs go to {log_dir}')
    started = time.monotonic()
    settings = service_settings()
    report = {
        'benchmark': 'wordpress',
        'machine': {**machine_facts(), **software_versions(),
                    'loadavg_at_start': [round(x, 2) for x in os.getloadavg()],
                    'note': 'shared machine: other sessions run browsers, MySQL and Redis work too'},
        'code': code_under_test(),
        'service_logs': str(log_dir),
        'settings': {'runs': args.runs, 'users': args.users, 'per_user': args.per_user,
                     'posts_per_phase': args.users * args.per_user, 'working_browsers': working_browsers(settings),
                     'rest_method': 'cookie + nonce (wp-login.php, admin-ajax.php?action=rest-nonce), one POST '
                                    '/?rest_route=/wp/v2/posts with status publish per post; one client thread '
                                    'per working browser, posts round-robin over the authors',
                     'service': settings},
        'notes': NOTES,
    }
    try:
        runs = repeat_runs(args.runs, lambda number: run_once(number, args, log_dir))
    except KeyboardInterrupt:
        log('interrupted; the service and WordPress were stopped and their databases removed')
        return 130
    report['runs'] = runs
    report['median'] = medians(runs)
    report['machine']['loadavg_at_end'] = [round(x, 2) for x in os.getloadavg()]
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if all('error' not in run for run in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
