"""The sandbox platform's web app: a JSON API for tests and operators, browser pages for publishers.

The API is what scripts call (accounts, sessions, faults, article listings); the pages are what a
publisher's headless browser drives (login, the editor, the article page), like on Zhihu.
"""

import functools
import json
import time
from pathlib import Path
from urllib.parse import quote

import bottle
import jinja2
import waitress
from bottle import redirect, request, response, static_file
from markupsafe import Markup

from .state import SESSION_COOKIE, TITLE_MAX_CHARS, SandboxError, SandboxState

PACKAGE_DIR = Path(__file__).parent
DEFAULT_NEXT_PAGE = '/write'

HTTP_STATUS = {
    'invalid_json': 400,
    'invalid_field': 400,
    'invalid_fault': 400,
    'invalid_image': 400,
    'empty_content': 400,
    'title_too_long': 400,
    'invalid_credentials': 401,
    'not_logged_in': 401,
    'article_not_found': 404,
    'image_not_found': 404,
    'account_exists': 409,
    'too_frequent': 429,
    'publish_failed': 500,
    'upload_failed': 500,
    'response_lost': 502,
}
CODE_FOR_BOTTLE_STATUS = {404: 'not_found', 405: 'method_not_allowed', 500: 'internal_error'}
MESSAGE_FOR_BOTTLE_STATUS = {404: '页面不存在', 405: '不支持的请求方法', 500: '服务器开小差了，请稍后再试'}

dump_json = functools.partial(json.dumps, ensure_ascii=False)


def make_app(state: SandboxState = None) -> bottle.Bottle:
    """Build the sandbox app around `state` (a fresh, empty platform when None)."""
    state = state if state is not None else SandboxState()
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / 'templates'),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app = bottle.Bottle()
    app.uninstall('json')
    app.install(bottle.JSONPlugin(json_dumps=dump_json))
    app.install(refusals_as_http_errors)
    app.add_hook('before_request', functools.partial(delay_pages, state))
    add_error_handlers(app, templates)
    add_api_routes(app, state)
    add_page_routes(app, state, templates)
    return app


def serve(bind: str = '127.0.0.1:8090', state: SandboxState = None):
    """Serve the sandbox on waitress until interrupted."""
    waitress.serve(make_app(state), listen=bind, threads=8)


# ---------------------------------------------------------------------------------------------------
# Errors: SandboxError becomes an HTTP status here; the error handlers answer JSON under /api/, pages
# everywhere else.
# ---------------------------------------------------------------------------------------------------


def refusals_as_http_errors(callback):
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except SandboxError as refusal:
            raise bottle.HTTPError(HTTP_STATUS[refusal.code], refusal.message, exception=refusal)

    return wrapper


def add_error_handlers(app, templates):
    def render_error(http_error):
        refusal = http_error.exception if isinstance(http_error.exception, SandboxError) else None
        status = http_error.status_code
        code = refusal.code if refusal else CODE_FOR_BOTTLE_STATUS.get(status, 'http_error')
        message = refusal.message if refusal else MESSAGE_FOR_BOTTLE_STATUS.get(status, http_error.status_line)
        if request.path.startswith('/api/'):
            response.content_type = 'application/json'
            return dump_json({'error': {'code': code, 'message': message}})
        return templates.get_template('error.html').render(status=status, message=message, account=None)

    for status in {*HTTP_STATUS.values(), *CODE_FOR_BOTTLE_STATUS}:
        app.error_handler[status] = render_error


# ---------------------------------------------------------------------------------------------------
# JSON API
# ---------------------------------------------------------------------------------------------------


def add_api_routes(app, state):
    @app.post('/api/accounts')
    def create_account():
        payload = read_json_object()
        name = state.create_account(payload.get('name'), payload.get('password'))
        response.status = 201
        return {'name': name}

    @app.post('/api/session')
    def create_session():
        payload = read_json_object()
        token = state.log_in(payload.get('name'), payload.get('password'))
        return {'cookies': f'{SESSION_COOKIE}={token}'}

    @app.get('/api/me')
    def who_am_i():
        return {'name': logged_in_account(state)}

    @app.get('/api/me/articles')
    def my_articles():
        own_articles = state.articles(account=logged_in_account(state))
        return {'articles': [article_item(article) for article in reversed(own_articles)]}

    @app.get('/api/articles')
    def all_articles():
        return {'articles': [article_item(article) for article in state.articles()]}

    @app.post('/api/publish')
    def publish():
        account = logged_in_account(state)
        payload = read_json_object()
        article = publish_like_a_flaky_platform(state, account, payload.get('title'), payload.get('body'))
        return {'id': article.id, 'url': article_url(article.id)}

    @app.post('/api/images')
    def upload_image():
        """A picture's raw bytes, as the editor uploads a pasted picture; answers where it now lives."""
        account = logged_in_account(state)
        image = state.store_image(account, request.content_type.split(';')[0].strip(), request.body.read())
        response.status = 201
        return image_item(image)

    @app.get('/api/images')
    def all_images():
        return {'images': [image_item(image) for image in state.images()]}

    @app.get('/images/<image_id:int>')
    def image_file(image_id):
        image = state.image(image_id)
        response.content_type = image.mime
        return image.data

    @app.get('/api/faults')
    def read_faults():
        return state.faults().as_dict()

    @app.post('/api/faults')
    def set_faults():
        return state.set_faults(read_json_object()).as_dict()

    @app.post('/api/reset')
    def reset():
        state.reset()
        return {'reset': True}


def publish_like_a_flaky_platform(state, account, title, body):
    """Publish, misbehaving as the fault knobs say; a lost response happens after the article is stored."""
    faults = state.faults()
    time.sleep(faults.publish_latency_ms / 1000)
    if faults.too_frequent:
        raise SandboxError('too_frequent', '操作过于频繁，请稍后再试')
    if state.happens_with(faults.publish_fail_rate):
        raise SandboxError('publish_failed', '服务器开小差了，发布失败，请稍后再试')
    article = state.publish(account, title, body)
    if state.happens_with(faults.lost_response_rate):
        raise SandboxError('response_lost', '网关错误，请稍后再试')
    return article


def read_json_object():
    """The request body as a JSON object; an empty body counts as {}."""
    try:
        payload = json.loads(request.body.read() or b'{}')
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise SandboxError('invalid_json', '请求体必须是 JSON 对象')
    return payload


def logged_in_account(state):
    return state.account_for(request.get_cookie(SESSION_COOKIE))


def viewing_account(state):
    """The logged-in account for a page header, or None for a visitor."""
    try:
        return logged_in_account(state)
    except SandboxError:
        return None


def article_item(article):
    return {
        'id': article.id,
        'account': article.account,
        'title': article.title,
        'body_sha256': article.body_sha256,
        'url': article_url(article.id),
        'created_at': article.created_at.isoformat(timespec='milliseconds'),
    }


def image_item(image):
    return {'id': image.id, 'account': image.account, 'mime': image.mime, 'size': len(image.data),
            'sha256': image.sha256, 'url': f'{request.urlparts.scheme}://{request.urlparts.netloc}/images/{image.id}'}


def article_url(article_id):
    """Absolute, built from the host the caller used to reach us."""
    scheme, host = request.urlparts.scheme, request.urlparts.netloc
    return f'{scheme}://{host}/p/{article_id}'


# ---------------------------------------------------------------------------------------------------
# Browser pages
# ---------------------------------------------------------------------------------------------------


def delay_pages(state):
    """page_latency_ms slows every HTML page, the way a loaded platform does; the API stays fast."""
    if not request.path.startswith(('/api/', '/static/')):
        time.sleep(state.faults().page_latency_ms / 1000)


def add_page_routes(app, state, templates):
    def render(template_name, **context):
        return templates.get_template(template_name).render(**context)

    @app.get('/')
    def home():
        redirect(DEFAULT_NEXT_PAGE)

    @app.get('/login')
    def login_form():
        next_page = local_path(request.query.next)
        return render('login.html', account=viewing_account(state), error=None, name='', next=next_page)

    @app.post('/login')
    def log_in():
        name = request.forms.getunicode('name', default='')
        next_page = local_path(request.forms.getunicode('next', default=''))
        try:
            token = state.log_in(name, request.forms.getunicode('password', default=''))
        except SandboxError as refusal:
            return render('login.html', account=None, error=refusal.message, name=name, next=next_page)
        response.set_cookie(SESSION_COOKIE, token, path='/', httponly=True, samesite='lax')
        redirect(next_page)

    @app.get('/write')
    def write():
        try:
            account = logged_in_account(state)
        except SandboxError:
            redirect(f'/login?next={quote(request.path)}')
        return render('write.html', account=account, title_max_chars=TITLE_MAX_CHARS)

    @app.get('/p/<article_id:int>')
    def article_page(article_id):
        """The body was sanitized when it was published, so it is rendered as markup."""
        article = state.article(article_id)
        body = Markup(article.body_html)
        return render('article.html', account=viewing_account(state), article=article, body=body)

    @app.get('/static/<filename:path>')
    def static(filename):
        return static_file(filename, root=PACKAGE_DIR / 'static')


def local_path(next_page):
    """Only redirect within the sandbox: `next` must be a path on this site, not another origin."""
    if next_page.startswith('/') and not next_page.startswith('//') and '\\' not in next_page:
        return next_page
    return DEFAULT_NEXT_PAGE
