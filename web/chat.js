// Chat page: conversation list, streaming answers over the WebSocket with a
// typing effect, Stop, and automatic reconnect with `resume`.
//
// Nothing is lost across a dropped connection or a reload: the message being
// sent (its request_id, so a resend is the same turn) and the turn being
// answered (its id, the last seq shown and the text so far) are kept in
// sessionStorage; on reconnect the page resends the one or resumes the other
// after the last seq it has, and ignores any seq it already shows.
"use strict";

const load = (key) => JSON.parse(sessionStorage.getItem(key) || "null");
const chat = {
  conversation: sessionStorage.getItem("conversation"),
  pending: load("pending"), // {request_id, content, conversation_id}: sent, not yet accepted
  turn: load("turn"), // {id, seq, text, user, request_id}: accepted, not yet done
  ws: null,
  opened: false,
  retry: 0,
  timer: null,
  heartbeat: null,
  lastHeard: 0,
  conversations: [],
};

function save() {
  const put = (key, value) => (value == null ? sessionStorage.removeItem(key) : sessionStorage.setItem(key, typeof value === "string" ? value : JSON.stringify(value)));
  put("conversation", chat.conversation);
  put("pending", chat.pending);
  put("turn", chat.turn);
}

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Plain-http pages on a LAN address are not a secure context: no randomUUID.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---- rendering -------------------------------------------------------------

const typing = new Set(); // assistant bubbles whose shown text trails their text

function addUser(text) {
  const li = el("li", { class: "msg user" },
    el("span", { class: "who", "data-i18n": "chat.you" }, t("chat.you")),
    el("div", { class: "text" }, text));
  $("log").append(li);
  $("empty").hidden = true;
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function addAssistant(turnId, text = "") {
  const li = el("li", { class: "msg assistant", dataset: { turn: turnId || "", state: "done" } },
    el("span", { class: "who", "data-i18n": "chat.assistant" }, t("chat.assistant")),
    el("div", { class: "text" }, text),
    el("p", { class: "note" }));
  li.target = text;
  li.shown = text.length;
  $("log").append(li);
  return li;
}

// Category -> its name in the guide, per language (GET /v1/guide is public
// and cacheable); a link shows the category id until the names arrive.
const guideNames = {};
async function nameSources() {
  const lang = currentLang();
  if (!guideNames[lang]) {
    guideNames[lang] = fetch(`/v1/guide?lang=${lang}`)
      .then((r) => (r.ok ? r.json() : { categories: [] }))
      .then((g) => Object.fromEntries(g.categories.map((c) => [c.category, c.name])))
      .catch(() => { delete guideNames[lang]; return {}; });
  }
  const names = await guideNames[lang];
  for (const a of $("log").querySelectorAll(".sources a")) a.textContent = names[a.dataset.category] || a.dataset.category;
}

/** Under an answer: the guide pages of the rules it was grounded in. */
function showSources(li, sources) {
  li.querySelector(".sources")?.remove();
  if (!sources || !sources.length) return;
  li.append(el("p", { class: "sources" },
    el("span", { "data-i18n": "chat.sources" }, t("chat.sources")), " ",
    ...sources.flatMap((category, i) => [
      i ? ", " : "",
      el("a", { href: `guide.html#${encodeURIComponent(category)}`, dataset: { category } }, category),
    ])));
  nameSources();
}

function bubbleFor(turnId) {
  return $("log").querySelector(`li.assistant[data-turn="${CSS.escape(turnId)}"]`);
}
/** The assistant bubble still waiting for its turn id, if any. */
function waitingBubble() {
  return $("log").querySelector('li.assistant[data-turn=""]');
}

function setText(li, text, { instant = false } = {}) {
  li.target = text;
  if (instant || text.length < li.shown) li.shown = text.length;
  if (li.shown >= text.length) {
    li.querySelector(".text").textContent = text;
    typing.delete(li);
  } else if (!typing.has(li)) {
    typing.add(li);
    requestAnimationFrame(typeFrame);
  }
}

// The typing effect: the shown text catches up with what has arrived, a few
// characters per frame (faster the further behind it is).
function typeFrame() {
  for (const li of typing) {
    const remaining = li.target.length - li.shown;
    let next = li.shown + Math.max(1, Math.ceil(remaining / 8));
    if (/[\uD800-\uDBFF]/.test(li.target[next - 1] || "")) next += 1; // never split a surrogate pair
    li.shown = Math.min(next, li.target.length);
    li.querySelector(".text").textContent = li.target.slice(0, li.shown);
    if (li.shown >= li.target.length) typing.delete(li);
  }
  const last = $("log").lastElementChild;
  if (last) last.scrollIntoView({ block: "nearest" });
  if (typing.size) requestAnimationFrame(typeFrame);
}

function setState(li, state, noteKey) {
  li.dataset.state = state;
  li.classList.toggle("streaming", state === "streaming");
  const note = li.querySelector(".note");
  note.dataset.key = noteKey || "";
  note.textContent = noteKey ? t(noteKey) : "";
}

function addError(message) {
  const li = el("li", { class: "msg error", role: "alert" }, message);
  $("log").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function clearLog() {
  $("log").replaceChildren();
  typing.clear();
  $("empty").hidden = false;
}

function updateControls() {
  const busy = Boolean(chat.pending || chat.turn);
  $("send").disabled = busy;
  $("stop").disabled = !chat.turn;
  $("new").disabled = busy;
  $("log").setAttribute("aria-busy", String(busy));
  for (const button of $("conversations").querySelectorAll("button")) button.disabled = busy;
}

// ---- the socket ------------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/v1/chat/ws?access_token=${encodeURIComponent(Auth.token)}`;
}

function connect() {
  clearTimeout(chat.timer);
  if (!Auth.token || (chat.ws && chat.ws.readyState <= WebSocket.OPEN)) return;
  if (!navigator.onLine) { setStatus("status.offline", "warn"); return; }
  setStatus(chat.retry ? "status.reconnecting" : "status.connecting", chat.retry ? "warn" : "");
  const ws = new WebSocket(wsUrl());
  chat.ws = ws;
  chat.opened = false;
  ws.onopen = () => {
    chat.opened = true;
    chat.retry = 0;
    chat.lastHeard = Date.now();
    setStatus("status.connected", "ok");
    if (chat.turn) {
      ws.send(JSON.stringify({ type: "resume", turn_id: chat.turn.id, after_seq: chat.turn.seq }));
    } else if (chat.pending) {
      // The same request_id again: the gateway maps it to the same turn.
      ws.send(JSON.stringify({ type: "send", ...chat.pending }));
    }
  };
  ws.onmessage = (event) => {
    chat.lastHeard = Date.now();
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    onFrame(frame);
  };
  ws.onclose = () => {
    if (chat.ws !== ws) return;
    chat.ws = null;
    if (!Auth.token) return;
    // A refused upgrade (e.g. an expired token) looks like any failed
    // connection to a browser: ask the API, which signs out on 401.
    if (!chat.opened) api("/v1/conversations?limit=1").catch(() => {});
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  clearTimeout(chat.timer);
  setStatus(navigator.onLine ? "status.reconnecting" : "status.offline", "warn");
  const delay = Math.min(3000, 200 * 2 ** chat.retry) * (0.75 + Math.random() / 2);
  chat.retry += 1;
  chat.timer = setTimeout(connect, delay);
}

/** Drops a socket that went silent (a dead network may never close it). */
function dropSocket() {
  const ws = chat.ws;
  if (!ws) return;
  chat.ws = null;
  ws.onclose = ws.onmessage = ws.onopen = null;
  ws.close();
  scheduleReconnect();
}

function startHeartbeat() {
  clearInterval(chat.heartbeat);
  chat.heartbeat = setInterval(() => {
    const ws = chat.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - chat.lastHeard > 35000) { dropSocket(); return; }
    ws.send(JSON.stringify({ type: "ping" }));
  }, 15000);
}

function onFrame(frame) {
  switch (frame.type) {
    case "accepted": {
      if (!chat.pending || frame.request_id !== chat.pending.request_id) return;
      chat.turn = { id: frame.turn_id, seq: 0, text: "", user: chat.pending.content, request_id: frame.request_id };
      chat.pending = null;
      chat.conversation = frame.conversation_id;
      save();
      const li = waitingBubble() || addAssistant("");
      li.dataset.turn = frame.turn_id;
      setState(li, "streaming", "chat.writing");
      markCurrent();
      break;
    }
    case "token": {
      const turn = chat.turn;
      if (!turn || frame.turn_id !== turn.id || frame.seq <= turn.seq) return; // already shown
      if (frame.seq !== turn.seq + 1) {
        // A gap should never happen; ask again from what we have.
        chat.ws?.send(JSON.stringify({ type: "resume", turn_id: turn.id, after_seq: turn.seq }));
        return;
      }
      turn.seq = frame.seq;
      turn.text += frame.delta;
      save();
      const li = bubbleFor(turn.id) || addAssistant(turn.id);
      li.dataset.seq = String(turn.seq);
      if (li.dataset.state !== "streaming") setState(li, "streaming", "chat.writing");
      setText(li, turn.text);
      break;
    }
    case "reset": {
      const turn = chat.turn;
      if (!turn || frame.turn_id !== turn.id || frame.seq <= turn.seq) return;
      turn.seq = frame.seq;
      turn.text = "";
      save();
      const li = bubbleFor(turn.id) || addAssistant(turn.id);
      setText(li, "", { instant: true });
      setState(li, "streaming", "chat.restarted");
      break;
    }
    case "done": {
      const turn = chat.turn;
      if (!turn || frame.turn_id !== turn.id) return;
      const li = bubbleFor(turn.id) || addAssistant(turn.id);
      setText(li, turn.text, { instant: true });
      const notes = { cancelled: "chat.stopped", error: "chat.cutShort", length: "chat.length" };
      setState(li, frame.finish_reason || "stop", notes[frame.finish_reason]);
      showSources(li, frame.sources);
      chat.turn = null;
      save();
      updateControls();
      loadConversations();
      // The persister stores the turn a moment after `done`: refresh the counts again.
      setTimeout(() => loadConversations(4), 1500);
      if (document.activeElement === $("stop") || document.activeElement === document.body) $("message").focus();
      break;
    }
    case "error":
      onError(frame);
      break;
    default:
      break; // pong, and frames this page does not know
  }
  updateControls();
}

function onError(frame) {
  const turn = chat.turn;
  if (frame.turn_id && turn && frame.turn_id === turn.id) {
    if (["resume_expired", "forbidden", "not_found", "invalid_turn_id"].includes(frame.code)) {
      // This turn cannot be followed any more: show what was saved.
      chat.turn = null;
      save();
      addError(explain(frame.code, frame.message));
      if (chat.conversation) openConversation(chat.conversation);
      return;
    }
    const li = bubbleFor(turn.id);
    if (li) { const note = li.querySelector(".note"); note.textContent = explain(frame.code, frame.message); }
    return; // a `done` follows
  }
  if (chat.pending && !frame.turn_id) {
    // The message was refused: give it back to the composer.
    const { content } = chat.pending;
    chat.pending = null;
    save();
    waitingBubble()?.remove();
    const users = $("log").querySelectorAll("li.user");
    users[users.length - 1]?.classList.add("refused");
    if (!$("message").value) $("message").value = content;
    addError(explain(frame.code === "too_large" ? "message_too_large" : frame.code, frame.message));
    $("message").focus();
    return;
  }
  addError(explain(frame.code, frame.message));
}

// ---- actions ---------------------------------------------------------------

function send() {
  const content = $("message").value;
  if (!content.trim() || chat.pending || chat.turn) return;
  chat.pending = { conversation_id: chat.conversation || null, content, request_id: uuid() };
  save();
  addUser(content);
  setState(addAssistant(""), "streaming", "chat.writing");
  $("message").value = "";
  updateControls();
  if (chat.ws && chat.ws.readyState === WebSocket.OPEN) {
    chat.ws.send(JSON.stringify({ type: "send", ...chat.pending }));
  } else {
    connect(); // sent on open
  }
}

function stop() {
  if (chat.turn && chat.ws && chat.ws.readyState === WebSocket.OPEN) {
    chat.ws.send(JSON.stringify({ type: "cancel", turn_id: chat.turn.id }));
  }
}

function newConversation() {
  if (chat.pending || chat.turn) return;
  chat.conversation = null;
  save();
  clearLog();
  markCurrent();
  $("message").focus();
}

// ---- history ---------------------------------------------------------------

function markCurrent() {
  for (const button of $("conversations").querySelectorAll("button")) {
    if (button.dataset.id === chat.conversation) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...chat.conversations.map((c) => el("li", {},
    el("button", { type: "button", dataset: { id: c.conversation_id }, onclick: () => openConversation(c.conversation_id) },
      el("span", { class: "title" }, c.title || t("chat.untitled")),
      el("span", { class: "meta" }, `${new Date(c.updated_at).toLocaleString(currentLang())} · ${(c.turns === 1 ? t("chat.turns1") : t("chat.turns", { n: c.turns }))}`)))));
  $("no-conversations").hidden = chat.conversations.length > 0;
  markCurrent();
  updateControls();
}

async function loadConversations(attempt = 0) {
  try {
    const { conversations } = await api("/v1/conversations");
    chat.conversations = conversations;
    renderConversations();
  } catch (error) {
    if (error.status === 401) return;
    $("no-conversations").hidden = chat.conversations.length > 0;
  }
  // A turn that just finished reaches history a moment later: look again.
  const listed = chat.conversations.some((c) => c.conversation_id === chat.conversation);
  if (chat.conversation && !listed && attempt < 4) setTimeout(() => loadConversations(attempt + 1), 500 * 2 ** attempt);
}

/** Shows a conversation's saved turns (but not the one being followed). */
async function openConversation(id, { quiet = false } = {}) {
  if (id !== chat.conversation && (chat.pending || chat.turn)) return;
  let turns = [];
  try {
    ({ turns } = await api(`/v1/conversations/${encodeURIComponent(id)}`));
  } catch (error) {
    // After a reload in a new conversation's first answer, nothing is saved yet (404).
    if (error.status !== 401 && !quiet) addError(explain(error.code, error.message));
    return;
  }
  if (id !== chat.conversation) {
    chat.conversation = id;
    save();
  }
  clearLog();
  const skip = new Set([chat.turn?.id, chat.turn?.request_id, chat.pending?.request_id].filter(Boolean));
  for (const turn of turns) {
    if (skip.has(turn.turn_id) || skip.has(turn.request_id)) continue;
    addUser(turn.user_text);
    const li = addAssistant(turn.turn_id, turn.assistant_text);
    const notes = { cancelled: "chat.stopped", error: "chat.cutShort", length: "chat.length" };
    setState(li, turn.finish_reason, notes[turn.finish_reason]);
    showSources(li, turn.sources);
  }
  if (chat.turn || chat.pending) renderInFlight();
  markCurrent();
  $("log").lastElementChild?.scrollIntoView({ block: "nearest" });
}

/** The message being sent or answered, from sessionStorage (after a reload). */
function renderInFlight() {
  if (chat.turn) {
    addUser(chat.turn.user);
    const li = addAssistant(chat.turn.id, chat.turn.text);
    li.dataset.seq = String(chat.turn.seq);
    setState(li, "streaming", "chat.writing");
  } else if (chat.pending) {
    addUser(chat.pending.content);
    setState(addAssistant(""), "streaming", "chat.writing");
  }
}

// ---- start -----------------------------------------------------------------

async function start() {
  clearLog();
  if (chat.conversation) await openConversation(chat.conversation, { quiet: true });
  if (!$("log").querySelector("li.streaming")) renderInFlight();
  updateControls();
  connect();
  startHeartbeat();
  loadConversations();
}

function stopAll() {
  clearTimeout(chat.timer);
  clearInterval(chat.heartbeat);
  const ws = chat.ws;
  chat.ws = null;
  if (ws) { ws.onclose = null; ws.close(); }
  Object.assign(chat, { conversation: null, pending: null, turn: null, conversations: [], retry: 0 });
  clearLog();
  $("conversations").replaceChildren();
}

renderChrome("chat");
$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", newConversation);
window.addEventListener("online", () => { chat.retry = 0; connect(); });
window.addEventListener("offline", () => setStatus("status.offline", "warn"));
onLangChange(() => {
  for (const note of $("log").querySelectorAll(".note")) if (note.dataset.key) note.textContent = t(note.dataset.key);
  for (const who of $("log").querySelectorAll(".who, .sources [data-i18n]")) who.textContent = t(who.dataset.i18n);
  nameSources();
  renderConversations();
});
Auth.require(start, stopAll);
