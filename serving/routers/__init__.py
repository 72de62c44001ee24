"""One router per resource: sales, forecast, sentiment, alerts, system (status, health, metrics)."""
