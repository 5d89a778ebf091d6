"""Articles with pictures: admitted only with real pictures by their bytes, stored with the task,
and re-hosted on every platform they are published to (the sandbox's image host, a real
WordPress's media library, the image host of the local stand-in of Zhihu), the published body pointing only at the platform's copies."""

import base64
import hashlib
import http.server
import re
import struct
import threading
import urllib.request
import zlib

import pytest

from accounts import AccountStore
from conftest import SECRET, all_finished, count_tasks, create, tasks, wait_until
from publishers import load_publishers


def png(red, green, blue, size=2):
    """A real PNG of one colour, different bytes for every colour."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    rows = b''.join(b'\x00' + bytes((red, green, blue)) * size for _ in range(size))
    header = struct.pack('>IIBBBBB', size, size, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')


GIF = (b'GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,'
       b'\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;')
LOCAL_A, LOCAL_B, REMOTE = png(200, 10, 10), png(10, 200, 10), png(10, 10, 200)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def b64(data):
    return base64.b64encode(data).decode()


@pytest.fixture(scope='module')
def picture_server():
    """A site of the test that serves the remote picture (and nothing at /missing.png)."""
    class Pictures(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != '/remote.png':
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header('Content-Type', 'image/png')
            self.send_header('Content-Length', str(len(REMOTE)))
            self.end_headers()
            self.wfile.write(REMOTE)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Pictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}'
    server.shutdown()
    server.server_close()


def article_with_pictures(remote_url, title='带图的文章'):
    content = (f'开头 ![第一张](a.png)\n\n中间 ![第二张](images/b.png)\n\n![远程]({remote_url})\n\n'
               '再引用一次 ![第一张again](a.png)\n')
    return {'title': title, 'content': content, 'images': {'a.png': b64(LOCAL_A), 'images/b.png': b64(LOCAL_B)}}


# -- admission ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('images, content, code', [
    ({'a.png': b64(b'%PDF-1.4 not a picture')}, '![x](a.png)', 'invalid_image'),
    ({'a.png': 'not base64!!'}, '![x](a.png)', 'invalid_image'),
    ({}, 'text ![x](never-sent.png)', 'image_missing'),
    ({'a.png': b64(LOCAL_A + b'\0' * 600)}, '![x](a.png)', 'image_too_large'),
    ({}, ' '.join(f'![x](http://example.test/{i}.png)' for i in range(4)), 'too_many_images'),
    ('a.png', '![x](a.png)', 'invalid_images'),
])
def test_bad_pictures_are_refused_with_a_code_naming_the_article_and_create_nothing(
        client, db, make_user, config, images, content, code):
    from conftest import WsgiClient, web_app
    import dataclasses
    small = dataclasses.replace(config, image_max_bytes=512, image_max_count=3)
    client = WsgiClient(web_app(small, db, _scheduler(small, db)))
    alice = make_user('alice')
    good = {'title': 'fine', 'content': 'fine'}

    response = client.post('/api/publish/create_batch', {'platform': 'noop', 'articles': [
        good, {'title': 'with pictures', 'content': content, 'images': images}]}, headers=alice.headers)

    assert response.status == 400, response.body
    assert response.json['error']['code'] == code
    assert response.json['error']['article_index'] == 1
    assert count_tasks(db) == 0


def test_a_picture_is_judged_by_its_bytes_not_its_name(client, db, make_user):
    alice = make_user('alice')
    article = {'title': 'gif named png', 'content': '![x](really-a-gif.png)', 'images': {'really-a-gif.png': b64(GIF)}}

    response = client.post('/api/publish/create_batch', {'platform': 'noop', 'articles': [article]},
                           headers=alice.headers)

    assert response.status == 200, response.body
    [(name, mime, data)] = db.task_pictures(response.json['task_ids'][0])
    assert (name, mime, bytes(data)) == ('really-a-gif.png', 'image/gif', GIF)


def _scheduler(config, db):
    from scheduler import Scheduler, connect_redis
    return Scheduler(config, db, connect_redis(config.redis_url), load_publishers(config))


# -- the sandbox -------------------------------------------------------------------------------------

@pytest.fixture
def sandbox_service(start_service, platform, tmp_path):
    platform.call('POST', '/api/reset')

    def start(**env):
        return start_service(TOPN_SANDBOX_URL=platform.url, TOPN_SECRET_KEY=SECRET,
                             TOPN_STATE_DIR=str(tmp_path / 'state'), TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'),
                             **env)
    return start


@pytest.fixture
def sandbox_writer(make_user, db, config, platform):
    user = make_user('writer')
    AccountStore(db, SECRET).save(user.id, load_publishers(config)['sandbox'],
                                  {'cookies': platform.session_for('writer')})
    return user


def published_body(platform, article):
    with urllib.request.urlopen(article['url'], timeout=10) as response:
        page = response.read().decode()
    return page[page.index('article-body'):]


def test_two_local_and_one_remote_picture_are_rehosted_on_the_sandbox_and_nothing_points_elsewhere(
        sandbox_service, sandbox_writer, platform, picture_server):
    service = sandbox_service()
    [task_id] = create(service, sandbox_writer, {'platform': 'sandbox', 'articles': [
        article_with_pictures(picture_server + '/remote.png')]})

    [task] = wait_until(lambda: all_finished(service, sandbox_writer, [task_id]), timeout=90, message='the task')

    assert task['status'] == 'success', task
    hosted = platform.call('GET', '/api/images')['images']
    assert sorted(image['sha256'] for image in hosted) == sorted(map(sha, (LOCAL_A, LOCAL_B, REMOTE)))
    for image in hosted:
        with urllib.request.urlopen(image['url'], timeout=10) as response:
            assert sha(response.read()) == image['sha256']
    [article] = platform.articles()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', published_body(platform, article))
    assert len(sources) == 4 and set(sources) == {image['url'] for image in hosted}
    assert picture_server not in published_body(platform, article)


def test_a_retry_after_a_failed_upload_uploads_no_picture_twice_and_publishes_once(
        sandbox_service, sandbox_writer, platform, picture_server, db):
    service = sandbox_service()
    platform.faults(fail_image_upload=2)  # the first picture goes up, the second upload fails
    [task_id] = create(service, sandbox_writer, {'platform': 'sandbox', 'articles': [
        article_with_pictures(picture_server + '/remote.png')]})

    [task] = wait_until(lambda: all_finished(service, sandbox_writer, [task_id]), timeout=90, message='the task')

    assert (task['status'], task['retry_count']) == ('success', 1), task
    outcomes = [(h['outcome'], h['error'] or '') for h in db.history(task_id)]
    assert outcomes[0][0] == 'failed' and 'images/b.png' in outcomes[0][1], 'the failed upload names its picture'
    hosted = platform.call('GET', '/api/images')['images']
    assert sorted(image['sha256'] for image in hosted) == sorted(map(sha, (LOCAL_A, LOCAL_B, REMOTE)))
    assert len(platform.articles()) == 1


def test_a_remote_picture_that_cannot_be_fetched_fails_naming_its_url(
        sandbox_service, sandbox_writer, platform, picture_server):
    service = sandbox_service(TOPN_MAX_RETRIES=1)
    missing = picture_server + '/missing.png'
    [task_id] = create(service, sandbox_writer, {'platform': 'sandbox', 'articles': [
        {'title': '图没了', 'content': f'![没了]({missing})'}]})

    [task] = wait_until(lambda: all_finished(service, sandbox_writer, [task_id]), timeout=90, message='the task')

    assert (task['status'], task['retry_count']) == ('failed', 1), 'retried once: the site may answer later'
    assert missing in task['error_message']
    assert platform.articles() == [] and platform.call('GET', '/api/images')['images'] == []


# -- a real WordPress ------------------------------------------------------------------------------

def test_pictures_become_attachments_of_the_wordpress_post_served_from_its_uploads(
        start_service, make_user, db, config, wordpress_site, picture_server, tmp_path):
    service = start_service(TOPN_SECRET_KEY=SECRET, TOPN_STATE_DIR=str(tmp_path / 'state'),
                            TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'))
    wordpress_site.add_user('picture_author', 'pw-pictures')
    user = make_user('picture_author')
    AccountStore(db, SECRET).save(user.id, load_publishers(config)['wordpress'], {
        'site': wordpress_site.url, 'username': 'picture_author', 'password': 'pw-pictures'})
    [task_id] = create(service, user, {'platform': 'wordpress', 'articles': [
        article_with_pictures(picture_server + '/remote.png', title='WordPress 带图')]})

    [task] = wait_until(lambda: all_finished(service, user, [task_id]), timeout=120, message='the post')

    assert task['status'] == 'success', task
    [post] = wordpress_site.posts(author='picture_author')
    attached = wordpress_site.php("""
        $found = array();
        foreach (get_attached_media('image', $args['post']) as $media) { $found[] = wp_get_attachment_url($media->ID); }
        return $found;
    """, post=post['id'])
    assert len(attached) == 3
    fetched = set()
    for url in attached:
        assert url.startswith(wordpress_site.url + '/wp-content/uploads/')
        with urllib.request.urlopen(url, timeout=10) as response:
            fetched.add(sha(response.read()))
    assert fetched == set(map(sha, (LOCAL_A, LOCAL_B, REMOTE)))
    sources = set(re.findall(r'<img [^>]*src="([^"]*)"', post['content']))
    assert sources == set(attached), 'the body references only the media library copies'
    assert tasks(service, user, [task_id])[0]['result_url'] == post['link']


# -- the stand-in of Zhihu -------------------------------------------------------------------------

def test_pictures_go_to_zhihus_image_host_by_their_bytes_and_the_article_shows_only_those(
        start_service, make_user, db, config, standin, picture_server, tmp_path):
    from conftest import zhihu_environment
    service = start_service(TOPN_SECRET_KEY=SECRET, TOPN_STATE_DIR=str(tmp_path / 'state'),
                            TOPN_BROWSER_ROOT=str(tmp_path / 'browsers'), TOPN_PACING_ZHIHU=0,
                            **zhihu_environment(standin))
    user = make_user('zhihu_writer')
    cookies = standin.add_account('zhihu_writer')
    AccountStore(db, SECRET).save(user.id, load_publishers(config)['zhihu'], {'cookies': cookies})
    [task_id] = create(service, user, {'platform': 'zhihu', 'articles': [
        article_with_pictures(picture_server + '/remote.png', title='知乎带图')]})

    [task] = wait_until(lambda: all_finished(service, user, [task_id]), timeout=120, message='the Zhihu article')

    assert task['status'] == 'success', task
    [article] = standin.published(cookies)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', article['content'])
    assert len(sources) == 4 and all(source.startswith(standin.urls['pictures'] + '/') for source in sources)
    assert {sha(standin.hosted_picture(source)[1]) for source in sources} == set(map(sha, (LOCAL_A, LOCAL_B, REMOTE)))
    assert len(standin.picture_uploads) == 3
    assert picture_server not in article['content']


# -- the page ------------------------------------------------------------------------------------------

def test_the_page_publishes_a_markdown_file_with_its_picture_in_a_real_browser(
        sandbox_service, sandbox_writer, platform, headless_browser, tmp_path):
    from selenium.webdriver.common.by import By
    service = sandbox_service()
    folder = tmp_path / 'upload'
    folder.mkdir()
    (folder / '游记.md').write_text('# 山里的一天\n\n清晨的山谷：\n\n![山谷](pictures/valley.png)\n', encoding='utf-8')
    (folder / 'valley.png').write_bytes(LOCAL_A)
    chrome = headless_browser

    chrome.get(service.url + '/login')
    chrome.find_element(By.NAME, 'username').send_keys('writer')
    chrome.find_element(By.NAME, 'password').send_keys('secret')
    chrome.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type=submit]').click()
    wait_until(lambda: chrome.find_elements(By.ID, 'batch-form'), timeout=10, message='the page after logging in')
    chrome.find_element(By.CSS_SELECTOR, '#batch-form input[type=file]').send_keys(
        f'{folder / "游记.md"}\n{folder / "valley.png"}')
    wait_until(lambda: chrome.execute_script(
        'return [...document.querySelectorAll(".picture-name")].map(n => n.textContent)') == ['valley.png'],
        timeout=10, message='the picture attached to the form')
    chrome.find_element(By.CSS_SELECTOR, '#batch-form button.primary').click()

    wait_until(lambda: [a['title'] for a in platform.articles()] == ['山里的一天'], timeout=90,
               message='the article on the sandbox')
    [hosted] = platform.call('GET', '/api/images')['images']
    assert hosted['sha256'] == sha(LOCAL_A)
    [article] = platform.articles()
    assert re.findall(r'<img [^>]*src="([^"]*)"', published_body(platform, article)) == [hosted['url']]
