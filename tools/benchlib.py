"""What the benchmark scripts in tools/ share: the data sets, the shoal binary, running
and stopping processes, ports, polling, HTTP, memory counters, and Syncthing instances.

The scripts import it as `benchlib` (Python puts the script's own directory, tools/, on
the import path).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Failure(Exception):
    """A tool could not complete a step; the message goes into its row."""


# --------------------------------------------------------------------------- data and binary


def ensure_data(path, profile, scale=1):
    """The data set `profile` of tools/gen-data.py (at `scale`) in `path`: generated there
    unless it holds files already (data sets are deterministic, so they are kept)."""
    if not os.path.isdir(path) or not os.listdir(path):
        print(f"generating {profile} (scale {scale:g}) into {path}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "gen-data.py"), profile, path,
                        "--scale", f"{scale:g}"], check=True, stdout=sys.stderr)
    return path


def build_shoal():
    """Builds the release binary (in CARGO_TARGET_DIR, default /var/cache/shoal/target)."""
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", "/var/cache/shoal/target")
    run(["cargo", "build", "--release", "--quiet"], cwd=REPO, env=env)
    return os.path.join(env["CARGO_TARGET_DIR"], "release", "shoal")


def warm(path):
    """Reads every file under `path`, so the page cache holds it."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def count_files(path):
    return sum(len(files) for _, _, files in os.walk(path))


# --------------------------------------------------------------------------- processes

LIVE = {}  # pid -> Popen, every process started by spawn() and not reaped yet


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def timed(cmd, **kw):
    """Seconds `cmd` takes, its output discarded."""
    start = time.perf_counter()
    run(cmd, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def timed_cpu(cmd):
    """Wall seconds and CPU seconds (user + sys of the command and its threads)."""
    before = os.times()
    wall = timed(cmd)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def spawn(cmd, log_path, env=None):
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()
    LIVE[proc.pid] = proc
    return proc


def stop(proc, timeout=30):
    """SIGTERM, then SIGKILL after `timeout` seconds; only this one PID."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    LIVE.pop(proc.pid, None)


def stop_all():
    for proc in list(LIVE.values()):
        try:
            stop(proc, timeout=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def run_checked(cmd, timeout, log_path=None, env=None):
    """Runs a one-shot command; raises Failure with the tail of its output if it fails."""
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"{os.path.basename(cmd[0])} timed out after {timeout:.0f} s") from None
    text = out.stdout.decode(errors="replace")
    if log_path:
        with open(log_path, "a") as f:
            f.write(text)
    if out.returncode != 0:
        raise Failure(f"{' '.join(cmd[:3])} exited {out.returncode}: {last_line(text)}")
    return text


def last_line(text):
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def log_tail(path):
    try:
        with open(path, errors="replace") as f:
            return last_line(f.read()[-4000:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- network and polling


def free_port(ip="127.0.0.1", kind="tcp"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def listening(ip, port, kind):
    """Whether a socket is bound to ip:port (from /proc/net, without connecting to it)."""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    try:
        with open(f"/proc/net/{kind}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1] in (want, f"00000000:{port:04X}") and (kind == "udp" or fields[3] == "0A"):
                    return True
    except OSError:
        pass
    return False


def wait_for(predicate, timeout, what, procs=(), interval=0.1):
    """Polls `predicate` until it returns true; fails after `timeout` s or if a process dies."""
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in procs:
            if proc.poll() is not None:
                raise Failure(f"process exited ({proc.returncode}) while waiting for {what}: {log_tail(log)}")
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_json(url, method="GET", body=None, headers=None, timeout=5):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = resp.read()
    return json.loads(data) if data.strip() else None


# --------------------------------------------------------------------------- memory


def reset_peak(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU seconds a running process (all its threads) has used so far, or
    None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command name (which may hold spaces), from field 3 on.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_v_cpu(time_v_output):
    """User + system CPU seconds in the output of /usr/bin/time -v (the process and the
    children it waited for), or None."""
    user = re.search(r"User time \(seconds\): ([\d.]+)", time_v_output)
    system = re.search(r"System time \(seconds\): ([\d.]+)", time_v_output)
    return float(user.group(1)) + float(system.group(1)) if user and system else None


def maxrss_kib(time_v_output):
    """Maximum RSS (KiB) in the output of /usr/bin/time -v, or None."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_v_output)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- Syncthing

# Options every benchmarked Syncthing gets: no discovery, relays, NAT, usage reports,
# browser, crash reports or upgrades.
SYNCTHING_QUIET = {
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
    "natEnabled": "false", "urAccepted": "-1", "startBrowser": "false", "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0",
}


def configure_syncthing(path, gui_port, api_key, options, listen=None):
    """Rewrites a generated config.xml: no folders, the GUI/API on 127.0.0.1:`gui_port`
    with `api_key`, `options` set, and the one listen address `listen` if given."""
    tree = ET.parse(path)
    root = tree.getroot()
    for folder in root.findall("folder"):
        root.remove(folder)
    gui = root.find("gui")
    gui.find("address").text = f"127.0.0.1:{gui_port}"
    (gui.find("apikey") if gui.find("apikey") is not None else ET.SubElement(gui, "apikey")).text = api_key
    element = root.find("options")
    if listen is not None:
        for old in element.findall("listenAddress"):
            element.remove(old)
        ET.SubElement(element, "listenAddress").text = listen
    for key, value in options.items():
        (element.find(key) if element.find(key) is not None else ET.SubElement(element, key)).text = value
    tree.write(path)


class SyncthingInstances:
    """Syncthing instances driven through their REST API. A user sets `self.dir`, and
    `self.side`: side name -> {"home", "gui", "listen", "ip", "id", "proc", "log"}."""

    FOLDER = "bench"
    key = "shoal-bench-key"

    # A bench that compares sync speed must not have Syncthing deprioritize itself or
    # wait long between connection attempts.
    OPTIONS = {**SYNCTHING_QUIET, "stunKeepaliveStartS": "0", "setLowPriority": "false",
               "reconnectionIntervalS": "2"}

    def generate(self, side, ip):
        """Creates the home of instance `side`, listening on `ip`."""
        home = os.path.join(self.dir, f"home-{side}")
        out = run_checked(["syncthing", "generate", f"--home={home}", "--no-default-folder"], timeout=120)
        device = re.search(r"Device ID: ([A-Z0-9-]+)", out)
        gui, listen = free_port("127.0.0.1", "tcp"), free_port(ip, "tcp")
        configure_syncthing(os.path.join(home, "config.xml"), gui, self.key, self.OPTIONS, f"tcp://{ip}:{listen}")
        self.side[side] = {"home": home, "gui": gui, "listen": listen, "ip": ip,
                           "id": device.group(1) if device else self._device_id(home)}

    def start_all(self):
        """Starts every generated instance and waits for each to answer."""
        # STMONITORED: run Syncthing itself, without the monitor process in front of it
        env = dict(os.environ, STNODEFAULTFOLDER="1", STNOUPGRADE="1", STMONITORED="1", HOME=self.dir)
        for side, s in self.side.items():
            s["log"] = os.path.join(self.dir, f"syncthing-{side}.log")
            s["proc"] = spawn(["syncthing", "serve", f"--home={s['home']}", "--no-browser", "--no-restart"],
                              s["log"], env=env)
        for side in self.side:
            wait_for(lambda side=side: self._ping(side), 60, f"syncthing {side} to start", self._procs())

    def introduce(self, side, other, **settings):
        """Tells instance `side` of instance `other`."""
        o = self.side[other]
        self.api(side, "POST", "/rest/config/devices", {
            "deviceID": o["id"], "name": other, "addresses": [f"tcp://{o['ip']}:{o['listen']}"],
            "introducer": False, "autoAcceptFolders": False, **settings})

    @staticmethod
    def _device_id(home):
        return ET.parse(os.path.join(home, "config.xml")).getroot().find("device").get("id")

    def api(self, side, method, url, body=None, timeout=10):
        return http_json(f"http://127.0.0.1:{self.side[side]['gui']}{url}", method, body,
                         {"X-API-Key": self.key}, timeout=timeout)

    def _ping(self, side):
        try:
            return self.api(side, "GET", "/rest/system/ping")
        except OSError:
            return None

    def _procs(self):
        return [(s["proc"], s["log"]) for s in self.side.values() if "proc" in s]

    def teardown(self):
        for s in getattr(self, "side", {}).values():
            stop(s.get("proc"))


def shoal_nodes_agree(http_ports):
    """Whether the shoal nodes whose /status answers on these 127.0.0.1 ports all hold the
    same root for their first volume and are connected to every peer."""
    try:
        statuses = [http_json(f"http://127.0.0.1:{port}/status", timeout=2) for port in http_ports]
    except (OSError, ValueError):
        return False
    roots = {st["volumes"][0]["root"] for st in statuses}
    return len(roots) == 1 and None not in roots and all(
        p["connected"] for st in statuses for p in st["peers"])
