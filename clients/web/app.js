// npugate's browser chat client: one WebSocket (/v1/ws), conversations tagged by id.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = { model: $("model"), status: $("status"), transcript: $("transcript"),
             stats: $("stats"), form: $("composer"), prompt: $("prompt"),
             send: $("send"), stop: $("stop"), newChat: $("new-chat") };

let socket = null;
let backoff = 500;
let history = [];          // the conversation so far, as OpenAI messages
let active = null;         // {id, el, text, sentAt, firstAt}
let counter = 0;
let apiKey = sessionStorage.getItem("npugate-api-key") || "";

function authHeaders() {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

function askForKey() {
  const key = window.prompt("This server needs an API key:");
  if (key) {
    apiKey = key.trim();
    sessionStorage.setItem("npugate-api-key", apiKey);
  }
  return Boolean(key);
}

function newId() {
  counter += 1;
  return (crypto.randomUUID ? crypto.randomUUID() : `c${Date.now()}`) + `-${counter}`;
}

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = kind || "";
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

// Text with ``` fences becomes paragraphs and <pre><code> blocks; never innerHTML.
function render(el, text) {
  el.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      if (part) el.append(document.createTextNode(part));
      return;
    }
    const newline = part.indexOf("\n");
    const body = newline >= 0 ? part.slice(newline + 1) : part;
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = body;
    pre.append(code);
    el.append(pre);
  });
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.setAttribute("data-role", role);
  render(el, text);
  ui.transcript.append(el);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return el;
}

function note(el, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  el.append(span);
}

function finish(reason, usage) {
  if (!active) return;
  const { el, text, sentAt, firstAt } = active;
  const end = performance.now();
  if (text) history.push({ role: "assistant", content: text });
  if (reason === "cancelled") note(el, "stopped");
  else if (reason === "length") note(el, "reached the token limit");
  if (usage && firstAt) {
    const decodeS = (end - firstAt) / 1000;
    const rate = usage.completion_tokens > 1 && decodeS > 0
      ? ((usage.completion_tokens - 1) / decodeS).toFixed(1) : "–";
    ui.stats.textContent = `time to first token ${(firstAt - sentAt).toFixed(0)} ms · ` +
      `${rate} tokens/s · ${usage.completion_tokens} tokens`;
  }
  el.setAttribute("data-done", reason);
  active = null;
  setBusy(false);
  ui.prompt.focus();
}

function onMessage(event) {
  const msg = JSON.parse(event.data);
  if (msg.type === "pong" || msg.type === "auth.ok") return;
  if (msg.type === "error" && msg.id === null && msg.error.code === "invalid_api_key") {
    setStatus("API key rejected", "bad");
    sessionStorage.removeItem("npugate-api-key");
    apiKey = "";
    return;
  }
  if (!active || msg.id !== active.id) return;
  if (msg.type === "chat.delta") {
    const choice = msg.chunk.choices[0];
    const piece = choice && choice.delta && choice.delta.content;
    if (piece) {
      if (!active.firstAt) active.firstAt = performance.now();
      active.text += piece;
      render(active.el, active.text);
      active.el.setAttribute("data-chunks", String(Number(active.el.getAttribute("data-chunks") || 0) + 1));
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
    }
  } else if (msg.type === "chat.done") {
    finish(msg.finish_reason, msg.usage);
  } else if (msg.type === "error") {
    active.el.classList.add("error");
    note(active.el, `error: ${msg.error.message}`);
    finish("error", null);
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/v1/ws`);
  socket.addEventListener("open", () => {
    if (apiKey) socket.send(JSON.stringify({ type: "auth", api_key: apiKey }));
    backoff = 500;
    setStatus("connected", "ok");
  });
  socket.addEventListener("message", onMessage);
  socket.addEventListener("close", () => {
    if (active) {
      note(active.el, "connection lost");
      finish("interrupted", null);
    }
    setStatus(`disconnected, retrying in ${(backoff / 1000).toFixed(1)} s`, "bad");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 8000);
  });
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders() });
    if (resp.status === 401) {
      if (askForKey()) {
        if (socket) socket.close();  // reconnects, sending the key first
        return loadModels();
      }
      setStatus("an API key is needed", "bad");
      return;
    }
    const body = await resp.json();
    const chat = body.data.filter((m) => m.task === "chat");
    ui.model.replaceChildren(...chat.map((m) => new Option(m.id, m.id)));
    if (!chat.length) setStatus("no chat model is ready", "bad");
  } catch (err) {
    setStatus("could not list models", "bad");
    setTimeout(loadModels, 2000);
  }
}

function sendPrompt() {
  const text = ui.prompt.value.trim();
  if (!text || active) return;
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setStatus("not connected yet", "bad");
    return;
  }
  addMessage("user", text);
  history.push({ role: "user", content: text });
  ui.prompt.value = "";
  const id = newId();
  active = { id, el: addMessage("assistant", ""), text: "", sentAt: performance.now(),
             firstAt: 0 };
  active.el.setAttribute("data-id", id);
  setBusy(true);
  ui.stats.textContent = "";
  socket.send(JSON.stringify({ type: "chat.create", id, request: {
    model: ui.model.value, messages: history, max_tokens: 1024, temperature: 0.7 } }));
}

function stop() {
  if (active && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "chat.cancel", id: active.id }));
  }
}

ui.form.addEventListener("submit", (e) => { e.preventDefault(); sendPrompt(); });
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", () => {
  stop();
  history = [];
  ui.transcript.replaceChildren();
  ui.stats.textContent = "";
  ui.prompt.focus();
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendPrompt(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
setInterval(() => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send('{"type":"ping"}');
}, 25000);

loadModels();
connect();
ui.prompt.focus();
