"""`python -m bench`: run the scenarios against hub and the peers, print a table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import platform
import secrets
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from bench.procs import BenchError, start_redis
from bench.report import table
from bench.scenarios import SCENARIOS, Env, Sizes
from bench.targets import BENCH, TARGETS, hub_available, node_modules_ok

DEFAULT_SCENARIOS = ["burst", "steady", "capacity", "cross", "concurrent", "multicore",
                     "revocation"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--scenario",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--targets",
        default="auto",
        help=f"comma list of {','.join(TARGETS)}; 'auto' = peers, and hub if importable",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--clients", type=int, help="subscribers for burst, steady and cross")
    p.add_argument("--events", type=int, help="events for burst and cross")
    p.add_argument("--rate", type=float, help="steady, multicore: events per second")
    p.add_argument("--duration", type=float, help="steady, multicore: seconds")
    p.add_argument("--capacity", help="capacity: comma list of connection counts")
    p.add_argument("--concurrent", type=int, help="concurrent: connections on one instance")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "latest.json")
    return p.parse_args(argv)


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


def _meta(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    pkgs: dict[str, str] = {}
    # Distribution names: python-socketio and python-engineio have no __version__, and the
    # baseline's speed depends on their release.
    for dist in ("python-socketio", "python-engineio", "uvicorn", "websockets", "redis"):
        try:
            pkgs[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pkgs[dist] = "?"
    for npm in ("socket.io", "@socket.io/redis-adapter", "ws", "redis"):
        try:
            pkgs[f"npm:{npm}"] = json.loads(
                (BENCH / "node_modules" / npm / "package.json").read_text()
            )["version"]
        except OSError:
            pkgs[f"npm:{npm}"] = "?"
    with open("/proc/cpuinfo") as f:
        model = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
        )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "cpu": model,
        "cores": len(__import__("os").sched_getaffinity(0)),
        "python": platform.python_version(),
        "node": _version(["node", "--version"]),
        "redis": _version(["redis-server", "--version"]),
        "packages": pkgs,
    }


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.clients:
        sizes = replace(
            sizes,
            burst_clients=args.clients,
            steady_clients=args.clients,
            cross_clients=args.clients,
            multicore_clients=args.clients,
        )
    if args.events:
        sizes = replace(sizes, burst_events=args.events, cross_events=args.events)
    if args.rate:
        sizes = replace(sizes, steady_rate=args.rate, multicore_rate=args.rate)
    if args.duration:
        sizes = replace(sizes, steady_seconds=args.duration, multicore_seconds=args.duration)
    if args.concurrent:
        sizes = replace(sizes, concurrent_clients=args.concurrent)
    if args.capacity:
        sizes = replace(sizes, capacity=tuple(int(x) for x in args.capacity.split(",")))
    return sizes


def _check_tools() -> str | None:
    if shutil.which("node") is None:
        return "bench: node is required (the load client is Node)"
    if not node_modules_ok():
        print("bench: installing npm dependencies (npm ci --prefix bench)", flush=True)
        subprocess.run(["npm", "ci", "--prefix", str(BENCH), "--no-audit", "--no-fund"], check=True)
    return None


async def _run(args: argparse.Namespace) -> int:
    scenarios = [s for s in args.scenario.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            print(f"bench: unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")
            return 2
    notes: list[str] = []
    if args.targets == "auto":
        targets = ["node", "pysio"]
        if hub_available():
            targets += ["hub-ws", "hub-sio"]
        else:
            notes.append(
                "hub targets skipped: the hub package is not importable from the repo root"
            )
    else:
        targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            print(f"bench: unknown target {t!r} (choose from {', '.join(TARGETS)})")
            return 2
    sizes = _sizes(args)
    logdir = args.out.parent / "logs"
    shutil.rmtree(logdir, ignore_errors=True)  # the logs of the last run only
    logdir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    exp = int(time.time()) + 24 * 3600
    user = jwt.encode(
        {"sub": "bench-user", "role": "viewer", "exp": exp}, secret, algorithm="HS256"
    )
    admin = jwt.encode(
        {"sub": "bench-admin", "role": "admin", "exp": exp}, secret, algorithm="HS256"
    )

    redis = start_redis(logdir)
    env = Env(redis, secret, user, admin, logdir)
    results: list[dict[str, Any]] = []
    failed = 0
    try:
        for scenario in scenarios:
            for name in targets:
                print(f"bench: {scenario} / {name} ...", flush=True)
                started = time.monotonic()
                base = {
                    "scenario": scenario,
                    "target": name,
                    "description": TARGETS[name].description,
                }
                try:
                    out: Any = await SCENARIOS[scenario](TARGETS[name], env, sizes)
                except (
                    BenchError,
                    OSError,
                    TimeoutError,
                    ValueError,
                    KeyError,
                    ImportError,
                    json.JSONDecodeError,
                ) as e:
                    failed += 1
                    traceback.print_exc()
                    results.append({**base, "error": f"{type(e).__name__}: {e}", "complete": False})
                    continue
                for r in out if isinstance(out, list) else [out]:
                    results.append({**base, **r, "wall_s": time.monotonic() - started})
                    if not r.get("complete"):
                        failed += 1
    finally:
        redis.stop()

    report = {"meta": _meta(args, sizes), "notes": notes, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    for n in notes:
        print(f"note: {n}")
    print(f"\nresults: {args.out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    problem = _check_tools()
    if problem:
        print(problem)
        return 2
    return asyncio.run(_run(args))
