"""The pages people use: log in, submit a batch, watch it publish, platform logins, admin.

Pages (whole documents), fragments (the `templates/_*.html` that htmx swaps in) and
actions (POSTs that answer with a fragment) are separate URLs:

    GET  /                      the batch form and the task table     (?status=&page=)
    GET  /login   POST /login   POST /logout
    GET  /tasks/<id>            one task with its attempts and their evidence
    GET  /accounts              platform logins: POST /accounts/<platform>[/delete|/check]
    GET  /admin                 live figures, admins only
    GET  /fragments/tasks       the task table; it polls itself while anything is unfinished
    GET  /fragments/metrics     the admin figures
    POST /batches               submit a batch (all or nothing, through Scheduler.submit_batch)
    POST /batches/form          the form again: files read in, an article added or removed
    POST /tasks/<id>/cancel     POST /tasks/<id>/retry

A page acts for the user of its session and reads only that user's rows. Every POST
carries the session's CSRF token: a form field, or the X-CSRF-Token header htmx sends
from <body hx-headers>. Errors are mapped in one place (`page_errors`): a small page, or
for htmx a message in the page's #flash; a stack trace never reaches the browser.
"""

import base64
import dataclasses
import datetime
import functools
import logging
import math
import os
import pathlib
import re
import time
import urllib.parse
import zoneinfo

import bottle
import jinja2

import auth
import content
import errors
import images
import tasks
import web
from accounts import COOKIE_LIMIT, AccountError, missing_cookies, parse_cookies
from db import topics_of
from errors import BodyTooLarge, InvalidRequest, Refused
from publishers import load_publishers
from content import articles_from_markdown
from scheduler import TOPIC_MAX_CHARS, TOPICS_MAX

log = logging.getLogger('topn.pages')

ROOT = pathlib.Path(__file__).resolve().parent
TEMPLATES = ROOT / 'templates'
STATIC = ROOT / 'static'
HTMX_FILE = 'htmx-2.0.11.min.js'
TASK_ID = '<task_id:re:[0-9a-f-]{36}>'
PLATFORM = '<platform:re:[a-z0-9_]{1,32}>'
TASKS_PER_PAGE = 20
STOP_POLLING = '286 Stop Polling'
UPLOAD_SUFFIXES = ('.md', '.markdown', '.txt')
PICTURE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.gif', '.webp')

STATUS_LABELS = {'pending': '等待中', 'running': '发布中', 'success': '已发布', 'failed': '失败',
                 'retry': '等待重试', 'cancelled': '已取消', 'scheduled': '定时发布'}
HOST_STATE_LABELS = {'up': '运行中', 'silent': '无心跳', 'stopped': '已停止'}
OUTCOME_LABELS = {'running': '进行中', 'success': '成功', 'failed': '失败', 'timeout': '超时',
                  'lost': '工作进程中断', 'unknown': '结果未知', 'cancelled': '已取消'}
LOGIN_FIELD_LABELS = {'cookies': ('登录 Cookie', 'cookies'), 'site': ('网站地址', 'url'),
                      'username': ('用户名', 'text'), 'password': ('密码', 'password')}
SHOWN_LOGIN_FIELDS = {'site', 'username'}
EVIDENCE_LABELS = {'screenshot.png': '截图', 'page.html': '页面', 'url.txt': '网址'}  # keys: tasks.EVIDENCE_FILES

# What the page says for each refusal code. {where} names the article ("第 2 篇文章");
# the other fields come from the configuration and the refusal (see `sentence`).
SENTENCES = {
    'empty_batch': '请至少填写一篇文章（标题和正文）。',
    'batch_too_large': '一批最多 {batch_max} 篇文章；请移除多出的文章后再发布。',
    'invalid_article': '{where}的格式不对。',
    'empty_title': '{where}缺少标题。',
    'title_too_long': '{where}的标题太长了：最多 {title_max} 个字符。',
    'empty_content': '{where}缺少正文。',
    'content_too_large': '{where}的正文太大了：最多 {body_kib} KB。',
    'invalid_text': '{where}含有无法识别的字符，请检查后重新粘贴。',
    'invalid_image': '{where}的图片不是 PNG、JPEG、GIF 或 WebP 图片（{detail}）。',
    'invalid_images': '{where}的图片格式不对（{detail}）。',
    'image_missing': '{where}引用的图片没有一起上传：请把图片文件和 Markdown 文件一起选择（{detail}）。',
    'image_too_large': '{where}的图片太大了：每张最多 {image_mib} MB（{detail}）。',
    'too_many_images': '{where}的图片太多了：每篇最多 {image_count} 张。',
    'invalid_article_id': '{where}关联的文章编号无效。',
    'article_not_found': '关联的文章不存在。',
    'unknown_platform': '请选择要发布到的平台。',
    'no_account': '你还没有添加{platform}的账号，请先到“平台账号”页保存登录。',
    'duplicate_platform': '同一个平台只能选一次。',
    'invalid_publish_at': '定时发布的时间写得不对，请用页面上的日期时间选择。',
    'publish_at_in_past': '定时发布的时间已经过去了；要立即发布请留空。',
    'publish_at_too_far': '定时发布最多只能安排在 90 天以内。',
    'too_many_scheduled': '同时最多只能有 {max_scheduled} 个定时任务，提交这一批会超出上限。',
    'invalid_priority': '请选择“普通”或“加急”。',
    'invalid_topics': '话题写得不对：最多 {topics_max} 个，用逗号分开，每个不超过 {topic_chars} 个字。',
    'too_many_active': '每个平台同时最多只能有 {max_active} 个未完成的任务，提交这一批会让{platform}超出上限；请等前面的任务完成后再提交。',
    'rate_limited': '每个平台每 {window} 秒最多新建 {rate} 个任务，{platform}已经达到上限；请 {retry_after} 秒后再提交。',
    'body_too_large': '提交的内容太大了：一次最多 {request_mib} MB。',
    'invalid_form': '表单内容不完整，请刷新页面后重试。',
    'csrf_failed': '页面已过期，请刷新页面后重试。',
    'unauthorized': '请先登录。',
    'forbidden': '只有管理员可以查看这个页面。',
    'not_found': '页面不存在。',
    'method_not_allowed': '不支持这种请求方式。',
    'bad_request': '请求无法处理。',
    'task_not_found': '没有找到这个任务。',
    'task_finished': '这个任务已经结束，不能再取消。',
    'task_not_retryable': '只有失败或已取消的任务可以重试。',
    'task_busy': '任务的状态刚好在变化，请稍后再试。',
    'user_not_found': '这个用户已不存在。',
    'invalid_status': '未知的任务状态。',
    'invalid_page': '页码无效。',
    'invalid_limit': '每页条数无效（1 到 100）。',
    'platform_not_found': '没有这个平台。',
    'database_unavailable': '数据库暂时无法访问，请稍后再试。',
    'redis_unavailable': '任务队列暂时无法访问，请稍后再试。',
    'internal_error': '服务器出错了，详细信息已记录在服务日志中。',
}
UNKNOWN_REFUSAL = '请求没有完成（{code}）。'


class LoginRequired(Exception):
    """No live session: a page sends the browser to /login, htmx is told to go there."""


class PageRefused(Refused):
    """A refusal the page words itself: `message` is already the sentence to show."""

    def __init__(self, code, message, status=400, retry_after=None):
        super().__init__(code, message, retry_after)
        self.status = status
        self.sentence = message


@dataclasses.dataclass(slots=True)
class TaskRow:
    """One row of the task table, as the template shows it."""
    task_id: str
    title: str
    platform_label: str
    status: str
    progress: int
    attempt: int
    max_attempts: int
    created_at: datetime.datetime
    completed_at: datetime.datetime
    publish_at: datetime.datetime
    url: str
    note: str
    error: str
    evidence: list
    can_cancel: bool
    cancelling: bool
    can_retry: bool


@dataclasses.dataclass
class Notice:
    kind: str  # 'ok' or 'error'
    text: str


class Pages:
    def __init__(self, config, db, scheduler, account_store, login_checker):
        self.config = config
        self.db = db
        self.scheduler = scheduler
        self.account_store = account_store
        self.login_checker = login_checker
        self.publishers = load_publishers(config)
        self.timezone = zoneinfo.ZoneInfo(config.display_timezone)
        self.throttle = auth.LoginThrottle(scheduler.redis, scheduler.keys.login_failures_prefix,
                                           config.login_max_failures, config.login_lockout)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True)
        self.templates.filters['local_time'] = self.local_time
        self.templates.filters['iso'] = web.iso8601
        self.templates.globals.update(
            htmx_js=f'/static/{HTMX_FILE}', status_labels=STATUS_LABELS, outcome_labels=OUTCOME_LABELS,
            host_state_labels=HOST_STATE_LABELS,
            batch_max=config.batch_max, zone_label=zone_label(self.timezone))

    def mount(self, app):
        routes = [
            ('GET', '/', self.index),
            ('GET', '/login', self.login_page),
            ('POST', '/login', self.log_in),
            ('POST', '/logout', self.log_out),
            ('GET', f'/tasks/{TASK_ID}', self.task_page),
            ('GET', '/accounts', self.accounts_page),
            ('GET', '/admin', self.admin_page),
            ('GET', '/fragments/tasks', self.tasks_fragment),
            ('GET', '/fragments/metrics', self.metrics_fragment),
            ('POST', '/batches', self.submit_batch),
            ('POST', '/batches/form', self.refresh_batch_form),
            ('POST', f'/tasks/{TASK_ID}/cancel', self.cancel_task),
            ('POST', f'/tasks/{TASK_ID}/retry', self.retry_task),
            ('POST', f'/accounts/{PLATFORM}', self.save_account),
            ('POST', f'/accounts/{PLATFORM}/delete', self.delete_account),
            ('POST', f'/accounts/{PLATFORM}/check', self.check_account),
        ]
        for method, path, handler in routes:
            app.route(path, method, self.page_errors(handler))
        app.route('/static/<name:path>', 'GET', self.static_file)

    # -- errors ----------------------------------------------------------------------

    def page_errors(self, handler):
        """Answer whatever a handler raises as a page or, for htmx, a message in #flash: a
        missing session goes to /login, everything else is worded from `errors.http_error`."""
        @functools.wraps(handler)
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except LoginRequired:
                return self.login_redirect()
            except bottle.HTTPResponse:
                raise
            except Exception as error:
                status, code, retry_after = errors.http_error(error)
                if status == 500:
                    log.exception('%s %s failed', bottle.request.method, bottle.request.path)
                elif errors.is_outage(code):
                    log.warning('%s %s: %s', bottle.request.method, bottle.request.path, error)
                return self.error_answer(status, self.sentence(error, code), retry_after)
        return wrapper

    def error_answer(self, status, sentence, retry_after=None):
        """A refusal as a small page, or for htmx as a message swapped into #flash (the
        fragment the request aimed at stays as it was, and keeps polling)."""
        headers = {'Retry-After': str(retry_after)} if retry_after else {}
        if is_htmx():
            headers.update({'HX-Retarget': '#flash', 'HX-Reswap': 'innerHTML'})
            body = self.render('_error.html', message=sentence)
        else:
            body = self.render('error.html', status=status, message=sentence)
        return bottle.HTTPResponse(body, status, headers)

    def routing_error_page(self, error):
        """Bottle's own errors (no such page, wrong method) for a browser."""
        code = errors.ROUTING_CODES.get(error.status_code, 'internal_error')
        bottle.response.content_type = 'text/html; charset=utf-8'
        return self.render('error.html', status=error.status_code, message=self.sentence(None, code))

    def login_redirect(self):
        if is_htmx():
            return bottle.HTTPResponse('', 401, {'HX-Redirect': '/login'})
        return see_other('/login')

    def sentence(self, error, code=None):
        """The words a person reads for an error (a refusal, or another error's `code`)."""
        code = code or error.code
        if isinstance(error, PageRefused):
            return error.sentence
        article = getattr(error, 'article', None)
        retry_after = getattr(error, 'retry_after', None)
        config = self.config
        fields = {
            'where': f'第 {article + 1} 篇文章' if article is not None else '有一篇文章',
            'batch_max': config.batch_max,
            'title_max': config.title_max_chars, 'body_kib': config.body_max_bytes // 1024,
            'max_active': config.user_max_active, 'rate': config.user_rate, 'window': config.user_rate_window,
            'retry_after': retry_after or config.user_rate_window,
            'request_mib': round(config.max_request_bytes / 1024 / 1024, 1),
            'image_mib': round(config.image_max_bytes / 1024 / 1024, 1), 'image_count': config.image_max_count,
            'detail': getattr(error, 'message', ''),
            'topics_max': TOPICS_MAX, 'topic_chars': TOPIC_MAX_CHARS,
            'max_scheduled': config.user_max_scheduled,
            'platform': f'「{self.platform_label(error.platform)}」' if getattr(error, 'platform', None) else '这个平台',
        }
        return SENTENCES.get(code, UNKNOWN_REFUSAL).format(code=code, **fields)

    # -- request helpers -------------------------------------------------------------

    def current_user(self):
        user = auth.session_user(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE))
        if user is None:
            raise LoginRequired()
        return user

    def acting_user(self):
        """The user behind a POST: the body is within the limit, the session lives, and
        the request carries the session's CSRF token."""
        self.check_body_size()
        user = self.current_user()
        given = bottle.request.get_header(auth.CSRF_HEADER) or form_text(self.form(), auth.CSRF_FIELD)
        auth.require_csrf(user, given)
        return user

    def check_body_size(self):
        limit = self.config.max_request_bytes
        if bottle.request.content_length > limit:
            raise BodyTooLarge('body_too_large', f'at most {limit} bytes are accepted')

    def form(self):
        """The posted fields (files too: see `typed_slots` and `uploaded_articles`)."""
        try:
            return bottle.request.POST.decode()
        except UnicodeError:
            raise InvalidRequest('invalid_text', 'the form is not UTF-8') from None

    def render(self, name, user=None, **context):
        template = self.templates.get_template(name)
        return template.render(user=user, csrf_token=user['csrf_token'] if user else '', **context)

    def local_time(self, value):
        if value is None:
            return ''
        local = value.replace(tzinfo=datetime.timezone.utc).astimezone(self.timezone)
        return local.strftime('%m-%d %H:%M:%S')

    def platform_label(self, name):
        return getattr(self.publishers.get(name), 'label', None) or name

    def static_file(self, name):
        response = bottle.static_file(name, root=str(STATIC))
        if response.status_code == 200:
            immutable = name == HTMX_FILE
            response.set_header('Cache-Control', 'public, max-age=31536000, immutable' if immutable
                                else 'public, max-age=300')
        return response

    # -- logging in and out ---------------------------------------------------------

    def login_page(self):
        if auth.session_user(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE)) is not None:
            return see_other('/')
        return self.render('login.html', username='', error=None)

    def log_in(self):
        """Check the password, slowly when it is wrong; lock the name out after
        `login_max_failures` wrong passwords in a row."""
        self.check_body_size()
        form = self.form()
        name, password = form_text(form, 'username').strip(), form_text(form, 'password')
        user = self.db.login_user(name) if 0 < len(name) <= 64 else None
        subject = self.throttle.subject(name, user)
        locked_for = self.throttle.locked_for(subject)
        if locked_for:
            return self.login_refused(429, name, locked_message(locked_for), locked_for)
        if not auth.check_login_password(password, user):
            failures = self.throttle.record_failure(subject)
            time.sleep(self.config.login_failure_delay)
            left = self.config.login_max_failures - failures
            if left <= 0:
                return self.login_refused(429, name, locked_message(self.config.login_lockout),
                                          math.ceil(self.config.login_lockout))
            warning = f'再错 {left} 次，这个账号会被暂时锁定。' if left <= 2 else ''
            return self.login_refused(401, name, '用户名或密码不正确。' + warning)
        self.throttle.clear(subject)
        auth.close_session(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE))
        token, _ = auth.open_session(self.db, user['id'], self.config.session_ttl)
        bottle.response.set_cookie(auth.SESSION_COOKIE, token, path='/', httponly=True, samesite='lax',
                                   max_age=int(self.config.session_ttl),
                                   secure=bool(self.config.session_cookie_secure))
        log.info('user %s logged in', user['name'])
        return see_other('/')

    def login_refused(self, status, name, message, retry_after=None):
        headers = {'Retry-After': str(retry_after)} if retry_after else {}
        return bottle.HTTPResponse(self.render('login.html', username=name, error=message), status, headers)

    def log_out(self):
        self.acting_user()
        auth.close_session(self.db, bottle.request.get_cookie(auth.SESSION_COOKIE))
        bottle.response.delete_cookie(auth.SESSION_COOKIE, path='/', httponly=True, samesite='lax',
                                      secure=bool(self.config.session_cookie_secure))
        return see_other('/login')

    # -- the batch form ---------------------------------------------------------------

    def index(self):
        user = self.current_user()
        return self.render('index.html', user, **self.form_context(user), **self.tasks_context(user))

    def submit_batch(self):
        user = self.acting_user()
        form = self.form()
        platforms, priority = form_texts(form, 'platform'), form_text(form, 'priority', 'normal')
        publish_at = form_text(form, 'publish_at').strip()
        articles = [slot for slot in typed_slots(form) if slot['title'].strip() or slot['content'].strip()]
        pictures = {}
        topics = form_text(form, 'topics')
        try:
            pictures = self.form_pictures(form)
            articles += self.uploaded_articles()
            task_ids = self.submit(user, [{**article, 'topics': topic_names(topics)}
                                          for article in with_pictures(articles, pictures)],
                                   platforms, priority, publish_at)
        except Refused as refusal:
            context = self.form_context(user, articles, platforms, priority, Notice('error', self.sentence(refusal)),
                                        bad_slot=refusal.article, pictures=pictures, publish_at=publish_at)
            context['chosen_topics'] = topics
            headers = {'Retry-After': str(refusal.retry_after)} if refusal.retry_after else {}
            return self.form_answer(user, context, refusal.status, headers)
        log.info('user %s submitted %d tasks from the page', user['name'], len(task_ids))
        if not is_htmx():
            return see_other('/')
        context = self.form_context(user, platforms=platforms, notice=self.submitted_notice(user, task_ids))
        return self.form_answer(user, context, 200, {'HX-Trigger': 'tasks-changed'})

    def submit(self, user, articles, platforms, priority, publish_at=''):
        """Admission as the API does it (all or nothing; a refused article is named by its
        index), after checking that each platform chosen has a stored login."""
        if not platforms:
            raise InvalidRequest('unknown_platform', 'choose a platform')
        stored = dict(self.account_platforms(user))
        for platform in platforms:
            if platform not in stored:
                raise InvalidRequest('no_account', f'no {platform} login is stored for this user', platform=platform)
        payload = {'platforms': platforms, 'priority': priority, 'articles': articles}
        if publish_at:
            payload['publish_at'] = publish_at
        return self.scheduler.submit_batch(user['id'], payload)

    def submitted_notice(self, user, task_ids):
        first = self.db.task_for_user(user['id'], task_ids[0])
        if first is not None and first['status'] == tasks.SCHEDULED:
            return Notice('ok', f'已安排 {len(task_ids)} 个发布任务，将于 {self.local_time(first["publish_at"])}'
                                f'（{zone_label(self.timezone)}）开始发布。')
        return Notice('ok', f'已提交 {len(task_ids)} 个发布任务，下面的表格会实时显示发布进度。')

    def refresh_batch_form(self):
        """The form again, changed as asked: files read into articles, one more article,
        or one removed. Nothing is submitted."""
        user = self.acting_user()
        form = self.form()
        slots = typed_slots(form)
        change = form_text(form, 'slot_change')
        removed = change.removeprefix('remove:')
        if change.startswith('remove:') and removed.isdigit() and int(removed) < len(slots):
            del slots[int(removed)]
        notice = None
        try:
            pictures = self.form_pictures(form)
            uploaded = self.uploaded_articles()
        except PageRefused as refusal:
            pictures, uploaded, notice = {}, [], Notice('error', refusal.sentence)
        empty = [i for i, slot in enumerate(slots) if not slot['title'].strip() and not slot['content'].strip()]
        for article in uploaded:
            if empty:
                slots[empty.pop(0)] = article
            else:
                slots.append(article)
        if change == 'add' or not slots:
            slots.append({'title': '', 'content': ''})
        limit = self.config.batch_max
        if len(slots) > limit:
            notice = Notice('error', f'一批最多 {limit} 篇文章，多出的 {len(slots) - limit} 篇没有加入。')
            slots = slots[:limit]
        elif uploaded and notice is None:
            notice = Notice('ok', f'已从 {len(uploaded)} 个文件读入文章，请检查后发布。')
        context = self.form_context(user, slots, form_texts(form, 'platform'), form_text(form, 'priority', 'normal'),
                                    notice, pictures=pictures, publish_at=form_text(form, 'publish_at'))
        context['chosen_topics'] = form_text(form, 'topics')
        return self.form_answer(user, context, 200)

    def uploaded_articles(self):
        """The articles of the uploaded .md / .txt files, split as the CLI splits them
        (`articles_from_markdown`: each "# " heading starts one, titled by it)."""
        articles = []
        for upload in bottle.request.files.getall('files'):
            name = upload.raw_filename.replace('\\', '/').rsplit('/', 1)[-1]
            if not name:
                continue
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in PICTURE_SUFFIXES:
                continue
            if suffix.lower() not in UPLOAD_SUFFIXES:
                raise PageRefused('invalid_upload', f'“{name}”不是 .md、.txt 文件或图片。')
            raw = upload.file.read(self.config.body_max_bytes + 4 * self.config.title_max_chars + 1)
            if len(raw) > self.config.body_max_bytes + 4 * self.config.title_max_chars:
                raise PageRefused('invalid_upload', f'“{name}”太大了：正文最多 {self.config.body_max_bytes // 1024} KB。')
            try:
                text = raw.decode('utf-8-sig')
            except UnicodeDecodeError:
                raise PageRefused('invalid_upload', f'“{name}”不是 UTF-8 编码的文本文件。') from None
            articles.extend(articles_from_markdown(text, stem))
        return articles

    def form_pictures(self, form):
        """{file name: base64} of the pictures of the form: uploaded now (.png, .jpg, .gif, .webp
        beside the Markdown files), or kept from an earlier upload in hidden fields."""
        pictures = dict(zip(form_texts(form, 'picture_name'), form_texts(form, 'picture_data')))
        limit = self.config.image_max_bytes
        for upload in bottle.request.files.getall('files'):
            name = upload.raw_filename.replace('\\', '/').rsplit('/', 1)[-1]
            if os.path.splitext(name)[1].lower() not in PICTURE_SUFFIXES:
                continue
            data = upload.file.read(limit + 1)
            if len(data) > limit:
                raise PageRefused('invalid_upload', f'图片“{name}”太大了：每张最多 {limit // 1024 // 1024} MB。')
            if images.image_kind(data) is None:
                raise PageRefused('invalid_upload', f'“{name}”不是 PNG、JPEG、GIF 或 WebP 图片。')
            pictures[name] = base64.b64encode(data).decode()
            upload.file.seek(0)
        return pictures

    def form_context(self, user, slots=None, platforms=(), priority='normal', notice=None, bad_slot=None,
                     pictures=None, publish_at=''):
        stored = self.account_platforms(user)
        return {
            'pictures': sorted((pictures or {}).items()),
            'slots': slots or [{'title': '', 'content': ''}],
            'platforms': stored,
            'chosen_platforms': list(platforms) or [name for name, _ in stored[:1]],
            'chosen_publish_at': publish_at,
            'earliest_publish_at': datetime.datetime.now(self.timezone).strftime('%Y-%m-%dT%H:%M'),
            'chosen_priority': priority,
            'chosen_topics': '',
            'form_notice': notice,
            'bad_slot': bad_slot,
        }

    def form_answer(self, user, context, status, headers=None):
        """The form alone for htmx; the whole page (form and table) for a plain post."""
        if is_htmx():
            body = self.render('_batch_form.html', user, **context)
        else:
            body = self.render('index.html', user, **context, **self.tasks_context(user))
        return bottle.HTTPResponse(body, status, headers or {})

    def account_platforms(self, user):
        """[(name, label)] of the platforms the user has a stored login for."""
        return [(row['platform'], self.platform_label(row['platform'])) for row in self.db.accounts_of(user['id'])
                if row['platform'] in self.publishers]

    # -- the task table ----------------------------------------------------------------

    def tasks_fragment(self):
        user = self.current_user()
        context = self.tasks_context(user)
        if not context['polling']:
            bottle.response.status = STOP_POLLING
        return self.render('_tasks.html', user, **context)

    def tasks_context(self, user, notice=None):
        """One page of the user's tasks (one list query and one evidence query) and
        whether the table should keep polling (anything of the user's unfinished)."""
        status, page, limit = web.task_list_query(bottle.request.query, TASKS_PER_PAGE)
        rows, counts = self.db.task_page(user['id'], status, (page - 1) * limit, limit)
        total = counts.get(status, 0) if status else sum(counts.values())
        evidence = self.db.evidence_of([row['task_id'] for row in rows
                                        if row['status'] in (tasks.FAILED, tasks.RETRY)])
        query = {'status': status or '', 'page': page}
        if limit != TASKS_PER_PAGE:
            query['limit'] = limit
        return {
            'article_groups': article_groups([self.task_view(row, evidence.get(row['task_id'], ())) for row in rows],
                                             rows),
            'counts': counts,
            'total_tasks': sum(counts.values()),
            'status_filter': status or '',
            'page': page,
            'pages': max(1, math.ceil(total / limit)),
            'polling': any(counts.get(name) for name in tasks.UNFINISHED),
            'table_query': urllib.parse.urlencode(query),
            'page_query': lambda number: urllib.parse.urlencode({**query, 'page': number}),
            'tasks_notice': notice,
        }

    def task_view(self, row, evidence):
        status = row['status']
        last_attempt = evidence[-1] if evidence else None
        return TaskRow(
            task_id=row['task_id'],
            title=row['article_title'],
            platform_label=self.platform_label(row['platform']),
            status=status,
            progress=row['progress'],
            attempt=row['attempt'],
            max_attempts=row['max_retries'] + 1,
            created_at=row['created_at'],
            completed_at=row['completed_at'],
            publish_at=row['publish_at'] if status == tasks.SCHEDULED else None,
            url=web_url(row['result_url']),
            note=row['result_note'] if status == tasks.SUCCESS else None,
            error=row['error_message'] if status in (tasks.FAILED, tasks.RETRY, tasks.CANCELLED) else None,
            evidence=evidence_links(row['task_id'], *last_attempt) if last_attempt else [],
            can_cancel=status in tasks.CANCELLABLE and not row['cancel_requested'],
            cancelling=status == tasks.RUNNING and bool(row['cancel_requested']),
            can_retry=status in tasks.REOPENABLE,
        )

    def cancel_task(self, task_id):
        user = self.acting_user()
        try:
            outcome = self.scheduler.cancel(user['id'], task_id)
        except Refused as refusal:
            return self.tasks_answer(user, Notice('error', self.sentence(refusal)), refusal.status)
        if outcome == tasks.CANCELLED:
            return self.tasks_answer(user, Notice('ok', '任务已取消。'))
        return self.tasks_answer(user, Notice('ok', '任务正在发布，会在下一步停下；如果平台已经收下文章，它会以“已发布”结束。'))

    def retry_task(self, task_id):
        user = self.acting_user()
        try:
            self.scheduler.retry(user['id'], task_id)
        except Refused as refusal:
            return self.tasks_answer(user, Notice('error', self.sentence(refusal)), refusal.status)
        return self.tasks_answer(user, Notice('ok', '任务已重新排队。'))

    def tasks_answer(self, user, notice, status=200):
        """The table after an action, with what happened; a plain post goes back to the page."""
        if not is_htmx():
            if status >= 400:
                return self.error_answer(status, notice.text)
            return see_other('/?' + urllib.parse.urlencode(dict(bottle.request.query.decode())))
        return bottle.HTTPResponse(self.render('_tasks.html', user, **self.tasks_context(user, notice)), status)

    def task_page(self, task_id):
        user = self.current_user()
        row = self.db.task_for_user(user['id'], task_id)
        if row is None:
            raise PageRefused('task_not_found', SENTENCES['task_not_found'], 404)
        evidence = dict(self.db.evidence_of([task_id]).get(task_id, ()))
        attempts = [{**attempt, 'evidence': evidence_links(task_id, attempt['attempt'],
                                                           evidence.get(attempt['attempt'], ()))}
                    for attempt in self.db.history(task_id)]
        return self.render('task.html', user, task=row, url=web_url(row['result_url']), attempts=attempts,
                           platform_label=self.platform_label(row['platform']), topics=topics_of(row['topics']))

    # -- platform logins ---------------------------------------------------------------

    def accounts_page(self):
        user = self.current_user()
        return self.render('accounts.html', user, **self.accounts_context(user))

    def accounts_context(self, user, notice=None):
        stored = {row['platform']: row for row in self.db.accounts_of(user['id'])}
        return {
            'platforms': [{'name': p.name, 'label': p.label or p.name, 'required': p.required_cookies,
                           'account': stored.get(p.name), 'fields': self.login_inputs(user, p, p.name in stored),
                           'optional': self.optional_fields(user, p, stored)}
                          for p in self.publishers.values() if p.needs_browser],
            'accounts_notice': notice,
        }

    def login_inputs(self, user, publisher, stored):
        """The inputs of a platform's login form. A stored site or user name is shown again
        so it can be corrected; a password or cookie never is."""
        shown = {}
        if stored and set(publisher.login_fields) & SHOWN_LOGIN_FIELDS:
            try:
                shown = self.account_store.load(user['id'], publisher.name) or {}
            except Refused:
                shown = {}
        return [{'name': name, 'label': LOGIN_FIELD_LABELS[name][0], 'type': LOGIN_FIELD_LABELS[name][1],
                 'value': shown.get(name, '') if name in SHOWN_LOGIN_FIELDS else ''}
                for name in publisher.login_fields if name not in publisher.optional_login_fields]

    def optional_fields(self, user, publisher, stored):
        """[(name, label, hint, stored value)] of the login's optional fields, for its form."""
        values = self.account_store.optional_fields(user['id'], publisher) if publisher.name in stored else {}
        return [(name, *OPTIONAL_FIELD_WORDS[name], values.get(name, '')) for name in publisher.optional_login_fields]

    def accounts_answer(self, user, notice, status=200):
        template = '_accounts.html' if is_htmx() else 'accounts.html'
        return bottle.HTTPResponse(self.render(template, user, **self.accounts_context(user, notice)), status)

    def login_platform(self, platform):
        publisher = self.publishers.get(platform)
        if publisher is None or not publisher.needs_browser:
            raise PageRefused('platform_not_found', SENTENCES['platform_not_found'], 404)
        return publisher

    def save_account(self, platform):
        user = self.acting_user()
        publisher = self.login_platform(platform)
        form = self.form()
        fields = {name: form_text(form, name) for name in publisher.login_fields}
        try:
            if 'cookies' in fields:
                check_cookie_text(publisher, fields['cookies'])
            self.account_store.save(user['id'], publisher, fields)
        except PageRefused as refusal:
            return self.accounts_answer(user, Notice('error', refusal.sentence), refusal.status)
        except AccountError as refusal:
            return self.accounts_answer(user, Notice('error', account_sentence(refusal)), 400)
        label = publisher.label or publisher.name
        return self.accounts_answer(user, Notice('ok', f'{label}的登录 Cookie 已保存。可以点“检查登录”确认它仍然有效。'))

    def delete_account(self, platform):
        user = self.acting_user()
        publisher = self.login_platform(platform)
        label = publisher.label or publisher.name
        if not self.db.delete_account(user['id'], platform):
            return self.accounts_answer(user, Notice('error', f'没有保存过{label}的登录。'), 404)
        return self.accounts_answer(user, Notice('ok', f'{label}的登录已删除。'))

    def check_account(self, platform):
        """Ask the platform, in a headless browser, whether the stored login still works
        (a few seconds). At most ACCOUNT_CHECKS_AT_ONCE run at a time in this process."""
        user = self.acting_user()
        publisher = self.login_platform(platform)
        label = publisher.label or publisher.name
        try:
            ok, detail = self.login_checker.check(publisher, user['id'])
        except Refused as refusal:
            if refusal.code == 'browser_unavailable':
                log.warning('login check of %s for user %s: %s', platform, user['name'], refusal.message)
            return self.accounts_answer(user, Notice('error', self.sentence(refusal)), refusal.status)
        if ok:
            return self.accounts_answer(user, Notice('ok', f'{label}的登录有效（{detail}）。'))
        if ok is None:
            return self.accounts_answer(user, Notice('error', f'暂时无法连接{label}，不能判断登录是否有效：{detail}'))
        return self.accounts_answer(user, Notice('error', f'{label}的登录已失效：{detail}。请重新复制 Cookie 并保存。'))

    # -- admin -------------------------------------------------------------------------

    def admin_user(self):
        user = self.current_user()
        if not user['is_admin']:
            raise PageRefused('forbidden', SENTENCES['forbidden'], 403)
        return user

    def admin_page(self):
        user = self.admin_user()
        return self.render('admin.html', user, **self.metrics_context())

    def metrics_fragment(self):
        user = self.admin_user()
        return self.render('_metrics.html', user, **self.metrics_context())

    def metrics_context(self):
        return {'metrics': self.scheduler.metrics(), 'failures': self.db.recent_failures(10),
                'platform_label': self.platform_label}


# -- helpers that need no state ------------------------------------------------------------

OPTIONAL_FIELD_WORDS = {  # a login's optional fields: (label, hint)
    'column': ('收入专栏（可选）', '专栏的编号或网址，如 c_1234567890；每篇发布的文章都会收入这个专栏。留空则不收入专栏。'),
}
COOKIE_FORMAT = 'Cookie 的格式不对：应为“name=value; name2=value2”，可以从已登录浏览器的开发者工具中复制。'


def check_cookie_text(publisher, text):
    """The cookie string's problems, in words a person can act on."""
    if not text.strip():
        raise PageRefused('invalid_cookies', '请粘贴登录 Cookie。')
    if len(text) > COOKIE_LIMIT:
        raise PageRefused('invalid_cookies', f'Cookie 太长了：最多 {COOKIE_LIMIT // 1024} KB。')
    try:
        pairs = parse_cookies(text)
    except AccountError:
        raise PageRefused('invalid_cookies', COOKIE_FORMAT) from None
    missing = missing_cookies(publisher, pairs)
    if missing:
        raise PageRefused('invalid_cookies', f'缺少必需的 Cookie：{", ".join(missing)}。请从已登录的浏览器中复制完整的 Cookie。')


def with_pictures(articles, pictures):
    """The articles, each with the pictures of `pictures` ({file name: base64}) its Markdown
    references, by the name it uses (a path like images/a.png finds the file a.png)."""
    found = []
    for article in articles:
        wanted = [source for source in images.sources_in(content.render_markdown(article['content']))
                  if not images.is_remote(source)]
        given = {source: pictures.get(source, pictures.get(source.rsplit('/', 1)[-1])) for source in wanted}
        found.append({**article, 'images': {source: data for source, data in given.items() if data is not None}})
    return found


def article_groups(views, rows):
    """The rows of the task table, an article's tasks on each platform together: [[TaskRow]],
    newest article first. The rows come newest first, so each group is turned round to
    show its platforms in the order they were chosen. A task without a batch is alone."""
    groups, last_key = [], None
    for view, row in zip(views, rows):
        key = (row['batch_id'], row['article_index']) if row['batch_id'] else row['task_id']
        if groups and key == last_key:
            groups[-1].append(view)
        else:
            groups.append([view])
        last_key = key
    return [group[::-1] for group in groups]


def zone_label(zone):
    """How the pages name the zone their times are in: 'Asia/Shanghai, UTC+08:00'."""
    offset = datetime.datetime.now(zone).strftime('%z')
    return f'{zone.key}, UTC{offset[:3]}:{offset[3:]}'


def topic_names(text):
    """The topics typed into the batch form, separated by commas (either width), 、 or ;."""
    names = [name.strip() for name in re.split(r'[,，、;；\n]+', text or '') if name.strip()]
    return names or None


def typed_slots(form):
    """The article fields of the form in order: one `title` and one `content` per article."""
    titles, contents = form_texts(form, 'title'), form_texts(form, 'content')
    if len(titles) != len(contents):
        raise InvalidRequest('invalid_form', 'every article needs one title and one content field')
    return [{'title': title, 'content': content.replace('\r\n', '\n')} for title, content in zip(titles, contents)]


def form_text(form, name, default=''):
    """The last value of a text field, or `default`."""
    texts = form_texts(form, name)
    return texts[-1] if texts else default


def form_texts(form, name):
    """Every value of a text field. Bottle keeps a long multipart field in a file, as it
    does an upload (over MEMFILE_MAX, 100 KB); such a value is read back here."""
    texts = []
    for value in form.getall(name):
        if isinstance(value, bottle.FileUpload):
            value.file.seek(0)
            try:
                value = value.file.read().decode('utf-8')
            except UnicodeDecodeError:
                raise InvalidRequest('invalid_text', f'the {name} field is not UTF-8') from None
        texts.append(value)
    return texts


def account_sentence(refusal):
    """What the accounts page says when a login cannot be stored: the platform's own sentence
    (a site that is not WordPress, say) where there is one."""
    if refusal.code == 'invalid_cookies':
        return COOKIE_FORMAT
    return f'无法保存这个登录：{refusal.message}'


def locked_message(seconds):
    return f'密码错误次数太多，这个账号已被暂时锁定，请 {max(1, math.ceil(seconds / 60))} 分钟后再试。'


def evidence_links(task_id, attempt, names):
    """[(label, URL)] of an attempt's saved evidence, screenshot first."""
    return [(label, web.evidence_url(task_id, attempt, name)) for name, label in EVIDENCE_LABELS.items()
            if name in names]


def web_url(url):
    """A platform's article URL, if it is one a link may point to (never javascript: and the like)."""
    if isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ('http', 'https'):
        return url
    return None


def is_htmx():
    return bottle.request.get_header('HX-Request') == 'true'


def see_other(path):
    """A 303 to a path of this site, keeping the headers set so far (a new cookie)."""
    response = bottle.response.copy(cls=bottle.HTTPResponse)
    response.status = 303
    response.body = ''
    response.set_header('Location', path)
    return response
