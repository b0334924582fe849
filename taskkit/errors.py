"""Every error taskkit raises, under one root.

::

    TaskkitError                        root: ``except TaskkitError`` catches all of taskkit's own
    ├── PermanentError                  "never retry this": retry, batches and tasks give up at once
    │   ├── LeaseHeld                   another live task holds this task's lease (same run)
    │   ├── RunNotFound                 (also a ``LookupError``) no training run has this id
    │   └── CheckpointTampered          (also a CheckpointError) signature wrong or missing:
    │                                   the checkpoint is refused, never unpickled
    ├── RetryLater                      "retry after N seconds": carries ``retry_after``
    ├── TimeoutExceeded                 also a built-in ``TimeoutError``
    ├── CircuitBreakerError             a breaker rejected the call; carries ``retry_after``
    │   └── CircuitStorageUnavailable   shared breaker state unreachable, breaker set to reject
    ├── ConfigurationError              also a ``ValueError``: an option that cannot be right
    │   └── InvalidRunId                a checkpoint run id that is not a safe directory name
    ├── DatabaseUnavailable             also a ``ConnectionError``: the database did not answer;
    │                                   names the host, never the password
    ├── BrokerUnavailable               also a ``ConnectionError``: the broker or the result
    │                                   backend did not answer a submit; nothing was sent
    ├── ConcurrentUpdateError           ``atomic_update`` lost the compare-and-swap every time
    ├── LeaseLost                       a task's exclusive lease was taken over: stop writing
    ├── RunNotResumable                 a run cannot be resumed now; ``kind`` says why
    │                                   (completed, running, no_checkpoint, unknown_task)
    ├── RunNotStoppable                 a stop of a run that is not queued or running
    ├── DeadLetterNotFound              (also a ``LookupError``) no dead letter has this id
    ├── ReplayRejected                  a replay would send what cannot run (unregistered task,
    │                                   a payload that no longer validates): nothing was sent
    └── CheckpointError                 a checkpoint could not be written, found or loaded;
        │                               carries ``run_id`` and ``step``
        ├── CheckpointCorrupt           data missing, truncated or not matching its checksum
        │   └── CheckpointFormatError   (also a ValueError) bytes or a manifest taskkit did
        │                               not write: a malformed frame, stream or manifest
        └── CheckpointTampered          (see above: also a PermanentError)

    TaskkitWarning                      root of taskkit's warnings (a setting that is suspicious)
    ├── CheckpointWarning               a checkpoint was skipped (corrupt, or not its run's)
    └── ReproducibilityWarning          (``taskkit.tasks``) an estimator with random_state=None

Errors carry context as attributes (the breaker's ``name``, the seconds left), so a log line
or a metrics hook can use them without parsing messages.

Example::

    from taskkit.errors import PermanentError

    def charge(card: str) -> None:
        if not card.isdigit():
            # a retry cannot fix bad input: fail now
            raise PermanentError(f"card number {card!r} is not numeric")
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointTampered",
    "CheckpointWarning",
    "CircuitBreakerError",
    "CircuitStorageUnavailable",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeadLetterNotFound",
    "InvalidRunId",
    "LeaseHeld",
    "LeaseLost",
    "PermanentError",
    "ReplayRejected",
    "RetryLater",
    "RunNotFound",
    "RunNotResumable",
    "RunNotStoppable",
    "TaskkitError",
    "TaskkitWarning",
    "TimeoutExceeded",
]


class TaskkitError(Exception):
    """Root of every error taskkit raises itself.

    An error's ``args`` are its constructor's arguments, so ``type(e)(*e.args)`` rebuilds it:
    pickle, and Celery's JSON results (which store ``args`` and call the class with them),
    bring back the same class with the same message and attributes, not a bare parent class.
    """

    _message: str | None = None

    def _describe(self, message: str) -> None:
        self._message = message

    def __str__(self) -> str:
        return self._message if self._message is not None else super().__str__()


class TaskkitWarning(UserWarning):
    """Root of taskkit's warnings: a setting that works but is probably not what was meant."""


class PermanentError(TaskkitError):
    """An error that retrying cannot fix. ``retry``, ``batch_with_retry`` and tasks never retry it.

    Raise it directly, or wrap the real cause so it stays in the traceback::

        try:
            payload = parse(body)
        except json.JSONDecodeError as exc:
            raise PermanentError("request body is not JSON") from exc
    """


class RetryLater(TaskkitError):
    """Ask for another attempt no sooner than ``retry_after`` seconds from now.

    ``retry`` honours the ``retry_after`` attribute of *any* exception (an HTTP client's 429
    error, say); this class is the explicit way to raise one yourself::

        raise RetryLater("rate limited", retry_after=2.5)
    """

    def __init__(self, message: str = "retry later", retry_after: float | None = None) -> None:
        if retry_after is None:
            raise ConfigurationError("RetryLater needs retry_after= (seconds to wait)")
        if retry_after < 0:
            raise ConfigurationError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        super().__init__(message, retry_after)
        self._describe(message)
        #: Seconds to wait before the next attempt.
        self.retry_after = float(retry_after)


class TimeoutExceeded(TaskkitError, TimeoutError):
    """A call guarded by ``timeout`` ran longer than its limit.

    It is also a built-in ``TimeoutError``, so ``except TimeoutError`` catches it.
    """

    def __init__(self, seconds: float, what: str = "call") -> None:
        super().__init__(seconds, what)
        self._describe(f"{what} timed out after {seconds:g}s")
        #: The limit that was exceeded, in seconds.
        self.seconds = seconds


class CircuitBreakerError(TaskkitError):
    """A circuit breaker rejected a call without running it.

    The message starts with ``Circuit breaker is OPEN`` (or ``HALF_OPEN`` when the probe slots are
    taken) and names the breaker and the seconds left. ``retry_after`` is the time until the
    breaker will let a probe through, so ``retry`` and ``batch_with_retry`` wait that long
    instead of hammering an open breaker.
    """

    def __init__(self, name: str, state: str, retry_after: float, detail: str = "") -> None:
        message = f"Circuit breaker is {state.upper()}: {name!r} rejects calls"
        if retry_after > 0:
            message += f" for another {retry_after:.2f}s"
        if detail:
            message += f" ({detail})"
        super().__init__(name, state, retry_after, detail)
        self._describe(message)
        #: The breaker's name.
        self.name = name
        #: The state that rejected the call: ``"open"`` or ``"half_open"``.
        self.state = state
        #: Seconds until the breaker lets a probe call through (0 when unknown).
        self.retry_after = max(0.0, retry_after)


class CircuitStorageUnavailable(CircuitBreakerError):
    """Shared breaker state (Redis) is unreachable and the breaker is set to reject calls."""


class ConfigurationError(TaskkitError, ValueError):
    """An option that cannot be right (a negative delay, zero attempts, an unknown name)."""


class DatabaseUnavailable(TaskkitError, ConnectionError):
    """The database could not be reached, after ``ensure_connection``'s own retries.

    A ``ConnectionError`` too, so retry policies and task ladders that retry connection errors
    treat an outage as transient. The message and ``database`` name the host, port and database,
    never the password; the driver's error is the ``__cause__``.
    """

    def __init__(self, database: str, attempts: int, reason: str) -> None:
        message = f"database {database} is unavailable after {attempts} attempt(s): {reason}"
        # OSError reads a 2-3 argument call as (errno, strerror, filename): pass the message
        # alone, then make args the constructor's arguments as for every other error.
        super().__init__(message)
        self.args = (database, attempts, reason)
        self._describe(message)
        #: ``host:port/name`` (or the SQLite file), without credentials.
        self.database = database
        #: Connection attempts made before giving up.
        self.attempts = attempts


class BrokerUnavailable(TaskkitError, ConnectionError):
    """The broker or the result backend did not answer when taskkit sent work to it.

    Raised by taskkit's submit paths (``submit_run``, ``resume_run``, ``submit_batch``,
    ``replay_dead_letters``) within about two seconds, instead of Celery's reconnect loops,
    with nothing half-made: no run or batch row, letters still waiting (the call's docstring
    says what it leaves). A ``ConnectionError`` too, so retry policies treat it as transient.

    ``url`` is shown as given: callers pass it through ``taskkit._utils.mask_password``, so the
    message names the host and never the password. ``service`` is ``"broker"`` or
    ``"result backend"``; the transport's error is the ``__cause__``.

    Example::

        try:
            submit_run(train_model, {"epochs": 20})
        except BrokerUnavailable as exc:
            print(f"try again later: {exc.service} {exc.url} is down")
    """

    def __init__(self, url: str, reason: str, service: str = "broker", detail: str = "") -> None:
        setting = (
            "TASKKIT_BROKER_URL (or the app's broker_url)"
            if service == "broker"
            else "TASKKIT_RESULT_BACKEND (or the app's result_backend)"
        )
        message = (
            f"the {service} {url} is unavailable ({reason}); {detail or 'nothing was sent'}. "
            f"Check that it is running and reachable from this host, and the URL in {setting}"
        )
        # OSError reads a 2-3 argument call as (errno, strerror, filename): pass the message
        # alone, then make args the constructor's arguments as for every other error.
        super().__init__(message)
        self.args = (url, reason, service, detail)
        self._describe(message)
        #: The broker's or backend's URL, password masked.
        self.url = url
        #: What failed, in one line (the transport's error).
        self.reason = reason
        #: ``"broker"`` or ``"result backend"``.
        self.service = service
        #: What was done despite the outage (a batch's chunks sent before it), else empty.
        self.detail = detail


class ConcurrentUpdateError(TaskkitError):
    """``atomic_update`` found the row changed by someone else on every one of its attempts.

    Nothing was written by the failed call. Carries ``model``, ``record_id`` and ``attempts``.
    """

    def __init__(self, model: str, record_id: object, attempts: int) -> None:
        super().__init__(model, record_id, attempts)
        self._describe(
            f"{model} id={record_id!r} was changed concurrently on each of {attempts} "
            f"attempt(s) of atomic_update; nothing was written (raise max_retries, or use an SQL "
            f"expression such as {model}.counter + 1, which cannot conflict)"
        )
        self.model = model
        self.record_id = record_id
        self.attempts = attempts


class LeaseHeld(PermanentError):
    """Another live task holds the exclusive lease this task needs (the same run, say).

    Permanent for this message: the run is already being worked on, so running it twice would
    be wrong and retrying would only wait for the other one. Carries ``key`` and ``holder``.
    ``ResilientTask`` no longer fails with it: such a delivery is a duplicate, dropped as
    ``IGNORED`` and counted (``taskkit.tasks.duplicate_count``); it stays for code of your own
    that refuses work under a lease.
    """

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(key, holder)
        self._describe(f"lease {key!r} is held by a live task ({holder}); not running it twice")
        self.key = key
        self.holder = holder


class LeaseLost(TaskkitError):
    """This task's exclusive lease expired or was taken over by another worker.

    Raised at the task's next progress report (or ``lease.check()``), so a task that lost its
    lease stops before it writes over the new owner's work. ``token`` is the fencing token it
    held; the new owner's is larger.
    """

    def __init__(self, key: str, token: int) -> None:
        super().__init__(key, token)
        self._describe(f"lease {key!r} (fencing token {token}) was lost to another worker")
        self.key = key
        self.token = token


class RunNotFound(PermanentError, LookupError):
    """No training run (``ModelRun``) has this id. Carries ``run_id``."""

    def __init__(self, run_id: object) -> None:
        super().__init__(run_id)
        self._describe(f"training run {run_id!r} does not exist")
        self.run_id = run_id


class RunNotResumable(TaskkitError):
    """A run cannot be resumed now. Carries ``run_id``, ``reason`` (a phrase: "is already
    completed") and ``kind``: ``completed``, ``running``, ``no_checkpoint``, ``unknown_task`` or
    ``no_model``.
    """

    def __init__(self, run_id: object, reason: str, kind: str = "other") -> None:
        super().__init__(run_id, reason, kind)
        self._describe(f"training run {run_id!r} {reason}")
        self.run_id = run_id
        self.reason = reason
        self.kind = kind


class RunNotStoppable(TaskkitError):
    """A stop of a run that has ended (completed, failed, stopped): nothing to stop. Carries
    ``run_id`` and ``status``.

    Example::

        try:
            stop_run(7)
        except RunNotStoppable as exc:
            print(exc.status)          # 'completed'
    """

    def __init__(self, run_id: object, status: str) -> None:
        super().__init__(run_id, status)
        self._describe(f"training run {run_id!r} is {status}: there is nothing to stop")
        self.run_id = run_id
        self.status = status


class DeadLetterNotFound(TaskkitError, LookupError):
    """No dead letter has this id (or these ids). Carries ``letter_ids``."""

    def __init__(self, letter_ids: object) -> None:
        super().__init__(letter_ids)
        ids = list(letter_ids) if isinstance(letter_ids, list | tuple | set) else [letter_ids]
        listed = ", ".join(str(i) for i in ids)
        self._describe(
            f"no dead letter with id {listed}"
            if len(ids) == 1
            else f"no dead letters with ids {listed}"
        )
        self.letter_ids = ids


class ReplayRejected(TaskkitError):
    """A replay was refused before anything was sent: the target task is not registered, or a
    payload no longer validates. Carries ``reason`` and ``letter_ids`` (the letters at fault).
    """

    def __init__(self, reason: str, letter_ids: object = ()) -> None:
        super().__init__(reason, letter_ids)
        ids = list(letter_ids) if isinstance(letter_ids, list | tuple | set) else [letter_ids]
        where = f" (dead letter {', '.join(str(i) for i in ids)})" if ids else ""
        self._describe(f"replay refused, nothing was sent: {reason}{where}")
        self.reason = reason
        self.letter_ids = ids


class InvalidRunId(ConfigurationError):
    """A checkpoint run id that is not a safe directory name (``../x``, ``/abs``, ``a/b``, ...).

    Run ids name a directory under ``TASKKIT_CHECKPOINT_DIR``, so only
    ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` (and no ``..``) is accepted. Carries ``run_id`` and
    ``problem`` (what is wrong with it).
    """

    def __init__(self, run_id: object, problem: str) -> None:
        super().__init__(run_id, problem)
        self._describe(f"invalid checkpoint run id {run_id!r}: {problem}")
        self.run_id = run_id
        self.problem = problem


class CheckpointError(TaskkitError):
    """A checkpoint could not be written, found or loaded.

    ``run_id`` and ``step`` name the checkpoint (None when not about one); the message starts
    with them, then says what went wrong. The OS or database error, if any, is the ``__cause__``.
    """

    def __init__(self, reason: str, run_id: str | None = None, step: int | None = None) -> None:
        super().__init__(reason, run_id, step)
        where = []
        if run_id is not None:
            where.append(f"run {run_id!r}")
        if step is not None:
            where.append(f"step {step}")
        self._describe(f"checkpoint {', '.join(where)}: {reason}" if where else reason)
        self.run_id = run_id
        self.step = step
        #: What went wrong, without the run and step.
        self.reason = reason


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's data is missing, truncated, or does not match the checksum in its manifest.

    Nothing was unpickled. ``CheckpointStore.load_latest()`` warns and falls back to an older
    checkpoint; ``load(step)`` raises this.
    """


class CheckpointFormatError(CheckpointCorrupt, ValueError):
    """Bytes that are not what taskkit writes: a malformed checkpoint frame, compressed stream
    or manifest (also a ``ValueError``, as these were before). Nothing was unpickled from them.
    """


class CheckpointTampered(CheckpointError, PermanentError):
    """A checkpoint's signature does not match, or it is unsigned while a secret key is set.

    The data was never unpickled. Permanent, and ``load_latest()`` does not fall back past it:
    someone changed what a run would resume from, and a person should look.
    """


class CheckpointWarning(TaskkitWarning):
    """A checkpoint was skipped (corrupt: an older one is used), or not its run's."""
