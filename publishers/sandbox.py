"""Publishing to the local sandbox platform through its web editor, as a person would.

The flow is the DOM flow real publishers use on platforms without an API: import the
login cookie, open the editor, fill the title, paste the body as HTML (one paste event,
not one key event per character), click publish, confirm, and verify the article page.
Every selector and path is in the two tables below.
"""

import datetime
import json
import re

from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

from accounts import parse_cookies
from publishers import content
from publishers.base import LoginExpired, Publisher, PublishError
from publishers.browser import fetch, import_cookies, wait_for

PATHS = {
    'write': '/write',
    'login': '/login',
    'me': '/api/me',
    'my_articles': '/api/me/articles',
}
SELECTORS = {
    'title': ('#title', 'textarea[placeholder*="标题"]'),
    'editor': ('#editor[contenteditable="true"]', '[contenteditable="true"]'),
    'publish': ('#publish-button', 'button.primary'),
    'confirm': ('#confirm-publish', '[role="dialog"] button.primary'),
    'error': ('#error',),
    'article_title': ('h1.article-title',),
    'article_body': ('.article-body',),
}
ARTICLE_URL = re.compile(r'/p/(\d+)$')
REFUSALS = {
    'too_frequent': ('the platform says this account posts too often; retrying later', True),
    'empty_content': ('the editor was empty when publish was clicked', True),
    'title_too_long': ('the platform refuses titles this long', False),
}
# How far apart the platform's clock and MySQL's may be when matching an earlier publish.
CLOCK_SLACK = datetime.timedelta(seconds=120)

# Read in the page in one step, so a navigation in between cannot leave a stale element.
SHOWN_ERROR_JS = """
const error = document.querySelector(arguments[0]);
if (!error || error.hidden || !error.textContent.trim()) return null;
return [error.dataset.code || '', error.textContent.trim()];
"""
FILL_JS = """
const [title, editor, html] = arguments;
title.focus();
title.value = arguments[3];
title.dispatchEvent(new Event('input', {bubbles: true}));
editor.focus();
const data = new DataTransfer();
data.setData('text/html', html);
editor.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
return [title.value, editor.textContent];
"""


class SandboxPublisher(Publisher):
    name = 'sandbox'
    label = '沙盒平台'
    needs_browser = True
    required_cookies = ('sbx_session',)

    def __init__(self, base_url):
        self.base_url = base_url.rstrip('/')

    @classmethod
    def from_config(cls, config):
        return cls(config.sandbox_url)

    def publish(self, attempt):
        driver = attempt.driver
        self._log_in(driver, attempt.account)
        attempt.progress(30)
        if attempt.outcome_unknown:
            earlier = self._find_published(driver, attempt)
            if earlier:
                return earlier
            driver.get(self.base_url + PATHS['write'])
        self._fill(driver, attempt)
        attempt.progress(60)
        self._click(driver, 'publish')
        wait_for(lambda: self._visible(driver, 'confirm'), 10, 'the confirm dialog')
        attempt.mark_submitted()
        self._click(driver, 'confirm')
        attempt.progress(85)
        url = self._wait_for_outcome(driver, attempt)
        self._verify(driver, url, attempt)
        attempt.progress(100)
        return url

    def check_login(self, driver, account):
        try:
            self._log_in(driver, account)
        except LoginExpired as expired:
            return False, str(expired)
        status, text = fetch(driver, 'GET', self.base_url + PATHS['me'])
        if status != 200:
            return False, f'the platform answered {status} to the login check'
        return True, f'logged in as {json.loads(text).get("name")}'

    # -- steps ---------------------------------------------------------------------------

    def _log_in(self, driver, account):
        import_cookies(driver, self.base_url, parse_cookies(account['cookies']))
        driver.get(self.base_url + PATHS['write'])
        if driver.current_url.split('?')[0].endswith(PATHS['login']):
            raise LoginExpired('沙盒平台登录已失效：请在账号页更新 Cookie (the stored sandbox login has expired)')
        wait_for(lambda: self._find(driver, 'editor'), 10, 'the editor to load')

    def _fill(self, driver, attempt):
        title_value, body_text = driver.execute_script(
            FILL_JS, self._find(driver, 'title'), self._find(driver, 'editor'), attempt.body_html, attempt.title)
        if title_value != attempt.title or not body_text.strip():
            raise PublishError('the editor did not take the title or the body; nothing was published')

    def _wait_for_outcome(self, driver, attempt):
        """The article URL once the platform shows the article; else why not. A failure
        after the click may still have published (a lost response), so look first."""
        def settled():
            try:
                if ARTICLE_URL.search(driver.current_url):
                    return ('published', driver.current_url)
                shown = driver.execute_script(SHOWN_ERROR_JS, SELECTORS['error'][0])
            except WebDriverException:
                driver.current_url  # raises again when the browser itself is gone
                return None  # the page was navigating to the article: look again
            return ('refused', *shown) if shown else None

        outcome = wait_for(settled, min(60.0, attempt.seconds_left), 'the platform to answer the publish')
        if outcome[0] == 'published':
            return outcome[1]
        code, message = outcome[1], outcome[2]
        if code == 'not_logged_in':
            raise LoginExpired(f'沙盒平台登录已失效：请在账号页更新 Cookie ({message})')
        if code in REFUSALS:
            reason, retryable = REFUSALS[code]
            raise PublishError(f'{reason}: {message}', retryable=retryable, refused=True)
        earlier = self._find_published(driver, attempt)
        if earlier:
            return earlier
        raise PublishError(f'the platform did not publish the article: {message} ({code or "no code"})',
                           refused=True)

    def _verify(self, driver, url, attempt):
        if driver.current_url != url:
            driver.get(url)
        heading = wait_for(lambda: self._find(driver, 'article_title'), 10, 'the article page')
        if heading.text.strip() != attempt.title.strip():
            raise PublishError(f'the article page at {url} shows another title: {heading.text!r}')

    def _find_published(self, driver, attempt):
        """The URL of this article if this account already published it (same title and
        body) since the first attempt began; None otherwise."""
        status, text = fetch(driver, 'GET', self.base_url + PATHS['my_articles'])
        if status == 401:
            raise LoginExpired('沙盒平台登录已失效：请在账号页更新 Cookie (the stored sandbox login has expired)')
        if status != 200:
            raise PublishError(f'could not list the account\'s articles to rule out a duplicate ({status})')
        since = (attempt.first_started_at or datetime.datetime.min) - CLOCK_SLACK
        wanted = content.html_fingerprint(attempt.body_html)
        for article in json.loads(text)['articles']:
            created = datetime.datetime.fromisoformat(article['created_at']).replace(tzinfo=None)
            if article['title'] == attempt.title and created >= since:
                driver.get(article['url'])
                body = wait_for(lambda: self._find(driver, 'article_body'), 10, 'the earlier article')
                if content.fingerprint(body.get_attribute('textContent')) == wanted:
                    return article['url']
        return None

    # -- the selector table ------------------------------------------------------------

    def _find(self, driver, name):
        for selector in SELECTORS[name]:
            try:
                found = driver.find_elements(By.CSS_SELECTOR, selector)
            except WebDriverException:
                found = []
            if found:
                return found[0]
        return None

    def _visible(self, driver, name):
        element = self._find(driver, name)
        return element if element is not None and element.is_displayed() else None

    def _click(self, driver, name):
        element = self._find(driver, name)
        if element is None:
            raise PublishError(f'the page has no {name} button any more ({", ".join(SELECTORS[name])}); '
                               'the platform may have changed its page')
        element.click()
