"""The local sandbox platform: a small Zhihu-like site that TOP_N publishes to in demos, tests and benchmarks.

It has what a publisher meets on a real platform (password login, session cookies, a rich-text editor with
a confirm dialog, article pages) plus fault knobs that make it fail the ways real platforms do. Start it
with `python -m sandbox --bind 127.0.0.1:8090`, or embed it with `make_app()`.
"""

from .app import make_app, serve
from .state import SESSION_COOKIE, SandboxState

__all__ = ['SESSION_COOKIE', 'SandboxState', 'make_app', 'serve']
