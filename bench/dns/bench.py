#!/usr/bin/env python3
"""Cluster DNS benchmark: Strait's node agent vs NSD on the same zone.

Generates 10,000 ClusterIP Services (1,000 with a named port, so SRV
records) plus one ExternalName, as a static manifest for `strait node
--config-file` and as an RFC 1035 zone file for NSD; a 100,000-line query
file (90 % A hits, 5 % SRV, 5 % NXDOMAIN); then runs dnsperf against each
server, server pinned to CPU 0 and dnsperf to CPU 1, on 127.0.0.1 only:
unlimited rate (capacity) and a fixed 20k q/s (latency). Every run is
bounded by dnsperf's -l. Writes a markdown report.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

N_SVC = 10_000
N_SRV = 1_000
DOMAIN = "cluster.local"
TTL = 30
PORT_STRAIT = 25353
PORT_NSD = 25354


def ip_of(i):
    return f"10.96.{i >> 8}.{i & 255}"


def generate(work):
    items = []
    for i in range(N_SVC):
        # UDP ports: the agent's TCP listeners stay out of the measurement.
        port = {"port": 80, "protocol": "UDP"}
        if i < N_SRV:
            port["name"] = "http"
        items.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "default"},
            "spec": {"clusterIP": ip_of(i), "ports": [port]},
        })
    items.append({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": f"svc-0.default.svc.{DOMAIN}"},
    })
    with open(os.path.join(work, "services.json"), "w") as f:
        json.dump(items, f)

    z = [f"$ORIGIN {DOMAIN}.", f"$TTL {TTL}",
         f"@ IN SOA ns.dns.{DOMAIN}. hostmaster.{DOMAIN}. 1 7200 1800 86400 {TTL}",
         f"@ IN NS ns.dns.{DOMAIN}.", "ns.dns IN A 127.0.0.1"]
    for i in range(N_SVC):
        z.append(f"svc-{i}.default.svc IN A {ip_of(i)}")
    for i in range(N_SRV):
        z.append(f"_http._udp.svc-{i}.default.svc IN SRV 0 100 80 svc-{i}.default.svc.{DOMAIN}.")
    z.append(f"db.default.svc IN CNAME svc-0.default.svc.{DOMAIN}.")
    with open(os.path.join(work, f"{DOMAIN}.zone"), "w") as f:
        f.write("\n".join(z) + "\n")

    rng = random.Random(42)
    lines = []
    for _ in range(100_000):
        r = rng.random()
        if r < 0.90:
            lines.append(f"svc-{rng.randrange(N_SVC)}.default.svc.{DOMAIN} A")
        elif r < 0.95:
            lines.append(f"_http._udp.svc-{rng.randrange(N_SRV)}.default.svc.{DOMAIN} SRV")
        else:
            lines.append(f"nx-{rng.randrange(1_000_000)}.default.svc.{DOMAIN} A")
    with open(os.path.join(work, "queries.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def nsd_conf(work):
    conf = os.path.join(work, "nsd.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
  ip-address: 127.0.0.1@{PORT_NSD}
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{work}"
  pidfile: "{work}/nsd.pid"
  database: ""
  zonelistfile: "{work}/zone.list"
  xfrdfile: "{work}/xfrd.state"
  xfrdir: "{work}"
  logfile: "{work}/nsd.log"
  minimal-responses: yes
  rrl-ratelimit: 0
  hide-version: yes
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: {DOMAIN}
  zonefile: {DOMAIN}.zone
""")
    return conf


def session_cpu_ticks(sid):
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[3] is the session id; utime and stime are fields 14 and 15 of stat.
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total


def dig_ok(port, name, rtype, want):
    try:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+timeout=2",
                              name, rtype], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return False
    return f"status: {want}" in out


class Server:
    def __init__(self, name, cmd, port, work):
        self.name, self.port = name, port
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.proc = subprocess.Popen(["taskset", "-c", "0"] + cmd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while not dig_ok(port, f"svc-1.default.svc.{DOMAIN}", "A", "NOERROR"):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"{name} did not come up; see {self.log.name}")
            time.sleep(0.2)
        for qname, rtype, want in [(f"_http._udp.svc-1.default.svc.{DOMAIN}", "SRV", "NOERROR"),
                                   (f"nx-1.default.svc.{DOMAIN}", "A", "NXDOMAIN"),
                                   (f"db.default.svc.{DOMAIN}", "A", "NOERROR")]:
            if not dig_ok(port, qname, rtype, want):
                self.stop()
                sys.exit(f"{name}: {qname} {rtype} is not {want}")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def dnsperf(server, work, secs, rate):
    cmd = ["taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(server.port),
           "-d", os.path.join(work, "queries.txt"), "-l", str(secs), "-c", "4", "-q", "100"]
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.time(), session_cpu_ticks(server.proc.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60).stdout
    wall, cpu = time.time() - t0, (session_cpu_ticks(server.proc.pid) - c0) / hz
    res = {"server": server.name, "rate": rate, "cores": cpu / wall}
    lat = []
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Queries per second:"):
            res["qps"] = float(s.split(":")[1])
        elif s.startswith("Average Latency"):
            res["avg_ms"] = float(s.split(":")[1].split()[0].rstrip("s")) * 1000
        elif s.startswith("Queries lost:"):
            res["lost"] = int(s.split(":")[1].split()[0])
        elif rate and s.startswith(">"):
            try:
                lat.append(float(s.split()[-1]))
            except ValueError:
                pass
    if lat:
        lat.sort()
        res["p50_ms"] = lat[len(lat) // 2] * 1000
        res["p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
    if "qps" not in res:
        sys.exit(f"dnsperf gave no result:\n{out[-2000:]}")
    res["us_per_query"] = cpu * 1e6 / max(1, res["qps"] * wall)
    return res


def med(rows, key):
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "—"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:,.3f}" if m < 100 else f"{m:,.0f}"
    lo, hi = min(vals), max(vals)
    if m < 100:
        return f"{m:.3f} ({lo:.3f}–{hi:.3f})"
    return f"{m:,.0f} ({lo:,.0f}–{hi:,.0f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strait", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    generate(a.work)
    conf = nsd_conf(a.work)
    strait_cmd = [a.strait, "node", "--name", "bench", "--node-ip", "127.0.0.1",
                  "--data-dir", os.path.join(a.work, "node"),
                  "--config-file", os.path.join(a.work, "services.json"),
                  "--dns-listen", f"127.0.0.1:{PORT_STRAIT}", "--dns-upstream", "none",
                  "--dns-ttl", str(TTL)]
    nsd_bin = "/usr/sbin/nsd" if os.path.exists("/usr/sbin/nsd") else "nsd"
    servers = [("strait", strait_cmd, PORT_STRAIT), ("nsd", [nsd_bin, "-d", "-c", conf], PORT_NSD)]
    os.environ.setdefault("STRAIT_LOG", "warn")
    results = []
    load_before = os.getloadavg()[0]
    # Servers alternate within each round, so drift on the box hits both.
    for rnd in range(a.runs):
        for name, cmd, port in (servers if rnd % 2 == 0 else servers[::-1]):
            s = Server(name, cmd, port, a.work)
            try:
                for rate in (None, 20000):
                    r = dnsperf(s, a.work, a.secs, rate)
                    r["round"] = rnd + 1
                    results.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                s.stop()
    with open(os.path.join(a.work, "raw.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")

    def rows(name, rate):
        return [r for r in results if r["server"] == name and r["rate"] == rate]

    def ratio(key, rate):
        s = [r[key] for r in rows("strait", rate) if key in r]
        n = [r[key] for r in rows("nsd", rate) if key in r]
        if not s or not n:
            return "—"
        return f"{statistics.median(s) / statistics.median(n):.2f}×"

    uname = os.uname()
    ver = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}; ", "nsd", "dnsperf"],
                         capture_output=True, text=True).stdout
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    md = [
        "# Cluster DNS: Strait vs NSD, one server core",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · kernel {uname.release} · {cpu} × {os.cpu_count()} · {ver}"
        f" · load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "",
        f"Zone `{DOMAIN}`: {N_SVC:,} ClusterIP Services (A), {N_SRV:,} with a named port (SRV), one ExternalName; "
        f"TTL {TTL}. Strait reads them as a static manifest; NSD loads the equivalent zone file (`minimal-responses: yes`, RRL off). "
        "Queries: 90 % A hits, 5 % SRV, 5 % NXDOMAIN, shuffled. Server pinned to CPU 0 (`taskset -c 0`), "
        f"`dnsperf -c 4 -q 100 -l {a.secs}` pinned to CPU 1, 127.0.0.1 only. Median (min–max) of {a.runs} runs; "
        "server cores = the server's utime+stime / wall time.",
        "",
        "| server | unlimited q/s | server cores | CPU µs/query | q/s at -Q 20000 | p50 ms | p99 ms | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("strait", "nsd"):
        u, f = rows(name, None), rows(name, 20000)
        md.append(f"| {name} | {med(u, 'qps')} | {med(u, 'cores')} | {med(u, 'us_per_query')} | "
                  f"{med(f, 'qps')} | {med(f, 'p50_ms')} | {med(f, 'p99_ms')} | "
                  f"{sum(r.get('lost', 0) for r in u + f)} |")
    md.append(f"| **strait / nsd** | **{ratio('qps', None)}** | | {ratio('us_per_query', None)} | | "
              f"{ratio('p50_ms', 20000)} | {ratio('p99_ms', 20000)} | |")
    md += ["", "Goal: ≥ 0.5× NSD's q/s on one core, p99 ≤ 0.5 ms at 20k q/s.", "",
           f"Command: `bench/dns/run.sh` (RUNS={a.runs} SECS={a.secs}); raw results in `{a.work}/raw.jsonl`.", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
