"""Integrations with other libraries, each imported only by whoever uses it.

``taskkit.contrib.pandas``: ``process_dataframe_in_batches`` (per-row retry over a DataFrame).
"""

__all__: list[str] = []
