"""The page end to end: real headless Chromium on `topn.py serve` (waitress, the supervisor
and its workers, their own headless browsers) publishing to the sandbox platform.

A person logs in through the form, reads two Markdown files into the batch form, types a
third article, publishes, cancels the article that is still waiting, and watches the
other two go from pending through running to published with their links, without a page
reload; once nothing is unfinished the table stops asking the server."""

import dataclasses
import datetime
import time
import zoneinfo

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By

from accounts import AccountStore
from conftest import SECRET, wait_until, zhihu_environment
from publishers import load_publishers

PUBLISH_LATENCY_MS = 3000
PACING = 5
QUIET_SECONDS = 5

# Counts the table's requests and records every status each row shows, in the page itself:
# a reload would wipe all of it, marker included.
INSTRUMENT_JS = """
window.__topnMarker = 'same-page';
window.__fragmentRequests = [];
window.__seen = {};
document.body.addEventListener('htmx:beforeRequest', (event) => {
  if (event.detail.pathInfo.requestPath.startsWith('/fragments/tasks')) window.__fragmentRequests.push(Date.now());
});
const record = () => document.querySelectorAll('tr[data-task-id]').forEach((row) => {
  const seen = window.__seen[row.dataset.taskId] = window.__seen[row.dataset.taskId] || [];
  if (seen[seen.length - 1] !== row.dataset.status) seen.push(row.dataset.status);
});
new MutationObserver(record).observe(document.body, {childList: true, subtree: true, attributes: true});
record();
"""


@pytest.fixture
def chrome(headless_browser):
    return headless_browser


ROWS_JS = """
return [...document.querySelectorAll('#tasks tr[data-task-id]')].map((row) => [
  row.closest('tbody').querySelector('td.title').textContent.trim(), row.dataset.taskId, row.dataset.status,
  (row.querySelector('a.article-link') || {}).href || null]);
"""


@dataclasses.dataclass
class Row:
    task_id: str
    status: str
    link: str


def rows(driver):
    """{title: Row} of the table as the browser shows it now (read in one go: the table is
    replaced every two seconds)."""
    return {title: Row(task_id, status, link) for title, task_id, status, link in driver.execute_script(ROWS_JS)}


def field_values(driver, name):
    """The values of the form fields called `name`, read in one go: the form rebuilds its
    rows while it reads files, so elements found one step earlier may be gone."""
    return driver.execute_script('return [...document.getElementsByName(arguments[0])].map(field => field.value)', name)


def text_of(driver, selector):
    """The text of the element at `selector`, read in one go: htmx swaps the form and the
    table, so an element found one step earlier may be gone when its text is read."""
    return driver.execute_script('return document.querySelector(arguments[0]).innerText', selector)


GROUPS_JS = """
return [...document.querySelectorAll('#tasks tbody.article-group')].map(group => ({
    title: group.querySelector('td.title').innerText,
    platforms: [...group.querySelectorAll('td.platform')].map(cell => cell.innerText),
    statuses: [...group.querySelectorAll('tr')].map(row => row.dataset.status),
    text: group.innerText,
}));
"""


def click(driver, selector):
    """Click, unless the element was just swapped out; then the caller looks again."""
    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True
    except (StaleElementReferenceException, NoSuchElementException):
        return False


def stays(condition, seconds, interval=0.2):
    """True when `condition` holds at every look for `seconds` (it is an observation, not a wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return condition()


def in_order(seen, expected):
    """`expected` appears in `seen` in this order (other statuses may come between)."""
    remaining = iter(seen)
    return all(status in remaining for status in expected)


def test_a_batch_publishes_live_in_the_browser_then_the_table_stops_polling(
        start_service, platform, chrome, make_user, db, config, tmp_path):
    platform.call('POST', '/api/reset')
    platform.faults(publish_latency_ms=PUBLISH_LATENCY_MS)
    alice = make_user('alice')
    AccountStore(db, SECRET).save(alice.id, load_publishers(config)['sandbox'], {'cookies': platform.session_for('alice')})
    service = start_service(TOPN_SANDBOX_URL=platform.url, TOPN_SECRET_KEY=SECRET,
                            TOPN_STATE_DIR=str(tmp_path / 'state'), TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'),
                            TOPN_PACING_SANDBOX=PACING, TOPN_WORKERS=2)
    files = []
    for name, text in (('春天.md', '# 春天来了\n\n草长莺飞，**万物复苏**。\n'), ('notes.txt', '没有标题的一篇笔记。\n')):
        path = tmp_path / name
        path.write_text(text, encoding='utf-8')
        files.append(str(path))

    chrome.get(service.url + '/')
    assert chrome.current_url.endswith('/login')
    chrome.find_element(By.NAME, 'username').send_keys('alice')
    chrome.find_element(By.NAME, 'password').send_keys('secret')
    chrome.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type=submit]').click()
    wait_until(lambda: chrome.find_elements(By.ID, 'batch-form'), timeout=10, message='the page after logging in')
    chrome.execute_script(INSTRUMENT_JS)

    chrome.find_element(By.CSS_SELECTOR, '#batch-form input[type=file]').send_keys('\n'.join(files))
    wait_until(lambda: field_values(chrome, 'title') == ['春天来了', 'notes'], timeout=10,
               message='the files read into the form')
    chrome.find_element(By.CSS_SELECTOR, '#batch-form button[value=add]').click()
    wait_until(lambda: len(chrome.find_elements(By.NAME, 'title')) == 3, timeout=10, message='a third article')
    chrome.find_elements(By.NAME, 'title')[2].send_keys('手写的第三篇')
    chrome.find_elements(By.NAME, 'content')[2].send_keys('这一篇会被取消。')
    assert [box.get_attribute('value') for box in chrome.find_elements(By.CSS_SELECTOR, 'input[name=platform]')] \
        == ['sandbox']
    # The account published a moment ago: its next publish slot opens in 4 s, so all three
    # tasks wait as pending first (pacing defers them without holding a browser).
    with db.transaction() as cur:
        cur.execute('UPDATE platform_accounts SET next_publish_at = NOW(3) + INTERVAL 4 SECOND WHERE user_id = %s',
                    (alice.id,))
    chrome.find_element(By.CSS_SELECTOR, '#batch-form button.primary').click()

    wait_until(lambda: '已提交 3 个发布任务' in text_of(chrome, '#batch-form'), timeout=10,
               message='the form to confirm the batch')
    wait_until(lambda: len(rows(chrome)) == 3, timeout=10, message='three rows in the table')
    # A task the pacing defers is claimed first: the table may catch it running for a moment
    # before it waits as pending again.
    wait_until(lambda: rows(chrome)['手写的第三篇'].status == 'pending', timeout=10,
               message='the third task waiting on the pacing')
    waiting = rows(chrome)['手写的第三篇']
    wait_until(lambda: click(chrome, f'tr[data-task-id="{waiting.task_id}"] .row-actions button'), timeout=10,
               message='the cancel button')
    wait_until(lambda: rows(chrome)['手写的第三篇'].status == 'cancelled', timeout=10, message='the cancelled row')

    wait_until(lambda: [rows(chrome)[title].status for title in ('春天来了', 'notes')] == ['success', 'success'],
               timeout=120, message='both articles published')
    final = rows(chrome)
    published = {article['title']: article['url'] for article in platform.articles()}
    assert published == {title: final[title].link for title in ('春天来了', 'notes')}
    seen = chrome.execute_script('return window.__seen')
    for title in ('春天来了', 'notes'):
        assert in_order(seen[final[title].task_id], ['pending', 'running', 'success']), seen
    assert seen[waiting.task_id][-2:] == ['pending', 'cancelled'] and 'success' not in seen[waiting.task_id], seen
    assert chrome.execute_script('return window.__topnMarker') == 'same-page'

    wait_until(lambda: chrome.find_element(By.ID, 'tasks').get_attribute('data-polling') == 'off', timeout=10,
               message='the table to stop polling')
    assert 'every' not in chrome.find_element(By.ID, 'tasks').get_attribute('hx-trigger')
    requests = chrome.execute_script('return window.__fragmentRequests.length')
    assert stays(lambda: chrome.execute_script('return window.__fragmentRequests.length') == requests, QUIET_SECONDS)
    assert requests >= 4
    assert chrome.execute_script('return window.__topnMarker') == 'same-page'


def test_a_two_platform_batch_scheduled_from_the_page_shows_scheduled_then_published(
        start_service, platform, standin, chrome, make_user, db, config, tmp_path):
    platform.call('POST', '/api/reset')
    alice = make_user('alice')
    publishers = load_publishers(config)
    store = AccountStore(db, SECRET)
    store.save(alice.id, publishers['sandbox'], {'cookies': platform.session_for('alice')})
    zhihu_cookies = standin.add_account('alice')
    store.save(alice.id, publishers['zhihu'], {'cookies': zhihu_cookies})
    service = start_service(TOPN_SANDBOX_URL=platform.url, TOPN_SECRET_KEY=SECRET, TOPN_PACING_ZHIHU=0,
                            TOPN_STATE_DIR=str(tmp_path / 'state'), TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'),
                            TOPN_WORKERS=2, **zhihu_environment(standin))
    log_in(chrome, service.url, 'alice')
    chrome.execute_script(INSTRUMENT_JS)
    boxes = {box.get_attribute('value'): box for box in chrome.find_elements(By.CSS_SELECTOR, 'input[name=platform]')}
    assert sorted(boxes) == ['sandbox', 'zhihu']
    for name, box in boxes.items():
        if not box.is_selected():
            box.click()
    # The picker takes whole minutes, in the zone the page names (Asia/Shanghai by default).
    zone = zoneinfo.ZoneInfo(config.display_timezone)
    due = (datetime.datetime.now(zone) + datetime.timedelta(seconds=70)).replace(second=0, microsecond=0)
    picker = chrome.find_element(By.NAME, 'publish_at')
    chrome.execute_script('arguments[0].value = arguments[1]', picker, due.strftime('%Y-%m-%dT%H:%M'))
    chrome.find_element(By.NAME, 'title').send_keys('定时发到两个平台')
    chrome.find_element(By.NAME, 'content').send_keys('一篇文章，两个平台，同一个时间。')
    assert config.display_timezone in text_of(chrome, '#batch-form')
    chrome.find_element(By.CSS_SELECTOR, '#batch-form button.primary').click()

    wait_until(lambda: '已安排 2 个发布任务' in text_of(chrome, '#batch-form'), timeout=10,
               message='the form to confirm the scheduled batch')
    wait_until(lambda: len(chrome.find_elements(By.CSS_SELECTOR, '#tasks tr[data-task-id]')) == 2, timeout=10,
               message='two rows in the table')
    group, = chrome.execute_script(GROUPS_JS)
    assert group['title'] == '定时发到两个平台'
    assert group['platforms'] == ['沙盒平台', '知乎']
    assert group['statuses'] == ['scheduled', 'scheduled']
    assert due.strftime('%m-%d %H:%M:00') in group['text']
    assert config.display_timezone in text_of(chrome, '#tasks')

    wait_until(lambda: {row.status for row in rows_by_task(chrome)} == {'success'}, timeout=150,
               message='both tasks published')
    seen = chrome.execute_script('return window.__seen')
    assert all(statuses[0] == 'scheduled' and statuses[-1] == 'success' for statuses in seen.values()), seen
    assert chrome.execute_script('return window.__topnMarker') == 'same-page'
    with db.transaction() as cur:
        cur.execute('SELECT MIN(started_at) AS first FROM publish_tasks WHERE user_id = %s', (alice.id,))
        first_start = cur.fetchone()['first'].replace(tzinfo=datetime.timezone.utc)
    assert first_start >= due
    assert [article['title'] for article in platform.articles()] == ['定时发到两个平台']
    assert [article['title'] for article in standin.published(zhihu_cookies)] == ['定时发到两个平台']


def log_in(driver, url, name, password='secret'):
    driver.get(url + '/')
    driver.find_element(By.NAME, 'username').send_keys(name)
    driver.find_element(By.NAME, 'password').send_keys(password)
    driver.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type=submit]').click()
    wait_until(lambda: driver.find_elements(By.ID, 'batch-form'), timeout=10, message='the page after logging in')


def rows_by_task(driver):
    return [Row(task_id, status, link) for _, task_id, status, link in driver.execute_script(ROWS_JS)]
