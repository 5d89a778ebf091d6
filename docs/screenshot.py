"""Takes docs/task-page.png: the task page in headless Chromium in the middle of a batch.

    .venv/bin/python docs/screenshot.py [--out docs/task-page.png]

Starts the sandbox platform and the real service the way bench/browser.py does (its
`Sandbox`, and bench/pipeline.py's `Service`: a throwaway MySQL database, Redis key prefix
and temp folders, all removed afterwards), with one worker of two browsers and the sandbox
taking PUBLISH_LATENCY_MS per publish, so that a batch spreads out over time. A demo-like
user with a stored sandbox login logs in through the form in a 1280x900 window, reads five
Markdown files into the batch form and publishes them; the window is saved once the table
shows published, publishing and waiting rows at the same moment, with the window grown
below 900 px just enough to hold the whole page.

Chinese text needs a CJK font on the machine (Debian: fonts-noto-cjk); without one it
renders as boxes.
"""

import argparse
import collections
import contextlib
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'bench'))
from browser import Sandbox, find_marked  # noqa: E402
from pipeline import Service, log  # noqa: E402

USER, PASSWORD = 'demo', 'demo'
PUBLISH_LATENCY_MS = 4000
WINDOW = (1280, 900)
WANTED = {'success': 1, 'running': 2, 'pending': 1}  # at least this many rows of each at once
MIX_TIMEOUT = 120.0
STEP_TIMEOUT = 20.0
ARTICLES = [
    ('春季新品发布会回顾', '## 亮点\n\n- 三款新品同时亮相\n- 现场演示 **实时协作**\n'),
    ('如何写好一篇技术博客', '先写结论，再写过程。\n\n```python\nprint("你好")\n```\n'),
    ('团队周报：第 48 周', '| 项目 | 进度 |\n|---|---|\n| 发布平台 | 90% |\n'),
    ('用户访谈的十个问题', '1. 你最近一次遇到的问题是什么？\n2. 当时是怎么解决的？\n'),
    ('Python 异步编程入门', '`asyncio` 让一个线程同时等待许多网络请求。\n'),
]

ROWS_JS = """
return [...document.querySelectorAll('#tasks tr[data-task-id]')].map((row) => row.dataset.status);
"""


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f'waited {timeout:g} s for {what}')
        time.sleep(0.1)
    return found


@contextlib.contextmanager
def demo_service(work_dir):
    """The sandbox and the service, a demo user with a sandbox login; yields the service URL."""
    sandbox = Sandbox(work_dir / 'sandbox.log')
    settings = {'TOPN_WORKERS': '1', 'TOPN_WORKER_SLOTS': '2', 'TOPN_MAX_DRIVERS': '2', 'TOPN_PACING_SANDBOX': '0',
                'TOPN_LOG_LEVEL': 'WARNING', 'TOPN_SECRET_KEY': secrets.token_hex(16),
                'TOPN_STATE_DIR': str(work_dir / 'state'), 'TOPN_BROWSER_ROOT': str(work_dir / 'browsers'),
                'TOPN_SANDBOX_URL': sandbox.url, 'TOPN_SANDBOX_BIND': f'127.0.0.1:{sandbox.port}'}
    service = Service(settings, work_dir / 'service.log')
    try:
        sandbox.start()
        sandbox.call('POST', '/api/faults', {'publish_latency_ms': PUBLISH_LATENCY_MS})
        service.start()
        topn('adduser', USER, '--password', PASSWORD, env=service.env)
        cookies = sandbox.session_cookies(USER, PASSWORD)
        topn('account', 'set', USER, 'sandbox', '--cookies', cookies, env=service.env)
        yield service.url
    finally:
        service.stop()
        sandbox.stop()
        service.clean_up()
        marker = str(work_dir / 'browsers' / service.prefix) + '/'
        if find_marked(marker):
            log(f'browser processes of {marker} outlived the service')


def topn(*args, env):
    done = subprocess.run([sys.executable, 'topn.py', *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'topn.py {args[0]} exited with {done.returncode}: {done.stderr.strip()[-2000:]}')


def chrome(work_dir):
    os.environ.setdefault('SE_OFFLINE', 'true')  # no Selenium Manager download: the driver is local
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--hide-scrollbars', f'--window-size={WINDOW[0]},{WINDOW[1]}',
                 f'--user-data-dir={work_dir / "chrome-profile"}'):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService('/usr/bin/chromedriver'), options=options)
    set_viewport(driver, *WINDOW)
    return driver


def set_viewport(driver, width, height):
    """The page's own viewport (--window-size also counts the headless window's frame)."""
    driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                           {'width': width, 'height': height, 'deviceScaleFactor': 1, 'mobile': False})


def mixed(statuses):
    """The statuses, when they hold the mix WANTED; else None."""
    counts = collections.Counter(statuses)
    return statuses if all(counts[status] >= n for status, n in WANTED.items()) else None


def take(url, driver, files, out):
    driver.get(url + '/login')
    driver.find_element(By.NAME, 'username').send_keys(USER)
    driver.find_element(By.NAME, 'password').send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type=submit]').click()
    wait_for(lambda: driver.find_elements(By.ID, 'batch-form'), STEP_TIMEOUT, 'the page after logging in')
    driver.find_element(By.CSS_SELECTOR, '#batch-form input[type=file]').send_keys('\n'.join(map(str, files)))
    wait_for(lambda: len(driver.find_elements(By.NAME, 'title')) == len(files), STEP_TIMEOUT,
             'the files read into the form')
    driver.find_element(By.CSS_SELECTOR, '#batch-form button.primary').click()
    wait_for(lambda: len(driver.execute_script(ROWS_JS)) == len(files), STEP_TIMEOUT, 'the rows of the batch')
    statuses = wait_for(lambda: mixed(driver.execute_script(ROWS_JS)), MIX_TIMEOUT,
                        'rows ' + ', '.join(f'{status} >= {n}' for status, n in WANTED.items()) + ' at once')
    # The whole page: the window grows just enough below 900 px for the table's last row.
    driver.execute_script('document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);')
    set_viewport(driver, WINDOW[0], max(WINDOW[1], driver.execute_script('return document.body.scrollHeight')))
    driver.save_screenshot(str(out))
    log(f'saved {out} with rows {statuses}')


def main(argv=None):
    parser = argparse.ArgumentParser(description='Screenshot the TOP_N task page mid-batch.')
    parser.add_argument('--out', default=str(ROOT / 'docs' / 'task-page.png'))
    args = parser.parse_args(argv)
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix='topn-screenshot-'))
    files = []
    for number, (title, body) in enumerate(ARTICLES, 1):
        path = work_dir / f'article-{number}.md'
        path.write_text(f'# {title}\n\n{body}', encoding='utf-8')
        files.append(path)
    try:
        with demo_service(work_dir) as url:
            driver = chrome(work_dir)
            try:
                take(url, driver, files, pathlib.Path(args.out))
            finally:
                driver.quit()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
