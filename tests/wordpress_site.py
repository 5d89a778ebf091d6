"""A real WordPress (Debian's `wordpress` package) for the tests, one throwaway instance per fixture.

Debian's wp-config.php picks /etc/wordpress/config-<host>.php by the request's host without its
port, so each instance claims a loopback address of its own (127.0.0.N) and writes that file.
It gets its own MariaDB database and user, and its own WP_CONTENT_DIR in a temp dir: the themes
and plugins are symlinked from the package, and the test-only mu-plugin (FAULTS_PLUGIN) lives
there, so nothing outside the instance changes. PHP's built-in server serves it with four
workers (one worker makes the admin pages crawl: research/wordpress.md).

Everything the tests ask of the site (users, posts, sessions, faults) goes through WordPress's own
PHP API in a `php` CLI process, never through the HTTP interface the publisher under test uses.
"""

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request

import pymysql
import pytest

from conftest import MYSQL_HOST, MYSQL_PORT, RUN_ID, START_MYSQL, wait_until

WORDPRESS_ROOT = pathlib.Path('/usr/share/wordpress')
CONFIG_DIR = pathlib.Path('/etc/wordpress')
INSTALL_HINT = 'install it with `apt-get install wordpress php-cli php-mysql` (./dev test does)'
ADMIN_USER = 'admin'
FAULT_OPTION_PREFIX = 'topn_fault_'
START_SECONDS = 20
PHP_SECONDS = 30
STOP_SECONDS = 5

CONFIG_TEMPLATE = """<?php
define('DB_NAME', {database}); define('DB_USER', {user}); define('DB_PASSWORD', {password});
define('DB_HOST', {db_host}); define('DB_CHARSET', 'utf8mb4');
define('WP_CONTENT_DIR', {content_dir});
define('FS_METHOD', 'direct'); define('WP_HTTP_BLOCK_EXTERNAL', true);
define('AUTOMATIC_UPDATER_DISABLED', true); define('DISABLE_WP_CRON', true);
"""

# Faults are options, read on every request, so a test switches them while the server runs.
# Both hit the REST request that leaves a post `publish` (a create or an update of /wp/v2/posts),
# after WordPress has saved it: the post is out, only the answer is late or lost.
FAULTS_PLUGIN = """<?php
/*
 * TOP_N test faults, switched by options named topn_fault_<name> (WordPressSite.set_fault):
 *   slow_publish         seconds the publishing request sleeps after the post is saved
 *   lose_publish_answer  the publishing request answers 502 instead (once; the post stays published)
 *   refuse_publish       the publishing request is refused with this message; nothing is saved
 */

function topn_fault($name) {
    return get_option('topn_fault_' . $name, null);
}

function topn_publishes($request) {
    return in_array($request->get_method(), array('POST', 'PUT', 'PATCH'), true)
        && preg_match('#^/wp/v2/posts(/\\d+)?$#', $request->get_route())
        && $request['status'] === 'publish';
}

add_filter('rest_pre_insert_post', function ($prepared, $request) {
    $message = topn_fault('refuse_publish');
    if ($message !== null && topn_publishes($request)) {
        return new WP_Error('topn_refused', $message, array('status' => 403));
    }
    return $prepared;
}, 10, 2);

add_filter('rest_post_dispatch', function ($response, $server, $request) {
    $data = $response->get_data();
    if (!topn_publishes($request) || $response->is_error() || ($data['status'] ?? null) !== 'publish') {
        return $response;
    }
    $seconds = topn_fault('slow_publish');
    if ($seconds) {
        usleep((int) ((float) $seconds * 1000000));
    }
    if (topn_fault('lose_publish_answer') !== null) {
        delete_option('topn_fault_lose_publish_answer');
        status_header(502);
        header('Content-Type: text/html; charset=utf-8');
        echo '<html><body><h1>502 Bad Gateway</h1></body></html>';
        exit;
    }
    return $response;
}, 10, 3);
"""

# Runs one snippet inside WordPress: {"snippet": ..., "args": ...} as JSON on stdin, the snippet's
# return value as JSON on stdout. PHP's warnings go to stderr so they cannot break the JSON.
PHP_RUNNER = """<?php
$_SERVER['HTTP_HOST'] = $argv[1];
$_SERVER['SERVER_NAME'] = $argv[1];
$_SERVER['REQUEST_METHOD'] = 'GET';
define('WP_USE_THEMES', false);
require '/usr/share/wordpress/wp-load.php';
require_once ABSPATH . 'wp-admin/includes/user.php';
$input = json_decode(stream_get_contents(STDIN), true);
$args = $input['args'];
$result = eval($input['snippet']);
if (is_wp_error($result)) {
    fwrite(STDERR, $result->get_error_message());
    exit(3);
}
echo json_encode($result);
"""

POSTS_PHP = """
$query = array('post_type' => 'post', 'post_status' => array_keys(get_post_stati()),
               'numberposts' => -1, 'orderby' => 'ID', 'order' => 'ASC');
if ($args['author'] !== null) {
    $user = get_user_by('login', $args['author']);
    if (!$user) {
        return array();
    }
    $query['author'] = $user->ID;
}
return array_map(function ($post) {
    return array('id' => $post->ID, 'title' => $post->post_title, 'content' => $post->post_content,
                 'status' => $post->post_status, 'author' => get_the_author_meta('user_login', $post->post_author),
                 'link' => get_permalink($post));
}, get_posts($query));
"""


class WordPressSite:
    """One running WordPress: its URL, and WordPress's own PHP API for what the tests arrange and check."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.host = None
        self.port = None
        self.url = None
        self.database = None
        self.db_password = secrets.token_hex(12)
        self.admin_password = secrets.token_hex(12)
        self.config_file = None
        self.process = None
        self.log_path = self.workdir / 'php-server.log'

    # -- life cycle ------------------------------------------------------------------------

    def start(self):
        self._claim_host()
        self._create_database()
        self._write_config()
        self._make_content_dir()
        self._serve()
        self._install()
        return self

    def stop(self):
        """Kill the server, drop the database and its user, remove the config file and the temp dir."""
        if self.process is not None:
            stop_php_server(self.process)
            self.process = None
        if self.database is not None:
            with root_connection() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS `{self.database}`')
                cursor.execute(f"DROP USER IF EXISTS '{self.database}'@'%'")
            self.database = None
        if self.config_file is not None:
            self.config_file.unlink(missing_ok=True)
            self.config_file = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _claim_host(self):
        """The first loopback address from this run's id on whose config file nobody else has a claim;
        creating that file exclusively is the claim."""
        first = int(RUN_ID, 16) % 250
        for step in range(250):
            host = f'127.0.0.{2 + (first + step) % 250}'
            config_file = CONFIG_DIR / f'config-{host}.php'
            try:
                config_file.open('x').close()
            except FileExistsError:
                continue
            self.host, self.config_file = host, config_file
            self.port = free_port(host)
            self.url = f'http://{host}:{self.port}'
            self.database = f'topn_wp_{RUN_ID}_{host.rsplit(".", 1)[1]}'
            return
        raise RuntimeError(f'every 127.0.0.N already has a config file in {CONFIG_DIR}')

    def _create_database(self):
        with root_connection() as cursor:
            cursor.execute(f'CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci')
            cursor.execute(f"CREATE USER '{self.database}'@'%' IDENTIFIED BY '{self.db_password}'")
            cursor.execute(f"GRANT ALL ON `{self.database}`.* TO '{self.database}'@'%'")

    def _write_config(self):
        values = {'database': self.database, 'user': self.database, 'password': self.db_password,
                  'db_host': MYSQL_HOST if MYSQL_PORT == 3306 else f'{MYSQL_HOST}:{MYSQL_PORT}',
                  'content_dir': str(self.workdir / 'wp-content')}
        self.config_file.write_text(CONFIG_TEMPLATE.format(**{k: php_string(v) for k, v in values.items()}))

    def _make_content_dir(self):
        content_dir = self.workdir / 'wp-content'
        content_dir.mkdir()
        for name in ('themes', 'plugins', 'languages'):
            (content_dir / name).symlink_to(WORDPRESS_ROOT / 'wp-content' / name)
        (content_dir / 'mu-plugins').mkdir()
        (content_dir / 'mu-plugins' / 'topn-faults.php').write_text(FAULTS_PLUGIN)
        (content_dir / 'uploads').mkdir()
        (self.workdir / 'run.php').write_text(PHP_RUNNER)
        (self.workdir / 'router.php').write_text(ROUTER.replace('UPLOADS_DIR', php_string(str(content_dir / 'uploads'))))

    def _serve(self):
        with open(self.log_path, 'w') as log:
            self.process = subprocess.Popen(
                ['php', '-d', 'display_errors=0', '-d', 'log_errors=1', '-d', f'error_log={self.log_path}',
                 '-S', f'{self.host}:{self.port}', '-t', str(WORDPRESS_ROOT), str(self.workdir / 'router.php')],
                env={**os.environ, 'PHP_CLI_SERVER_WORKERS': '4'}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until(self._listening, timeout=START_SECONDS, message=f'php -S on {self.url} (log: {self.log_path})')

    def _listening(self):
        if self.process.poll() is not None:
            raise AssertionError(f'php -S exited with {self.process.returncode}: {self.log_path.read_text()}')
        with socket.socket() as sock:
            return sock.connect_ex((self.host, self.port)) == 0

    def _install(self):
        """WordPress's own installer, one form POST, as the install page would send it."""
        form = {'weblog_title': 'TOP_N test site', 'user_name': ADMIN_USER, 'admin_password': self.admin_password,
                'admin_password2': self.admin_password, 'pw_weak': '1', 'admin_email': 'admin@example.test',
                'blog_public': '0', 'language': ''}
        request = urllib.request.Request(self.url + '/wp-admin/install.php?step=2',
                                         data=urllib.parse.urlencode(form).encode(), method='POST')
        with urllib.request.urlopen(request, timeout=60) as response:
            page = response.read().decode('utf-8', 'replace')
        if 'wp-login.php' not in page:
            raise AssertionError(f'the WordPress installer did not finish: {page[:500]}')

    # -- what the tests arrange and check ---------------------------------------------------

    def php(self, snippet, **args):
        """Run `snippet` (PHP statements that read $args and `return` an answer) in this WordPress;
        the answer, decoded from JSON."""
        done = subprocess.run(['php', '-d', 'display_errors=stderr', str(self.workdir / 'run.php'), self.host],
                              input=json.dumps({'snippet': snippet, 'args': args}), capture_output=True, text=True,
                              timeout=PHP_SECONDS)
        if done.returncode != 0:
            raise AssertionError(f'PHP in WordPress failed ({done.returncode}): {done.stderr.strip()[-2000:]}')
        return json.loads(done.stdout)

    def add_user(self, username, password, role='author'):
        return self.php("""
            return wp_insert_user(array('user_login' => $args['username'], 'user_pass' => $args['password'],
                                        'user_email' => $args['username'] . '@example.test', 'role' => $args['role']));
        """, username=username, password=password, role=role)

    def posts(self, author=None):
        """Every post of every status (drafts, pending, trash too), oldest first, of `author` (a login)
        or of everybody."""
        return self.php(POSTS_PHP, author=author)

    def add_post(self, author, title, content, status='draft'):
        return self.php("""
            $user = get_user_by('login', $args['author']);
            return wp_insert_post(array('post_author' => $user->ID, 'post_title' => $args['title'],
                                        'post_content' => $args['content'], 'post_status' => $args['status']), true);
        """, author=author, title=title, content=content, status=status)

    def end_sessions(self, username):
        """Log the user out everywhere: a stored login cookie stops working."""
        return self.php("""
            WP_Session_Tokens::get_instance(get_user_by('login', $args['username'])->ID)->destroy_all();
            return true;
        """, username=username)

    def session_count(self, username):
        return self.php("""
            return count(WP_Session_Tokens::get_instance(get_user_by('login', $args['username'])->ID)->get_all());
        """, username=username)

    def set_fault(self, name, value):
        return self.php("return update_option($args['option'], $args['value'], false);",
                        option=FAULT_OPTION_PREFIX + name, value=value)

    def faults(self):
        return self.php("""
            global $wpdb;
            $names = $wpdb->get_col($wpdb->prepare('SELECT option_name FROM ' . $wpdb->options
                                                   . ' WHERE option_name LIKE %s', $args['prefix'] . '%'));
            $faults = array();
            foreach ($names as $name) {
                $faults[substr($name, strlen($args['prefix']))] = get_option($name);
            }
            return (object) $faults;
        """, prefix=FAULT_OPTION_PREFIX)

    def clear_faults(self):
        for name in self.faults():
            self.php('return delete_option($args["option"]);', option=FAULT_OPTION_PREFIX + name)


# php -S serves files from WordPress's code folder only; this instance's uploads live in its own
# content dir, so they are served from there. Anything else goes on as php -S would serve it.
ROUTER = r'''<?php
$path = urldecode(parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH));
$prefix = '/wp-content/uploads/';
if (strncmp($path, $prefix, strlen($prefix)) !== 0) {
    return false;
}
$uploads = realpath(UPLOADS_DIR);
$file = realpath($uploads . '/' . substr($path, strlen($prefix)));
if ($file === false || strncmp($file, $uploads . '/', strlen($uploads) + 1) !== 0 || !is_file($file)) {
    http_response_code(404);
    return true;
}
$types = array('png' => 'image/png', 'jpg' => 'image/jpeg', 'jpeg' => 'image/jpeg', 'gif' => 'image/gif',
               'webp' => 'image/webp');
header('Content-Type: ' . ($types[strtolower(pathinfo($file, PATHINFO_EXTENSION))] ?? 'application/octet-stream'));
header('Content-Length: ' . filesize($file));
readfile($file);
return true;
'''


def require_wordpress():
    """Fail (never skip) with how to install what is missing."""
    if shutil.which('php') is None:
        pytest.fail(f'php is missing: {INSTALL_HINT}', pytrace=False)
    if not (WORDPRESS_ROOT / 'wp-load.php').exists() or not CONFIG_DIR.is_dir():
        pytest.fail(f'WordPress is missing from {WORDPRESS_ROOT}: {INSTALL_HINT}', pytrace=False)
    done = subprocess.run(['php', '-r', 'echo extension_loaded("mysqli") ? "yes" : "no";'],
                          capture_output=True, text=True)
    if done.stdout != 'yes':
        pytest.fail(f'PHP has no mysqli extension: {INSTALL_HINT}', pytrace=False)
    try:
        pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', connect_timeout=3).close()
    except pymysql.err.OperationalError as error:
        pytest.fail(f'MariaDB is not answering on {MYSQL_HOST}:{MYSQL_PORT} ({error}); {START_MYSQL}', pytrace=False)


@pytest.fixture(scope='module')
def wordpress_site():
    """A fresh, installed WordPress for the module, removed afterwards with all it made."""
    require_wordpress()
    site = WordPressSite(tempfile.mkdtemp(prefix='topn-wordpress-'))
    try:
        yield site.start()
    finally:
        site.stop()


def stop_php_server(process):
    """SIGTERM to the server's whole group, SIGKILL for what is left after a while. Its workers
    outlive the master by a moment and init reaps them: the master does not wait for them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def root_connection():
    connection = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='', autocommit=True)
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def php_string(value):
    return "'" + value.replace('\\', '\\\\').replace("'", "\\'") + "'"
