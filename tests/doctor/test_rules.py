"""The doctor states the rules of ``taskkit.tasks`` (which its layer may not import privately):
these tests hold the two to the same answers, so a change there fails here."""

from __future__ import annotations

import pytest
from celery import Celery

from taskkit.doctor import _celery
from taskkit.tasks import _rabbitmq, _visibility, create_app
from taskkit.tasks._options import DEFAULTS


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://cache:6380/0",
        "sentinel://a:26379",
        "sqs://",
        "taskkit+sqlite:////tmp/q.db",
        "amqp://guest@rabbit//",
        "pyamqp://guest@rabbit//",
        "sqla+sqlite:////tmp/b.db",
        "memory://",
    ],
)
def test_which_brokers_redeliver_by_age(url: str):
    app = create_app("rules", broker_url=url, result_backend="cache+memory://")

    assert _visibility.uses_visibility_timeout(app) == (_celery._scheme(url) in _celery.AGE_SCHEMES)
    assert _rabbitmq.uses_amqp(app) == (_celery._scheme(url) in _celery.AMQP_SCHEMES)


def test_the_shares_and_versions_agree():
    app = Celery("rules", broker="redis://x:6379/0", set_as_current=False)

    assert _celery.SAFE_SHARE == _visibility.SAFE_SHARE
    assert _visibility.visibility_timeout(app) == _celery.CELERY_DEFAULT_TIMEOUT
    assert _celery.FIRST_SUPPORTING == _rabbitmq.FIRST_SUPPORTING
    assert DEFAULTS["outer_max_delay"] > 0
