"""Support code shared by the test folders: the Redis test-app builder, the worker helpers.

- ``tests._support.apps``: ``redis_test_app(kind)`` builds the Celery app of a test folder on the
  real Redis broker. Everything it puts in Redis carries this session's nonce (``RUN``): its
  queue, broker and result keys, its task names (so lease keys too) and its counters. At session
  end ``delete_own_keys()`` removes exactly those keys, so two pytest sessions at once never
  delete each other's live leases.
- ``tests._support.workers``: ``in_process_worker(app)`` (Celery's test worker, solo pool) and
  ``WorkerProcess`` (a ``celery worker`` subprocess that a test can SIGKILL), plus ``wait_for``.
"""
