"""Copied from the seed (usage-examples.md, "Celery Tasks": "Basic Task with Retry" and "Batch Processing Task"); only import lines changed. app.celery_app is the
test's Celery app; the user's own helpers (load_data, process, save_result, load_item,
complex_processing) come from tests.seed.doubles."""

from tests.seed.celery_app import celery_app
from taskkit.recovery import retry
from logging import getLogger as get_logger
from tests.seed.doubles import load_data, process, save_result, load_item, complex_processing

logger = get_logger(__name__)

@celery_app.task(bind=True, max_retries=3)
@retry(max_attempts=2, delay=5.0, backoff=2.0)
def process_data_task(self, data_id: int):
    """Process data with multi-level retry."""
    try:
        # Load data
        data = load_data(data_id)

        # Process
        result = process(data)

        # Save result
        save_result(data_id, result)

        return {"status": "success", "data_id": data_id}

    except Exception as exc:
        # Inner retry failed, try Celery-level retry
        if self.request.retries < self.max_retries:
            logger.warning(f"Task failed, retrying in 60s. Attempt {self.request.retries + 1}")
            raise self.retry(exc=exc, countdown=60)

        # All retries exhausted
        logger.error(f"Task failed permanently: {exc}")
        raise

from tests.seed.celery_app import celery_app
from taskkit.recovery import batch_with_retry
from typing import List

@celery_app.task
def process_batch_task(item_ids: List[int]):
    """Process batch of items with per-item retry."""

    def process_single_item(item_id: int):
        # Load item
        item = load_item(item_id)

        # Process (may fail for some items)
        result = complex_processing(item)

        # Save result
        save_result(item_id, result)

        return result

    # Process with per-item retry
    successful, failed = batch_with_retry(
        items=item_ids,
        process_func=process_single_item,
        batch_size=50,
        max_retries=2
    )

    return {
        "total": len(item_ids),
        "successful": len(successful),
        "failed": len(failed),
        "failed_ids": [item_id for item_id, _ in failed]
    }
