"""`digitlab serve`: a FastAPI app (HTTP API + drawing page) around one loaded model.

`create_app(run_dir or predictor)` builds the app (tests use it with TestClient);
`run_server(...)` loads the model once and runs it under uvicorn.
"""

from __future__ import annotations

from digitlab.serve.app import Limits, create_app, run_server

__all__ = ["Limits", "create_app", "run_server"]
