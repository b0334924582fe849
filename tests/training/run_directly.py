"""Train one run by calling the task in this process (no worker): ``run_directly.py RUN_ID``.

The training tests start it as a new process, so a run killed in one process is resumed in
another from its checkpoint. Prints ``resumed_from=<epoch or None>``.
"""

from __future__ import annotations

import sys

from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from tests.training import apps


def main(run_id: int) -> None:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None, f"no run {run_id}"
        config = dict(run.config)
    result = apps.train(run_id, config)
    print(f"resumed_from={result['resumed_from']}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
