"""fallback and safe_execute."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from taskkit.errors import ConfigurationError
from taskkit.recovery import fallback, safe_execute


def test_a_value_is_returned_as_it_is():
    @fallback({"source": "default"})
    def load() -> dict:
        raise OSError

    assert load() == {"source": "default"}


def test_a_callable_that_accepts_the_arguments_gets_them():
    def cached_price(sku: str, currency: str = "EUR") -> str:
        return f"cached {sku} {currency}"

    @fallback(cached_price)
    def price(sku: str, currency: str = "EUR") -> str:
        raise ConnectionError

    assert price("A-1", currency="USD") == "cached A-1 USD"


def test_a_callable_that_takes_no_arguments_is_called_with_none():
    def get_default_config() -> dict:
        return {"debug": False}

    @fallback(get_default_config)
    def load_config(path: str) -> dict:
        raise FileNotFoundError(path)

    assert load_config("/missing.json") == {"debug": False}


def test_a_method_can_fall_back_to_a_plain_function():
    class Repo:
        @fallback(list)
        def rows(self, table: str) -> list:
            raise TimeoutError

    assert Repo().rows("users") == []


def test_only_listed_exceptions_fall_back_and_the_error_is_logged_once(caplog):
    @fallback("dflt", exceptions=(OSError,))
    def read(kind: str) -> str:
        if kind == "bug":
            raise KeyError(kind)
        raise OSError("disk gone")

    with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
        assert read("io") == "dflt"
    assert len(caplog.records) == 1
    assert "read raised OSError: disk gone; using the fallback" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None
    with pytest.raises(KeyError):
        read("bug")


def test_async_functions_fall_back_to_sync_or_async_alternatives():
    async def cached(x: int) -> int:
        return -x

    @fallback(cached)
    async def remote(x: int) -> int:
        raise ConnectionError

    @fallback(0)
    async def other(x: int) -> int:
        raise ConnectionError

    assert asyncio.run(remote(4)) == -4
    assert asyncio.run(other(4)) == 0
    assert inspect.iscoroutinefunction(remote)


def test_an_async_fallback_for_a_sync_function_is_rejected():
    async def alternative() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="is async but"):
        fallback(alternative)(lambda: 1)


def test_fallback_keeps_the_signature():
    @fallback(None)
    def f(a: int, b: str = "x") -> int:
        """Doc."""
        return a

    assert f.__name__ == "f"
    assert inspect.getfullargspec(f).args == ["a", "b"]


def test_safe_execute_returns_the_result_or_the_default(caplog):
    assert safe_execute(lambda a, b=1: a + b, 1, b=2) == 3
    with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
        assert safe_execute(lambda: 1 / 0, default="fallback") == "fallback"
    assert len(caplog.records) == 1
    assert "ZeroDivisionError" in caplog.records[0].getMessage()


def test_safe_execute_only_swallows_listed_exceptions():
    with pytest.raises(ZeroDivisionError):
        safe_execute(lambda: 1 / 0, exceptions=(KeyError,))


def test_safe_execute_with_an_async_function_returns_an_awaitable():
    async def broken():
        raise OSError

    async def fine(x):
        return x

    assert asyncio.run(safe_execute(broken, default=7)) == 7
    assert asyncio.run(safe_execute(fine, 3)) == 3
