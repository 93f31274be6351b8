"""The web page (GET /, its assets under /ui/), the run's samples.png, and /docs served offline.

The page's files are package data (service/ui/): no CDN, no build step. Swagger UI's assets come
from the installed `fastapi_offline` package, so /docs works on an air-gapped cluster too.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from service.http_errors import ServiceError
from service.routes.openapi import SAMPLES_RESPONSES
from service.state import get_state

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
SWAGGER_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
SWAGGER_URL = "/docs-assets"
# The page talks only to its own origin and loads nothing from elsewhere.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)
page_router = APIRouter(include_in_schema=False)
# An API resource, unlike the page and /docs: in the OpenAPI document (a route's include_in_schema=True
# cannot undo its router's False, so it has a router of its own).
samples_router = APIRouter(tags=["model"])


@page_router.get("/")
async def index() -> Response:
    headers = {"Content-Security-Policy": CSP}
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=headers)


@samples_router.get(
    "/v1/model/samples.png",
    summary="The training run's sample predictions (samples.png beside the checkpoint), 404 when absent",
    response_class=Response,
    responses=SAMPLES_RESPONSES,
)
async def samples(request: Request) -> Response:
    path = get_state(request).predictor.path.parent / "samples.png"
    if not path.is_file():
        raise ServiceError("not_found", f"no samples.png beside the checkpoint ({path.parent})")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="convserve - Swagger UI",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{SWAGGER_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_URL}/favicon.png",
    )


@router.get("/docs/oauth2-redirect")
async def docs_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


def install(app: FastAPI, ui: bool) -> None:
    app.include_router(router)
    app.include_router(samples_router)
    app.mount(SWAGGER_URL, StaticFiles(directory=SWAGGER_DIR), name="docs-assets")
    if ui:
        app.include_router(page_router)
        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
