#!/usr/bin/env python3
"""Sync benchmarks: Shoal next to rsync, Unison and Syncthing, in the same run.

    tools/bench-sync.py [--dir /var/tmp/shoal-bench/sync] [--only SCENARIO[,...]]
                        [--tools shoal,rsync,rsync-fsync,rsync-ssh,unison,syncthing]
                        [--scale F] [--rounds N] [--out FILE] [--timeout S] [--keep-work] [--no-setup]
                        [--scratch-fs GIB]

Two "nodes" on one machine, over loopback: node A on 127.0.0.1 holds the source tree,
node B on 127.0.0.2 the replica. Every tool gets its own fresh pair of directories.

Scenarios (each measured for every selected tool):
  initial-media  initial sync of the `media` set (~1 GiB of 16-100 MiB files), A full, B empty
  initial-small  initial sync of the `small` set (50,000 files of 1-16 KiB)
  insert         1-byte insert in the middle of the largest media file (100 MiB at full scale)
  append         append 1 MiB to a media file
  rename         rename the directory holding the whole media set (~1 GiB)
  delete         delete 1,000 files of the small set (at most half of it at small scales)
  initial-wide   initial sync of the `wide` set (100,000 files of 10-200 bytes in one directory)
  one-in-wide    one file of the `wide` set rewritten (a directory of 100,000 names)
  initial-million initial sync of the `million` set (1,000,000 files of 10-200 bytes in 1,000
                 directories), A full, B empty: per-file costs, not bytes (try --scale 0.1 first)
The change scenarios run on a tree that is already in sync (the initial sync of their
data set is done first, and only reported if it was asked for).

For each tool and scenario:
  wall s     from the start (process launch, folder added, or change made) until the tool
             says it is done AND B is byte-identical to A (file list, sizes and SHA-256 of
             every file; .shoal/, .stfolder and the tools' temporary files are ignored).
             The time of the content comparison itself is not counted.
  wire       bytes of IP packets on `lo` to or from the tool's ports (nftables counters in
             a table `inet shoalbenchPID` created for the run and deleted at the end; iptables
             if nft is missing; otherwise the tools' own counters, flagged with *).
  peak RSS   VmHWM of the long-running processes (Shoal and Syncthing nodes, the Unison
             server; reset through /proc/PID/clear_refs before each scenario) and the
             maximum RSS from /usr/bin/time -v for one-shot processes (rsync client and
             daemon incl. its forks, Unison client). A = side of 127.0.0.1, B = 127.0.0.2.
  CPU s      user + system CPU time of both sides during the measurement: /proc/PID/stat of
             the long-running processes (Shoal and Syncthing nodes, the Unison server) at
             start and end, /usr/bin/time -v of the one-shot ones (rsync client and daemon
             incl. its forks; over ssh the two rsyncs and the ssh client, not sshd).

How each tool is driven:
  shoal        two `shoal serve` nodes (--heartbeat from --shoal-heartbeat, default 25 s as
               a deployment has it), converged when both /status roots are equal (and A's
               root moved past the pre-change one); a change is picked up by A's file
               watcher (debounced 200 ms) and announced, and B follows A's change feed.
  rsync        `rsync -a --delete SRC/ rsync://127.0.0.2:PORT/bench/` to an rsync daemon;
  rsync-fsync  the same with --fsync (every written file is fsynced).
  rsync-ssh    `rsync -a --delete SRC/ root@127.0.0.2:DST/` over ssh, what lsyncd_swarm runs:
               an sshd of the tool's own on 127.0.0.2 (a free port; host key and user key
               generated into its work directory, started at setup, stopped at teardown);
               ssh's default cipher, no compression.
  unison       `unison -socket PORT` server on 127.0.0.2, client `unison A socket://...`
               with -batch -auto (a full update detection of both replicas per run).
  syncthing    two instances, discovery/relays/NAT/STUN/watcher off, connected before
               timing starts; initial sync is timed from adding the folder on A, a change
               from the POST /rest/db/scan on A; done when A sees B 100 % complete and
               both folders are idle.

Also measured: the disk's own write+fsync rate (1 GiB, or scale x 1 GiB but at least
128 MiB, written then fsynced in DIR), the physical limit: each initial sync shows its
data size / that rate as the "disk floor". --timeout bounds every wait (default
120 s + 1800 s x scale per tool and scenario); a tool that fails or times out gets
"failed: reason" in its row and the run goes on with the next tool.

Data comes from tools/gen-data.py: full-scale sets are taken from (or generated into)
/var/tmp/shoal-bench/data (--data); with --scale F they are generated into
DIR/data-scale-F and kept for the next run. The run's own directories (DIR/run-*) and
processes are removed at the end. Needs root (nftables, rsync daemon as root) and the
packages rsync unison syncthing nftables time openssh-server (installed through
tools/setup.sh).

File system: the run's trees go where DIR is, unless --scratch-fs GIB puts them on a new
ext4 with a journal (a sparse image in DIR, loop-mounted; made and removed by the run).
On a file system without a journal (this project's test machine's ext4 has none) the
kernel will not reuse an inode freed in the last 60-360 s, and checks every such free
inode of a block group on each new one: a small-file row run minutes after another
tool's trees (or another run's) were removed can take several times longer, whichever
tool it is (docs/BENCHMARKS.md, "this machine's inode allocator"). The scratch file
system starts empty every run.

Quick check:  tools/bench-sync.py --scale 0.02 --only initial-small,rename,delete
"""

import argparse
import atexit
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

from benchlib import (
    REPO, Failure, SyncthingInstances, ensure_data, free_port, http_json, last_line, listening, log_tail,
    cpu_seconds, maxrss_kib, peak_kib, reset_peak, run_checked, spawn, stop, stop_all, time_v_cpu, wait_for,
)

MIB = 1 << 20
GIB = 1 << 30

SCENARIOS = {  # in the order of the report
    "initial-media": "initial sync of `media`, A full, B empty",
    "initial-small": "initial sync of `small`, A full, B empty",
    "insert": "1-byte insert in the middle of the largest media file (already synced)",
    "append": "append 1 MiB to a media file",
    "rename": "rename the directory holding the media set",
    "delete": "delete 1,000 files of the small set",
    "initial-wide": "initial sync of `wide` (100,000 files in one directory), A full, B empty",
    "one-in-wide": "one changed file in a directory of 100,000",
    "initial-million": "initial sync of `million` (1,000,000 files of 10-200 bytes, 1,000 dirs), A full, B empty",
}
# Scenarios sharing one data set run in this order on one pair of trees per tool.
GROUPS = {"media": ["initial-media", "insert", "append", "rename"], "small": ["initial-small", "delete"],
          "wide": ["initial-wide", "one-in-wide"], "million": ["initial-million"]}
TOOLS = ["shoal", "rsync", "rsync-fsync", "rsync-ssh", "unison", "syncthing"]
SSHD = "/usr/sbin/sshd"


# --------------------------------------------------------------------------- memory


def time_v_maxrss(path):
    """Maximum RSS (KiB) from a /usr/bin/time -v output file."""
    try:
        with open(path) as f:
            return maxrss_kib(f.read())
    except OSError:
        return None


def time_v_cpu_file(path):
    """User + system CPU seconds from a /usr/bin/time -v output file."""
    try:
        with open(path) as f:
            return time_v_cpu(f.read())
    except OSError:
        return None


def sum_or_none(*values):
    return None if None in values else sum(values)


def fmt_rss(peaks):
    parts = [f"{side} {kib / 1024:.1f} MiB" for side, kib in peaks.items() if kib is not None]
    return " · ".join(parts) if parts else "n/a"


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# --------------------------------------------------------------------------- wire bytes


class WireCounter:
    """Counts bytes of IP packets on lo whose source or destination port is one of a
    tool's ports. Each packet entering through lo is counted once (input hook)."""

    # One table per run: runs side by side (other sessions' benchmarks) would otherwise
    # delete each other's counters.
    TABLE = f"shoalbench{os.getpid()}"

    def __init__(self):
        self.method = None
        self.labels = set()
        if shutil.which("nft"):
            try:
                self._nft(f"delete table inet {self.TABLE}", check=False)
                self._nft(f"add table inet {self.TABLE}")
                self._nft(f"add chain inet {self.TABLE} count {{ type filter hook input priority -300 ; policy accept ; }}")
                self.method = "nft"
                return
            except (Failure, OSError):
                self._nft(f"delete table inet {self.TABLE}", check=False)
        if shutil.which("iptables"):
            try:
                self._ipt("-w", "-D", "INPUT", "-i", "lo", "-j", "SHOALBENCH", check=False)
                self._ipt("-w", "-F", "SHOALBENCH", check=False)
                self._ipt("-w", "-X", "SHOALBENCH", check=False)
                self._ipt("-w", "-N", "SHOALBENCH")
                self._ipt("-w", "-I", "INPUT", "1", "-i", "lo", "-j", "SHOALBENCH")
                self.method = "iptables"
            except (Failure, OSError):
                self.close()

    @staticmethod
    def _nft(command, check=True):
        out = subprocess.run(["nft", *command.split()], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise Failure(f"nft {command}: {out.stderr.strip()}")
        return out.stdout

    @staticmethod
    def _ipt(*args, check=True):
        out = subprocess.run(["iptables", *args], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise Failure(f"iptables {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def watch(self, label, proto, ports):
        if self.method is None:
            return
        ports = sorted(set(ports))
        self.labels.add(label)
        if self.method == "nft":
            s = "{ " + ", ".join(map(str, ports)) + " }"
            base = f"add rule inet {self.TABLE} count iifname lo meta l4proto {proto}"
            self._nft(f"{base} th dport {s} counter comment {label}")
            self._nft(f"{base} th sport {s} th dport != {s} counter comment {label}")
        else:
            p = ",".join(map(str, ports))
            self._ipt("-w", "-A", "SHOALBENCH", "-p", proto, "-m", "multiport", "--dports", p,
                      "-m", "comment", "--comment", label)
            self._ipt("-w", "-A", "SHOALBENCH", "-p", proto, "-m", "multiport", "--sports", p,
                      "-m", "multiport", "!", "--dports", p, "-m", "comment", "--comment", label)

    def read(self, label):
        if self.method is None or label not in self.labels:
            return None
        total = 0
        if self.method == "nft":
            text = self._nft(f"list chain inet {self.TABLE} count")
            for m in re.finditer(r"counter packets \d+ bytes (\d+) comment \"?([\w.-]+)\"?", text):
                if m.group(2) == label:
                    total += int(m.group(1))
        else:
            text = self._ipt("-w", "-L", "SHOALBENCH", "-n", "-v", "-x")
            for line in text.splitlines()[2:]:
                fields = line.split()
                if len(fields) > 2 and f"/* {label} */" in line:
                    total += int(fields[1])
        return total

    def close(self):
        if self.method == "nft":
            self._nft(f"delete table inet {self.TABLE}", check=False)
        elif shutil.which("iptables"):
            self._ipt("-w", "-D", "INPUT", "-i", "lo", "-j", "SHOALBENCH", check=False)
            self._ipt("-w", "-F", "SHOALBENCH", check=False)
            self._ipt("-w", "-X", "SHOALBENCH", check=False)
        self.method = None


# --------------------------------------------------------------------------- tree comparison

IGNORED = {".shoal", ".stfolder", ".stversions", ".stignore"}


def ignored(name):
    return name in IGNORED or name.startswith((".syncthing.", "~syncthing~", ".unison."))


class Hasher:
    """SHA-256 of files, cached by (path, inode, size, mtime, ctime) so a tree that is
    checked again only rereads what changed."""

    def __init__(self):
        self.cache = {}

    @staticmethod
    def _key(path, st):
        return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def digest(self, path):
        st = os.stat(path)
        key = self._key(path, st)
        if key in self.cache:
            return self.cache[key]
        with open(path, "rb") as f:
            value = hashlib.file_digest(f, "sha256").hexdigest()
        if self._key(path, os.stat(path)) == key:  # not changed while we read it
            self.cache[key] = value
        return value


def tree_listing(root):
    """{relative path: ("dir",) | ("file", size) | ("link", target) | ("other",)}"""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + [f for f in filenames if not ignored(f)]:
            path = os.path.join(dirpath, name)
            key = os.path.normpath(os.path.join(rel, name))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out[key] = ("vanished",)
                continue
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[key] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[key] = ("file", st.st_size)
            else:
                out[key] = ("other",)
    return out


def compare_trees(a, b, hasher):
    """None if b is byte-identical to a, else a short reason."""
    la, lb = tree_listing(a), tree_listing(b)
    missing = sorted(set(la) - set(lb))
    extra = sorted(set(lb) - set(la))
    if missing:
        return f"{len(missing)} paths missing in B (e.g. {missing[0]})"
    if extra:
        return f"{len(extra)} extra paths in B (e.g. {extra[0]})"
    for key in sorted(la):
        if la[key] != lb[key]:
            return f"{key} differs: A {la[key]} B {lb[key]}"
    for key in sorted(la):
        if la[key][0] == "file":
            try:
                if hasher.digest(os.path.join(a, key)) != hasher.digest(os.path.join(b, key)):
                    return f"{key}: content differs"
            except FileNotFoundError:
                return f"{key} vanished while comparing"
    return None


def tree_stats(root):
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        for name in filenames:
            if not ignored(name):
                files += 1
                size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


# --------------------------------------------------------------------------- data and changes


def data_set(profile, scale, data_dir, work_dir):
    """Full-scale sets in `data_dir` (shared with the other benchmarks), scaled ones in
    `work_dir`, generated on first use."""
    if scale == 1:
        path = os.path.join(data_dir, profile)
    else:
        path = os.path.join(work_dir, f"data-scale-{scale:g}", profile)
    return ensure_data(path, profile, scale)


def media_files(a):
    root = os.path.join(a, "media")
    files = [os.path.join(root, f) for f in sorted(os.listdir(root))]
    return sorted(files, key=lambda p: (-os.path.getsize(p), p))


def change_insert(a):
    path = media_files(a)[0]
    size = os.path.getsize(path)
    middle = size // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        rest = f.read()
        f.seek(middle)
        f.write(b"\x5a" + rest)
    return f"1 byte inserted at offset {middle:,} of {os.path.relpath(path, a)} ({size / MIB:.1f} MiB)"


def change_append(a):
    files = media_files(a)
    path = files[1] if len(files) > 1 else files[0]
    data = hashlib.shake_256(b"bench-sync append").digest(MIB)
    with open(path, "ab") as f:
        f.write(data)
    return f"1 MiB appended to {os.path.relpath(path, a)} (now {os.path.getsize(path) / MIB:.1f} MiB)"


def change_rename(a):
    files, size = tree_stats(os.path.join(a, "media"))
    os.rename(os.path.join(a, "media"), os.path.join(a, "media-renamed"))
    return f"media/ -> media-renamed/ ({files} files, {size / MIB:.0f} MiB)"


def change_delete(a):
    root = os.path.join(a, "small")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    count = min(1000, len(files) // 2)
    step = len(files) / count
    for i in range(count):
        os.unlink(files[int(i * step)])
    return f"{count} of {len(files)} small files deleted (spread over all directories)"


def change_one_in_wide(a):
    root = os.path.join(a, "wide")
    names = sorted(os.listdir(root))
    path = os.path.join(root, names[len(names) // 2])
    with open(path, "wb") as f:
        f.write(hashlib.shake_256(b"bench-sync one in wide").digest(150))
    return f"{os.path.relpath(path, a)} rewritten (150 bytes) among {len(names):,} names of one directory"


CHANGES = {"insert": change_insert, "append": change_append, "rename": change_rename, "delete": change_delete,
           "one-in-wide": change_one_in_wide}


def disk_rate(directory, size):
    """MiB/s of writing `size` bytes and fsyncing them, on the filesystem of `directory`."""
    path = os.path.join(directory, "disk-rate.tmp")
    block = os.urandom(8 * MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    return size / MIB / seconds


# --------------------------------------------------------------------------- measuring


# TcpExt counters of segments the kernel dropped on receipt: socket backlog full, receive
# queue full (no memory), out-of-order queue full, zero window, and accept queue full.
TCP_DROPS = ("TCPBacklogDrop", "TCPRcvQDrop", "TCPOFODrop", "TCPZeroWindowDrop", "ListenDrops")


def net_counters():
    """The kernel's loss counters (whole machine): UDP datagrams dropped for want of a
    receive or send buffer (/proc/net/snmp), TCP segments retransmitted (/proc/net/snmp)
    and TCP segments dropped on receipt (errors in /proc/net/snmp, TCP_DROPS in
    /proc/net/netstat)."""
    tables = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2]):
            proto, names = names.split(":", 1)
            tables[proto] = dict(zip(names.split(), (int(v) for v in values.split(":", 1)[1].split())))
    if not tables:
        return {}
    udp, tcp, ext = tables.get("Udp", {}), tables.get("Tcp", {}), tables.get("TcpExt", {})
    return {
        "udp_rcvbuf": udp.get("RcvbufErrors", 0),
        "udp_sndbuf": udp.get("SndbufErrors", 0),
        "tcp_retrans": tcp.get("RetransSegs", 0),
        "tcp_drops": tcp.get("InErrs", 0) + sum(ext.get(name, 0) for name in TCP_DROPS),
    }


class Meter:
    """Wall clock, wire bytes, the kernel's loss counters and the CPU time of the tool's
    long-running processes between start() and the last stop()."""

    def __init__(self, wire, label, own_bytes, cpu_now):
        self.wire, self.label, self.own_bytes, self.cpu_now = wire, label, own_bytes, cpu_now
        self.t0 = self.t1 = self.w0 = self.w1 = self.o0 = self.o1 = self.c0 = self.c1 = None
        self.n0 = self.n1 = {}

    def start(self):
        self.o0 = self.own_bytes()
        self.c0 = self.cpu_now()
        self.w0 = self.wire.read(self.label)
        self.n0 = net_counters()
        self.t0 = time.perf_counter()

    def stop(self):
        self.t1 = time.perf_counter()
        self.c1 = self.cpu_now()
        self.n1 = net_counters()
        self.w1 = self.wire.read(self.label)
        self.o1 = self.own_bytes()

    def cpu(self):
        return None if self.c0 is None or self.c1 is None else self.c1 - self.c0

    def losses(self):
        """UDP buffer drops (receive/send), TCP retransmissions and TCP drops during the
        measurement."""
        return {k: self.n1.get(k, 0) - self.n0.get(k, 0) for k in self.n0}

    def wall(self):
        return self.t1 - self.t0

    def wire_bytes(self):
        return None if self.w0 is None or self.w1 is None else self.w1 - self.w0

    def own(self):
        return None if self.o0 is None or self.o1 is None else self.o1 - self.o0


def wait_converged(meter, verify, done, timeout, procs=()):
    """For daemons: poll the tool's own "done" signal, then compare the trees; a tree that
    still differs means the tool is not done yet."""
    deadline = time.monotonic() + timeout
    last = "the tool never reported completion"
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise Failure(f"process exited ({proc.returncode}): {log_tail(log)}")
        try:
            ok = done()
        except (OSError, ValueError) as e:
            ok, last = False, f"status query failed: {e}"
        if ok:
            meter.stop()
            reason = verify()
            if reason is None:
                return
            last = f"reported done but {reason}"
        time.sleep(0.1)
    raise Failure(f"not converged after {timeout:.0f} s: {last}")


# --------------------------------------------------------------------------- tool adapters
#
# Common interface: setup() -> (proto, ports) creates the two trees self.a / self.b (and
# starts what must run before timing); initial_sync(meter, verify, files) and
# sync_change(meter, verify) call meter.start() when timing begins and return once B is
# identical to A; prepare_change() runs before the change is made; reset_peaks() /
# peaks() for memory; own_bytes() is the tool's own traffic counter (cumulative) or
# None; cpu_now() the CPU seconds its long-running processes used so far (or None) and
# cpu_used(meter) those of the last measurement; teardown() stops everything it started.


class Tool:
    def __init__(self, name, work, args):
        self.name, self.args = name, args
        self.dir = work
        self.a = self.b = None
        os.makedirs(self.dir)

    def prepare_change(self):
        pass

    def reset_peaks(self):
        pass

    def peaks(self):
        return {}

    def own_bytes(self):
        return None

    def cpu_now(self):
        return None

    def cpu_used(self, meter):
        return meter.cpu()

    def teardown(self):
        pass


class ShoalTool(Tool):
    def setup(self):
        self.binary = self.args.shoal
        help_out = subprocess.run([self.binary, "serve", "--help"], capture_output=True, text=True)
        if help_out.returncode != 0:
            raise Failure(f"{self.binary} has no `serve` command (rebuild it)")
        self.creds = os.path.join(self.dir, "credentials")
        run_checked([self.binary, "cluster", "init", "--out", self.creds], timeout=60)
        self.a = os.path.join(self.dir, "a", "bench")
        self.b = os.path.join(self.dir, "b", "bench")
        os.makedirs(self.a)
        os.makedirs(self.b)
        self.quic = {"A": free_port("127.0.0.1", "udp"), "B": free_port("127.0.0.2", "udp")}
        self.http = {"A": free_port("127.0.0.1", "tcp"), "B": free_port("127.0.0.1", "tcp")}
        self.procs = {}
        return "udp", list(self.quic.values())

    def _start(self, side):
        ip, other = ("127.0.0.1", "B") if side == "A" else ("127.0.0.2", "A")
        other_ip = "127.0.0.2" if other == "B" else "127.0.0.1"
        log = os.path.join(self.dir, f"node-{side}.log")
        cmd = [self.binary, "serve", "--data-root", os.path.dirname(self.a if side == "A" else self.b),
               "--state-dir", os.path.join(self.dir, f"state-{side}"), "--volume", "bench",
               "--listen", f"{ip}:{self.quic[side]}", "--peer", f"{other_ip}:{self.quic[other]}",
               "--credentials", self.creds, "--http", f"127.0.0.1:{self.http[side]}",
               "--heartbeat", str(self.args.shoal_heartbeat)]
        self.procs[side] = (spawn(cmd, log, env=dict(os.environ, SHOAL_LOG=os.environ.get("SHOAL_LOG", "info"))), log)

    def status(self, side):
        return http_json(f"http://127.0.0.1:{self.http[side]}/status", timeout=2)

    def roots(self):
        a, b = self.status("A"), self.status("B")
        return a["volumes"][0], b["volumes"][0]

    def initial_sync(self, meter, verify, files):
        meter.start()
        self._start("B")
        self._start("A")

        def done():
            a, b = self.roots()
            return a["root"] is not None and a["files"] == files and a["root"] == b["root"]
        self._wait(meter, verify, done)

    def _wait(self, meter, verify, done):
        try:
            wait_converged(meter, verify, done, self.args.timeout, list(self.procs.values()))
        except Failure as e:
            try:
                a, b = self.roots()
                state = (f"A root {str(a['root'])[:12]} files {a['files']}, B root {str(b['root'])[:12]} "
                         f"files {b['files']}")
            except (OSError, ValueError, KeyError):
                state = "status unavailable"
            raise Failure(f"{e} [{state}; B log: {log_tail(self.procs['B'][1])}]") from None

    def prepare_change(self):
        self.before = self.roots()[0]["root"]

    def sync_change(self, meter, verify):
        meter.start()

        def done():
            a, b = self.roots()
            return a["root"] is not None and a["root"] != self.before and a["root"] == b["root"]
        self._wait(meter, verify, done)

    def reset_peaks(self):
        for proc, _ in self.procs.values():
            reset_peak(proc.pid)

    def peaks(self):
        return {side: peak_kib(proc.pid) for side, (proc, _) in sorted(self.procs.items())}

    def cpu_now(self):
        # Before the initial sync no node runs yet: nothing used.
        return sum_or_none(*(cpu_seconds(proc.pid) for proc, _ in getattr(self, "procs", {}).values()))

    def own_bytes(self):
        if "B" not in self.procs:
            return 0
        try:
            return self.status("B")["totals"]["chunk_bytes_received"] + self.status("A")["totals"]["chunk_bytes_received"]
        except (OSError, ValueError, KeyError):
            return None

    def teardown(self):
        for proc, _ in getattr(self, "procs", {}).values():
            stop(proc)


class RsyncTool(Tool):
    def __init__(self, name, work, args, fsync):
        super().__init__(name, work, args)
        self.fsync = fsync
        self.total_own = 0
        self.last_peaks = {}
        self.last_cpu = None

    def setup(self):
        if self.fsync and "--fsync" not in subprocess.run(["rsync", "--help"], capture_output=True, text=True).stdout:
            raise Failure("this rsync has no --fsync (needs 3.2.4+)")
        self.a, self.b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        os.makedirs(self.a)
        os.makedirs(self.b)
        self.port = free_port("127.0.0.2", "tcp")
        self.conf = os.path.join(self.dir, "rsyncd.conf")
        with open(self.conf, "w") as f:
            f.write(f"port = {self.port}\naddress = 127.0.0.2\nuse chroot = no\n"
                    f"pid file = {self.dir}/rsyncd.pid\nlog file = {self.dir}/rsyncd.log\n\n"
                    f"[bench]\n  path = {self.b}\n  read only = no\n  uid = root\n  gid = root\n  use chroot = no\n")
        return "tcp", [self.port]

    def _sync(self, meter, verify):
        daemon_time = os.path.join(self.dir, "daemon.time")
        client_time = os.path.join(self.dir, "client.time")
        daemon_log = os.path.join(self.dir, "daemon.out")
        daemon = spawn(["/usr/bin/time", "-v", "-o", daemon_time, "rsync", "--daemon", "--no-detach",
                        f"--config={self.conf}"], daemon_log)
        try:
            wait_for(lambda: listening("127.0.0.2", self.port, "tcp"), 15, "the rsync daemon", [(daemon, daemon_log)])
            cmd = ["/usr/bin/time", "-v", "-o", client_time, "rsync", "-a", "--delete", "--stats",
                   *(["--fsync"] if self.fsync else []), f"{self.a}/", f"rsync://127.0.0.2:{self.port}/bench/"]
            meter.start()
            out = run_checked(cmd, self.args.timeout, os.path.join(self.dir, "client.out"))
            self.total_own += sum(int(m.replace(",", "")) for m in
                                  re.findall(r"Total bytes (?:sent|received): ([\d,]+)", out))
            meter.stop()
        finally:
            for pid in children(daemon.pid):  # the rsync daemon under /usr/bin/time
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                daemon.wait(timeout=15)  # /usr/bin/time writes its report once rsync is gone
            except subprocess.TimeoutExpired:
                pass
            stop(daemon)
        self.last_peaks = {"A": time_v_maxrss(client_time), "B": time_v_maxrss(daemon_time)}
        self.last_cpu = sum_or_none(time_v_cpu_file(client_time), time_v_cpu_file(daemon_time))
        reason = verify()
        if reason:
            raise Failure(f"rsync finished but {reason}")

    def initial_sync(self, meter, verify, files):
        self._sync(meter, verify)

    def sync_change(self, meter, verify):
        self._sync(meter, verify)

    def peaks(self):
        return self.last_peaks

    def cpu_used(self, meter):
        return self.last_cpu

    def own_bytes(self):
        return self.total_own


class RsyncSshTool(RsyncTool):
    """`rsync -a` over ssh to an sshd of its own, as lsyncd_swarm syncs."""

    def __init__(self, name, work, args):
        super().__init__(name, work, args, fsync=False)
        self.sshd = None

    def setup(self):
        if not os.access(SSHD, os.X_OK):
            raise Failure(f"no {SSHD} (install openssh-server)")
        self.a, self.b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        os.makedirs(self.a)
        os.makedirs(self.b)
        self.port = free_port("127.0.0.2", "tcp")
        host_key, user_key = os.path.join(self.dir, "host_key"), os.path.join(self.dir, "user_key")
        for key in (host_key, user_key):
            run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shoal-bench", "-f", key], 30)
        authorized, known = os.path.join(self.dir, "authorized_keys"), os.path.join(self.dir, "known_hosts")
        shutil.copyfile(f"{user_key}.pub", authorized)
        with open(f"{host_key}.pub") as f, open(known, "w") as out:
            out.write(f"[127.0.0.2]:{self.port} {f.read()}")
        conf = os.path.join(self.dir, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.2\nHostKey {host_key}\n"
                    f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {authorized}\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        log = os.path.join(self.dir, "sshd.log")
        self.sshd = spawn([SSHD, "-D", "-e", "-f", conf], log)
        wait_for(lambda: listening("127.0.0.2", self.port, "tcp"), 15, "sshd", [(self.sshd, log)])
        self.ssh = (f"ssh -p {self.port} -i {user_key} -o IdentitiesOnly=yes -o BatchMode=yes "
                    f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes")
        return "tcp", [self.port]

    def _sync(self, meter, verify):
        client_time, server_time = os.path.join(self.dir, "client.time"), os.path.join(self.dir, "server.time")
        # The receiving rsync, started by sshd, under /usr/bin/time too: B's peak RSS.
        cmd = ["/usr/bin/time", "-v", "-o", client_time, "rsync", "-a", "--delete", "--stats", "-e", self.ssh,
               f"--rsync-path=/usr/bin/time -v -o {server_time} rsync", f"{self.a}/", f"root@127.0.0.2:{self.b}/"]
        meter.start()
        out = run_checked(cmd, self.args.timeout, os.path.join(self.dir, "client.out"))
        self.total_own += sum(int(m.replace(",", "")) for m in
                              re.findall(r"Total bytes (?:sent|received): ([\d,]+)", out))
        meter.stop()
        self.last_peaks = {"A": time_v_maxrss(client_time), "B": time_v_maxrss(server_time)}
        self.last_cpu = sum_or_none(time_v_cpu_file(client_time), time_v_cpu_file(server_time))
        reason = verify()
        if reason:
            raise Failure(f"rsync over ssh finished but {reason}")

    def teardown(self):
        stop(self.sshd)


class UnisonTool(Tool):
    def setup(self):
        self.a, self.b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        for d in (self.a, self.b, os.path.join(self.dir, "home-server"), os.path.join(self.dir, "home-client")):
            os.makedirs(d)
        self.port = free_port("127.0.0.2", "tcp")
        self.server_log = os.path.join(self.dir, "server.log")
        self.server = spawn(["unison", "-socket", str(self.port), "-listen", "127.0.0.2"], self.server_log,
                            env=dict(os.environ, UNISON=os.path.join(self.dir, "home-server")))
        wait_for(lambda: listening("127.0.0.2", self.port, "tcp"), 15, "the unison server",
                 [(self.server, self.server_log)])
        self.last_client = None
        return "tcp", [self.port]

    def _sync(self, meter, verify):
        client_time = os.path.join(self.dir, "client.time")
        cmd = ["/usr/bin/time", "-v", "-o", client_time, "unison", self.a, f"socket://127.0.0.2:{self.port}/{self.b}",
               "-batch", "-auto", "-silent", "-ui", "text", "-confirmbigdel=false"]
        env = dict(os.environ, UNISON=os.path.join(self.dir, "home-client"))
        meter.start()
        run_checked(cmd, self.args.timeout, os.path.join(self.dir, "client.log"), env=env)
        meter.stop()
        self.last_client = time_v_maxrss(client_time)
        self.last_client_cpu = time_v_cpu_file(client_time)
        if self.server.poll() is not None:
            raise Failure(f"unison server exited: {log_tail(self.server_log)}")
        reason = verify()
        if reason:
            raise Failure(f"unison finished but {reason}")

    def initial_sync(self, meter, verify, files):
        self._sync(meter, verify)

    def sync_change(self, meter, verify):
        self._sync(meter, verify)

    def reset_peaks(self):
        reset_peak(self.server.pid)

    def peaks(self):
        return {"A": self.last_client, "B": peak_kib(self.server.pid)}

    def cpu_now(self):
        return cpu_seconds(self.server.pid)

    def cpu_used(self, meter):
        return sum_or_none(meter.cpu(), self.last_client_cpu)

    def teardown(self):
        stop(getattr(self, "server", None))


class SyncthingTool(SyncthingInstances, Tool):
    def setup(self):
        self.a, self.b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        os.makedirs(self.a)
        os.makedirs(self.b)
        self.side = {}
        for side, ip in (("A", "127.0.0.1"), ("B", "127.0.0.2")):
            self.generate(side, ip)
        self.start_all()
        for side, other in (("A", "B"), ("B", "A")):
            self.introduce(side, other, compression="metadata")
        wait_for(lambda: self._connected(), 90, "the two syncthing instances to connect", self._procs(),
                 interval=0.5)
        return "tcp", [s["listen"] for s in self.side.values()]

    def _connected(self):
        try:
            conns = self.api("A", "GET", "/rest/system/connections")["connections"]
            return conns.get(self.side["B"]["id"], {}).get("connected")
        except (OSError, ValueError):
            return False

    def _folder(self, path):
        return {"id": self.FOLDER, "label": self.FOLDER, "path": path, "type": "sendreceive",
                "fsWatcherEnabled": False, "rescanIntervalS": 3600,
                "devices": [{"deviceID": s["id"]} for s in self.side.values()]}

    def _done(self, files=None):
        status_a = self.api("A", "GET", f"/rest/db/status?folder={self.FOLDER}")
        if status_a.get("state") != "idle" or (files is not None and status_a.get("localFiles") != files):
            return False
        completion = self.api("A", "GET", f"/rest/db/completion?folder={self.FOLDER}&device={self.side['B']['id']}")
        if completion.get("completion") != 100 or completion.get("needBytes") or completion.get("needDeletes"):
            return False
        status_b = self.api("B", "GET", f"/rest/db/status?folder={self.FOLDER}")
        return (status_b.get("state") == "idle" and not status_b.get("needTotalItems")
                and status_b.get("globalFiles") == status_b.get("localFiles") == status_a.get("localFiles"))

    def initial_sync(self, meter, verify, files):
        self.api("B", "POST", "/rest/config/folders", self._folder(self.b))
        meter.start()
        self.api("A", "POST", "/rest/config/folders", self._folder(self.a))
        wait_converged(meter, verify, lambda: self._done(files), self.args.timeout, self._procs())

    def sync_change(self, meter, verify):
        meter.start()
        self.api("A", "POST", f"/rest/db/scan?folder={self.FOLDER}", timeout=self.args.timeout)
        wait_converged(meter, verify, self._done, self.args.timeout, self._procs())

    def reset_peaks(self):
        for s in self.side.values():
            reset_peak(s["proc"].pid)

    def peaks(self):
        return {side: peak_kib(s["proc"].pid) for side, s in self.side.items()}

    def cpu_now(self):
        return sum_or_none(*(cpu_seconds(s["proc"].pid) for s in self.side.values()))

    def own_bytes(self):
        try:
            total = self.api("A", "GET", "/rest/system/connections")["total"]
            return total["inBytesTotal"] + total["outBytesTotal"]
        except (OSError, ValueError, KeyError):
            return None


def make_tool(name, work, args):
    if name == "shoal":
        return ShoalTool(name, work, args)
    if name == "rsync-ssh":
        return RsyncSshTool(name, work, args)
    if name in ("rsync", "rsync-fsync"):
        return RsyncTool(name, work, args, fsync=name == "rsync-fsync")
    if name == "unison":
        return UnisonTool(name, work, args)
    if name == "syncthing":
        return SyncthingTool(name, work, args)
    raise ValueError(name)


# --------------------------------------------------------------------------- harness


def run_group(group, scenarios, tools, args, run_dir, wire, results, descriptions):
    source = data_set(group, args.scale, args.data, args.dir)
    files, size = tree_stats(source)
    descriptions[f"initial-{group}"] = f"{files:,} files, {size / MIB:,.1f} MiB"
    descriptions[f"bytes-{group}"] = size
    for name in tools:
        print(f"[{group}] {name} ...", file=sys.stderr, flush=True)
        work = os.path.join(run_dir, f"{name}-{group}")
        round_ = 1
        while os.path.exists(work):  # a later round, with --keep-work
            round_ += 1
            work = os.path.join(run_dir, f"{name}-{group}-{round_}")
        tool = make_tool(name, work, args)
        pending = [s for s in GROUPS[group] if s in scenarios]
        step = "setup"
        try:
            try:
                proto, ports = tool.setup()
                wire.watch(f"{name}-{group}", proto, ports)
                subprocess.run(["cp", "-a", source, os.path.join(tool.a, group)], check=True)
                os.sync()
            except (Failure, OSError, subprocess.CalledProcessError, urllib.error.URLError) as e:
                raise Failure(str(e)) from e
            hasher = Hasher()
            verify = lambda: compare_trees(tool.a, tool.b, hasher)  # noqa: E731
            for scenario in GROUPS[group]:
                if scenario not in scenarios and not scenario.startswith("initial-"):
                    continue
                step = scenario
                meter = Meter(wire, f"{name}-{group}", tool.own_bytes, tool.cpu_now)
                if scenario.startswith("initial-"):
                    tool.reset_peaks()
                    tool.initial_sync(meter, verify, files)
                else:
                    tool.prepare_change()
                    descriptions[scenario] = CHANGES[scenario](tool.a)
                    os.sync()
                    tool.reset_peaks()
                    tool.sync_change(meter, verify)
                if scenario in scenarios:
                    results[scenario].setdefault(name, []).append(
                        {"wall": meter.wall(), "wire": meter.wire_bytes(), "own": meter.own(),
                         "rss": fmt_rss(tool.peaks()), "cpu": tool.cpu_used(meter), "losses": meter.losses()})
                    pending.remove(scenario)
                    print(f"  {scenario}: {meter.wall():.2f} s", file=sys.stderr, flush=True)
        except (Failure, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            reason = str(e) or type(e).__name__
            if not pending or step != pending[0]:
                reason = f"{step}: {reason}"
            print(f"  failed: {reason}", file=sys.stderr, flush=True)
            for i, scenario in enumerate(pending):
                failed = reason if i == 0 else f"not run ({pending[0]} failed)"
                results[scenario].setdefault(name, []).append({"failed": failed})
        finally:
            try:
                tool.teardown()
            finally:
                if not args.keep_work:
                    shutil.rmtree(tool.dir, ignore_errors=True)


def mount_scratch_fs(mountpoint, gib):
    """Makes a new ext4 file system with a journal in a sparse image beside `mountpoint`
    (`gib` GiB; an inode per 4 KiB block, so that a tree of tiny files runs out of
    neither first: two copies of `million` need about 10 GiB; inode tables and journal
    written now rather than by the kernel's lazy init during the run) and mounts it
    there. Returns the image's path."""
    image = mountpoint + ".ext4"
    with open(image, "wb") as f:
        f.truncate(int(gib * GIB))
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        image], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["mount", "-o", "loop", image, mountpoint], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        os.unlink(image)
        sys.exit(f"bench-sync: cannot make the scratch file system ({e}); run without --scratch-fs")
    return image


def unmount_scratch_fs(mountpoint, image, keep):
    """Unmounts the scratch file system (a few tries: the tools' last processes may
    still be closing files) and removes its image, unless it is to be kept."""
    for _ in range(20):
        if subprocess.run(["umount", mountpoint], stderr=subprocess.DEVNULL).returncode == 0:
            break
        time.sleep(0.5)
    else:
        print(f"bench-sync: {mountpoint} is still mounted (image {image})", file=sys.stderr)
        return
    if keep:
        print(f"bench-sync: the run's trees are in {image} (mount -o loop {image} DIR)", file=sys.stderr)
    else:
        os.unlink(image)


def human(n):
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def summary(rows):
    """One tool's runs of one scenario as one row: the run of median wall time (its wire
    bytes, RSS and CPU), with the range of the wall times and the drops of all runs
    added up; a failure only if every run failed."""
    if not rows:
        return None
    ok = sorted((r for r in rows if "failed" not in r), key=lambda r: r["wall"])
    if not ok:
        return rows[0]
    row = dict(ok[(len(ok) - 1) // 2])
    losses = [r.get("losses") or {} for r in ok]
    row["losses"] = {k: sum(loss.get(k, 0) for loss in losses) for k in set().union(*losses)} or None
    row.update(runs=len(ok), wall_min=ok[0]["wall"], wall_max=ok[-1]["wall"])
    return row


def render(results, descriptions, tools, scenarios, header, notes, wire_method):
    lines = header + [""]
    for scenario in scenarios:
        detail = descriptions.get(scenario, "")
        lines += [f"### {scenario}: {SCENARIOS[scenario]}", ""] + ([f"_{detail}_", ""] if detail else [])
        lines += ["| tool | wall s | wire bytes | peak RSS | CPU s, A + B | tool's own byte count "
                  "| UDP buffer drops rcv/snd, TCP retrans, TCP drops |",
                  "|---|---:|---:|---|---:|---:|---|"]
        for name in tools:
            row = summary(results[scenario].get(name))
            if row is None:
                lines.append(f"| {name} | not run | | | | | |")
            elif "failed" in row:
                lines.append(f"| {name} | failed: {row['failed'].replace('|', '/')} | | | | | |")
            else:
                wire = row["wire"]
                if wire is None and row["own"] is not None:
                    wire_text = f"{human(row['own'])}*"
                else:
                    wire_text = f"{human(wire)} ({wire:,})" if wire is not None else "n/a"
                own = human(row["own"]) if row["own"] is not None else "n/a"
                loss = row.get("losses") or {}
                loss_text = (f"{loss.get('udp_rcvbuf', 0):,} / {loss.get('udp_sndbuf', 0):,}, "
                             f"{loss.get('tcp_retrans', 0):,}, {loss.get('tcp_drops', 0):,}") if loss else "n/a"
                cpu = f"{row['cpu']:.2f}" if row.get("cpu") is not None else "n/a"
                wall = f"{row['wall']:.2f}"
                if row["runs"] > 1:
                    wall += f" ({row['wall_min']:.2f}-{row['wall_max']:.2f}, {row['runs']} runs)"
                lines.append(f"| {name} | {wall} | {wire_text} | {row['rss']} | {cpu} | {own} | {loss_text} |")
        lines.append("")
    lines += ["Notes:"] + [f"- {n}" for n in notes]
    if wire_method is None:
        lines.append("- * no firewall counters available: wire bytes are the tools' own counters "
                     "(Shoal: chunk payload only; Unison has none)")
    return "\n".join(lines) + "\n"


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return last_line((out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?")
    except (OSError, subprocess.SubprocessError):
        return "not installed"


def parse_list(values, allowed, what):
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return [a for a in allowed if a in items]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/shoal-bench/sync", help="work directory")
    parser.add_argument("--data", default="/var/tmp/shoal-bench/data", help="full-scale data sets (reused)")
    parser.add_argument("--only", action="append", default=[], help="scenario(s), repeatable or comma list")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the data sets, e.g. 0.05")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--timeout", type=float, help="seconds per tool and scenario (default 120 + 1800 x scale)")
    parser.add_argument("--shoal", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "/var/cache/shoal/target"),
                                                        "release", "shoal"))
    parser.add_argument("--shoal-heartbeat", type=int, default=25,
                        help="shoal serve --heartbeat (default 25, shoal's own; earlier runs used 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every tool this many times, in a rotated order each round, and report "
                             "the median run with the range (default 1; the reference tools move by 2x "
                             "between runs on a shared machine)")
    parser.add_argument("--keep-work", action="store_true", help="keep the run directory (debugging)")
    parser.add_argument("--scratch-fs", type=float, metavar="GIB",
                        help="put the run's trees on a new ext4 file system with a journal, GIB large (a sparse "
                             "image in DIR, loop-mounted for the run): see 'File system' above")
    parser.add_argument("--no-setup", action="store_true", help="do not run tools/setup.sh")
    args = parser.parse_args()
    scenarios = parse_list(args.only, list(SCENARIOS), "scenario") if args.only else list(SCENARIOS)
    tools = parse_list([args.tools], TOOLS, "tool")
    if args.rounds < 1:
        sys.exit("bench-sync: --rounds must be at least 1")
    if args.scratch_fs is not None and args.scratch_fs < 1:
        sys.exit("bench-sync: --scratch-fs must be at least 1 (GiB)")
    if args.timeout is None:
        args.timeout = 120 + 1800 * args.scale
    if os.geteuid() != 0:
        sys.exit("bench-sync: run as root (firewall counters, rsync daemon as root)")
    if not args.no_setup:
        subprocess.run([os.path.join(REPO, "tools", "setup.sh"), "rsync", "unison", "syncthing", "nftables", "time",
                        "openssh-server", "openssh-client"],
                       check=True, stdout=sys.stderr)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    os.makedirs(args.dir, exist_ok=True)
    run_dir = os.path.join(args.dir, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(run_dir)
    wire = WireCounter()
    atexit.register(lambda: (None if args.keep_work else shutil.rmtree(run_dir, ignore_errors=True)))
    if args.scratch_fs:
        image = mount_scratch_fs(run_dir, args.scratch_fs)
        atexit.register(unmount_scratch_fs, run_dir, image, args.keep_work)
    atexit.register(wire.close)
    atexit.register(stop_all)  # atexit runs in reverse: processes first, then table, then dirs

    rate_size = int(GIB * min(1.0, max(args.scale, 0.125)))
    rate = disk_rate(run_dir, rate_size)
    header = [
        f"## Sync benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {os.cpu_count()} cores, {os.uname().release}; data scale {args.scale:g}; loopback, "
        "node A 127.0.0.1 -> node B 127.0.0.2.",
        f"Versions: shoal `{tool_version([args.shoal, '--version'])}`, `{tool_version(['rsync', '--version'])}`, "
        f"`{tool_version(['ssh', '-V'])}`, `{tool_version(['unison', '-version'])}`, "
        f"`{tool_version(['syncthing', '--version'])}`.",
        f"Physical limit: the disk writes+fsyncs {rate:,.0f} MiB/s ({human(rate_size)} written, then fsync).",
    ]
    if args.scratch_fs:
        header.append(f"File system: the run's trees on a new ext4 with a journal ({args.scratch_fs:g} GiB image, "
                      "loop-mounted); the disk rate above is measured there too.")
    if args.rounds > 1:
        header.append(f"Rounds: {args.rounds}, the tools in a rotated order each round; each row is the run "
                      "of median wall time (its wire bytes, RSS and CPU), with the range of the wall times; "
                      "drops are those of all runs added up.")
    results = {s: {} for s in scenarios}
    descriptions = {}
    interrupted = None
    try:
        for round_ in range(args.rounds):
            order = tools[round_ % len(tools):] + tools[:round_ % len(tools)]
            for group, members in GROUPS.items():
                if any(s in scenarios for s in members):
                    run_group(group, scenarios, order, args, run_dir, wire, results, descriptions)
    except (KeyboardInterrupt, SystemExit) as e:  # still report what was measured
        interrupted = e
        header.append("**Interrupted: the tables are incomplete.**")
    for group in GROUPS:
        key = f"initial-{group}"
        if key in descriptions and key in scenarios:
            floor = descriptions[f"bytes-{group}"] / MIB / rate
            descriptions[key] += f"; disk floor {floor:.2f} s"
    wire_note = {
        "nft": "wire bytes: IP packets (headers, handshakes and ACKs included) entering lo with the tool's "
               "ports as source or destination, both directions, from nftables counters",
        "iptables": "wire bytes: IP packets entering lo to/from the tool's ports, from iptables counters",
        None: "wire bytes: no firewall counters (nft and iptables failed)",
    }[wire.method]
    notes = [
        wire_note,
        "wall s: until the tool reported done and B was byte-identical to A (SHA-256 of every file); "
        "Shoal and rsync -a keep mtimes, Unison by default does not (not compared)",
        f"shoal: --heartbeat {args.shoal_heartbeat}; timed from launching both nodes (initial) or from the "
        "change (picked up by the file watcher, announced, and pulled through the change feed); own count = "
        "chunk payload received (no QUIC/protocol overhead)",
        "rsync: push to an rsync daemon, delta transfer; started fresh for each sync (its RSS covers daemon "
        "and forks); no rename detection",
        "rsync-ssh: push over ssh to an sshd started for the run (B's RSS: the receiving rsync, not sshd); "
        "own count = rsync's bytes sent + received (payload inside ssh)",
        "unison: socket mode, one full run per sync (update detection of both replicas); no own byte count",
        "syncthing: both instances running and connected before timing; initial timed from adding the folder "
        "on A, changes from POST /rest/db/scan on A (fs watcher off); own count = TLS payload bytes of A",
        "peak RSS: A = 127.0.0.1 side (source), B = 127.0.0.2 side (receiver)",
        "CPU s: user + system of both sides (Shoal: both nodes, A's first scan included in an initial "
        "sync; rsync: client and daemon with its forks; rsync-ssh: both rsyncs and the ssh client, "
        "not sshd; unison: server and client; syncthing: both instances)",
        "disk floor: size of the data set divided by the disk's write+fsync rate",
        "drops: the kernel's counters for the whole machine during the tool's measurement (other "
        "processes on the machine count too): /proc/net/snmp Udp RcvbufErrors/SndbufErrors, Tcp "
        "RetransSegs, and TCP drops = Tcp InErrs + TcpExt " + " + ".join(TCP_DROPS),
    ]
    report = render(results, descriptions, tools, scenarios, header, notes, wire.method)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if interrupted is not None:
        raise interrupted


if __name__ == "__main__":
    main()
