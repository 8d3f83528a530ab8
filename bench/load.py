"""Load benchmark: gunicorn (deploy/gunicorn.conf.py, 4 workers) on loopback, closed-loop clients.

    cd /work/main && .venv/bin/python bench/load.py              # about 3 minutes
    .venv/bin/python bench/load.py --phase-seconds 5 --mixed-seconds 10 --clients 20   # a quick look

It seeds its own data dir (`--data-dir`, default /tmp/alk-load: embedded PostgreSQL, never the tests'):
tenant `load` with an API key, eight characters enrolled from real photos (tests/photos.py) and 92 without
photos (100 in all). It then starts gunicorn with `bench.load_settings` (production settings plus a
middleware that reports each response's SQL query count and worker pid, and `/bench/floor`, a trivial
API-key-authenticated DRF view: the framework's floor), and runs, each bounded in time and requests:

1. query counts per route, and the list at page_size 10 vs 100 (constant: no N+1);
2. closed-loop phases, one route each: floor, character list, character detail with `--clients`
   clients; search by photo with `--search-clients`;
3. alternating rounds of floor then list (`--rounds` × `--round-seconds` each), one list/floor ratio per
   round: on a shared machine the background load drifts between longer phases;
4. the mixed run: `--clients` clients for `--mixed-seconds`, each request picking list / detail / search by
   photo / generation submit / floor by weight;
5. the rate-limit check: a second gunicorn with ALKEMY_RATE_LIMIT_PER_KEY=60, 120 requests from 8
   connections: exactly 60 (+ what refills meanwhile) pass across all workers, the rest are 429 with
   Retry-After.

Rate limits: phases 1-4 run with the limits raised to 10^9 a minute (the counter still runs on every
request, so its cost is in the figures); `--production-limits` keeps the defaults instead (the 429s are then
counted apart from errors). Gunicorn is always stopped (try/finally, SIGINT/SIGTERM handlers), also on
failure; the embedded PostgreSQL stops with its last holder. Figures go to stdout as tables and to
`--json-out` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECRET = "bench-load-only-not-a-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
HIGH = "1000000000"
MIXED_WEIGHTS = {"list": 35, "detail": 35, "search": 10, "submit": 10, "floor": 10}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def base_env(data_dir: Path, production_limits: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALKEMY_RATE_LIMIT", "DJANGO_SETTINGS"))}
    env.update(
        DJANGO_SETTINGS_MODULE="bench.load_settings",
        PYTHONPATH=str(ROOT),
        ALKEMY_DATA_DIR=str(data_dir),
        SECRET_KEY=SECRET,
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        ALKEMY_FACE_EMBEDDER=os.environ.get("ALKEMY_FACE_EMBEDDER", "dlib"),
        LOG_LEVEL="WARNING",
    )
    if not production_limits:
        env.update(ALKEMY_RATE_LIMIT_PER_KEY=HIGH, ALKEMY_RATE_LIMIT_PER_TENANT=HIGH)
    return env


# --- seeding (in this process) ---------------------------------------------------------------------------


def seed(env: dict) -> dict:
    """Migrate, create tenant `load` with 100 characters (8 enrolled) once; a new API key every run."""
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    from alkemy.tenancy.models import Tenant
    from alkemy.tenancy.services import api_key_create, tenant_create
    from characters.models import Character
    from characters.services import character_create, reference_add
    from generation.models import GenerationJob
    from tests import photos

    call_command("migrate", verbosity=0)
    tenant = Tenant.objects.filter(slug="load").first() or tenant_create(slug="load", name="Load")
    from alkemy.tenancy import scoping

    token = scoping.activate(tenant)
    try:
        if Character.objects.filter(tenant=tenant).count() < 100:
            log("seeding: 8 enrolled characters from real photos, 92 without photos")
            Character.objects.filter(tenant=tenant).delete()
            for name, pixels in photos.people().items():
                character = character_create(tenant=tenant, name=name)
                reference_add(character=character, upload=photos.upload(pixels))
            for i in range(92):
                character_create(tenant=tenant, name=f"Extra {i:03d}", description="no photos", tags=["extra"])
        GenerationJob.objects.filter(tenant=tenant).delete()  # earlier runs' submissions (no worker runs them)
        enrolled = list(
            Character.objects.filter(tenant=tenant, references__isnull=False).values_list("pk", flat=True).distinct()
        )
    finally:
        scoping.deactivate(token)
    from django_q.models import OrmQ

    OrmQ.objects.all().delete()
    _, key = api_key_create(tenant=tenant, name=f"load {time.strftime('%H:%M:%S')}", role="owner")
    photo = photos.encode(photos.astronaut(), "JPEG", quality=90)
    from django.db import connections

    connections.close_all()
    return {"key": key, "enrolled": enrolled, "photo": photo}


# --- gunicorn --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    def __init__(self, env: dict, workers: int, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        env = {**env, "BIND": f"127.0.0.1:{self.port}", "WEB_CONCURRENCY": str(workers)}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "alkemy.wsgi"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _live.append(self)

    def wait_ready(self, key: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}); see {self.log_path}")
            try:
                status, _, _ = request(self.port, "GET", "/bench/floor", key)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"gunicorn not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        if self in _live:
            _live.remove(self)


_live: list[Gunicorn] = []


def stop_all(*_args) -> None:
    for server in list(_live):
        server.stop()


def on_signal(signum, _frame):
    stop_all()
    raise SystemExit(128 + signum)


# --- clients ---------------------------------------------------------------------------------------------


def request(port: int, method: str, path: str, key: str, body: bytes | None = None, headers: dict | None = None,
            conn: http.client.HTTPConnection | None = None):  # fmt: skip
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Api-Key {key}", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data
    finally:
        if own:
            conn.close()


class Routes:
    def __init__(self, ctx: dict) -> None:
        self.key = ctx["key"]
        self.enrolled = ctx["enrolled"]
        boundary = uuid.uuid4().hex
        self.search_body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + ctx["photo"]
            + f"\r\n--{boundary}--\r\n".encode()
        )
        self.search_type = f"multipart/form-data; boundary={boundary}"

    def make(self, route: str, rng: random.Random) -> tuple[str, str, bytes | None, dict]:
        if route == "floor":
            return "GET", "/bench/floor", None, {}
        if route == "list":
            return "GET", "/api/v1/characters", None, {}
        if route == "list10":
            return "GET", "/api/v1/characters?page_size=10", None, {}
        if route == "list100":
            return "GET", "/api/v1/characters?page_size=100", None, {}
        if route == "detail":
            return "GET", f"/api/v1/characters/{rng.choice(self.enrolled)}", None, {}
        if route == "search":
            return "POST", "/api/v1/search/faces", self.search_body, {"Content-Type": self.search_type}
        if route == "submit":
            body = {"character": rng.choice(self.enrolled), "method": "pulid_flux", "prompt": "on a beach at dawn",
                    "width": 512, "height": 512, "steps": 4, "seed": rng.randrange(1 << 30)}  # fmt: skip
            return "POST", "/api/v1/generations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        raise ValueError(route)


EXPECTED = {"floor": 200, "list": 200, "list10": 200, "list100": 200, "detail": 200, "search": 200, "submit": 202}


def closed_loop(port: int, routes: Routes, pick, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads, each on its own keep-alive connection, sending the next request when the last one
    answered, until `seconds` passed or `max_requests` were sent in all."""
    results: dict[str, dict] = defaultdict(
        lambda: {"lat": [], "in_window": 0, "errors": 0, "throttled": 0, "queries": set()}
    )
    lock = threading.Lock()
    sent = [0]
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        local = defaultdict(lambda: {"lat": [], "in_window": 0, "errors": 0, "throttled": 0, "queries": set()})
        try:
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        break
                    sent[0] += 1
                route = pick(rng)
                method, path, body, headers = routes.make(route, rng)
                started = time.perf_counter()
                try:
                    status, response_headers, _ = request(port, method, path, routes.key, body, headers, conn)
                except (OSError, http.client.HTTPException):
                    local[route]["errors"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    continue
                elapsed = time.perf_counter() - started
                if status == EXPECTED[route]:
                    local[route]["lat"].append(elapsed)
                    local[route]["in_window"] += time.monotonic() <= stop_at
                    local[route]["queries"].add(int(response_headers.get("X-Bench-Queries", -1)))
                elif status == 429:
                    local[route]["throttled"] += 1
                else:
                    local[route]["errors"] += 1
        finally:
            conn.close()
            with lock:
                for route, figures in local.items():
                    results[route]["lat"] += figures["lat"]
                    results[route]["in_window"] += figures["in_window"]
                    results[route]["errors"] += figures["errors"]
                    results[route]["throttled"] += figures["throttled"]
                    results[route]["queries"] |= figures["queries"]

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    wall = time.monotonic() - started
    summary = {}
    for route, figures in sorted(results.items()):
        lat = sorted(figures["lat"])
        summary[route] = {
            "ok": len(lat),
            "errors": figures["errors"],
            "throttled": figures["throttled"],
            "rps": round(figures["in_window"] / seconds, 1),  # answered within the phase: no tail bias
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "queries": sorted(figures["queries"]),
        }
    return {"clients": clients, "seconds": round(wall, 1), "routes": summary}


def print_table(title: str, run: dict) -> None:
    print(f"\n{title}  ({run['clients']} clients, {run['seconds']} s)")
    print(f"{'route':<10}{'ok':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'429':>6}  queries/request")
    for route, r in run["routes"].items():
        print(f"{route:<10}{r['ok']:>8}{r['rps']:>9}{r['p50_ms']!s:>9}{r['p99_ms']!s:>9}{r['errors']:>8}"
              f"{r['throttled']:>6}  {r['queries']}")  # fmt: skip
    sys.stdout.flush()


# --- the run ---------------------------------------------------------------------------------------------


def query_counts(port: int, routes: Routes) -> dict:
    rng = random.Random(0)
    counts = {}
    for route in ["floor", "list10", "list100", "list", "detail", "search", "submit"]:
        method, path, body, headers = routes.make(route, rng)
        request(port, method, path, routes.key, body, headers)  # warm this worker's caches
        status, response_headers, _ = request(port, method, path, routes.key, body, headers)
        assert status == EXPECTED[route], (route, status)
        counts[route] = int(response_headers["X-Bench-Queries"])
    return counts


def warm_up(port: int, routes: Routes, workers: int) -> None:
    """Every route once in every worker (new connections until each pid answered it): the first search by photo
    in a worker loads the face models, which is not what the phases measure."""
    rng = random.Random(1)
    for route in ["floor", "list", "detail", "search", "submit"]:
        pids: set[str] = set()
        for _ in range(12 * workers):
            method, path, body, headers = routes.make(route, rng)
            status, response_headers, _ = request(port, method, path, routes.key, body, headers)
            assert status == EXPECTED[route], (route, status)
            pids.add(response_headers["X-Bench-Pid"])
            if len(pids) == workers:
                break
        log(f"warm-up {route}: {len(pids)} of {workers} workers")


def rate_limit_check(env: dict, ctx: dict, data_dir: Path) -> dict:
    limited = Gunicorn({**env, "ALKEMY_RATE_LIMIT_PER_KEY": "60", "ALKEMY_RATE_LIMIT_PER_TENANT": HIGH}, 4,
                       data_dir / "gunicorn-ratelimit.log")  # fmt: skip
    try:
        from django.db import connection

        from alkemy.tenancy.models import ApiKey, Tenant
        from alkemy.tenancy.services import api_key_create

        _, key = api_key_create(tenant=Tenant.objects.get(slug="load"), name="rate limit check", role="viewer")
        warm = api_key_create(tenant=Tenant.objects.get(slug="load"), name="warm-up", role="viewer")[1]
        limited.wait_ready(warm)
        for _ in range(16):  # let every worker load the app (ready answers come from one worker)
            request(limited.port, "GET", "/bench/floor", warm)
        statuses, pids, retry_after = [], set(), set()
        lock = threading.Lock()
        started = time.monotonic()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=60)
            for _ in range(15):
                conn.close()  # a new connection each time: gunicorn spreads them over its workers
                status, headers, _ = request(limited.port, "GET", "/api/v1/characters?page_size=1", key, conn=conn)
                with lock:
                    statuses.append(status)
                    if status == 200:
                        pids.add(headers["X-Bench-Pid"])
                    else:
                        retry_after.add(headers.get("Retry-After"))
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        ApiKey.objects.unscoped().filter(name__in=["rate limit check", "warm-up"]).delete()
        connection.close()
    finally:
        limited.stop()
    passed = statuses.count(200)
    return {
        "limit_per_minute": 60,
        "requests": len(statuses),
        "passed": passed,
        "refused_429": statuses.count(429),
        "other": len(statuses) - passed - statuses.count(429),
        "seconds": round(elapsed, 1),
        "allowed_at_most": 60 + int(elapsed) + 1,
        "workers_that_served": len(pids),
        "retry_after_values": sorted(v for v in retry_after if v),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/alk-load"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--search-clients", type=int, default=4)
    parser.add_argument("--phase-seconds", type=float, default=20)
    parser.add_argument("--mixed-seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=200_000, help="per phase")
    parser.add_argument("--rounds", type=int, default=6, help="alternating floor/list rounds")
    parser.add_argument("--round-seconds", type=float, default=5)
    parser.add_argument("--production-limits", action="store_true")
    parser.add_argument("--skip-rate-limit-check", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.data_dir, 0o755)  # the embedded server runs as its own user
    env = base_env(args.data_dir, args.production_limits)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": {
        k: str(v) for k, v in vars(args).items()}, "loadavg_before": os.getloadavg()}  # fmt: skip
    ctx = seed(env)
    routes = Routes(ctx)
    server = Gunicorn(env, args.workers, args.data_dir / "gunicorn.log")
    try:
        log(f"gunicorn on 127.0.0.1:{server.port}, {args.workers} workers; waiting until it answers")
        server.wait_ready(ctx["key"])
        warm_up(server.port, routes, args.workers)
        counts = query_counts(server.port, routes)
        report["queries_per_request"] = counts
        print("\nSQL queries per request:", json.dumps(counts))
        phases = {}
        plan = [("floor", args.clients), ("list", args.clients), ("detail", args.clients),
                ("search", args.search_clients)]  # fmt: skip
        for name, clients in plan:
            log(f"phase {name}: {clients} clients, {args.phase_seconds:.0f} s")
            phases[name] = closed_loop(
                server.port, routes, lambda rng, r=name: r, clients, args.phase_seconds, args.max_requests
            )
            print_table(f"phase {name}", phases[name])
        report["phases"] = phases

        # On a shared machine the background load drifts between phases: compare list with the floor in
        # alternating short rounds too, one ratio per round (their spread is the measurement's noise).
        rounds = []
        for i in range(args.rounds):
            pair = {}
            for route in ("floor", "list"):
                run = closed_loop(server.port, routes, lambda rng, r=route: r, args.clients, args.round_seconds,
                                  args.max_requests)  # fmt: skip
                pair[route] = run["routes"][route]
            rounds.append({**pair, "ratio": round(pair["list"]["rps"] / max(pair["floor"]["rps"], 0.1), 2)})
            log(f"round {i + 1}: floor {pair['floor']['rps']} req/s, list {pair['list']['rps']} req/s, "
                f"ratio {rounds[-1]['ratio']}")  # fmt: skip
        report["rounds"] = rounds

        log(f"mixed: {args.clients} clients, {args.mixed_seconds:.0f} s")
        names, weights = zip(*MIXED_WEIGHTS.items(), strict=True)
        mixed = closed_loop(server.port, routes, lambda rng: rng.choices(names, weights)[0], args.clients,
                            args.mixed_seconds, args.max_requests)  # fmt: skip
        report["mixed"] = mixed
        print_table("mixed", mixed)
    finally:
        server.stop()
    if not args.skip_rate_limit_check:
        log("rate-limit check: a second gunicorn, 60 requests a minute per key")
        report["rate_limit_check"] = rate_limit_check(env, ctx, args.data_dir)
        print("\nrate-limit check:", json.dumps(report["rate_limit_check"]))

    floor_rps = phases["floor"]["routes"]["floor"]["rps"]
    ratios = {
        "list_over_floor_rps": round(phases["list"]["routes"]["list"]["rps"] / floor_rps, 2),
        "detail_over_floor_rps": round(phases["detail"]["routes"]["detail"]["rps"] / floor_rps, 2),
        # in the mixed run each client picks routes by weight, so request counts follow the weights: compare latency
        "mixed_floor_over_list_p50": round(mixed["routes"]["floor"]["p50_ms"] / mixed["routes"]["list"]["p50_ms"], 2),
        "rounds_list_over_floor_rps": sorted(r["ratio"] for r in rounds),
        "rounds_median": statistics.median(r["ratio"] for r in rounds) if rounds else None,
        "list_queries_constant": counts["list10"] == counts["list100"],
        "errors": sum(r["errors"] for run in [*phases.values(), mixed] for r in run["routes"].values()),
    }
    report["ratios"] = ratios
    report["loadavg_after"] = os.getloadavg()
    print("\nratios:", json.dumps(ratios), "\nload average before/after:", report["loadavg_before"],
          report["loadavg_after"])  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
