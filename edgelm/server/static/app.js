// edgelm web chat: plain JS, no dependencies. Streams /v1/chat/completions (SSE over fetch)
// and shows tokens per second (live from the stream, final from the server's timings).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
let history = [];      // [{role, content}] of finished turns
let controller = null; // AbortController of the reply in flight

$("api-key").value = localStorage.getItem("edgelm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("edgelm-api-key", $("api-key").value);
  loadModel();  // /v1/models needs the key when the server has one
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const r = document.createElement("span");
  r.className = "role";
  r.textContent = role === "assistant" ? "model" : role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(r, body);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy, state) {
  sendBtn.disabled = busy;
  stopBtn.disabled = !busy;
  $("state").textContent = state;
}

// the text of edgelm.runtime.modelinfo.BASE_MODEL_NOTICE (tests/test_web.py checks they agree)
const BASE_NOTICE = "This is a base model: it continues text and is not tuned for chat, so its replies may ramble. Use an instruction-tuned (-it) model to chat.";

function showNotice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) {
      const j = await r.json();
      const m = j.data && j.data[0];
      if (m) {
        $("model-name").textContent = m.id;
        showNotice(m.instruction_tuned === false ? BASE_NOTICE : "");
      }
    }
  } catch (e) { /* shown on first send */ }
}

async function send(text) {
  const messages = [];
  const sys = $("system").value.trim();
  if (sys) messages.push({ role: "system", content: sys });
  messages.push(...history, { role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.id = "reply-" + (history.length / 2);
  const body = div.querySelector(".content");
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  const req = { messages, stream: true, stream_options: { include_usage: true } };
  const model = $("model-name").textContent;
  if (model) req.model = model;  // (omitted: the server's one model)
  if (!Number.isNaN(temperature)) req.temperature = temperature;
  if (!Number.isNaN(maxTokens)) req.max_tokens = maxTokens;

  controller = new AbortController();
  setBusy(true, "generating");
  let reply = "", chunks = 0, tFirst = null, timings = null, finish = null;
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                        body: JSON.stringify(req), signal: controller.signal });
    const notice = resp.headers.get("X-Edgelm-Notice");
    if (notice) showNotice(notice);
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      try { msg = (await resp.json()).error.message; } catch (e) { /* keep status */ }
      throw new Error(msg);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.timings) timings = j.timings;
          const c = j.choices && j.choices[0];
          if (!c) continue;
          if (c.finish_reason) finish = c.finish_reason;
          const piece = c.delta && c.delta.content;
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            reply += piece;
            chunks += 1;
            body.textContent = reply;
            const secs = (performance.now() - tFirst) / 1000;
            if (secs > 0 && chunks > 1) $("tps").textContent = ((chunks - 1) / secs).toFixed(1) + " tok/s";
            log.scrollTop = log.scrollHeight;
          }
        }
      }
    }
    finishReply(div, text, reply, timings, finish, t0, tFirst, chunks, false);
  } catch (e) {
    if (e.name === "AbortError") {
      finishReply(div, text, reply, timings, "cancelled", t0, tFirst, chunks, true);
    } else {
      div.className = "msg error";
      body.textContent = "Error: " + e.message;
      setBusy(false, "error");
    }
  } finally {
    controller = null;
    stopBtn.disabled = true;
    sendBtn.disabled = false;
  }
}

function finishReply(div, userText, reply, timings, finish, t0, tFirst, chunks, cancelled) {
  history.push({ role: "user", content: userText }, { role: "assistant", content: reply });
  let tps;
  if (timings && timings.decode_tok_s > 0) tps = timings.decode_tok_s;
  else if (tFirst !== null && chunks > 1) tps = (chunks - 1) / ((performance.now() - tFirst) / 1000);
  const stats = document.createElement("span");
  stats.className = "stats";
  const parts = [];
  if (timings) parts.push(timings.generated_tokens + " tokens");
  if (tps !== undefined) parts.push(tps.toFixed(1) + " tok/s");
  if (tFirst !== null) parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
  if (finish) parts.push(finish);
  stats.textContent = parts.join(" · ");
  div.appendChild(stats);
  div.dataset.done = "1";
  if (tps !== undefined) $("tps").textContent = tps.toFixed(1) + " tok/s";
  setBusy(false, cancelled ? "stopped" : "ready");
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.textContent = "";
  $("tps").textContent = "– tok/s";
  setBusy(false, "ready");
});
loadModel();
