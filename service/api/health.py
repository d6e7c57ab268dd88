from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.api.deps import ReaderDep, RuntimeDep
from service.schemas import BackboneOut

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The backbone is loaded and the engine runs",
            responses={503: {"description": "Still loading, or start-up failed"}})
def readyz(rt: RuntimeDep):
    if rt.ready:
        return {"status": "ready"}
    return JSONResponse({"status": "failed" if rt.error else "loading", "error": rt.error}, status_code=503)


@router.get("/backbone", response_model=BackboneOut, summary="The frozen backbone", dependencies=[ReaderDep])
def backbone(rt: RuntimeDep) -> BackboneOut:
    rt._require_ready()
    return BackboneOut(**rt.backbone.summary())


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def prometheus(rt: RuntimeDep) -> Response:
    return Response(metrics.render(rt), media_type="text/plain; version=0.0.4")
