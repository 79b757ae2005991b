// Scan page: upload a photo (POST /v1/scans), follow its progress over SSE
// (EventSource; on a drop it reconnects by itself and sends Last-Event-ID),
// stream the explanation in, show the result card, list past scans.
// The scan being followed is kept in sessionStorage, so a reload follows it
// again (a late subscriber gets every event from the first).
"use strict";

const STAGES = ["stored", "hashed", "cache_hit", "preprocessed", "vision", "rules", "answer", "reward", "done"];
const scan = {
  job: JSON.parse(sessionStorage.getItem("scan") || "null"), // {scan_id, events_url, status_url}
  es: null,
  lastId: 0,
  seen: new Set(),
  stage: null,
  percent: 0,
  explanation: "",
  record: null,
  scans: [],
};

function saveJob() {
  if (scan.job) sessionStorage.setItem("scan", JSON.stringify(scan.job));
  else sessionStorage.removeItem("scan");
}

function closeStream() {
  if (scan.es) scan.es.close();
  scan.es = null;
  if ($("status").dataset.key !== "status.signedOut") setStatus(null);
}

// ---- progress ----------------------------------------------------------------

function renderStages() {
  const current = STAGES.indexOf(scan.stage);
  const cached = scan.seen.has("cache_hit");
  $("stages").replaceChildren(...STAGES
    .filter((stage) => stage !== "cache_hit" || cached)
    .map((stage) => {
      const index = STAGES.indexOf(stage);
      let state = "pending";
      if (stage === scan.stage) state = stage === "done" ? "done" : "active";
      else if (scan.seen.has(stage)) state = "done";
      else if (index < current) state = cached ? "skipped" : "done";
      return el("li", { class: state, dataset: { stage, state }, "aria-current": state === "active" ? "step" : false }, t(`stage.${stage}`));
    }));
  $("progress").value = scan.percent;
  $("progress").setAttribute("aria-valuetext", scan.stage ? t("stage.status", { stage: t(`stage.${scan.stage}`), percent: scan.percent }) : `${scan.percent}%`);
  if (scan.stage) $("stage-status").textContent = t("stage.status", { stage: t(`stage.${scan.stage}`), percent: scan.percent });
}

function resetJob() {
  closeStream();
  Object.assign(scan, { lastId: 0, seen: new Set(), stage: null, percent: 0, explanation: "", record: null });
  $("scan-error").textContent = "";
  $("job").hidden = false;
  $("stage-status").textContent = "";
  $("explanation").textContent = "";
  $("explanation-block").hidden = true;
  $("result").hidden = true;
  renderStages();
}

// ---- upload and follow -------------------------------------------------------

async function upload(file) {
  if (!file) return;
  resetJob();
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = t("scan.preview");
  preview.hidden = false;
  $("stage-status").textContent = t("scan.uploading");
  const form = new FormData();
  form.append("image", file, file.name || "photo");
  try {
    // The explanation comes in the language the page shows.
    scan.job = await api(`/v1/scans?lang=${encodeURIComponent(currentLang())}`, { method: "POST", body: form });
  } catch (error) {
    $("stage-status").textContent = "";
    if (error.status === 401) return;
    const byStatus = { 413: "image_too_large", 415: "unsupported_media_type", 429: "too_many_requests" };
    const known = error.code !== "too_large" && `error.${error.code}` in STRINGS.en;
    $("scan-error").textContent = explain(known ? error.code : byStatus[error.status] || error.code, error.message);
    return;
  }
  saveJob();
  follow();
}

function follow() {
  const job = scan.job;
  const url = `${job.events_url}${job.events_url.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(Auth.token)}`;
  const es = new EventSource(url);
  scan.es = es;
  // Each event once: ids are contiguous per scan, and EventSource resumes
  // after the last one itself (Last-Event-ID).
  const handle = (fn) => (event) => {
    const id = Number(event.lastEventId);
    if (id && id <= scan.lastId) return;
    if (id) scan.lastId = id;
    let data;
    try { data = JSON.parse(event.data); } catch { return; }
    fn(data);
  };
  es.addEventListener("progress", handle(onProgress));
  es.addEventListener("token", handle(onToken));
  es.addEventListener("result", handle(onResult));
  es.addEventListener("error", (event) => {
    if (event.data !== undefined) { handle(onScanError)(event); return; } // the scan's own `error` event
    if (es.readyState === EventSource.CLOSED) { setStatus(null); lostStream(); return; } // refused (401, 404, ...): no retry
    setStatus("status.reconnecting", "warn");
    $("stage-status").textContent = t("scan.reconnecting");
  });
  es.addEventListener("open", () => { setStatus("status.connected", "ok"); renderStages(); });
}

function onProgress(data) {
  // The explanation starts over (a worker died mid-answer, or a retry):
  // the text so far is void.
  if (data.reset) {
    scan.explanation = "";
    $("explanation").textContent = "";
  }
  scan.seen.add(data.stage);
  scan.stage = data.stage;
  scan.percent = Math.max(scan.percent, Math.min(100, Number(data.percent) || 0));
  renderStages();
}

function onToken(data) {
  scan.explanation += data.delta;
  $("explanation-block").hidden = false;
  $("explanation").setAttribute("aria-busy", "true");
  $("explanation").classList.add("streaming");
  $("explanation").textContent = scan.explanation;
}

function onResult(record) {
  closeStream();
  scan.job = null;
  saveJob();
  scan.seen.add("done");
  scan.stage = "done";
  scan.percent = 100;
  renderStages();
  showRecord(record, { focus: true });
  loadScans();
}

function onScanError(data) {
  closeStream();
  scan.job = null;
  saveJob();
  $("explanation").setAttribute("aria-busy", "false");
  $("explanation").classList.remove("streaming");
  $("scan-error").textContent = explain(data.code, data.message);
  loadScans();
}

/** The event stream was refused or lost for good: ask for the status instead. */
async function lostStream() {
  closeStream();
  const job = scan.job;
  if (!job) return;
  try {
    const status = await api(job.status_url);
    if (status.result) { onResult(status.result); return; }
    if (status.status === "failed") { onScanError({ code: "scan_failed", message: status.result?.error || "" }); return; }
    scan.stage = status.stage || scan.stage;
    scan.percent = status.percent ?? scan.percent;
    renderStages();
    setTimeout(() => { if (scan.job === job && !scan.es) follow(); }, 2000);
  } catch (error) {
    if (error.status === 404 || error.status === 403) {
      scan.job = null;
      saveJob();
    }
    if (error.status !== 401) $("scan-error").textContent = t("error.scan_stream");
  }
}

// ---- result card -------------------------------------------------------------

function showRecord(record, { focus = false } = {}) {
  scan.record = record;
  const rule = record.rule;
  if (record.status === "failed") {
    $("result").hidden = true;
    $("scan-error").textContent = t("error.scan_failed", { message: record.error || "" });
    return;
  }
  $("r-category").textContent = rule ? pick(rule.name) : record.category || "unknown";
  $("r-category").dataset.category = record.category || "";
  const confidence = record.confidence ?? 0;
  $("r-meter").value = confidence;
  $("r-confidence").textContent = `${Math.round(confidence * 100)}%`;
  $("r-bin").textContent = rule ? pick(rule.bin) : "";
  $("r-steps").replaceChildren(...(rule?.steps || []).map((step) => el("li", {}, pick(step))));
  $("r-why").textContent = rule ? pick(rule.why) : "";
  $("r-cached").hidden = !record.cached;
  showReward(record.reward);
  $("r-labels").replaceChildren(...(record.labels || []).map((l) => el("li", {}, `${l.label} · ${Math.round(l.score * 100)}%`)));
  $("r-labels-block").hidden = !(record.labels || []).length;
  if (record.answer) {
    scan.explanation = record.answer;
    $("explanation").textContent = record.answer;
  }
  $("explanation-block").hidden = !scan.explanation;
  $("explanation").setAttribute("aria-busy", "false");
  $("explanation").classList.remove("streaming");
  $("result").hidden = false;
  if (focus) $("result").focus({ preventScroll: false });
}

// The character the scan earned: new, or already in the collection.
function showReward(reward) {
  const block = $("r-reward");
  if (!reward) {
    block.hidden = true;
    return;
  }
  $("r-reward-name").textContent = pick(reward.name);
  $("r-reward-name").dataset.character = reward.character_id;
  const badge = $("r-reward-state");
  badge.dataset.key = reward.new ? "reward.new" : "reward.again";
  badge.dataset.state = reward.new ? "new" : "again";
  badge.textContent = t(badge.dataset.key);
  block.hidden = false;
}

// ---- past scans --------------------------------------------------------------

function renderScans() {
  $("scans").replaceChildren(...scan.scans.map((record) => {
    const name = record.rule ? pick(record.rule.name) : record.category || t("scan.failed");
    const when = new Date(record.completed_at || record.created_at).toLocaleString(currentLang());
    const meta = record.status === "failed" ? t("scan.failed") : `${Math.round((record.confidence ?? 0) * 100)}%`;
    return el("li", {},
      el("button", { type: "button", dataset: { scan: record.scan_id }, onclick: () => openPast(record) },
        el("span", { class: "title" }, name),
        el("span", { class: "meta" }, `${when} · ${meta}`)));
  }));
  const none = $("no-scans");
  if (!scan.scans.length && !none.dataset.key) none.dataset.key = "scan.noHistory";
  none.textContent = none.dataset.key ? t(none.dataset.key) : "";
  none.hidden = scan.scans.length > 0;
}

function openPast(record) {
  if (scan.es) return; // a scan is being followed
  $("job").hidden = true;
  $("scan-error").textContent = "";
  scan.explanation = record.answer || "";
  $("explanation").textContent = scan.explanation;
  showRecord(record, { focus: true });
}

async function loadScans() {
  try {
    const { scans } = await api("/v1/scans");
    scan.scans = scans || [];
    $("no-scans").dataset.key = "scan.noHistory";
  } catch (error) {
    if (error.status === 401) return;
    scan.scans = [];
    $("no-scans").dataset.key = "scan.historyUnavailable";
  }
  renderScans();
}

// ---- start -------------------------------------------------------------------

function start() {
  if (scan.job) { resetJob(); follow(); }
  loadScans();
}

function stopAll() {
  closeStream();
  scan.job = null;
  $("job").hidden = true;
  $("result").hidden = true;
  $("explanation-block").hidden = true;
  $("scans").replaceChildren();
}

renderChrome("scan");
for (const id of ["camera", "file"]) {
  $(id).addEventListener("change", (event) => {
    const [file] = event.target.files;
    upload(file);
    event.target.value = "";
  });
}
onLangChange(() => {
  renderStages();
  renderScans();
  if (scan.record && !$("result").hidden) showRecord(scan.record);
  if (!$("preview").hidden) $("preview").alt = t("scan.preview");
});
Auth.require(start, stopAll);
