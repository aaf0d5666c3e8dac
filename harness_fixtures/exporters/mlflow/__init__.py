"""MLflow export: records (what a run holds), upload (later, from files) and live logging."""
