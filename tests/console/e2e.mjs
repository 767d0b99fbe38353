// Drives Debian's Chromium (headless) through the Volley web console against a real stack.
// Started by tests/e2e/console.rs, which starts the stack and passes:
//   VOLLEY_URL, VOLLEY_KEY (alice), VOLLEY_KEY_2 (bob, another owner), VOLLEY_ADMIN_KEY,
//   CHROMIUM (the browser binary), SCREENSHOTS (optional: a directory for the docs' PNGs).
// Prints one JSON line per check and a last line {"ok": bool, "checks": [...]}; exits 1 on
// the first failure, with what the page showed.

import { chromium } from "playwright-core";

const url = process.env.VOLLEY_URL;
const keys = { alice: process.env.VOLLEY_KEY, bob: process.env.VOLLEY_KEY_2, admin: process.env.VOLLEY_ADMIN_KEY };
const shots = process.env.SCREENSHOTS || "";
const checks = [];
const T = 60_000;

function pass(name, detail = {}) {
  checks.push(name);
  console.log(JSON.stringify({ check: name, ok: true, ...detail }));
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in a container has no user namespaces for the sandbox; audio plays without a click.
  args: ["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--mute-audio"],
});
const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
const page = await context.newPage();
page.setDefaultTimeout(T);
page.on("dialog", (d) => d.accept());
const seen = [];
page.on("request", (r) => seen.push(r.url()));
const consoleErrors = [];
// Refused API calls (the 400, 401, 403 and 404 provoked below) log "Failed to load resource";
// anything else, a policy violation or a script error, fails the run.
page.on("console", (m) => {
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
});
page.on("pageerror", (e) => consoleErrors.push(String(e)));

async function signIn(key) {
  await page.goto(`${url}/`);
  if (await page.locator("#sign-out").isVisible()) await page.click("#sign-out");
  // By keyboard: the field has focus on arrival, Enter signs in.
  await page.waitForFunction(() => document.activeElement && document.activeElement.id === "key", null, { timeout: 5000 })
    .catch(async () => {
      throw new Error(`the key field has no focus; ${await page.evaluate(() => document.activeElement?.tagName)} has`);
    });
  await page.keyboard.type(key);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#batches");
}

async function submit(lines, label) {
  await page.goto(`${url}/console/#/submit`);
  await page.fill("#items", lines.map((l) => JSON.stringify(l)).join("\n"));
  if (label) await page.fill("#label", label);
  await page.click("#submit-form button[type=submit]");
}

/** The batch id of the page shown (#/batches/ID). */
async function batchId() {
  await page.waitForURL(/#\/batches\/\d+/);
  return new URL(page.url()).hash.match(/#\/batches\/(\d+)/)[1];
}

try {
  // Sign in: the root redirects to the console; a wrong key is refused and shown.
  await page.goto(`${url}/`);
  if (!page.url().endsWith("/console/")) throw new Error(`/ did not redirect to /console/: ${page.url()}`);
  await page.fill("#key", "vk_wrong");
  await page.click("#sign-in button[type=submit]");
  await page.waitForSelector("#sign-in .error");
  await signIn(keys.alice);
  pass("sign_in");

  // A per-item validation error in an uploaded JSONL file: nothing created, item and field shown.
  await page.goto(`${url}/console/#/submit`);
  await page.setInputFiles("#file", {
    name: "bad.jsonl", mimeType: "application/jsonl",
    buffer: Buffer.from([
      { endpoint: "/v1/chat/completions", body: { model: "qwen3-8b", messages: [{ role: "user", content: "hi" }] } },
      { endpoint: "/v1/images/generations", body: { prompt: "no model" } },
    ].map((l) => JSON.stringify(l)).join("\n")),
  });
  await page.waitForFunction(() => document.querySelector("#items").value.includes("no model"));
  await page.click("#submit-form button[type=submit]");
  const row = page.locator("#item-errors tr[data-index='1']");
  await row.waitFor();
  const rowText = await row.innerText();
  if (!rowText.includes("requests[1].body.model")) throw new Error(`validation row: ${rowText}`);
  pass("validation_error", { row: rowText.replace(/\s+/g, " ") });

  // A mixed batch of every modality, followed until done.
  await submit([
    { endpoint: "/v1/chat/completions", body: { model: "qwen3-8b", messages: [{ role: "user", content: "Describe a desk lamp." }] } },
    { endpoint: "/v1/completions", body: { model: "qwen3-8b", prompt: "Once upon a time" } },
    { endpoint: "/v1/images/generations", body: { model: "flux-dev", prompt: "a minimalist desk lamp" } },
    { endpoint: "/v1/audio/speech", body: { model: "espeak", input: "Hello from Volley.", voice: "alloy" } },
    { endpoint: "/v1/music/generations", body: { model: "sim-music", prompt: "calm piano" } },
    { endpoint: "/v1/videos/generations", body: { model: "sim-video", prompt: "a lamp turning on" } },
    // The provider refuses this one: a failed job, with the provider's error.
    { endpoint: "/v1/completions", body: { model: "qwen3-8b", prompt: "refused", sim_fail: "fatal" } },
  ], "mixed demo");
  const mixed = await batchId();
  await page.waitForSelector(".progress[data-status='DONE']");
  const processed = await page.locator("[data-count='processed']").innerText();
  const failed = await page.locator("[data-count='failed']").innerText();
  if (processed !== "6" || failed !== "1") {
    throw new Error(`processed ${processed}, failed ${failed}, page: ${await page.locator("main").innerText()}`);
  }
  const bar = await page.locator(".progress").first().getAttribute("aria-valuenow");
  if (bar !== "7") throw new Error(`progress bar at ${bar}`);
  pass("progress_done", { batch: mixed });
  if (shots) await page.screenshot({ path: `${shots}/console-batch.png`, fullPage: true });

  // All results as JSONL, built in the browser: one line per job, in order.
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
  const chunks = [];
  for await (const c of await download.createReadStream()) chunks.push(c);
  const lines = Buffer.concat(chunks).toString("utf8").trim().split("\n").map((l) => JSON.parse(l));
  const ok = lines.slice(0, 6).every((l) => l.status === "PROCESSED" && l.result);
  if (lines.length !== 7 || !ok || lines[6].status !== "FAILED" || !lines[6].error) {
    throw new Error(`results download: ${JSON.stringify(lines).slice(0, 500)}`);
  }
  pass("download_jsonl", { lines: lines.length });

  // The filter by status asks the API for one status only.
  await page.selectOption("#status-filter", "CANCELLED");
  await page.waitForSelector("#jobs .empty");
  await page.selectOption("#status-filter", "FAILED");
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll("#jobs tr[data-job]");
    return rows.length === 1 && rows[0].dataset.status === "FAILED";
  });
  // The failed job: its error's type and message.
  await page.click("#jobs tr[data-job] a");
  const jobError = await page.locator("#job-error").innerText();
  if (!jobError.includes("invalid_request") || !jobError.includes("sim_fail=fatal")) throw new Error(`job error: ${jobError}`);
  pass("failed_job_error", { error: jobError });
  await page.goto(`${url}/console/#/batches/${mixed}`);
  await page.waitForSelector("#jobs tr[data-job]");

  // The image job: the picture decodes.
  await page.click("#jobs tr:has(code:text-is('/v1/images/generations')) a");
  await page.waitForFunction(() => {
    const i = document.querySelector("#result img");
    return i && i.complete && i.naturalWidth > 0;
  });
  const width = await page.$eval("#result img", (i) => i.naturalWidth);
  pass("image_decodes", { naturalWidth: width });
  if (shots) await page.screenshot({ path: `${shots}/console-job.png`, fullPage: true });

  // The speech job: the audio has a duration and plays.
  await page.goto(`${url}/console/#/batches/${mixed}`);
  await page.click("#jobs tr:has(code:text-is('/v1/audio/speech')) a");
  await page.waitForSelector("#result audio");
  const audio = await page.$eval("#result audio", async (a) => {
    if (!(a.duration > 0)) await new Promise((ok, fail) => {
      a.addEventListener("loadedmetadata", ok, { once: true });
      a.addEventListener("error", () => fail(new Error(`audio error ${a.error && a.error.code}`)), { once: true });
    });
    await a.play();
    return { duration: a.duration, paused: a.paused };
  });
  if (!(audio.duration > 0) || audio.paused) throw new Error(`audio: ${JSON.stringify(audio)}`);
  pass("audio_plays", audio);

  // The chat job shows its text.
  await page.goto(`${url}/console/#/batches/${mixed}`);
  await page.click("#jobs tr:has(code:text-is('/v1/chat/completions')) a");
  const text = await page.locator("#result .chat .text").first().innerText();
  if (!text.trim()) throw new Error("empty chat text");
  pass("chat_text", { chars: text.length });

  // A batch of long jobs, cancelled from its page while running.
  await submit([1, 2, 3].map((i) => ({
    endpoint: "/v1/completions", body: { model: "qwen3-8b", prompt: `slow ${i}`, sim_latency_ms: 120000 },
  })), "long");
  const long = await batchId();
  // One job first, from its row.
  const first = page.locator("#jobs tr[data-job]").first();
  await first.locator("button").click();
  await page.waitForSelector("#jobs tr[data-job][data-status='CANCELLED']");
  const others = await page.locator("#jobs tr[data-job][data-status='CANCELLED']").count();
  if (others !== 1) throw new Error(`cancelling one job cancelled ${others}`);
  if (shots) {
    // The list while one batch runs: its bar split between cancelled and running.
    await page.goto(`${url}/console/#/batches`);
    await page.waitForSelector(`#batches tr[data-batch='${long}'] .seg.s-cancelled`);
    await page.evaluate(() => { document.getElementById("toast").textContent = ""; });
    await page.screenshot({ path: `${shots}/console-batches.png`, fullPage: true });
    await page.goto(`${url}/console/#/batches/${long}`);
  }
  await page.waitForSelector("#cancel-batch:not([disabled])");
  await page.click("#cancel-batch");
  await page.waitForSelector(".progress[data-status='DONE']");
  const cancelled = await page.locator("[data-count='cancelled']").innerText();
  if (cancelled !== "3") throw new Error(`cancelled count ${cancelled}`);
  pass("cancel_batch", { batch: long });

  // The list, newest first, both batches done.
  await page.goto(`${url}/console/#/batches`);
  await page.waitForSelector(`#batches tr[data-batch='${mixed}'] .progress[data-status='DONE']`);
  const order = await page.$$eval("#batches tr[data-batch]", (rows) => rows.map((r) => r.dataset.batch));
  if (order[0] !== long || order[1] !== mixed) throw new Error(`order ${order}`);
  pass("batches_list", { order });

  // A phone-sized screen: nothing wider than the screen, on the list and on a batch.
  await page.setViewportSize({ width: 360, height: 740 });
  for (const hash of ["#/batches", `#/batches/${mixed}`]) {
    await page.goto(`${url}/console/${hash}`);
    await page.waitForSelector("table.list tbody tr");
    const over = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (over > 0) throw new Error(`${hash} is ${over}px wider than a 360px screen`);
  }
  await page.setViewportSize({ width: 1200, height: 800 });
  pass("narrow_screen");

  // Not an operator: the operator page says so.
  await page.goto(`${url}/console/#/operator`);
  await page.waitForSelector("#operator .error");
  const refused = await page.locator("#operator .error").innerText();
  if (!refused.includes("forbidden")) throw new Error(`operator page for a tenant: ${refused}`);

  // Another owner's key sees none of these batches, not even by id.
  await signIn(keys.bob);
  await page.waitForSelector("#batches .empty");
  await page.goto(`${url}/console/#/batches/${mixed}`);
  await page.waitForSelector("main .error");
  const notFound = await page.locator("main .error").innerText();
  if (!notFound.includes("not_found")) throw new Error(`bob reading alice's batch: ${notFound}`);
  pass("second_key_isolated");

  // An admin key sees the queues.
  await signIn(keys.admin);
  await page.goto(`${url}/console/#/operator`);
  await page.waitForSelector("#operator tr[data-queue='image']");
  pass("operator_page");

  // The key never went into a URL.
  for (const k of Object.values(keys)) {
    if (seen.some((u) => u.includes(k))) throw new Error("an API key appeared in a URL");
  }
  if (consoleErrors.length) throw new Error(`browser console errors: ${consoleErrors.join(" | ")}`);
  pass("key_never_in_url");
  console.log(JSON.stringify({ ok: true, checks }));
} catch (e) {
  let shown = "";
  try { shown = (await page.locator("main").innerText()).slice(0, 2000); } catch { /* page gone */ }
  console.log(JSON.stringify({ ok: false, checks, error: String(e && e.stack || e), url: page.url(), page: shown }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
