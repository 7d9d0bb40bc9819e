"""dreamdata HTTP API (FastAPI). Never imports torch: it enqueues work by task name."""
