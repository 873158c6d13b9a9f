"""The review app: FastAPI routes over the workspace's review, label, suggest and suspects workflows.

Every page is rendered on the server from :class:`~clipfuse.workspace.Workspace` results; the app adds
no logic of its own beyond the request checks (host, token, same origin) and the write journal.
"""


import dataclasses
import hmac
import ipaddress
import math
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from jinja2 import Environment, FileSystemLoader, select_autoescape

from clipfuse.workspace import OptionError
from clipfuse.workspace.labeling import check_class_name

from .jobs import Writer

HERE = Path(__file__).parent
TOKEN_COOKIE = "clipfuse_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
QUEUE_KINDS = ("suggest", "suspects")
MAX_UPLOAD = 32 * 2**20
MAX_BODY = 1 * 2**20  # a JSON change is a few hundred bytes
MAX_PAGE_NUMBER = 10**7
MIN_TOKEN = 16


def is_loopback(host: str) -> bool:
    """Whether a --host binds to this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(ws, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
               heads: str | None = None, folds: int = 3, page_size: int = 100) -> FastAPI:
    """The review app over one workspace.

    Parameters
    ----------
    ws : Workspace
    host, port : where it is served (the Host header of every request must name it or loopback).
    token : required on every request when set (``Authorization: Bearer``, the ``token`` query
        parameter once, or the cookie that sets); :func:`serve` makes one off loopback.
    heads, folds : what Retrain trains (``train_heads(heads=..., folds=...)``).
    """
    if not is_loopback(host) and not token:
        raise OptionError("--token", f"--host {host} serves other machines: a token is required (give --token, or "
                                     "let `clipfuse serve` generate one).")
    if token is not None and len(token) < MIN_TOKEN:
        raise OptionError("--token", f"a token of {len(token)} characters is too easy to guess; give at least "
                                     f"{MIN_TOKEN} (or leave --token out to have one generated).")
    app = FastAPI(title="clipfuse review", docs_url=None, redoc_url=None, openapi_url=None)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"
    env.filters["ago"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""
    writer = Writer(ws, ws._thumbs_folder().parent / "_serve" / "labels.journal", heads=heads, folds=folds)
    app.state.ws, app.state.writer, app.state.token = ws, writer, token
    # Off loopback, a page of another site could resolve its own name to this server (DNS rebinding): only
    # the names it is served under are answered. Bound to every interface, the names are unknown; the token guards.
    allowed_hosts = None if host in ("0.0.0.0", "::", "") else LOOPBACK_NAMES | {host, f"[{host}]"}

    def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context.update(request=request, retrain=writer.status, pending=writer.pending(), db=str(ws.db),
                       path=request.url.path)
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def fail(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return render(request, "error.html", status=status, message=message)

    # ---- request checks: host, token, same origin (a pure ASGI layer: no per-request task or body copy) ----
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, token=token)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return fail(request, 404, "not found: no such page, or no such image in the store.")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    # ---- pages ----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request):
        o = ws.overview()
        return render(request, "overview.html", o=o, notices=o.notices)

    @app.get("/gallery", response_class=HTMLResponse)
    def gallery(request: Request, split: str = "", label: str = "", labeled: str = "", predicted: str = "",
                min_confidence: str = "", max_confidence: str = "", disagree: str = "", sort: str = "confidence",
                page: int = Query(1, ge=1, le=MAX_PAGE_NUMBER), cell_true: str = "", cell_predicted: str = ""):
        try:
            args = _gallery_args(split, label, labeled, predicted, min_confidence, max_confidence, disagree, sort)
            ids, cell_names = None, None
            if cell_true or cell_predicted:
                if not (cell_true and cell_predicted):
                    raise OptionError("cell", "a confusion cell needs both cell_true and cell_predicted (class names).")
                ids, cell_names = ws.confusion_ids(cell_true, cell_predicted), (cell_true, cell_predicted)
            result = ws.gallery(**args, ids=ids, offset=(page - 1) * page_size, limit=page_size)
        except (OptionError, ValueError, FileNotFoundError) as e:
            return fail(request, 400, str(e))
        pages = max(1, math.ceil(result.total / page_size))
        query = {k: v for k, v in dict(split=split, label=label, labeled=labeled, predicted=predicted,
                                       min_confidence=min_confidence, max_confidence=max_confidence, disagree=disagree,
                                       sort=sort, cell_true=cell_true, cell_predicted=cell_predicted).items() if v}
        return render(request, "gallery.html", g=result, page=page, pages=pages, query=query, cell=cell_names,
                      link=lambda p: "/gallery?" + urlencode({**query, "page": p}), title="Gallery")

    @app.get("/image/{image_id}", response_class=HTMLResponse)
    def image(request: Request, image_id: str):
        try:
            d = ws.image_details(image_id)
        except LookupError as e:
            return fail(request, 404, str(e))
        return render(request, "image.html", d=d, classes=ws.store.classes())

    @app.get("/search", response_class=HTMLResponse)
    def search(request: Request, text: str = ""):
        if not text.strip():
            return fail(request, 400, "type something to search for (text search needs a CLIP version).")
        try:
            found = ws.neighbors(text=text.strip(), k=48)
        except (ValueError, LookupError, FileNotFoundError, RuntimeError) as e:
            return fail(request, 400, f"text search failed: {e}")
        return render(request, "search.html", found=found, title=f"Search: {text.strip()}")

    @app.post("/search", response_class=HTMLResponse)
    async def search_image(request: Request, image: UploadFile | None = File(None)):
        if image is None:
            return fail(request, 400, "choose an image file to search by.")
        data = await image.read(MAX_UPLOAD + 1)
        if not data:
            return fail(request, 400, "the uploaded file is empty; pick an image file.")
        if len(data) > MAX_UPLOAD:
            return fail(request, 400, f"the uploaded file is larger than {MAX_UPLOAD // 2**20} MiB.")
        suffix = Path(image.filename or "upload").suffix.lower()[:8] or ".img"
        with tempfile.TemporaryDirectory(prefix="clipfuse-serve-") as tmp:
            path = Path(tmp) / f"query{suffix}"
            path.write_bytes(data)
            try:
                found = ws.neighbors(path, k=48)
            except (ValueError, LookupError, FileNotFoundError, RuntimeError, OSError) as e:
                shown = str(e).replace(str(path), image.filename or "the upload")
                return fail(request, 400, f"search by image failed: {shown}")
        return render(request, "search.html", found=found, title=f"Search by image: {image.filename}")

    @app.get("/queue/{kind}", response_class=HTMLResponse)
    def review_queue(request: Request, kind: str, n: int = Query(50, ge=1, le=500)):
        if kind not in QUEUE_KINDS:
            return fail(request, 404, f"no queue {kind!r}; the queues are {', '.join(QUEUE_KINDS)}.")
        try:
            if kind == "suggest":
                result = ws.suggest(n=n)
                items = [{"id": s.id, "path": s.path, "proposed": s.predicted, "now": None,
                          "why": s.reason, "confidence": s.confidence} for s in result.suggestions]
            else:
                result = ws.suspects(n=n)
                items = [{"id": s.id, "path": s.path, "proposed": s.suggested, "now": s.given,
                          "why": s.reason + f" (p(given) {1 - s.score:.2f})", "confidence": None}
                         for s in result.suspects]
        except FileNotFoundError as e:
            return render(request, "queue.html", kind=kind, items=[], classes=ws.store.classes(), notices=[],
                          title="Label next" if kind == "suggest" else "Suspects",
                          untrained=f"{e} Press Retrain (above) to train them here.")
        except ValueError as e:
            return fail(request, 400, str(e))
        return render(request, "queue.html", kind=kind, items=items, classes=ws.store.classes(),
                      notices=result.notices, title="Label next" if kind == "suggest" else "Suspects")

    # ---- files ----------------------------------------------------------------------------------
    @app.get("/thumb/{image_id}")
    async def thumb(request: Request, image_id: str, size: int = 256):
        # A cached thumbnail is read on the event loop (a few KB, no thread hop); a missing one is made in a thread.
        try:
            path = ws.cached_thumbnail(image_id, size)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = (await run_in_threadpool(ws.thumbnail, image_id, size)).read_bytes()
        except OptionError as e:
            return fail(request, 400, str(e))
        except LookupError as e:
            return fail(request, 404, str(e) if "no image" not in str(e) else "no such image in the store.")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/file/{image_id}")
    def original(request: Request, image_id: str):
        try:
            data, path, media = ws.image_file(image_id)
        except LookupError as e:
            return fail(request, 404, str(e) if "no image" not in str(e) else "no such image in the store.")
        return Response(data, media_type=media, headers={
            "Content-Disposition": f"inline; filename=\"{_ascii_name(Path(path).name)}\""})

    # ---- the JSON API -------------------------------------------------------------------------------
    @app.get("/api/gallery")
    def api_gallery(request: Request, split: str = "", label: str = "", labeled: str = "", predicted: str = "",
                    min_confidence: str = "", max_confidence: str = "", disagree: str = "",
                    sort: str = "confidence", offset: int = Query(0, ge=0, le=MAX_PAGE_NUMBER * 100),
                    limit: int = Query(100, ge=1, le=500)):
        try:
            args = _gallery_args(split, label, labeled, predicted, min_confidence, max_confidence, disagree, sort)
            return ws.gallery(**args, offset=offset, limit=limit).to_dict()
        except (OptionError, ValueError, FileNotFoundError) as e:
            return fail(request, 400, str(e))

    @app.get("/api/neighbors/{image_id}")
    def api_neighbors(request: Request, image_id: str, k: int = Query(12, ge=1, le=200)):
        try:
            found = ws.similar(image_id, k=k)
        except (ValueError, LookupError, FileNotFoundError) as e:
            return fail(request, 404 if isinstance(e, (LookupError, FileNotFoundError)) else 400, str(e))
        return {"id": image_id, "neighbors": [dataclasses.asdict(n) for n in found]}

    @app.get("/api/image/{image_id}")
    def api_image(request: Request, image_id: str):
        try:
            d = ws.image_details(image_id)
        except LookupError as e:
            return fail(request, 404, str(e))
        return {"id": d.id, "paths": d.paths, "split": d.split, "label": d.label, "label_source": d.label_source,
                "folder_label": d.folder_label, "predicted": d.predicted, "confidence": d.confidence,
                "fused": d.fused, "heads": d.heads, "history": d.history}

    @app.post("/api/label")
    async def api_label(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        image_id, label, remove = body.get("id"), body.get("label"), body.get("remove", False)
        if not isinstance(image_id, str) or not image_id:
            return fail(request, 400, "give the image's id as 'id'.")
        if not isinstance(remove, bool):
            return fail(request, 400, f"'remove' must be true or false (JSON booleans), got {remove!r}.")
        if label is not None and not isinstance(label, str):
            return fail(request, 400, f"'label' must be a class name (text), got {label!r}.")
        if remove == (label is not None):
            return fail(request, 400, "give either a 'label' (a class name) or 'remove': true.")
        if label is not None:
            try:
                label = check_class_name(label)
            except ValueError as e:
                return fail(request, 400, str(e))
        try:
            before = writer.label_now(image_id, ws.label_of(image_id))  # changes waiting behind a retrain count
        except LookupError as e:
            return fail(request, 404, str(e))
        done = writer.label(image_id, label, before)
        if done["state"] == "failed":
            return fail(request, 400, done["error"])
        return {**done, "id": image_id, "label": label, "before": before}

    @app.post("/api/undo")
    async def api_undo(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        last = writer.last_change()
        if last is None:
            return fail(request, 409, "nothing to undo: no label was changed here since the server started.")
        done = writer.label(last["id"], last["before"], last["after"], action="undo")
        if done["state"] == "failed":
            return fail(request, 400, done["error"])
        return {**done, "id": last["id"], "label": last["before"], "undone": last["after"]}

    @app.get("/api/retrain")
    def retrain_status():
        return {**writer.status.to_dict(), "pending_labels": writer.pending()}

    @app.post("/api/retrain")
    async def retrain(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        return {**writer.retrain().to_dict(), "pending_labels": writer.pending()}

    @app.post("/retrain")
    def retrain_form(request: Request, back: str = Form("/")):
        writer.retrain()
        return RedirectResponse(back if back.startswith("/") and not back.startswith("//") else "/", status_code=303)

    return app


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"),
]


class Guard:
    """Checks every request before the app sees it.

    - Host: only the names the app is served under (a page of another site that resolves its own
      name to this server, DNS rebinding, is refused).
    - Token (when set): ``Authorization: Bearer``, the ``clipfuse_token`` cookie, or ``?token=``
      (which then sets the cookie, HttpOnly and SameSite=Strict).
    - Changes (any method but GET/HEAD/OPTIONS): the Origin header, or else the Referer, must be this
      app itself (CSRF).
    """

    def __init__(self, app, *, allowed_hosts: set[str] | None, token: str | None):
        self.app, self.allowed_hosts, self.token = app, allowed_hosts, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refused = self._refusal(scope, headers)
        if refused is not None:
            status, message = refused
            return await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
        extra = list(SECURITY_HEADERS)
        if self.token and QueryParams(scope.get("query_string", b"")).get("token") == self.token \
                and cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE) != self.token:
            extra.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; Path=/; SameSite=strict".encode()))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers) -> tuple[int, str] | None:
        host_header = headers.get("host", "")
        if host_header.startswith("["):
            name = host_header.split("]")[0] + "]"
        else:
            name = host_header.rsplit(":", 1)[0]
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return 400, f"unknown host {host_header!r}"
        if self.token:
            auth = headers.get("authorization", "")
            offered = [auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else "",
                       cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE) or "",
                       QueryParams(scope.get("query_string", b"")).get("token") or ""]
            if not any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o):
                return 401, ("this clipfuse serve needs its token: open the link it printed (…/?token=...) or send "
                             "'Authorization: Bearer <token>'.")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin") or headers.get("referer")
            if not origin or urlsplit(origin).netloc != host_header:
                return 403, ("refused: a change must come from this app's own pages (the Origin header is missing "
                             "or names another site).")
            limit = MAX_UPLOAD + 2**16 if scope["path"] == "/search" else MAX_BODY
            length = headers.get("content-length")
            if length is None:
                return 411, "send a Content-Length with the request body."
            if not length.isdigit() or int(length) > limit:
                return 413, f"the request body is larger than {limit // 2**20} MiB."
        return None


async def _json_body(request: Request):
    """The request's JSON object, or the error response to send back."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return JSONResponse({"error": "send JSON (Content-Type: application/json)."}, status_code=415)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body is not valid JSON."}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "send a JSON object."}, status_code=400)
    return body


def _gallery_args(split, label, labeled, predicted, min_confidence, max_confidence, disagree, sort) -> dict:
    def confidence(name, text):
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise OptionError(name, f"{name} must be a number between 0 and 1, got {text!r}.") from None
        if not 0.0 <= value <= 1.0:
            raise OptionError(name, f"{name} must be between 0 and 1, got {text!r}.")
        return value

    if labeled not in ("", "yes", "no"):
        raise OptionError("labeled", f"labeled must be yes or no, got {labeled!r}.")
    return dict(split=split or None, label=label or None, labeled={"yes": True, "no": False}.get(labeled),
                predicted=predicted or None,
                min_confidence=confidence("min_confidence", min_confidence),
                max_confidence=confidence("max_confidence", max_confidence),
                disagree=disagree in ("1", "true", "on", "yes"), sort=sort)


def _warm(ws) -> None:
    """Build what the first pages need while the user opens them: the gallery's table and the neighbour
    graph (minutes for a 300,000-image store the first time; then saved beside the store)."""
    try:
        ws.gallery(limit=1)
        ws.store.ann_index(ws.version().fingerprint)
    except Exception:  # noqa: BLE001 - an empty or untrained store: the pages say what is missing
        pass


def _ascii_name(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "image"


def serve(ws, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, open_browser: bool = False,
          heads: str | None = None, folds: int = 3, on_ready=None) -> None:
    """Run the review app until interrupted (uvicorn); off loopback, a token is made when none is given."""
    import threading
    import webbrowser

    import uvicorn

    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    app = create_app(ws, host=host, port=port, token=token, heads=heads, folds=folds)
    threading.Thread(target=_warm, args=(ws,), name="clipfuse-serve-warm", daemon=True).start()
    shown = host
    if host in ("0.0.0.0", "::", ""):  # every interface: a link other machines can open names this one
        import socket

        shown = socket.getfqdn() or socket.gethostname()
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if on_ready is not None:
        on_ready(url, token)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
