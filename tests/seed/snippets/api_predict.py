"""Copied from the seed (usage-examples.md, "API Endpoints": "Prediction Endpoint with Circuit Breaker"); only import
lines changed: ``app.utils.error_recovery`` -> ``taskkit.recovery``, ``app.schemas.prediction`` and
``app.ml_engine.inference`` -> ``taskkit.api`` (its /predict bodies and its local model: the newest completed run's)."""

from fastapi import APIRouter, BackgroundTasks
from taskkit.recovery import CircuitBreaker, CircuitState, fallback
from taskkit.api import PredictRequest, PredictResponse
import requests

router = APIRouter()

# Create circuit breaker for prediction service
prediction_circuit = CircuitBreaker(
    failure_threshold=5,
    recovery_timeout=60,
    expected_exception=requests.RequestException
)

def local_model_fallback(features: list) -> dict:
    """Fallback to local model when external service fails."""
    from taskkit.api import local_predictor
    prediction = local_predictor.predict(features)
    return {
        "prediction": prediction,
        "model": "local_fallback",
        "confidence": 0.85
    }

@router.post("/predict", response_model=PredictResponse)
async def predict_endpoint(request: PredictRequest):
    """Prediction with circuit breaker and fallback."""

    # Check circuit state
    if prediction_circuit.state == CircuitState.OPEN:
        result = local_model_fallback(request.features)
        result["circuit_status"] = "open"
        return result

    try:
        @prediction_circuit
        def call_external_predictor():
            response = requests.post(
                "https://ml-api.example.com/predict",
                json={"features": request.features},
                timeout=10
            )
            response.raise_for_status()
            return response.json()

        result = call_external_predictor()
        result["circuit_status"] = "closed"
        return result

    except Exception as e:
        # Circuit opened or prediction failed
        result = local_model_fallback(request.features)
        result["circuit_status"] = prediction_circuit.state.name.lower()
        result["fallback_reason"] = str(e)
        return result
