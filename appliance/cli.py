"""The ``appliance`` command: ``serve``, ``models``, ``build``, ``keys``, ``config``, ``doctor``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from appliance import __version__
from appliance.config import Config, ConfigError
from appliance.errors import ApplianceError
from appliance.keys import CACHE_SCOPES, LANES, ApiKey, KeyStore, KeyStoreError
from appliance.model_spec import ModelSpec, read_model_spec
from appliance.notify import notifier
from appliance.reload import ConfigSource
from appliance.repository import scan_repository


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Single-box AI inference appliance.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--config", help="TOML configuration file (default: $APPLIANCE_CONFIG, else built-in defaults)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_server_options(serve, "address to bind (server.host)", "port to bind (server.port)")
    models = commands.add_parser("models", help="list the model repository and each version's state")
    _add_server_options(models, "address of the running server to ask (server.host)",
                        "port of the running server to ask (server.port)")
    build = commands.add_parser("build", help="build models into the repository (the defaults or your own)")
    build.add_argument("--defaults", action="store_true", help="fetch and build the bundled default models")
    build.add_argument("--refresh", action="store_true",
                       help="build the defaults if the repository is empty and engine plans missing for this "
                            "machine's GPU, driver or TensorRT; else do nothing (the appliance-build unit)")
    build.add_argument("--source", type=Path, help="a sentence-transformers folder or a Llama-family .gguf file")
    build.add_argument("--name", help="the model's name in the repository (with --source)")
    build.add_argument("--quantize", action="store_true", help="also write an int8 variant (encoders)")
    build.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's offline optimization")
    build.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT engine build")
    build.add_argument("--no-cuda-graph", action="store_true",
                       help="decoders: skip the FP16 graph for ONNX Runtime's CUDA provider (model.cuda.onnx)")
    build.add_argument("--min-cosine-fp16", type=_cosine, metavar="COSINE",
                       help="refuse a TensorRT 11 FP16 copy of an encoder whose least cosine against the float model "
                            "is below this (default 0.999)")
    build.add_argument("--models", help="model repository folder (paths.model_repository)")
    _add_keys_parser(commands)
    commands.add_parser("config", help="print the effective configuration")
    commands.add_parser("doctor", help="check this machine, the install and the configuration; fixes for failures")
    return parser


def _add_server_options(parser: argparse.ArgumentParser, host_help: str, port_help: str) -> None:
    parser.add_argument("--host", help=host_help)
    parser.add_argument("--port", type=int, help=port_help)
    parser.add_argument("--models", help="model repository folder, which must exist (paths.model_repository)")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0 (0 = unlimited)")
    return value


def _cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine threshold: give a number in (0, 1], such as 0.999")
    return value


def _add_keys_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (paths.keys_file)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key; prints its token once, on stdout")
    create.add_argument("--name", required=True, help="unique among active keys; A-Z a-z 0-9 . _ -")
    create.add_argument("--tenant", required=True, help="the tenant it acts for; A-Z a-z 0-9 . _ -")
    create.add_argument("--models", default="", help="comma-separated model names or aliases (default: all)")
    create.add_argument("--cloud", action="store_true", help="its requests' data may leave the device")
    create.add_argument("--cache-scope", choices=CACHE_SCOPES, default="tenant",
                        help="share cached responses with the tenant's keys, keep them to this key, or never cache")
    create.add_argument("--rpm", type=_count, default=0, help="requests per minute (default 0: unlimited)")
    create.add_argument("--tpm", type=_count, default=0, help="tokens per minute (default 0: unlimited)")
    create.add_argument("--admin", action="store_true", help="may call the admin endpoints")
    create.add_argument("--workflow", default="", help="default workflow tag for cost attribution")
    create.add_argument("--lane", choices=LANES, default="interactive",
                        help="default admission lane of its requests (x-appliance-lane overrides)")
    create.add_argument("--token-input", action="store_true",
                        help="may send token ids (not only texts) as /v1/embeddings input")
    create.add_argument("--no-retention", action="store_true",
                        help="local-only-no-retention: its data never leaves the device and nothing of its requests "
                             "or answers is kept (no response cache, no routing-quality replay)")
    listing = actions.add_parser("list", help="list the keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = actions.add_parser("revoke", help="revoke a key; a running server stops accepting it")
    revoke.add_argument("key", metavar="ID_OR_NAME", help="the key's id, or the name of an active key")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _source(args: argparse.Namespace) -> ConfigSource:
    # Command-line flags are the last word; they are validated through the same checks as the file.
    server = {k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None)))
              if v is not None}
    paths = {"model_repository": args.models} if getattr(args, "models", None) else {}
    return ConfigSource(args.config, {"server": server, "paths": paths})


def _progress(line: str) -> None:
    print(f"[build] {line}", file=sys.stderr, flush=True)


def _cmd_build(config: Config, args: argparse.Namespace) -> int:
    from appliance.build.encoder_entry import EncoderOptions
    from appliance.build.pipeline import build_defaults, build_from_path

    repo, cache = config.paths.models(), config.paths.cache()
    if args.refresh:
        from appliance.build.refresh import refresh

        try:
            return refresh(repo, cache, _progress)
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"appliance build --refresh: {exc}", file=sys.stderr)
            return 1
    if args.defaults == bool(args.source):
        print("appliance build: give one of --defaults, --refresh or --source PATH --name NAME", file=sys.stderr)
        return 2
    try:
        fp16 = {} if args.min_cosine_fp16 is None else {"min_cosine_fp16": args.min_cosine_fp16}
        if args.defaults:
            results = build_defaults(repo, cache, _progress, encoder=EncoderOptions(**fp16),
                                     cuda_graph=not args.no_cuda_graph)
        else:
            if not args.name:
                print("appliance build: --source needs --name", file=sys.stderr)
                return 2
            results = build_from_path(args.source, repo, args.name, _progress, quantize=args.quantize,
                                      optimize=not args.no_optimize, tensorrt=not args.no_tensorrt,
                                      cuda_graph=not args.no_cuda_graph, **fp16)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"appliance build: {exc}", file=sys.stderr)
        return 1
    for result in results:
        state = "built" if result.built else "up to date"
        print(f"{result.name} v{result.version}: {state} ({result.folder})")
    return 0


def _missing_models_folder(models: str | None) -> str | None:
    """Why the ``--models`` folder cannot be used, or ``None``: a folder that is not there is taken for a typo."""
    if not models:
        return None
    path = Path(models).expanduser()
    if path.is_dir():
        return None
    found = "is not a folder" if path.exists() else "does not exist"
    return (f"the model repository --models {models} {found}; create it (mkdir, or `appliance build --models "
            f"{models} --defaults` to build the default models into it), or drop --models to use the default "
            "repository")


def _cmd_serve(config: Config, source: ConfigSource, args: argparse.Namespace) -> int:
    from appliance.auth import bind_refusal
    from appliance.listener import ListenError, check_listen

    refusal = bind_refusal(config.server.host, KeyStore(config.paths.keys()))
    if refusal:
        print(f"appliance serve: refusing to start: {refusal}", file=sys.stderr)
        return 2
    missing = _missing_models_folder(args.models)
    if missing:
        print(f"appliance serve: {missing}", file=sys.stderr)
        return 2
    try:
        check_listen(config.server.host, config.server.port)  # before minutes of building or loading models
    except ListenError as exc:
        print(f"appliance serve: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("appliance")
    log.info("effective configuration (%s):\n%s", config.source, config.to_toml())
    if not scan_repository(config.paths.models()):
        if args.models:  # the defaults are built unasked only into the configured repository, never into --models
            log.warning("the model repository %s has no models: serving none (build some into it with `appliance "
                        "build --models %s --defaults` or `--source PATH --name NAME`)", config.paths.models(),
                        args.models)
        else:
            _build_default_models(config)
    try:
        if config.server.workers > 1:
            from appliance.supervisor import supervise

            return supervise(config, source)
        from appliance.server import serve

        return serve(config, source)
    except ListenError as exc:
        print(f"appliance serve: {exc}", file=sys.stderr)
        return 2


def _build_default_models(config: Config) -> None:
    from appliance.build.pipeline import build_defaults

    _progress(f"the model repository {config.paths.models()} is empty: building the default models first")
    notifier().status("building the default models (first start)")
    with notifier().keepalive():  # the build makes progress; systemd's watchdog must not kill it
        build_defaults(config.paths.models(), config.paths.cache(), _progress)


def _cmd_models(config: Config, args: argparse.Namespace) -> int:
    missing = _missing_models_folder(args.models)
    if missing:
        print(f"appliance models: {missing}", file=sys.stderr)
        return 2
    root = config.paths.models()
    live = _live_index(config)
    found = scan_repository(root)
    print(f"repository: {root}" + ("" if live is not None else " (server not reachable: showing files only)"))
    if not found:
        print("  no models")
    for name, versions in found.items():
        state = (live or {}).get(name, {})
        for version in versions:
            try:
                spec = read_model_spec(name, version, root / name / str(version))
                detail = f"task={spec.task} engine={spec.engine.kind} max_batch_size={spec.batching.max_batch_size}"
            except ConfigError as exc:
                detail = f"INVALID: {exc}"
            serving = state.get("version") == str(version)
            status = state.get("state", "-") if serving or not state.get("version") else "not serving"
            reason = f" ({state['reason']})" if serving and state.get("reason") else ""
            print(f"  {name} v{version}: {status}{reason}  {detail}")
            if serving and state.get("runtime"):
                print(f"    runtime: {state['runtime']}")
            elif version == versions[-1] and "INVALID" not in detail:
                print(f"    runtime here: {_runtime_here(spec, config)}")
    return 0


def _runtime_here(spec: ModelSpec, config: Config) -> str:
    """What this machine would run ``spec`` on, and why (no engine is loaded)."""
    from appliance.engine_factory import choose_runtime_quietly

    try:
        return choose_runtime_quietly(spec, config).summary
    except ApplianceError as exc:
        return f"cannot load here: {exc.message}"


def _cmd_keys(config: Config, args: argparse.Namespace) -> int:
    store = KeyStore(config.paths.keys())
    try:
        if args.keys_command == "create":
            models = [name.strip() for name in args.models.split(",") if name.strip()]
            key, token = store.create(name=args.name, tenant=args.tenant, models=models, cloud=args.cloud,
                                      cache_scope=args.cache_scope, requests_per_minute=args.rpm,
                                      tokens_per_minute=args.tpm, admin=args.admin, workflow=args.workflow,
                                      lane=args.lane, token_input=args.token_input,
                                      retention=not args.no_retention)
            print(token)
            print(f"appliance keys: created key {key.id} ({key.name}, tenant {key.tenant}) in {store.path}; the "
                  "token above is shown once and cannot be recovered; a running server picks it up within a few "
                  "seconds", file=sys.stderr)
        elif args.keys_command == "revoke":
            key = store.revoke(args.key)
            print(f"revoked key {key.id} ({key.name}, tenant {key.tenant}); a running server stops accepting it "
                  "within a few seconds")
        elif args.json:
            print(json.dumps([_key_json(key) for key in store.keys()], indent=2))
        else:
            _print_keys(store)
    except (KeyStoreError, OSError) as exc:
        print(f"appliance keys {args.keys_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _key_json(key: ApiKey) -> dict:
    return {**dataclasses.asdict(key), "models": list(key.models), "state": "active" if key.active else "revoked"}


def _print_keys(store: KeyStore) -> None:
    keys = store.keys()
    if not keys:
        print(f"no API keys in {store.path}")
        return
    rows = [("id", "name", "tenant", "models", "cloud", "cache", "rpm", "tpm", "admin", "created", "state")]
    for key in keys:
        created = datetime.fromtimestamp(key.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append((key.id, key.name, key.tenant, ",".join(key.models) or "*", "yes" if key.cloud else "no",
                     key.cache_scope if key.retention else "none (no retention)", str(key.requests_per_minute or "-"), str(key.tokens_per_minute or "-"),
                     "yes" if key.admin else "no", created, "active" if key.active else "revoked"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _live_index(config: Config) -> dict[str, dict] | None:
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    request = urllib.request.Request(f"http://{host}:{config.server.port}/v2/repository/index", data=b"{}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return {entry["name"]: entry for entry in json.load(response)}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``appliance`` command."""
    args = _parser().parse_args(argv)
    source = _source(args)
    if args.command == "doctor":  # checks the configuration itself, so a bad one is a finding, not a stop
        from appliance.doctor import run_doctor

        return run_doctor(source)
    try:
        config = source.load()
    except ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(config.server.log_level)
    if args.command == "serve":
        return _cmd_serve(config, source, args)
    if args.command == "models":
        return _cmd_models(config, args)
    if args.command == "build":
        return _cmd_build(config, args)
    if args.command == "keys":
        return _cmd_keys(config, args)
    print(config.to_toml(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
