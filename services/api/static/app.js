// imagestream dashboard: plain ES module, no build step, no third-party code.
//
// The API token lives in sessionStorage (this tab) or, if "remember" is ticked,
// localStorage, and travels only in the Authorization header: no cookie, so the
// browser never attaches it by itself and cross-site requests carry nothing.
// Live progress reads the server-sent events with fetch() (EventSource cannot send a
// header); downloads use one-time links so big exports stream straight to disk.

const TOKEN_KEY = "imagestream.token";
const main = document.getElementById("main");
let session = null;
let cleanup = () => {};

// ------------------------------------------------------------------ small helpers
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const fmt = {
  int: (n) => (n ?? 0).toLocaleString("en-US"),
  pct: (p) => `${(p ?? 0).toFixed(p >= 100 || p === 0 ? 0 : 1)}%`,
  usd: (v) => (v === null || v === undefined ? "—" : `$${v < 1 && v > 0 ? v.toFixed(4) : v.toFixed(2)}`),
  rate: (r) => (r ? `${r >= 100 ? Math.round(r) : r.toFixed(1)}/s` : "—"),
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
  },
  dur(s) {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  },
  ago(iso) {
    if (!iso) return "—";
    const s = (Date.now() - new Date(iso).getTime()) / 1000;
    if (s < 45) return "just now";
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(iso).toLocaleDateString(undefined, { month: "short", day: "numeric", year: "numeric" });
  },
  state: (s) => { const t = (s || "").replaceAll("_", " "); return t.charAt(0).toUpperCase() + t.slice(1); },
};
const FINISHED = new Set(["completed", "completed_with_errors", "cancelled", "failed"]);

function toast(message, bad = false) {
  const el = h("div", { class: bad ? "toast bad" : "toast", role: "status", text: message });
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), bad ? 7000 : 3500);
}
// A state pill: ``look`` picks the colour (a batch state, or ok/warn/bad), ``label`` the text.
function badge(look, label) {
  return h("span", { class: `badge ${look}`, text: label || fmt.state(look) });
}
function bar(parts, big = false) {
  return h("div", { class: big ? "bar big" : "bar", role: "progressbar" },
    parts.map(([cls, pct]) => { const s = h("span", { class: cls }); s.style.width = `${Math.max(0, Math.min(100, pct))}%`; return s; }));
}
function batchBar(b) {
  const total = b.counts.total || 0;
  if (!total) return bar([["accent", b.progress]]);
  const c = b.counts;
  return bar([["ok", (100 * c.succeeded) / total], ["bad", (100 * c.failed) / total], ["idle", (100 * (c.skipped + c.cancelled)) / total]]);
}
const isAdmin = () => session && session.role === "admin";

// ------------------------------------------------------------------ API access
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}
function token() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
}
function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}
async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.ok) return response.status === 204 ? null : response.json();
  let error = { code: "error", message: `${response.status} ${response.statusText}` };
  try { error = (await response.json()).error || error; } catch { /* not JSON */ }
  if (response.status === 401) showLogin(error.message);
  throw new ApiError(response.status, error.code, error.message);
}
async function act(label, fn) {
  try {
    const result = await fn();
    if (label) toast(label);
    return result;
  } catch (err) {
    toast(err.message || String(err), true);
    return null;
  }
}
async function download(path) {
  const link = await act(null, () => api("/api/v1/downloads", { method: "POST", body: { path } }));
  if (!link) return;
  const a = h("a", { href: link.url, download: "" });
  document.body.append(a);
  a.click();
  a.remove();
  toast("Download started");
}

// Server-sent events over fetch, so the token goes in a header. Reconnects on its own.
function liveEvents(path, onEvent, onState) {
  const controller = new AbortController();
  let finished = false;
  (async () => {
    while (!controller.signal.aborted && !finished) {
      try {
        const response = await fetch(path, { headers: { ...authHeaders(), Accept: "text/event-stream" }, signal: controller.signal });
        if (response.status === 401) { showLogin(); return; }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        onState("on");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let event = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) event = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
            }
            if (!data.length) continue;
            const payload = JSON.parse(data.join("\n"));
            if (event === "end") finished = true;
            onEvent(event, payload);
          }
        }
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      if (finished) { onState("done"); return; }
      onState("off");
      await new Promise((r) => setTimeout(r, 3000));
    }
  })();
  return () => controller.abort();
}

// ------------------------------------------------------------------ login
function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message && message !== "missing bearer token (Authorization: Bearer <token>)" ? message : "";
  document.getElementById("token").focus();
}
async function checkSession() {
  try {
    session = await api("/api/v1/session");
  } catch {
    session = null;
    return false;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("who").hidden = session.auth_disabled;
  document.getElementById("who-name").textContent = session.name;
  const role = document.getElementById("who-role");
  role.textContent = session.role;
  role.className = `badge ${session.role === "admin" ? "ok" : ""}`;
  return true;
}
document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  const remember = document.getElementById("remember").checked;
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
  if (await checkSession()) {
    document.getElementById("token").value = "";
    route();
  } else {
    document.getElementById("login-error").textContent ||= "That token was not accepted.";
  }
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  session = null;
  document.getElementById("who").hidden = true;
  main.replaceChildren();
  showLogin();
});

// ------------------------------------------------------------------ batches page
function uploadPanel() {
  if (!isAdmin()) {
    return h("div", { class: "panel" }, h("div", { class: "note-box", text: "You are signed in with a viewer token: you can watch and export batches. An admin token creates and controls them." }));
  }
  let file = null;
  const input = h("input", { type: "file", id: "file-input", accept: ".csv,.tsv,.txt,.jsonl,.ndjson,.gz,text/csv,text/plain", "aria-label": "Choose a list of image URLs" });
  const picked = h("span", { class: "picked" });
  const zone = h("label", { class: "dropzone" },
    input,
    h("strong", { text: "Drop a list of image URLs here" }),
    h("span", { text: "CSV with a url column, TXT with one URL per line, or JSONL — gzip welcome. Or click to choose a file." }),
    picked);
  const name = h("input", { id: "batch-name", type: "text", maxlength: "200", placeholder: "Batch name" });
  // The analyzer choice is the server's provider registry (GET /api/v1/system).
  const analyzer = h("select", { id: "analyzer" }, h("option", { value: "local", text: "Local (offline, free)" }));
  let offered = [{ name: "local", paid: false, modes: ["standard"] }];
  api("/api/v1/system").then((s) => {
    if (!s.providers || !s.providers.length) return;
    offered = s.providers;
    analyzer.replaceChildren(...offered.map((p) => h("option", { value: p.name, text: p.title })));
  }).catch(() => {});
  // The local analyzer's profiles, and those every model provider ships (PROFILES_DIR adds more).
  const profileChoices = (name) => (name === "local" ? ["facts", "content"] : ["describe", "moderation"]);
  const profileList = h("datalist", { id: "profiles" }, ...profileChoices("local").map((p) => h("option", { value: p })));
  const profile = h("input", { id: "profile", list: "profiles", placeholder: "facts", title: "local: facts, or content (+ text read by OCR and an NSFW score)" });
  const model = h("input", { id: "model", placeholder: "the profile's", disabled: true });
  const budget = h("input", { id: "budget", type: "number", min: "0.01", step: "0.01", placeholder: "no limit", disabled: true });
  const mode = h("select", { id: "mode", disabled: true, title: "Batch API: half the price, answered within hours" },
    h("option", { value: "standard", text: "Standard (now)" }), h("option", { value: "batch", text: "Batch API (½ price, hours)" }));
  const webhook = h("input", { id: "webhook-url", type: "url", maxlength: "2000", placeholder: "https://… (optional)", title: "POST the batch's events here (completed, failed, paused, cancelled, export completed), signed" });
  const secretBox = h("div");
  const go = h("button", { class: "primary", type: "submit", disabled: true, id: "start-batch" }, "Start batch");
  const progress = h("div", { hidden: true }, bar([["accent", 0]]));
  const modelFields = [
    h("label", { class: "field" }, "Profile", profile),
    h("label", { class: "field", hidden: true }, "Model", model),
    h("label", { class: "field", hidden: true }, "Budget (USD)", budget),
    h("label", { class: "field", hidden: true }, "Mode", mode),
  ];
  const chosen = () => offered.find((p) => p.name === analyzer.value) || { paid: false, modes: ["standard"] };
  analyzer.addEventListener("change", () => {
    const paid = chosen().paid;
    for (const el of [model, budget]) el.disabled = !paid;
    const choices = profileChoices(analyzer.value);
    profileList.replaceChildren(...choices.map((p) => h("option", { value: p })));
    profile.placeholder = choices[0];
    if (profile.value && !choices.includes(profile.value)) profile.value = "";
    mode.disabled = !chosen().modes.includes("batch");
    modelFields.forEach((el, i) => { if (i > 0) el.hidden = i < 3 ? !paid : mode.disabled; });
  });
  const choose = (f) => {
    file = f;
    picked.textContent = f ? `${f.name} · ${fmt.bytes(f.size)}` : "";
    if (f && !name.value) name.value = f.name.replace(/\.(csv|tsv|txt|jsonl|ndjson)(\.gz)?$/i, "");
    go.disabled = !f;
  };
  input.addEventListener("change", () => choose(input.files[0] || null));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
  const form = h("form", { class: "upload-form" },
    h("div", { class: "form-row" },
      h("label", { class: "field wide" }, "Name", name),
      h("label", { class: "field" }, "Analyzer", analyzer),
      modelFields,
      h("label", { class: "field wide" }, "Webhook URL", webhook)),
    profileList,
    h("div", { class: "actions" }, go, progress));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!file) return;
    const data = new FormData();
    data.append("file", file, file.name);
    data.append("batch_name", name.value.trim() || file.name);
    data.append("analyzer", analyzer.value);
    if (webhook.value.trim()) data.append("webhook_url", webhook.value.trim());
    if (profile.value.trim()) data.append("profile", profile.value.trim());
    if (chosen().paid) {
      if (model.value.trim()) data.append("model", model.value.trim());
      if (budget.value) data.append("budget_usd", budget.value);
      if (!mode.disabled && mode.value === "batch") data.append("mode", "batch");
    }
    // XMLHttpRequest: the one browser API that reports upload progress.
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/batches");
    xhr.setRequestHeader("Authorization", authHeaders().Authorization || "");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) progress.querySelector("span").style.width = `${(100 * e.loaded) / e.total}%`;
    });
    xhr.addEventListener("load", () => {
      go.disabled = false;
      progress.hidden = true;
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { /* empty */ }
      if (xhr.status === 201 && body.webhook_secret) {
        // A secret generated for the batch's webhooks is in this reply only: show it here.
        toast(`Batch “${body.name}” created`);
        const copy = h("button", { class: "small", type: "button", onclick: async () => { await navigator.clipboard.writeText(body.webhook_secret); toast("Copied"); } }, "Copy");
        secretBox.replaceChildren(h("div", { class: "secret" },
          h("strong", { text: "Webhook secret, shown once:" }), h("code", { id: "webhook-secret", text: body.webhook_secret }), copy,
          h("a", { href: `#/batches/${body.id}`, text: "Open the batch" })));
      } else if (xhr.status === 201) {
        toast(`Batch “${body.name}” created`);
        location.hash = `#/batches/${body.id}`;
      } else {
        if (xhr.status === 401) showLogin();
        toast(body.error ? body.error.message : `Upload failed (HTTP ${xhr.status})`, true);
      }
    });
    xhr.addEventListener("error", () => { go.disabled = false; progress.hidden = true; toast("Upload failed: the server did not answer", true); });
    go.disabled = true;
    progress.hidden = false;
    xhr.send(data);
  });
  return h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "New batch" })), zone, form, secretBox);
}

function renderBatches() {
  const state = { offset: 0, limit: 20, q: "", filter: "" };
  const rows = h("tbody");
  const pager = h("div", { class: "pager" });
  const search = h("input", { type: "search", placeholder: "Search by name", "aria-label": "Search batches" });
  const filter = h("select", { "aria-label": "Filter by state" },
    h("option", { value: "", text: "All states" }),
    h("option", { value: "queued,running,paused,cancelling", text: "Active" }),
    ...["running", "paused", "completed", "completed_with_errors", "cancelled", "failed"].map((s) => h("option", { value: s, text: fmt.state(s) })));
  const table = h("table", {},
    h("thead", {}, h("tr", {},
      h("th", { text: "Batch" }), h("th", { class: "hide-narrow", text: "State" }), h("th", { text: "Progress" }),
      h("th", { class: "num hide-narrow", text: "Images" }), h("th", { class: "num hide-narrow", text: "Failed" }),
      h("th", { class: "num hide-narrow", text: "Cost" }), h("th", { class: "hide-narrow", text: "Created" }))),
    rows);
  async function load() {
    const query = new URLSearchParams({ limit: state.limit, offset: state.offset });
    if (state.q) query.set("q", state.q);
    if (state.filter) query.set("state", state.filter);
    let page;
    try { page = await api(`/api/v1/batches?${query}`); } catch { return; }
    rows.replaceChildren(...(page.batches.length ? page.batches.map((b) => {
      const open = () => { location.hash = `#/batches/${b.id}`; };
      return h("tr", { class: "clickable", onclick: open, dataset: { id: b.id } },
        h("td", {}, h("a", { class: "batch-name", href: `#/batches/${b.id}`, text: b.name }),
          h("div", { class: "sub" }, h("span", { class: "show-narrow" }, badge(b.state), " "), `${b.analyzer}${b.profile ? " · " + b.profile : ""}`)),
        h("td", { class: "hide-narrow" }, badge(b.state)),
        h("td", {}, h("div", { class: "cell-progress" }, batchBar(b), h("span", { text: fmt.pct(b.progress) }))),
        h("td", { class: "num hide-narrow", text: b.counts.total ? `${fmt.int(b.counts.total - b.counts.remaining)} / ${fmt.int(b.counts.total)}` : "—" }),
        h("td", { class: "num hide-narrow", text: fmt.int(b.counts.failed) }),
        h("td", { class: "num hide-narrow", text: fmt.usd(b.cost_usd) }),
        h("td", { class: "hide-narrow muted", text: fmt.ago(b.created_at) }));
    }) : [h("tr", {}, h("td", { colspan: "7", class: "empty", text: state.q || state.filter ? "No batch matches." : "No batches yet: drop a list above to start one." }))]));
    const last = Math.min(page.total, state.offset + page.batches.length);
    pager.replaceChildren(
      h("span", { text: page.total ? `${state.offset + 1}–${last} of ${fmt.int(page.total)}` : "" }),
      h("div", { class: "actions" },
        h("button", { class: "small", disabled: state.offset === 0, onclick: () => { state.offset = Math.max(0, state.offset - state.limit); load(); } }, "Previous"),
        h("button", { class: "small", disabled: last >= page.total, onclick: () => { state.offset += state.limit; load(); } }, "Next")));
  }
  let typing;
  search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => { state.q = search.value.trim(); state.offset = 0; load(); }, 250); });
  filter.addEventListener("change", () => { state.filter = filter.value; state.offset = 0; load(); });
  main.replaceChildren(
    h("div", { class: "page-head" }, h("div", { class: "grow" }, h("h1", { text: "Batches" }), h("div", { class: "sub", text: "Lists of image URLs, fetched, analyzed and stored: one result per image." }))),
    uploadPanel(),
    h("section", { class: "panel" },
      h("div", { class: "panel-head" }, h("h2", { text: "All batches" }), h("div", { class: "toolbar" }, search, filter)),
      h("div", { class: "table-wrap" }, table), pager));
  load();
  const timer = setInterval(() => { if (!document.hidden) load(); }, 3000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ one batch
function tile(label, id, cls = "") {
  return h("div", { class: `tile ${cls}` }, h("div", { class: "label", text: label }), h("div", { class: "value", id, text: "—" }), h("div", { class: "note", id: `${id}-note` }));
}
function setText(id, text) {
  const el = document.getElementById(id);
  if (el && el.textContent !== text) el.textContent = text;
}

function renderBatch(id) {
  const base = `/api/v1/batches/${id}`;
  let current = null;
  const live = h("span", { class: "live", text: "connecting" });
  const title = h("h1", { text: "Batch" });
  const stateBadge = h("span");
  const subtitle = h("div", { class: "sub" });
  const buttons = {
    pause: h("button", { onclick: () => control("pause", "Paused") }, "Pause"),
    resume: h("button", { class: "primary", onclick: () => control("resume", "Resumed") }, "Resume"),
    cancel: h("button", { class: "danger", onclick: () => confirm("Cancel this batch? Images not yet processed will be skipped.") && control("cancel", "Cancelling") }, "Cancel"),
    remove: h("button", { class: "danger", onclick: removeBatch }, "Delete"),
  };
  const exportPath = (fmtName, extra = "") => `${base}/results?format=${fmtName}${extra}`;
  const menu = h("details", { class: "menu" },
    h("summary", { class: "button primary", id: "export-menu" }, "Export"),
    h("div", { class: "menu-items" },
      h("button", { onclick: () => download(exportPath("xlsx")), dataset: { format: "xlsx" } }, "Excel (.xlsx)"),
      h("button", { onclick: () => download(exportPath("csv")), dataset: { format: "csv" } }, "CSV"),
      h("button", { onclick: () => download(exportPath("json")), dataset: { format: "json" } }, "JSON"),
      h("button", { onclick: () => download(exportPath("jsonl")), dataset: { format: "jsonl" } }, "JSON Lines"),
      h("hr"),
      h("button", { onclick: () => download(exportPath("xlsx", "&state=failed")) }, "Failed images only (.xlsx)"),
      h("button", { onclick: () => download(exportPath("csv", "&state=succeeded")) }, "Succeeded images only (CSV)"),
      h("button", { onclick: () => download(exportPath("csv", "&duplicates=first")) }, "One image per near-duplicate group (CSV)"),
      h("button", { onclick: () => download(`${base}/rejects?format=csv`) }, "Invalid input rows (CSV)")));
  menu.addEventListener("click", (e) => { if (e.target.tagName === "BUTTON") menu.open = false; });

  const pct = h("span", { class: "pct", id: "pct", text: "0%" });
  const of = h("span", { class: "of", id: "of" });
  const bigBar = h("div", { id: "big-bar" }, bar([["ok", 0]], true));
  const stages = h("div", { class: "stages" });
  const errorsBody = h("tbody");
  const errorsPanel = h("section", { class: "panel" },
    h("div", { class: "panel-head" }, h("h2", { text: "Errors by class" }),
      isAdmin() ? h("button", { class: "small", id: "replay-all", onclick: () => replay({}) }, "Replay all failures") : null),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { text: "Error class" }), h("th", { class: "num", text: "Images" }), h("th", {}))), errorsBody)));
  const rejectsPanel = h("section", { class: "panel", hidden: true });
  const webhooksPanel = h("section", { class: "panel", hidden: true, id: "webhooks" });
  const duplicatesPanel = h("section", { class: "panel", id: "duplicates-panel", hidden: true });

  async function control(action, label) {
    const result = await act(label, () => api(`${base}/${action}`, { method: "POST" }));
    if (result) update({ ...current, state: result.state });
  }
  async function replay(body) {
    const result = await act(null, () => api(`${base}/replay`, { method: "POST", body }));
    if (result) {
      toast(result.replayed ? `${fmt.int(result.replayed)} image(s) sent through again` : "Nothing to replay");
      restartLive();
    }
  }
  async function removeBatch() {
    if (!confirm("Delete this batch with all its results? This cannot be undone.")) return;
    if (await act("Batch deleted", () => api(base, { method: "DELETE" }))) location.hash = "#/";
  }

  function update(s) {
    current = s;
    title.textContent = s.name;
    document.title = `${s.name} · imagestream`;
    stateBadge.replaceChildren(badge(s.state));
    subtitle.textContent = [s.source_name, s.analyzer + (s.profile ? ` · ${s.profile}` : "") + (s.model ? ` · ${s.model}` : "") + (s.mode === "batch" ? " · Batch API (½ price)" : ""), `created ${fmt.ago(s.created_at)}`].filter(Boolean).join(" · ")
      + (s.state_reason ? ` — ${s.state_reason}` : "");
    const c = s.counts;
    const done = c.total - c.remaining;
    pct.textContent = fmt.pct(s.progress);
    of.textContent = c.total ? `${fmt.int(done)} of ${fmt.int(c.total)} images` : s.ingested ? "no valid URL in the list" : "reading the list…";
    bigBar.replaceChildren(c.total ? bar([["ok", (100 * c.succeeded) / c.total], ["bad", (100 * c.failed) / c.total], ["idle", (100 * (c.skipped + c.cancelled)) / c.total]], true) : bar([["accent", s.progress]], true));
    setText("t-succeeded", fmt.int(c.succeeded));
    setText("t-failed", fmt.int(c.failed));
    document.getElementById("t-failed").parentElement.classList.toggle("bad", c.failed > 0);
    setText("t-remaining", fmt.int(c.remaining));
    setText("t-remaining-note", c.skipped || c.cancelled ? `${fmt.int(c.skipped)} skipped · ${fmt.int(c.cancelled)} cancelled` : "");
    setText("t-rate", s.rate_per_s !== undefined ? (s.rate_per_s ? `${fmt.rate(s.rate_per_s)}` : "—") : "—");
    setText("t-rate-note", s.rate_per_s ? "images, last minute" : "");
    setText("t-eta", FINISHED.has(s.state) ? "done" : s.state === "paused" ? "paused" : fmt.dur(s.eta_s));
    setText("t-eta-note", s.elapsed_s ? `${fmt.dur(s.elapsed_s)} elapsed` : "");
    setText("t-cost", fmt.usd(s.cost_usd));
    setText("t-cost-note", s.budget_usd ? `of ${fmt.usd(s.budget_usd)} budget` : `${fmt.int(s.tokens.input + s.tokens.output)} tokens`);
    setText("t-dups", fmt.int(c.duplicates));
    setText("t-invalid", fmt.int(c.invalid));
    const admin = isAdmin();
    buttons.pause.hidden = !admin || !["queued", "running"].includes(s.state);
    buttons.resume.hidden = !admin || s.state !== "paused";
    buttons.cancel.hidden = !admin || !["queued", "running", "paused"].includes(s.state);
    buttons.remove.hidden = !admin || !FINISHED.has(s.state);
    const errors = Object.entries(s.errors || {});
    errorsPanel.hidden = errors.length === 0;
    errorsBody.replaceChildren(...errors.map(([cls, n]) => h("tr", {},
      h("td", {}, h("code", { text: cls })),
      h("td", { class: "num", text: fmt.int(n) }),
      h("td", { class: "num" }, admin ? h("button", { class: "small", dataset: { replay: cls }, onclick: () => replay({ error_class: cls }) }, "Replay") : null))));
    if (c.invalid && rejectsPanel.hidden) loadRejects();
    // Groups grow while the batch runs: looked at again every 10 s, and once it ends.
    if (c.succeeded && Date.now() - lastDuplicates > 10000) loadDuplicates();
  }
  // Where this batch's unfinished images are: waiting in the ledger (ingest dispatches
  // them), or held by a stage.
  const STAGE_STATE = { ingest: "pending", fetcher: "fetching", analyzer: "analyzing", writer: "writing" };
  function thisBatch(stage) {
    const n = current && current.stages ? current.stages[STAGE_STATE[stage]] : undefined;
    return n === undefined ? "—" : fmt.int(n);
  }
  function updateStages(p) {
    if (!p || !p.ok) {
      stages.replaceChildren(h("div", { class: "note-box", text: `Pipeline state unavailable${p && p.error ? `: ${p.error}` : ""}` }));
      return;
    }
    stages.replaceChildren(...p.stages.map((st) => h("div", { class: "stage", dataset: { stage: st.stage } },
      h("h3", {}, h("span", { class: "stage-name", text: st.stage }), badge(st.services ? "ok" : "bad", `${st.services} up`)),
      h("dl", {},
        h("dt", { text: "This batch" }), h("dd", { text: thisBatch(st.stage) }),
        h("dt", { text: "Throughput" }), h("dd", { text: st.throughput_per_s === null ? "—" : fmt.rate(st.throughput_per_s) }),
        h("dt", { text: "Waiting (lag)" }), h("dd", { text: fmt.int(st.lag) }),
        h("dt", { text: "In progress" }), h("dd", { text: fmt.int(st.pending) }),
        h("dt", { text: "Oldest wait" }), h("dd", { text: st.lag ? fmt.dur(st.oldest_waiting_age_s) : "—" })))));
  }
  async function loadRejects() {
    let page;
    try { page = await api(`${base}/rejects?limit=20`); } catch { return; }
    if (!page.rejects.length) return;
    rejectsPanel.hidden = false;
    rejectsPanel.replaceChildren(
      h("div", { class: "panel-head" }, h("h2", { text: `Invalid input rows (${fmt.int(page.total)})` }),
        h("button", { class: "small", onclick: () => download(`${base}/rejects?format=csv`) }, "Download CSV")),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { class: "num", text: "Line" }), h("th", { text: "Reason" }), h("th", { class: "hide-narrow", text: "Row" }))),
        h("tbody", {}, page.rejects.map((r) => h("tr", {}, h("td", { class: "num", text: r.line }), h("td", { text: r.reason }), h("td", { class: "url hide-narrow", text: r.raw })))))));
  }

  let webhooksTimer = null;
  async function loadWebhooks() {
    let page;
    try { page = await api(`${base}/webhooks`); } catch { return; }
    clearTimeout(webhooksTimer);  // events go out after the batch ends: follow them until sent
    if (page.events.some((e) => e.state === "pending")) webhooksTimer = setTimeout(loadWebhooks, 3000);
    if (!page.webhook_url && !page.events.length) return;
    const last = (e) => {
      const d = e.deliveries[e.deliveries.length - 1];
      return d ? (d.status ? `HTTP ${d.status}` : d.error) : "not tried yet";
    };
    webhooksPanel.hidden = false;
    webhooksPanel.replaceChildren(
      h("div", { class: "panel-head" }, h("h2", { text: "Webhooks" }), h("span", { class: "muted clip", text: page.webhook_url || "" })),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { text: "Event" }), h("th", { text: "State" }), h("th", { class: "num", text: "Attempts" }), h("th", { class: "hide-narrow", text: "Last answer" }), h("th", {}))),
        h("tbody", {}, page.events.length ? page.events.map((e) => h("tr", {},
          h("td", { text: e.type }),
          h("td", {}, badge(e.state === "delivered" ? "ok" : e.state === "failed" ? "bad" : "queued", e.state)),
          h("td", { class: "num", text: e.attempts }),
          h("td", { class: "hide-narrow", text: last(e) }),
          h("td", {}, isAdmin() ? h("button", { class: "small", onclick: async () => {
            if (await act("Sent again", () => api(`${base}/webhooks/${e.id}/redeliver`, { method: "POST" }))) loadWebhooks();
          } }, "Redeliver") : null))) : [h("tr", {}, h("td", { colspan: "5", class: "empty", text: "No event yet: one is sent when the batch completes, fails, pauses or is cancelled." }))]))));
  }

  // Near-duplicate groups: the first ones, each with its first members (links: the
  // Content-Security-Policy keeps images from other sites off this page).
  let lastDuplicates = 0;
  async function loadDuplicates() {
    lastDuplicates = Date.now();
    let page;
    try { page = await api(`${base}/duplicates?limit=20&members=6`); } catch { return; }
    if (!page.groups) { duplicatesPanel.hidden = true; return; }
    duplicatesPanel.hidden = false;
    const link = (m) => h("a", { href: m.url, target: "_blank", rel: "noopener noreferrer", title: m.url, text: m.url });
    const row = (g) => {
      const copies = g.members.slice(1).flatMap((m, i) => (i ? [" ", link(m)] : [link(m)]));
      if (g.size > g.members.length) copies.push(` … ${fmt.int(g.size - g.members.length)} more`);
      return h("tr", { dataset: { group: g.group } },
        h("td", { class: "url" }, link(g.members[0])),
        h("td", { class: "num", text: fmt.int(g.size) }),
        h("td", { class: "url hide-narrow" }, ...copies));
    };
    duplicatesPanel.replaceChildren(
      h("div", { class: "panel-head" },
        h("h2", { text: `Near-duplicate groups (${fmt.int(page.groups)} groups, ${fmt.int(page.items)} images)` }),
        h("button", { class: "small", onclick: () => download(exportPath("csv", "&duplicates=first")) }, "One image per group (CSV)")),
      h("p", { class: "muted", text: `Perceptual hashes at most ${page.max_distance} bits apart, or the same file.` + (page.pending ? ` ${fmt.int(page.pending)} newest images not grouped yet.` : "") }),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { text: "First image" }), h("th", { class: "num", text: "Images" }), h("th", { class: "hide-narrow", text: "Copies" }))),
        h("tbody", {}, page.duplicate_groups.map(row)))));
  }

  // Items browser.
  const itemState = { filter: "", after: 0 };
  const itemsBody = h("tbody");
  const more = h("button", { class: "small", hidden: true, onclick: () => loadItems(false) }, "Load more");
  const tabs = h("div", { class: "tabs" }, [["", "All"], ["failed", "Failed"], ["succeeded", "Succeeded"], ["pending,fetching,analyzing,writing", "In progress"]].map(([value, label]) =>
    h("button", { class: value === "" ? "on" : "", dataset: { filter: value }, onclick: (e) => {
      itemState.filter = value;
      for (const b of tabs.children) b.classList.toggle("on", b === e.currentTarget);
      loadItems(true);
    } }, label)));
  async function loadItems(reset) {
    if (reset) itemState.after = 0;
    const query = new URLSearchParams({ limit: 25, after: itemState.after });
    if (itemState.filter) query.set("state", itemState.filter);
    let page;
    try { page = await api(`${base}/items?${query}`); } catch { return; }
    const rows = page.items.map((it) => {
      const row = h("tr", { class: "clickable" },
        h("td", { class: "num hide-narrow muted", text: it.line }),
        h("td", { class: "url", title: it.url }, h("bdi", { text: it.url })),
        h("td", {}, badge(it.state === "succeeded" ? "ok" : it.state === "failed" ? "bad" : "queued", fmt.state(it.state))),
        h("td", { class: "hide-narrow", text: it.state === "succeeded" ? `${it.width}×${it.height} ${it.format}` : it.error_class || fmt.state(it.state) }));
      row.addEventListener("click", () => toggleItem(row, it.id));
      return row;
    });
    if (reset) itemsBody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "4", class: "empty", text: "No images here." }))]));
    else itemsBody.append(...rows);
    itemState.after = page.next_after || itemState.after;
    more.hidden = page.next_after === null;
  }
  async function toggleItem(row, itemId) {
    if (row.nextSibling && row.nextSibling.classList.contains("detail")) { row.nextSibling.remove(); return; }
    let it;
    try { it = await api(`${base}/items/${itemId}`); } catch { return; }
    const facts = [["URL", h("a", { href: it.url, target: "_blank", rel: "noopener noreferrer", text: it.url })], ["State", fmt.state(it.state)], ["Attempts", it.attempts]];
    if (it.error_class) facts.push(["Error", `${it.error_class} (${it.error_stage || "?"}): ${it.error_message || ""}`]);
    if (it.metadata) for (const [k, v] of Object.entries(it.metadata)) facts.push([k, String(v)]);
    if (it.result) {
      const r = it.result;
      facts.push(["Image", `${r.width}×${r.height} ${r.format}, ${fmt.bytes(r.bytes)}`], ["SHA-256", h("code", { text: r.sha256 })]);
      for (const [k, v] of Object.entries(r.analysis || {})) facts.push([k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
      if (r.cost_usd) facts.push(["Cost", `${fmt.usd(r.cost_usd)} (${r.tokens.input} in / ${r.tokens.output} out)`]);
    }
    for (const f of it.history) facts.push([`Failed ${fmt.ago(f.at)}`, `${f.error_class} at ${f.stage}: ${f.message || ""}`]);
    row.after(h("tr", { class: "detail" }, h("td", { colspan: "4" }, h("dl", { class: "kv" }, facts.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)])))));
  }

  main.replaceChildren(
    h("div", { class: "page-head" },
      h("div", { class: "grow" }, h("a", { class: "crumb", href: "#/", text: "← All batches" }),
        h("div", { class: "actions" }, title, stateBadge, live), subtitle),
      h("div", { class: "actions" }, buttons.pause, buttons.resume, buttons.cancel, buttons.remove, menu)),
    h("section", { class: "panel" },
      h("div", { class: "progress-line" }, pct, of),
      bigBar,
      h("div", { class: "legend" }, h("span", {}, h("i", { class: "ok" }), "succeeded"), h("span", {}, h("i", { class: "bad" }), "failed"), h("span", {}, h("i", { class: "idle" }), "skipped / cancelled")),
      h("div", { class: "tiles" },
        tile("Succeeded", "t-succeeded", "ok"), tile("Failed", "t-failed"), tile("Remaining", "t-remaining"), tile("Rate", "t-rate"),
        tile("ETA", "t-eta"), tile("Cost so far", "t-cost"), tile("Duplicates dropped", "t-dups"), tile("Invalid rows", "t-invalid"))),
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "Pipeline" }), h("span", { class: "muted", text: "all running batches share it" })), stages),
    errorsPanel,
    rejectsPanel,
    webhooksPanel,
    duplicatesPanel,
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "Images" }), tabs),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "num hide-narrow", text: "Line" }), h("th", { text: "URL" }), h("th", { text: "State" }), h("th", { class: "hide-narrow", text: "Details" }))), itemsBody)),
      h("div", { class: "pager" }, h("span"), more)));
  errorsPanel.hidden = true;

  let stop = () => {};
  let lastItemsRefresh = 0;
  function restartLive() {
    stop();
    stop = liveEvents(`${base}/events`, (event, data) => {
      if (event === "status") {
        update(data);
        if (Date.now() - lastItemsRefresh > 5000 && !itemState.after) { lastItemsRefresh = Date.now(); loadItems(true); }
      } else if (event === "pipeline") updateStages(data);
      else if (event === "end") { loadItems(true); loadWebhooks(); loadDuplicates(); }
    }, (state) => {
      live.className = `live ${state === "on" ? "on" : state === "off" ? "off" : ""}`;
      live.textContent = state === "on" ? "live" : state === "off" ? "reconnecting…" : "finished";
    });
  }
  api(base).then((b) => { if (!current) update(b); }).catch((err) => {
    main.replaceChildren(h("div", { class: "panel" }, h("h2", { text: "Batch not found" }), h("p", { class: "muted", text: err.message }), h("a", { href: "#/", text: "← All batches" })));
    stop();
  });
  restartLive();
  loadItems(true);
  loadWebhooks();
  return () => { stop(); clearTimeout(webhooksTimer); };
}

// ------------------------------------------------------------------ system page
function renderSystem() {
  const body = h("div", { class: "stack" });
  main.replaceChildren(h("div", { class: "page-head" }, h("div", { class: "grow" }, h("h1", { text: "System status" }), h("div", { class: "sub", text: "Services, streams and servers, refreshed every few seconds." }))), body);
  async function load() {
    let s;
    try { s = await api("/api/v1/system"); } catch { return; }
    const health = (name, check, lines) => h("section", { class: "panel" },
      h("div", { class: "panel-head" }, h("h2", {}, h("span", { class: check.ok ? "dot" : "dot bad" }), name), badge(check.ok ? "ok" : "bad", check.ok ? "healthy" : "down")),
      h("dl", { class: "kv" }, lines.filter(([, v]) => v !== undefined && v !== null).map(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })])));
    const p = s.pipeline;
    const ledger = s.ledger || { batches_by_state: {}, active_items: {} };
    body.replaceChildren(
      h("div", { class: "grid three" },
        health("Redis", s.redis, [["Version", s.redis.version], ["Round trip", s.redis.latency_ms !== undefined ? `${s.redis.latency_ms} ms` : undefined], ["Memory", fmt.bytes(s.redis.used_memory_bytes)], ["Up", s.redis.uptime_s ? fmt.dur(s.redis.uptime_s) : undefined], ["Error", s.redis.error]]),
        health("PostgreSQL", s.postgres, [["Version", s.postgres.version], ["Round trip", s.postgres.latency_ms !== undefined ? `${s.postgres.latency_ms} ms` : undefined], ["Database", fmt.bytes(s.postgres.database_bytes)], ["Error", s.postgres.error]]),
        h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "Batches" })),
          h("dl", { class: "kv" }, Object.entries(ledger.batches_by_state).map(([k, v]) => [h("dt", { text: fmt.state(k) }), h("dd", { text: fmt.int(v) })]),
            h("dt", { text: "Dead stream" }), h("dd", {}, h("a", { href: "#/admin", text: `${fmt.int(p.dead_entries)} entries` }))))),
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "Stages" })),
        p.ok ? h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Stage", "Services", "In flight", "Throughput", "Waiting", "Held", "Oldest wait"].map((t, i) => h("th", { class: i ? "num" : "", text: t })))),
          h("tbody", {}, p.stages.map((st) => h("tr", {},
            h("td", { text: st.stage }), h("td", { class: "num", text: st.services }), h("td", { class: "num", text: `${st.inflight} / ${st.capacity}` }),
            h("td", { class: "num", text: st.throughput_per_s === null ? "—" : fmt.rate(st.throughput_per_s) }),
            h("td", { class: "num", text: fmt.int(st.lag) }), h("td", { class: "num", text: fmt.int(st.pending) }),
            h("td", { class: "num", text: st.lag ? fmt.dur(st.oldest_waiting_age_s) : "—" })))))) : h("div", { class: "note-box", text: p.error || "unavailable" })),
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: `Services alive (${p.ok ? p.services.length : 0})` })),
        p.ok && p.services.length ? h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", { text: "Stage" }), h("th", { text: "Consumer" }), h("th", { class: "num", text: "In flight" }), h("th", { class: "num", text: "Up" }), h("th", { class: "num", text: "Heartbeat" }))),
          h("tbody", {}, p.services.map((sv) => h("tr", {}, h("td", { text: sv.stage }), h("td", { class: "url", text: sv.consumer }), h("td", { class: "num", text: `${sv.inflight} / ${sv.capacity}` }), h("td", { class: "num", text: fmt.dur(sv.up_s) }), h("td", { class: "num", text: `${sv.seen_s_ago}s ago` }))))))
          : h("div", { class: "note-box", text: "No stage service has reported a heartbeat in the last 15 seconds." })));
  }
  load();
  const timer = setInterval(() => { if (!document.hidden) load(); }, 3000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ admin page
function renderAdmin() {
  main.replaceChildren(h("div", { class: "page-head" }, h("div", { class: "grow" }, h("h1", { text: "Admin" }), h("div", { class: "sub", text: "API tokens, providers' API keys and the dead stream." }))));
  if (!isAdmin()) {
    main.append(h("div", { class: "panel" }, h("div", { class: "note-box", text: "This page needs an admin token." })));
    return () => {};
  }
  const tokensBody = h("tbody");
  const secretBox = h("div");
  const tokenName = h("input", { id: "token-name", placeholder: "Name, e.g. reporting script", maxlength: "100" });
  const tokenRole = h("select", { id: "token-role" }, h("option", { value: "viewer", text: "viewer (read, export)" }), h("option", { value: "admin", text: "admin (everything)" }));
  const createForm = h("form", { class: "toolbar spaced" }, tokenName, tokenRole, h("button", { class: "primary", type: "submit" }, "Create token"));
  createForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!tokenName.value.trim()) { tokenName.focus(); return; }
    const created = await act(null, () => api("/api/v1/tokens", { method: "POST", body: { name: tokenName.value.trim(), role: tokenRole.value } }));
    if (!created) return;
    tokenName.value = "";
    const copy = h("button", { class: "small", onclick: async () => { await navigator.clipboard.writeText(created.token); toast("Copied"); } }, "Copy");
    secretBox.replaceChildren(h("div", { class: "secret" }, h("strong", { text: "Shown once:" }), h("code", { id: "new-token", text: created.token }), copy));
    loadTokens();
  });
  async function loadTokens() {
    let list;
    try { list = await api("/api/v1/tokens"); } catch { return; }
    tokensBody.replaceChildren(...list.tokens.map((t) => h("tr", {},
      h("td", { class: "num hide-narrow muted", text: t.id }), h("td", { class: "clip", title: t.name, text: t.name }), h("td", {}, badge(t.role === "admin" ? "ok" : "queued", t.role)),
      h("td", { class: "hide-narrow muted", text: fmt.ago(t.last_used_at) }),
      h("td", { class: "num" }, t.revoked_at ? h("span", { class: "muted", text: "revoked" })
        : h("button", { class: "small danger", onclick: async () => {
          if (t.id === session.id && !confirm("This is the token you are signed in with. Revoke it anyway?")) return;
          if (await act("Token revoked", () => api(`/api/v1/tokens/${t.id}`, { method: "DELETE" }))) loadTokens();
        } }, "Revoke")))));
  }
  const keysBox = h("div");
  async function loadKeys() {
    let s;
    try { s = await api("/api/v1/system"); } catch { return; }
    keysBox.replaceChildren(...(s.providers || []).filter((p) => p.keyed).map(providerKeys));
  }
  function providerKeys(g) {
    const quota = (q) => (q && q.limit ? h("div", { class: "cell-progress" }, bar([[q.used / q.limit > 0.9 ? "bad" : "accent", (100 * q.used) / q.limit]]), h("span", { text: `${Math.round((100 * q.used) / q.limit)}%` })) : "—");
    return h("div", {}, h("h3", { text: g.title }),
      g.keys.length ? h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { text: "Key" }), h("th", { text: "Project" }), h("th", { text: "State" }), h("th", { text: "RPM" }), h("th", { class: "hide-narrow", text: "TPM" }), h("th", { class: "hide-narrow", text: "Today (RPD)" }))),
        h("tbody", {}, g.keys.map((k) => h("tr", {}, h("td", {}, h("code", { text: k.key })), h("td", { text: k.project || "—" }), h("td", {}, badge(k.state === "ok" ? "ok" : k.state === "quarantined" ? "bad" : "warn", fmt.state(k.state || "unknown"))), h("td", {}, quota(k.rpm)), h("td", { class: "hide-narrow" }, quota(k.tpm)), h("td", { class: "hide-narrow" }, quota(k.rpd)))))))
        : h("div", { class: "note-box", text: `No ${g.title} key reported by the analyzers. Set ${g.name.toUpperCase()}_API_KEYS on them to analyze with ${g.title}.` }),
      g.quarantined.length ? h("div", {}, h("h3", { class: "sub", text: "Quarantined keys (rejected by the provider)" }),
        h("ul", {}, g.quarantined.map((q) => h("li", {}, h("code", { text: q.key }), ` — ${q.reason}${q.until ? ` (until ${new Date(q.until * 1000).toLocaleString()})` : ""}`)))) : null);
  }
  const deadBody = h("tbody");
  const deadHead = h("h2", { text: "Dead stream" });
  const replayAll = h("button", { class: "small", hidden: true, onclick: () => confirm("Replay every dead entry?") && deadAction("replay", [], true) }, "Replay all");
  const deadMore = h("button", { class: "small", hidden: true }, "Load more");
  let deadAfter = null;
  async function loadDead(reset) {
    if (reset) deadAfter = null;
    const query = new URLSearchParams({ limit: 25 });
    if (deadAfter) query.set("after", deadAfter);
    let page;
    try { page = await api(`/api/v1/dead?${query}`); } catch { return; }
    deadHead.textContent = `Dead stream (${fmt.int(page.total)})`;
    replayAll.hidden = page.total === 0;
    const rows = page.entries.map((e) => h("tr", {},
      h("td", { class: "hide-narrow muted", text: fmt.ago(e.at) }),
      h("td", { text: e.stage || "?" }),
      h("td", {}, e.reason, e.message && e.message.url ? h("div", { class: "url sub", text: e.message.url }) : null),
      h("td", { class: "hide-narrow" }, e.message ? h("a", { href: `#/batches/${e.message.batch_id}`, text: "batch" }) : "—"),
      h("td", { class: "num" }, h("div", { class: "actions" },
        h("button", { class: "small", onclick: () => deadAction("replay", [e.id]) }, "Replay"),
        h("button", { class: "small danger", onclick: () => deadAction("discard", [e.id]) }, "Discard")))));
    if (reset) deadBody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "5", class: "empty", text: "Nothing here: no entry has exhausted its deliveries." }))]));
    else deadBody.append(...rows);
    deadAfter = page.next_after;
    deadMore.hidden = !page.next_after;
  }
  deadMore.addEventListener("click", () => loadDead(false));
  async function deadAction(action, ids, all = false) {
    const body = all ? { all: true } : { ids };
    const result = await act(null, () => api(`/api/v1/dead/${action}`, { method: "POST", body }));
    if (!result) return;
    if (action === "replay") toast(`Replayed ${result.replayed}, dropped ${result.dropped}${result.skipped.length ? `, kept ${result.skipped.length}: ${result.skipped[0].reason}` : ""}`);
    else toast(`Discarded ${result.discarded}`);
    loadDead(true);
  }
  main.append(
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "API tokens" })), createForm, secretBox,
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "num hide-narrow", text: "#" }), h("th", { text: "Name" }), h("th", { text: "Role" }), h("th", { class: "hide-narrow", text: "Last used" }), h("th"))), tokensBody))),
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", { text: "API keys" })), keysBox),
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, deadHead, replayAll),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "hide-narrow", text: "When" }), h("th", { text: "Stage" }), h("th", { text: "Reason" }), h("th", { class: "hide-narrow" }), h("th"))), deadBody)),
      h("div", { class: "pager" }, h("span"), deadMore)));
  loadTokens();
  loadKeys();
  loadDead(true);
  const timer = setInterval(() => { if (!document.hidden) loadKeys(); }, 5000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ router
function route() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash || "#/";
  const batch = hash.match(/^#\/batches\/([0-9a-fA-F-]{36})/);
  const page = batch ? "batches" : hash.startsWith("#/system") ? "system" : hash.startsWith("#/admin") ? "admin" : "batches";
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === page);
  document.title = "imagestream";
  if (!session) return;
  window.scrollTo(0, 0);
  if (batch) cleanup = renderBatch(batch[1]);
  else if (page === "system") cleanup = renderSystem();
  else if (page === "admin") cleanup = renderAdmin();
  else cleanup = renderBatches();
}
window.addEventListener("hashchange", route);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") for (const m of document.querySelectorAll("details.menu[open]")) m.open = false;
});
document.addEventListener("click", (e) => {
  for (const m of document.querySelectorAll("details.menu[open]")) if (!m.contains(e.target)) m.open = false;
});

(async () => {
  if (await checkSession()) route();
  else showLogin();
})();
