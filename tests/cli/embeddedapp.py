"""An app on the embedded defaults (SQLite result backend, file leases under TASKKIT_HOME), for
``taskkit tasks show --app tests.cli.embeddedapp``; no worker runs it."""

from __future__ import annotations

from taskkit.tasks import ResilientTask, create_app

app = create_app("tkcli-embedded")


@app.task(base=ResilientTask, bind=True, shared=False, lease_key="key", name="tkcli_embedded.job")
def job(self: ResilientTask, key: str) -> str:
    return key
