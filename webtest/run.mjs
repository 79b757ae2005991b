// Browser tests of web/ in headless Debian Chromium (playwright-core).
//
// Run by e2e/tests/browser.rs, which starts the real services and passes:
//   BASE_URL         the gateway (serves web/)
//   EXPECTED_ANSWER  the stand-in LLM's scripted answer, in full
//   PASTE_TOKEN      a valid JWT for the pasted-token sign-in
//   BASE_URL_NO_DEV_LOGIN  a second gateway, without dev login
//   SCAN_IMAGE, SCAN_IMAGE_2  two different image files to scan
//   SCREENSHOT_DIR   where UPDATE_SCREENSHOTS=1 writes the screenshots
// Server-side actions are asked for with `@@control <what>` on stdout; the
// Rust side does it and answers `ok` on stdin.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const BASE = process.env.BASE_URL;
const PLAIN = process.env.BASE_URL_NO_DEV_LOGIN;
const EXPECTED = process.env.EXPECTED_ANSWER;
const SHOTS = process.env.UPDATE_SCREENSHOTS === "1" ? process.env.SCREENSHOT_DIR : null;
assert.ok(BASE && EXPECTED, "BASE_URL and EXPECTED_ANSWER are set (run through cargo test -p e2e --test browser)");

const PHONE = { width: 390, height: 844 };
const DESKTOP = { width: 1280, height: 800 };

// ---- control channel to the Rust harness ----------------------------------------
const stdin = readline.createInterface({ input: process.stdin });
const replies = [];
let waiting = null;
stdin.on("line", (line) => {
  if (waiting) { const resolve = waiting; waiting = null; resolve(line); } else replies.push(line);
});
async function control(what) {
  const reply = replies.length ? replies.shift() : new Promise((resolve) => { waiting = resolve; });
  console.log(`@@control ${what}`);
  assert.equal(await reply, "ok", `control ${what}`);
}

// ---- browser --------------------------------------------------------------------
let context;
let profile;
before(async () => {
  profile = mkdtempSync(join(tmpdir(), "webtest-chromium-"));
  // A persistent context is how playwright takes a fresh --user-data-dir.
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: DESKTOP,
    locale: "en-US",
  });
  context.setDefaultTimeout(20000);
});
after(async () => {
  stdin.close();
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** A new tab (its own sessionStorage) that fails the test on any page error. */
async function newPage(t) {
  const page = await context.newPage();
  await page.setViewportSize(DESKTOP);
  const errors = [];
  page.on("pageerror", (error) => errors.push(error));
  page.on("console", (message) => {
    if (message.type() === "error" && !/Failed to load resource|WebSocket connection|ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE/.test(message.text())) {
      console.log(`[browser console] ${message.text()}`);
    }
  });
  t.after(async () => {
    await page.close();
    assert.deepEqual(errors.map(String), [], "no uncaught errors in the page");
  });
  return page;
}

async function screenshot(page, name, { fullPage = false } = {}) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  for (const [size, viewport] of [["desktop", DESKTOP], ["phone", PHONE]]) {
    await page.setViewportSize(viewport);
    if (fullPage) await page.evaluate(() => window.scrollTo(0, 0));
    await page.waitForTimeout(150);
    await page.screenshot({ path: join(SHOTS, `${name}-${size}.png`), fullPage });
  }
  await page.setViewportSize(DESKTOP);
}

async function devLogin(page, user, path = "/") {
  await page.goto(BASE + path);
  await page.locator("#dev-login").waitFor({ state: "visible" });
  await page.fill("#user", user);
  await page.click("#dev-login button[type=submit]");
  await page.locator("#content").waitFor({ state: "visible" });
  assert.equal(await page.getAttribute("#whoami", "data-user"), user);
}

async function connected(page) {
  await page.waitForFunction(() => document.getElementById("status").dataset.key === "status.connected");
}

const assistant = (page) => page.locator("#log li.assistant");
const assistantText = (page) => page.locator("#log li.assistant .text").last();

/** Sends `text` with the keyboard (Enter), as a person would. */
async function send(page, text) {
  // As a person would: wait until the page takes a new message (Send is
  // enabled: no turn is still finishing), type, press Enter, and see the
  // message leave the box.
  await page.waitForSelector("#send:not([disabled])");
  await page.click("#message");
  await page.fill("#message", text);
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => document.getElementById("message").value === "");
}

async function waitSeq(page, n) {
  await page.waitForFunction((n) => {
    const li = [...document.querySelectorAll("#log li.assistant")].pop();
    return li && Number(li.dataset.seq || 0) >= n && li.dataset.state === "streaming";
  }, n);
}

async function finished(page, state = "stop") {
  await page.waitForFunction((state) => {
    const li = [...document.querySelectorAll("#log li.assistant")].pop();
    return li && li.dataset.turn && li.dataset.state === state;
  }, state, { timeout: 30000 });
  // The typing effect has caught up once the final text is set.
  return assistantText(page).textContent();
}

// ---- tests --------------------------------------------------------------------------

test("sign-in page: both forms labelled; dev login offered when the server has it", async (t) => {
  const page = await newPage(t);
  await page.goto(BASE + "/");
  await page.locator("#dev-login").waitFor({ state: "visible" });
  assert.equal(await page.isVisible("#token-login"), true);
  assert.equal(await page.isVisible("#content"), false);
  assert.equal(await page.evaluate(() => document.activeElement.id), "user", "focus starts in the first field");
  // Every string exists in both languages.
  const [en, ko] = await page.evaluate(() => [Object.keys(STRINGS.en).sort(), Object.keys(STRINGS.ko).sort()]);
  assert.deepEqual(ko, en);
  const unlabeled = await page.evaluate(() => [...document.querySelectorAll("input, textarea, select")]
    .filter((e) => !e.labels?.length && !e.getAttribute("aria-label")).map((e) => e.id));
  assert.deepEqual(unlabeled, []);
  await screenshot(page, "signin");
});

test("chat: dev login, an answer streams in token by token and lands in the conversation list", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "alice");
  await connected(page);
  const question = "Where does a glass bottle go?";
  await send(page, question);
  // Watch the text grow: several distinct partial texts, each a prefix of the answer.
  const partials = new Set();
  for (let i = 0; i < 400 && partials.size < 4; i += 1) {
    const text = await assistantText(page).textContent();
    if (text && text.length < EXPECTED.length) {
      assert.ok(EXPECTED.startsWith(text), `partial text is a prefix: ${JSON.stringify(text)}`);
      partials.add(text);
    }
    await page.waitForTimeout(25);
  }
  assert.ok(partials.size >= 4, `saw the answer grow (${partials.size} partial texts)`);
  assert.equal(await page.isDisabled("#send"), true, "Send waits while answering");
  assert.equal(await page.isEnabled("#stop"), true, "Stop is offered while answering");
  assert.equal(await page.getAttribute("#log", "aria-busy"), "true");
  assert.equal(await finished(page), EXPECTED);
  assert.equal(await page.locator("#log li.user .text").textContent(), question);
  assert.equal(await assistant(page).count(), 1);
  // The rule the answer was grounded in, linked to its guide page by name.
  const source = page.locator("#log li.assistant .sources a").first();
  assert.equal(await source.getAttribute("href"), "guide.html#glass");
  await page.waitForFunction(() => document.querySelector("#log .sources a")?.textContent === "Glass bottle");
  assert.equal(await page.isEnabled("#send"), true);
  assert.equal(await page.isDisabled("#stop"), true);
  assert.equal(await page.getAttribute("#log", "aria-busy"), "false");
  // The conversation is listed (from GET /v1/conversations) and marked current.
  const item = page.locator('#conversations button[aria-current="true"]');
  await item.waitFor({ timeout: 15000 });
  assert.match(await item.textContent(), /glass bottle/);
  const conversationId = await item.getAttribute("data-id");

  // A second turn in the same conversation, then a new conversation.
  await send(page, "And the cap?");
  assert.equal(await finished(page), EXPECTED);
  assert.equal(await assistant(page).count(), 2);
  await screenshot(page, "chat");
  await page.selectOption("#lang", "ko");
  assert.equal(await page.textContent("#new"), "새 대화");
  await screenshot(page, "chat-ko");
  await page.selectOption("#lang", "en");
  await page.click("#new");
  assert.equal(await page.locator("#log li").count(), 0);
  assert.equal(await page.evaluate(() => document.activeElement.id), "message", "focus goes to the message box");
  // Opening the listed conversation shows its saved turns.
  await page.click(`#conversations button[data-id="${conversationId}"]`);
  await page.waitForFunction(() => document.querySelectorAll("#log li.assistant").length === 2);
  assert.deepEqual(await page.locator("#log li.user .text").allTextContents(), [question, "And the cap?"]);
  assert.deepEqual(await page.locator("#log li.assistant .text").allTextContents(), [EXPECTED, EXPECTED]);
  // History keeps the sources.
  assert.equal(await page.locator("#log li.assistant").first().locator(".sources a").first().getAttribute("href"), "guide.html#glass");
});

test("guide: public, searchable in either language, a rule opens from its link", async (t) => {
  const page = await newPage(t);
  await page.goto(BASE + "/guide.html#glass");
  await page.locator("#guide-rule h3").waitFor();
  await page.selectOption("#lang", "en");
  await page.waitForFunction(() => document.querySelector("#guide-rule h3")?.textContent === "Glass bottle");
  assert.match(await page.textContent("#guide-rule .items"), /soju bottle/);
  await page.fill("#guide-search", "pizza");
  await page.waitForFunction(() => document.querySelectorAll("#guide-list li").length === 1);
  assert.equal(await page.getAttribute("#guide-list li", "data-category"), "paper");
  await page.fill("#guide-search", "건전지");
  await page.waitForFunction(() => document.querySelector("#guide-list li")?.dataset.category === "battery");
  await page.click("#guide-list li a");
  await page.waitForFunction(() => document.getElementById("guide-rule").dataset.category === "battery");
  await page.fill("#guide-search", "zzz-nothing");
  await page.waitForFunction(() => document.getElementById("guide-status").textContent !== "");
  await screenshot(page, "guide");
});

test("chat: the gateway SIGKILLed mid-answer; the page reconnects, resumes and shows the answer exactly once", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "bob");
  await connected(page);
  await page.evaluate(() => {
    window.statusLog = [];
    new MutationObserver(() => window.statusLog.push(document.getElementById("status").dataset.key))
      .observe(document.getElementById("status"), { childList: true, characterData: true, subtree: true });
  });
  await send(page, "How do I recycle a pizza box?");
  await waitSeq(page, 5);
  await control("kill-gateway");
  assert.equal(await finished(page), EXPECTED);
  assert.equal(await assistant(page).count(), 1);
  assert.equal(await page.locator("#log li.user").count(), 1);
  assert.equal(await page.locator("#log li.error").count(), 0);
  const log = await page.evaluate(() => window.statusLog);
  const lost = log.indexOf("status.reconnecting");
  assert.ok(lost >= 0, `the page saw the connection drop: ${log}`);
  assert.ok(log.indexOf("status.connected", lost) > lost, `and reconnected: ${log}`);
});

test("chat: a reload mid-answer resumes the answer and finishes it on screen", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "carol");
  await connected(page);
  const question = "Are receipts recyclable?";
  await send(page, question);
  await waitSeq(page, 5);
  const before = await assistantText(page).textContent();
  assert.ok(before.length > 0 && EXPECTED.startsWith(before));
  await page.reload();
  // Right after the reload the partial answer is back and still streaming.
  const streaming = page.locator('#log li.assistant[data-state="streaming"]');
  await streaming.waitFor();
  const after = await streaming.locator(".text").textContent();
  assert.ok(EXPECTED.startsWith(after) && after.length >= before.length, `resumed from ${JSON.stringify(after)}`);
  assert.equal(await finished(page), EXPECTED);
  assert.equal(await assistant(page).count(), 1);
  assert.deepEqual(await page.locator("#log li.user .text").allTextContents(), [question]);
  assert.equal(await page.locator("#log li.error").count(), 0);
});

test("chat: Stop sends cancel and the answer ends as stopped", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "dave");
  await connected(page);
  await send(page, "Tell me everything about glass.");
  await waitSeq(page, 3);
  await screenshot(page, "chat-streaming");
  await page.click("#stop");
  const text = await finished(page, "cancelled");
  assert.ok(text.length > 0 && text.length < EXPECTED.length && EXPECTED.startsWith(text), `a partial answer: ${JSON.stringify(text)}`);
  assert.equal(await page.locator("#log li.assistant .note").last().textContent(), "Stopped");
  assert.equal(await page.isEnabled("#send"), true);
  assert.equal(await page.isDisabled("#stop"), true);
});

test("without dev login: sign-in with a pasted JWT; a bad token and an oversized message get plain words; Korean switch", async (t) => {
  const page = await newPage(t);
  await page.goto(PLAIN + "/");
  await page.locator("#token-login").waitFor({ state: "visible" });
  await page.waitForFunction(() => document.activeElement.id === "token");
  assert.equal(await page.isVisible("#dev-login"), false, "no dev login form when the server has none");
  await page.fill("#token", "not.a.token");
  await page.click("#token-login button[type=submit]");
  await page.waitForFunction(() => /not valid/.test(document.getElementById("signin-error").textContent));
  assert.equal(await page.isVisible("#content"), false);
  await page.fill("#token", process.env.PASTE_TOKEN);
  await page.click("#token-login button[type=submit]");
  await page.locator("#content").waitFor({ state: "visible" });
  assert.equal(await page.getAttribute("#whoami", "data-user"), "pasted-user");
  await page.reload(); // the token is kept for this tab
  await page.locator("#content").waitFor({ state: "visible" });
  await connected(page);

  // 70,000 bytes (the limit is 64 KiB); set directly, past the textarea's maxlength.
  await page.evaluate(() => { document.getElementById("message").value = "a".repeat(70000); });
  await page.focus("#message");
  await page.keyboard.press("Enter");
  await page.locator("#log li.error").waitFor();
  assert.match(await page.locator("#log li.error").textContent(), /too long/);
  assert.equal((await page.inputValue("#message")).length, 70000, "the message is given back to edit");
  assert.equal(await page.isEnabled("#send"), true);

  // Language: Korean strings everywhere, lang attribute, kept across pages.
  await page.selectOption("#lang", "ko");
  assert.equal(await page.getAttribute("html", "lang"), "ko");
  assert.equal(await page.textContent("h1"), "분리배출 도우미");
  assert.equal(await page.textContent("#send"), "보내기");
  assert.equal(await page.textContent("#status"), "연결됨");
  await page.goto(PLAIN + "/scan.html");
  assert.equal(await page.textContent("#scan-heading"), "물건 스캔");
  await page.selectOption("#lang", "en");
  assert.equal(await page.textContent("#scan-heading"), "Scan an item");

  await page.click("#signout");
  await page.locator("#signin").waitFor({ state: "visible" });
  assert.equal(await page.evaluate(() => sessionStorage.getItem("token")), null);
});

/** The character erin's first scan earned (set by the first scan test). */
let erinCharacter = null;

test("scan: upload a photo, progress reaches 100 %, the explanation streams and the result card appears", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "erin", "/scan.html");
  // Keyboard: the pickers are reachable with Tab.
  await page.focus("#camera");
  assert.equal(await page.getAttribute("#camera", "capture"), "environment");
  const seen = await page.evaluate(() => {
    window.progressSeen = [];
    window.stagesSeen = new Set();
    window.tokensSeen = 0;
    new MutationObserver(() => {
      window.progressSeen.push(document.getElementById("progress").value);
      for (const li of document.querySelectorAll("#stages li.active, #stages li.done")) window.stagesSeen.add(li.dataset.stage);
    }).observe(document.getElementById("stages"), { childList: true, subtree: true });
    new MutationObserver(() => { window.tokensSeen += 1; })
      .observe(document.getElementById("explanation"), { childList: true, characterData: true, subtree: true });
    return true;
  });
  assert.ok(seen);
  const upload = page.waitForResponse((r) => new URL(r.url()).pathname === "/v1/scans" && r.request().method() === "POST");
  await page.setInputFiles("#file", process.env.SCAN_IMAGE);
  const response = await upload;
  assert.equal(response.status(), 202, `POST /v1/scans answered ${response.status()}: ${await response.text()}`);
  // The explanation is asked for in the language the page shows.
  assert.equal(new URL(response.url()).searchParams.get("lang"), await page.evaluate(() => currentLang()));
  const { scan_id: scanId } = await response.json();
  await page.locator("#result").waitFor({ state: "visible", timeout: 120000 });
  assert.equal(await page.locator("#scan-error").textContent(), "");
  assert.equal(await page.evaluate(() => document.getElementById("progress").value), 100);
  const progress = await page.evaluate(() => window.progressSeen);
  assert.ok(progress.length >= 2, `progress moved: ${progress}`);
  for (let i = 1; i < progress.length; i += 1) assert.ok(progress[i] >= progress[i - 1], `progress never goes back: ${progress}`);
  assert.equal(await page.getAttribute('#stages li[data-stage="done"]', "data-state"), "done");
  const stages = await page.evaluate(() => [...window.stagesSeen]);
  assert.ok(stages.includes("stored") && stages.includes("done"), `stages shown: ${stages}`);
  assert.ok((await page.textContent("#r-category")).trim().length > 0, "a category");
  assert.match(await page.textContent("#r-confidence"), /^\d{1,3}%$/);
  assert.ok((await page.textContent("#r-bin")).trim().length > 0, "a bin");
  assert.ok(await page.locator("#r-steps li").count() >= 1, "disposal steps");
  assert.ok((await page.textContent("#r-why")).trim().length > 0, "a why");
  assert.ok((await page.textContent("#explanation")).trim().length > 0, "an explanation");
  assert.equal(await page.evaluate(() => document.activeElement.id), "result", "focus moves to the result");
  // The character this scan earned, erin's first: new.
  assert.equal(await page.isVisible("#r-reward"), true, "the result card shows the character");
  assert.equal(await page.getAttribute("#r-reward-state", "data-state"), "new");
  erinCharacter = await page.getAttribute("#r-reward-name", "data-character");
  assert.ok(erinCharacter, "a character id");
  assert.ok((await page.textContent("#r-reward-name")).trim().length > 0, "its name");
  // Listed in past scans (GET /v1/scans), newest first.
  await page.locator(`#scans button[data-scan="${scanId}"]`).waitFor({ timeout: 15000 });
  assert.equal(await page.getAttribute("#scans li:first-child button", "data-scan"), scanId);
  await screenshot(page, "scan", { fullPage: true });
});

/** Uploads `file` on the scan page and returns the new scan's id. */
async function uploadScan(page, file) {
  const upload = page.waitForResponse((r) => new URL(r.url()).pathname === "/v1/scans" && r.request().method() === "POST");
  await page.setInputFiles("#file", file);
  const response = await upload;
  assert.equal(response.status(), 202, `POST /v1/scans answered ${response.status()}`);
  return (await response.json()).scan_id;
}

test("scan: the gateway SIGKILLed mid-scan; EventSource resumes after the last event id and nothing shows twice", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "frank", "/scan.html");
  await page.evaluate(() => {
    window.texts = [];
    window.statusLog = [];
    new MutationObserver(() => window.texts.push(document.getElementById("explanation").textContent))
      .observe(document.getElementById("explanation"), { childList: true, characterData: true, subtree: true });
    new MutationObserver(() => window.statusLog.push(document.getElementById("status").dataset.key))
      .observe(document.getElementById("status"), { childList: true, characterData: true, subtree: true });
  });
  const scanId = await uploadScan(page, process.env.SCAN_IMAGE_2);
  // Kill while the explanation is being written.
  await page.waitForFunction(() => document.getElementById("explanation").textContent.length > 0, null, { timeout: 60000 });
  await control("kill-gateway");
  await page.locator("#result").waitFor({ state: "visible", timeout: 60000 });
  const texts = await page.evaluate(() => window.texts);
  for (const text of texts) assert.ok(EXPECTED.startsWith(text), `every explanation shown is a prefix of the answer: ${JSON.stringify(text)}`);
  assert.equal(await page.textContent("#explanation"), EXPECTED);
  assert.equal(await page.locator("#scan-error").textContent(), "");
  assert.equal(await page.evaluate(() => document.getElementById("progress").value), 100);
  const log = await page.evaluate(() => window.statusLog);
  const lost = log.indexOf("status.reconnecting");
  assert.ok(lost >= 0, `the page saw the stream drop: ${log}`);
  assert.ok(log.indexOf("status.connected", lost) > lost, `and reconnected: ${log}`);
  await page.locator(`#scans button[data-scan="${scanId}"]`).waitFor({ timeout: 15000 });
});

test("scan: the same photo again is answered from the cache, and a past scan opens from the list", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "erin", "/scan.html");
  await page.locator("#scans li").first().waitFor(); // erin's first scan is listed
  const scanId = await uploadScan(page, process.env.SCAN_IMAGE);
  await page.locator("#result").waitFor({ state: "visible", timeout: 60000 });
  assert.equal(await page.isVisible("#r-cached"), true, "marked as from the cache");
  assert.equal(await page.getAttribute('#stages li[data-stage="cache_hit"]', "data-state"), "done");
  assert.equal(await page.getAttribute('#stages li[data-stage="vision"]', "data-state"), "skipped");
  assert.ok((await page.textContent("#r-bin")).trim().length > 0);
  // A cache hit earns the character too, already collected this time.
  assert.equal(await page.isVisible("#r-reward"), true);
  assert.equal(await page.getAttribute("#r-reward-name", "data-character"), erinCharacter);
  assert.equal(await page.getAttribute("#r-reward-state", "data-state"), "again");
  await page.locator(`#scans button[data-scan="${scanId}"]`).waitFor({ timeout: 15000 });
  // Open the older one from the list.
  const older = page.locator("#scans li:nth-child(2) button");
  const olderId = await older.getAttribute("data-scan");
  assert.notEqual(olderId, scanId);
  await older.click();
  assert.equal(await page.isVisible("#result"), true);
  assert.equal(await page.isVisible("#r-cached"), false, "the older scan was not from the cache");
  assert.equal(await page.evaluate(() => document.activeElement.id), "result");
});

test("characters: My characters lists what erin earned, how often, in English and Korean", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "erin", "/characters.html");
  assert.equal(await page.getAttribute('nav a[href="characters.html"]', "aria-current"), "page");
  // The persister writes grants in batches (at most 5 s late): wait for both.
  const mine = page.locator(`#collection li[data-character="${erinCharacter}"]`);
  for (let attempt = 0; ; attempt += 1) {
    await page.reload();
    await page.locator("#catalogue li").first().waitFor({ timeout: 15000 });
    if ((await mine.count()) && (await mine.textContent()).includes("Earned 2 times")) break;
    assert.ok(attempt < 20, `erin's ${erinCharacter} earned twice: ${await page.textContent("#collection")}`);
    await page.waitForTimeout(1000);
  }
  assert.equal(await page.locator("#collection li").count(), 1);
  assert.equal(await page.getAttribute(`#catalogue li[data-character="${erinCharacter}"]`, "class"), "card character-card owned");
  assert.ok(await page.locator("#catalogue li.missing").count() >= 1, "the rest are still to collect");
  // In English: this machine's Chromium may lack Korean fonts.
  await screenshot(page, "characters", { fullPage: true });
  await page.selectOption("#lang", "ko");
  assert.equal(await page.textContent("#mine-heading"), "내 캐릭터");
  assert.ok((await mine.textContent()).includes("2번 획득"));
  await page.selectOption("#lang", "en"); // the choice is remembered for the pages after this one
});

test("scan: a reload mid-scan follows the same scan again to its result", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "gina", "/scan.html");
  const scanId = await uploadScan(page, process.env.SCAN_IMAGE_3);
  await page.waitForFunction(() => document.getElementById("progress").value > 0);
  await page.reload();
  await page.locator("#result").waitFor({ state: "visible", timeout: 60000 });
  assert.equal(await page.textContent("#explanation"), EXPECTED);
  assert.equal(await page.evaluate(() => document.getElementById("progress").value), 100);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("scan")), null, "nothing left to follow");
  await page.locator(`#scans li:first-child button[data-scan="${scanId}"]`).waitFor({ timeout: 15000 });
});

test("scan: a file that is not an image is refused in plain words", async (t) => {
  const page = await newPage(t);
  await devLogin(page, "hana", "/scan.html");
  const dir = mkdtempSync(join(tmpdir(), "webtest-upload-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, "notes.png");
  writeFileSync(file, "these are notes, not a picture\n");
  const upload = page.waitForResponse((r) => new URL(r.url()).pathname === "/v1/scans" && r.request().method() === "POST");
  await page.setInputFiles("#file", file);
  const response = await upload;
  assert.ok([400, 415].includes(response.status()), `refused: ${response.status()}`);
  const code = (await response.json()).error.code;
  const message = await page.locator("#scan-error").textContent();
  const expected = await page.evaluate((code) => STRINGS.en[`error.${code}`], code);
  assert.ok(expected, `the page has plain words for ${code}`);
  assert.equal(message, expected);
  assert.equal(await page.isVisible("#result"), false);
});
