"""A publisher that publishes nowhere: for tests and benchmarks of the pipeline itself."""

import random
import time

from publishers.base import Publisher, PublishError

PROGRESS_EVERY = 0.25


class NoopPublisher(Publisher):
    name = 'noop'

    def __init__(self, delay=0.0, fail_rate=0.0):
        self.delay = delay
        self.fail_rate = fail_rate

    @classmethod
    def from_config(cls, config):
        return cls(delay=config.noop_delay, fail_rate=config.noop_fail_rate)

    def publish(self, attempt):
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < self.delay:
            attempt.progress(min(90, int(100 * elapsed / self.delay)))
            time.sleep(min(PROGRESS_EVERY, self.delay - elapsed))
        if self.fail_rate and random.random() < self.fail_rate:
            raise PublishError('noop: simulated failure (TOPN_NOOP_FAIL_RATE)')
        attempt.mark_submitted()
        return f'noop://published/{attempt.task_id}'
