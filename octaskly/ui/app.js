// octaskly dashboard: one page, no framework, no build step. It is a client of the REST
// API like the `octaskly` command: a bearer token (kept in this tab's sessionStorage) on
// every request, live updates from the server-sent events of GET /api/v1/events, read with
// fetch() because EventSource cannot send an Authorization header. Data reaches the page
// only through textContent, never as HTML.
"use strict";

const TOKEN_KEY = "octaskly.token";
const TERMINAL = new Set(["completed", "failed", "timed_out", "cancelled"]);
const PRIORITIES = ["critical", "high", "normal", "low"];
const LOG_LIMIT = 256 * 1024; // characters of output the tail keeps
const SPARK_POINTS = 120;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  me: null, // GET /api/v1/whoami
  stats: null, // the last `stats` event
  workers: new Map(), // id -> worker view
  spark: [], // finished tasks per second
  lastFinished: null, // {total, at}
  view: null, // {name, cleanup, onTasks, onReload}
};

// -- small helpers ---------------------------------------------------------------------------
const $ = (sel) => document.querySelector(sel);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

function ago(iso) {
  if (!iso) return "–";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)}h ago`;
  return `${Math.round(seconds / 86400)}d ago`;
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)}m ${Math.round((ms % 60000) / 1000)}s`;
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, text: status.replace("_", " ") });
}

function workerName(id) {
  if (!id) return "–";
  const worker = state.workers.get(id);
  return worker ? worker.name : id;
}

class ApiError extends Error {
  constructor(status, message, field, role) {
    super(message);
    this.status = status;
    this.field = field;
    this.role = role;
  }
}

function authHeaders(extra) {
  const headers = { Accept: "application/json", ...(extra || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  return headers;
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(0, `the dispatcher did not answer (${exc.message})`);
  }
  return checked(response);
}

async function checked(response) {
  let data = null;
  try {
    data = await response.json();
  } catch (exc) {
    data = null;
  }
  if (response.ok) {
    if (response.headers.get("X-Octaskly-Role") === "primary") showBanner(null);
    return data;
  }
  const message = (data && data.error) || `${response.status} ${response.statusText}`;
  const error = new ApiError(
    response.status,
    message,
    data && data.field,
    response.headers.get("X-Octaskly-Role"),
  );
  if (response.status === 401 && state.me) logout(`Logged out: ${message}`);
  if (response.status === 503) showBanner(message);
  throw error;
}

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// -- login -----------------------------------------------------------------------------------
async function start() {
  $("#login-form").addEventListener("submit", onLogin);
  $("#logout").addEventListener("click", () => logout(""));
  window.addEventListener("hashchange", route);
  try {
    state.me = await api("GET", "/api/v1/whoami"); // a kept token, or authentication off
    enter();
  } catch (exc) {
    state.me = null;
    if (state.token) showLogin(exc.status === 401 ? "Your session's token was refused; log in again." : exc.message);
    else showLogin("");
  }
}

function showLogin(message) {
  $("#app").hidden = true;
  $("#login").hidden = false;
  const error = $("#login-error");
  error.textContent = message;
  error.hidden = !message;
  $("#token").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const candidate = $("#token").value.trim();
  if (!candidate) return;
  const button = $("#login-button");
  button.disabled = true;
  state.token = candidate;
  try {
    state.me = await api("GET", "/api/v1/whoami");
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $("#token").value = "";
    enter();
  } catch (exc) {
    state.token = "";
    showLogin(exc.status === 401 ? `That token was refused: ${exc.message}` : exc.message);
  } finally {
    button.disabled = false;
  }
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = "";
  state.me = null;
  live.stop();
  leaveView();
  showLogin(message);
}

function enter() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  const me = state.me;
  $("#whoami").textContent = me.token_id ? `${me.subject} (${me.role})` : "authentication is off";
  $("#logout").hidden = !me.token_id;
  $("#cluster-panels").hidden = !me.can.see_cluster;
  $("#client-note").hidden = me.can.see_cluster;
  $("#filter-worker-label").hidden = !me.can.see_cluster;
  live.start();
  route();
}

// -- live events -----------------------------------------------------------------------------
const live = {
  controller: null,
  retry: 1000,

  start() {
    this.stop();
    this.controller = new AbortController();
    this.loop(this.controller.signal);
  },

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
    setLive(false);
  },

  async loop(signal) {
    while (!signal.aborted) {
      try {
        const response = await fetch("/api/v1/events", {
          headers: authHeaders({ Accept: "text/event-stream" }),
          cache: "no-store",
          signal,
        });
        if (!response.ok) await checked(response);
        setLive(true);
        this.retry = 1000;
        await readEvents(response.body, signal, dispatchEvent);
      } catch (exc) {
        if (signal.aborted) return;
        if (exc.status === 401 || exc.status === 403) return;
      }
      setLive(false);
      await sleep(this.retry, signal);
      this.retry = Math.min(this.retry * 2, 10000);
    }
  },
};

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function setLive(on) {
  const node = $("#live");
  node.className = `live ${on ? "on" : "off"}`;
  node.textContent = on ? "live" : "reconnecting…";
}

// The text/event-stream format: blocks separated by a blank line, `event:` and `data:` lines.
async function readEvents(body, signal, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      try {
        onEvent(name, JSON.parse(data.join("\n")));
      } catch (exc) {
        console.error("octaskly: bad event", name, exc);
      }
    }
  }
}

function dispatchEvent(name, data) {
  if (name === "stats") onStats(data);
  else if (name === "tasks" && state.view && state.view.onTasks) state.view.onTasks(data);
  else if (name === "reload" && state.view && state.view.onReload) state.view.onReload();
}

function onStats(stats) {
  if (!stats.tasks) return; // a client's stream: only a heartbeat
  state.stats = stats;
  state.workers = new Map((stats.workers_list || []).map((w) => [w.id, w]));
  const finished = stats.throughput ? stats.throughput.finished_total : null;
  const at = Date.parse(stats.time) || Date.now();
  if (finished !== null && state.lastFinished) {
    const seconds = Math.max(0.2, (at - state.lastFinished.at) / 1000);
    const rate = Math.max(0, finished - state.lastFinished.total) / seconds;
    state.spark.push(rate);
    if (state.spark.length > SPARK_POINTS) state.spark.shift();
  }
  if (finished !== null) state.lastFinished = { total: finished, at };
  const list = $("#worker-ids");
  clear(list).append(...[...state.workers.values()].map((w) => el("option", { value: w.id, text: w.name })));
  if (state.view && state.view.name === "overview") renderCluster();
}

// -- routing ---------------------------------------------------------------------------------
function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query || "") };
}

function leaveView() {
  if (state.view && state.view.cleanup) state.view.cleanup();
  state.view = null;
}

function route() {
  if (!state.me) return;
  leaveView();
  const { parts, params } = parseHash();
  const name = parts[0] || "overview";
  for (const section of document.querySelectorAll(".view")) section.hidden = true;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.nav === (name === "task" ? "tasks" : name));
  }
  if (name === "tasks") showTasks(params);
  else if (name === "task" && parts[1]) showTask(parts[1]);
  else if (name === "submit") showSubmit();
  else showOverview();
}

function debounce(fn, ms) {
  let timer = null;
  const wrapped = () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

// -- overview --------------------------------------------------------------------------------
function showOverview() {
  $("#view-overview").hidden = false;
  const refresh = debounce(loadRecent, 250);
  state.view = { name: "overview", onTasks: refresh, onReload: refresh, cleanup: refresh.cancel };
  loadRecent();
  renderCluster();
}

async function loadRecent() {
  const view = state.view;
  try {
    const page = await api("GET", "/api/v1/tasks?limit=10");
    if (state.view !== view) return;
    const body = clear($("#recent tbody"));
    for (const task of page.tasks) {
      body.append(
        el("tr", { dataset: { id: task.id } },
          el("td", {}, el("a", { href: `#/task/${task.id}`, class: "mono", text: shortId(task.id) })),
          el("td", { class: "cmd", title: task.command, text: task.command }),
          el("td", { class: "status-cell" }, statusBadge(task.status)),
          el("td", { text: task.priority }),
          el("td", { title: task.created_at, text: ago(task.created_at) })),
      );
    }
  } catch (exc) {
    if (exc.status !== 401) showBanner(exc.message);
  }
}

function renderCluster() {
  const stats = state.stats;
  if (!stats || !state.me.can.see_cluster) return;
  for (const [status, count] of Object.entries(stats.tasks)) {
    const node = document.getElementById(`count-${status}`);
    if (node) node.textContent = String(count);
  }
  // queue by priority
  const queue = stats.queue || {};
  const most = Math.max(1, ...PRIORITIES.map((p) => queue[p] || 0));
  clear($("#queue")).append(
    ...PRIORITIES.map((p) => {
      const fill = el("span");
      fill.style.width = `${(100 * (queue[p] || 0)) / most}%`;
      return el("div", { class: "bar-row", dataset: { priority: p } },
        el("span", { text: p }), el("div", { class: "bar" }, fill),
        el("span", { class: "count", text: String(queue[p] || 0) }));
    }),
  );
  // throughput sparkline
  const points = state.spark;
  const top = Math.max(1, ...points);
  const step = 300 / (SPARK_POINTS - 1);
  const offset = (SPARK_POINTS - points.length) * step;
  $("#throughput-line").setAttribute(
    "points",
    points.map((v, i) => `${(offset + i * step).toFixed(1)},${(58 - (56 * v) / top).toFixed(1)}`).join(" "),
  );
  const now = points.length ? points[points.length - 1] : 0;
  $("#throughput-now").textContent = `${now.toFixed(now < 10 ? 1 : 0)} tasks/s`;
  // dispatcher facts
  const ha = stats.ha || {};
  const facts = [
    ["role", `${ha.role || "primary"} (term ${ha.term ?? "–"})`],
    ["replication", ha.replication ? `${ha.replication}${ha.synced ? ", in sync" : ""}, lag ${ha.lag_records} records` : "none"],
    ["degraded", ha.degraded || "no"],
    ["uptime", duration(stats.system.uptime_seconds * 1000)],
    ["memory", `${stats.system.memory_usage_mb} MB`],
    ["database", `${stats.database.total_tasks} tasks, ${stats.database.disk_size_mb} MB`],
  ];
  clear($("#dispatcher-facts")).append(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  // workers with load bars
  const workers = [...state.workers.values()];
  $("#workers-summary").textContent = `${stats.workers.total} connected, ${stats.workers.active} busy`;
  $("#no-workers").hidden = workers.length > 0;
  clear($("#workers tbody")).append(
    ...workers.map((w) => {
      const fill = el("span");
      fill.style.width = `${(100 * w.current_jobs) / Math.max(1, w.max_jobs)}%`;
      const res = w.resources || {};
      return el("tr", { dataset: { worker: w.id } },
        el("td", { title: w.id, text: w.name }),
        el("td", { class: `state-${w.state}`, text: w.state }),
        el("td", {},
          el("div", { class: `bar${w.current_jobs >= w.max_jobs ? " full" : ""}`, title: `${w.current_jobs} of ${w.max_jobs} slots` }, fill),
          el("small", { class: "load", text: `${w.current_jobs}/${w.max_jobs}` })),
        el("td", { text: [res.cpu_cores && `${res.cpu_cores} cores`, res.memory_mb && `${Math.round(res.memory_mb / 1024)} GiB`, res.gpu && "GPU"].filter(Boolean).join(", ") || "–" }),
        el("td", { text: w.sandbox_level }),
        el("td", { class: "mono", text: w.address }),
        el("td", { title: new Date(w.last_heartbeat * 1000).toISOString(), text: `${Math.max(0, Math.round(Date.now() / 1000 - w.last_heartbeat))}s ago` }));
    }),
  );
}

// -- task table ------------------------------------------------------------------------------
function showTasks(params) {
  $("#view-tasks").hidden = false;
  const filter = {
    status: params.get("status") || "",
    worker: params.get("worker") || "",
    limit: [25, 50, 100].includes(Number(params.get("limit"))) ? Number(params.get("limit")) : 25,
    offset: Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0),
  };
  $("#filter-status").value = filter.status;
  $("#filter-worker").value = filter.worker;
  $("#page-size").value = String(filter.limit);
  const refresh = debounce(() => loadTasks(filter), 300);
  const onTasks = (tasks) => {
    let stale = false;
    for (const task of tasks) {
      const row = $(`#task-table tbody tr[data-id="${CSS.escape(task.id)}"]`);
      const matches = (!filter.status || task.status === filter.status) && (!filter.worker || task.worker_id === filter.worker);
      if (row && matches) row.replaceWith(taskRow(task));
      else if (row || matches) stale = true; // left the filter, or a new one on this page
    }
    if (stale) refresh();
  };
  state.view = { name: "tasks", filter, onTasks, onReload: refresh, cleanup: refresh.cancel };
  const form = $("#filters");
  form.onsubmit = (event) => {
    event.preventDefault();
    navigateTasks({ status: $("#filter-status").value, worker: $("#filter-worker").value.trim(), limit: Number($("#page-size").value), offset: 0 });
  };
  $("#filter-status").onchange = form.onsubmit;
  $("#page-size").onchange = form.onsubmit;
  $("#prev").onclick = () => navigateTasks({ ...filter, offset: Math.max(0, filter.offset - filter.limit) });
  $("#next").onclick = () => navigateTasks({ ...filter, offset: filter.offset + filter.limit });
  loadTasks(filter);
}

function navigateTasks(filter) {
  const query = new URLSearchParams();
  if (filter.status) query.set("status", filter.status);
  if (filter.worker) query.set("worker", filter.worker);
  if (filter.limit !== 25) query.set("limit", String(filter.limit));
  if (filter.offset) query.set("offset", String(filter.offset));
  const hash = `#/tasks${query.toString() ? `?${query}` : ""}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function loadTasks(filter) {
  const view = state.view;
  const query = new URLSearchParams({ limit: String(filter.limit), offset: String(filter.offset) });
  if (filter.status) query.set("status", filter.status);
  if (filter.worker) query.set("worker_id", filter.worker);
  try {
    const page = await api("GET", `/api/v1/tasks?${query}`);
    if (state.view !== view) return;
    clear($("#task-table tbody")).append(...page.tasks.map(taskRow));
    $("#no-tasks").hidden = page.tasks.length > 0;
    const first = page.total ? filter.offset + 1 : 0;
    $("#page-info").textContent = `${first}–${filter.offset + page.returned} of ${page.total}`;
    $("#prev").disabled = filter.offset === 0;
    $("#next").disabled = filter.offset + page.returned >= page.total;
  } catch (exc) {
    if (state.view === view && exc.status !== 401) showBanner(exc.message);
  }
}

function taskRow(task) {
  const cancel = TERMINAL.has(task.status)
    ? null
    : el("button", { type: "button", class: "danger small cancel", text: "Cancel", onclick: () => cancelTask(task.id) });
  return el("tr", { dataset: { id: task.id, status: task.status } },
    el("td", {}, el("a", { href: `#/task/${task.id}`, class: "mono", title: task.id, text: shortId(task.id) })),
    el("td", { class: "cmd", title: task.command, text: task.command }),
    el("td", { class: "status-cell" }, statusBadge(task.status)),
    el("td", { text: task.priority }),
    el("td", { title: task.worker_id || "", text: workerName(task.worker_id) }),
    el("td", { class: "num", text: String(task.attempts) }),
    el("td", { class: "num", text: task.exit_code ?? "–" }),
    el("td", { class: "num", text: duration(task.duration_ms) }),
    el("td", { title: task.created_at, text: ago(task.created_at) }),
    el("td", {}, cancel));
}

async function cancelTask(id) {
  if (!window.confirm(`Cancel task ${shortId(id)}? A running task's processes are killed.`)) return false;
  try {
    await api("DELETE", `/api/v1/tasks/${encodeURIComponent(id)}`);
    return true;
  } catch (exc) {
    if (exc.status !== 401) showBanner(`Could not cancel ${shortId(id)}: ${exc.message}`);
    return false;
  }
}

// -- one task --------------------------------------------------------------------------------
function showTask(id) {
  $("#view-task").hidden = false;
  const controller = new AbortController();
  const refresh = debounce(() => loadTask(id, view), 100);
  const view = {
    name: "task",
    onTasks: (tasks) => { if (tasks.some((t) => t.id === id)) refresh(); },
    onReload: refresh,
    cleanup: () => { controller.abort(); refresh.cancel(); },
  };
  state.view = view;
  $("#task-title").textContent = `Task ${shortId(id)}`;
  $("#task-title").title = id;
  $("#task-status").textContent = "";
  $("#task-status").className = "status";
  $("#task-error").hidden = true;
  $("#task-cancel").hidden = true;
  $("#task-cancel").onclick = async () => { if (await cancelTask(id)) refresh(); };
  clear($("#task-command"));
  clear($("#task-fields"));
  clear($("#task-log"));
  $("#log-state").textContent = "";
  loadTask(id, view).then((task) => { if (task) followLog(id, controller.signal); });
}

async function loadTask(id, view) {
  try {
    const task = await api("GET", `/api/v1/tasks/${encodeURIComponent(id)}`);
    if (state.view !== view) return null;
    const status = $("#task-status");
    status.textContent = task.status.replace("_", " ");
    status.className = `status status-${task.status}`;
    status.dataset.status = task.status;
    $("#task-cancel").hidden = TERMINAL.has(task.status);
    $("#task-command").textContent = task.command;
    const error = $("#task-error");
    error.textContent = task.error || "";
    error.hidden = !task.error;
    const fields = [
      ["id", task.id],
      ["priority", task.priority],
      ["worker", workerName(task.worker_id) === task.worker_id || !task.worker_id ? workerName(task.worker_id) : `${workerName(task.worker_id)} (${task.worker_id})`],
      ["attempts", `${task.attempts} (retries allowed: ${task.retry_count})`],
      ["exit code", task.exit_code ?? "–"],
      ["duration", duration(task.duration_ms)],
      ["timeout", `${task.timeout} s`],
      ["created", task.created_at],
      ["started", task.started_at || "–"],
      ["completed", task.completed_at || "–"],
      ["waiting", task.waiting_reason || null],
    ].filter(([, v]) => v !== null);
    clear($("#task-fields")).append(...fields.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { dataset: { field: k }, text: String(v) })]));
    return task;
  } catch (exc) {
    if (state.view !== view) return null;
    const error = $("#task-error");
    error.textContent = exc.status === 404 ? "No such task (or not yours)." : exc.message;
    error.hidden = false;
    return null;
  }
}

async function followLog(id, signal) {
  const log = $("#task-log");
  const logState = $("#log-state");
  let kept = 0;
  const append = (text, cls) => {
    log.append(cls ? el("span", { class: cls, text }) : document.createTextNode(text));
    kept += text.length;
    while (kept > LOG_LIMIT && log.firstChild) {
      kept -= log.firstChild.textContent.length;
      log.removeChild(log.firstChild);
    }
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    if (atBottom) log.scrollTop = log.scrollHeight;
  };
  logState.textContent = "following…";
  try {
    const response = await fetch(`/api/v1/tasks/${encodeURIComponent(id)}/logs?follow=true`, {
      headers: authHeaders({ Accept: "application/x-ndjson" }), cache: "no-store", signal,
    });
    if (!response.ok) await checked(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (!line.trim()) continue;
        const item = JSON.parse(line);
        if (item.stream) append(item.data, item.stream === "stderr" ? "stderr" : null);
        else if (item.event === "attempt" && item.attempt > 1) append(`\n── attempt ${item.attempt} ──\n`, "note");
        else if (item.event === "dropped") append("\n… some output was dropped here …\n", "note");
        else if (item.event === "end") {
          const exit = item.exit_code === null || item.exit_code === undefined ? "" : `, exit ${item.exit_code}`;
          logState.textContent = `ended: ${item.status.replace("_", " ")}${exit}`;
          logState.dataset.ended = item.status;
        }
      }
    }
    if (!log.firstChild) append("(no output)", "note");
  } catch (exc) {
    if (!signal.aborted) logState.textContent = `output unavailable: ${exc.message}`;
  }
}

// -- submit ----------------------------------------------------------------------------------
function showSubmit() {
  $("#view-submit").hidden = false;
  state.view = { name: "submit" };
  const form = $("#submit-form");
  const error = $("#submit-error");
  error.hidden = true;
  $("#sub-command").focus();
  form.onsubmit = async (event) => {
    event.preventDefault();
    error.hidden = true;
    let body;
    try {
      body = submitBody();
    } catch (exc) {
      error.textContent = exc.message;
      error.hidden = false;
      return;
    }
    const button = $("#submit-button");
    button.disabled = true;
    try {
      const task = await api("POST", "/api/v1/tasks", body);
      form.reset();
      location.hash = `#/task/${task.id}`;
    } catch (exc) {
      error.textContent = exc.field ? `${exc.message}` : `Not submitted: ${exc.message}`;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  };
}

function submitBody() {
  const body = { command: $("#sub-command").value, priority: $("#sub-priority").value };
  const number = (sel, key, parse = Number) => {
    const raw = $(sel).value.trim();
    if (raw === "") return;
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new Error(`${key}: not a number`);
    return value;
  };
  const timeout = number("#sub-timeout", "timeout");
  if (timeout !== undefined) body.timeout = timeout;
  const retries = number("#sub-retries", "retry_count");
  if (retries !== undefined) body.retry_count = retries;
  const requirements = {};
  const cpu = number("#sub-cpu", "cpu_cores");
  if (cpu !== undefined) requirements.cpu_cores = cpu;
  const memory = number("#sub-memory", "memory_mb");
  if (memory !== undefined) requirements.memory_mb = memory;
  if (Object.keys(requirements).length) body.requirements = requirements;
  const env = {};
  for (const [index, line] of $("#sub-env").value.split("\n").entries()) {
    if (!line.trim()) continue;
    const eq = line.indexOf("=");
    if (eq <= 0) throw new Error(`environment line ${index + 1}: expected NAME=value`);
    env[line.slice(0, eq).trim()] = line.slice(eq + 1);
  }
  if (Object.keys(env).length) body.env = env;
  return body;
}

document.addEventListener("DOMContentLoaded", start);
