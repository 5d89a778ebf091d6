"""A local STAND-IN for the few Zhihu endpoints and pages TOP_N's Zhihu publisher uses. It is not Zhihu.

zhihu.com cannot be reached from our machines, so the Zhihu publisher is tested against this small
Bottle app instead. It copies what public tools document about Zhihu (paths, request shapes, the
four session cookies, the `x-xsrftoken` check, drafts published under their own id, topics,
`js-initialData` on `/p/<id>`); where Zhihu's exact answers are unknown (error codes, messages,
topic ids) the values here are our guesses and say nothing about the real site.

One app serves both the zhuanlan and the www paths. Given `zhuanlan_host` and `www_host`, it
answers each path only on its own host, and it sends no CORS headers, like a strict Zhihu would.
Tests drive it through `ZhihuStandIn` methods: make accounts, set fault knobs, count articles.
"""

import html
import itertools
import json
import secrets
import threading
import time

import bottle

TITLE_MAX_CHARS = 100
REQUIRED_COOKIES = ('z_c0', 'd_c0', '_xsrf', '__zse_ck')
NOT_FOUND_TITLE = '你似乎来到了没有知识存在的荒原 - 知乎'
TOPICS = (  # stand-in catalogue: invented ids
    {'id': '90000001', 'type': 'topic', 'name': 'Python'},
    {'id': '90000002', 'type': 'topic', 'name': 'Python 入门'},
    {'id': '90000003', 'type': 'topic', 'name': '编程'},
    {'id': '90000004', 'type': 'topic', 'name': '机器学习'},
    {'id': '90000005', 'type': 'topic', 'name': '爬虫 (计算机网络)'},
)


class ZhihuStandIn:
    """The stand-in's state (accounts, drafts, fault knobs) and the Bottle app around it."""

    def __init__(self, zhuanlan_host=None, www_host=None):
        self.hosts = {'zhuanlan': zhuanlan_host, 'www': www_host}
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.accounts = {}             # z_c0 value -> account dict
            self.drafts = {}               # id -> draft dict (published ones too: Zhihu keeps the id)
            self.calls = []                # (method, path) of every API request, for assertions
            self.ids = itertools.count(2000000000000000001)
            self.lose_publish_answers = 0  # publish, then answer 502 this many times
            self.throttled = False         # answer every write with 429 操作过于频繁
            self.page_lag = 0              # /p/<id> hides a fresh article this many times

    # -- for tests --------------------------------------------------------------------

    def add_account(self, name):
        """A logged-in account; returns its cookies as a browser's devtools would copy them."""
        cookies = {
            'z_c0': f'"2|1:0|10:{int(time.time())}|4:z_c0|92:{secrets.token_urlsafe(24)}|{secrets.token_hex(8)}"',
            'd_c0': f'"{secrets.token_urlsafe(16)}|{int(time.time())}"',
            '_xsrf': secrets.token_hex(16),
            '__zse_ck': f'004_{secrets.token_urlsafe(30)}',
        }
        with self.lock:
            self.accounts[cookies['z_c0']] = {'id': secrets.token_hex(16), 'name': name,
                                              'cookies': cookies, 'expired': False}
        return '; '.join(f'{key}={value}' for key, value in cookies.items())

    def expire(self, cookie_string):
        with self.lock:
            self._account_of(cookie_string)['expired'] = True

    def make_draft(self, cookie_string, title, content=''):
        with self.lock:
            return self._new_draft(self._account_of(cookie_string), title, content)['id']

    def make_article(self, cookie_string, title, content, page_lag=0):
        """An article already published (with a topic), whose page hides it `page_lag` times."""
        with self.lock:
            draft = self._new_draft(self._account_of(cookie_string), title, content)
            draft.update(topics=[dict(TOPICS[0])], state='published', created=int(time.time()), page_lag=page_lag)
            return draft['id']

    def published(self, cookie_string=None):
        """Published articles, of one account or of all."""
        with self.lock:
            owner = self._account_of(cookie_string)['id'] if cookie_string else None
            return [dict(d) for d in self.drafts.values()
                    if d['state'] == 'published' and owner in (None, d['author'])]

    def drafts_of(self, cookie_string):
        with self.lock:
            owner = self._account_of(cookie_string)['id']
            return [dict(d) for d in self.drafts.values() if d['author'] == owner]

    def _account_of(self, cookie_string):
        z_c0 = dict(part.strip().split('=', 1) for part in cookie_string.split(';'))['z_c0']
        return self.accounts[z_c0]

    def _new_draft(self, account, title, content):
        draft_id = str(next(self.ids))
        draft = {'id': draft_id, 'author': account['id'], 'title': title, 'content': content,
                 'topics': [], 'state': 'draft', 'created': None, 'page_lag': 0}
        self.drafts[draft_id] = draft
        return draft

    # -- the app ----------------------------------------------------------------------

    def make_app(self):
        app = bottle.Bottle()
        app.add_hook('before_request', self._log_call)
        on_zhuanlan, on_www = self._host_check('zhuanlan'), self._host_check('www')

        app.route('/robots.txt', 'GET', lambda: self._text('User-agent: *\n# Zhihu stand-in\n'))
        app.route('/api/v4/me', 'GET', on_www(self.me))
        app.route('/api/v4/content/publish', 'POST', on_www(self.publish))
        app.route('/api/articles/drafts', 'POST', on_zhuanlan(self.create_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/draft', 'GET', on_zhuanlan(self.read_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/draft', 'PATCH', on_zhuanlan(self.save_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/topics', 'POST', on_zhuanlan(self.add_topic))
        app.route('/api/autocomplete/topics', 'GET', on_zhuanlan(self.search_topics))
        app.route('/p/<draft_id:re:\\d+>', 'GET', on_zhuanlan(self.article_page))
        return app

    def _host_check(self, kind):
        def wrap(handler):
            def checked(**kwargs):
                expected = self.hosts[kind]
                if expected and bottle.request.urlparts.hostname != expected:
                    return self._error(404, 404, f'stand-in: this path lives on {expected}')
                with self.lock:
                    return handler(**kwargs)
            return checked
        return wrap

    def _log_call(self):
        if bottle.request.path.startswith('/api/'):
            with self.lock:
                self.calls.append((bottle.request.method, bottle.request.path))

    # -- session checks -----------------------------------------------------------------

    def _session(self, write=False):
        """The account the request's cookies log in, or an HTTPResponse refusing it."""
        cookies = {}
        for part in (bottle.request.get_header('Cookie') or '').split(';'):
            name, _, value = part.strip().partition('=')
            cookies[name] = value
        account = self.accounts.get(cookies.get('z_c0'))
        if account is None:
            return self._error(401, 101, '身份未经过验证', 'AuthenticationError')
        if account['expired']:
            return self._error(401, 100, 'ERR_LOGIN_TICKET_EXPIRED', 'AuthenticationInvalidRequest')
        if any(cookies.get(name) != account['cookies'][name] for name in REQUIRED_COOKIES):
            return self._error(403, 10003, '请求参数异常，请升级客户端后重试')
        if write:
            if bottle.request.get_header('x-xsrftoken') != cookies['_xsrf']:
                return self._error(403, 10001, 'XSRF 校验失败')
            if bottle.request.get_header('x-requested-with') != 'fetch':
                return self._error(403, 10002, '请求来源异常')
            if self.throttled:
                return self._error(429, 10005, '操作过于频繁，请稍后再试')
        return account

    def _own_draft(self, account, draft_id):
        draft = self.drafts.get(draft_id)
        if draft is None or draft['author'] != account['id']:
            return self._error(404, 404, '草稿不存在')
        return draft

    # -- endpoints ------------------------------------------------------------------------

    def me(self):
        account = self._session()
        if isinstance(account, bottle.HTTPResponse):
            return account
        return self._json({'id': account['id'], 'name': account['name'], 'url_token': account['name']})

    def create_draft(self):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        body = bottle.request.json or {}
        if len(body.get('title') or '') > TITLE_MAX_CHARS:
            return self._error(400, 400, f'标题最多 {TITLE_MAX_CHARS} 个字')
        draft = self._new_draft(account, body.get('title') or '', body.get('content') or '')
        return self._json({'id': draft['id'], 'title': draft['title'], 'content': draft['content'],
                           'url': f'{self._base()}/p/{draft["id"]}'})

    def read_draft(self, draft_id):
        account = self._session()
        if isinstance(account, bottle.HTTPResponse):
            return account
        draft = self._own_draft(account, draft_id)
        if isinstance(draft, bottle.HTTPResponse):
            return draft
        return self._json({key: draft[key] for key in ('id', 'title', 'content')})

    def save_draft(self, draft_id):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        draft = self._own_draft(account, draft_id)
        if isinstance(draft, bottle.HTTPResponse):
            return draft
        body = bottle.request.json or {}
        if len(body.get('title') or '') > TITLE_MAX_CHARS:
            return self._error(400, 400, f'标题最多 {TITLE_MAX_CHARS} 个字')
        draft.update(title=body.get('title', draft['title']), content=body.get('content', draft['content']))
        return bottle.HTTPResponse(status=200, body='')

    def search_topics(self):
        account = self._session()
        if isinstance(account, bottle.HTTPResponse):
            return account
        token = (bottle.request.query.getunicode('token') or '').strip().lower()
        limit = int(bottle.request.query.get('max_matches') or 5)
        found = [dict(topic) for topic in TOPICS if token and token in topic['name'].lower()]
        return self._json(found[:limit])

    def add_topic(self, draft_id):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        draft = self._own_draft(account, draft_id)
        if isinstance(draft, bottle.HTTPResponse):
            return draft
        topic_id = (bottle.request.json or {}).get('id')
        topic = next((dict(t) for t in TOPICS if t['id'] == topic_id), None)
        if topic is None:
            return self._error(400, 400, '话题不存在')
        if topic_id not in [t['id'] for t in draft['topics']]:
            draft['topics'].append(topic)
        return self._json(draft['topics'])

    def publish(self):
        """Publishes a draft under its own id: publishing it again updates, never duplicates.
        Refusals come as HTTP 200 with a non-zero code, as Zhihu's publish endpoint does."""
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        body = bottle.request.json or {}
        draft_ref = (body.get('data') or {}).get('draft') or {}
        if body.get('action') != 'article' or draft_ref.get('disabled') != 1:
            return self._json({'code': 400, 'message': '请求参数错误'})
        draft = self._own_draft(account, str(draft_ref.get('id')))
        if isinstance(draft, bottle.HTTPResponse):
            return draft
        if not draft['title'].strip():
            return self._json({'code': 4001, 'message': '请输入标题'})
        if not draft['content'].strip():
            return self._json({'code': 4002, 'message': '发布内容不能为空'})
        if not draft['topics']:
            return self._json({'code': 4003, 'message': '请至少添加一个话题'})
        if draft['state'] != 'published':
            draft.update(state='published', created=int(time.time()), page_lag=self.page_lag)
        if self.lose_publish_answers > 0:
            self.lose_publish_answers -= 1
            return bottle.HTTPResponse(status=502, body='<html><body>502 Bad Gateway</body></html>')
        result = {'publish': {'id': draft['id'], 'type': 'article', 'url': f'{self._base()}/p/{draft["id"]}'}}
        return self._json({'code': 0, 'message': 'success',
                           'data': {'publish_type': 'article', 'result': json.dumps(result)}})

    def article_page(self, draft_id):
        """The public article page: js-initialData for a published article, the not-found page otherwise."""
        draft = self.drafts.get(draft_id)
        if draft is not None and draft['state'] == 'published' and draft['page_lag'] > 0:
            draft['page_lag'] -= 1
            draft = None
        if draft is None or draft['state'] != 'published':
            page = f'<!doctype html><html><head><title>{NOT_FOUND_TITLE}</title></head><body>404</body></html>'
            return bottle.HTTPResponse(status=404, body=page, headers={'Content-Type': 'text/html; charset=utf-8'})
        url = f'{self._base()}/p/{draft_id}'
        article = {'id': draft_id, 'type': 'article', 'articleType': 'normal', 'state': 'published',
                   'status': 0, 'isVisible': True, 'isNormal': True, 'url': url, 'title': draft['title'],
                   'content': draft['content'], 'created': draft['created'], 'author': {'id': draft['author']},
                   'topics': draft['topics']}
        initial = json.dumps({'initialState': {'entities': {'articles': {draft_id: article}}}},
                             ensure_ascii=False).replace('</', '<\\/')
        page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(draft["title"])} - 知乎'
                f'</title><link rel="canonical" href="{url}"></head><body><article>{draft["content"]}</article>'
                f'<script id="js-initialData" type="text/json">{initial}</script></body></html>')
        return bottle.HTTPResponse(status=200, body=page, headers={'Content-Type': 'text/html; charset=utf-8'})

    # -- answers --------------------------------------------------------------------------

    def _base(self):
        parts = bottle.request.urlparts
        return f'{parts.scheme}://{parts.netloc}'

    @staticmethod
    def _json(data, status=200):
        return bottle.HTTPResponse(status=status, body=json.dumps(data, ensure_ascii=False),
                                   headers={'Content-Type': 'application/json; charset=utf-8'})

    def _error(self, status, code, message, name='ERR'):
        return self._json({'error': {'code': code, 'message': message, 'name': name}}, status)

    @staticmethod
    def _text(text):
        return bottle.HTTPResponse(status=200, body=text, headers={'Content-Type': 'text/plain; charset=utf-8'})
