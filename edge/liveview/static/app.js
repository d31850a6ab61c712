// Live view: one EventSource for state, the picture fetched only when a new one exists
// (one fetch at a time), polling /api/state as a fallback. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let pictureVersion = -1;
let pictureLoading = false;
let pictureWanted = false;
let ngKeys = "";
let lastState = null;

function fmt(v, digits) {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
}
function pct(v) {
  return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %";
}
function text(id, v) {
  const el = $(id);
  const s = String(v);
  if (el.textContent !== s) el.textContent = s;
}
function timeOnly(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : "–";
}

function loadPicture() {
  if (pictureLoading) { pictureWanted = true; return; }
  pictureLoading = true;
  pictureWanted = false;
  const img = new Image();
  img.onload = () => {
    $("live-img").src = img.src;
    $("live-empty").classList.add("hidden");
    pictureLoading = false;
    if (pictureWanted) loadPicture();
  };
  img.onerror = () => { pictureLoading = false; };
  img.src = "/api/frame.jpg?v=" + pictureVersion;
}

function render(s) {
  lastState = s;
  const running = s.health ? s.health.running : !s.finished;
  const pill = $("run-state");
  const state = running ? "running" : s.finished ? "finished" : "stopped";
  text("run-state", state);
  pill.className = "pill " + state;
  text("clock", new Date(s.time * 1000).toISOString().substring(11, 19) + "Z");

  if (s.model) {
    text("model-id", s.model.id);
    text("model-backend", s.model.backend);
    text("thr-image", Number(s.model.image_threshold).toPrecision(4));
    text("thr-pixel", Number(s.model.pixel_threshold).toPrecision(3));
    text("thr-rule", s.model.rule);
    text("op-line", s.model.operating_point || "");
    $("op-report").hidden = !s.model.report;
  }
  $("shadow-row").hidden = !s.shadow;
  if (s.shadow) {
    const sh = s.shadow;
    text("shadow-line", `${sh.shadow_model_id} · compared ${sh.compared} · agree ${sh.agree} · disagree ${sh.disagree} ` +
      `(live OK / shadow NG ${sh.live_ok_shadow_ng}, live NG / shadow OK ${sh.live_ng_shadow_ok}) · skipped ${sh.skipped}`);
  }

  const last = s.last;
  renderFeedback(s, last);
  const panel = $("verdict-panel");
  if (last) {
    const cls = last.verdict === "OK" ? "ok" : last.verdict === "NG" ? "ng" : "ni";
    panel.className = "verdict " + cls;
    text("verdict", last.verdict === "NOT_INSPECTED" ? "NOT INSPECTED" : last.verdict);
    text("score-norm", fmt(last.score_norm, 2));
    text("last-seq", "#" + last.seq);
    text("last-part-id", last.part_id || "–");
    text("last-time", timeOnly(last.time));
    text("last-reason", last.reason ? "reason: " + last.reason.replaceAll("_", " ") : "");
  }

  const c = s.counts;
  text("count-parts", c.parts);
  text("count-ok", c.OK);
  text("count-ng", c.NG);
  text("count-ni", c.NOT_INSPECTED);
  const w = s.window;
  document.querySelectorAll(".win").forEach((el) => { el.textContent = fmt(w.minutes, 0) + " min"; });
  text("yield-all", pct(s.yield));
  text("yield-win", pct(w.yield));
  text("fps-win", fmt(w.fps, 1));
  text("fps-now", s.health ? fmt(s.health.camera.fps_now, 1) : "–");

  renderDrift(s.drift);
  if (s.health) renderHealth(s.health);
  renderFault(s.fault);

  if (s.picture && s.picture.seq !== null && s.picture.version !== pictureVersion) {
    pictureVersion = s.picture.version;
    text("pic-caption", "picture of part #" + s.picture.seq);
    loadPicture();
  }
  renderStrip(s.ng);
}

let feedbackOn = false;
function renderFeedback(s, last) {
  // Marking needs the token and an output folder; the server checks both again.
  const on = !!s.feedback && !s.read_only;
  if (on !== feedbackOn) {
    feedbackOn = on;
    $("feedback").hidden = !on;
    document.querySelectorAll(".mark.false-reject").forEach((b) => { b.hidden = !on; });
  }
  if (s.feedback) {
    const c = s.feedback.counts;
    text("fb-counts", `false rejects ${c.false_reject} · missed ${c.missed}`);
  }
  const missed = $("mark-missed");
  missed.hidden = !(on && last && last.verdict === "OK");
  if (last) missed.dataset.seq = last.seq;
}

function sendFeedback(seq, label) {
  text("fb-msg", "marking part #" + seq + " …");
  fetch("/api/feedback", {
    method: "POST",
    cache: "no-store",
    headers: { "Content-Type": "application/json", "Authorization": "Bearer " + $("fb-token").value },
    body: JSON.stringify({ seq: Number(seq), label: label, reason: $("fb-reason").value || null }),
  })
    .then(async (r) => {
      const body = await r.text();
      if (!r.ok) { text("fb-msg", "refused: " + body); return; }
      text("fb-msg", "part #" + seq + " filed as " + label.replace("_", " ") + ": " + JSON.parse(body).path);
      poll();
    })
    .catch((e) => text("fb-msg", "not sent: " + e));
}
$("mark-missed").addEventListener("click", (e) => sendFeedback(e.target.dataset.seq, "missed"));

function renderFault(fault) {
  // The runtime's fault state (watchdog, NaN output, camera, counter): parts are NOT_INSPECTED.
  const banner = $("fault-banner");
  if (fault) {
    banner.textContent = "FAULT: " + fault + " (parts are recorded NOT_INSPECTED and rejected; ready is off)";
    banner.classList.remove("hidden");
  } else {
    banner.classList.add("hidden");
  }
}

function renderDrift(d) {
  const banner = $("drift-banner");
  if (!d) { text("drift-ratio", "off"); return; }
  if (d.ratio === null) {
    text("drift-ratio", d.reference ? "collecting" : "no reference");
    text("drift-ref", d.reference ? d.ok_parts + " OK parts" : "model metadata has no calibration median");
  } else {
    text("drift-ratio", d.ratio.toFixed(2) + "×");
    text("drift-ref", "median of last " + d.ok_parts + " OK scores / calibration median · warn at " + d.warn_ratio + "×");
  }
  const scale = 2 * d.warn_ratio;
  const fill = $("drift-fill");
  fill.style.width = d.ratio === null ? "0" : Math.min(100, (100 * d.ratio) / scale) + "%";
  fill.className = d.warning ? "warn" : "";
  $("drift-warn").style.left = (100 * d.warn_ratio) / scale + "%";
  if (d.warning) {
    banner.textContent = "Score drift " + d.ratio.toFixed(2) + "× the calibration median (warning above " +
      d.warn_ratio + "×): check lighting, focus and the fixture before false rejects pile up.";
    banner.classList.remove("hidden");
  } else {
    banner.classList.add("hidden");
  }
}

function renderHealth(h) {
  const set = (id, state, detail) => {
    $(id).className = "h " + state;
    $(id).querySelector(".detail").textContent = detail;
  };
  const cam = h.camera;
  set("h-camera", cam.state, `${cam.acquired} frames · dropped ${cam.dropped} · corrupt ${cam.corrupt} · ` +
    `timeouts ${cam.timeouts} · reconnects ${cam.reconnects}`);
  const m = h.model;
  set("h-model", m.state, `${m.backend || ""} · infer p50 ${fmt(m.infer_ms_p50, 1)} ms p99 ${fmt(m.infer_ms_p99, 1)} ms · errors ${m.errors}`);
  const d = h.disk;
  set("h-disk", d.state, `free ${d.free_gb === null ? "?" : d.free_gb + " GB"} · write errors ${d.write_errors} · backlog ${d.backlog}`);
}

function renderStrip(ng) {
  const keys = ng.map((r) => r.seq + ":" + r.thumb).join(",");
  if (keys === ngKeys) return;
  ngKeys = keys;
  const strip = $("ng-strip");
  strip.replaceChildren();
  if (!ng.length) {
    const e = document.createElement("div");
    e.className = "empty-strip";
    e.textContent = "no NG part yet";
    strip.append(e);
    return;
  }
  for (const r of ng) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "ng-thumb";
    b.dataset.seq = r.seq;
    const img = document.createElement("img");
    img.alt = "NG part " + r.seq;
    if (r.thumb) img.src = "/api/ng/" + r.seq + "/thumb.jpg";
    const t = document.createElement("div");
    t.className = "t";
    t.innerHTML = "<span>#" + r.seq + "</span><span>" + fmt(r.score_norm, 2) + "×</span>";
    b.append(img, t);
    b.addEventListener("click", () => openModal(r));
    const item = document.createElement("div");
    item.className = "ng-item";
    const mark = document.createElement("button");
    mark.type = "button";
    mark.className = "mark false-reject";
    mark.dataset.seq = r.seq;
    mark.textContent = "false reject";
    mark.hidden = !feedbackOn;
    mark.addEventListener("click", () => sendFeedback(r.seq, "false_reject"));
    item.append(b, mark);
    strip.append(item);
  }
}

function openModal(r) {
  const rec = (lastState && lastState.ng.find((x) => x.seq === r.seq)) || r;
  text("modal-title", "NG part #" + rec.seq + (rec.part_id ? " · id " + rec.part_id : "") + " · " +
    fmt(rec.score_norm, 2) + "× threshold · " + timeOnly(rec.time));
  $("modal-img").src = "/api/ng/" + rec.seq + ".jpg";
  const svg = $("modal-regions");
  svg.replaceChildren();
  const size = rec.image_size || [1, 1];
  svg.setAttribute("viewBox", "0 0 " + size[0] + " " + size[1]);
  svg.setAttribute("preserveAspectRatio", "none");
  const body = $("modal-table");
  body.replaceChildren();
  (rec.regions || []).forEach((g, i) => {
    const ns = "http://www.w3.org/2000/svg";
    const rect = document.createElementNS(ns, "rect");
    for (const [k, v] of [["x", g.x], ["y", g.y], ["width", g.width], ["height", g.height]]) rect.setAttribute(k, v);
    svg.append(rect);
    const tr = document.createElement("tr");
    for (const v of [i + 1, g.x, g.y, g.width, g.height, g.area, g.max_score.toFixed(3)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  });
  $("modal").classList.remove("hidden");
}

$("modal-close").addEventListener("click", () => $("modal").classList.add("hidden"));
$("modal").addEventListener("click", (e) => { if (e.target === $("modal")) $("modal").classList.add("hidden"); });

let pollTimer = null;
function poll() {
  fetch("/api/state", { cache: "no-store" })
    .then((r) => r.json())
    .then(render)
    .catch(() => { $("run-state").className = "pill offline"; text("run-state", "offline"); });
}

function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("state", (e) => {
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
    render(JSON.parse(e.data));
  });
  es.onerror = () => {
    // EventSource reconnects by itself; meanwhile the state is polled.
    if (!pollTimer) pollTimer = setInterval(poll, 2000);
  };
}
connect();
