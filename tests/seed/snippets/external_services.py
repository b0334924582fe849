"""Copied from the seed (usage-examples.md, "External Services"); only import lines changed. The usage lines that call https://api.example.com are left out (no network here);
tests/seed/test_snippets.py runs them against a local HTTP server."""

from taskkit.recovery import CircuitBreaker, retry, timeout
import requests
from typing import Optional

class ExternalAPIClient:
    """API client with built-in error recovery."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.circuit = CircuitBreaker(
            failure_threshold=5,
            recovery_timeout=60,
            expected_exception=requests.RequestException
        )

    @timeout(seconds=30)
    @retry(max_attempts=3, delay=1.0, backoff=2.0)
    def _make_request(self, endpoint: str, method: str = "GET", **kwargs):
        """Internal request method with retry."""
        url = f"{self.base_url}{endpoint}"
        response = requests.request(method, url, **kwargs)
        response.raise_for_status()
        return response.json()

    def get(self, endpoint: str, use_circuit: bool = True) -> Optional[dict]:
        """GET request with optional circuit breaker."""
        if use_circuit:
            @self.circuit
            def protected_get():
                return self._make_request(endpoint, "GET")
            return protected_get()
        else:
            return self._make_request(endpoint, "GET")

    def post(self, endpoint: str, data: dict, use_circuit: bool = True) -> Optional[dict]:
        """POST request with optional circuit breaker."""
        if use_circuit:
            @self.circuit
            def protected_post():
                return self._make_request(endpoint, "POST", json=data)
            return protected_post()
        else:
            return self._make_request(endpoint, "POST", json=data)


from taskkit.recovery import CircuitBreaker, CircuitState, retry
import requests

class ExternalMLService:
    """ML service with health checking."""

    def __init__(self, service_url: str):
        self.service_url = service_url
        self.circuit = CircuitBreaker(failure_threshold=3, recovery_timeout=30)

    @retry(max_attempts=2, delay=1.0)
    def health_check(self) -> bool:
        """Check if service is healthy."""
        try:
            response = requests.get(f"{self.service_url}/health", timeout=5)
            return response.status_code == 200
        except:
            return False

    def predict(self, features: list) -> dict:
        """Make prediction with circuit protection."""
        # Check circuit state
        if self.circuit.state == CircuitState.OPEN:
            if self.health_check():
                self.circuit.reset()  # Manually close circuit
            else:
                raise Exception("Service unavailable (circuit open)")

        @self.circuit
        @retry(max_attempts=2, delay=0.5)
        def _predict():
            response = requests.post(
                f"{self.service_url}/predict",
                json={"features": features},
                timeout=10
            )
            response.raise_for_status()
            return response.json()

        return _predict()
