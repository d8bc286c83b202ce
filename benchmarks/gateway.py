"""The HTTP/S3 gateway against nginx, Python's http.server and moto, in one run on one machine.

What it measures, everything bound to 127.0.0.1:

1. Data: `cachefs.sample.make_sample` (full: 5,000 files of ~110 KB in 50 class dirs plus four
   64 MiB shards; `--quick`: 300 files plus two 8 MiB shards), committed to the built-in
   `local` remote (file://) and uploaded as plain objects (key = relative path) to a bucket of
   a moto server started for the run.
2. Servers: `cachefs gateway` (anonymous and with an S3 keys file at once, access log off) on
   the local remote with a fresh cache dir; **nginx** (Debian `nginx-light`, `worker_processes
   auto`, `sendfile on`, access log off) serving the source directory; Python's threaded
   `http.server` (`python -m http.server --protocol HTTP/1.1`) on the same directory.
3. Warm-up: every file read once through each server, so the gateway's memory tier and the page
   cache under nginx hold the data set ("warm", as after a first epoch).
4. Load: **wrk** (Debian) with a Lua script that walks the same shuffled list of paths (each
   thread from its own offset) and counts non-2xx answers (any fails the run): small files with
   `--connections` (default 32) connections, large files with 4. Each figure is the best of
   PASSES passes of `--seconds` seconds, the servers' passes interleaved (nginx, gateway,
   http.server, nginx, ...) so that drift in the machine hits all alike.
5. S3: the same shuffled small files fetched with boto3 (8 threads, one client each) through the
   gateway (signed requests) and from moto directly; objects/s, and each server's CPU seconds
   (/proc/PID/stat, the server process alone) per GiB served.

Ratios (`--json` keys): `gateway_small_vs_nginx` (GETs/s), `gateway_large_vs_nginx` (MB/s),
`gateway_small_vs_httpserver` (GETs/s), `gateway_s3_warm_vs_moto` (objects/s),
`gateway_cpu_per_gib_vs_moto` (CPU-s/GiB, gateway / moto: lower is better).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from benchmarks.common import (
    benchmark_parser,
    describe_spec,
    emit,
    log,
    meets,
    print_table,
    private_environment,
    sync,
    work_dir,
)
from benchmarks.read import DATASET, RAW_BUCKET, commit_to, generate, install_missing, upload_raw
from cachefs.sample import SampleSpec
from tests.servers import AWS_TEST_ENV, MotoServer, free_port

FULL_SPEC = SampleSpec(small_files=5_000, small_mean=110 * 1024, classes=50, large_files=4,
                       large_size=64 << 20, seed=3)
QUICK_SPEC = SampleSpec(small_files=300, small_mean=110 * 1024, classes=5, large_files=2,
                        large_size=8 << 20, seed=3)
PASSES = 2
QUICK_PASSES = 1
LARGE_CONNECTIONS = 4
S3_THREADS = 8
START_TIMEOUT_S = 30.0
KEY_ID = "AKIDBENCHGATEWAY"
SECRET = "benchmark-secret"

TARGETS = {
    "gateway_small_vs_nginx": ">= 0.25",
    "gateway_large_vs_nginx": ">= 0.5",
    "gateway_small_vs_httpserver": ">= 2",
    "gateway_s3_warm_vs_moto": ">= 1.5",
    "gateway_cpu_per_gib_vs_moto": "<= 0.33",
}

WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("WRK_PATHS")) do paths[#paths + 1] = line end
local threads = {}
local counter = 0
function setup(thread)
  thread:set("offset", counter * 7919)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  i = offset
  bad = 0
end
function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
function response(status, headers, body)
  if status < 200 or status > 299 then bad = bad + 1 end
end
function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("bad") end
  io.write(string.format(
    '{"requests": %d, "bytes": %d, "duration_us": %d, "bad_status": %d, "errors": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f}\\n',
    summary.requests, summary.bytes, summary.duration, failed,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""

NGINX_CONF = """
{user}
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path {work}/nginx-tmp/body;
  proxy_temp_path {work}/nginx-tmp/proxy;
  fastcgi_temp_path {work}/nginx-tmp/fastcgi;
  uwsgi_temp_path {work}/nginx-tmp/uwsgi;
  scgi_temp_path {work}/nginx-tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
  }}
}}
"""


# -- servers ------------------------------------------------------------------------------------
class Server:
    """One server process of the run, killed (with its process group) however the run ends."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"benchmarks.gateway: {name} did not start:\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/-/health")
                conn.getresponse().read()
                return True
            finally:
                conn.close()
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """utime + stime of the server's processes (the process group: nginx's workers)."""
        total = 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # field 5: the process group
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)


def start_nginx(work: Path, root: Path) -> Server:
    port = free_port()
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user="user root;" if os.geteuid() == 0 else "",
                                      work=work, port=port, root=root))
    return Server("nginx", ["nginx", "-c", str(conf), "-p", str(work)], port,
                  work / "nginx.log")


def start_httpserver(work: Path, root: Path) -> Server:
    port = free_port()
    return Server("http.server", [sys.executable, "-m", "http.server", "--protocol",
                                  "HTTP/1.1", "--bind", "127.0.0.1", "--directory", str(root),
                                  str(port)], port, work / "httpserver.log")


def start_gateway(work: Path) -> Server:
    port = free_port()
    keys = work / "gateway-keys.json"
    keys.write_text(json.dumps({KEY_ID: SECRET}))
    return Server("cachefs gateway", [
        sys.executable, "-m", "cachefs.cli.main", "gateway", "--listen", f"127.0.0.1:{port}",
        "--cache-dir", str(work / "gateway-cache"), "--anonymous", "--s3-keys", str(keys),
        "--no-access-log"], port, work / "gateway.log")


# -- load ---------------------------------------------------------------------------------------
def wrk_pass(work: Path, server: Server, paths: list[str], connections: int,
             seconds: float) -> dict[str, Any]:
    listing = work / f"paths-{server.port}-{len(paths)}.txt"
    if not listing.exists():
        listing.write_text("\n".join(paths) + "\n")
    script = work / "walk.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    threads = min(2, connections)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s",
         "-s", str(script), f"http://127.0.0.1:{server.port}"],
        capture_output=True, text=True, timeout=seconds + 120, check=False,
        env={**os.environ, "WRK_PATHS": str(listing)})
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"benchmarks.gateway: wrk failed on {server.name}:\n{out.stdout}\n"
                         f"{out.stderr}")
    result = json.loads(line)
    if result["bad_status"] or result["errors"]:
        raise SystemExit(f"benchmarks.gateway: {server.name} answered {result['bad_status']} "
                         f"non-2xx, {result['errors']} socket errors: see {server.log_path}")
    seconds_run = result["duration_us"] / 1e6
    return {"requests_per_s": round(result["requests"] / seconds_run, 1),
            "mb_per_s": round(result["bytes"] / seconds_run / 1e6, 1),
            "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "requests": result["requests"], "seconds": round(seconds_run, 2)}


def warm_up(server: Server, paths: list[str], sizes: list[int]) -> None:
    """Every path once, bytes counted (a warm-up that also checks the server serves them)."""
    def fetch(chunk: list[tuple[str, int]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            for path, size in chunk:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or len(body) != size:
                    raise SystemExit(f"benchmarks.gateway: {server.name} {path}: "
                                     f"{response.status}, {len(body)} of {size} bytes")
        finally:
            conn.close()

    items = list(zip(paths, sizes, strict=True))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, [items[i::8] for i in range(8)]))


def s3_pass(endpoint: str, bucket: str, keys: list[str], signed: bool,
            cpu: Callable[[], float]) -> dict[str, Any]:
    """`keys` fetched whole by S3_THREADS threads, each with its own boto3 client (made and
    connected before the clock starts), each taking every S3_THREADS-th key."""
    import boto3
    import botocore
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, max_pool_connections=2,
                    retries={"max_attempts": 1},
                    signature_version="s3v4" if signed else botocore.UNSIGNED)
    ours = bucket == DATASET
    clients = [boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=KEY_ID if ours else AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRET if ours else AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        config=config) for _ in range(S3_THREADS)]

    def fetch(i: int) -> int:
        client = clients[i]
        return sum(len(client.get_object(Bucket=bucket, Key=key)["Body"].read())
                   for key in keys[i::S3_THREADS])

    for i, client in enumerate(clients):
        client.get_object(Bucket=bucket, Key=keys[i])["Body"].read()  # connected
    cpu_before = cpu()
    start = time.perf_counter()
    with ThreadPoolExecutor(S3_THREADS) as pool:
        total = sum(pool.map(fetch, range(S3_THREADS)))
    seconds = time.perf_counter() - start
    cpu_used = cpu() - cpu_before
    for client in clients:
        client.close()
    return {"objects_per_s": round(len(keys) / seconds, 1),
            "mb_per_s": round(total / seconds / 1e6, 1), "seconds": round(seconds, 2),
            "server_cpu_s": round(cpu_used, 2),
            "server_cpu_s_per_gib": round(cpu_used / (total / (1 << 30)), 2)}


# -- the run ------------------------------------------------------------------------------------
def best(passes: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return max(passes, key=lambda p: p[key])


def run(args: Any) -> dict[str, Any]:
    missing = install_missing(("nginx", "wrk"))
    if missing:
        raise SystemExit(f"benchmarks.gateway: needs {' and '.join(missing)} (Debian "
                         "nginx-light, wrk): apt-get install nginx-light wrk")
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    passes = QUICK_PASSES if args.quick else PASSES
    seconds = 1.0 if args.quick else args.seconds
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "cpus": os.cpu_count(),
                           "connections_small": args.connections,
                           "connections_large": LARGE_CONNECTIONS, "seconds": seconds,
                           "passes": passes, "s3_threads": S3_THREADS}
    servers: list[Server] = []
    moto = MotoServer()
    with work_dir(args.dir, args.keep, prefix="cachefs-gateway-") as work, \
            private_environment(work):
        try:
            log(f"generating the dataset: {describe_spec(spec)}")
            data = generate(work / "src", spec)
            os.chmod(work, 0o755)  # nginx's workers read the files too
            sync()
            local_repo = Path(os.environ["XDG_DATA_HOME"]) / "cachefs" / "repo"
            commit_to("file://" + str(local_repo), data.src)
            moto.start()
            log(f"moto S3 server at {moto.endpoint}; uploading the files as objects")
            upload_raw(moto, data)
            gateway = start_gateway(work)
            nginx = start_nginx(work, data.src)
            pyserver = start_httpserver(work, data.src)
            servers += [gateway, nginx, pyserver]
            small_sizes = [(data.src / rel).stat().st_size for rel in data.small]
            large_sizes = [(data.src / rel).stat().st_size for rel in data.large]
            plain_small = ["/" + quote(rel) for rel in data.small]
            plain_large = ["/" + quote(rel) for rel in data.large]
            gw_small = [f"/{DATASET}/main/{quote(rel)}" for rel in data.small]
            gw_large = [f"/{DATASET}/main/{quote(rel)}" for rel in data.large]
            paths = {gateway: (gw_small, gw_large), nginx: (plain_small, plain_large),
                     pyserver: (plain_small, plain_large)}
            for server in servers:
                log(f"warming {server.name}")
                small, large = paths[server]
                warm_up(server, small + large, small_sizes + large_sizes)
            results: dict[str, dict[str, list[dict[str, Any]]]] = {
                s.name: {"small": [], "large": []} for s in servers}
            for n in range(passes):
                for server in servers:
                    small, large = paths[server]
                    results[server.name]["small"].append(
                        wrk_pass(work, server, small, args.connections, seconds))
                    log(f"pass {n + 1}: {server.name}, small files: "
                        f"{results[server.name]['small'][-1]['requests_per_s']:,.0f} GETs/s")
                    if server is pyserver:
                        continue  # its large-file figure is not asked for
                    results[server.name]["large"].append(
                        wrk_pass(work, server, large, LARGE_CONNECTIONS, seconds))
                    log(f"pass {n + 1}: {server.name}, large files: "
                        f"{results[server.name]['large'][-1]['mb_per_s']:,.0f} MB/s")
            keys = list(data.small)
            random.Random(11).shuffle(keys)
            s3: dict[str, list[dict[str, Any]]] = {"gateway": [], "moto": []}
            assert moto._proc is not None
            moto_pid = moto._proc.pid
            for n in range(passes):
                s3["moto"].append(s3_pass(moto.endpoint, RAW_BUCKET, keys, True,
                                          lambda: process_cpu(moto_pid)))
                log(f"pass {n + 1}: boto3 from moto: {s3['moto'][-1]['objects_per_s']:,.0f} "
                    f"objects/s, {s3['moto'][-1]['server_cpu_s_per_gib']} CPU-s/GiB")
                s3["gateway"].append(s3_pass(f"http://127.0.0.1:{gateway.port}", DATASET,
                                             [f"main/{k}" for k in keys], True,
                                             gateway.cpu_seconds))
                log(f"pass {n + 1}: boto3 through the gateway: "
                    f"{s3['gateway'][-1]['objects_per_s']:,.0f} objects/s, "
                    f"{s3['gateway'][-1]['server_cpu_s_per_gib']} CPU-s/GiB")
        finally:
            for server in servers:
                server.stop()
            moto.stop()
    docs = {name: {kind: {"best": best(ps, "requests_per_s" if kind == "small"
                                       else "mb_per_s"), "passes": ps}
                   for kind, ps in kinds.items() if ps}
            for name, kinds in results.items()}
    s3_docs = {name: {"best": best(ps, "objects_per_s"), "passes": ps}
               for name, ps in s3.items()}
    raw["results"] = docs
    raw["s3"] = s3_docs
    gw, ng, py = (docs[n] for n in ("cachefs gateway", "nginx", "http.server"))
    ratios = {
        "gateway_small_vs_nginx": gw["small"]["best"]["requests_per_s"]
        / ng["small"]["best"]["requests_per_s"],
        "gateway_large_vs_nginx": gw["large"]["best"]["mb_per_s"]
        / ng["large"]["best"]["mb_per_s"],
        "gateway_small_vs_httpserver": gw["small"]["best"]["requests_per_s"]
        / py["small"]["best"]["requests_per_s"],
        "gateway_s3_warm_vs_moto": s3_docs["gateway"]["best"]["objects_per_s"]
        / s3_docs["moto"]["best"]["objects_per_s"],
        "gateway_cpu_per_gib_vs_moto": min(p["server_cpu_s_per_gib"] for p in s3["gateway"])
        / min(p["server_cpu_s_per_gib"] for p in s3["moto"]),
    }
    return {"ratios": {k: round(v, 3) for k, v in ratios.items()}, "raw": raw,
            "targets": dict(TARGETS), "quick": bool(args.quick)}


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]
    res = raw["results"]

    def fig(name: str, kind: str) -> str:
        doc = res[name].get(kind)
        if doc is None:
            return ""
        b = doc["best"]
        return (f"{b['requests_per_s']:,.0f} GETs/s" if kind == "small"
                else f"{b['mb_per_s']:,.0f} MB/s")

    rows = [[name, fig(name, "small"), fig(name, "large")] for name in res]
    rows += [[f"boto3 {name}", f"{doc['best']['objects_per_s']:,.0f} objects/s",
              f"{doc['best']['server_cpu_s_per_gib']} CPU-s/GiB"]
             for name, doc in raw["s3"].items()]
    ratio_rows = [[key, f"{value:.2f}", TARGETS[key],
                   "met" if meets(value, TARGETS[key]) else "NOT met"]
                  for key, value in r.items()]
    print_table(f"Gateway: {raw['dataset']}, {raw['connections_small']} connections (small), "
                f"{raw['connections_large']} (large), best of {raw['passes']} x "
                f"{raw['seconds']:g} s", ["server", "small files", "large files"], rows)
    print_table("", ["ratio", "value", "target", ""], ratio_rows,
                ["--quick: a smoke run; its passes are too short to compare."]
                if report["quick"] else [])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser("gateway", "the HTTP/S3 gateway against nginx, http.server and "
                                         "moto on the same files, driven by wrk and boto3")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections for the small files (default 32)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of each wrk pass (default 10; --quick: 1)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
