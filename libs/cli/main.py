"""``imagestream``: the one command for running, using and operating imagestream."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from imagestream.common import db, export, providers, settings, tokens, webhooks
from imagestream.common.connections import ConnectError
from imagestream.common.logging import configure_logging
from imagestream.common.runtime import run
from imagestream.common.storage import StorageError

from . import local, pipeline, remote

log = logging.getLogger("imagestream")
# `imagestream dev TOOL`: the module in imagestream.devtools whose main() runs it.
DEV_SERVERS = {
    "gemini-server": ("gemini_server", "a Gemini API emulator"),
    "openai-server": ("openai_server", "an OpenAI-compatible API emulator"),
    "anthropic-server": ("anthropic_server", "an Anthropic-compatible API emulator"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagestream",
        description="Fetch, analyze and store structured results for lists of image URLs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the services' logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "analyze", help="run a list (CSV/TXT/JSONL) or a folder of images through the pipeline here"
    )
    p.add_argument(
        "input",
        help="a CSV, TXT or JSONL list of URLs (optionally .gz), a folder of images, or a"
        " list's s3://, gs:// or https:// URL",
    )
    p.add_argument(
        "-o",
        "--output",
        help=f"results: a file (format from its extension: {export.suffixes()}), a folder, or"
        " an s3://, gs:// or file:// URL or prefix (a folder or prefix gets <batch id>.<format>)",
    )
    p.add_argument(
        "--format",
        choices=export.FORMATS,
        help="results format when -o is a folder or prefix (default csv)",
    )
    p.add_argument(
        "--analyzer", default=None, help=f"{', '.join(providers.names())} (default: local)"
    )
    p.add_argument(
        "--profile",
        help="analysis profile: local facts (default) or content (+ OCR, NSFW);"
        " gemini/openai describe (default), moderation or your own",
    )
    p.add_argument("--model", help="model (model providers)")
    p.add_argument(
        "--budget-usd", type=float, help="pause the batch before it costs more than this"
    )
    p.add_argument("--name", help="batch name (default: the input's file name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-cache", action="store_true", help="analyze every image afresh (no cached analyses)"
    )
    p.add_argument(
        "--long-side",
        type=int,
        help="long side (px) of the image the analyzer sees (768; local content 1280)",
    )
    p.add_argument(
        "--mode",
        choices=("standard", "batch"),
        help="batch sends the images as the provider's Batch API jobs: half price, hours",
    )
    p.add_argument(
        "--webhook-url", help="POST the batch's events here, signed (default: WEBHOOK_URL)"
    )
    p.add_argument(
        "--webhook-secret",
        help="whsec_ secret signing them (default: WEBHOOK_SECRET, else a new one, shown once)",
    )

    p = sub.add_parser(
        "estimate", help="expected tokens, cost and duration of a list, before running it"
    )
    p.add_argument("input", type=Path, help="a CSV, TXT or JSONL list of URLs, or a folder")
    p.add_argument("--analyzer", default="gemini", help="the provider to price (default gemini)")
    p.add_argument("--profile", help="analysis profile (default: describe)")
    p.add_argument("--model", help="model (default: the profile's)")
    p.add_argument("--sample", type=int, default=20, help="images to fetch and count (20)")
    p.add_argument("--offline", action="store_true", help="count by the rules, no API call")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("dev", help="development tools")
    devsub = p.add_subparsers(dest="dev_command", required=True, metavar="TOOL")
    for tool, what in DEV_SERVERS.items():
        d = devsub.add_parser(
            tool,
            help=f"{what[1]} on 127.0.0.1 (for tests, benchmarks and demos)",
            add_help=False,
        )
        d.add_argument("args", nargs=argparse.REMAINDER, help="its options (see its --help)")

    sub.add_parser("demo", help="analyze a few bundled sample images served on 127.0.0.1")
    sub.add_parser("up", help="run every service in this process (dashboard and API on :5001)")

    p = sub.add_parser("serve", help="run one service (what a container runs)")
    p.add_argument("stage", choices=sorted(pipeline.STAGES))

    sub.add_parser(
        "doctor", help="check Redis, PostgreSQL, migrations, Gemini keys and disk (exit 0: ready)"
    )

    p = sub.add_parser("db", help="database administration")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("migrate", help="apply pending schema migrations")

    p = sub.add_parser("tokens", help="API tokens")
    tsub = p.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="create a token (shown once)")
    t.add_argument("--role", choices=tokens.ROLES, required=True)
    t.add_argument("--name", required=True)
    t.add_argument("--webhook-secret", help="whsec_ secret signing the webhooks of its batches")
    tsub.add_parser("list", help="list tokens (never their secrets)")
    t = tsub.add_parser("revoke", help="revoke a token")
    t.add_argument("id", type=int)

    remote.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "dev":
        # The tool parses its own options (argparse's REMAINDER misses leading --options).
        args.args = [*unknown, *args.args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    env = settings.environment()
    try:
        common = settings.load(settings.CommonSettings, env)
        if args.command == "serve":
            configure_logging(common.log_level, common.log_format)
        else:
            configure_logging("INFO" if args.verbose else "WARNING", "text")
        code = COMMANDS[args.command](args, env)
    except settings.SettingsError as exc:
        _fail(str(exc), 2)
    except local.UsageError as exc:
        _fail(str(exc), 2)
    except StorageError as exc:
        _fail(str(exc), 1)
    except ConnectError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    raise SystemExit(code)


def _fail(message: str, code: int) -> None:
    print(f"imagestream: {message}", file=sys.stderr)
    raise SystemExit(code)


def _run(coro_factory: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> Any:
    """Run on uvloop with SIGTERM/SIGINT setting the stop event; return the result."""
    box: dict[str, Any] = {}

    async def main(stop: asyncio.Event) -> None:
        box["result"] = await coro_factory(stop)

    run(main)
    return box.get("result")


# ---------------------------------------------------------------- commands
def cmd_analyze(args: argparse.Namespace, env: dict[str, str]) -> int:
    analyzer = args.analyzer or env.get("ANALYZER", "local")
    options = local.RunOptions(
        input=args.input,
        output=args.output,
        format=args.format,
        analyzer=analyzer,
        profile=args.profile,
        model=args.model,
        budget_usd=args.budget_usd,
        name=args.name,
        progress=not args.no_progress,
        cache=not args.no_cache,
        long_side=args.long_side,
        mode=args.mode,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
    )
    report = _run(lambda stop: local.analyze(env, options, stop))
    print(local.summary(report))
    return 0 if report.batch["state"] in ("completed", "completed_with_errors") else 1


def cmd_estimate(args: argparse.Namespace, env: dict[str, str]) -> int:
    from . import estimate

    if args.sample < 1:
        raise local.UsageError("--sample must be at least 1")
    report = _run(
        lambda stop: estimate.estimate(
            env,
            args.input,
            analyzer=args.analyzer,
            profile=args.profile,
            model=args.model,
            sample_size=args.sample,
            offline=args.offline,
        )
    )
    if args.json:
        print(json.dumps(estimate.as_json(report), indent=2))
    else:
        print(estimate.render(report))
    return 0


def cmd_dev(args: argparse.Namespace, env: dict[str, str]) -> int:
    module = importlib.import_module(f"imagestream.devtools.{DEV_SERVERS[args.dev_command][0]}")
    module.main(args.args)
    return 0


def cmd_demo(args: argparse.Namespace, env: dict[str, str]) -> int:
    from . import demo

    return int(_run(lambda stop: demo.demo(env, stop)))


def cmd_up(args: argparse.Namespace, env: dict[str, str]) -> int:
    _run(lambda stop: local.up(env, stop))
    return 0


def cmd_serve(args: argparse.Namespace, env: dict[str, str]) -> int:
    config = pipeline.STAGES[args.stage].load(env)
    _run(lambda stop: pipeline.serve(args.stage, config, stop))
    return 0


def cmd_db(args: argparse.Namespace, env: dict[str, str]) -> int:
    common = settings.load(settings.CommonSettings, env)

    async def migrate(_: asyncio.Event) -> list[str]:
        async with (
            pipeline.connected(common, pool_size=2, migrate=False) as res,
            res.pool.acquire() as conn,
        ):
            return await db.migrate(conn)

    applied = _run(migrate)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_doctor(args: argparse.Namespace, env: dict[str, str]) -> int:
    from . import doctor

    return doctor.doctor(env)


def cmd_tokens(args: argparse.Namespace, env: dict[str, str]) -> int:
    common = settings.load(settings.CommonSettings, env)

    async def act(_: asyncio.Event) -> int:
        async with pipeline.connected(common, pool_size=2) as res:
            if args.tokens_command == "create":
                if args.webhook_secret is not None:
                    try:
                        webhooks.secret_key(args.webhook_secret)
                    except webhooks.WebhookError as exc:
                        print(f"imagestream: --webhook-secret: {exc}", file=sys.stderr)
                        return 2
                token_id, secret = await tokens.create(
                    res.pool, args.name, args.role, webhook_secret=args.webhook_secret
                )
                print(f"token {token_id} ({args.role}, {args.name}); shown once:")
                print(secret)
            elif args.tokens_command == "list":
                for row in await tokens.list_tokens(res.pool):
                    state = "revoked" if row["revoked_at"] else "active"
                    used = row["last_used_at"].isoformat() if row["last_used_at"] else "never"
                    print(f"{row['id']:>4}  {row['role']:<6}  {state:<7}  ", end="")
                    print(f"last used {used}  {row['name']}")
            elif not await tokens.revoke(res.pool, args.id):
                print(f"imagestream: no active token {args.id}", file=sys.stderr)
                return 1
            return 0

    return int(_run(act))


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, str]], int]] = {
    "analyze": cmd_analyze,
    "estimate": cmd_estimate,
    "dev": cmd_dev,
    "demo": cmd_demo,
    "up": cmd_up,
    "serve": cmd_serve,
    "db": cmd_db,
    "doctor": cmd_doctor,
    "tokens": cmd_tokens,
    **remote.COMMANDS,
}
