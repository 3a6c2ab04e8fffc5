"""`tpa-rag serve`, `ask` and `sessions`: the document assistant (the web app, questions, chat sessions)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from app.commands.progress import IngestProgressBar
from app.context import public_source
from app.errors import AppError

if TYPE_CHECKING:
    from app.settings import Settings

DEMO_COLLECTION = "tpa-rag"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start the web app (binds to 127.0.0.1 unless told otherwise)",
                                  description="Start the web UI, its /ask endpoint and the OpenAI-compatible API "
                                              "under /v1, on one address and port.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--auth", metavar="FILE",
                       help="a file with one user:password per line (recommended: chmod 600), or user:password "
                            "(visible to other users of this machine in the process list)")
    serve.add_argument("--api-key", metavar="KEY_OR_FILE",
                       help="require 'Authorization: Bearer KEY' on the OpenAI-compatible API under /v1: a key, or "
                            "a file with one key per line (env TPA_RAG_API_KEY, TPA_RAG_API_KEYS comma-separated)")
    serve.add_argument("--allow-unprotected", action="store_true",
                       help="bind a non-loopback --host without --auth and --api-key: only where no other machine "
                            "can reach the port (a container whose port is published on the host's 127.0.0.1)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a host name the server answers to besides localhost and --host (repeatable; env "
                            "TPA_RAG_ALLOWED_HOSTS, comma-separated); other Host headers get 400")
    serve.add_argument("--ingest-root", action="append", default=[], metavar="DIR",
                       help="a folder whose files and subfolders visitors may ingest by path (repeatable; env "
                            "TPA_RAG_INGEST_ROOTS, os.pathsep-separated); without one, uploads only")
    serve.add_argument("--offer-model", action="append", default=[], metavar="MODEL",
                       help="a model visitors may switch to besides --model (repeatable; env TPA_RAG_MODELS, "
                            "comma-separated)")
    _chunk_reuse_flag(serve, "for every ask of this server")
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
    ask.add_argument("--top-k", type=int, help="retrieved chunks (default: TPA_RAG_TOP_K, else chosen for the model)")
    ask.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy, the default)")
    ask.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    _chunk_reuse_flag(ask, "for this ask")
    ask.add_argument("--json", action="store_true",
                     help='print {"answer", "session_id", "sources", "metrics", "left_out", "ungrounded_terms"} '
                          'as one JSON object')
    ask.add_argument("--no-server", action="store_true",
                     help="answer in this process even when a `tpa-rag serve` runs on the same data folder (by "
                          "default such a server answers, which saves loading the model; env TPA_RAG_USE_SERVER=0)")
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


def _chunk_reuse_flag(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument("--chunk-reuse", action=argparse.BooleanOptionalAction, default=None,
                        help=f"retrieval mode: assemble the retrieved chunks from their chunk caches {scope} "
                             "(approximate; default: TPA_RAG_CHUNK_REUSE, or when unset on the CPU and not on CUDA; "
                             "--no-chunk-reuse: exact prefix reuse only)")


def _service(settings: Settings, *, with_model: bool = True):
    from app.service import ChatService

    return ChatService(settings, load_model=with_model)


def _local_server_entry(host: str, port: int, model: str):
    """What server.json says of this server, when `tpa-rag ask` on this machine can reach it over loopback."""
    import os

    from app import local_server

    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::", ""):
        return None  # bound to one non-loopback address: the loopback URL would not answer
    return local_server.LocalServer(f"http://127.0.0.1:{port}/", os.getpid(), model, local_server.new_token())


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from app import local_server, ui, web
    from app.openai_api import check_api_keys, parse_api_keys

    auth = ui.parse_auth(args.auth)
    if not 1 <= args.port <= 65535:
        raise AppError(f"--port must be 1..65535, got {args.port}")
    keys = check_api_keys(tuple(dict.fromkeys(settings.api_keys + parse_api_keys(args.api_key))))
    if not _is_loopback(args.host) and not (auth and keys):
        missing = " and ".join(name for name, given in (("--auth", auth), ("--api-key", keys)) if not given)
        if not args.allow_unprotected:
            raise AppError(f"--host {args.host} makes the server reachable from other machines: give {missing} too "
                           "(--auth protects the web app, --api-key the OpenAI-compatible API under /v1)")
        print(f"tpa-rag: serving on {args.host} without {missing} (--allow-unprotected): make sure no other "
              "machine can reach this port", file=sys.stderr)
    settings = _serve_settings(args, settings).with_(api_keys=keys)
    service = _service(settings)
    try:
        if args.demo and DEMO_COLLECTION not in service.collection_names():
            print(f"tpa-rag: first run: indexing {' '.join(args.demo)} as the collection {DEMO_COLLECTION!r} "
                  f"(a few minutes on a small CPU; later starts skip this)", file=sys.stderr)
            bar = IngestProgressBar()
            try:
                service.ensure_demo_collection(DEMO_COLLECTION, args.demo, progress=bar)
            finally:
                bar.close()
        service.warm_up()
        local = _local_server_entry(args.host, args.port, settings.model)
        server = web.build_web_app(service, settings, host=args.host, port=args.port, auth=auth,
                                   local_token=local.token if local else None)
        print(f"tpa-rag: serving on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
        if local:
            local_server.write_server_file(settings.data_dir, local)
        try:
            web.serve_forever(server, host=args.host, port=args.port)
        finally:
            if local:
                local_server.remove_server_file(settings.data_dir, local)
    finally:
        service.close()
    return 0


def _serve_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings with serve's options added: allowed Host names, ingest roots (existing folders), models and
    chunk reuse."""
    from pathlib import Path

    roots = list(settings.ingest_roots) + [Path(p).expanduser().resolve() for p in args.ingest_root]
    for root in roots:
        if not root.is_dir():
            raise AppError(f"ingest root {str(root)!r} is not a folder")
    return settings.with_(allowed_hosts=settings.allowed_hosts + tuple(args.allowed_host),
                          ingest_roots=tuple(dict.fromkeys(roots)),
                          models=settings.models + tuple(m for m in args.offer_model if m.strip()),
                          chunk_reuse=settings.chunk_reuse if args.chunk_reuse is None else args.chunk_reuse)


def _is_loopback(host: str) -> bool:
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    question = " ".join(args.question)
    options = {"top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "documents": tuple(args.document) if args.document else None, "chunk_reuse": args.chunk_reuse}
    if settings.use_server and not args.no_server:
        result = _ask_through_server(settings, question, args, options)
        if result is not None:
            return _print_result(result, args.json)
    service = _service(settings)
    try:
        # Mistakes first: a wrong collection name must not cost a model download.
        service.check_ask(question, args.collection, args.session, pinned=args.pinned,
                          options=service.options(**options))
        service.warm_up()  # the model and the embedder load before the clock of the answer starts
        result = None
        for event in service.ask_stream(question, args.collection, args.session, pinned=args.pinned,
                                        options=service.options(**options)):
            if event.kind == "start":
                _print_left_out(event.left_out)
            elif event.kind == "delta" and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.kind == "done":
                result = event.result.to_json()
                result["sources"] = [{**public, "ref": source.get("ref", number)} for number, (public, source)
                                     in enumerate(zip(result["sources"], event.result.sources), start=1)]
    finally:
        service.close()
    assert result is not None, "ask_stream ends with a done event"
    return _print_result(result, args.json)


def _ask_through_server(settings: Settings, question: str, args: argparse.Namespace, options: dict) -> dict | None:
    """The answer from a server running on this data folder, streamed as it comes; None when there is none
    (or it cannot be reached before anything was asked): then the caller answers in-process."""
    from app import local_server

    server = local_server.find_server(settings.data_dir, settings.model)
    if server is None:
        return None
    request = {"question": question, "collection": args.collection, "session_id": args.session,
               "pinned": args.pinned, "options": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in options.items()}}
    result = None
    try:
        for event in local_server.ask_via_server(server, request):
            if event["kind"] == "start":
                _print_left_out(event["left_out"])
            elif event["kind"] == "delta" and not args.json:
                sys.stdout.write(event["text"])
                sys.stdout.flush()
            elif event["kind"] == "done":
                result = event["result"]
    except local_server.ServerUnavailable as exc:
        print(f"tpa-rag: the server on this data folder did not answer ({exc}); answering here", file=sys.stderr)
        return None
    if result is None:
        raise AppError(f"the server at {server.url} stopped before the answer was complete")
    return result


def _print_left_out(left_out: list[str]) -> None:
    if left_out:
        print("tpa-rag: left out to fit the model's window: " + "; ".join(left_out), file=sys.stderr)


def _print_result(result: dict, as_json: bool) -> int:
    """After the streamed answer: the citations, the metrics and the session id (or one JSON object)."""
    from app import ui_render

    if as_json:
        public = [public_source(s) for s in result["sources"]]
        print(json.dumps({key: public if key == "sources" else value for key, value in result.items()},
                         ensure_ascii=False))
        return 0
    print()
    for number, source in enumerate(result["sources"], start=1):
        print(f"[{source.get('ref', number)}] {ui_render.source_label(source)}", file=sys.stderr)
    print(ui_render.metrics_line({**result["metrics"], "ungrounded_terms": result.get("ungrounded_terms", [])}),
          file=sys.stderr)
    session = result["session_id"]
    print(f"session: {session} (continue with --session {session})", file=sys.stderr)
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
                     "sources": [public_source(s) for s in t.sources],
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
