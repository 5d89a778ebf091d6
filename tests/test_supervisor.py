"""The supervisor's rules for its children, with real forked processes."""

import dataclasses
import sys

from conftest import wait_until
from topn import Supervisor, describe_exit


def dies_at_start(config, leases):
    sys.exit(3)


def test_supervisor_gives_up_instead_of_spinning_when_workers_die_at_start_up(config):
    supervisor = Supervisor(dataclasses.replace(config, workers=1), run_web=False, worker_target=dies_at_start)
    supervisor.start()

    def gave_up():
        supervisor.loop_once()
        return supervisor.stop_requested

    wait_until(gave_up, timeout=20, message='the supervisor to give up')
    assert supervisor.exit_code == 1
    assert supervisor.boot_failures[0] == 3
    assert not any(process.is_alive() for process, _ in supervisor.workers.values())
    supervisor.shutdown()


def test_exit_descriptions_name_the_signal_or_the_code():
    assert describe_exit(-9) == 'was killed by SIGKILL'
    assert describe_exit(-15) == 'was killed by SIGTERM'
    assert describe_exit(3) == 'exited with code 3'
