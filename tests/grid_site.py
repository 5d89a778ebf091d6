"""Selenium Grid for the tests (grid.py): a standalone, or a hub with one node, on free
loopback ports, each in a temp folder of its own with its config and logs, and stopped with
every browser it started.

The JVM takes a few seconds to start, so `grid` is one standalone per module; `start_grid`
starts others (a hub and node, fewer slots, shorter timeouts) that are stopped with the module.
Java or the jar missing fails the test with how to install them; nothing is skipped.
"""

import pathlib
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection

import grid as grid_lib
from conftest import free_port
from pool import browser_options

INSTALL_HINT = 'run ./dev test, which installs Java (default-jre-headless) and the Grid jar'
LOG_TAIL_CHARS = 3000


class RunningGrid:
    """One Grid of the tests: `.url` is what TOPN_WEBDRIVER_URL would hold. In mode
    'hub_and_node' the hub serves at `.url` and its one node can be killed and started again."""

    def __init__(self, folder, mode, slots, session_timeout, request_timeout):
        if mode not in ('standalone', 'hub_and_node'):
            raise ValueError("mode must be 'standalone' or 'hub_and_node'")
        self.folder = pathlib.Path(folder)
        self.mode = mode
        self.session_timeout = session_timeout
        self.config_file = grid_lib.write_config(self.folder, slots, session_timeout, request_timeout)
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.node = None
        if mode == 'standalone':
            self.events = None
            self.server = grid_lib.GridProcess('standalone', self.config_file, self.port)
        else:
            self.events = (f'tcp://127.0.0.1:{free_port()}', f'tcp://127.0.0.1:{free_port()}')
            self.server = grid_lib.GridProcess('hub', self.config_file, self.port, events=self.events)
            self.node_port = free_port()

    def start(self):
        started(self.server)
        if self.mode == 'hub_and_node':
            self.start_node()
        return self

    def start_node(self):
        """Start the node (again, on the same port) and wait until the hub sees it UP."""
        self.node = started(grid_lib.GridProcess('node', self.config_file, self.node_port, grid_url=self.url,
                                                 events=self.events))
        return self.node

    def kill_node(self):
        """SIGKILL the node, its chromedrivers and browsers at once, as when its host dies:
        the hub is told nothing and learns it from its health check."""
        self.node.stop(grace=0)

    def live_sessions(self):
        return grid_lib.live_sessions(self.url)

    def processes(self):
        """Every live process this Grid started: the JVMs, chromedrivers, browsers."""
        return self.server.processes() + (self.node.processes() if self.node else [])

    def stop(self):
        try:
            if self.node is not None:
                self.node.stop()
        finally:
            self.server.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


def started(server):
    """`server.start()`, failing the test with the end of its log if it does not come up."""
    try:
        return server.start()
    except grid_lib.GridError as error:
        log = server.log_path.read_text(errors='replace')[-LOG_TAIL_CHARS:] if server.log_path.exists() else ''
        pytest.fail(f'{error}\n{log}', pytrace=False)


def require_grid():
    """Fail (never skip) with how to install what is missing."""
    if shutil.which('java') is None:
        pytest.fail(f'java is missing: {INSTALL_HINT}', pytrace=False)
    try:
        grid_lib.jar_path()
    except grid_lib.GridError as error:
        pytest.fail(str(error), pytrace=False)
    for binary in (grid_lib.CHROMIUM, grid_lib.CHROMEDRIVER):
        if not pathlib.Path(binary).exists():
            pytest.fail(f'{binary} is missing: install it with `apt-get install chromium chromium-driver` '
                        '(./dev test does)', pytrace=False)


def remote_browser(url):
    """A browser from the Grid at `url`, with the pool's flags, as a worker gets one."""
    connection = ChromiumRemoteConnection(url, vendor_prefix='goog', browser_name='chrome')
    return webdriver.Remote(command_executor=connection, options=browser_options())


@pytest.fixture(scope='module')
def start_grid():
    """start_grid(slots=4, session_timeout=60, request_timeout=30, mode='standalone' or
    'hub_and_node') -> a started RunningGrid; all of them are stopped after the module."""
    require_grid()
    grids = []

    def start(slots=4, session_timeout=60, request_timeout=30, mode='standalone'):
        running = RunningGrid(tempfile.mkdtemp(prefix='topn-grid-'), mode, slots, session_timeout, request_timeout)
        grids.append(running)
        return running.start()

    yield start
    for running in grids:
        running.stop()


@pytest.fixture(scope='module')
def grid(start_grid):
    """One standalone Grid with 4 slots for the module's tests."""
    return start_grid()
