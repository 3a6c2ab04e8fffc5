"""The web UI (Gradio 6 Blocks): collections, chat with citations and metrics, sessions, cache panel, settings.

Layout and wiring only: every handler calls `ChatService` and renders its result with `app.ui_render`. The model,
the indexes and the caches live in the service, never in `gr.State`; the only per-browser state is the id of the
tab's current chat session, so two browser sessions never see each other's chat. Every session handler acts for
the request's owner (`app.owners`: the signed-in user, else the browser's cookie), so a visitor reaches only
their own sessions. Generation goes through one queue (`concurrency_id="model"`, one at a time), ingestion
through another, so the page stays responsive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gradio as gr  # at module level: Gradio resolves handlers' `gr.Request` annotations in these globals

from app import ui_render
from app.context import public_source as contract_source
from app.errors import AppError, user_error_types
from app.owners import owner_for

if TYPE_CHECKING:
    from app.service import ChatService

log = logging.getLogger(__name__)

MODEL_QUEUE = "model"
INGEST_QUEUE = "ingest"
# Gradio's own sweep of its temporary files (every hour, those older than an hour): uploads are deleted as soon
# as they are saved (`discard_uploads`); this catches the ones never ingested.
TEMP_SWEEP_S = (3600, 3600)

CSS = """
.tpa-metrics { font-size: 0.8em; opacity: 0.75; font-family: ui-monospace, monospace; }
#chat { flex-grow: 1; }
.tpa-source { border-collapse: collapse; width: 100%; table-layout: fixed; font-size: 0.85em; }
.tpa-source td { border: none; padding: 0 0.4em; vertical-align: top; font-family: ui-monospace, monospace; }
.tpa-source td.ln { width: 3.5em; text-align: right; opacity: 0.55; user-select: none; }
.tpa-source td.tx { white-space: pre-wrap; overflow-wrap: anywhere; }
.tpa-chart-empty { font-size: 0.85em; opacity: 0.7; padding: 0.5em 0; }
"""


def _owner(request: gr.Request | None) -> str:
    """The owner of the sessions this request may reach."""
    if request is None:
        raise AppError("this action needs a web request (it acts for its visitor)")
    return owner_for(getattr(request, "username", None), dict(request.cookies or {}))


def discard_uploads(paths: list[str]) -> None:
    """Delete uploaded files from Gradio's temporary folder (each sits in a folder of its own there), so no
    other client can fetch them by URL once they are saved. Paths outside that folder are left alone."""
    import os
    from pathlib import Path

    from gradio.utils import get_upload_folder

    temp = Path(os.path.realpath(get_upload_folder()))
    for item in paths:
        path = Path(os.path.realpath(item))
        if not path.is_relative_to(temp) or path == temp:
            continue
        try:
            path.unlink(missing_ok=True)
            if path.parent != temp:
                path.parent.rmdir()
        except OSError:  # the folder holds another file, or is gone already
            pass


def _guard(n_outputs: int | None) -> Callable[[Callable], Callable]:
    """Wrap a handler so that a failure shows one notification and leaves the page as it was.

    A user mistake shows its message, a bug a short one (the traceback goes to the log); either way every one of
    the handler's `n_outputs` components is left unchanged (`gr.skip()`), so none is marked as failed and
    nothing stays red after the next action. `n_outputs=None` is for API endpoints: the error is raised as
    `gr.Error`, which the client receives."""
    import functools
    import inspect

    import gradio as gr

    def message(fn: Callable, exc: BaseException) -> str:
        if isinstance(exc, gr.Error):
            return exc.message
        if isinstance(exc, user_error_types()):
            return str(exc)
        log.exception("unexpected error in %s", fn.__name__)
        return f"internal error ({type(exc).__name__}); the server log has the details"

    def unchanged() -> Any:
        return gr.skip() if n_outputs == 1 else tuple(gr.skip() for _ in range(n_outputs or 0))

    def decorate(fn: Callable) -> Callable:
        def fail(exc: BaseException) -> Any:
            text = message(fn, exc)
            if n_outputs is None:
                raise gr.Error(text, print_exception=False) from None
            gr.Warning(text)
            return unchanged()

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - shown to the user, logged when unexpected
                    yield fail(exc)

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user, logged when unexpected
                return fail(exc)

        return wrapper

    return decorate


def chat_placeholder(collection: str | None) -> str:
    """What the empty chat says: true for the current selection."""
    if collection:
        return (f"Ask a question about **{collection}**: the answer cites the files and lines it comes from, and "
                "a follow-up reuses this chat's cached context.")
    return "No collection yet: create one under *Add documents* (files, a .zip, a folder or a repository path)."


def build_app(service: ChatService) -> gr.Blocks:
    """The Blocks page for `service`; `app.web.build_web_app` mounts it in the server."""
    settings = service.settings
    collections = service.collection_names()

    def session_choices(collection: str | None, owner: str) -> list[tuple[str, str]]:
        return [(ui_render.session_label(s), s.id) for s in service.sessions(collection or None, owner=owner)]

    def ttft_chart(session_id: str, owner: str = "") -> str:
        return ui_render.ttft_chart_html(service.ttft_history(session_id, owner) if session_id else [])

    def cache_text() -> str:
        return ui_render.cache_markdown(service.cache_usage([]))  # the store's totals; no session named

    def pinned_view(request: gr.Request) -> tuple[str, Any]:
        """The visitor's own sessions that pin pages, largest first (another visitor's are never listed)."""
        pinned = service.cache_usage(service.sessions(owner=_owner(request)))["sessions"]
        choices = [(f"{s['name'] or '(unnamed)'} · {ui_render.human_bytes(s['bytes'])}", s["session_id"])
                   for s in pinned]
        return ui_render.pinned_sessions_markdown(pinned), gr.update(choices=choices, value=None)

    with gr.Blocks(title="tpa-rag", fill_height=True, delete_cache=TEMP_SWEEP_S) as demo:
        session_id = gr.State("")
        gr.Markdown("## tpa-rag · ask your documents and code, with reusable TPA factor caches")
        with gr.Row(equal_height=False):
            # ---- left: collections and sessions ------------------------------------------------------------
            with gr.Column(scale=1, min_width=260):
                collection = gr.Dropdown(collections, value=collections[0] if collections else None,
                                         label="Collection", elem_id="collection")
                with gr.Accordion("Add documents", open=not collections):
                    new_collection = gr.Textbox(label="New collection", placeholder="name (letters, digits, - _)",
                                                elem_id="new-collection")
                    # No `file_types` filter: the service checks each upload and names the refused ones.
                    uploads = gr.File(label="Files or a .zip (text, markdown, html, pdf, notebooks, code)",
                                      file_count="multiple", height=120, elem_id="upload")
                    folder = gr.File(label="A folder", file_count="directory", height=120, elem_id="upload-folder")
                    roots = [str(root) for root in settings.ingest_roots]
                    local_path = gr.Textbox(label="Or a folder / git repository on the server, inside "
                                                  + " or ".join(roots), placeholder=roots[0] if roots else "",
                                            visible=bool(roots), elem_id="local-path")
                    encode = gr.Checkbox(label="Encode chunk caches too (for chunk reuse; takes a while)",
                                         value=False, elem_id="ingest-encode")
                    ingest_button = gr.Button("Ingest", variant="primary", elem_id="ingest")
                ingest_summary = gr.Markdown(elem_id="ingest-summary")
                delete_collection = gr.Button("Delete collection", variant="stop", size="sm",
                                              elem_id="delete-collection")
                gr.Markdown("### Sessions")
                # Filled per visitor by `demo.load`: the page config is the same for everyone.
                session_list = gr.Dropdown([], value=None, label="Resume a session", elem_id="sessions")
                with gr.Row():
                    new_session = gr.Button("New", size="sm", elem_id="new-session")
                    delete_session = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-session")
                rename_box = gr.Textbox(label="Rename this session", placeholder="new name", elem_id="rename")

            # ---- middle: the chat ----------------------------------------------------------------------------
            with gr.Column(scale=3, min_width=420):
                # No label: a floating "Chat" label sat over the conversation once it scrolled.
                chatbot = gr.Chatbot(elem_id="chat", height=560, label="Chat", show_label=False,
                                     placeholder=chat_placeholder(collections[0] if collections else None))
                with gr.Row():
                    question = gr.Textbox(show_label=False, placeholder="Ask a question about the collection",
                                          scale=8, lines=1, max_lines=8, elem_id="question")
                    ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                with gr.Row():
                    mode = gr.Radio(["retrieval", "pinned"], value="retrieval", label="Context",
                                    info="retrieval: top-k chunks · pinned: whole documents, cached once",
                                    elem_id="mode")
                    pinned_docs = gr.Dropdown([], multiselect=True, label="Pinned documents (all when empty)",
                                              visible=False, elem_id="pinned-docs")

            # ---- right: cache panel and settings ---------------------------------------------------------
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### Cache")
                cache_stats = gr.Markdown(cache_text(), elem_id="cache-stats")
                ttft_plot = gr.HTML(ttft_chart(""), elem_id="ttft-plot")
                with gr.Accordion("What holds the space", open=False, elem_id="cache-holders") as holders:
                    pinned_list = gr.Markdown(elem_id="pinned-sessions")
                    pinned_pick = gr.Dropdown([], label="Session", elem_id="pinned-pick")
                    with gr.Row():
                        unpin = gr.Button("Unpin", size="sm", elem_id="unpin-session")
                        delete_pinned = gr.Button("Delete session", size="sm", variant="stop",
                                                  elem_id="delete-pinned")
                clear_cache = gr.Button("Clear unpinned pages", size="sm", variant="stop", elem_id="clear-cache")
                with gr.Accordion("Settings", open=False):
                    model = gr.Dropdown(service.model_choices(), value=service.model_name, label="Model",
                                        elem_id="model")
                    top_k = gr.Slider(1, max(20, settings.top_k), value=settings.top_k, step=1,
                                      label="Retrieval top-k")
                    max_new_tokens = gr.Slider(1, max(1024, settings.max_new_tokens), value=settings.max_new_tokens,
                                               step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, max(2.0, settings.temperature), value=settings.temperature,
                                            step=0.05, label="Temperature")

        # ---- handlers: each calls the service and renders -------------------------------------------------
        @_guard(6)
        def on_ask(text: str, chat: list, sid: str, coll: str | None, ctx_mode: str, docs: list[str] | None,
                   k: float, max_new: float, temp: float, request: gr.Request) -> Iterator:
            if not coll:
                raise AppError("pick a collection first, or create one under 'Add documents'")
            owner = _owner(request)
            events = service.ask_stream(
                text, coll, sid, pinned=ctx_mode == "pinned",
                options=service.options(top_k=int(k), max_new_tokens=int(max_new), temperature=float(temp),
                                        documents=tuple(docs or ()) or None),
                owner=owner,
            )
            start = next(events)  # validation, retrieval and overflow errors surface here, before the chat changes
            if start.left_out:
                gr.Warning("Left out to fit the model's window: " + ui_render.left_out_text(start.left_out),
                           duration=12)
            history = list(chat or [])
            answer = ""
            live = history + ui_render.turn_messages(text, answer, [], None)[:2]
            yield live, start.session_id, "", gr.update(), gr.update(), gr.update()
            for event in events:
                if event.kind == "delta":
                    answer += event.text
                    live[-1] = {"role": "assistant", "content": ui_render.answer_markdown(answer)}
                    yield live, start.session_id, "", gr.update(), gr.update(), gr.update()
                elif event.kind == "done":
                    result = event.result
                    final = history + ui_render.turn_messages(text, result.answer, result.sources, result.metrics,
                                                              result.left_out)
                    yield (final, result.session_id, "",
                           gr.update(choices=session_choices(coll, owner), value=result.session_id),
                           cache_text(), ttft_chart(result.session_id, owner))

        ask_inputs = [question, chatbot, session_id, collection, mode, pinned_docs, top_k, max_new_tokens,
                      temperature]
        ask_outputs = [chatbot, session_id, question, session_list, cache_stats, ttft_plot]
        for trigger in (ask_button.click, question.submit):
            trigger(on_ask, ask_inputs, ask_outputs, concurrency_id=MODEL_QUEUE, concurrency_limit=1,
                    api_visibility="private", show_progress="minimal")

        @_guard(7)
        def on_ingest(coll: str | None, new_name: str, files: list[str] | None, folder_files: list[str] | None,
                      path: str, encode_chunks: bool = False, progress: gr.Progress = gr.Progress()) -> tuple:
            name = (new_name or "").strip() or coll
            if not name:
                raise AppError("name a new collection or pick one to add documents to")
            sources = list(files or []) + list(folder_files or [])
            if not sources and not (path or "").strip():
                raise AppError("choose files, a .zip or a folder to upload, or give a path on this machine")

            def report(done: int, total: int, message: str) -> None:
                progress((done, max(total, 1)), desc=message)

            summary = service.ingest(name, uploads=sources, local_path=(path or "").strip() or None,
                                     progress=report)
            discard_uploads(sources)  # saved: the page clears them; after an error they stay for a retry
            for item in summary.get("rejected", []):
                gr.Warning(f"{item['path']}: {item['reason']}")
            if encode_chunks:
                def announce(plan) -> None:  # app.chunk_reuse.EncodePlan
                    gr.Info(f"encoding {plan.to_encode} chunk caches: {plan.bytes_needed / 1024**2:,.1f} MiB of a "
                            f"{plan.budget_bytes / 1024**2:,.0f} MiB cache budget")

                summary["encode"] = service.encode_chunks(
                    name, progress=lambda done, total, what: progress((done, max(total, 1)), desc=f"encoding {what}"),
                    on_plan=announce)
            names = service.collection_names()
            return (ui_render.ingest_markdown(summary), gr.update(choices=names, value=name), "", None, None, "",
                    gr.update(choices=service.document_paths(name)))

        ingest_button.click(
            on_ingest, [collection, new_collection, uploads, folder, local_path, encode],
            [ingest_summary, collection, new_collection, uploads, folder, local_path, pinned_docs],
            concurrency_id=INGEST_QUEUE, concurrency_limit=1, api_name="ingest",
            show_progress_on=[ingest_summary],  # one progress bar, where the summary will appear
        )

        @_guard(5)
        def on_collection(coll: str | None, request: gr.Request) -> tuple:
            docs = service.document_paths(coll) if coll else []
            return (gr.update(value=[], placeholder=chat_placeholder(coll)), "",
                    gr.update(choices=session_choices(coll, _owner(request)), value=None),
                    gr.update(choices=docs, value=[]), ttft_chart(""))

        collection.change(on_collection, [collection], [chatbot, session_id, session_list, pinned_docs, ttft_plot],
                          api_visibility="private", show_progress="hidden")

        @_guard(3)
        def on_delete_collection(coll: str | None) -> tuple:
            if not coll:
                raise AppError("no collection selected")
            service.delete_collection(coll)
            gr.Info(f"collection {coll!r} deleted")
            names = service.collection_names()
            return gr.update(choices=names, value=names[0] if names else None), "", cache_text()

        delete_collection.click(on_delete_collection, [collection], [collection, ingest_summary, cache_stats],
                                concurrency_id=MODEL_QUEUE, api_visibility="private")

        @_guard(4)
        def on_resume(sid: str | None, coll: str | None, request: gr.Request) -> tuple:
            if not sid:
                return gr.update(), gr.update(), gr.update(), gr.update()
            owner = _owner(request)
            info, turns = service.session(sid, owner)
            chat: list = []
            for turn in turns:
                chat += ui_render.turn_messages(turn.question, turn.answer, turn.sources, turn.metrics,
                                                turn.left_out)
            coll_update = gr.update(value=info.collection) if info.collection != coll else gr.update()
            return chat, sid, ttft_chart(sid, owner), coll_update

        # `input` (not `change`): fires on the user's pick only, not when a handler refreshes the list.
        session_list.input(on_resume, [session_list, collection], [chatbot, session_id, ttft_plot, collection],
                           api_visibility="private")

        def on_new_session() -> tuple:
            return [], "", gr.update(value=None), ttft_chart("")

        new_session.click(on_new_session, None, [chatbot, session_id, session_list, ttft_plot],
                          api_visibility="private")

        @_guard(2)
        def on_rename(sid: str, name: str, coll: str | None, request: gr.Request) -> tuple:
            if not sid:
                raise AppError("ask a first question (or resume a session) before renaming it")
            owner = _owner(request)
            service.rename_session(sid, name, owner)
            return gr.update(choices=session_choices(coll, owner), value=sid), ""

        rename_box.submit(on_rename, [session_id, rename_box, collection], [session_list, rename_box],
                          api_visibility="private")

        @_guard(5)
        def on_delete_session(sid: str, coll: str | None, request: gr.Request) -> tuple:
            if not sid:
                raise AppError("no session to delete: resume one first")
            owner = _owner(request)
            service.delete_session(sid, owner)
            gr.Info("session deleted")
            return ([], "", gr.update(choices=session_choices(coll, owner), value=None), ttft_chart(""),
                    cache_text())

        delete_session.click(on_delete_session, [session_id, collection],
                             [chatbot, session_id, session_list, ttft_plot, cache_stats],
                             concurrency_id=MODEL_QUEUE, api_visibility="private")

        holders.expand(_guard(2)(pinned_view), None, [pinned_list, pinned_pick], api_visibility="private",
                       show_progress="hidden")

        @_guard(3)
        def on_unpin(sid: str | None, request: gr.Request) -> tuple:
            if not sid:
                raise AppError("pick a session to unpin")
            service.unpin_session(sid, _owner(request))
            gr.Info("session unpinned: its pages may now be evicted when space runs out")
            return (cache_text(), *pinned_view(request))

        unpin.click(on_unpin, [pinned_pick], [cache_stats, pinned_list, pinned_pick], concurrency_id=MODEL_QUEUE,
                    api_visibility="private")

        @_guard(6)
        def on_delete_pinned(sid: str | None, current: str, coll: str | None, request: gr.Request) -> tuple:
            if not sid:
                raise AppError("pick a session to delete")
            owner = _owner(request)
            service.delete_session(sid, owner)
            gr.Info("session deleted")
            chat_cleared = ([], "") if sid == current else (gr.skip(), gr.skip())
            return (*chat_cleared, gr.update(choices=session_choices(coll, owner), value=None), cache_text(),
                    *pinned_view(request))

        delete_pinned.click(on_delete_pinned, [pinned_pick, session_id, collection],
                            [chatbot, session_id, session_list, cache_stats, pinned_list, pinned_pick],
                            concurrency_id=MODEL_QUEUE, api_visibility="private")

        @_guard(1)
        def on_clear_cache() -> str:
            removed = service.clear_cache()
            gr.Info(f"cache cleared ({removed} pages removed)")
            return cache_text()

        clear_cache.click(on_clear_cache, None, [cache_stats], concurrency_id=MODEL_QUEUE, api_visibility="private")

        def on_mode(ctx_mode: str, coll: str | None) -> Any:
            docs = service.document_paths(coll) if coll and ctx_mode == "pinned" else []
            return gr.update(visible=ctx_mode == "pinned", choices=docs)

        mode.change(_guard(1)(on_mode), [mode, collection], [pinned_docs], api_visibility="private")

        @_guard(1)
        def on_model(name: str) -> str:
            service.switch_model(name)
            gr.Info(f"model {service.model_name} loaded")
            return cache_text()

        model.input(on_model, [model], [cache_stats], concurrency_id=MODEL_QUEUE, api_visibility="private")

        def on_load(coll: str | None, request: gr.Request) -> tuple:  # and what changed since the page was built
            names = service.collection_names()
            coll = coll if coll in names else (names[0] if names else None)
            return (cache_text(), gr.update(choices=names, value=coll),
                    gr.update(choices=session_choices(coll, _owner(request)), value=None))

        demo.load(_guard(3)(on_load), [collection], [cache_stats, collection, session_list], api_visibility="private")

        # ---- the named API endpoint (same object as `tpa-rag ask --json`) ---------------------------------
        @_guard(None)
        def ask(question: str, collection: str, session_id: str = "", pinned: bool = False,
                chunk_reuse: bool | None = None, request: gr.Request = None) -> Iterator[dict]:
            """Ask a question about a collection. Streams partial objects (metrics null) and ends with the object
            of `tpa-rag ask --json`: {answer, session_id, sources, metrics, left_out}, where each source names its
            document under "file" (a "path" key would make gradio_client fetch it as a file). A session_id must
            be one this client started (same login, or same cookie jar). `chunk_reuse`: assemble retrieved chunks
            from chunk caches (null = the server's setting)."""
            answer = ""
            owner = _owner(request)
            options = service.options(chunk_reuse=None if chunk_reuse is None else bool(chunk_reuse))
            for event in service.ask_stream(question, collection, session_id, pinned=pinned, options=options,
                                            owner=owner):
                if event.kind == "done":
                    result = event.result.to_json()
                    yield dict(result, sources=[public_source(s) for s in event.result.sources])
                else:
                    answer += event.text
                    yield {"answer": answer, "session_id": event.session_id,
                           "sources": [public_source(s) for s in event.sources], "metrics": None,
                           "left_out": list(event.left_out)}

        gr.api(ask, api_name="ask", concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    return demo


def public_source(source: dict) -> dict:
    """A source as the `/ask` endpoint gives it: the JSON contract's fields (`app.context.public_source`: line
    range and score, the text stays in the UI), the path under "file"."""
    return {("file" if key == "path" else key): value for key, value in contract_source(source).items()}
def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`user:password`, or the path of a file with one `user:password` per line (blank lines and # comments).
    The file is the safe form: a password on the command line shows in the process list."""
    from pathlib import Path

    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        log.warning("--auth user:password shows the password to every user of this machine (ps); put the "
                    "user:password lines in a file only you can read and give its path")
    elif path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine; chmod 600 it", path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [value]
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            where = f"in {path}" if path.is_file() else "given to --auth"
            raise AppError(f"auth entries are user:password; got {line.split(':')[0]!r}... {where}")
        pairs.append((user, password))
    if not pairs:
        raise AppError(f"no user:password entries in {path}")
    return pairs
