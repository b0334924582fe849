"""Copied from the seed (usage-examples.md, "Database Query Endpoint with Error Recovery"); only import lines changed."""

from fastapi import APIRouter, Depends, HTTPException
from sqlalchemy.orm import Session
from taskkit.db.session import get_db
from taskkit.db import db_retry, ensure_connection
from taskkit.db.models import ModelRun

router = APIRouter()

@router.get("/models/{model_id}")
@ensure_connection
@db_retry(max_attempts=3, delay=0.5)
async def get_model(model_id: int, db: Session = Depends(get_db)):
    """Get model with database retry."""
    model = db.query(ModelRun).filter_by(id=model_id).first()
    if not model:
        raise HTTPException(status_code=404, detail="Model not found")
    return model
