"""The Ray Serve deployment of ``nchains serve`` (imports fastapi and ray.serve: imported only when serving).

Defined at module level so that Ray pickles the FastAPI app and the deployment by reference
(a worker imports this module) instead of by value.
"""


from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from nchains.distributed.predictor import MAX_BODY, Predictor, RequestError, parse_request

app = FastAPI(title="nchains chain server", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


@serve.deployment(name="chain")
@serve.ingress(app)
class ChainServer:
    """One replica: a :class:`~nchains.distributed.predictor.Predictor` of the export folder."""

    def __init__(self, folder: str, runtime: str, threads: Optional[int] = None):
        self.predictor = Predictor(folder, runtime, threads=threads)

    @app.get("/")
    def root(self) -> Dict[str, Any]:
        return self.predictor.summary()

    @app.post("/predict")
    async def predict(self, request: Request):
        try:
            size = int(request.headers.get("content-length") or 0)
            if size > MAX_BODY:
                raise RequestError(f"the request body has {size} bytes; at most {MAX_BODY}", 413)
            body = await request.body()
            return self.predictor.predict(*parse_request(request.headers.get("content-type"), body))
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except ValueError as exc:  # a check below the predictor (e.g. preprocessing): still the client's input
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            first = str(exc).splitlines()[0] if str(exc) else ""
            return _error(500, f"internal error: {type(exc).__name__}: {first}")
