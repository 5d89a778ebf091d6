"""Queues, limits, retries and recovery.

MySQL holds every task and is the only truth about its state; Redis is the dispatch
path and may lose everything at any moment without losing a task:

- Admission runs in one MySQL transaction that holds the user's row lock, so the
  per-user limits hold under any number of parallel requests.
- Each user has a Redis list of queued task ids; a ring of users with work gives each
  user one turn (a VIP user `vip_turns` turns) per round, so one user's backlog never
  delays another user's next task by more than one turn. Urgent tasks go to the front
  of their own user's list only.
- A worker pops a task id with one Lua script, then takes the task with a conditional
  UPDATE in MySQL (pending/retry -> running, attempt + 1, lease). Only that UPDATE makes
  a task run, so a task id that sits in Redis twice still runs once.
- The lease lives in MySQL and the worker's heartbeat renews it; a lease in Redis would
  vanish with a FLUSHDB and make running tasks look abandoned.
- The reaper requeues attempts whose lease expired or that ran past the task timeout,
  promotes retries whose backoff has passed, and rebuilds the Redis queues from MySQL
  whenever Redis lost them (and every `reconcile_interval` as a safety net).
"""

import datetime
import json
import logging
import math
import random
import time
import uuid
import zoneinfo

import redis

import images
import tasks
from db import DatabaseUnavailable, host_of
from errors import Conflict, InvalidRequest, LimitReached, NotFound

log = logging.getLogger('topn.scheduler')

RECONCILE_SETTLE = 5.0
CLEANUP_INTERVAL = 600.0
TOPICS_MAX = 5
TOPIC_MAX_CHARS = 50
SCHEDULE_GRACE = 10.0  # a publish_at this many seconds past is "now" (clocks and typing differ a little)
SCHEDULE_MAX_AHEAD = datetime.timedelta(days=90)
HOSTS_STOPPED_SHOWN = 3600  # seconds a cleanly stopped host stays in the figures


# -- Redis keys ----------------------------------------------------------------------

class Keys:
    """Every Redis key TOP_N uses, under one prefix so deployments and test runs can share a server."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.queue_prefix = f'{prefix}:queue:'
        self.ring = f'{prefix}:ring'
        self.ring_members = f'{prefix}:ring:members'
        self.turns_used = f'{prefix}:ring:turns'
        self.weights = f'{prefix}:weights'
        self.delayed = f'{prefix}:delayed'
        self.wakeup = f'{prefix}:wakeup'
        self.epoch = f'{prefix}:epoch'
        self.pool_prefix = f'{prefix}:pool:'
        self.login_failures_prefix = f'{prefix}:login:failures:'

    def pool(self, worker_id):
        return f'{self.pool_prefix}{worker_id}'
    def queue(self, user_id):
        return f'{self.queue_prefix}{user_id}'


# Push task ids onto one user's queue and make sure the user is in the ring.
# KEYS: ring, ring_members, weights, wakeup, queue. ARGV: user_id, weight ('' keeps the
# user's current weight), front (0/1), task ids...
ENQUEUE_LUA = """
local front = ARGV[3] == '1'
for i = 4, #ARGV do
  if front then redis.call('LPUSH', KEYS[5], ARGV[i]) else redis.call('RPUSH', KEYS[5], ARGV[i]) end
  redis.call('LPUSH', KEYS[4], '1')
end
redis.call('LTRIM', KEYS[4], 0, 255)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then redis.call('RPUSH', KEYS[1], ARGV[1]) end
return #ARGV - 3
"""

# Pop the next task id in round-robin order. The user at the head of the ring gives one
# task per turn and has `weight` turns in a row; then it moves to the tail. Users whose
# queue ran dry leave the ring. KEYS: ring, ring_members, turns_used, weights.
# ARGV: queue key prefix. Returns {user_id, task_id} or nil.
CLAIM_LUA = """
local rounds = redis.call('LLEN', KEYS[1])
for i = 1, rounds do
  local uid = redis.call('LINDEX', KEYS[1], 0)
  if not uid then return nil end
  local queue = ARGV[1] .. uid
  local task = redis.call('LPOP', queue)
  if task then
    local left = redis.call('LLEN', queue)
    local weight = tonumber(redis.call('HGET', KEYS[4], uid) or '1')
    local used = redis.call('HINCRBY', KEYS[3], uid, 1)
    if left == 0 then
      redis.call('LPOP', KEYS[1])
      redis.call('SREM', KEYS[2], uid)
      redis.call('HDEL', KEYS[3], uid)
    elseif used >= weight then
      redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
      redis.call('HDEL', KEYS[3], uid)
    end
    return {uid, task}
  end
  redis.call('LPOP', KEYS[1])
  redis.call('SREM', KEYS[2], uid)
  redis.call('HDEL', KEYS[3], uid)
end
return nil
"""

# Move retries whose backoff has passed from the delayed set to their user's queue.
# KEYS: delayed, ring, ring_members, weights, wakeup. ARGV: now, queue key prefix.
PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local sep = string.find(member, ':', 1, true)
  local uid = string.sub(member, 1, sep - 1)
  redis.call('RPUSH', ARGV[2] .. uid, string.sub(member, sep + 1))
  redis.call('LPUSH', KEYS[5], '1')
  if redis.call('SADD', KEYS[3], uid) == 1 then redis.call('RPUSH', KEYS[2], uid) end
end
redis.call('LTRIM', KEYS[5], 0, 255)
return #due
"""


def _is_encodable(text):
    try:
        text.encode('utf-8')
        return True
    except UnicodeEncodeError:
        return False


def validate_topics(topics):
    """Topic names a user gave (for a batch or one article) as stored: trimmed, duplicates
    dropped, None when none were named. Raises ValueError saying what is wrong."""
    if topics is None:
        return None
    if not isinstance(topics, list) or not all(isinstance(topic, str) for topic in topics):
        raise ValueError('topics must be a list of topic names')
    names = list(dict.fromkeys(topic.strip() for topic in topics if topic.strip()))
    if len(names) > TOPICS_MAX:
        raise ValueError(f'at most {TOPICS_MAX} topics may be named, not {len(names)}')
    for name in names:
        if len(name) > TOPIC_MAX_CHARS or not _is_encodable(name):
            raise ValueError(f'the topic {name[:TOPIC_MAX_CHARS]!r} is not a topic name of at most '
                             f'{TOPIC_MAX_CHARS} characters')
    return names or None


def parse_publish_at(raw, timezone, now=None):
    """When a batch is to go out, as an aware UTC time, or None for now.

    ISO 8601; a time without an offset is read in `timezone` (the zone the pages show).
    Raises InvalidRequest for what is not a time, is in the past, or is too far ahead."""
    if raw is None or raw == '':
        return None
    if not isinstance(raw, str):
        raise InvalidRequest('invalid_publish_at', 'publish_at must be a time such as 2026-12-04T09:00:00+08:00')
    try:
        when = datetime.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise InvalidRequest('invalid_publish_at',
                             f'publish_at {raw[:40]!r} is not a time such as 2026-12-04T09:00:00+08:00') from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zoneinfo.ZoneInfo(timezone))
    when = when.astimezone(datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if when < now - datetime.timedelta(seconds=SCHEDULE_GRACE):
        raise InvalidRequest('publish_at_in_past', f'publish_at {raw[:40]} has already passed')
    if when > now + SCHEDULE_MAX_AHEAD:
        raise InvalidRequest('publish_at_too_far',
                             f'publish_at may be at most {SCHEDULE_MAX_AHEAD.days} days ahead, not {raw[:40]}')
    return when if when > now else None


def connect_redis(url):
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, decode_responses=True)


class Scheduler:
    def __init__(self, config, db, redis_client, platforms):
        self.config = config
        self.db = db
        self.redis = redis_client
        self.platforms = frozenset(platforms)
        self.login_platforms = frozenset(name for name, publisher in platforms.items() if publisher.needs_browser)
        self.keys = Keys(config.redis_prefix)
        self._enqueue = redis_client.register_script(ENQUEUE_LUA)
        self._claim = redis_client.register_script(CLAIM_LUA)
        self._promote = redis_client.register_script(PROMOTE_LUA)
        self._last_reconcile = 0.0
        self._last_cleanup = float('-inf')

    # -- admission ---------------------------------------------------------------

    def submit_batch(self, user_id, payload):
        """Accept a whole batch or refuse it whole. Returns the new task ids, one per
        (article, platform), article by article. A batch with a `publish_at` ahead is
        stored as scheduled and queued by the reaper when it is due."""
        articles, platforms, priority, publish_at = self.validate_batch(payload)
        self.redis.ping()
        due = publish_at and publish_at.replace(tzinfo=None)
        batch_id = str(uuid.uuid4())
        rows = [{
            'task_id': str(uuid.uuid4()), 'user_id': user_id, 'article_id': article.get('article_id'),
            'title': article['title'], 'content': article['content'], 'platform': platform,
            'priority': priority, 'max_retries': self.config.max_retries, 'pictures': article['pictures'],
            'topics': article['topics'], 'publish_at': due, 'batch_id': batch_id, 'article_index': index,
        } for index, article in enumerate(articles) for platform in platforms]

        def admit(cur):
            user = self.db.lock_user(cur, user_id)
            if user is None:
                raise NotFound('user_not_found', 'this user no longer exists')
            self._check_accounts(cur, user_id, platforms)
            self._check_articles_owned(cur, user_id, rows)
            self._check_limits(cur, user_id, platforms, len(articles), scheduled=due is not None)
            self.db.insert_tasks(cur, rows)
            for row in rows:
                self.db.insert_pictures(cur, row['task_id'], row['pictures'])
            return user

        user = self.db.run_transaction(admit)
        task_ids = [row['task_id'] for row in rows]
        if due is None:
            self._enqueue_after_commit(user_id, bool(user['is_vip']), task_ids, priority == tasks.URGENT)
        return task_ids

    def validate_batch(self, payload):
        if not isinstance(payload, dict):
            raise InvalidRequest('invalid_body', 'the request body must be a JSON object')
        articles = payload.get('articles')
        if not isinstance(articles, list) or not articles:
            raise InvalidRequest('empty_batch', 'a batch needs at least one article in "articles"')
        if len(articles) > self.config.batch_max:
            raise InvalidRequest(
                'batch_too_large',
                f'a batch holds at most {self.config.batch_max} articles, this one has {len(articles)}')
        platforms = self._validate_platforms(payload)
        publish_at = parse_publish_at(payload.get('publish_at'), self.config.display_timezone)
        priority = payload.get('priority') or tasks.NORMAL
        if priority not in tasks.PRIORITIES:
            raise InvalidRequest('invalid_priority', f'priority must be one of {", ".join(tasks.PRIORITIES)}')
        try:
            topics = validate_topics(payload.get('topics'))
        except ValueError as error:
            raise InvalidRequest('invalid_topics', str(error)) from None
        validated = [self._validate_article(i, article, topics) for i, article in enumerate(articles)]
        return validated, platforms, priority, publish_at

    def _validate_platforms(self, payload):
        """The batch's platforms, in the order given: `platform` (one name) or `platforms` (a list)."""
        if 'platform' in payload and 'platforms' in payload:
            raise InvalidRequest('platform_and_platforms', 'give either "platform" or "platforms", not both')
        if 'platforms' in payload:
            platforms = payload['platforms']
            if not isinstance(platforms, list) or not platforms:
                raise InvalidRequest('invalid_platforms', '"platforms" must be a list of one or more platform names')
        else:
            platforms = [payload.get('platform')]
        for platform in platforms:
            if not isinstance(platform, str) or platform not in self.platforms:
                raise InvalidRequest(
                    'unknown_platform', f'unknown platform {platform!r}; known: {", ".join(sorted(self.platforms))}',
                    platform=platform if isinstance(platform, str) else None)
        repeated = sorted({platform for platform in platforms if platforms.count(platform) > 1})
        if repeated:
            raise InvalidRequest('duplicate_platform', f'the platform {repeated[0]} is listed twice',
                                 platform=repeated[0])
        return platforms

    def _validate_article(self, index, article, batch_topics=None):
        """The article as it will be stored, or InvalidRequest naming it (`article` = index).
        Its own topics, if it names any, else the batch's."""
        def refuse(code, message):
            return InvalidRequest(code, f'article {index + 1}: {message}', article=index)

        if not isinstance(article, dict):
            raise refuse('invalid_article', 'must be an object with "title" and "content"')
        title, content, article_id = article.get('title'), article.get('content'), article.get('article_id')
        if not isinstance(title, str) or not title.strip():
            raise refuse('empty_title', 'the title is empty')
        if len(title) > self.config.title_max_chars:
            raise refuse('title_too_long',
                         f'the title has {len(title)} characters, at most {self.config.title_max_chars} are allowed')
        if not isinstance(content, str) or not content.strip():
            raise refuse('empty_content', 'the body is empty')
        if not _is_encodable(title) or not _is_encodable(content):
            raise refuse('invalid_text', 'it holds characters that are not valid Unicode text')
        size = len(content.encode('utf-8'))
        if size > self.config.body_max_bytes:
            raise refuse('content_too_large',
                         f'the body is {size} bytes, at most {self.config.body_max_bytes} are allowed')
        valid_id = isinstance(article_id, int) and not isinstance(article_id, bool) and article_id >= 1
        if article_id is not None and not valid_id:
            raise refuse('invalid_article_id', 'article_id must be a positive integer')
        try:
            pictures = images.checked_images(content, article.get('images'), self.config.image_max_bytes,
                                             self.config.image_max_count)
        except images.BadImage as bad:
            raise refuse(bad.code, str(bad)) from None
        try:
            topics = validate_topics(article.get('topics')) or batch_topics
        except ValueError as error:
            raise refuse('invalid_topics', str(error)) from None
        return {'title': title.strip(), 'content': content, 'article_id': article_id, 'pictures': pictures,
                'topics': topics}

    def _check_articles_owned(self, cur, user_id, rows):
        wanted = {row['article_id'] for row in rows if row['article_id'] is not None}
        missing = wanted - self.db.owned_article_ids(cur, user_id, wanted)
        if missing:
            raise NotFound('article_not_found', f'no article with id {min(missing)}')

    def _check_accounts(self, cur, user_id, platforms):
        """Every platform that publishes through a login needs the user's stored login."""
        needing = [platform for platform in platforms if platform in self.login_platforms]
        stored = self.db.platforms_with_account(cur, user_id, needing)
        for platform in needing:
            if platform not in stored:
                raise InvalidRequest('no_account', f'no {platform} login is stored for you; add it first',
                                     platform=platform)

    def _check_limits(self, cur, user_id, platforms, adding, scheduled=False):
        """The per-user limits, counted per platform: `adding` tasks on each of `platforms`.
        Scheduled tasks count against a limit of their own instead of the unfinished one."""
        if scheduled:
            self._check_scheduled_limit(cur, user_id, adding * len(platforms))
        for platform in platforms:
            if not scheduled:
                self._check_active_limit(cur, user_id, platform, adding)
            recent, oldest_leaves_in = self.db.created_in_window(cur, user_id, platform, self.config.user_rate_window)
            if recent + adding > self.config.user_rate:
                raise LimitReached(
                    'rate_limited',
                    f'you created {recent} tasks on {platform} in the last {self.config.user_rate_window} s and '
                    f'at most {self.config.user_rate} are allowed in that time',
                    retry_after=max(1, math.ceil(oldest_leaves_in)), platform=platform)

    def _check_active_limit(self, cur, user_id, platform, adding):
        active = self.db.count_active(cur, user_id, platform)
        if active + adding > self.config.user_max_active:
            raise LimitReached(
                'too_many_active',
                f'you have {active} unfinished tasks on {platform} and at most {self.config.user_max_active} '
                f'may be unfinished at once; wait for some to finish before adding {adding} more',
                retry_after=10, platform=platform)

    def _check_scheduled_limit(self, cur, user_id, adding):
        scheduled = self.db.count_scheduled(cur, user_id)
        if scheduled + adding > self.config.user_max_scheduled:
            raise LimitReached(
                'too_many_scheduled',
                f'you have {scheduled} scheduled tasks and at most {self.config.user_max_scheduled} may wait '
                f'for their time at once; this batch would add {adding}')

    # -- dispatch ------------------------------------------------------------------

    def enqueue(self, user_id, task_ids, is_vip=None, urgent=False):
        """Queue task ids for a user; urgent ones go ahead of that user's other tasks.
        `is_vip` None leaves the user's turns per round as they are."""
        if not task_ids:
            return
        ordered = list(reversed(task_ids)) if urgent else list(task_ids)
        weight = '' if is_vip is None else (self.config.vip_turns if is_vip else 1)
        keys = self.keys
        self._enqueue(keys=[keys.ring, keys.ring_members, keys.weights, keys.wakeup, keys.queue(user_id)],
                      args=[user_id, weight, int(urgent), *ordered])

    def _enqueue_after_commit(self, user_id, is_vip, task_ids, urgent):
        """The rows are committed, so a Redis failure here loses nothing: the reaper's
        reconcile pass puts the tasks on the queue from MySQL."""
        try:
            self.enqueue(user_id, task_ids, is_vip, urgent)
        except redis.RedisError:
            log.warning('could not queue %d tasks of user %s in Redis; reconcile will', len(task_ids), user_id)

    def claim(self, worker_id):
        """Pop task ids in round-robin order until one can be started. Returns the task row
        (now running, with this attempt's lease) or None when nothing is runnable."""
        keys = self.keys
        while True:
            popped = self._claim(keys=[keys.ring, keys.ring_members, keys.turns_used, keys.weights],
                                 args=[keys.queue_prefix])
            if not popped:
                return None
            user_id, task_id = int(popped[0]), popped[1]
            try:
                task = self.db.start_attempt(task_id, worker_id, self.config.lease_ttl)
            except DatabaseUnavailable:
                self._put_back(user_id, task_id)
                raise
            if task is not None:
                return task
            self._delay_if_not_due(task_id)

    def _put_back(self, user_id, task_id):
        try:
            self.enqueue(user_id, [task_id], urgent=True)
        except redis.RedisError:
            log.warning('could not put task %s back; reconcile will', task_id)

    def _delay_if_not_due(self, task_id):
        """A popped task that did not start is either taken already (drop it) or a retry
        that was promoted a little early by clock skew (put it back in the delayed set)."""
        for row in self.db.claimable_tasks(task_id=task_id):
            self._schedule(row['user_id'], task_id, float(row['due_in']))

    def wait_for_work(self, timeout):
        """Block until a task may have been queued, or `timeout` seconds pass."""
        self.redis.blpop([self.keys.wakeup], timeout=timeout)

    def _schedule(self, user_id, task_id, delay):
        self.redis.zadd(self.keys.delayed, {f'{user_id}:{task_id}': time.time() + delay})

    def promote_due_retries(self, now=None):
        keys = self.keys
        return self._promote(keys=[keys.delayed, keys.ring, keys.ring_members, keys.weights, keys.wakeup],
                             args=[now if now is not None else time.time(), keys.queue_prefix])

    # -- outcomes of attempts ------------------------------------------------------

    def backoff(self, retry_count):
        """Exponential backoff with +/-20% jitter: base, 2 x base, 4 x base, ..."""
        return self.config.retry_backoff * (2 ** retry_count) * random.uniform(0.8, 1.2)

    def record_success(self, task, url, note=None):
        """Returns the task's new status, or None when the attempt no longer owned the task.
        `note` is what the user should know about the published article."""
        ended = self.db.end_attempt(task['task_id'], task['attempt'], tasks.SUCCESS, 'success', result_url=url,
                                    note=note)
        return tasks.SUCCESS if ended else None

    def record_cancelled(self, task):
        ended = self.db.end_attempt(task['task_id'], task['attempt'], tasks.CANCELLED, 'cancelled',
                                    error='cancelled by the user')
        return tasks.CANCELLED if ended else None

    def record_failure(self, task, error, retryable=True, outcome='failed', retry_after=0.0):
        """Fail one attempt: queue a retry after backoff while retries are left, else fail the task.
        After an attempt whose outcome is unknown, the retry waits at least
        `unknown_outcome_settle` seconds, so that a publish still in flight has landed on
        the platform before the retry looks there for it; a platform that asked for a pause
        (risk control, throttling) gets at least `retry_after` seconds.
        Returns the task's new status, or None when the attempt no longer owned the task."""
        task_id, attempt = task['task_id'], task['attempt']
        if retryable and task['retry_count'] < task['max_retries']:
            delay = max(self.backoff(task['retry_count']), retry_after)
            if outcome in tasks.UNKNOWN_OUTCOMES:
                delay = max(delay, self.config.unknown_outcome_settle)
            if not self.db.end_attempt(task_id, attempt, tasks.RETRY, outcome, error=error, retry_in=delay):
                return None
            try:
                self._schedule(task['user_id'], task_id, delay)
            except redis.RedisError:
                log.warning('could not schedule retry of %s in Redis; reconcile will', task_id)
            return tasks.RETRY
        if not self.db.end_attempt(task_id, attempt, tasks.FAILED, outcome, error=error):
            return None
        return tasks.FAILED

    def give_back(self, task):
        """Put a claimed task back, unattempted, at the head of its user's queue: the worker
        found it had no browser for it after all, and another worker takes it."""
        if not self.db.defer_attempt(task['task_id'], task['attempt'], 0):
            return False
        self._put_back(task['user_id'], task['task_id'])
        return True

    def defer(self, task, delay):
        """Put a claimed task back, unattempted, to run in `delay` seconds."""
        if not self.db.defer_attempt(task['task_id'], task['attempt'], delay):
            return False
        try:
            self._schedule(task['user_id'], task['task_id'], delay)
        except redis.RedisError:
            log.warning('could not schedule deferred task %s in Redis; reconcile will', task['task_id'])
        return True

    # -- user actions ----------------------------------------------------------------

    def cancel(self, user_id, task_id):
        """Cancel a task. Returns 'cancelled' when done at once, 'cancelling' when its
        worker will stop at its next step."""
        for _ in range(3):
            if self.db.cancel_queued(user_id, task_id):
                self._remove_from_queues(user_id, task_id)
                return 'cancelled'
            if self.db.request_cancel(user_id, task_id):
                return 'cancelling'
            task = self.db.task_for_user(user_id, task_id)
            if task is None:
                raise NotFound('task_not_found', f'no task {task_id}')
            if task['status'] in tasks.FINISHED:
                raise Conflict('task_finished', f'the task is already {task["status"]} and cannot be cancelled')
        raise Conflict('task_busy', 'the task changed state while cancelling; try again')

    def _remove_from_queues(self, user_id, task_id):
        try:
            self.redis.lrem(self.keys.queue(user_id), 0, task_id)
            self.redis.zrem(self.keys.delayed, f'{user_id}:{task_id}')
        except redis.RedisError:
            log.info('task %s cancelled; its queue entry stays until a worker drops it', task_id)

    def retry(self, user_id, task_id):
        """Give a failed or cancelled task a fresh set of attempts."""
        self.redis.ping()

        def reopen(cur):
            user = self.db.lock_user(cur, user_id)
            status, platform = self.db.task_status(cur, user_id, task_id)
            if status is None:
                raise NotFound('task_not_found', f'no task {task_id}')
            if status not in tasks.REOPENABLE:
                raise Conflict('task_not_retryable',
                               f'only failed or cancelled tasks can be retried; this one is {status}')
            self._check_active_limit(cur, user_id, platform, 1)
            self.db.reopen_task(cur, user_id, task_id)
            return user

        user = self.db.run_transaction(reopen)
        self._enqueue_after_commit(user_id, bool(user['is_vip']), [task_id], urgent=False)

    # -- recovery --------------------------------------------------------------------

    def reap(self, now=None):
        """One pass of the reaper: rebuild Redis if it lost our keys, promote due retries,
        take back overdue attempts, and reconcile Redis with MySQL now and then."""
        now = time.monotonic() if now is None else now
        if not self.redis.exists(self.keys.epoch):
            if self._last_reconcile:
                log.warning('Redis has lost the dispatch queues (restart or flush); rebuilding them from MySQL')
            self.rebuild_queues()
        elif now - self._last_reconcile >= self.config.reconcile_interval:
            self.rebuild_queues(settled_only=True)
        self.queue_due_scheduled()
        self.promote_due_retries()
        if now - self._last_cleanup >= CLEANUP_INTERVAL:
            self.delete_expired_tasks()
            self._last_cleanup = now
        return self.requeue_overdue_attempts()

    def queue_due_scheduled(self):
        """Queue the scheduled tasks whose time has come. MySQL turns them pending first, so
        a Redis failure right after loses none: the next rebuild queues pending tasks."""
        due = self.db.promote_due_scheduled()
        if not due:
            return 0
        vips = self.db.vip_user_ids()
        by_user = {}
        for row in due:
            by_user.setdefault((row['user_id'], row['priority'] == tasks.URGENT), []).append(row['task_id'])
        for (user_id, urgent), task_ids in by_user.items():
            self._enqueue_after_commit(user_id, user_id in vips, task_ids, urgent)
        log.info('%d scheduled tasks are due and queued', len(due))
        return len(due)

    def delete_expired_tasks(self):
        """Old finished tasks go after TOPN_RETENTION_DAYS, their evidence with them."""
        task_ids = self.db.delete_finished_before(self.config.retention_days)
        if task_ids:
            log.info('deleted %d tasks finished more than %g days ago', len(task_ids), self.config.retention_days)
        return len(task_ids)

    def reap_and_log_errors(self):
        """A reaper pass for a loop that must keep going: MySQL or Redis being away is logged."""
        try:
            return self.reap()
        except (DatabaseUnavailable, redis.RedisError) as error:
            log.warning('reaper pass skipped: %s', error)
        except Exception:
            log.exception('reaper pass failed')
        return 0

    def requeue_overdue_attempts(self):
        taken_back = 0
        for row in self.db.overdue_attempts(self.config.task_timeout):
            if row['lease_expired']:
                reason, outcome = f'worker {row["worker_id"]} stopped answering (lease expired)', 'lost'
            else:
                reason, outcome = f'timed out after {self.config.task_timeout:g} s', 'timeout'
            status = self.record_failure(row, reason, retryable=True, outcome=outcome)
            if status:
                taken_back += 1
                log.warning('task %s attempt %s: %s; now %s', row['task_id'], row['attempt'], reason, status)
        return taken_back

    def rebuild_queues(self, settled_only=False):
        """Queue every claimable task that Redis does not hold. Idempotent, and safe to run
        while workers claim: a task queued twice is started only once (see `claim`).

        Redis is read before MySQL, so a task popped meanwhile is not taken for missing.
        The periodic pass (`settled_only`) also skips rows changed in the last few seconds,
        which a worker may have popped and not yet started; a rebuild after Redis lost
        its keys takes every row."""
        self._last_reconcile = time.monotonic()
        present = self._ids_in_redis()
        rows = self.db.claimable_tasks(unchanged_for=RECONCILE_SETTLE if settled_only else 0.0)
        missing = [row for row in rows if row['task_id'] not in present]
        vips = self.db.vip_user_ids() if missing else set()
        ready = {}
        for row in missing:
            if row['due_in'] > 0:
                self._schedule(row['user_id'], row['task_id'], float(row['due_in']))
            else:
                ready.setdefault((row['user_id'], row['priority'] == tasks.URGENT), []).append(row['task_id'])
        for (user_id, urgent), task_ids in ready.items():
            self.enqueue(user_id, task_ids, user_id in vips, urgent)
        self.redis.set(self.keys.epoch, str(time.time()))
        if missing:
            log.warning('reconcile queued %d tasks that Redis did not hold', len(missing))
        return len(missing)

    def _ids_in_redis(self):
        user_queues = list(self.redis.scan_iter(match=self.keys.queue_prefix + '*', count=1000))
        pipe = self.redis.pipeline(transaction=False)
        for queue in user_queues:
            pipe.lrange(queue, 0, -1)
        pipe.zrange(self.keys.delayed, 0, -1)
        *queues, delayed = pipe.execute()
        present = {task_id for queue in queues for task_id in queue}
        present.update(member.split(':', 1)[1] for member in delayed)
        return present

    # -- figures -----------------------------------------------------------------------

    def metrics(self):
        """The operators' figures, for the CLI, the API (JSON and Prometheus) and the admin page."""
        by_status, active_users, avg_seconds = self.db.task_figures()
        finished = by_status.get(tasks.SUCCESS, 0) + by_status.get(tasks.FAILED, 0)
        queues = self.queue_lengths()
        scheduled = self.db.scheduled_figures()
        names = self.db.user_names(list(queues) + list(scheduled))
        return {
            'active_users': active_users,
            'total_tasks': sum(by_status.values()),
            'running_tasks': by_status.get(tasks.RUNNING, 0),
            'tasks_by_status': {status: by_status.get(status, 0) for status in tasks.STATUSES},
            'queue_length_per_user': {names.get(user_id, str(user_id)): n for user_id, n in queues.items()},
            'waiting_retries': self.redis.zcard(self.keys.delayed),
            'scheduled_per_user': {names.get(user_id, str(user_id)): n for user_id, (n, _) in scheduled.items()},
            'next_scheduled_at': min((due for _, due in scheduled.values()), default=None),
            'success_rate': round(by_status.get(tasks.SUCCESS, 0) / finished, 4) if finished else None,
            'avg_task_seconds': round(avg_seconds, 3) if avg_seconds is not None else None,
            'browser_pool': self.pool_usage(),
            'hosts': self.host_figures(),
        }

    def queue_lengths(self):
        """Queued task ids per user id (tasks waiting out a retry backoff are not counted)."""
        user_ids = sorted(self.redis.smembers(self.keys.ring_members), key=int)
        lengths = [self.redis.llen(self.keys.queue(uid)) for uid in user_ids]
        return {int(uid): n for uid, n in zip(user_ids, lengths)}

    def report_pool(self, worker_id, stats, ttl):
        """A worker's browser pool figures, kept in Redis for `ttl` seconds (a dead
        worker's figures vanish on their own)."""
        self.redis.set(self.keys.pool(worker_id), json.dumps(stats), ex=max(1, int(ttl)))

    def pool_reports(self):
        """{worker id: its latest browser pool figures}, for the workers heard from lately."""
        keys = list(self.redis.scan_iter(match=self.keys.pool_prefix + '*'))
        values = self.redis.mget(keys) if keys else []
        return {key.removeprefix(self.keys.pool_prefix): json.loads(raw) for key, raw in zip(keys, values) if raw}

    def pool_usage(self, reports=None):
        """Browsers of every host: at work (or being wiped), idle in a pool, and the cap of one host."""
        reports = list((reports if reports is not None else self.pool_reports()).values())
        return {'working': sum(r['working'] + r['wiping'] for r in reports),
                'idle': sum(r['idle'] for r in reports), 'max': self.config.max_drivers}

    def host_figures(self):
        """Each host heard from lately: `up`, `silent` (its heartbeats stopped for longer than
        TOPN_LEASE_TTL: it died, or lost the database) or `stopped` (cleanly, within the hour),
        with its workers and their browsers."""
        reports = self.pool_reports()
        figures = []
        for row in self.db.hosts(stopped_within=HOSTS_STOPPED_SHOWN):
            mine = {worker: stats for worker, stats in reports.items() if host_of(worker) == row['host_id']}
            state = 'stopped' if row['stopped_at'] else 'silent' if row['silent_seconds'] > self.config.lease_ttl else 'up'
            figures.append({
                'host': row['host_id'], 'state': state, 'web': bool(row['web']), 'workers': row['workers'],
                'browsers': self.pool_usage(mine), 'started_at': row['started_at'],
                'heartbeat_at': row['heartbeat_at'], 'silent_seconds': round(row['silent_seconds'], 1),
            })
        return figures
