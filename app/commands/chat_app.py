"""`tpa-rag serve`, `tpa-rag ask` and `tpa-rag sessions`: the chat application from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from app.errors import AppError

if TYPE_CHECKING:
    from app.settings import Settings

DEMO_COLLECTION = "tpa-rag"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start the web app (binds to 127.0.0.1 unless told otherwise)",
                                  description="Start the web UI and the /ask API endpoint.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--auth", help="user:password, or a file with one user:password per line")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a host name the server answers to besides localhost and --host (repeatable; env "
                            "TPA_RAG_ALLOWED_HOSTS, comma-separated); other Host headers get 400")
    serve.add_argument("--ingest-root", action="append", default=[], metavar="DIR",
                       help="a folder whose files and subfolders visitors may ingest by path (repeatable; env "
                            "TPA_RAG_INGEST_ROOTS, os.pathsep-separated); without one, uploads only")
    serve.add_argument("--offer-model", action="append", default=[], metavar="MODEL",
                       help="a model visitors may switch to besides --model (repeatable; env TPA_RAG_MODELS, "
                            "comma-separated)")
    serve.add_argument("--demo", nargs="+", metavar="PATH",
                       help=f"on first run, ingest these paths as the collection {DEMO_COLLECTION!r} before serving")
    serve.set_defaults(handler=cmd_serve)

    ask = subparsers.add_parser("ask", help="ask a question about a collection (streams the answer)",
                                description="Ask a question; the answer streams to stdout, citations and metrics "
                                            "follow on stderr. --json prints one object instead.")
    ask.add_argument("--collection", required=True, help="the collection to ask about")
    ask.add_argument("--session", default="", help="continue this session (default: a new one)")
    ask.add_argument("--pinned", action="store_true",
                     help="pinned mode: whole documents as the context (default: retrieved chunks)")
    ask.add_argument("--document", action="append", default=None, metavar="PATH",
                     help="with --pinned: this document only (repeatable; default: the whole collection)")
    ask.add_argument("--top-k", type=int, help="retrieved chunks (default: TPA_RAG_TOP_K, else chosen for the model: "
                                                       "a context token budget for small models)")
    ask.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy, the default)")
    ask.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    ask.add_argument("--json", action="store_true",
                     help='print {"answer", "session_id", "sources", "metrics", "left_out", "ungrounded_terms"} '
                          'as one JSON object')
    ask.add_argument("question", nargs="+", help="the question")
    ask.set_defaults(handler=cmd_ask)

    sessions = subparsers.add_parser("sessions", help="list, show, rename or delete chat sessions")
    actions = sessions.add_subparsers(dest="sessions_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="sessions, most recent first")
    listing.add_argument("--collection", help="only this collection's sessions")
    show = actions.add_parser("show", help="a session's turns with sources and metrics")
    show.add_argument("session_id")
    rename = actions.add_parser("rename", help="give a session a name")
    rename.add_argument("session_id")
    rename.add_argument("name")
    delete = actions.add_parser("delete", help="delete a session and release its cache pins")
    delete.add_argument("session_id")
    for sub in (listing, show, rename, delete):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(handler=cmd_sessions)


def _service(settings: Settings, *, with_model: bool = True):
    from app.service import ChatService

    return ChatService(settings, load_model=with_model)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from app import ui, web

    auth = ui.parse_auth(args.auth)
    if not 1 <= args.port <= 65535:
        raise AppError(f"--port must be 1..65535, got {args.port}")
    settings = _serve_settings(args, settings)
    service = _service(settings)
    try:
        if args.demo and DEMO_COLLECTION not in service.collection_names():
            print(f"tpa-rag: first run: indexing {' '.join(args.demo)} as the collection {DEMO_COLLECTION!r} "
                  f"(a few minutes on a small CPU)", file=sys.stderr)
            service.ensure_demo_collection(DEMO_COLLECTION, args.demo, progress=_progress_printer())
        service.warm_up()
        server = web.build_web_app(service, settings, host=args.host, port=args.port, auth=auth)
        print(f"tpa-rag: serving on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
        web.serve_forever(server, host=args.host, port=args.port)
    finally:
        service.close()
    return 0


def _serve_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings with serve's options added: allowed Host names, ingest roots (existing folders) and models."""
    from pathlib import Path

    roots = list(settings.ingest_roots) + [Path(p).expanduser().resolve() for p in args.ingest_root]
    for root in roots:
        if not root.is_dir():
            raise AppError(f"ingest root {str(root)!r} is not a folder")
    return settings.with_(allowed_hosts=settings.allowed_hosts + tuple(args.allowed_host),
                          ingest_roots=tuple(dict.fromkeys(roots)),
                          models=settings.models + tuple(m for m in args.offer_model if m.strip()))


def _progress_printer():
    """A progress callback that rewrites one stderr line on a terminal and stays quiet otherwise."""
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int, message: str) -> None:
        print(f"\r{message[:60]:<60} {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    return report


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from app import ui_render

    question = " ".join(args.question)
    service = _service(settings)
    try:
        service.warm_up()  # the model and the embedder load before the clock of the answer starts
        options = service.options(top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature,
                                  documents=tuple(args.document) if args.document else None)
        result = None
        for event in service.ask_stream(question, args.collection, args.session, pinned=args.pinned,
                                        options=options):
            if event.kind == "start" and event.left_out:
                print("tpa-rag: left out to fit the model's window: " + "; ".join(event.left_out), file=sys.stderr)
            elif event.kind == "delta" and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.kind == "done":
                result = event.result
    finally:
        service.close()
    assert result is not None, "ask_stream ends with a done event"
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    print()
    for number, source in enumerate(result.sources, start=1):
        print(f"[{source.get('ref', number)}] {ui_render.source_label(source)}", file=sys.stderr)
    print(ui_render.metrics_line(result.metrics), file=sys.stderr)
    print(f"session: {result.session_id} (continue with --session {result.session_id})", file=sys.stderr)
    return 0


def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    from app import ui_render

    service = _service(settings, with_model=False)
    try:
        action = args.sessions_action
        if action == "list":
            infos = service.sessions(args.collection)
            if args.json:
                print(json.dumps([s.to_json() for s in infos], ensure_ascii=False))
            elif not infos:
                print("no sessions yet (`tpa-rag ask` or the web app starts one)")
            for info in [] if args.json else infos:
                print(f"{info.id}  {info.collection:<16} {ui_render.session_label(info)}")
        elif action == "show":
            info, turns = service.session(args.session_id)
            if args.json:
                body = info.to_json()
                body["turns_detail"] = [
                    {"question": t.question, "answer": t.answer, "mode": t.mode, "left_out": t.left_out,
                     "sources": [{k: s.get(k) for k in ("path", "start_line", "end_line", "score")}
                                 for s in t.sources],
                     "metrics": t.metrics}
                    for t in turns
                ]
                print(json.dumps(body, ensure_ascii=False))
            else:
                print(f"{info.id}  {info.collection}  {ui_render.session_label(info)}")
                for turn in turns:
                    print(f"\nQ{turn.position + 1}: {turn.question}\nA{turn.position + 1}: {turn.answer}")
                    for number, source in enumerate(turn.sources, start=1):
                        print(f"  [{source.get('ref', number)}] {ui_render.source_label(source)}")
                    print(f"  {ui_render.metrics_line(turn.metrics)}")
        elif action == "rename":
            info = service.rename_session(args.session_id, args.name)
            print(json.dumps(info.to_json()) if args.json else f"renamed {info.id} to {info.name!r}")
        elif action == "delete":
            info = service.delete_session(args.session_id)
            print(json.dumps({"deleted": info.id}) if args.json else f"deleted session {info.id}")
    finally:
        service.close()
    return 0
