"""Steps every browser publisher takes: import a login, call the platform from the page, wait."""

import base64
import time
from urllib.parse import urlsplit

from selenium.common.exceptions import WebDriverException

import images
from publishers.base import PublishError
from tasks import EVIDENCE_FILES

EVIDENCE_MAX_BYTES = 4 * 1024 * 1024

FETCH_JS = """
const [method, url, body, headers, done] = arguments;
fetch(url, {method, credentials: 'include', headers: Object.assign({'content-type': 'application/json'}, headers),
            body: body === null ? undefined : JSON.stringify(body)})
  .then(async response => done({status: response.status, text: await response.text()}))
  .catch(error => done({status: 0, text: String(error)}));
"""

# [x, y, what covers the centre or null] of the first element matching arguments[0], scrolled
# into view; null when none matches.
CLICK_POINT_JS = """
const element = arguments[0].map(selector => document.querySelector(selector)).find(Boolean);
if (!element) return null;
element.scrollIntoView({block: 'center', inline: 'center'});
const box = element.getBoundingClientRect();
const x = box.left + box.width / 2, y = box.top + box.height / 2;
const hit = document.elementFromPoint(x, y);
const covered = !hit || !(hit === element || element.contains(hit));
return [x, y, covered ? (hit ? hit.outerHTML.slice(0, 80) : 'nothing at that point') : null];
"""


def import_cookies(driver, base_url, cookies):
    """Put a stored login into the browser for `base_url`'s site, before any page of it loads."""
    host = urlsplit(base_url).hostname
    for name, value in cookies:
        driver.execute_cdp_cmd('Network.setCookie', {
            'name': name, 'value': value, 'url': base_url,
            'domain': host, 'path': '/', 'secure': base_url.startswith('https:')})


def click(driver, selectors, what):
    """Click the first element matching one of `selectors` as a person would: scrolled into
    view, then a trusted mouse press and release at its centre (DevTools
    Input.dispatchMouseEvent, the events WebDriver's own click sends).

    One script finds the element and checks that nothing covers its centre, then two DevTools
    commands click. WebDriver's find-then-click runs its visibility and location atoms in
    several round trips first: a sandbox publish, with its two clicks, costs 0.33 CPU-seconds
    this way against 0.39 (wipe included; 8 alternating pairs, lower in each).
    """
    point = driver.execute_script(CLICK_POINT_JS, list(selectors))
    if point is None:
        raise PublishError(f'the page has no {what} any more ({", ".join(selectors)}); '
                           'the platform may have changed its page')
    x, y, covering = point
    if covering is not None:
        raise PublishError(f'the {what} is covered by another element ({covering}); nothing was clicked')
    for event in ('mousePressed', 'mouseReleased'):
        driver.execute_cdp_cmd('Input.dispatchMouseEvent',
                               {'type': event, 'x': x, 'y': y, 'button': 'left', 'clickCount': 1})


UPLOAD_JS = """
const [method, url, encoded, headers, done] = arguments;
const bytes = Uint8Array.from(atob(encoded), character => character.charCodeAt(0));
fetch(url, {method, credentials: 'include', headers, body: bytes})
  .then(async response => done({status: response.status, text: await response.text()}))
  .catch(error => done({status: 0, text: String(error)}));
"""


def upload_bytes(driver, method, url, data, headers, timeout=60):
    """Send raw bytes (a picture) from the logged-in page, cookies included. Returns (status, text)."""
    driver.set_script_timeout(timeout)
    try:
        answer = driver.execute_async_script(UPLOAD_JS, method, url, base64.b64encode(data).decode(), headers)
    except WebDriverException as error:
        raise PublishError(f'the page could not send {len(data)} bytes to {url}: {error.msg}') from error
    return answer['status'], answer['text']


def rehost_pictures(attempt, upload, place='', start=30, end=60):
    """The body with every picture on the platform's own host. `upload(picture)` puts one there
    and returns its URL; each is uploaded once per account and place (a retry finds what an
    earlier attempt uploaded) and each upload is a progress step of its own. A failed upload
    names its picture."""
    pictures = attempt.pictures()
    new_sources = {}
    for number, picture in enumerate(pictures, 1):
        url = attempt.rehosted_url(picture, place)
        if url is None:
            try:
                url = upload(picture)
            except PublishError as error:
                raise PublishError(f'图片 {picture.source} 上传失败 (uploading the picture {picture.source} failed): '
                                   f'{error}', retryable=error.retryable) from error
            attempt.remember_rehosted(picture, place, url)
        new_sources[picture.source] = url
        attempt.progress(start + (end - start) * number // len(pictures))
    return images.replace_sources(attempt.body_html, new_sources)


def fetch(driver, method, url, body=None, headers=None, timeout=20):
    """A same-site request from the logged-in page (cookies included). Returns (status, text)."""
    driver.set_script_timeout(timeout)
    try:
        answer = driver.execute_async_script(FETCH_JS, method, url, body, headers or {})
    except WebDriverException as error:
        raise PublishError(f'the page could not reach {url}: {error.msg}') from error
    return answer['status'], answer['text']


def wait_for(condition, timeout, what, interval=0.1):
    """Poll `condition()` until it returns something truthy; PublishError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise PublishError(f'gave up after {timeout:.0f} s waiting for {what}')
        time.sleep(interval)


def capture_evidence(driver, answer=None):
    """What the browser showed when an attempt failed, {file name: bytes}: a screenshot, the
    page HTML and the URL, and the platform's answer (JSON text) when there is one. A browser
    too broken to answer gives fewer; a page over EVIDENCE_MAX_BYTES is cut there."""
    takers = {
        'url.txt': lambda: (driver.current_url + '\n').encode(),
        'page.html': lambda: driver.page_source.encode('utf-8')[:EVIDENCE_MAX_BYTES],
        'screenshot.png': lambda: driver.get_screenshot_as_png(),
        'answer.json': lambda: answer.encode('utf-8')[:EVIDENCE_MAX_BYTES],
    }
    files = {}
    for name in EVIDENCE_FILES:
        if name == 'answer.json' and answer is None:
            continue
        try:
            files[name] = takers[name]()
        except WebDriverException:
            continue
    return files
