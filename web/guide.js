// The disposal guide (GET /v1/guide, GET /v1/guide/{category}): public, no
// sign-in. The list is filtered here as the user types (names, bins and
// everyday item names in both languages); `guide.html#glass` opens a rule,
// which is how the chat's sources link here.
"use strict";

const guide = { categories: [], failed: false };

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${response.status}`);
  return response.json();
}

function renderList() {
  const query = $("guide-search").value.trim().toLowerCase();
  const shown = guide.categories.filter((c) => !query ||
    [c.name, c.bin, c.category, ...(c.items || [])].some((text) => text.toLowerCase().includes(query)));
  $("guide-status").textContent = guide.failed ? t("guide.unavailable") : shown.length ? "" : t("guide.none");
  $("guide-list").replaceChildren(...shown.map((c) => el("li", { dataset: { category: c.category } },
    el("a", { href: `#${encodeURIComponent(c.category)}` }, c.name),
    el("span", { class: "meta" }, c.bin))));
}

async function loadList() {
  try {
    guide.categories = (await getJson(`/v1/guide?lang=${currentLang()}`)).categories;
    guide.failed = false;
  } catch {
    guide.failed = true;
  }
  renderList();
}

async function openRule() {
  const category = decodeURIComponent(location.hash.slice(1));
  const article = $("guide-rule");
  if (!category) { article.hidden = true; return; }
  try {
    const rule = await getJson(`/v1/guide/${encodeURIComponent(category)}?lang=${currentLang()}`);
    article.replaceChildren(
      el("h3", {}, rule.name),
      el("h4", {}, t("guide.bin")), el("p", { class: "bin" }, rule.bin),
      el("h4", {}, t("guide.steps")), el("ol", {}, rule.steps.map((s) => el("li", {}, s))),
      el("h4", {}, t("guide.why")), el("p", {}, rule.why),
      el("h4", {}, t("guide.items")), el("p", { class: "items" }, rule.items.join(", ")));
    article.dataset.category = category;
  } catch {
    article.replaceChildren(el("p", { class: "error-text" }, t("guide.unavailable")));
  }
  article.hidden = false;
}

renderChrome("guide");
$("guide-search").addEventListener("input", renderList);
window.addEventListener("hashchange", openRule);
onLangChange(() => { loadList(); openRule(); });
loadList();
openRule();
