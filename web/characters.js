// "My characters": the caller's collection (GET /v1/me/characters: each
// character's name, when it was first earned, by which scan, how often),
// and the whole catalogue (GET /v1/characters) with what is still missing.
"use strict";

const page = { mine: null, catalogue: [], failed: false };

function card(character, owned) {
  const children = [el("h3", { class: "character" }, pick(character.name))];
  if (owned) {
    const when = new Date(owned.first_earned_at).toLocaleString(currentLang());
    children.push(
      el("p", { class: "meta" }, owned.times_earned === 1 ? t("characters.times1") : t("characters.times", { n: owned.times_earned })),
      el("p", { class: "meta" }, t("characters.first", { when })));
  }
  return el("li", { class: `card character-card ${owned ? "owned" : "missing"}`, dataset: { character: character.character_id } }, ...children);
}

function render() {
  const status = $("mine-status");
  if (page.failed) status.textContent = t("characters.unavailable");
  else if (page.mine && !page.mine.length) status.textContent = t("characters.none");
  else status.textContent = "";
  const owned = new Map((page.mine || []).map((c) => [c.character_id, c]));
  $("collection").replaceChildren(...(page.mine || []).map((c) => card(c, c)));
  $("catalogue").replaceChildren(...page.catalogue.map((c) => {
    const item = card(c, owned.get(c.character_id));
    item.append(
      el("p", { class: "help" }, pick(c.description)),
      el("p", { class: "meta" }, t("characters.earnedFrom", { categories: c.categories.join(", ") })),
      el("span", { class: "badge" }, t(owned.has(c.character_id) ? "characters.owned" : "characters.missing")));
    return item;
  }));
}

async function start() {
  page.failed = false;
  try {
    const [mine, catalogue] = await Promise.all([api("/v1/me/characters"), api("/v1/characters")]);
    page.mine = mine.characters || [];
    page.catalogue = catalogue.characters || [];
  } catch (error) {
    if (error.status === 401) return;
    page.failed = true;
  }
  render();
}

function stopAll() {
  page.mine = null;
  page.catalogue = [];
  $("collection").replaceChildren();
  $("catalogue").replaceChildren();
}

renderChrome("characters");
onLangChange(render);
Auth.require(start, stopAll);
