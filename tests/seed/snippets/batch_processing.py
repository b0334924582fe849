"""Copied from the seed (usage-examples.md, "Batch Processing"); only import lines changed. The first usage example reads
large_dataset.csv and calls an undefined validate(); test_snippets.py runs it with both supplied."""

from taskkit.recovery import batch_with_retry
import pandas as pd
from typing import List, Callable

def process_dataframe_in_batches(
    df: pd.DataFrame,
    process_func: Callable,
    batch_size: int = 1000,
    max_retries: int = 2
) -> tuple[pd.DataFrame, List]:
    """Process DataFrame in batches with retry."""

    # Convert to list of row dicts
    rows = df.to_dict('records')

    # Process with retry
    successful, failed = batch_with_retry(
        items=rows,
        process_func=process_func,
        batch_size=batch_size,
        max_retries=max_retries
    )

    # Convert successful back to DataFrame
    result_df = pd.DataFrame(successful) if successful else pd.DataFrame()

    return result_df, failed

from taskkit.recovery import batch_with_retry, retry
from concurrent.futures import ThreadPoolExecutor
from typing import List, Any

def parallel_batch_process(
    items: List[Any],
    process_func: Callable,
    num_workers: int = 4,
    batch_size: int = 100
) -> tuple[List, List]:
    """Process items in parallel batches with retry."""

    # Split into chunks for workers
    chunk_size = len(items) // num_workers
    chunks = [
        items[i:i + chunk_size]
        for i in range(0, len(items), chunk_size)
    ]

    all_successful = []
    all_failed = []

    def process_chunk(chunk):
        return batch_with_retry(
            items=chunk,
            process_func=process_func,
            batch_size=batch_size,
            max_retries=2
        )

    with ThreadPoolExecutor(max_workers=num_workers) as executor:
        results = executor.map(process_chunk, chunks)

        for successful, failed in results:
            all_successful.extend(successful)
            all_failed.extend(failed)

    return all_successful, all_failed

# Usage
items = list(range(10000))

def expensive_operation(item):
    # Process item
    return item ** 2

successful, failed = parallel_batch_process(
    items,
    expensive_operation,
    num_workers=4,
    batch_size=250
)
