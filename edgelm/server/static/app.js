// edgelm web chat: plain JS, no dependencies. Streams /v1/chat/completions (SSE over fetch)
// and shows tokens per second (live from the stream, final from the server's timings).
// Images and audio attached to a message go as OpenAI content parts (image_url with a data:
// URL, input_audio with base64 data), before the message's text; bundles without Gemma 3n's
// towers answer them with a 400 that the page shows.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
let history = [];      // [{role, content}] of finished turns (content: a string, or content parts)
let controller = null; // AbortController of the reply in flight
let pending = [];      // attachments for the next message: {kind, name, size, url, data, format}

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

function addMessage(role, text, attachments) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const r = document.createElement("span");
  r.className = "role";
  r.textContent = role === "assistant" ? "model" : role;
  div.appendChild(r);
  if (attachments && attachments.length) {
    const strip = document.createElement("div");
    strip.className = "attachments";
    for (const a of attachments) strip.appendChild(attachmentView(a));
    div.appendChild(strip);
  }
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.appendChild(body);
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

// ------------------------------------------------------------------ attachments

// input_audio formats by file extension and by MIME subtype (audio/x-wav, audio/mpeg, ...)
const AUDIO_EXTS = new Map([["wav", "wav"], ["wave", "wav"], ["mp3", "mp3"], ["flac", "flac"], ["ogg", "ogg"],
                            ["oga", "ogg"]]);
const AUDIO_MIMES = new Map([["wav", "wav"], ["wave", "wav"], ["vnd.wave", "wav"], ["mpeg", "mp3"], ["mp3", "mp3"],
                             ["flac", "flac"], ["ogg", "ogg"]]);
const IMAGE_EXTS = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

function extension(name) {
  const m = name.match(/\.([^.]+)$/);
  return m ? m[1].toLowerCase() : "";
}

// "image" or "audio" (by the file name's extension, else its MIME type), or null
function attachmentKind(file) {
  const ext = extension(file.name);
  if (AUDIO_EXTS.has(ext)) return "audio";
  if (IMAGE_EXTS.includes(ext)) return "image";
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("audio/")) return "audio";
  return null;
}

// the input_audio format (wav, mp3, flac, ogg) from the extension or MIME type; undefined
// where neither says (the server then tells the format from the bytes)
function audioFormat(file) {
  const ext = extension(file.name);
  if (AUDIO_EXTS.has(ext)) return AUDIO_EXTS.get(ext);
  const sub = (file.type.split("/")[1] || "").toLowerCase().replace(/^x-/, "");
  return AUDIO_MIMES.get(sub);
}

function sizeLabel(n) {
  return n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MB" : Math.max(1, Math.round(n / 1024)) + " KB";
}

function attachmentView(a) {  // a thumbnail (image) or a labelled chip (audio)
  const el = document.createElement("span");
  el.className = "attachment " + a.kind;
  el.title = a.name + " (" + sizeLabel(a.size) + ")";
  if (a.kind === "image") {
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = a.url;
    img.alt = a.name;
    el.appendChild(img);
  } else {
    const label = document.createElement("span");
    label.className = "audio-label";
    label.textContent = "audio: " + a.name;
    el.appendChild(label);
  }
  return el;
}

function attachNote(text) {
  const n = $("attach-note");
  n.textContent = text || "";
  n.hidden = !text;
}

function renderPending() {
  const strip = $("pending");
  strip.textContent = "";
  pending.forEach((a) => {
    const el = attachmentView(a);
    const x = document.createElement("button");
    x.type = "button";
    x.className = "remove";
    x.textContent = "\u00d7";
    x.title = "Remove " + a.name;
    x.setAttribute("aria-label", "Remove " + a.name);
    x.addEventListener("click", () => {
      pending = pending.filter((p) => p !== a);
      renderPending();
    });
    el.appendChild(x);
    strip.appendChild(el);
  });
  strip.hidden = pending.length === 0;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error || new Error("cannot read the file"));
    fr.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const notes = [];
  for (const file of files) {
    const kind = attachmentKind(file);
    if (!kind) {
      notes.push(file.name + " is not an image or audio file (JPEG, PNG, WebP, GIF; WAV, MP3, FLAC, OGG)");
      continue;
    }
    try {
      const url = await readFile(file);
      const a = { kind, name: file.name, size: file.size, url, data: url.slice(url.indexOf(",") + 1) };
      if (kind === "audio") a.format = audioFormat(file);
      pending.push(a);
    } catch (e) {
      notes.push(file.name + ": " + e.message);
    }
  }
  attachNote(notes.join("; "));
  renderPending();
}

// the OpenAI content part of an attachment
function contentPart(a) {
  if (a.kind === "image") return { type: "image_url", image_url: { url: a.url } };
  const audio = { data: a.data };
  if (a.format) audio.format = a.format;
  return { type: "input_audio", input_audio: audio };
}

// a user message's content: the text alone, or (with attachments) the attachments' parts
// followed by the text's (media first, as `edgelm chat` does with /image and /audio)
function userContent(text, attachments) {
  if (!attachments.length) return text;
  const parts = attachments.map(contentPart);
  if (text) parts.push({ type: "text", text });
  return parts;
}

// ------------------------------------------------------------------ chat

async function send(text, attachments) {
  const messages = [];
  const sys = $("system").value.trim();
  if (sys) messages.push({ role: "system", content: sys });
  const content = userContent(text, attachments);
  messages.push(...history, { role: "user", content });
  addMessage("user", text, attachments);
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
      try { msg = (await resp.json()).error.message + " (HTTP " + resp.status + ")"; } catch (e) { /* keep status */ }
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
    finishReply(div, content, reply, timings, finish, t0, tFirst, chunks, false);
    sent(attachments);
  } catch (e) {
    if (e.name === "AbortError") {
      finishReply(div, content, reply, timings, "cancelled", t0, tFirst, chunks, true);
      sent(attachments);
    } else {
      // the turn is not kept: the attachments stay pending and the text goes back to the input
      let msg = e.message;
      if (e instanceof TypeError && attachments.length) {
        // (a body over the server's limit can end in a dropped connection rather than a 413)
        msg += " (the server closed the connection: the attachments may be larger than the "
             + "server's request size limit, edgelm serve --max-body)";
      }
      div.className = "msg error";
      div.removeAttribute("id");  // (the retry's reply takes this turn's id)
      body.textContent = "Error: " + msg;
      if (!input.value && text) input.value = text;
      setBusy(false, "error");
    }
  } finally {
    controller = null;
    stopBtn.disabled = true;
    sendBtn.disabled = false;
  }
}

// the attachments of a turn that entered the history are no longer pending
function sent(attachments) {
  if (!attachments.length) return;
  pending = pending.filter((a) => !attachments.includes(a));
  renderPending();
}

function finishReply(div, content, reply, timings, finish, t0, tFirst, chunks, cancelled) {
  history.push({ role: "user", content }, { role: "assistant", content: reply });
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
  if ((!text && !pending.length) || controller) return;
  input.value = "";
  attachNote("");
  send(text, pending.slice());
});
$("attach").addEventListener("change", async (ev) => {
  const files = Array.from(ev.target.files || []);
  ev.target.value = "";  // (so choosing the same file again fires change)
  await addFiles(files);
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
