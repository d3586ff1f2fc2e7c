// Shoal's status page: reads /status every REFRESH_MS and renders it. Every value from
// the node (paths, names, errors: some come from peers) is set as text, never as HTML.
"use strict";

const REFRESH_MS = 2000;

// h("td", {class: "num"}, "text", otherNode...): an element with attributes and children.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null && value !== false) el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function badge(colour, text, attrs) {
  return h("span", Object.assign({ class: "badge " + colour }, attrs || {}), text);
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function count(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  seconds = Math.round(seconds);
  if (seconds < 60) return seconds + " s";
  const parts = [];
  const d = Math.floor(seconds / 86400), hr = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) parts.push(d + "d");
  if (hr) parts.push(hr + "h");
  if (m && !d) parts.push(m + "m");
  if (s && !d && !hr) parts.push(s + "s");
  return parts.join(" ");
}

function ago(rfc3339) {
  if (!rfc3339) return "never";
  const seconds = (Date.now() - Date.parse(rfc3339)) / 1000;
  if (!isFinite(seconds)) return rfc3339;
  if (seconds < 5) return "just now";
  return duration(seconds) + " ago";
}

function rate(bytesPerSecond) {
  return bytesPerSecond ? bytes(bytesPerSecond) + "/s" : "none";
}

function shortId(id) {
  return id ? id.slice(0, 12) : "";
}

function fill(table, rows, columns, emptyText) {
  const body = document.querySelector("#" + table + " tbody");
  body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { class: "empty", colspan: columns }, emptyText))]));
}

// One peer volume's state: [colour, text, data-state].
function peerVolumeState(v) {
  if (v.last_error) return ["red", v.volume + ": failing (" + v.last_error.count + "×)", "failing"];
  switch (v.state) {
    case "in_sync": return ["green", v.volume + ": in sync", "in_sync"];
    case "paused": return ["amber", v.volume + ": paused there", "paused"];
    case "behind": return ["amber", v.volume + ": behind " + count(v.pending_entries) + " entries, " + bytes(v.pending_bytes)
      + (v.lag_seconds ? " (" + duration(v.lag_seconds) + ")" : ""), "behind"];
    default: return ["grey", v.volume + ": not compared yet", "unknown"];
  }
}

function ownVolumeState(v) {
  if (v.paused) return ["amber", "paused", "paused"];
  if (v.deletes_held) return ["amber", "delete held", "delete_held"];
  if (v.disk_full) return ["red", "disk full", "disk_full"];
  if (v.scan) return ["blue", "scanning", "scanning"];
  return ["green", "syncing", "syncing"];
}

function renderHeader(s) {
  document.getElementById("node-name").textContent = s.name || "this node";
  document.getElementById("node-id").textContent = s.node_id;
  const health = document.getElementById("health");
  health.className = "badge " + (s.health.ready ? "green" : "red");
  health.textContent = s.health.ready ? "ready" : "degraded";
  const causes = document.getElementById("causes");
  causes.hidden = s.health.ready;
  causes.replaceChildren(h("strong", {}, "Degraded"),
    h("ul", {}, s.health.causes.map(c => h("li", { "data-cause": c.kind }, c.message))));
  document.title = (s.health.ready ? "" : "⚠ ") + "Shoal · " + (s.name || s.node_id);
}

function renderSummary(s) {
  const connected = s.peers.filter(p => p.connected).length;
  const paused = s.volumes.filter(v => v.paused).length;
  const files = s.volumes.reduce((a, v) => a + v.files, 0);
  const size = s.volumes.reduce((a, v) => a + v.bytes, 0);
  const conflicts = s.volumes.reduce((a, v) => a + v.conflict_copies, 0);
  const card = (label, value, colour) => h("div", { class: "card" },
    h("div", { class: "label" }, label), h("div", { class: "value " + (colour || "") }, value));
  document.getElementById("summary").replaceChildren(
    card("Peers connected", connected + " / " + s.peers.length, connected === s.peers.length ? "green" : "red"),
    card("Volumes", s.volumes.length + (paused ? " (" + paused + " paused)" : ""), paused ? "amber" : ""),
    card("Files", count(files)),
    card("Data", bytes(size)),
    card("Conflict copies", count(conflicts), conflicts ? "amber" : "green"),
    card("Bandwidth limit", rate(s.max_rate)),
  );
}

function renderNodes(s) {
  const self = h("tr", { class: "me", "data-node": s.name || s.node_id, "data-role": "self", "data-state": "self" },
    h("td", {}, h("strong", {}, s.name || "this node"), h("span", { class: "sub mono" }, shortId(s.node_id))),
    h("td", { class: "dim" }, "this node"),
    h("td", {}, badge(s.health.ready ? "green" : "red", s.health.ready ? "this node · ready" : "this node · degraded")),
    h("td", {}, h("div", { class: "vols" }, s.volumes.map(v => {
      const [colour, text, state] = ownVolumeState(v);
      return badge(colour, v.name + ": " + text, { "data-volume": v.name, "data-state": state });
    }))),
    h("td", { class: "num" }, rate(s.max_rate)),
    h("td", { class: "num" }, bytes(s.totals.chunk_bytes_sent)),
    h("td", { class: "num" }, bytes(s.totals.chunk_bytes_received)),
    h("td", { class: "dim" }, s.state_dir_full ? "state directory full" : "—"));
  const peers = s.peers.map(p => {
    const state = p.connected ? "connected" : "unreachable";
    const error = p.last_error ? p.last_error.message
      : (p.volumes.find(v => v.last_error) || {}).last_error?.message;
    return h("tr", { "data-node": p.name || p.addr, "data-role": "peer", "data-state": state },
      h("td", {}, h("strong", {}, p.name || "unknown"), h("span", { class: "sub mono" }, shortId(p.node_id) || "identity not proven yet")),
      h("td", { class: "mono" }, p.addr),
      h("td", {}, badge(p.connected ? "green" : "red", state), h("span", { class: "sub" }, "since " + ago(p.since))),
      h("td", {}, h("div", { class: "vols" }, p.volumes.length ? p.volumes.map(v => {
        const [colour, text, vstate] = peerVolumeState(v);
        return badge(colour, text, { "data-volume": v.volume, "data-state": vstate });
      }) : h("span", { class: "dim" }, "no shared volume yet"))),
      h("td", { class: "num" }, rate(p.max_rate)),
      h("td", { class: "num" }, bytes(p.chunk_bytes_sent)),
      h("td", { class: "num" }, bytes(p.chunk_bytes_received)),
      h("td", { class: error ? "" : "dim" }, error || "—"));
  });
  fill("nodes", [self, ...peers], 8, "");
}

function renderVolumes(s) {
  fill("volumes", s.volumes.map(v => {
    const [colour, text, state] = ownVolumeState(v);
    return h("tr", { "data-volume": v.name, "data-paused": String(v.paused), "data-state": state },
      h("td", {}, h("strong", {}, v.name)),
      h("td", {}, badge(colour, text), v.scan ? h("span", { class: "sub" }, bytes(v.scan.bytes_read) + " read") : null),
      h("td", { class: "num" }, count(v.files)),
      h("td", { class: "num" }, bytes(v.bytes)),
      h("td", { class: "num" }, v.conflict_copies ? badge("amber", count(v.conflict_copies)) : "0"),
      h("td", { class: "num", "data-versions": v.versions_held ? String(v.versions_held.versions) : "" },
        v.versions_held ? count(v.versions_held.versions) : h("span", { class: "dim" }, "—"),
        v.versions_held ? h("span", { class: "sub" }, bytes(v.versions_held.bytes)) : null),
      h("td", { class: "mono dim", title: v.root || "" }, v.root ? v.root.slice(0, 16) + "…" : "not scanned yet"));
  }), 7, "no volumes");
}

function renderProgress(s) {
  const rows = [];
  for (const p of s.peers) {
    for (const v of p.volumes) {
      const r = v.round;
      if (!r) continue;
      const total = r.bytes_done + r.pending_bytes;
      const pct = total ? Math.min(100, 100 * r.bytes_done / total) : 0;
      rows.push(h("div", { class: "progress-row", "data-volume": v.volume, "data-peer": p.name || p.addr },
        h("div", { class: "progress-head" },
          h("span", {}, h("strong", {}, v.volume), " from " + (p.name || p.addr)),
          h("span", { class: "dim" }, bytes(r.bytes_done) + " of " + bytes(total) + " · "
            + count(r.pending_entries) + " entries to go · " + rate(r.bytes_per_second)
            + " · ETA " + duration(r.eta_seconds))),
        h("div", { class: "bar" }, h("span", { style: "width:" + pct.toFixed(1) + "%" }))));
    }
  }
  for (const v of s.volumes) {
    if (!v.scan) continue;
    rows.push(h("div", { class: "progress-row", "data-volume": v.name },
      h("div", { class: "progress-head" },
        h("span", {}, h("strong", {}, v.name), " scanning"),
        h("span", { class: "dim" }, bytes(v.scan.bytes_read) + " read since " + ago(v.scan.started)))));
  }
  document.getElementById("progress-panel").hidden = rows.length === 0;
  document.getElementById("progress").replaceChildren(...rows);
}

function version(v) {
  if (!v) return h("span", { class: "dim" }, "deleted since");
  const who = v.node_name || (v.node ? shortId(v.node) : "unknown node");
  return [h("span", {}, (v.kind === "file" ? bytes(v.size) : v.kind) + " · " + who),
    h("span", { class: "sub" }, "modified " + v.modified)];
}

function renderConflicts(s) {
  const rows = [];
  for (const vol of s.volumes) {
    for (const c of vol.conflicts || []) {
      rows.push(h("tr", { "data-path": c.volume + "/" + c.path },
        h("td", {}, h("span", { class: "path" }, c.volume + "/" + c.path)),
        h("td", {}, h("span", { class: "path" }, c.original)),
        h("td", {}, version(c.copy)),
        h("td", {}, version(c.current))));
    }
    const more = vol.conflict_copies - (vol.conflicts || []).length;
    if (more > 0) {
      rows.push(h("tr", {}, h("td", { class: "empty", colspan: 4 },
        more + " more in " + vol.name + ": shoal conflicts " + vol.name)));
    }
  }
  fill("conflicts", rows, 4, "no conflict copies");
}

function renderChanges(s) {
  const names = new Map(s.peers.map(p => [p.addr, p.name || p.addr]));
  fill("changes", (s.recent_changes || []).map(c => h("tr", {},
    h("td", { class: "dim", title: c.time }, ago(c.time)),
    h("td", {}, c.volume),
    h("td", {}, h("span", { class: "path" }, c.path)),
    h("td", {}, badge(c.what === "deleted" ? "red" : "blue", c.what)),
    h("td", { class: "num" }, c.bytes ? bytes(c.bytes) : "—"),
    h("td", {}, names.get(c.peer) || c.peer))), 6, "nothing applied from peers since the node started");
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const answer = await fetch("/status", { cache: "no-store" });
    if (!answer.ok) throw new Error("/status answered " + answer.status);
    const s = await answer.json();
    renderHeader(s);
    renderSummary(s);
    renderNodes(s);
    renderVolumes(s);
    renderProgress(s);
    renderConflicts(s);
    renderChanges(s);
    error.hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
    document.body.dataset.loaded = "true";
  } catch (e) {
    error.hidden = false;
    error.textContent = "Cannot read /status: " + e.message + " (is the daemon running?)";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
