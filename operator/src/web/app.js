// The upload API's web page: no framework, no build step. Every value from
// the server is put in the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["Succeeded", "Failed"]);
const COLOURS = {
  enriched: "#2e7d32", no_match: "#f9a825", failed: "#c62828",
  pending: "#9e9e9e", invalid: "#6a1b9a",
};
// Conditions that report a problem, and the status that means one
// (README: Running in Kubernetes); the others report progress.
const PROBLEM_WHEN = { Failed: "True", QuotaExhausted: "True", RowsFailed: "True", JobsReady: "False" };
let current = null; // {namespace, name, timer, pointsFor, drawn}
// Polling stops on these answers (the import is gone, or the token no longer
// works: a new token or a click on the list starts it again).
const STOP_POLLING = new Set([401, 403, 404]);

function token() { return $("token").value.trim(); }

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

// The message of an error answer: its `error` and `requestId` when the body
// is the API's JSON error, else the status line.
function describe(status, statusText, bodyText) {
  let body = {};
  try { body = JSON.parse(bodyText); } catch (_) { /* not JSON */ }
  let text = body.error ? status + ": " + body.error : status + " " + statusText;
  if (body.requestId) text += " (request id " + body.requestId + ")";
  return text;
}

async function errorText(resp) {
  return describe(resp.status, resp.statusText, await resp.text());
}

// The answer's JSON; an error carries the HTTP status as `status`.
async function getJson(path) {
  const resp = await fetch(path, { headers: authHeaders() });
  if (!resp.ok) {
    const err = new Error(await errorText(resp));
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

function text(id, value) {
  $(id).textContent = value === undefined || value === null ? "–" : String(value);
}

// ---- choosing a file -------------------------------------------------------

let chosen = null;

function choose(file) {
  chosen = file || null;
  $("upload").disabled = !chosen;
  text("file-info", chosen ? chosen.name + ", " + chosen.size.toLocaleString() + " bytes" : "");
  if (chosen && !$("name").value) {
    const base = chosen.name.replace(/\.[^.]*$/, "").toLowerCase()
      .replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40).replace(/-+$/, "");
    $("name").value = base;
  }
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", () => choose($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
}

// ---- uploading -------------------------------------------------------------

function uploadQuery() {
  const q = new URLSearchParams();
  for (const id of ["name", "namespace", "shards", "quotaRps", "latColumn", "lonColumn", "apiUrl"]) {
    const v = $(id).value.trim();
    if (v) q.set(id, v);
  }
  return q.toString();
}

function upload() {
  if (!chosen) return;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/imports?" + uploadQuery());
  xhr.setRequestHeader("Content-Type", "text/csv");
  const t = token();
  if (t) xhr.setRequestHeader("Authorization", "Bearer " + t);
  $("progress").hidden = false;
  $("progress").value = 0;
  $("upload").disabled = true;
  text("upload-error", "");
  text("upload-state", "uploading…");
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) $("progress").value = (100 * e.loaded) / e.total;
  });
  xhr.addEventListener("load", () => {
    $("upload").disabled = false;
    if (xhr.status === 201) {
      const body = JSON.parse(xhr.responseText);
      $("progress").value = 100;
      text("upload-state", "stored: " + body.bytes.toLocaleString() + " bytes, SHA-256 " + body.sha256.slice(0, 12) + "…");
      $("name").value = ""; // the next upload needs a name of its own
      show(body.namespace, body.name);
      refreshList();
    } else {
      text("upload-state", "");
      text("upload-error", describe(xhr.status, xhr.statusText, xhr.responseText));
    }
  });
  xhr.addEventListener("error", () => {
    $("upload").disabled = false;
    text("upload-state", "");
    text("upload-error", "the upload failed: the endpoint could not be reached");
  });
  xhr.send(chosen);
}

// ---- one import --------------------------------------------------------------

function show(namespace, name) {
  if (current && current.timer) clearTimeout(current.timer);
  current = { namespace, name, timer: null, pointsFor: null, drawn: 0 };
  $("import").hidden = false;
  text("import-name", namespace + "/" + name);
  text("phase", "…");
  $("download").hidden = true;
  text("download-state", "");
  text("phase-message", "");
  for (const id of ["rows-total", "rows-enriched", "rows-no-match", "rows-failed", "rows-invalid",
    "rows-pending", "api-requests", "api-retries", "api-share"]) text(id, null);
  $("shards-table").tBodies[0].replaceChildren();
  $("errors").replaceChildren();
  const ctx = $("map").getContext("2d");
  ctx.clearRect(0, 0, $("map").width, $("map").height);
  text("map-legend", "");
  poll();
}

function importPath() {
  return "/v1/imports/" + encodeURIComponent(current.namespace) + "/" + encodeURIComponent(current.name);
}

async function poll() {
  const mine = current;
  let phase = null;
  try {
    const imp = await getJson(importPath());
    if (mine !== current) return;
    phase = render(imp.status || {});
  } catch (e) {
    if (mine !== current) return;
    $("errors").replaceChildren(item(e.message));
    if (STOP_POLLING.has(e.status)) return;
  }
  if (!TERMINAL.has(phase)) mine.timer = setTimeout(poll, 1000);
}

function item(s, cls) {
  const li = document.createElement("li");
  li.textContent = s;
  if (cls) li.className = cls;
  return li;
}

// Shows an import's status; returns its phase.
function render(st) {
  const phase = st.phase || "Pending";
  text("phase", phase);
  text("phase-message", st.message || "");
  text("rows-total", st.rowsTotal);
  text("rows-enriched", st.rowsEnriched);
  text("rows-no-match", st.rowsNoMatch);
  text("rows-failed", st.rowsFailed);
  text("rows-invalid", st.rowsInvalid);
  text("rows-pending", st.rowsPending);
  text("api-requests", st.apiRequests);
  text("api-retries", st.apiRetries);
  text("api-share", st.apiShareRps);
  const rows = (st.shards || []).map((sh) => {
    const tr = document.createElement("tr");
    for (const v of [sh.index, sh.phase, sh.rows, sh.done, sh.retries]) {
      const td = document.createElement("td");
      td.textContent = v === undefined || v === null ? "–" : String(v);
      tr.appendChild(td);
    }
    return tr;
  });
  $("shards-table").tBodies[0].replaceChildren(...rows);
  const problems = [];
  const conditions = st.conditions || [];
  const failedCondition = conditions.some((c) => c.type === "Failed" && c.status === "True");
  if (phase === "Failed" && st.message && !failedCondition) problems.push(item("Failed: " + st.message));
  for (const c of conditions) {
    if (PROBLEM_WHEN[c.type] === c.status) {
      problems.push(item(c.type + ": " + (c.reason || "") + " " + (c.message || "")));
    }
  }
  $("errors").replaceChildren(...problems);
  const loaded = st.rowsTotal !== undefined && st.rowsTotal !== null && phase !== "Loading" && phase !== "Pending";
  $("download").hidden = !loaded;
  if (loaded && current.pointsFor !== phase && (TERMINAL.has(phase) || current.pointsFor === null)) {
    current.pointsFor = phase;
    drawPoints();
  }
  return phase;
}

// Fetches results.csv with the token and saves it (a link cannot send the header).
async function download(e) {
  e.preventDefault();
  const name = current.name;
  const path = importPath() + "/results.csv";
  text("download-state", "downloading…");
  try {
    const resp = await fetch(path, { headers: authHeaders() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const blob = await resp.blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name + ".enriched.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    text("download-state", "saved " + a.download + " (" + blob.size.toLocaleString() + " bytes)");
  } catch (err) {
    text("download-state", "");
    $("errors").replaceChildren(item("download: " + err.message));
  }
}

// ---- the picture -------------------------------------------------------------

// The points on an equirectangular projection fitted to them, with the UK's
// bounding box drawn for reference: swapped columns or (0,0) rows stand apart.
async function drawPoints() {
  const mine = current;
  const seq = ++mine.drawn; // a later draw wins, whichever answer comes first
  const phase = mine.pointsFor;
  let answer;
  try {
    answer = await getJson(importPath() + "/points?max=5000");
  } catch (e) {
    return;
  }
  if (mine !== current || seq !== mine.drawn) return;
  const pts = answer.points;
  const uk = { s: 49.8, n: 60.9, w: -8.7, e: 1.8 };
  let s = uk.s, n = uk.n, w = uk.w, e = uk.e;
  for (const [lat, lon] of pts) {
    s = Math.min(s, lat); n = Math.max(n, lat); w = Math.min(w, lon); e = Math.max(e, lon);
  }
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  const pad = 12;
  const k = Math.cos(((s + n) / 2) * Math.PI / 180) || 1;
  const scale = Math.min((canvas.width - 2 * pad) / (((e - w) * k) || 1), (canvas.height - 2 * pad) / ((n - s) || 1));
  const x = (lon) => pad + (lon - w) * k * scale;
  const y = (lat) => canvas.height - pad - (lat - s) * scale;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#90a4ae";
  ctx.setLineDash([4, 3]);
  ctx.strokeRect(x(uk.w), y(uk.n), (uk.e - uk.w) * k * scale, (uk.n - uk.s) * scale);
  ctx.setLineDash([]);
  const counts = {};
  for (const [lat, lon, status] of pts) {
    counts[status] = (counts[status] || 0) + 1;
    ctx.fillStyle = COLOURS[status] || "#000";
    ctx.fillRect(x(lon) - 1.5, y(lat) - 1.5, 3, 3);
  }
  const legend = Object.keys(COLOURS).filter((st) => counts[st]).map((st) => {
    const span = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLOURS[st];
    span.append(swatch, st + " " + counts[st].toLocaleString());
    return span;
  });
  const note = document.createElement("span");
  note.textContent = pts.length.toLocaleString() + " of " + answer.rowsTotal.toLocaleString() + " rows drawn; dashed: the UK";
  $("map-legend").replaceChildren(...legend, note);
  $("map-legend").dataset.phase = phase; // which look at the import it shows
}

// ---- the list ------------------------------------------------------------------

async function refreshList() {
  try {
    const answer = await getJson("/v1/imports");
    text("list-error", "");
    const rows = answer.imports.map((imp) => {
      const tr = document.createElement("tr");
      for (const v of [imp.namespace, imp.name, imp.phase, imp.rowsTotal, imp.rowsEnriched, imp.created]) {
        const td = document.createElement("td");
        td.textContent = v === undefined || v === null ? "–" : String(v);
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => show(imp.namespace, imp.name));
      return tr;
    });
    $("imports").tBodies[0].replaceChildren(...rows);
  } catch (e) {
    text("list-error", e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("token", token());
    refreshList();
  });
  setUpDrop();
  $("upload").addEventListener("click", upload);
  $("download").addEventListener("click", download);
  $("refresh").addEventListener("click", refreshList);
  refreshList();
  setInterval(() => { if (!document.hidden) refreshList(); }, 10000);
});
