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

import content
from publishers.base import LoginExpired, Publisher, PublishError
from publishers.browser import click, fetch, import_cookies, rehost_pictures, upload_bytes, wait_for

PATHS = {
    'write': '/write',
    'login': '/login',
    'me': '/api/me',
    'my_articles': '/api/me/articles',
    'images': '/api/images',
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

# Page scripts. Each is one WebDriver round trip: under load every round trip waits for the
# CPU, so a step reads or does what it needs in one script rather than element by element,
# and nothing is polled. Each takes selector lists from SELECTORS and uses the first match.
FIRST_MATCH = """
const first = selectors => {
  for (const selector of selectors) {
    const element = document.querySelector(selector);
    if (element) return element;
  }
  return null;
};
const shownError = selectors => {
  const error = first(selectors);
  if (!error || error.hidden || !error.textContent.trim()) return null;
  return [error.dataset.code || '', error.textContent.trim()];
};
"""
EDITOR_STATE_JS = FIRST_MATCH + """
return [location.pathname, Boolean(first(arguments[0]))];
"""
FILL_JS = FIRST_MATCH + """
const [titleSelectors, editorSelectors, html, text] = arguments;
const title = first(titleSelectors), editor = first(editorSelectors);
if (!title || !editor) return null;
title.focus();
title.value = text;
title.dispatchEvent(new Event('input', {bubbles: true}));
editor.focus();
const data = new DataTransfer();
data.setData('text/html', html);
editor.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
return [title.value, editor.textContent];
"""
CONFIRM_STATE_JS = FIRST_MATCH + """
const confirm = first(arguments[0]);
if (confirm && confirm.checkVisibility()) return ['confirm'];
const error = shownError(arguments[1]);
return error ? ['refused', ...error] : null;
"""
# Resolves when the editor shows an error. When the page goes to the article instead,
# chromedriver ends the script (as a script timeout) and the URL tells the outcome.
OUTCOME_JS = FIRST_MATCH + """
const selectors = arguments[0], done = arguments[arguments.length - 1];
if (/\\/p\\/\\d+$/.test(location.pathname)) return done(['published', location.href]);
const report = () => {
  const error = shownError(selectors);
  if (error) {
    observer.disconnect();
    done(['refused', ...error]);
  }
};
const observer = new MutationObserver(report);
observer.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
report();
"""
TEXT_JS = FIRST_MATCH + """
const element = first(arguments[0]);
return element ? element.textContent : null;
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
            self._open_editor(driver)
        body = rehost_pictures(attempt, lambda picture: self._upload(driver, picture), start=30, end=55)
        self._fill(driver, attempt, body)
        attempt.progress(60)
        click(driver, SELECTORS['publish'], 'publish button')
        self._expect_confirm_dialog(driver)
        attempt.mark_submitted()
        click(driver, SELECTORS['confirm'], 'confirm button')
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
        import_cookies(driver, self.base_url, account['cookies'])
        self._open_editor(driver)

    def _open_editor(self, driver):
        driver.get(self.base_url + PATHS['write'])
        path, has_editor = driver.execute_script(EDITOR_STATE_JS, SELECTORS['editor'])
        if path.endswith(PATHS['login']):
            raise LoginExpired('沙盒平台登录已失效：请在账号页更新 Cookie (the stored sandbox login has expired)')
        if not has_editor:
            wait_for(lambda: driver.execute_script(EDITOR_STATE_JS, SELECTORS['editor'])[1], 10, 'the editor to load')

    def _upload(self, driver, picture):
        """One picture onto the platform's image host, as its editor uploads a pasted one."""
        status, text = upload_bytes(driver, 'POST', self.base_url + PATHS['images'], picture.data,
                                    {'content-type': picture.mime})
        if status == 401:
            raise LoginExpired('沙盒平台登录已失效：请在账号页更新 Cookie (the stored sandbox login has expired)')
        if status != 201:
            raise PublishError(f'the platform refused the picture ({status}): {text[:200]}', retryable=status >= 500)
        return json.loads(text)['url']

    def _fill(self, driver, attempt, body_html):
        filled = driver.execute_script(FILL_JS, SELECTORS['title'], SELECTORS['editor'], body_html,
                                       attempt.title)
        if filled is None:
            raise PublishError(f'the page has no title field or editor any more ({SELECTORS["title"]}, '
                               f'{SELECTORS["editor"]}); the platform may have changed its page')
        title_value, body_text = filled
        if title_value != attempt.title or not body_text.strip():
            raise PublishError('the editor did not take the title or the body; nothing was published')

    def _expect_confirm_dialog(self, driver):
        """The editor opens its confirm dialog on the click, or shows why not (nothing is sent yet)."""
        state = wait_for(lambda: driver.execute_script(CONFIRM_STATE_JS, SELECTORS['confirm'], SELECTORS['error']),
                         10, 'the confirm dialog')
        if state[0] == 'refused':
            self._raise_refusal(state[1], state[2])

    def _wait_for_outcome(self, driver, attempt):
        """The article URL once the platform shows the article; else why not. A failure
        after the click may still have published (a lost response), so look first."""
        driver.set_script_timeout(min(60.0, attempt.seconds_left))
        try:
            outcome = driver.execute_async_script(OUTCOME_JS, SELECTORS['error'])
        except WebDriverException:
            outcome = None  # chromedriver ends the script with a timeout when the page leaves for the article
        url = driver.current_url
        if ARTICLE_URL.search(url):
            return url
        if outcome is None:
            raise PublishError('gave up waiting for the platform to answer the publish')
        if outcome[0] == 'published':
            return outcome[1]
        code, message = outcome[1], outcome[2]
        if code in REFUSALS or code == 'not_logged_in':
            self._raise_refusal(code, message)
        earlier = self._find_published(driver, attempt)
        if earlier:
            return earlier
        raise PublishError(f'the platform did not publish the article: {message} ({code or "no code"})',
                           refused=True)

    def _raise_refusal(self, code, message):
        if code == 'not_logged_in':
            raise LoginExpired(f'沙盒平台登录已失效：请在账号页更新 Cookie ({message})')
        reason, retryable = REFUSALS.get(code, ('the platform refused the article', True))
        raise PublishError(f'{reason}: {message}', retryable=retryable, refused=True)

    def _verify(self, driver, url, attempt):
        if driver.current_url != url:
            driver.get(url)
        heading = wait_for(lambda: driver.execute_script(TEXT_JS, SELECTORS['article_title']), 10, 'the article page')
        if heading.strip() != attempt.title.strip():
            raise PublishError(f'the article page at {url} shows another title: {heading!r}')

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
                body = wait_for(lambda: driver.execute_script(TEXT_JS, SELECTORS['article_body']), 10,
                                'the earlier article')
                if content.fingerprint(body) == wanted:
                    return article['url']
        return None
