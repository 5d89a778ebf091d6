-- TOP_N schema. MySQL is the source of truth for every task; Redis only carries dispatch.
-- Safe to apply twice: every statement is CREATE ... IF NOT EXISTS or ADD COLUMN IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS users (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name          VARCHAR(64)  NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    token_hash    CHAR(64)     NOT NULL,
    is_admin      TINYINT(1)   NOT NULL DEFAULT 0,
    is_vip        TINYINT(1)   NOT NULL DEFAULT 0,
    created_at    DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    UNIQUE KEY uq_users_name (name),
    UNIQUE KEY uq_users_token (token_hash)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS articles (
    id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id    BIGINT UNSIGNED NOT NULL,
    title      VARCHAR(500) NOT NULL,
    content    MEDIUMTEXT   NOT NULL,
    created_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    KEY ix_articles_user (user_id),
    CONSTRAINT fk_articles_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per article to publish. `attempt` counts attempts started; `retry_count` counts
-- the retries used up (at most `max_retries`). A running attempt holds a lease
-- (`worker_id`, `lease_expires_at`) that its worker's heartbeat renews; every state change
-- is a conditional UPDATE on (status, attempt), so a stale worker can never overwrite a
-- newer attempt.
CREATE TABLE IF NOT EXISTS publish_tasks (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    task_id          CHAR(36)     NOT NULL,
    user_id          BIGINT UNSIGNED NOT NULL,
    article_id       BIGINT UNSIGNED NULL,
    article_title    VARCHAR(500) NOT NULL,
    article_content  MEDIUMTEXT   NOT NULL,
    platform         VARCHAR(32)  NOT NULL,
    priority         ENUM('normal', 'urgent') NOT NULL DEFAULT 'normal',
    status           ENUM('pending', 'running', 'success', 'failed', 'retry', 'cancelled', 'scheduled') NOT NULL DEFAULT 'pending',
    progress         TINYINT UNSIGNED NOT NULL DEFAULT 0,
    result_url       VARCHAR(1024) NULL,
    error_message    TEXT         NULL,
    retry_count      INT UNSIGNED NOT NULL DEFAULT 0,
    max_retries      INT UNSIGNED NOT NULL DEFAULT 3,
    attempt          INT UNSIGNED NOT NULL DEFAULT 0,
    worker_id        VARCHAR(128) NULL,
    lease_expires_at DATETIME(3)  NULL,
    next_attempt_at  DATETIME(3)  NULL,
    cancel_requested TINYINT(1)   NOT NULL DEFAULT 0,
    platform_ref     VARCHAR(255) NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    started_at       DATETIME(3)  NULL,
    completed_at     DATETIME(3)  NULL,
    updated_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    UNIQUE KEY uq_tasks_task_id (task_id),
    KEY ix_tasks_user_status (user_id, status),
    KEY ix_tasks_user_created (user_id, created_at),
    KEY ix_tasks_status (status),
    KEY ix_tasks_created (created_at),
    KEY ix_tasks_lease (status, lease_expires_at),
    KEY ix_tasks_worker (worker_id, status),
    CONSTRAINT fk_tasks_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per attempt. outcome: running while under way, then success, failed, timeout,
-- lost (the worker vanished: lease expired), unknown (failed after the submit click, so the
-- platform may have the article), or cancelled. `evidence` lists the files saved on failure.
CREATE TABLE IF NOT EXISTS publish_history (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    task_id     CHAR(36)     NOT NULL,
    attempt     INT UNSIGNED NOT NULL,
    worker_id   VARCHAR(128) NOT NULL,
    started_at  DATETIME(3)  NOT NULL,
    ended_at    DATETIME(3)  NULL,
    outcome     ENUM('running', 'success', 'failed', 'timeout', 'lost', 'unknown', 'cancelled') NOT NULL DEFAULT 'running',
    error       TEXT         NULL,
    result_url  VARCHAR(1024) NULL,
    evidence    JSON         NULL,
    UNIQUE KEY uq_history_attempt (task_id, attempt),
    CONSTRAINT fk_history_task FOREIGN KEY (task_id) REFERENCES publish_tasks (task_id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One login per user and platform. `secret` is the credentials (for Zhihu, the cookies of
-- a logged-in session) encrypted with TOPN_SECRET_KEY; it is never sent back to anyone.
CREATE TABLE IF NOT EXISTS platform_accounts (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id          BIGINT UNSIGNED NOT NULL,
    platform         VARCHAR(32)  NOT NULL,
    secret           TEXT         NOT NULL,
    checked_at       DATETIME(3)  NULL,
    check_ok         TINYINT(1)   NULL,
    check_detail     VARCHAR(500) NULL,
    next_publish_at  DATETIME(3)  NULL,
    last_submit_at   DATETIME(3)  NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    UNIQUE KEY uq_accounts_user_platform (user_id, platform),
    CONSTRAINT fk_accounts_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per logged-in browser. The cookie holds a random token; only its SHA-256 is
-- stored, so a leaked database gives no usable session. `csrf_token` is sent back with
-- every state-changing request from the page (a form field or the X-CSRF-Token header).
CREATE TABLE IF NOT EXISTS web_sessions (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    session_hash CHAR(64)     NOT NULL,
    user_id      BIGINT UNSIGNED NOT NULL,
    csrf_token   VARCHAR(64)  NOT NULL,
    created_at   DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    expires_at   DATETIME(3)  NOT NULL,
    UNIQUE KEY uq_sessions_hash (session_hash),
    KEY ix_sessions_expires (expires_at),
    CONSTRAINT fk_sessions_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The bytes of every picture an article was sent with, once per content. Stored in MySQL
-- beside the tasks, so a worker on any host can publish the article.
CREATE TABLE IF NOT EXISTS pictures (
    sha256      CHAR(64)     NOT NULL PRIMARY KEY,
    mime        VARCHAR(32)  NOT NULL,
    size        INT UNSIGNED NOT NULL,
    data        LONGBLOB     NOT NULL,
    created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The pictures a task's body references by name (pictures by URL are fetched when it runs).
CREATE TABLE IF NOT EXISTS task_pictures (
    task_id     CHAR(36)     NOT NULL,
    name        VARCHAR(200) NOT NULL,
    sha256      CHAR(64)     NOT NULL,
    PRIMARY KEY (task_id, name),
    KEY ix_task_pictures_sha (sha256),
    CONSTRAINT fk_task_pictures_task FOREIGN KEY (task_id) REFERENCES publish_tasks (task_id) ON DELETE CASCADE,
    CONSTRAINT fk_task_pictures_picture FOREIGN KEY (sha256) REFERENCES pictures (sha256)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Pictures already uploaded to a platform for an account, where (`place`: a site and post,
-- or '' for the account's whole platform): a retry re-uses them instead of uploading again.
CREATE TABLE IF NOT EXISTS rehosted_pictures (
    user_id     BIGINT UNSIGNED NOT NULL,
    platform    VARCHAR(32)   NOT NULL,
    place       VARCHAR(255)  NOT NULL,
    sha256      CHAR(64)      NOT NULL,
    url         VARCHAR(1024) NOT NULL,
    created_at  DATETIME(3)   NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id, platform, place, sha256),
    CONSTRAINT fk_rehosted_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
-- Issue 15: what the user asked of the platform and what the platform did beyond the URL.
-- `topics`: the topic names the user gave for this article (a JSON array), NULL when none
-- were given. `result_note`: what a published task's user should know (e.g. it went out
-- without a topic, or was not filed into the column).
ALTER TABLE publish_tasks ADD COLUMN IF NOT EXISTS topics JSON NULL;
ALTER TABLE publish_tasks ADD COLUMN IF NOT EXISTS result_note VARCHAR(1000) NULL;
-- Scheduled publishing: a task made for a later time has status 'scheduled' and its
-- `publish_at` (UTC) until the reaper queues it; the index finds the due ones.
ALTER TABLE publish_tasks MODIFY COLUMN status
    ENUM('pending', 'running', 'success', 'failed', 'retry', 'cancelled', 'scheduled') NOT NULL DEFAULT 'pending';
ALTER TABLE publish_tasks ADD COLUMN IF NOT EXISTS publish_at DATETIME(3) NULL;
CREATE INDEX IF NOT EXISTS ix_tasks_due ON publish_tasks (status, publish_at);
-- Which batch a task came in and which of its articles it is: one article sent to several
-- platforms is several tasks with the same (batch_id, article_index).
ALTER TABLE publish_tasks ADD COLUMN IF NOT EXISTS batch_id CHAR(36) NULL;
ALTER TABLE publish_tasks ADD COLUMN IF NOT EXISTS article_index SMALLINT UNSIGNED NULL;
-- The per-user limits count per platform.
CREATE INDEX IF NOT EXISTS ix_tasks_user_platform_status ON publish_tasks (user_id, platform, status);
-- Several hosts: every attempt names the host that ran it (`worker_id` is host:pid).
ALTER TABLE publish_history ADD COLUMN IF NOT EXISTS host_id VARCHAR(64) NULL;
-- One row per host running a supervisor (TOPN_HOST_ID). The supervisor renews
-- `heartbeat_at` every TOPN_HEARTBEAT_INTERVAL; a host silent for TOPN_LEASE_TTL is down.
-- `machine` (host name and boot id) tells a restart of the same host from a second host
-- wrongly given the same TOPN_HOST_ID. `stopped_at` is set by a clean stop.
CREATE TABLE IF NOT EXISTS hosts (
    host_id      VARCHAR(64)  NOT NULL PRIMARY KEY,
    machine      VARCHAR(255) NOT NULL,
    pid          INT UNSIGNED NOT NULL,
    web          TINYINT(1)   NOT NULL DEFAULT 0,
    workers      JSON         NULL,
    started_at   DATETIME(3)  NOT NULL,
    heartbeat_at DATETIME(3)  NOT NULL,
    stopped_at   DATETIME(3)  NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
-- The sessions a worker holds at a remote WebDriver (a Selenium Grid), so that a surviving
-- host can end the sessions of a host or worker that died and give the Grid its slots back.
CREATE TABLE IF NOT EXISTS browser_sessions (
    session_id   VARCHAR(64)  NOT NULL PRIMARY KEY,
    host_id      VARCHAR(64)  NOT NULL,
    worker_id    VARCHAR(128) NOT NULL,
    started_at   DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY ix_sessions_host (host_id),
    KEY ix_sessions_worker (worker_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
-- The files a failed attempt saved (screenshot, page, URL, the platform's answer), in MySQL
-- so that any web host serves what any worker host saw; they go with their task.
CREATE TABLE IF NOT EXISTS evidence_files (
    task_id     CHAR(36)     NOT NULL,
    attempt     INT UNSIGNED NOT NULL,
    name        VARCHAR(32)  NOT NULL,
    data        MEDIUMBLOB   NOT NULL,
    PRIMARY KEY (task_id, attempt, name),
    CONSTRAINT fk_evidence_task FOREIGN KEY (task_id) REFERENCES publish_tasks (task_id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
-- Facts every host must agree on. `secret_key_check`: a digest of TOPN_SECRET_KEY, so a host
-- started with another key is refused instead of failing every login it cannot decrypt.
CREATE TABLE IF NOT EXISTS cluster_settings (
    name        VARCHAR(64)  NOT NULL PRIMARY KEY,
    value       VARCHAR(255) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
