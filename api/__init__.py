"""The HTTP API for mobile apps and scripts (FastAPI, mounted at /api by server.py)."""
