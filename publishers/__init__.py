"""Platform publishers, by the platform name users choose."""

from publishers.noop import NoopPublisher
from publishers.sandbox import SandboxPublisher
from publishers.wordpress import WordPressPublisher
from publishers.zhihu import ZhihuPublisher

PUBLISHER_CLASSES = (NoopPublisher, SandboxPublisher, WordPressPublisher, ZhihuPublisher)


def load_publishers(config):
    return {cls.name: cls.from_config(config) for cls in PUBLISHER_CLASSES}
