"""The browser steps every publisher shares (publishers/browser.py), in real headless Chromium
on pages of the test's own."""

import urllib.parse

import pytest

from publishers.base import PublishError
from publishers.browser import click

BUTTON_PAGE = """<!doctype html>
<body style="margin: 0">
<div style="height: 3000px">far above the button</div>
<button id="go" type="button">go</button>
<div id="cover" style="position: fixed; inset: 0; background: white" hidden></div>
<script>
window.clicks = [];
document.getElementById('go').addEventListener('click', event => window.clicks.push(event.isTrusted));
</script>
</body>"""


@pytest.fixture
def page(headless_browser):
    headless_browser.get('data:text/html;charset=utf-8,' + urllib.parse.quote(BUTTON_PAGE))
    return headless_browser


def clicks(driver):
    return driver.execute_script('return window.clicks')


def test_click_sends_one_trusted_click_to_the_first_selector_that_matches(page):
    click(page, ('#missing', '#go'), 'go button')

    assert clicks(page) == [True]


def test_click_scrolls_an_element_below_the_fold_into_view(page):
    assert page.execute_script('return window.scrollY') == 0

    click(page, ('#go',), 'go button')

    assert page.execute_script('return window.scrollY') > 0
    assert clicks(page) == [True]


def test_click_on_a_covered_element_clicks_nothing_and_says_what_covers_it(page):
    page.execute_script("document.getElementById('cover').hidden = false")

    with pytest.raises(PublishError, match=r'go button is covered by another element \(<div id="cover"'):
        click(page, ('#go',), 'go button')

    assert clicks(page) == []


def test_click_without_a_matching_element_names_the_selectors_it_tried(page):
    with pytest.raises(PublishError, match=r'no publish button any more \(#publish, button\.primary\)'):
        click(page, ('#publish', 'button.primary'), 'publish button')

    assert clicks(page) == []
