"""The WordPress the tests run (tests/wordpress_site.py) is real, answers, and leaves nothing behind."""

import itertools
import tempfile
import urllib.request

import pymysql

from conftest import MYSQL_HOST, MYSQL_PORT
from wordpress_site import WordPressSite, require_wordpress

names = itertools.count(1)


def unique(name):
    return f'{name}{next(names)}'


def test_installed_site_answers_its_login_page(wordpress_site):
    with urllib.request.urlopen(wordpress_site.url + '/wp-login.php', timeout=10) as response:
        page = response.read().decode()

    assert response.status == 200
    assert 'id="user_login"' in page and 'id="wp-submit"' in page


def test_added_author_shows_up_with_their_posts_of_every_status(wordpress_site):
    author, other = unique('author'), unique('other')
    author_id = wordpress_site.add_user(author, 'secret')
    wordpress_site.add_user(other, 'secret')
    for status in ('draft', 'pending', 'publish', 'trash'):
        wordpress_site.add_post(author, f'{status} 文章 🙂', f'<p>{status}</p>', status=status)
    wordpress_site.add_post(other, 'not theirs', '<p>other</p>', status='publish')

    posts = wordpress_site.posts(author=author)

    assert isinstance(author_id, int)
    assert [post['status'] for post in posts] == ['draft', 'pending', 'publish', 'trash']
    assert {post['author'] for post in posts} == {author}
    assert posts[2]['title'] == 'publish 文章 🙂'
    assert posts[2]['link'].startswith(wordpress_site.url)
    assert wordpress_site.posts(author=unique('nobody')) == []


def test_faults_are_set_and_cleared(wordpress_site):
    wordpress_site.set_fault('slow_publish', 2)
    wordpress_site.set_fault('lose_publish_answer', True)

    assert wordpress_site.faults() == {'slow_publish': '2', 'lose_publish_answer': '1'}

    wordpress_site.clear_faults()

    assert wordpress_site.faults() == {}


def test_stopped_site_leaves_no_server_database_user_config_or_files():
    require_wordpress()
    site = WordPressSite(tempfile.mkdtemp(prefix='topn-wordpress-')).start()
    process, database, config_file, workdir = site.process, site.database, site.config_file, site.workdir

    site.stop()

    assert process.poll() is not None
    assert not config_file.exists() and not workdir.exists()
    connection = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user='root', password='')
    try:
        with connection.cursor() as cursor:
            assert cursor.execute('SHOW DATABASES LIKE %s', (database,)) == 0
            assert cursor.execute('SELECT 1 FROM mysql.user WHERE user = %s', (database,)) == 0
    finally:
        connection.close()
