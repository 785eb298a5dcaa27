// stmae inspection page. Plain browser JavaScript: no framework, no build step, no CDN.
// Each image is scored once (POST /predict?heatmap=true, one request per image so one bad
// file cannot spoil the others). The raw scores stay here, so moving the threshold slider
// re-labels every card without asking the server again.
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);
  const slider = $("#threshold");
  const number = $("#threshold-value");
  const gallery = $("#gallery");
  const items = []; // {order, file, card, score, failed}
  let modelThreshold = null;
  let center = null; // median score of held-out good images (for the normalised score)
  let threshold = null;
  let scaleMax = 1;
  let queue = Promise.resolve();
  let counter = 0;

  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : x.toPrecision(4);
  }

  function setStatus(text) { $("#status").textContent = text; }

  // ---------------------------------------------------------------- model info
  function addInfo(dl, key, value) {
    if (value === null || value === undefined || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }

  async function loadInfo() {
    const res = await fetch("info");
    if (!res.ok) throw new Error("GET /info answered " + res.status);
    const info = await res.json();
    const meta = info.meta || {};
    const cal = info.calibration;
    const dl = $("#info");
    dl.textContent = "";
    $("#model-name").textContent = info.name || "";
    addInfo(dl, "model", info.name);
    addInfo(dl, "engine", info.engine);
    addInfo(dl, "input size", info.image_size ? info.image_size + " x " + info.image_size + " px" : null);
    if (meta.backbone) addInfo(dl, "backbone", meta.backbone.name + " (" + (meta.backbone.layers || []).join(", ") + ")");
    addInfo(dl, "threshold", fmt(info.threshold));
    if (cal) {
      addInfo(dl, "threshold rule", cal.rule + " over " + cal.n_images + " held-out good images");
      addInfo(dl, "pixel threshold", fmt(cal.pixel_threshold));
      addInfo(dl, "typical good score", fmt(cal.center));
    }
    addInfo(dl, "trained on", meta.n_train !== undefined ? meta.n_train + " images (" + meta.n_val + " held out)" : null);
    addInfo(dl, "epochs", meta.epochs);
    addInfo(dl, "created", meta.created);
    addInfo(dl, "model version", info.model_version);
    addInfo(dl, "made with stmae", meta.stmae_version);
    addInfo(dl, "service version", info.stmae_version);
    if (info.limits) {
      addInfo(dl, "limits", (info.limits.max_request_bytes / 1048576).toFixed(0) + " MiB per request, " +
        (info.limits.max_pixels / 1e6).toFixed(1) + " MP per image, " + info.limits.max_files + " files per request");
    }
    modelThreshold = info.threshold;
    center = cal ? cal.center : null;
    const start = modelThreshold !== null ? modelThreshold : 0.5;
    scaleMax = Math.max(2 * Math.abs(start), 1e-6);
    setThreshold(start);
    for (const el of [slider, number, $("#reset-threshold")]) el.disabled = false;
    setStatus("ready");
  }

  // ---------------------------------------------------------------- threshold
  function setThreshold(t) {
    if (!Number.isFinite(t)) return;
    threshold = t;
    if (t > scaleMax) scaleMax = t * 1.1;
    slider.max = String(scaleMax);
    slider.step = String(scaleMax / 1000);
    slider.value = String(t);
    if (document.activeElement !== number) number.value = String(Number(t.toPrecision(6)));
    relabelAll();
  }

  function growScale(score) {
    if (score > scaleMax * 0.95) {
      scaleMax = score * 1.1;
      slider.max = String(scaleMax);
      slider.step = String(scaleMax / 1000);
      slider.value = String(threshold);
    }
  }

  function normalized(score) {
    if (center === null) return null;
    let spread = threshold - center;
    if (!(spread > 0)) spread = Math.max(Math.abs(threshold), 1) * 1e-6;
    return Math.min(1, Math.max(0, 0.5 + 0.5 * (score - threshold) / spread));
  }

  function relabel(item) {
    if (item.score === null) return;
    const bad = item.score > threshold;
    const card = item.card;
    card.classList.toggle("anomalous", bad);
    card.classList.toggle("good", !bad);
    card.dataset.label = bad ? "1" : "0";
    card.querySelector(".verdict").textContent = bad ? "ANOMALOUS" : "GOOD";
    const norm = normalized(item.score);
    card.querySelector(".score").textContent = "score " + fmt(item.score) + " / threshold " + fmt(threshold) +
      (norm === null ? "" : " (normalised " + norm.toFixed(2) + ")");
    card.querySelector(".fill").style.width = Math.min(100, 100 * item.score / scaleMax) + "%";
    card.querySelector(".marker").style.left = Math.min(100, 100 * threshold / scaleMax) + "%";
  }

  function relabelAll() {
    items.forEach(relabel);
    const scored = items.filter((it) => it.score !== null);
    const flagged = scored.filter((it) => it.score > threshold).length;
    const failed = items.filter((it) => it.failed).length;
    $("#summary").textContent = scored.length ? scored.length + " scored, " + flagged + " anomalous" +
      (failed ? ", " + failed + " failed" : "") : "";
  }

  slider.addEventListener("input", () => setThreshold(Number(slider.value)));
  number.addEventListener("change", () => setThreshold(Number(number.value)));
  $("#reset-threshold").addEventListener("click", () => { if (modelThreshold !== null) setThreshold(modelThreshold); });

  // ---------------------------------------------------------------- sorting
  function sortGallery() {
    const how = $("#sort").value;
    const key = (it) => (it.score === null ? -Infinity : it.score);
    const sorted = items.slice().sort((a, b) => {
      if (how === "desc") return key(b) - key(a) || a.order - b.order;
      if (how === "asc") return (a.score === null) - (b.score === null) || key(a) - key(b) || a.order - b.order;
      return a.order - b.order;
    });
    for (const it of sorted) gallery.appendChild(it.card);
  }
  $("#sort").addEventListener("change", sortGallery);
  $("#clear").addEventListener("click", () => {
    for (const it of items) URL.revokeObjectURL(it.url);
    items.length = 0;
    gallery.textContent = "";
    relabelAll();
  });

  // ---------------------------------------------------------------- scoring
  function newCard(file) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    const item = { order: counter++, file: file, card: card, score: null, failed: false, url: URL.createObjectURL(file) };
    card.querySelector(".original").src = item.url;
    card.querySelector(".name").textContent = file.name;
    items.push(item);
    gallery.appendChild(card);
    return item;
  }

  async function score(item) {
    const form = new FormData();
    form.append("files", item.file, item.file.name);
    const card = item.card;
    try {
      const res = await fetch("predict?heatmap=true", { method: "POST", body: form });
      let body = null;
      try { body = await res.json(); } catch (e) { body = null; }
      if (!res.ok) throw new Error((body && body.detail) || "the service answered " + res.status);
      const r = body.results[0];
      item.score = r.score;
      card.querySelector(".heatmap").src = "data:image/png;base64," + r.heatmap;
      card.classList.remove("pending");
      card.dataset.score = String(r.score);
      if (r.log_id) enableFeedback(card, r.log_id);
      growScale(r.score);
      relabelAll();
      sortGallery();
    } catch (err) {
      item.failed = true;
      card.classList.remove("pending");
      card.classList.add("failed");
      card.querySelector(".verdict").textContent = "not scored";
      card.querySelector(".error").textContent = String(err.message || err);
      relabelAll();
    }
  }

  // ---------------------------------------------------------------- operator feedback
  function enableFeedback(card, logId) {
    const box = card.querySelector(".feedback");
    box.hidden = false;
    const marked = box.querySelector(".marked");
    const send = async (verdict) => {
      marked.textContent = "saving...";
      try {
        const res = await fetch("feedback", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ id: logId, verdict: verdict }),
        });
        let body = null;
        try { body = await res.json(); } catch (e) { body = null; }
        if (!res.ok) throw new Error((body && body.detail) || "the service answered " + res.status);
        card.dataset.feedback = verdict;
        marked.textContent = verdict === "good" ? "marked good part" : "marked defect";
      } catch (err) {
        marked.textContent = "not saved: " + String(err.message || err);
      }
    };
    box.querySelector(".mark-good").addEventListener("click", () => send("good"));
    box.querySelector(".mark-defect").addEventListener("click", () => send("defect"));
  }

  $("#update-model").addEventListener("click", async () => {
    const out = $("#update-status");
    out.textContent = "updating...";
    try {
      const res = await fetch("update", { method: "POST" });
      let body = null;
      try { body = await res.json(); } catch (e) { body = null; }
      if (!res.ok) throw new Error((body && body.detail) || "the service answered " + res.status);
      const e = body.entry;
      out.textContent = "now serving version " + body.version + ": " + e.images_added + " good images added, threshold " +
        fmt(e.image_threshold_before) + " -> " + fmt(e.image_threshold_after);
      await loadInfo();
    } catch (err) {
      out.textContent = "not updated: " + String(err.message || err);
    }
  });

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    for (const file of files) {
      const item = newCard(file);
      queue = queue.then(() => score(item)); // one request at a time: the service scores in order anyway
    }
    if (files.length) {
      setStatus("scoring " + files.length + " image(s)...");
      queue = queue.then(() => setStatus("ready"));
    }
  }

  $("#files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  const drop = $("#drop");
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => addFiles(e.dataTransfer.files));
  // Dropping anywhere else must not make the browser navigate away to the image.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => { e.preventDefault(); addFiles(e.dataTransfer.files); });
  drop.addEventListener("drop", (e) => e.stopPropagation());

  loadInfo().catch((err) => setStatus("cannot reach the service: " + err.message));
})();
