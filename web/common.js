// Shared by both pages: the header (title, page links, language switch,
// connection status, sign-out), sign-in (dev login when the server offers it,
// else a pasted JWT; the token lives in sessionStorage), the authenticated
// fetch helper and plain-words error messages.
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value != null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child != null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** An error from the API, with its code. */
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Plain words for an error code, falling back to the server's message. */
function explain(code, message) {
  const key = `error.${code}`;
  const text = t(key);
  return text === key ? t("error.generic", { message: message || code }) : text;
}

const Auth = {
  get token() { return sessionStorage.getItem("token"); },
  /** The token's `sub`, for display only (the server verifies the token). */
  get user() {
    try {
      const payload = this.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(decodeURIComponent(escape(atob(payload)))).sub || "?";
    } catch {
      return "?";
    }
  },
  onSignedIn: null,
  onSignedOut: null,
  /** Shows the page's content once a token is there, else the sign-in forms. */
  require(onSignedIn, onSignedOut) {
    this.onSignedIn = onSignedIn;
    this.onSignedOut = onSignedOut;
    if (this.token) this.enter();
    else this.showSignIn();
  },
  enter() {
    $("signin").hidden = true;
    $("content").hidden = false;
    $("whoami").textContent = t("signedInAs", { user: this.user });
    $("whoami").dataset.user = this.user;
    $("signout").hidden = false;
    setStatus(null);
    this.onSignedIn();
  },
  /** Drops the token and shows the sign-in forms with `message`, if any. */
  signOut(message) {
    sessionStorage.clear();
    if (this.onSignedOut) this.onSignedOut();
    this.showSignIn(message);
  },
  showSignIn(message) {
    $("content").hidden = true;
    $("signin").hidden = false;
    $("signout").hidden = true;
    $("whoami").textContent = "";
    setStatus("status.signedOut");
    $("signin-error").textContent = message || "";
    probeDevLogin().then(() => ($("dev-login").hidden ? $("token") : $("user")).focus());
  },
};

/** The connection status in the header (a polite live region). */
function setStatus(key, kind = "") {
  const status = $("status");
  status.dataset.key = key || "";
  status.dataset.kind = kind;
  status.textContent = key ? t(key) : "";
}

/** fetch with the bearer token; JSON in and out; throws ApiError. */
async function api(path, options = {}) {
  const headers = { authorization: `Bearer ${Auth.token}`, ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiError(0, "network", t("error.network"));
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const code = body.error?.code || `http_${response.status}`;
    const error = new ApiError(response.status, code, body.error?.message || response.statusText);
    if (response.status === 401) Auth.signOut(explain(code, error.message));
    throw error;
  }
  return body;
}

/** Dev login exists when POST /v1/dev/token does not answer 404. */
async function probeDevLogin() {
  try {
    // An empty user id is refused (400) when dev login is on: nothing is issued.
    const response = await fetch("/v1/dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user_id: "" }),
    });
    $("dev-login").hidden = response.status === 404;
  } catch {
    $("dev-login").hidden = false;
  }
}

function renderChrome(page) {
  const header = el("header", { class: "top" },
    el("a", { class: "skip", href: "#main", "data-i18n": "skip" }),
    el("div", { class: "brand" },
      el("h1", { "data-i18n": "app.title" }),
      el("nav", { "data-i18n-aria-label": "nav.label" },
        el("a", { href: "./", "aria-current": page === "chat" ? "page" : false, "data-i18n": "nav.chat" }),
        el("a", { href: "scan.html", "aria-current": page === "scan" ? "page" : false, "data-i18n": "nav.scan" }),
        el("a", { href: "characters.html", "aria-current": page === "characters" ? "page" : false, "data-i18n": "nav.characters" }),
        el("a", { href: "guide.html", "aria-current": page === "guide" ? "page" : false, "data-i18n": "nav.guide" }))),
    el("div", { class: "tools" },
      el("span", { id: "status", role: "status", "aria-live": "polite" }),
      el("span", { id: "whoami" }),
      el("button", { type: "button", id: "signout", hidden: true, "data-i18n": "signout", onclick: () => Auth.signOut() }),
      el("label", { class: "lang" },
        el("span", { class: "visually-hidden", "data-i18n": "lang.label" }),
        el("select", { id: "lang", onchange: (event) => setLang(event.target.value) },
          el("option", { value: "ko", lang: "ko" }, "한국어"),
          el("option", { value: "en", lang: "en" }, "English")))));
  document.body.prepend(header);
  $("lang").value = currentLang();

  const signin = el("section", { id: "signin", hidden: true, "aria-labelledby": "signin-heading" },
    el("h2", { id: "signin-heading", "data-i18n": "signin.heading" }),
    el("p", { id: "signin-error", class: "error-text", role: "alert" }),
    el("form", { id: "dev-login", class: "card", hidden: true, "aria-labelledby": "dev-heading" },
      el("h3", { id: "dev-heading", "data-i18n": "signin.devHeading" }),
      el("p", { class: "help", "data-i18n": "signin.devHelp" }),
      el("label", { for: "user", "data-i18n": "signin.user" }),
      el("div", { class: "row" },
        el("input", { id: "user", name: "user", autocomplete: "username", value: "me", required: true }),
        el("button", { type: "submit", class: "primary", "data-i18n": "signin.devButton" }))),
    el("form", { id: "token-login", class: "card", "aria-labelledby": "token-heading" },
      el("h3", { id: "token-heading", "data-i18n": "signin.tokenHeading" }),
      el("p", { class: "help", id: "token-help", "data-i18n": "signin.tokenHelp" }),
      el("label", { for: "token", "data-i18n": "signin.token" }),
      el("textarea", { id: "token", rows: 3, required: true, spellcheck: "false", autocomplete: "off", "aria-describedby": "token-help" }),
      el("div", { class: "row" },
        el("button", { type: "submit", class: "primary", "data-i18n": "signin.tokenButton" }))));
  $("main").prepend(signin);

  $("dev-login").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("signin-error").textContent = "";
    try {
      const response = await fetch("/v1/dev/token", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ user_id: $("user").value.trim() }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.status === 404) {
        $("dev-login").hidden = true;
        $("signin-error").textContent = t("error.dev_login_off");
        return;
      }
      if (!response.ok) {
        $("signin-error").textContent = explain(body.error?.code, body.error?.message);
        return;
      }
      sessionStorage.setItem("token", body.access_token);
      Auth.enter();
    } catch {
      $("signin-error").textContent = t("error.network");
    }
  });
  $("token-login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim().replace(/^Bearer\s+/i, "");
    $("signin-error").textContent = t("signin.checking");
    // Checked against the server before it is kept.
    try {
      const response = await fetch("/v1/conversations?limit=1", { headers: { authorization: `Bearer ${token}` } });
      if (response.status === 401) {
        const body = await response.json().catch(() => ({}));
        $("signin-error").textContent = explain(body.error?.code || "invalid_token", body.error?.message);
        $("token").focus();
        return;
      }
    } catch {
      $("signin-error").textContent = t("error.network");
      return;
    }
    $("signin-error").textContent = "";
    $("token").value = "";
    sessionStorage.setItem("token", token);
    Auth.enter();
  });
  onLangChange(() => {
    $("lang").value = currentLang();
    const status = $("status");
    if (status.dataset.key) status.textContent = t(status.dataset.key);
    if (Auth.token) $("whoami").textContent = t("signedInAs", { user: Auth.user });
  });
  applyStrings();
}
