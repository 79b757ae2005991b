// Chat page: dev login, WebSocket streaming, Stop, and reconnect with resume.
// The in-flight turn (id and last seq) is kept in sessionStorage so a reload
// resumes it instead of losing it.
"use strict";
const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("token"),
  conversation: sessionStorage.getItem("conversation"),
  turn: JSON.parse(sessionStorage.getItem("turn") || "null"), // {id, seq, text}
  ws: null,
  retry: 0,
};
const bubbles = new Map();

function save() {
  sessionStorage.setItem("turn", JSON.stringify(state.turn));
  if (state.conversation) sessionStorage.setItem("conversation", state.conversation);
  else sessionStorage.removeItem("conversation");
}
function status(text) { $("status").textContent = text; }
function bubble(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}
function assistantBubble(turnId) {
  if (!bubbles.has(turnId)) bubbles.set(turnId, bubble("assistant", ""));
  return bubbles.get(turnId);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/chat/ws?access_token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  ws.onopen = () => {
    status("connected");
    state.retry = 0;
    if (state.turn) {
      assistantBubble(state.turn.id).textContent = state.turn.text;
      ws.send(JSON.stringify({ type: "resume", turn_id: state.turn.id, after_seq: state.turn.seq }));
      $("stop").disabled = false;
    }
  };
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onclose = (event) => {
    status("reconnecting…");
    if (event.code === 1008 || event.code === 4401) { status("signed out"); return; }
    const delay = Math.min(5000, 250 * 2 ** state.retry++);
    setTimeout(connect, delay);
  };
}

function onFrame(frame) {
  switch (frame.type) {
    case "accepted":
      state.conversation = frame.conversation_id;
      state.turn = { id: frame.turn_id, seq: 0, text: "" };
      save();
      assistantBubble(frame.turn_id);
      $("stop").disabled = false;
      break;
    case "token":
      if (!state.turn || frame.turn_id !== state.turn.id || frame.seq !== state.turn.seq + 1) return;
      state.turn.seq = frame.seq;
      state.turn.text += frame.delta;
      assistantBubble(frame.turn_id).textContent = state.turn.text;
      save();
      break;
    case "reset":
      if (!state.turn || frame.turn_id !== state.turn.id) return;
      state.turn.seq = frame.seq;
      state.turn.text = "";
      assistantBubble(frame.turn_id).textContent = "";
      save();
      break;
    case "done":
      if (state.turn && frame.turn_id === state.turn.id) {
        if (frame.finish_reason === "cancelled") assistantBubble(frame.turn_id).textContent += " [stopped]";
        if (frame.finish_reason === "error") assistantBubble(frame.turn_id).textContent += " [the answer was cut short]";
        state.turn = null;
        save();
      }
      $("stop").disabled = true;
      setTimeout(loadConversations, 500);
      break;
    case "error":
      bubble("error", explain(frame));
      if (frame.code === "resume_expired") { state.turn = null; save(); $("stop").disabled = true; }
      break;
  }
}

function explain(frame) {
  const plain = {
    too_large: "That message is too long (64 KiB at most).",
    forbidden: "That conversation belongs to someone else.",
    too_many_turns: "Too many answers at once; wait for one to finish.",
    unavailable: "The service is busy or restarting; try again in a moment.",
    resume_expired: "That answer is too old to resume.",
    upstream_error: "The language model failed; the partial answer was kept.",
  };
  return plain[frame.code] || frame.message;
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user_id: $("user").value.trim() }),
  });
  const body = await response.json();
  if (!response.ok) { status(body.error ? body.error.message : "sign-in failed"); return; }
  state.token = body.access_token;
  sessionStorage.setItem("token", state.token);
  start();
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("message").value;
  if (!content.trim() || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  bubble("user", content);
  state.ws.send(JSON.stringify({
    type: "send", conversation_id: state.conversation, content, request_id: crypto.randomUUID(),
  }));
  $("message").value = "";
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => {
  if (state.turn && state.ws) state.ws.send(JSON.stringify({ type: "cancel", turn_id: state.turn.id }));
});
$("new").addEventListener("click", () => {
  state.conversation = null; state.turn = null; save();
  $("log").replaceChildren(); bubbles.clear();
});

async function api(path) {
  const response = await fetch(path, { headers: { authorization: `Bearer ${state.token}` } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

async function loadConversations() {
  try {
    const { conversations } = await api("/v1/conversations");
    const list = $("conversations");
    list.replaceChildren();
    for (const c of conversations) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = c.title || c.conversation_id;
      button.addEventListener("click", () => openConversation(c.conversation_id));
      item.appendChild(button);
      list.appendChild(item);
    }
    $("history").hidden = conversations.length === 0;
  } catch (error) {
    status(`history unavailable: ${error.message}`);
  }
}

async function openConversation(id) {
  const { turns } = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  state.conversation = id;
  state.turn = null;
  save();
  $("log").replaceChildren();
  bubbles.clear();
  for (const turn of turns) {
    bubble("user", turn.user_text);
    bubble("assistant", turn.assistant_text);
  }
}

function start() {
  $("login").hidden = true;
  $("chat").hidden = false;
  connect();
  loadConversations();
}
if (state.token) start();
