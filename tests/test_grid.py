"""Selenium Grid as TOP_N runs it (grid.py): offline from the npm jar on Debian's Chromium,
sessions the Grid lists and ends, DevTools through it, and a hub whose node dies and comes back."""

import contextlib
import http.server
import os
import subprocess
import threading
import time

import pytest
from selenium.common.exceptions import InvalidSessionIdException, SessionNotCreatedException, WebDriverException

import grid as grid_lib
from conftest import wait_until
from grid_site import remote_browser
from pool import cdp, wipe_browser_state

CHROMIUM_BINARY = '/usr/lib/chromium/chromium'  # what Debian's /usr/bin/chromium script runs


@contextlib.contextmanager
def browser_from(url):
    driver = remote_browser(url)
    try:
        yield driver
    finally:
        with contextlib.suppress(WebDriverException):
            driver.quit()


def command_lines(pids):
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f'/proc/{pid}/cmdline', 'rb') as cmdline:
            lines.append(cmdline.read().replace(b'\0', b' ').decode())
    return lines


def test_grid_runs_offline_from_the_npm_jar_with_debians_chromium(grid):
    chromium_version = subprocess.run([grid_lib.CHROMIUM, '--version'], capture_output=True, text=True,
                                      check=True).stdout
    with browser_from(grid.url) as driver:
        driver.get('data:text/html,<title>through the Grid</title><p>hello</p>')

        assert driver.title == 'through the Grid'
        assert driver.capabilities['se:webDriverExecutable'] == grid_lib.CHROMEDRIVER
        assert driver.capabilities['browserVersion'] in chromium_version
        started = command_lines(grid.processes())
        assert any(line.startswith(os.path.realpath(grid_lib.CHROMEDRIVER) + ' ') for line in started), started
        assert any(line.startswith(CHROMIUM_BINARY + ' ') for line in started), started
        assert any(f'-jar {grid_lib.jar_path()} standalone' in line for line in started), started


def test_a_session_is_listed_live_until_end_session_ends_it(grid):
    with browser_from(grid.url) as driver:
        session_id = driver.session_id
        assert session_id in grid.live_sessions()

        assert grid_lib.end_session(grid.url, session_id) is True

        wait_until(lambda: session_id not in grid.live_sessions(), timeout=10, message='the session to go')
        with pytest.raises(InvalidSessionIdException):
            driver.execute_script('return 1')
        assert grid_lib.end_session(grid.url, session_id) is False


class StatefulPage(http.server.BaseHTTPRequestHandler):
    """/ sets a cookie (from the server and from script) and localStorage; /plain sets nothing."""

    def do_GET(self):
        body = b'<title>plain</title>'
        self.send_response(200)
        if self.path == '/':
            body = (b"<title>state</title><script>document.cookie = 'draft=1; max-age=3600';"
                    b"localStorage.setItem('draft', 'secret');</script>")
            self.send_header('Set-Cookie', 'session=alice; Max-Age=3600; Path=/')
        self.send_header('Content-Type', 'text/html')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stateful_site():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), StatefulPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_devtools_commands_reach_the_browser_through_the_grid_and_the_wipe_clears_it(grid, stateful_site):
    with browser_from(grid.url) as driver:
        driver.get(stateful_site + '/')
        cookies = driver.execute('executeCdpCommand', {'cmd': 'Network.getAllCookies', 'params': {}})['value']
        assert sorted(cookie['name'] for cookie in cookies['cookies']) == ['draft', 'session']
        assert driver.execute_script("return localStorage.getItem('draft')") == 'secret'

        wipe_browser_state(driver)

        assert cdp(driver, 'Network.getAllCookies')['cookies'] == []
        driver.get(stateful_site + '/plain')
        assert driver.execute_script("return [document.cookie, localStorage.getItem('draft')]") == ['', None]


def test_a_hub_loses_the_slots_of_a_killed_node_and_gets_them_back_when_it_restarts(start_grid):
    hub = start_grid(mode='hub_and_node', slots=2, request_timeout=5)
    with browser_from(hub.url) as driver:
        driver.get('data:text/html,<title>on the node</title>')
        assert driver.title == 'on the node'
        assert grid_lib.slots(hub.url) == 2 and grid_lib.free_slots(hub.url) == 1

        hub.kill_node()

        assert hub.node.processes() == [], 'the browsers of the killed node live on'
        wait_until(lambda: grid_lib.slots(hub.url) == 0, timeout=30, message='the hub to see the node down')
        assert grid_lib.status(hub.url)['ready'] is False
        with pytest.raises(WebDriverException):
            driver.execute_script('return 1')
        assert hub.live_sessions() == []
        asked = time.monotonic()
        with pytest.raises(SessionNotCreatedException):
            remote_browser(hub.url)
        waited = time.monotonic() - asked
        assert 4 <= waited <= 5 + 3, f'the new-session request failed after {waited:.1f} s, not after its 5 s'

    hub.start_node()

    assert grid_lib.free_slots(hub.url) == 2
    driver = remote_browser(hub.url)
    driver.get('data:text/html,<title>back</title>')
    assert driver.title == 'back'
    hub.stop()
    assert hub.processes() == [], 'browsers outlived the Grid'
