// aioqueue's dashboard. Plain JS, no library, no build step: what is here is what runs.
//
// Live with no polling: one websocket, subscribed to `jobs:*` (every job's events) and `queues`
// (the report of GET /v1/queues, pushed every 2 s). The job list comes from GET /v1/jobs once
// subscribed, and again after every reconnect: events that arrive while it loads are applied
// after it, so none is lost and none goes back in time. Records are written into the page as
// text (textContent), never as HTML: a job's args are whatever its submitter sent.
"use strict";

const STATUSES = ["queued", "scheduled", "running", "retrying", "succeeded", "failed", "dead", "cancelled"];
const LIST_LIMIT = 200; // jobs kept and shown, newest first
const CHART_POINTS = 150; // 5 minutes of 2 s reports
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 5000;
const RESYNC_RETRY_MS = 500; // a list refused while the service starts is asked for again
const TOKEN_KEY = "aioqueue.token"; // sessionStorage: gone when the tab closes

const $ = (id) => document.getElementById(id);

const state = {
  authOn: false,
  token: sessionStorage.getItem(TOKEN_KEY),
  tasks: new Map(), // name -> the submit body's branch of the task (its JSON Schema)
  jobs: new Map(), // id -> record
  selected: null,
  socket: null,
  backoff: BACKOFF_MIN,
  syncing: false, // the job list is loading: events wait in `pending`
  pending: [],
  rates: [], // [in, out] per report
  stopped: false, // refused for good (a token without jobs:admin): no reconnecting
};

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status-line " + (kind || "");
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

// One API call: {status, body}; a problem document comes back as the body.
async function api(method, path, body) {
  const init = { method, headers: headers(body !== undefined) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401 && state.authOn) askToken("the token was refused; enter another");
  return { status: response.status, body: data };
}

function problemText(result) {
  const body = result.body || {};
  return `${result.status} ${body.title || ""}: ${body.detail || ""}`.trim();
}

// ---- auth ----

function askToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("token-form").hidden = false;
  $("token-message").textContent = message || "";
  $("main").hidden = true;
  if (state.socket) state.socket.close();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token").value = "";
  $("token-form").hidden = true;
  $("auth-error").hidden = true;
  $("main").hidden = false;
  state.stopped = false;
  start();
});

function refuse(message) {
  // A valid token without jobs:admin: the page cannot do its work, and says why.
  state.stopped = true;
  const box = $("auth-error");
  box.textContent = message;
  box.hidden = false;
  setStatus("refused", "down");
  if (state.socket) state.socket.close();
}

// ---- the websocket ----

function connect() {
  if (state.stopped) return;
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/ws";
  const socket = new WebSocket(url);
  state.socket = socket;
  socket.addEventListener("open", () => {
    setStatus("connected", "live");
    state.backoff = BACKOFF_MIN;
    if (state.token) socket.send(JSON.stringify({ op: "auth", token: state.token }));
    else subscribe(socket);
  });
  socket.addEventListener("message", (event) => onFrame(socket, JSON.parse(event.data)));
  socket.addEventListener("close", () => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (state.stopped || !$("token-form").hidden) return;
    const wait = state.backoff;
    state.backoff = Math.min(BACKOFF_MAX, state.backoff * 2);
    setStatus(`disconnected; reconnecting in ${(wait / 1000).toFixed(1)} s`, "down");
    setTimeout(connect, wait);
  });
}

function subscribe(socket) {
  state.syncing = true;
  state.pending = [];
  socket.send(JSON.stringify({ op: "subscribe", channel: "jobs:*" }));
  socket.send(JSON.stringify({ op: "subscribe", channel: "queues" }));
}

function onFrame(socket, frame) {
  switch (frame.type) {
    case "authenticated":
      subscribe(socket);
      break;
    case "subscribed":
      if (frame.channel === "jobs:*") resync(socket);
      break;
    case "job":
      if (state.syncing) state.pending.push(frame.job);
      else upsert(frame.job);
      break;
    case "queues":
      showQueues(frame);
      break;
    case "error":
      if (frame.code === "forbidden") {
        refuse("this token may not watch every job: the dashboard needs the scope jobs:admin (" + frame.message + ")");
      } else if (frame.code === "unauthorized" || frame.code === "token_expired") {
        askToken("the token was refused: " + frame.message);
      } else {
        setStatus("error: " + frame.message, "down");
      }
      break;
  }
}

// The list after (re)subscribing: the server's, then the events that came while it loaded.
async function resync(socket) {
  const result = await api("GET", `/v1/jobs?limit=${LIST_LIMIT}`);
  if (state.socket !== socket) return; // that connection is gone: its successor resyncs
  if (result.status === 503) {
    // Starting (its job store not read to the end yet) or stopping: ask again shortly.
    setStatus("waiting for the service: " + problemText(result), "down");
    setTimeout(() => resync(socket), RESYNC_RETRY_MS);
    return;
  }
  if (result.status !== 200) {
    setStatus("could not list the jobs: " + problemText(result), "down");
    return;
  }
  setStatus("connected", "live");
  state.jobs = new Map();
  for (const job of result.body.jobs) state.jobs.set(job.id, job);
  state.syncing = false;
  for (const job of state.pending) upsert(job, false);
  state.pending = [];
  render();
}

// A record in an HTTP answer (a submit, a cancel, a retry) may be older than the events the
// websocket brought meanwhile (a fast job has finished before its 202 is read): it is shown only
// for a job the page does not know yet, and the events, in their order, say the rest.
function learn(job) {
  if (!state.jobs.has(job.id)) upsert(job);
}

function upsert(job, draw = true) {
  state.jobs.set(job.id, job);
  if (state.jobs.size > LIST_LIMIT * 2) prune();
  if (!draw) return;
  if (!state.tasksSeen || !state.tasksSeen.has(job.task)) fillTaskFilter();
  const row = document.querySelector(`#jobs tr[data-id="${CSS.escape(job.id)}"]`);
  if (row && visible(job)) fillRow(row, job);
  else render();
  if (state.selected === job.id) showDetail(job);
}

function prune() {
  const newest = sorted([...state.jobs.values()]).slice(0, LIST_LIMIT);
  state.jobs = new Map(newest.map((job) => [job.id, job]));
}

// ---- the jobs ----

function sorted(jobs) {
  return jobs.sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
}

function visible(job) {
  const status = $("filter-status").value;
  const task = $("filter-task").value;
  return (!status || job.status === status) && (!task || job.task === task);
}

function render() {
  fillTaskFilter();
  const body = document.querySelector("#jobs tbody");
  const rows = sorted([...state.jobs.values()].filter(visible)).slice(0, LIST_LIMIT).map((job) => {
    const row = document.createElement("tr");
    row.dataset.id = job.id;
    for (let i = 0; i < 6; i++) row.appendChild(document.createElement("td"));
    const bar = document.createElement("progress");
    bar.max = 1;
    row.children[3].appendChild(bar);
    fillRow(row, job);
    row.addEventListener("click", () => select(job.id));
    return row;
  });
  body.replaceChildren(...rows);
  if (state.selected && state.jobs.has(state.selected)) showDetail(state.jobs.get(state.selected));
}

function fillRow(row, job) {
  const cells = row.children;
  cells[0].textContent = job.id;
  cells[1].textContent = job.task;
  cells[2].textContent = job.status;
  cells[2].className = "status status-" + job.status;
  const bar = cells[3].firstChild;
  const value = progressOf(job);
  if (value === null) bar.removeAttribute("value");
  else bar.value = value;
  cells[4].textContent = `${job.attempt}/${job.max_attempts}`;
  cells[5].textContent = job.created_at || "";
  row.classList.toggle("selected", state.selected === job.id);
}

// A finished job's bar is full; one not started is empty; else the task's own figure.
function progressOf(job) {
  if (job.status === "succeeded") return 1;
  if (job.progress && typeof job.progress.value === "number") return job.progress.value;
  return 0;
}

function fillTaskFilter() {
  const names = new Set([...state.tasks.keys(), ...[...state.jobs.values()].map((j) => j.task)]);
  if (state.tasksSeen && names.size === state.tasksSeen.size) return;
  state.tasksSeen = names;
  const select = $("filter-task");
  const current = select.value;
  const options = [new Option("any", "")];
  for (const name of [...names].sort()) options.push(new Option(name, name));
  select.replaceChildren(...options);
  select.value = current;
}

function select(id) {
  state.selected = id;
  for (const row of document.querySelectorAll("#jobs tbody tr")) {
    row.classList.toggle("selected", row.dataset.id === id);
  }
  $("action-result").textContent = "";
  showDetail(state.jobs.get(id));
}

function json(value) {
  return value === null || value === undefined ? "" : JSON.stringify(value, null, 2);
}

function showDetail(job) {
  $("detail").hidden = false;
  $("detail-id").textContent = job.id;
  $("detail-task").textContent = job.task;
  $("detail-status").textContent = job.status;
  $("detail-status").className = "status-" + job.status;
  $("detail-attempt").textContent = `${job.attempt} of ${job.max_attempts}`;
  $("detail-progress").value = progressOf(job);
  $("detail-message").textContent = (job.progress && job.progress.message) || "";
  $("detail-args").textContent = json(job.args);
  $("detail-result").textContent = json(job.result);
  const error = job.error ? { ...job.error } : null;
  const traceback = error ? error.traceback : null;
  if (error) delete error.traceback;
  $("detail-error").textContent = json(error);
  $("detail-traceback").textContent = traceback || "";
}

async function act(method, suffix) {
  const id = state.selected;
  if (!id) return;
  const result = await api(method, `/v1/jobs/${encodeURIComponent(id)}${suffix}`);
  $("action-result").textContent = result.status === 202 ? `${result.status}: ${result.body.status}` : problemText(result);
  if (result.status === 202) learn(result.body);
}

$("cancel").addEventListener("click", () => act("DELETE", ""));
$("retry").addEventListener("click", () => act("POST", "/retry"));
$("filter-status").addEventListener("change", render);
$("filter-task").addEventListener("change", render);

// ---- queues and their rates ----

function showQueues(report) {
  const body = document.querySelector("#queues tbody");
  const shown = (v) => (v === null || v === undefined ? "–" : String(v));
  const rows = report.queues.map((q) => {
    const row = document.createElement("tr");
    row.dataset.queue = q.name;
    const age = q.oldest_age_s === null ? "–" : q.oldest_age_s.toFixed(1) + " s";
    for (const value of [q.name, shown(q.depth), shown(q.consumers), q.running, q.in_per_s, q.out_per_s, age, q.dead]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.appendChild(cell);
    }
    return row;
  });
  body.replaceChildren(...rows);
  $("queues-age").textContent = "at " + new Date().toLocaleTimeString();
  const sum = (key) => report.queues.reduce((total, q) => total + (q[key] || 0), 0);
  state.rates.push([sum("in_per_s"), sum("out_per_s")]);
  if (state.rates.length > CHART_POINTS) state.rates.shift();
  drawRates();
}

function drawRates() {
  const canvas = $("rates");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(1, ...state.rates.flat());
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`${top.toFixed(2)}/s`, 4, 12);
  ctx.strokeStyle = "#d8dde6";
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  const step = width / (CHART_POINTS - 1);
  const offset = CHART_POINTS - state.rates.length;
  [["#2e6bd6", 0], ["#1f9d55", 1]].forEach(([colour, index]) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    state.rates.forEach((point, i) => {
      const x = (offset + i) * step;
      const y = height - 2 - (point[index] / top) * (height - 18);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  });
}

// ---- dead letters ----

async function dead(action) {
  const task = $("dead-task").value;
  if (action === "purge" && !confirm(`Forget every failed and dead job of ${task}, and its dead letters?`)) return;
  const result = await api("POST", `/v1/dead/${action}`, { task });
  $("dead-result").textContent =
    result.status === 200 ? `${action === "retry" ? "retried" : "purged"} ${result.body.count}` : problemText(result);
}

$("dead-retry").addEventListener("click", () => dead("retry"));
$("dead-purge").addEventListener("click", () => dead("purge"));

// ---- the submit form, from /openapi.json ----

// The object form of a task's args (its schema is anyOf object / array / null).
function argsObject(branch) {
  const args = branch.properties.args || {};
  const choices = args.anyOf || args.oneOf || [args];
  return choices.find((s) => s.type === "object") || { properties: {}, required: [] };
}

function buildForm() {
  const branch = state.tasks.get($("submit-task").value);
  const holder = $("submit-fields");
  holder.replaceChildren();
  $("submit-result").textContent = "";
  if (!branch) return;
  const schema = argsObject(branch);
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    if (prop === false) continue; // the task's context: not an argument
    holder.appendChild(field(name, prop, required.has(name)));
  }
}

function field(name, prop, required) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.field = "args." + name;
  const label = document.createElement("label");
  label.textContent = name;
  label.htmlFor = "arg-" + name;
  if (required) label.className = "required";
  let input;
  const type = prop.type;
  if (type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
  } else if (type === "integer" || type === "number" || type === "string") {
    input = document.createElement("input");
    input.type = type === "string" ? "text" : "number";
    if (type === "number") input.step = "any";
  } else {
    input = document.createElement("textarea"); // arrays, objects, anything: as JSON text
    input.placeholder = "JSON";
  }
  input.id = "arg-" + name;
  input.name = name;
  input.dataset.kind = type || "json";
  input.required = required;
  const problem = document.createElement("span");
  problem.className = "problem";
  wrap.append(label, input, problem);
  return wrap;
}

// The args of the form: only the fields filled in (the task's defaults for the rest).
function readArgs() {
  const args = {};
  const errors = [];
  for (const input of $("submit-fields").querySelectorAll("input, textarea")) {
    const kind = input.dataset.kind;
    if (kind === "boolean") {
      args[input.name] = input.checked;
      continue;
    }
    const text = input.value;
    if (text === "") {
      if (input.required) errors.push({ field: "args." + input.name, message: "required" });
      continue;
    }
    if (kind === "integer" || kind === "number") args[input.name] = Number(text);
    else if (kind === "string") args[input.name] = text;
    else {
      try { args[input.name] = JSON.parse(text); }
      catch (e) { errors.push({ field: "args." + input.name, message: "not JSON: " + e.message }); }
    }
  }
  return { args, errors };
}

function showFieldErrors(errors) {
  for (const wrap of $("submit-fields").children) wrap.querySelector(".problem").textContent = "";
  const unplaced = [];
  for (const error of errors) {
    const wrap = [...$("submit-fields").children].find(
      (w) => error.field === w.dataset.field || error.field.startsWith(w.dataset.field + "."),
    );
    if (wrap) wrap.querySelector(".problem").textContent = error.message;
    else unplaced.push(`${error.field}: ${error.message}`);
  }
  return unplaced;
}

$("submit-task").addEventListener("change", buildForm);
$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const { args, errors } = readArgs();
  if (showFieldErrors(errors).length || errors.length) {
    $("submit-result").textContent = "fix the marked fields";
    return;
  }
  const result = await api("POST", "/v1/jobs", { task: $("submit-task").value, args });
  if (result.status === 202 || result.status === 200) {
    $("submit-result").textContent = "submitted " + result.body.id;
    learn(result.body);
  } else {
    const unplaced = showFieldErrors((result.body && result.body.errors) || []);
    $("submit-result").textContent = [problemText(result), ...unplaced].join("; ");
  }
});

// ---- start ----

async function loadSchema() {
  const response = await fetch("/openapi.json");
  const doc = await response.json();
  state.authOn = Boolean(doc.components && doc.components.securitySchemes);
  const body = doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
  for (const branch of body.oneOf || []) state.tasks.set(branch.title, branch);
  const names = [...state.tasks.keys()];
  $("submit-task").replaceChildren(...names.map((n) => new Option(n, n)));
  $("dead-task").replaceChildren(...names.map((n) => new Option(n, n)));
  buildForm();
}

function start() {
  if (state.authOn && !state.token) {
    askToken("");
    setStatus("signed out");
    return;
  }
  connect();
}

async function main() {
  for (const status of STATUSES) $("filter-status").appendChild(new Option(status, status));
  for (;;) {
    try {
      await loadSchema();
      break;
    } catch (e) {
      // The service is starting or away: try again, as the websocket would.
      setStatus("waiting for the service", "down");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  $("auth-off").hidden = state.authOn;
  start();
}

main();
