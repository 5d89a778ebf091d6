"""What a publish task can be: its statuses, the outcomes of its attempts, its priorities and
the evidence files a failed attempt leaves. Every other module (and schema.sql's ENUMs, which
a test holds to these) takes the words from here.
"""

PENDING, RUNNING, SUCCESS, FAILED, RETRY, CANCELLED = 'pending', 'running', 'success', 'failed', 'retry', 'cancelled'
SCHEDULED = 'scheduled'
STATUSES = (PENDING, RUNNING, SUCCESS, FAILED, RETRY, CANCELLED, SCHEDULED)
QUEUED = (PENDING, RETRY)
# A scheduled task waits for its `publish_at` in MySQL alone: no queue entry, no worker, and
# a limit of its own, so ACTIVE (what the per-user limit of unfinished tasks counts) leaves it out.
ACTIVE = (PENDING, RUNNING, RETRY)
UNFINISHED = (*ACTIVE, SCHEDULED)
FINISHED = (SUCCESS, FAILED, CANCELLED)
REOPENABLE = (FAILED, CANCELLED)
CANCELLABLE = (PENDING, RETRY, RUNNING, SCHEDULED)

# How one attempt ended. 'running' while it runs; 'lost' when its worker stopped answering,
# 'timeout' when it ran out of time, 'unknown' when it failed after the submit click.
OUTCOMES = ('running', 'success', 'failed', 'timeout', 'lost', 'unknown', 'cancelled')
UNKNOWN_OUTCOMES = ('lost', 'timeout', 'unknown')

NORMAL, URGENT = 'normal', 'urgent'
PRIORITIES = (NORMAL, URGENT)

# In the order a failed attempt saves them; `answer.json` is the platform's own answer to the
# request that failed, when the publisher has one.
EVIDENCE_FILES = ('url.txt', 'page.html', 'screenshot.png', 'answer.json')
