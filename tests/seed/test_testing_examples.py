"""The seed's "Testing Examples", verbatim but for the import line
(``app.utils.error_recovery`` -> ``taskkit.recovery``)."""

import pytest
from unittest.mock import Mock, patch
from taskkit.recovery import retry, CircuitBreaker, CircuitState
import requests

def test_retry_succeeds_after_failures():
    """Test retry succeeds after transient failures."""
    call_count = [0]

    @retry(max_attempts=3, delay=0.1)
    def flaky_function():
        call_count[0] += 1
        if call_count[0] < 3:
            raise ConnectionError("Transient failure")
        return "success"

    result = flaky_function()
    assert result == "success"
    assert call_count[0] == 3

def test_circuit_breaker_opens():
    """Test circuit breaker opens after threshold."""
    circuit = CircuitBreaker(failure_threshold=3)

    @circuit
    def failing_operation():
        raise ValueError("Always fails")

    # Trigger failures
    for _ in range(3):
        with pytest.raises(ValueError):
            failing_operation()

    assert circuit.state == CircuitState.OPEN

    # Next call should fail fast
    with pytest.raises(Exception, match="Circuit breaker is OPEN"):
        failing_operation()

@patch('requests.get')
def test_api_call_with_retry(mock_get):
    """Test API call retries on failure."""
    # First two calls fail, third succeeds
    mock_get.side_effect = [
        ConnectionError("Network error"),
        ConnectionError("Network error"),
        Mock(status_code=200, json=lambda: {"data": "success"})
    ]

    @retry(max_attempts=3, delay=0.1)
    def api_call():
        response = requests.get("https://api.example.com/data")
        return response.json()

    result = api_call()
    assert result == {"data": "success"}
    assert mock_get.call_count == 3
