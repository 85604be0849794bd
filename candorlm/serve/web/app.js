// candorlm's web chat: streams answers from /v1/chat/completions, keeps conversations in this
// browser's localStorage, and sends ratings and preferences to /v1/feedback/*.
// Model output is only ever inserted as text (textContent / text nodes), never as HTML:
// whatever the model writes, the page shows it and runs none of it.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "candor.conversations", CURRENT = "candor.current", SETTINGS = "candor.settings";
const FIELDS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "api-key"];

let conversations = load(STORE, []);
let current = localStorage.getItem(CURRENT);
let controller = null;  // the AbortController of the answer being streamed
let modelName = null;

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  if (current) localStorage.setItem(CURRENT, current);
}
function uid() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function conv() {
  let c = conversations.find((x) => x.id === current);
  if (!c) {
    c = {id: uid(), title: "New chat", messages: [], updated: Date.now()};
    conversations.unshift(c);
    current = c.id;
    save();
  }
  return c;
}

// --- rendering

// Text with ``` fenced code blocks: prose as text nodes, code in <pre><code>, both by textContent.
function renderText(target, text) {
  target.replaceChildren();
  const fence = /```([^\n`]*)\n?([\s\S]*?)(?:```|$)/g;
  let last = 0, m;
  while ((m = fence.exec(text)) !== null) {
    if (m.index > last) target.append(document.createTextNode(text.slice(last, m.index)));
    const pre = el("pre", "code");
    const code = el("code", null, m[2].replace(/\n$/, ""));
    if (m[1].trim()) code.dataset.lang = m[1].trim();
    pre.append(code);
    target.append(pre);
    last = fence.lastIndex;
    if (m[0].length === 0) break;
  }
  if (last < text.length) target.append(document.createTextNode(text.slice(last)));
}

function messageView(c, msg, i) {
  const box = el("div", `msg ${msg.role}`);
  box.dataset.id = msg.id;
  const content = el("div", "content");
  renderText(content, msg.content);
  box.append(content);
  if (msg.role !== "assistant") return box;
  if (msg.stopped) box.append(el("span", "note", "(stopped)"));
  const tools = el("div", "tools");
  for (const [value, label, mark] of [[1, "Good answer", "👍"], [-1, "Bad answer", "👎"]]) {
    const b = el("button", "rate", mark);
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.setAttribute("aria-pressed", String(msg.rating === value));
    b.onclick = () => rate(c, i, value);
    tools.append(b);
  }
  if (i === c.messages.length - 1) {
    const r = el("button", "regenerate", "Regenerate");
    r.type = "button";
    r.onclick = () => regenerate();
    tools.append(r);
  }
  box.append(tools);
  return box;
}

function render() {
  const c = conv();
  const list = $("conversations");
  list.replaceChildren();
  for (const x of conversations) {
    const li = el("li");
    const b = el("button", x.id === current ? "active" : "", x.title);
    b.type = "button";
    b.onclick = () => { if (!controller) { current = x.id; save(); render(); } };
    li.append(b);
    list.append(li);
  }
  const box = $("messages");
  box.replaceChildren(...c.messages.map((m, i) => messageView(c, m, i)));
  if (c.pending) box.append(compareView(c));
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// --- talking to the server

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function sampling() {
  const num = (id) => $(id).value === "" ? undefined : Number($(id).value);
  const s = {temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
             max_tokens: num("max_tokens"), seed: num("seed")};
  return Object.fromEntries(Object.entries(s).filter(([, v]) => v !== undefined && !Number.isNaN(v)));
}

// The messages the model sees before the answer at `upto` (exclusive): system prompt, turns.
function prompt(c, upto = c.messages.length) {
  const head = c.system ? [{role: "system", content: c.system}] : [];
  return head.concat(c.messages.slice(0, upto).map((m) => ({role: m.role, content: m.content})));
}

async function post(path, body) {
  const res = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!res.ok) {
    const e = await res.json().catch(() => null);
    throw new Error(e?.error?.message || `${res.status} ${res.statusText}`);
  }
  return res;
}

// Stream one request's n answers; onText(index, text so far). Resolves to what came.
async function stream(messages, n, onText) {
  controller = new AbortController();
  setBusy(true);
  const out = {texts: Array(n).fill(""), chunks: 0, usage: null, version: null, stopped: false};
  let first = null, lastAt = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model: modelName, messages, n, stream: true, stream_options: {include_usage: true},
                            ...sampling()}),
    });
    if (!res.ok) {
      const e = await res.json().catch(() => null);
      throw new Error(e?.error?.message || `${res.status} ${res.statusText}`);
    }
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const obj = JSON.parse(line.slice(6));
          if (obj.error) throw new Error(obj.error.message);
          out.version = obj.system_fingerprint || out.version;
          if (obj.usage && !obj.choices.length) out.usage = obj.usage;
          for (const ch of obj.choices) {
            const piece = ch.delta?.content;
            if (!piece) continue;
            out.chunks += 1;
            lastAt = performance.now();
            first = first ?? lastAt;
            out.texts[ch.index] += piece;
            onText(ch.index, out.texts[ch.index]);
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") out.stopped = true;
    else showError(String(e.message || e));
  } finally {
    controller = null;
    setBusy(false);
  }
  const tokens = out.usage ? out.usage.completion_tokens : out.chunks;
  const secs = first !== null && lastAt > first ? (lastAt - first) / 1000 : 0;
  $("speed").textContent = `${tokens} tokens` + (secs ? `, ${(Math.max(tokens - 1, 0) / secs).toFixed(1)} tokens/s` : "");
  return out;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("compare").disabled = busy;
  $("stop").disabled = !busy;
}

async function answer(c) {
  const msgs = prompt(c);
  const msg = {role: "assistant", content: "", id: uid()};
  c.messages.push(msg);
  render();
  const view = $("messages").lastElementChild.querySelector(".content");
  const got = await stream(msgs, 1, (_, text) => renderText(view, text));
  msg.content = got.texts[0];
  msg.version = got.version;
  msg.stopped = got.stopped;
  if (!msg.content && !got.stopped) c.messages.pop();  // an error before any text: nothing to keep
  c.updated = Date.now();
  save();
  render();
}

async function compare(c) {
  const msgs = prompt(c);
  c.pending = {answers: ["", ""], done: false};
  render();
  const views = [...$("messages").querySelectorAll(".compare .content")];
  const got = await stream(msgs, 2, (i, text) => renderText(views[i], text));
  if (got.stopped || !got.texts[0] || !got.texts[1] || got.texts[0] === got.texts[1]) {
    // nothing to choose between: keep the first answer, if any, as the reply
    delete c.pending;
    if (got.texts[0]) c.messages.push({role: "assistant", content: got.texts[0], id: uid(), version: got.version,
                                       stopped: got.stopped});
  } else {
    c.pending = {answers: got.texts, done: true, version: got.version};
  }
  save();
  render();
}

function compareView(c) {
  const box = el("div", "compare");
  c.pending.answers.forEach((text, i) => {
    const col = el("div", "msg assistant candidate");
    const content = el("div", "content");
    renderText(content, text);
    col.append(content);
    if (c.pending.done) {
      const b = el("button", "pick", "This one is better");
      b.type = "button";
      b.onclick = () => pick(c, i);
      col.append(b);
    }
    box.append(col);
  });
  return box;
}

async function pick(c, i) {
  const p = c.pending;
  try {
    await post("/v1/feedback/preference", {conversation_id: c.id, messages: prompt(c), chosen: p.answers[i],
                                           rejected: p.answers[1 - i], model_version: p.version});
  } catch (e) {
    showError(`the preference was not saved: ${e.message}`);
    return;
  }
  c.messages.push({role: "assistant", content: p.answers[i], id: uid(), version: p.version, preferred: true});
  delete c.pending;
  save();
  render();
}

async function rate(c, i, value) {
  const msg = c.messages[i];
  try {
    await post("/v1/feedback/rating", {conversation_id: c.id, answer_id: msg.id, messages: prompt(c, i),
                                       answer: msg.content, rating: value, model_version: msg.version});
  } catch (e) {
    showError(`the rating was not saved: ${e.message}`);
    return;
  }
  msg.rating = value;
  save();
  render();
}

async function send(two) {
  const text = $("input").value.trim();
  if (!text || controller) return;
  showError("");
  const c = conv();
  if (c.pending) delete c.pending;  // a new message leaves an undecided pair behind
  c.system = $("system").value.trim() || undefined;
  if (!c.messages.length) c.title = text.slice(0, 40);
  c.messages.push({role: "user", content: text, id: uid()});
  $("input").value = "";
  save();
  render();
  await (two ? compare(c) : answer(c));
}

async function regenerate() {
  const c = conv();
  if (controller || c.messages.at(-1)?.role !== "assistant") return;
  c.messages.pop();
  await answer(c);
}

// --- start

function init() {
  const settings = load(SETTINGS, {});
  for (const id of FIELDS) {
    if (settings[id] !== undefined) $(id).value = settings[id];
    $(id).addEventListener("input", () => {
      const s = load(SETTINGS, {});
      s[id] = $(id).value;
      localStorage.setItem(SETTINGS, JSON.stringify(s));
      if (id === "api-key") connect();
    });
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(false); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(false); }
  });
  $("compare").onclick = () => send(true);
  $("stop").onclick = () => controller?.abort();
  $("new-chat").onclick = () => {
    if (controller) return;
    current = null;
    conv();
    render();
  };
  $("toggle-settings").onclick = () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  };
  render();
  connect();
}

// The served model's name and context (again whenever the API key changes).
function connect() {
  fetch("/v1/models", {headers: headers()}).then((r) => r.json()).then((j) => {
    if (j.error) throw new Error(j.error.message);
    modelName = j.data[0].id;
    $("model-name").textContent = `${modelName} · ${j.data[0].max_model_len}-token context`;
    showError("");
  }).catch((e) => { $("model-name").textContent = "not connected"; showError(String(e.message || e)); });
}

init();
