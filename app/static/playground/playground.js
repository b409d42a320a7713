// The playground's script. It reads the form's defaults and limits from the server
// (playground/config.json), the model from /health, and streams /v1/completions into the page,
// like any other client of the API. URLs are relative so that the page also works behind a proxy
// that serves the server under a path prefix.
"use strict";

// The docs page keeps its key under the same name: a key typed in one serves both, for this tab only.
const KEY_STORE = "gpt-server-api-key";

// How each request field of /v1/completions is shown; the defaults and ranges come from the server.
const FIELD_UI = {
  max_tokens: { label: "Max new tokens", step: "1" },
  temperature: { label: "Temperature", step: "0.05", note: "0 = greedy" },
  top_k: { label: "Top-k", step: "1", note: "0 = off" },
  top_p: { label: "Top-p", step: "0.01", note: "1 = off" },
  repetition_penalty: { label: "Repetition penalty", step: "0.05", note: "1 = off" },
  seed: { label: "Seed", step: "1", placeholder: "random", note: "same seed, same text", noRange: true },
  n: { label: "Completions (n)", step: "1" },
  stop: { label: "Stop strings", textarea: true, note: "one per line; \\n for a line break" },
};

const $ = (id) => document.getElementById(id);
const inputs = {};
let keyRequired = false;
let controller = null; // aborts the running request: the server cancels a generation whose client left
let lastRequest = null;

// ---- the form ----------------------------------------------------------------------------------------

function rangeText(field) {
  const parts = [];
  if (field.exclusive_min !== undefined) parts.push(`> ${field.exclusive_min}`);
  if (field.min !== undefined && field.max !== undefined) parts.push(`${field.min} to ${field.max}`);
  else if (field.min !== undefined) parts.push(`≥ ${field.min}`);
  else if (field.max !== undefined) parts.push(`≤ ${field.max}`);
  if (field.max_items !== undefined) parts.push(`at most ${field.max_items}`);
  return parts.join(", ");
}

function buildFields(fields) {
  const box = $("fields");
  for (const [name, ui] of Object.entries(FIELD_UI)) {
    const field = fields[name];
    if (!field) continue; // a server without this field: leave it out
    const row = document.createElement("div");
    row.className = "field";
    const label = document.createElement("label");
    label.htmlFor = name;
    label.textContent = ui.label;
    const input = document.createElement(ui.textarea ? "textarea" : "input");
    input.id = name;
    input.name = name;
    if (ui.textarea) {
      input.rows = 2;
      input.spellcheck = false;
    } else {
      input.type = "number";
      input.step = ui.step;
      // Shown as hints (:invalid styles them) but never enforced here: the server says what is wrong.
      if (field.min !== undefined && !ui.noRange) input.min = field.min;
      if (field.max !== undefined && !ui.noRange) input.max = field.max;
    }
    if (field.default !== null && field.default !== undefined && !Array.isArray(field.default)) {
      input.value = field.default;
    }
    if (ui.placeholder) input.placeholder = ui.placeholder;
    const hint = document.createElement("small");
    const range = ui.noRange ? "" : rangeText(field);
    hint.textContent = [range, ui.note].filter(Boolean).join(" · ");
    row.append(label, input, hint);
    box.append(row);
    inputs[name] = input;
  }
}

// A number exactly as typed when it is a JSON number (a 64-bit seed keeps every digit); otherwise
// what JavaScript reads in it (".5" is 0.5).
function jsonNumber(text) {
  return /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/.test(text) ? text : String(Number(text));
}

function stopStrings(text) {
  return text.split("\n").filter((line) => line !== "")
    .map((line) => line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

// The request body as JSON text, built field by field so that it is sent (and shown as curl) exactly.
function requestBody() {
  const parts = [["prompt", JSON.stringify($("prompt").value)]];
  for (const [name, input] of Object.entries(inputs)) {
    if (name === "stop") {
      const stops = stopStrings(input.value);
      if (stops.length) parts.push([name, JSON.stringify(stops)]);
      continue;
    }
    if (input.validity.badInput) throw new Error(`${FIELD_UI[name].label}: not a number`);
    const value = input.value.trim();
    if (value !== "") parts.push([name, jsonNumber(value)]);
  }
  parts.push(["stream", "true"], ["stream_options", '{"include_usage": true}']);
  return "{" + parts.map(([k, v]) => `${JSON.stringify(k)}: ${v}`).join(", ") + "}";
}

// ---- the API key ---------------------------------------------------------------------------------------

function apiKey() {
  return keyRequired ? $("api-key").value.trim() : "";
}

function setUpKey(required) {
  keyRequired = required;
  $("key-row").hidden = !required;
  if (!required) return;
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, key.value.trim()));
}

// ---- server information ----------------------------------------------------------------------------------

async function loadHealth() {
  const info = $("model-info");
  let health;
  try {
    health = await (await fetch("health", { cache: "no-store" })).json();
  } catch (error) {
    info.textContent = "the server cannot be reached; retrying…";
    setTimeout(loadHealth, 5000);
    return;
  }
  if (health.status !== "ok") {
    info.textContent = `${health.model || "the model"}: ${health.status}` + (health.error ? ` (${health.error})` : "");
    if (health.status === "loading") setTimeout(loadHealth, 2000);
    return;
  }
  info.replaceChildren();
  const items = [
    ["model-name", health.model], ["model-device", health.device], ["model-dtype", health.dtype],
    ["model-quantization", health.quantization !== "none" && health.quantization],
    ["model-context", `context ${health.context_length} tokens`],
  ];
  for (const [id, text] of items) {
    if (!text) continue;
    const span = document.createElement("span");
    span.id = id;
    span.textContent = text;
    info.append(span);
  }
}

// ---- output ------------------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

// The server's own words: its JSON error message (every route answers `{"error": {"message": ...}}`).
async function errorMessage(response) {
  const text = await response.text();
  let message = text;
  try {
    message = JSON.parse(text).error.message;
  } catch (error) {
    // not the JSON error shape (a proxy's page, say): show what came
  }
  return `${response.status} ${response.statusText}: ${message}`.replace(/ +:/, ":");
}

function pane(run, index) {
  while (run.panes.length <= index) {
    const article = $("completion-template").content.firstElementChild.cloneNode(true);
    article.querySelector(".index").textContent = `#${run.panes.length + 1}`;
    article.querySelector(".prompt-echo").textContent = run.prompt;
    $("output").append(article);
    run.panes.push(article);
  }
  return run.panes[index];
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function showStats(run, done) {
  $("stat-ttft").textContent = run.first === null ? (done ? "–" : "waiting…") : seconds(run.first - run.start);
  // Exact counts come with the last event (usage); until then each text event counts as one token.
  const generated = run.usage ? run.usage.completion_tokens : run.events;
  const approx = run.usage ? "" : "≈";
  $("stat-completion").textContent = run.first === null && !run.usage ? "–" : approx + generated;
  $("stat-prompt").textContent = run.usage ? run.usage.prompt_tokens : "–";
  $("stat-total").textContent = run.usage ? run.usage.total_tokens : "–";
  // Generation speed after the first token (time to first token is shown on its own).
  const span = run.last !== null ? (run.last - run.first) / 1000 : 0;
  $("stat-speed").textContent = span > 0 ? (generated / span).toFixed(1) : "–";
  let finish = "running…";
  if (done) {
    const reasons = [...new Set(run.finish.filter(Boolean))];
    finish = run.stopped ? "stopped (cancelled on the server)" : reasons.join(", ") || "–";
  }
  $("stat-finish").textContent = finish;
}

function onChunk(run, chunk) {
  if (chunk.usage) run.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const article = pane(run, choice.index);
    if (choice.text) {
      const now = performance.now();
      if (run.first === null) run.first = now;
      run.last = now;
      run.events += 1;
      article.querySelector(".generated").append(choice.text);
    }
    if (choice.finish_reason) {
      run.finish[choice.index] = choice.finish_reason;
      article.querySelector(".finish").textContent = choice.finish_reason;
    }
  }
  showStats(run, false);
}

// Server-sent events: `data: <JSON>` blocks separated by a blank line, ending with `data: [DONE]`.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message); // a failure after the stream started
      onEvent(event);
    }
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  document.body.classList.toggle("running", running);
}

async function generate() {
  $("error").hidden = true;
  let body;
  try {
    body = requestBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers["Authorization"] = `Bearer ${apiKey()}`;
  lastRequest = { url: new URL("v1/completions", document.baseURI).href, headers, body };
  showCurl();

  const run = {
    prompt: $("prompt").value, panes: [], finish: [], usage: null, events: 0,
    start: performance.now(), first: null, last: null, stopped: false,
  };
  $("output").replaceChildren();
  controller = new AbortController();
  setRunning(true);
  showStats(run, false);
  try {
    const response = await fetch("v1/completions", {
      method: "POST", headers, body, signal: controller.signal, cache: "no-store",
    });
    if (!response.ok) {
      showError(await errorMessage(response));
      if (response.status === 401) $("api-key").focus();
      return;
    }
    await readEvents(response, (chunk) => onChunk(run, chunk));
  } catch (error) {
    if (error.name === "AbortError") run.stopped = true;
    else showError(error.message);
  } finally {
    controller = null;
    setRunning(false);
    for (const [index, article] of run.panes.entries()) {
      if (!run.finish[index] && run.stopped) article.querySelector(".finish").textContent = "stopped";
    }
    showStats(run, true);
  }
}

// ---- copy as curl ---------------------------------------------------------------------------------------------

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function curlCommand(req) {
  const lines = [`curl -N ${shellQuote(req.url)}`];
  for (const [name, value] of Object.entries(req.headers)) lines.push(`  -H ${shellQuote(`${name}: ${value}`)}`);
  lines.push(`  -d ${shellQuote(req.body)}`);
  return lines.join(" \\\n");
}

function showCurl() {
  $("curl").textContent = curlCommand(lastRequest);
  $("curl-box").hidden = false;
  $("copy-curl").disabled = false;
}

async function copyCurl() {
  const text = $("curl").textContent;
  const note = $("copy-note");
  try {
    await navigator.clipboard.writeText(text); // only in a secure context (https, or localhost)
    note.textContent = "copied";
  } catch (error) {
    // Plain http on another host: select the command so that it can be copied by hand.
    $("curl-box").open = true;
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    note.textContent = document.execCommand("copy") ? "copied" : "selected: copy it with Ctrl+C";
  }
  setTimeout(() => { note.textContent = ""; }, 3000);
}

// ---- start ----------------------------------------------------------------------------------------------------

async function start() {
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!controller) generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("copy-curl").addEventListener("click", copyCurl);
  loadHealth();
  try {
    const response = await fetch("playground/config.json", { cache: "no-store" });
    if (!response.ok) throw new Error(await errorMessage(response));
    const config = await response.json();
    buildFields(config.fields);
    setUpKey(config.api_key_required);
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(`the page could not read the server's settings: ${error.message}`);
  }
}

start();
