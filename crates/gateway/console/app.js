// The Volley console: a small single-page app over the public API, routed by the URL's hash
// (#/batches, #/batches/7, #/jobs/43, #/submit, #/operator). Every piece of data is put into
// the page as text (textContent, attributes), never as HTML.

import * as api from "./api.js";

const STATUSES = ["QUEUED", "PROCESSING", "PROCESSED", "FAILED", "CANCELLED"];
const PAGE = 20;
/** How often a page showing unfinished work asks again. */
const POLL_MS = 1500;

const main = document.getElementById("main");
let poll = null;
let view = 0;

// ---------- small DOM helpers ----------

/** `h("a", {href: "#/x", class: "c"}, "text", child)`: an element; strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.textContent = ""), 4000);
}

function errorBox(e) {
  return h("div", { class: "error", role: "alert" },
    h("strong", {}, e.type || "error"), ": ", e.message || String(e));
}

const time = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : "—");

function duration(secs) {
  if (secs === null || secs === undefined || !isFinite(secs)) return "—";
  const s = Math.max(0, Math.round(secs));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function badge(status) {
  return h("span", { class: `badge s-${String(status).toLowerCase()}` }, status);
}

/**
 * Polls `fn` while this view is shown: `fn` returns false to stop, or the milliseconds until
 * the next poll (POLL_MS otherwise). A hidden tab asks nothing until it is shown again.
 */
function every(fn) {
  const mine = view;
  const tick = async () => {
    if (mine !== view) return;
    let next = POLL_MS;
    if (!document.hidden) {
      try {
        const r = await fn();
        if (r === false) return;
        if (typeof r === "number") next = r;
      } catch (e) {
        // A failed poll is shown by the view itself; keep trying.
      }
    }
    if (mine === view) poll = setTimeout(tick, next);
  };
  poll = setTimeout(tick, POLL_MS);
}

// ---------- progress ----------

function finished(b) {
  return (b.processed || 0) + (b.failed || 0) + (b.cancelled || 0);
}

/** A bar split by status, with its numbers for screen readers in the label. */
function progress(b) {
  const total = b.total || 1;
  const parts = [
    ["processed", b.processed], ["failed", b.failed], ["cancelled", b.cancelled],
    ["processing", b.processing], ["queued", b.queued],
  ];
  const label = parts.map(([k, n]) => `${n || 0} ${k}`).join(", ");
  return h("div", {
    class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": b.total,
    "aria-valuenow": finished(b), "aria-label": `${finished(b)} of ${b.total} finished: ${label}`,
    "data-status": b.status, title: label,
  }, parts.filter(([, n]) => n > 0).map(([k, n]) =>
    h("span", { class: `seg s-${k}`, style: null, "data-n": n, "data-w": ((100 * n) / total).toFixed(2) })));
}

// Inline styles are refused by the policy (style-src 'self'), so widths are set from script.
function sizeBars(root) {
  for (const s of root.querySelectorAll(".seg[data-w]")) s.style.width = `${s.dataset.w}%`;
}

/**
 * "about 2m left" from the pace so far: jobs that ran to an end (processed or failed) per
 * second since the batch was accepted; cancelled jobs say nothing about the pace.
 */
function eta(b) {
  if (b.status === "DONE") return "finished";
  const ran = (b.processed || 0) + (b.failed || 0);
  const waiting = (b.queued || 0) + (b.processing || 0);
  const elapsed = Date.now() / 1000 - b.created;
  if (ran === 0 || elapsed <= 0) return "estimating…";
  const left = (waiting * elapsed) / ran;
  return `about ${duration(left)} left (≈ ${new Date(Date.now() + left * 1000).toLocaleTimeString()})`;
}

// ---------- sign in ----------

function signInView(message) {
  view += 1;
  clearTimeout(poll);
  document.getElementById("nav").hidden = true;
  const input = h("input", {
    id: "key", type: "password", autocomplete: "off", spellcheck: "false", required: true,
    placeholder: "vk_…", "aria-describedby": "key-help",
  });
  const out = h("div", { "aria-live": "polite" }, message ? errorBox({ message }) : null);
  const form = h("form", {
    class: "card narrow", id: "sign-in",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const k = input.value.trim();
      try {
        await api.get("/v1/batches?limit=1", k);
        api.signIn(k);
        input.value = "";
        location.hash = "#/batches";
        route();
      } catch (e) {
        out.replaceChildren(errorBox(e));
      }
    },
  },
  h("h1", {}, "Sign in"),
  h("label", { for: "key" }, "API key"), input,
  h("p", { id: "key-help", class: "muted" },
    "The key stays in this browser tab (session storage) and is sent only to this gateway. ",
    "Make one with ", h("code", {}, "batchctl keys create --name you"), "."),
  h("button", { type: "submit" }, "Sign in"), out);
  show(form);
  input.focus();
  return false;
}

// ---------- batches ----------

async function batchesView(after) {
  const list = h("div", { id: "batches", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading…"));
  const pager = h("div", { class: "pager" });
  show(h("div", { class: "head" }, h("h1", {}, "Batches"),
    h("a", { class: "button", href: "#/submit" }, "New batch")), list, pager);
  const load = async () => {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (after) q.set("after", after);
    let page;
    try {
      page = await api.get(`/v1/batches?${q}`);
    } catch (e) {
      if (e.status === 401) return signInView(e.message);
      list.replaceChildren(errorBox(e));
      return true;
    }
    if (page.data.length === 0) {
      list.replaceChildren(h("p", { class: "empty" }, "No batches yet. ",
        h("a", { href: "#/submit" }, "Submit one"), "."));
    } else {
      list.replaceChildren(h("table", { class: "list" },
        h("caption", { class: "sr" }, "Your batches, newest first"),
        h("thead", {}, h("tr", {}, ["Batch", "Label", "Created", "Status", "Progress", "Finish"]
          .map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, page.data.map((b) => h("tr", { "data-batch": b.id },
          h("td", { "data-label": "Batch" }, h("a", { href: `#/batches/${b.id}` }, `#${b.id}`)),
          h("td", { "data-label": "Label" }, b.label || h("span", { class: "muted" }, "—")),
          h("td", { "data-label": "Created" }, time(b.created)),
          h("td", { "data-label": "Status" }, badge(b.status)),
          h("td", { "data-label": "Progress", class: "wide" }, progress(b),
            h("small", {}, `${finished(b)} / ${b.total}`)),
          h("td", { "data-label": "Finish" }, eta(b)))))));
      sizeBars(list);
    }
    const last = page.data[page.data.length - 1];
    // Quick while something on the page runs; slowly otherwise, to notice new batches.
    const busy = page.data.some((b) => b.status !== "DONE");
    pager.replaceChildren(
      after ? h("a", { class: "button secondary", href: "#/batches" }, "Newest") : "",
      page.has_more && last ? h("a", { class: "button secondary", href: `#/batches?after=${last.id}` }, "Older") : "");
    return busy ? POLL_MS : 10 * POLL_MS;
  };
  await load();
  every(load);
}

// ---------- one batch ----------

async function batchView(id, status) {
  const head = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const filter = h("select", {
    id: "status-filter",
    onchange: () => { location.hash = `#/batches/${id}${filter.value ? `?status=${filter.value}` : ""}`; },
  }, h("option", { value: "" }, "All"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const jobs = h("div", { id: "jobs", "aria-live": "polite" });
  const download = h("button", { type: "button", class: "secondary", id: "download", onclick: () => downloadResults(id, download) },
    "Download results (JSONL)");
  show(head, h("div", { class: "head" }, h("h2", {}, "Jobs"),
    h("div", { class: "tools" }, h("label", { for: "status-filter" }, "Status "), filter, download)), jobs);

  const load = async () => {
    let b;
    let page;
    try {
      const q = new URLSearchParams({ limit: "256" });
      if (status) q.set("status", status);
      [b, page] = await Promise.all([api.get(`/v1/batches/${encodeURIComponent(id)}`),
        api.get(`/v1/batches/${encodeURIComponent(id)}/jobs?${q}`)]);
    } catch (e) {
      if (e.status === 401) return signInView(e.message);
      head.replaceChildren(h("h1", {}, `Batch #${id}`), errorBox(e));
      return e.status !== 404;
    }
    const live = b.status !== "DONE";
    const cancel = h("button", {
      type: "button", class: "danger", id: "cancel-batch", disabled: !live,
      onclick: async () => {
        if (!confirm(`Cancel every queued or running job of batch #${id}?`)) return;
        try {
          await api.post(`/v1/batches/${encodeURIComponent(id)}/cancel`);
          toast(`Batch #${id} cancelled`);
          load();
        } catch (e) { toast(e.message); }
      },
    }, "Cancel batch");
    head.replaceChildren(
      h("div", { class: "head" }, h("h1", {}, `Batch #${b.id}`, b.label ? ` · ${b.label}` : ""), cancel),
      h("div", { class: "card" },
        h("div", { class: "row" }, badge(b.status), h("span", { id: "eta" }, eta(b)),
          h("span", { class: "muted" }, `created ${time(b.created)}`)),
        progress(b),
        h("dl", { class: "counts" }, ["total", ...STATUSES.map((s) => s.toLowerCase())].map((k) =>
          h("div", {}, h("dt", {}, k), h("dd", { "data-count": k }, b[k] ?? 0)))),
        b.usage && b.usage.total_tokens ? h("p", { class: "muted" }, `${b.usage.total_tokens} tokens used`) : ""));
    sizeBars(head);
    jobs.replaceChildren(page.data.length === 0
      ? h("p", { class: "empty" }, status ? `No ${status} jobs.` : "No jobs.")
      : h("table", { class: "list" },
        h("caption", { class: "sr" }, "Jobs of this batch"),
        h("thead", {}, h("tr", {}, ["Job", "Custom id", "Endpoint", "Model", "Status", "Attempts", "Duration", "Error", ""]
          .map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, page.data.map((j) => jobRow(j, load)))));
    return live;
  };
  await load();
  every(load);
}

function jobRow(j, reload) {
  const running = j.status === "QUEUED" || j.status === "PROCESSING";
  const took = j.started ? (j.finished || Date.now() / 1000) - j.started : null;
  return h("tr", { "data-job": j.id, "data-status": j.status },
    h("td", { "data-label": "Job" }, h("a", { href: `#/jobs/${j.id}` }, `#${j.id}`)),
    h("td", { "data-label": "Custom id" }, j.custom_id || h("span", { class: "muted" }, "—")),
    h("td", { "data-label": "Endpoint" }, h("code", {}, j.endpoint)),
    h("td", { "data-label": "Model" }, j.model),
    h("td", { "data-label": "Status" }, badge(j.status)),
    h("td", { "data-label": "Attempts" }, j.attempts),
    h("td", { "data-label": "Duration" }, duration(took)),
    h("td", { "data-label": "Error", class: "err" }, j.error ? `${j.error.type}: ${j.error.message}` : ""),
    h("td", {}, running ? h("button", {
      type: "button", class: "small danger", "aria-label": `Cancel job ${j.id}`,
      onclick: async () => {
        try {
          await api.post(`/v1/jobs/${encodeURIComponent(j.id)}/cancel`);
          toast(`Job #${j.id} cancelled`);
          reload();
        } catch (e) { toast(e.message); }
      },
    }, "Cancel") : ""));
}

/** All results of a batch as JSONL, built in the browser, one line per job in order. */
async function downloadResults(id, button) {
  button.disabled = true;
  try {
    const jobs = await api.allJobs(id);
    const lines = jobs.map((j) => JSON.stringify({
      id: j.id, custom_id: j.custom_id ?? null, status: j.status, endpoint: j.endpoint,
      model: j.model, result: j.result ?? null, error: j.error ?? null,
    }));
    const url = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "application/x-ndjson" }));
    const a = h("a", { href: url, download: `batch-${id}-results.jsonl` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    toast(e.message);
  } finally {
    button.disabled = false;
  }
}

// ---------- one job ----------

/** Only links the gateway signed (http/https) become media sources. */
function safeUrl(u) {
  try {
    const url = new URL(u, location.href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function media(entry, i) {
  const url = safeUrl(entry.url);
  const type = entry.content_type || "";
  if (!url) return null;
  const label = `result ${i + 1}`;
  let el;
  if (type.startsWith("image/")) el = h("img", { src: url, alt: entry.revised_prompt || label, class: "preview" });
  else if (type.startsWith("audio/")) el = h("audio", { src: url, controls: true, preload: "metadata", "aria-label": label });
  else if (type.startsWith("video/")) el = h("video", { src: url, controls: true, preload: "metadata", "aria-label": label, class: "preview" });
  return h("figure", { class: "media" }, el,
    h("figcaption", {}, h("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, `Open ${type || "file"}`)));
}

function renderResult(j) {
  const r = j.result;
  if (!r) return null;
  const out = [];
  if (Array.isArray(r.choices)) {
    for (const c of r.choices) {
      const m = c.message;
      const text = m ? m.content : c.text;
      out.push(h("div", { class: "chat" }, h("div", { class: "role" }, m ? m.role || "assistant" : "completion"),
        h("div", { class: "text" }, typeof text === "string" ? text : JSON.stringify(text))));
    }
  }
  if (Array.isArray(r.data)) out.push(...r.data.map(media).filter(Boolean));
  return out.length ? out : null;
}

function chatRequest(body) {
  if (!body || !Array.isArray(body.messages)) return null;
  return body.messages.map((m) => h("div", { class: "chat" }, h("div", { class: "role" }, m.role),
    h("div", { class: "text" }, typeof m.content === "string" ? m.content : JSON.stringify(m.content))));
}

async function jobView(id) {
  show(h("p", { class: "muted" }, "Loading…"));
  const load = async () => {
    let j;
    try {
      j = await api.get(`/v1/jobs/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 401) return signInView(e.message);
      show(h("h1", {}, `Job #${id}`), errorBox(e));
      return e.status !== 404;
    }
    const took = j.started ? (j.finished || Date.now() / 1000) - j.started : null;
    const prompt = j.request && (j.request.prompt || j.request.input);
    show(
      h("p", {}, h("a", { href: `#/batches/${j.batch_id}` }, `← Batch #${j.batch_id}`)),
      h("div", { class: "head" }, h("h1", {}, `Job #${j.id}`), badge(j.status)),
      h("dl", { class: "meta" },
        [["Endpoint", j.endpoint], ["Model", j.model], ["Type", j.inference_type], ["Attempts", j.attempts],
          ["Custom id", j.custom_id || "—"], ["Created", time(j.created)], ["Duration", duration(took)]]
          .map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
      j.error ? h("div", { class: "error", role: "alert", id: "job-error" },
        h("strong", {}, j.error.type), ": ", j.error.message) : "",
      j.last_error && !j.error ? h("p", { class: "muted" }, `Last retried error: ${j.last_error}`) : "",
      h("section", { "aria-labelledby": "req-h" }, h("h2", { id: "req-h" }, "Request"),
        chatRequest(j.request) || (typeof prompt === "string" ? h("div", { class: "chat" }, h("div", { class: "text" }, prompt)) : ""),
        h("details", {}, h("summary", {}, "Request body (JSON)"), h("pre", {}, JSON.stringify(j.request ?? null, null, 2)))),
      h("section", { "aria-labelledby": "res-h", id: "result" }, h("h2", { id: "res-h" }, "Result"),
        renderResult(j) || h("p", { class: "muted" }, j.status === "PROCESSED" ? "No previewable output." : "No result yet."),
        j.result ? h("details", {}, h("summary", {}, "Result (JSON)"), h("pre", {}, JSON.stringify(j.result, null, 2))) : ""));
    return j.status === "QUEUED" || j.status === "PROCESSING";
  };
  if (await load()) every(load);
}

// ---------- submit ----------

/** The items of pasted text: a JSON batch object, a JSON array of items, or JSONL. */
function parseItems(text) {
  const t = text.trim();
  if (!t) throw new Error("Paste or upload some items first.");
  if (t.startsWith("{") || t.startsWith("[")) {
    try {
      const v = JSON.parse(t);
      if (Array.isArray(v)) return { requests: v };
      if (Array.isArray(v.requests)) return v;
      return { requests: [v] };
    } catch (e) {
      if (t.startsWith("[")) throw new Error(`Not valid JSON: ${e.message}`);
      // Several objects, one a line: JSONL.
    }
  }
  const requests = [];
  t.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    try {
      requests.push(JSON.parse(line));
    } catch (e) {
      throw new Error(`Line ${i + 1} is not valid JSON: ${e.message}`);
    }
  });
  return { requests };
}

const EXAMPLE = [
  { endpoint: "/v1/chat/completions", body: { model: "qwen3-8b", messages: [{ role: "user", content: "Write a haiku about lamps." }] } },
  { endpoint: "/v1/images/generations", body: { model: "flux-dev", prompt: "a minimalist desk lamp" } },
  { endpoint: "/v1/audio/speech", body: { model: "espeak", input: "Hello from Volley.", voice: "alloy" } },
  { endpoint: "/v1/music/generations", body: { model: "sim-music", prompt: "calm piano" } },
  { endpoint: "/v1/videos/generations", body: { model: "sim-video", prompt: "a lamp turning on" } },
].map((x) => JSON.stringify(x)).join("\n");

function submitView() {
  const text = h("textarea", { id: "items", rows: 12, spellcheck: "false", "aria-describedby": "items-help" });
  const label = h("input", { id: "label", type: "text", maxlength: 256 });
  const file = h("input", {
    id: "file", type: "file", accept: ".json,.jsonl,.ndjson,application/json",
    onchange: async () => { if (file.files[0]) text.value = await file.files[0].text(); },
  });
  const out = h("div", { id: "submit-result", "aria-live": "polite" });
  show(h("h1", {}, "Submit a batch"), h("form", {
    class: "card", id: "submit-form",
    onsubmit: async (ev) => {
      ev.preventDefault();
      out.replaceChildren();
      let batch;
      try {
        batch = parseItems(text.value);
      } catch (e) {
        out.replaceChildren(errorBox({ type: "invalid_input", message: e.message }));
        return;
      }
      if (label.value.trim()) batch.label = label.value.trim();
      try {
        const b = await api.post("/v1/batches", batch);
        location.hash = `#/batches/${b.id}`;
      } catch (e) {
        if (e.status === 401) return signInView(e.message);
        out.replaceChildren(errorBox(e), e.errors.length ? h("table", { class: "list", id: "item-errors" },
          h("caption", {}, "Nothing was created. Fix these items:"),
          h("thead", {}, h("tr", {}, ["Item", "Field", "Problem"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, e.errors.map((x) => h("tr", { "data-index": x.index ?? "" },
            h("td", { "data-label": "Item" }, x.index ?? "—"), h("td", { "data-label": "Field" }, h("code", {}, x.field)),
            h("td", { "data-label": "Problem" }, x.message))))) : "");
        out.focus();
      }
    },
  },
  h("label", { for: "items" }, "Items"),
  h("p", { id: "items-help", class: "muted" },
    "JSON Lines (one ", h("code", {}, "{endpoint, body}"), " a line), a JSON array of them, or a whole batch object. Up to 256 items."),
  text,
  h("div", { class: "row" }, h("label", { for: "file" }, "or upload a file "), file,
    h("button", { type: "button", class: "secondary", onclick: () => { text.value = EXAMPLE; } }, "Fill in an example")),
  h("label", { for: "label" }, "Label (optional)"), label,
  h("button", { type: "submit" }, "Submit"), out));
  out.tabIndex = -1;
  text.focus();
}

// ---------- operator ----------

async function operatorView() {
  const body = h("div", { id: "operator" }, h("p", { class: "muted" }, "Loading…"));
  show(h("h1", {}, "Operator"), body);
  const n = (v) => (v === null || v === undefined ? "?" : v);
  const load = async () => {
    let s;
    try {
      s = await api.get("/v1/admin/status");
    } catch (e) {
      if (e.status === 401) return signInView(e.message);
      body.replaceChildren(errorBox(e));
      return e.status !== 403;
    }
    body.replaceChildren(h("table", { class: "list" },
      h("caption", { class: "sr" }, "Queues per inference type"),
      h("thead", {}, h("tr", {}, ["Type", "Ready", "Consumers", "Queued", "Running", "Oldest wait", "Dead letters"]
        .map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, s.queues.map((q) => h("tr", { "data-queue": q.name },
        h("td", { "data-label": "Type" }, q.name), h("td", { "data-label": "Ready" }, n(q.ready)),
        h("td", { "data-label": "Consumers" }, n(q.consumers)), h("td", { "data-label": "Queued" }, q.inference_type ? n(q.queued) : "—"),
        h("td", { "data-label": "Running" }, q.inference_type ? n(q.processing) : "—"),
        h("td", { "data-label": "Oldest wait" }, q.oldest_wait_secs != null ? duration(q.oldest_wait_secs) : "—"),
        h("td", { "data-label": "Dead letters", class: q.dead_letters ? "err" : "" }, n(q.dead_letters)))))),
    Object.entries(s.errors || {}).filter(([, v]) => v).map(([k, v]) => errorBox({ type: k, message: v })),
    h("p", { class: "muted" }, "Ready: messages waiting in RabbitMQ. Queued: jobs not started. Dead letters: ",
      h("code", {}, "batchctl dlq list"), "."));
    // Each read opens a connection to RabbitMQ: an operator's screen need not be quicker.
    return 5000;
  };
  await load();
  every(load);
}

// ---------- routing ----------

function route() {
  view += 1;
  clearTimeout(poll);
  if (!api.key()) return signInView();
  document.getElementById("nav").hidden = false;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("#nav a")) {
    a.toggleAttribute("aria-current", a.getAttribute("href") === `#/${parts[0] || "batches"}`);
  }
  if (parts[0] === "batches" && parts[1]) return batchView(parts[1], params.get("status") || "");
  if (parts[0] === "jobs" && parts[1]) return jobView(parts[1]);
  if (parts[0] === "submit") return submitView();
  if (parts[0] === "operator") return operatorView();
  return batchesView(params.get("after") || "");
}

document.getElementById("sign-out").addEventListener("click", () => {
  api.signOut();
  location.hash = "#/";
  route();
});
// Focus moves to the new content (for keyboards and screen readers) before a view may move it
// on, to its first field.
window.addEventListener("hashchange", () => { main.focus({ preventScroll: true }); route(); });
route();
