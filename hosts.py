"""This host among the others: its row in MySQL (TOPN_HOST_ID), its heartbeat, and the
remote browser sessions of workers and hosts that died.

Every supervisor, with workers or without, keeps a row in `hosts` and renews it every
TOPN_HEARTBEAT_INTERVAL; the figures call a host silent once TOPN_LEASE_TTL passes without
one. Tasks need none of this to survive a dead host (their leases expire and any host's
reaper takes them back); the rows are for operators, and for the Grid's slots: a worker
records each remote session it holds (`worker.SessionLog`), and a surviving supervisor ends
the sessions of a dead worker of its own at once and those of a silent host on its next
pass, instead of leaving the slots taken until the Grid's session timeout.
"""

import logging
import os
import socket
import time
import urllib.error

from db import DatabaseUnavailable
from pool import end_remote_session, first_line

log = logging.getLogger('topn.hosts')


class HostIdInUse(Exception):
    """Another live supervisor runs under this TOPN_HOST_ID."""


def machine_identity():
    """This machine and this boot of it: a supervisor restarted here after a crash finds its
    own old row, a second machine given the same TOPN_HOST_ID does not."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = 'unknown'
    return f'{socket.gethostname()} boot {boot_id}'


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostPresence:
    """One supervisor's presence among the hosts."""

    def __init__(self, config, db, pid, clock=time.monotonic):
        self.config = config
        self.db = db
        self.host_id = config.host_id
        self.pid = pid
        self.machine = machine_identity()
        self._clock = clock
        self._last_beat = self._last_sweep = float('-inf')

    def join(self, web):
        """Take this host's row, refusing an id a live supervisor holds; then end the remote
        sessions an earlier run of this host left (none of them can still be ours)."""
        row = self.db.host(self.host_id)
        if row and row['stopped_at'] is None and row['silent_seconds'] < self.config.lease_ttl:
            same_machine = row['machine'] == self.machine
            if not same_machine or (row['pid'] != self.pid and process_alive(row['pid'])):
                where = 'this machine' if same_machine else row['machine']
                raise HostIdInUse(
                    f'the host id {self.host_id!r} is in use by a live supervisor on {where} (pid {row["pid"]}, '
                    f'heard from {row["silent_seconds"]:.0f} s ago); give each host its own TOPN_HOST_ID')
        self.db.join_as_host(self.host_id, self.machine, self.pid, web)
        self._last_beat = self._clock()
        self.end_sessions(self.db.sessions_of_host(self.host_id), 'an earlier run of this host')

    def beat(self, worker_ids):
        """Renew the heartbeat when it is due; MySQL being away is logged and waited out."""
        now = self._clock()
        if now - self._last_beat < self.config.heartbeat_interval:
            return
        try:
            self.db.host_heartbeat(self.host_id, worker_ids)
            self._last_beat = now
        except DatabaseUnavailable as error:
            log.warning('host heartbeat not recorded: %s', error)

    def leave(self):
        try:
            self.db.host_stopped(self.host_id)
        except DatabaseUnavailable as error:
            log.warning('could not record that host %s stopped: %s', self.host_id, error)

    def end_sessions_of_worker(self, worker_id):
        if self.config.webdriver_url:
            self.end_sessions(self.db.sessions_of_worker(worker_id), f'dead worker {worker_id}')

    def end_orphan_sessions(self):
        """Now and then: end the remote sessions of hosts silent for longer than the lease."""
        now = self._clock()
        if not self.config.webdriver_url or now - self._last_sweep < self.config.heartbeat_interval:
            return
        self._last_sweep = now
        try:
            orphans = self.db.sessions_of_silent_hosts(self.config.lease_ttl)
        except DatabaseUnavailable as error:
            log.warning('could not look for the sessions of silent hosts: %s', error)
            return
        for host_id in sorted({row['host_id'] for row in orphans}):
            self.end_sessions([row['session_id'] for row in orphans if row['host_id'] == host_id],
                              f'silent host {host_id}')

    def end_sessions(self, session_ids, owner):
        """End `session_ids` at the WebDriver endpoint and forget them; a session the endpoint
        cannot be asked about now stays recorded for the next pass."""
        ended = 0
        for session_id in session_ids:
            try:
                end_remote_session(self.config.webdriver_url, session_id)
            except (urllib.error.URLError, OSError) as error:
                log.warning('could not end remote session %s of %s: %s', session_id, owner, first_line(error))
                continue
            self.db.session_ended(session_id)
            ended += 1
        if session_ids:
            log.warning('%s held %d remote browser sessions; %d ended', owner, len(session_ids), ended)
