"""Celery tasks with taskkit's reliability built in.

===========================  ====================================================================
``create_app``               a Celery app with reliable defaults, from ``taskkit.config``
``ResilientTask``            task base: in-process retry, re-queue with backoff, permanent
                             errors, worker-loss redelivery, lease, progress, failure records
``ProgressReport``           what ``self.progress(...)`` reports
``Lease``, ``LeaseOwner``    an exclusive lease with heartbeat and fencing token
``RedisLeaseStore``,         where leases live: Redis for a fleet, lock files on one host
``FileLeaseStore``
``TaskFailure``              what is recorded when a task fails for good
``TrainingTask``,            task base for epoch loops: checkpoint/resume with the random
``TrainingRun``              state, progress, ModelRun status, hand-over on SIGTERM
``submit_run``,              create a run and send its task; re-enqueue a failed or
``resume_run``, ``load_model``  interrupted run; the verified final model
``BatchTask``,               task base over a list of items: per-item retry, item ledger,
``submit_batch``             dead letters; split a batch into chunks and gather one summary
``check_reachable``          whether the app's broker and Redis result backend answer now
``duplicate_count``,         deliveries the lease dropped as duplicates, and the signal sent
``duplicate_dropped``        for each (the hook for metrics)
``uses_visibility_timeout``, the broker's redelivery rules, shared with ``taskkit doctor``:
``visibility_timeout``,      whether it redelivers by age, after how long, whether workers
``extends_visibility``,      keep their messages invisible (and the countdown share allowed
``VISIBILITY_SAFE_SHARE``    when not), a task's time limits; RabbitMQ's consumer timeout
``task_time_limits``,        (``uses_amqp``, ``rabbitmq_version``,
``uses_amqp`` ...            ``consumer_timeout_supported``, ``effective_consumer_timeout``)
===========================  ====================================================================

Redelivery, visibility timeout and takeover: with Redis as the broker, a worker that dies
(SIGKILL, OOM, a lost machine) leaves its tasks unacknowledged; Redis gives them to another
worker once they are ``TASKKIT_VISIBILITY_TIMEOUT`` (30 s) old, and the other worker's restore
sweep runs every 5 s, so a dead worker's task runs again within about 35 s. Live workers
re-stamp the messages they hold every 10 s, so a long task, or a retry waiting for its
countdown, is never handed out while its worker lives. A pool process that dies is noticed by
its worker at once and the task runs again (``retry_on_worker_lost``; on Redis and the embedded
broker at once, ahead of the queue). A delivery whose lease another live task holds is a
duplicate: dropped (state ``IGNORED``), counted, never a failure or a dead letter.

Example::

    from taskkit.tasks import ResilientTask, create_app

    app = create_app("jobs")

    @app.task(base=ResilientTask, bind=True, lease_key="run_id")
    def train(self, run_id: str, epochs: int) -> str:
        for epoch in range(epochs):
            ...
            self.progress(epoch + 1, epochs, f"epoch {epoch + 1}")
        return run_id
"""

from taskkit.tasks import _startup  # noqa: F401 - a worker checks its database's schema at start
from taskkit.tasks._app import create_app, reliable_defaults
from taskkit.tasks._base import (
    DEFAULT_PERMANENT_ERRORS,
    DEFAULT_TRANSIENT_ERRORS,
    ResilientTask,
    TaskFailure,
)
from taskkit.tasks._batch import BatchSubmission, BatchTask, submit_batch
from taskkit.tasks._duplicates import duplicate_count, duplicate_dropped
from taskkit.tasks._idempotent import submit
from taskkit.tasks._lease import FileLeaseStore, Lease, LeaseOwner, LeaseStore, RedisLeaseStore
from taskkit.tasks._options import Option, options_markdown
from taskkit.tasks._progress import PROGRESS, ProgressReport
from taskkit.tasks._rabbitmq import (
    consumer_timeout_supported,
    effective_consumer_timeout,
    rabbitmq_version,
    task_time_limits,
    uses_amqp,
)
from taskkit.tasks._replay import replay_dead_letters
from taskkit.tasks._runs import fork_run, load_model, resume_run, stop_run, submit_run
from taskkit.tasks._submit import check_reachable
from taskkit.tasks._training import (
    ReproducibilityWarning,
    TrainingRun,
    TrainingTask,
    request_stop,
    resume_orphaned_runs,
    run_is_alive,
)
from taskkit.tasks._visibility import (
    VISIBILITY_SAFE_SHARE,
    extends_visibility,
    uses_visibility_timeout,
    visibility_timeout,
)

__all__ = [
    "DEFAULT_PERMANENT_ERRORS",
    "DEFAULT_TRANSIENT_ERRORS",
    "PROGRESS",
    "VISIBILITY_SAFE_SHARE",
    "BatchSubmission",
    "BatchTask",
    "FileLeaseStore",
    "Lease",
    "LeaseOwner",
    "LeaseStore",
    "Option",
    "ProgressReport",
    "RedisLeaseStore",
    "ReproducibilityWarning",
    "ResilientTask",
    "TaskFailure",
    "TrainingRun",
    "TrainingTask",
    "check_reachable",
    "consumer_timeout_supported",
    "create_app",
    "duplicate_count",
    "duplicate_dropped",
    "effective_consumer_timeout",
    "extends_visibility",
    "fork_run",
    "load_model",
    "options_markdown",
    "rabbitmq_version",
    "reliable_defaults",
    "replay_dead_letters",
    "request_stop",
    "resume_orphaned_runs",
    "resume_run",
    "run_is_alive",
    "stop_run",
    "submit",
    "submit_batch",
    "submit_run",
    "task_time_limits",
    "uses_amqp",
    "uses_visibility_timeout",
    "visibility_timeout",
]
