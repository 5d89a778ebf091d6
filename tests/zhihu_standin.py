"""A local STAND-IN for the few Zhihu endpoints and pages TOP_N's Zhihu publisher uses. It is not Zhihu.

zhihu.com cannot be reached from our machines, so the Zhihu publisher is tested against this small
Bottle app instead. What it does comes from public tools and their users' reports (collected in
shared/research/zhihu.md); where Zhihu's exact answers are unknown (error codes other than 10003,
messages, topic ids, how a page marks an article under review) the values here are our guesses
and say nothing about the real site. It is meant to be no stricter than Zhihu: it insists on
nothing the public tools do not send. Behaviour by behaviour, with its source:

- Session: the cookies `z_c0` (the login), `d_c0` and `__zse_ck`; with `z_c0` alone API calls get
  403 (RSSHub #19228). `GET /api/v4/me` answers the account with its `id` when logged in, 401 when
  the login expired (Wechatsync's zhihu adapter). No `x-xsrftoken`, `x-requested-with` or
  `x-zse-*` header is required: Wechatsync and zhihu_obsidian publish without the signatures, and
  Wechatsync without `x-xsrftoken`.
- `__zse_ck` expires on a schedule (`expire_zse_ck`) and only a page's own script renews it
  (zhihu_obsidian `src/login_service.ts`, PR #77): an API call with an expired or missing one
  answers 403 with code 10003 "请求参数异常，请升级客户端后重试" (frostming/fxzhihu #51); a page
  asked with an expired one (and the question page, the one zhihu_obsidian opens to get one, asked
  without) answers a challenge page whose script sets a fresh `__zse_ck` and reloads.
- Drafts: `POST /api/articles/drafts`, `PATCH|GET /api/articles/<id>/draft` (zhihu_obsidian).
  Topics: `GET /api/autocomplete/topics?token=` and `POST /api/articles/<id>/topics` (ArtiPub,
  zhihu_obsidian); the catalogue below is invented.
- Publishing: `POST /api/v4/content/publish` publishes a draft under its own id, so publishing it
  again updates, never duplicates (zhihu_obsidian); with no topic at all, as a captured 2025-07
  editor request did (jack-base/zhihu-publisher-vscode `publish.har`). It answers `code: 0,
  message: "success"` with `data.result` a JSON string; since 2025-09 its `publish.url` may be
  empty (`answer_without_url`; zhihu_obsidian #82). Refusals come as HTTP 200 with a non-zero
  `code` (`refuse`), as do throttling and risk control answers with their own statuses.
- Article pages `/p/<id>` carry `<script id="js-initialData">` with the article under
  `initialState.entities.articles[id]` (Wechatsync `publication-inspection/zhihu.ts`). They are
  public: a reader without cookies sees them. How an article shows to such a reader is
  `new_article_visibility`: 'public'; 'author_only' (`isVisible: false` to anyone but its author);
  'review' (our guess at an article under review: `isVisible: false` and a `reviewInfo` with
  Zhihu's words); 'soft_404' (HTTP 200 titled 「你似乎来到了没有知识存在的荒原」, Wechatsync).
- Columns: `POST /api/v4/columns/<column>/items {type: "article", id}` files an article into one of
  the account's columns (siyuan-plugin-publisher); `GET` of the same path lists it.
- Pictures by their bytes, as the editor uploads a pasted file (zhihu_obsidian and the
  multi-platform publishers of shared/research/zhihu.md, section Images): `POST /images` on the api
  host with `{image_hash: <md5>, source}` answers an `upload_file` (`image_id`, `object_key`
  `v2-<md5>`, `state` 1 when Zhihu already has those bytes) and an `upload_token`; the bytes go by
  `PUT /<object_key>` to the upload host (a stand-in of Aliyun OSS: it checks the `OSS
  access_id:signature` header, HMAC-SHA1 with the token's access key, as OSS does); `PUT
  /images/<id>/uploading_status` reports the upload; `GET /images/<id>` answers `status`
  'processing' (`processing_polls` times) then 'success'; the pictures host serves
  `/<object_key>.<ext>`. Field names beyond those the tools name, and the processing delay, are
  our guesses.

One app serves the zhuanlan, www and api paths and the two picture hosts. Given their host names,
it answers each path only on its own host, and it sends no CORS headers, like a strict Zhihu would.
Tests drive it through `ZhihuStandIn` methods: make accounts and columns, set fault knobs, read
what was published.
"""

import base64
import hashlib
import hmac
import html
import itertools
import json
import re
import secrets
import threading
import time

import bottle

TITLE_MAX_CHARS = 100
NOT_FOUND_TITLE = '你似乎来到了没有知识存在的荒原 - 知乎'
SIGNATURE_REFUSAL = (403, 10003, '请求参数异常，请升级客户端后重试')
REVIEW_TIPS = '该文章正在审核中，审核通过后将对所有人可见'
CHALLENGE_DELAY_MS = 300
TOPICS = (  # stand-in catalogue: invented ids
    {'id': '90000001', 'type': 'topic', 'name': 'Python'},
    {'id': '90000002', 'type': 'topic', 'name': 'Python 入门'},
    {'id': '90000003', 'type': 'topic', 'name': '编程'},
    {'id': '90000004', 'type': 'topic', 'name': '机器学习'},
    {'id': '90000005', 'type': 'topic', 'name': '爬虫 (计算机网络)'},
)


class ZhihuStandIn:
    """The stand-in's state (accounts, drafts, columns, fault knobs) and the Bottle app around it."""

    ZHIHU_KINDS = ('zhuanlan', 'www', 'api')   # the hosts that share Zhihu's cookies

    def __init__(self, zhuanlan_host=None, www_host=None, api_host=None, upload_host=None, pictures_host=None):
        self.hosts = {'zhuanlan': zhuanlan_host, 'www': www_host, 'api': api_host,
                      'upload': upload_host, 'pictures': pictures_host}
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.accounts = {}             # z_c0 value -> account dict
            self.drafts = {}               # id -> draft dict (published ones too: Zhihu keeps the id)
            self.columns = {}              # column id -> {'owner': account id, 'items': [article ids]}
            self.zse_tokens = set()        # the __zse_ck values Zhihu accepts now
            self.calls = []                # (method, path) of every API request, for assertions
            self.ids = itertools.count(2000000000000000001)
            self.lose_publish_answers = 0  # publish, then answer 502 this many times
            self.refusals = []             # answers the next API writes get instead: (status, code, message)
            self.page_lag = 0              # /p/<id> hides a fresh article this many times
            self.answer_without_url = False
            self.new_article_visibility = 'public'
            self.challenge_passes = True   # False: the challenge page's script never gets a __zse_ck
            self.images = {}               # image id -> {'hash', 'key', 'token', 'state', 'polls_left'}
            self.stored_pictures = {}      # object key -> (mime, bytes) on the image host
            self.picture_uploads = []      # object keys, one per PUT the upload host took
            self.fail_picture_upload = 0   # N: the Nth PUT to the upload host from now answers 500
            self.processing_polls = 1      # how many status polls a fresh picture is still processing

    # -- for tests --------------------------------------------------------------------

    def add_account(self, name):
        """A logged-in account; returns its cookies as a browser's devtools would copy them."""
        cookies = {
            'z_c0': f'"2|1:0|10:{int(time.time())}|4:z_c0|92:{secrets.token_urlsafe(24)}|{secrets.token_hex(8)}"',
            'd_c0': f'"{secrets.token_urlsafe(16)}|{int(time.time())}"',
            '_xsrf': secrets.token_hex(16),
            '__zse_ck': self._mint_zse_ck(),
        }
        with self.lock:
            self.accounts[cookies['z_c0']] = {'id': secrets.token_hex(16), 'name': name, 'expired': False}
        return '; '.join(f'{key}={value}' for key, value in cookies.items())

    def expire(self, cookie_string):
        with self.lock:
            self._account_of(cookie_string)['expired'] = True

    def expire_zse_ck(self):
        """Every `__zse_ck` handed out so far stops working, as Zhihu's do on their schedule."""
        with self.lock:
            self.zse_tokens.clear()

    def zse_ck_works(self, value):
        with self.lock:
            return value in self.zse_tokens

    def refuse(self, count, status, code, message):
        """The next `count` API writes answer `status` with Zhihu's error shape instead (for
        HTTP 200, Zhihu's `{"code": ..., "message": ...}`)."""
        with self.lock:
            self.refusals.extend([(status, code, message)] * count)

    def add_column(self, cookie_string, column_id):
        with self.lock:
            self.columns[column_id] = {'owner': self._account_of(cookie_string)['id'], 'items': []}

    def column_items(self, column_id):
        with self.lock:
            return list(self.columns[column_id]['items'])

    def make_draft(self, cookie_string, title, content=''):
        with self.lock:
            return self._new_draft(self._account_of(cookie_string), title, content)['id']

    def make_article(self, cookie_string, title, content, page_lag=0, visibility='public'):
        """An article already published (with a topic), whose page hides it `page_lag` times."""
        with self.lock:
            draft = self._new_draft(self._account_of(cookie_string), title, content)
            draft.update(topics=[dict(TOPICS[0])], state='published', created=int(time.time()), page_lag=page_lag,
                         visibility=visibility)
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

    def hosted_picture(self, url):
        """(mime, bytes) the pictures host serves at `url`, or None."""
        key = url.rsplit('/', 1)[-1].rsplit('.', 1)[0]
        with self.lock:
            return self.stored_pictures.get(key)

    def account_id(self, cookie_string):
        with self.lock:
            return self._account_of(cookie_string)['id']

    def _account_of(self, cookie_string):
        z_c0 = dict(part.strip().split('=', 1) for part in cookie_string.split(';'))['z_c0']
        return self.accounts[z_c0]

    def _new_draft(self, account, title, content):
        draft_id = str(next(self.ids))
        draft = {'id': draft_id, 'author': account['id'], 'title': title, 'content': content,
                 'topics': [], 'state': 'draft', 'created': None, 'page_lag': 0, 'visibility': 'public'}
        self.drafts[draft_id] = draft
        return draft

    def _mint_zse_ck(self):
        token = f'004_{secrets.token_urlsafe(30)}'
        self.zse_tokens.add(token)
        return token

    # -- the app ----------------------------------------------------------------------

    def make_app(self):
        app = bottle.Bottle()
        app.add_hook('before_request', self._log_call)
        on_zhuanlan, on_www = self._host_check('zhuanlan'), self._host_check('www')

        app.route('/robots.txt', 'GET', lambda: self._text('User-agent: *\n# Zhihu stand-in\n'))
        app.route('/question/<question_id:re:\\d+>', 'GET', on_www(self.question_page))
        app.route('/api/v4/me', 'GET', on_www(self.me))
        app.route('/api/v4/content/publish', 'POST', on_www(self.publish))
        app.route('/api/v4/columns/<column_id>/items', 'POST', on_www(self.add_column_item))
        app.route('/api/v4/columns/<column_id>/items', 'GET', on_www(self.list_column_items))
        app.route('/api/articles/drafts', 'POST', on_zhuanlan(self.create_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/draft', 'GET', on_zhuanlan(self.read_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/draft', 'PATCH', on_zhuanlan(self.save_draft))
        app.route('/api/articles/<draft_id:re:\\d+>/topics', 'POST', on_zhuanlan(self.add_topic))
        app.route('/api/autocomplete/topics', 'GET', on_zhuanlan(self.search_topics))
        app.route('/p/<draft_id:re:\\d+>', 'GET', on_zhuanlan(self.article_page))
        on_api, on_upload, on_pictures = (self._host_check(kind) for kind in ('api', 'upload', 'pictures'))
        app.route('/images', 'POST', on_api(self.new_image))
        app.route('/images/<image_id:re:\\d+>/uploading_status', 'PUT', on_api(self.image_uploaded))
        app.route('/images/<image_id:re:\\d+>', 'GET', on_api(self.image_status))
        app.route('/<object_key:re:v2-[0-9a-f]+>', 'PUT', on_upload(self.put_picture))
        app.route('/<object_key:re:v2-[0-9a-f]+>.<extension>', 'GET', on_pictures(self.get_picture))
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

    @staticmethod
    def _cookies():
        cookies = {}
        for part in (bottle.request.get_header('Cookie') or '').split(';'):
            name, _, value = part.strip().partition('=')
            if name:
                cookies[name] = value
        return cookies

    def _session(self, write=False):
        """The account the request's cookies log in, or an HTTPResponse refusing it."""
        cookies = self._cookies()
        account = self.accounts.get(cookies.get('z_c0'))
        if account is None:
            return self._error(401, 101, '身份未经过验证', 'AuthenticationError')
        if account['expired']:
            return self._error(401, 100, 'ERR_LOGIN_TICKET_EXPIRED', 'AuthenticationInvalidRequest')
        if not cookies.get('d_c0') or cookies.get('__zse_ck') not in self.zse_tokens:
            return self._error(*SIGNATURE_REFUSAL)
        if write and self.refusals:
            status, code, message = self.refusals.pop(0)
            if status == 200:
                return self._json({'code': code, 'message': message})
            return self._error(status, code, message)
        return account

    def _viewer(self):
        """The account whose cookies a page request carries, or None for a reader without any."""
        account = self.accounts.get(self._cookies().get('z_c0'))
        return account if account is not None and not account['expired'] else None

    def _stale_zse_ck(self):
        value = self._cookies().get('__zse_ck')
        return value is not None and value not in self.zse_tokens

    def _own_draft(self, account, draft_id):
        draft = self.drafts.get(draft_id)
        if draft is None or draft['author'] != account['id']:
            return self._error(404, 404, '草稿不存在')
        return draft

    # -- pages ----------------------------------------------------------------------------

    def question_page(self, question_id):
        """A question page: what zhihu_obsidian opens so that Zhihu's script renews __zse_ck."""
        if self._cookies().get('__zse_ck') not in self.zse_tokens:
            return self._challenge_page()
        initial = json.dumps({'initialState': {'entities': {'questions': {question_id: {'id': question_id}}}}})
        return self._html(f'<!doctype html><html><head><meta charset="utf-8"><title>一个问题 - 知乎</title></head>'
                          f'<body><h1>一个问题</h1><script id="js-initialData" type="text/json">{initial}</script>'
                          '</body></html>')

    def _challenge_page(self):
        """A page whose script, after a moment, sets a fresh __zse_ck and reloads: only a browser
        that runs the page's script gets past it."""
        domain = shared_parent(*(self.hosts[kind] for kind in self.ZHIHU_KINDS if self.hosts[kind]))
        attributes = f'; domain={domain}' if domain else ''
        renew = f'document.cookie = "__zse_ck={self._mint_zse_ck()}; path=/{attributes}"; ' \
            if self.challenge_passes else ''
        script = f'setTimeout(() => {{ {renew}location.reload(); }}, {CHALLENGE_DELAY_MS});'
        return self._html('<!doctype html><html><head><meta charset="utf-8"><title>知乎</title></head>'
                          f'<body><p>正在检查你的浏览器…</p><script>{script}</script></body></html>', 403)

    def article_page(self, draft_id):
        """The public article page: js-initialData for a published article, as its viewer may see it;
        the not-found page otherwise."""
        if self._stale_zse_ck():
            return self._challenge_page()
        draft = self.drafts.get(draft_id)
        if draft is not None and draft['state'] == 'published' and draft['page_lag'] > 0:
            draft['page_lag'] -= 1
            draft = None
        if draft is None or draft['state'] != 'published':
            return self._not_found_page(404)
        viewer = self._viewer()
        visibility = 'public' if viewer is not None and viewer['id'] == draft['author'] else draft['visibility']
        if visibility == 'soft_404':
            return self._not_found_page(200)
        url = f'{self._base()}/p/{draft_id}'
        article = {'id': draft_id, 'type': 'article', 'articleType': 'normal', 'state': 'published',
                   'status': 0, 'isVisible': visibility == 'public', 'isNormal': True, 'url': url,
                   'title': draft['title'], 'content': draft['content'], 'created': draft['created'],
                   'author': {'id': draft['author']}, 'topics': draft['topics']}
        if visibility == 'review':
            article['reviewInfo'] = {'status': 'reviewing', 'tips': REVIEW_TIPS}
        initial = json.dumps({'initialState': {'entities': {'articles': {draft_id: article}}}},
                             ensure_ascii=False).replace('</', '<\\/')
        return self._html(f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(draft["title"])} - 知乎'
                          f'</title><link rel="canonical" href="{url}"></head><body><article>{draft["content"]}'
                          f'</article><script id="js-initialData" type="text/json">{initial}</script></body></html>')

    def _not_found_page(self, status):
        return self._html(f'<!doctype html><html><head><title>{NOT_FOUND_TITLE}</title></head>'
                          '<body>你似乎来到了没有知识存在的荒原</body></html>', status)

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
        if draft['state'] != 'published':
            draft.update(state='published', created=int(time.time()), page_lag=self.page_lag,
                         visibility=self.new_article_visibility)
        if self.lose_publish_answers > 0:
            self.lose_publish_answers -= 1
            return bottle.HTTPResponse(status=502, body='<html><body>502 Bad Gateway</body></html>')
        url = '' if self.answer_without_url else f'{self._base()}/p/{draft["id"]}'
        result = {'publish': {'id': draft['id'], 'type': 'article', 'url': url}}
        return self._json({'code': 0, 'message': 'success',
                           'data': {'publish_type': 'article', 'result': json.dumps(result)}})

    def add_column_item(self, column_id):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        column = self.columns.get(column_id)
        if column is None:
            return self._error(404, 404, '专栏不存在')
        if column['owner'] != account['id']:
            return self._error(403, 403, '你没有权限管理这个专栏')
        body = bottle.request.json or {}
        draft = self.drafts.get(str(body.get('id')))
        if body.get('type') != 'article' or draft is None or draft['author'] != account['id'] \
                or draft['state'] != 'published':
            return self._json({'code': 400, 'message': '文章不存在或尚未发布'})
        if draft['id'] not in column['items']:
            column['items'].append(draft['id'])
        return self._json({'type': 'article', 'id': draft['id']})

    def list_column_items(self, column_id):
        column = self.columns.get(column_id)
        if column is None:
            return self._error(404, 404, '专栏不存在')
        return self._json({'data': [{'type': 'article', 'id': item, 'title': self.drafts[item]['title']}
                                    for item in column['items']], 'paging': {'is_end': True}})

    # -- pictures -------------------------------------------------------------------------

    def new_image(self):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        digest = str((bottle.request.json or {}).get('image_hash') or '')
        if not re.fullmatch(r'[0-9a-f]{32}', digest):
            return self._error(400, 400, '图片参数错误')
        image = next((image for image in self.images.values() if image['hash'] == digest), None)
        if image is not None and image['state'] == 'success':
            return self._json({'upload_file': {'image_id': image['id'], 'object_key': image['key'], 'state': 1},
                               'upload_vendor': 'ali'})
        if image is None:   # bytes Zhihu has never seen; one that never finished uploading gets a fresh token
            image = {'id': str(next(self.ids)), 'hash': digest, 'key': f'v2-{digest}', 'state': 'waiting',
                     'polls_left': 0}
            self.images[image['id']] = image
        image['token'] = {'access_id': 'STS.' + secrets.token_hex(8), 'access_key': secrets.token_urlsafe(18),
                          'access_token': secrets.token_urlsafe(24)}
        return self._json({'upload_file': {'image_id': image['id'], 'object_key': image['key'], 'state': 2},
                           'upload_token': image['token'], 'upload_vendor': 'ali'})

    def put_picture(self, object_key):
        """The upload host, as Aliyun OSS checks a signed PUT: the token's access id, its
        security token, and the HMAC-SHA1 over the request's verb, type, date, x-oss headers
        and bucket path."""
        image = next((image for image in self.images.values() if image['key'] == object_key), None)
        if image is None:
            return self._oss_error(404, 'NoSuchUpload')
        if self.fail_picture_upload > 0:
            self.fail_picture_upload -= 1
            if self.fail_picture_upload == 0:
                return self._oss_error(500, 'InternalError')
        headers = bottle.request.headers
        token = image['token']
        oss_headers = dict(sorted((name.lower(), value) for name, value in headers.items()
                                  if name.lower().startswith('x-oss-')))
        date = oss_headers.get('x-oss-date', headers.get('Date', ''))   # browsers may not set Date
        lines = ['PUT', headers.get('Content-MD5', ''), headers.get('Content-Type', ''), date]
        lines += [f'{name}:{value}' for name, value in oss_headers.items()] + [f'/zhihu-pics/{object_key}']
        signed = '\n'.join(lines)
        expected = base64.b64encode(hmac.new(token['access_key'].encode(), signed.encode(), hashlib.sha1).digest())
        if headers.get('Authorization') != f'OSS {token["access_id"]}:{expected.decode()}' \
                or headers.get('x-oss-security-token') != token['access_token']:
            return self._oss_error(403, 'SignatureDoesNotMatch')
        data = bottle.request.body.read()
        self.stored_pictures[object_key] = (headers.get('Content-Type', ''), data)
        self.picture_uploads.append(object_key)
        return bottle.HTTPResponse(status=200, body='', headers={'ETag': f'"{hashlib.md5(data).hexdigest()}"'})

    def image_uploaded(self, image_id):
        account = self._session(write=True)
        if isinstance(account, bottle.HTTPResponse):
            return account
        image = self.images.get(image_id)
        if image is None or image['key'] not in self.stored_pictures:
            return self._error(400, 400, '图片尚未上传')
        image.update(state='processing', polls_left=self.processing_polls)
        return self._json({'image_id': image_id})

    def image_status(self, image_id):
        account = self._session()
        if isinstance(account, bottle.HTTPResponse):
            return account
        image = self.images.get(image_id)
        if image is None:
            return self._error(404, 404, '图片不存在')
        if image['state'] == 'processing':
            if image['polls_left'] > 0:
                image['polls_left'] -= 1
            else:
                image['state'] = 'success'
        return self._json({'image_id': image_id, 'status': image['state'], 'original_hash': image['hash']})

    def get_picture(self, object_key, extension):
        stored = self.stored_pictures.get(object_key)
        if stored is None:
            return bottle.HTTPResponse(status=404, body='')
        mime, data = stored
        return bottle.HTTPResponse(status=200, body=data, headers={'Content-Type': mime})

    def _oss_error(self, status, code):
        return bottle.HTTPResponse(status=status, body=f'<?xml version="1.0"?><Error><Code>{code}</Code></Error>',
                                   headers={'Content-Type': 'application/xml'})

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
    def _html(page, status=200):
        return bottle.HTTPResponse(status=status, body=page, headers={'Content-Type': 'text/html; charset=utf-8'})

    @staticmethod
    def _text(text):
        return bottle.HTTPResponse(status=200, body=text, headers={'Content-Type': 'text/plain; charset=utf-8'})


def shared_parent(*hosts):
    """The parent domain two host names share ('.zhihu.localhost'), or None (one host, or none shared)."""
    if len(set(hosts)) < 2:
        return None
    reversed_labels = [host.split('.')[::-1] for host in hosts]
    common = []
    for labels in zip(*reversed_labels):
        if len(set(labels)) != 1:
            break
        common.append(labels[0])
    return '.' + '.'.join(reversed(common)) if len(common) >= 2 else None
