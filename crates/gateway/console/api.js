// The public API as the console uses it. The key lives in sessionStorage only (gone when the
// tab closes), travels as `Authorization: Bearer`, and is never put in a URL or logged.

const KEY = "volley.key";

export function key() {
  return sessionStorage.getItem(KEY);
}

export function signIn(k) {
  sessionStorage.setItem(KEY, k);
}

export function signOut() {
  sessionStorage.removeItem(KEY);
}

/** An API error in the contract's shape: `type`, `message`, and per-item `errors` on a 400. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "http_error";
    this.errors = Array.isArray(error.errors) ? error.errors : [];
  }
}

/** Calls the API with the session's key; resolves to the parsed JSON body. */
export async function call(method, path, body, k = key()) {
  const headers = { Accept: "application/json" };
  if (k) headers.Authorization = `Bearer ${k}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { type: "network", message: `cannot reach the gateway: ${e.message}` });
  }
  let json = null;
  try {
    json = await resp.json();
  } catch {
    // Not JSON (a proxy's error page): described by the status below.
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, (json && json.error) || { message: `HTTP ${resp.status}` });
  }
  return json;
}

export const get = (path, k) => call("GET", path, undefined, k);
export const post = (path, body) => call("POST", path, body);

/** Every job of a batch, page by page (for the results download). */
export async function allJobs(batchId) {
  const out = [];
  let after = "";
  for (;;) {
    const q = new URLSearchParams({ limit: "256" });
    if (after) q.set("after", after);
    const page = await get(`/v1/batches/${encodeURIComponent(batchId)}/jobs?${q}`);
    out.push(...page.data);
    if (!page.has_more || page.data.length === 0) return out;
    after = page.data[page.data.length - 1].id;
  }
}
