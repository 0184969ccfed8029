// dermscore upload page: POST each dropped file to /api/upload, poll /api/result until it is
// scored or failed, then show probabilities, risk and the Grad-CAM heatmap. Everything from the
// server is inserted as text (textContent), never as HTML. Uploads carry the session token that
// the server put into the page (<meta name="dermscore-token">): without it the server refuses them.
"use strict";

const POLL_MS = 1000;
const GIVE_UP_MS = 15 * 60 * 1000;
let meta = null;  // {classes: [...], names: {...}, malignant: [...]}
const TOKEN = document.querySelector('meta[name="dermscore-token"]')?.content || "";
const counts = { uploaded: 0, scored: 0, failed: 0 };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "width") e.style.width = v;  // CSSOM, allowed by the page's CSP (style attributes are not)
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function updateSummary() {
  const pending = counts.uploaded - counts.scored - counts.failed;
  document.getElementById("summary").textContent =
    `${counts.uploaded} uploaded · ${counts.scored} scored · ${counts.failed} failed` +
    (pending ? ` · ${pending} in the pipeline` : "");
}

function picture(src, caption, alt) {
  const img = el("img", { src, alt });
  const fig = el("figure", {}, img, el("figcaption", {}, caption));
  img.addEventListener("error", () => fig.remove());  // e.g. a dropped file that is not a picture
  return fig;
}

function showResult(card, doc) {
  card.className = `card risk-${doc.risk_level}`;
  card.dataset.state = "scored";
  card.querySelector(".status").remove();
  const tags = el("div", {}, el("span", { class: `tag ${doc.risk_level}` }, `${doc.risk_level} risk`));
  if (doc.melanoma_flag) tags.append(el("span", { class: "tag mel" }, "melanoma flag"));
  if (doc.ood_flag) tags.append(el("span", { class: "tag ood" }, "unusual image (OOD / low quality)"));
  const pics = card.querySelector(".pics");
  if (doc.heatmap_key) {
    pics.append(picture(`/api/picture?key=${encodeURIComponent(doc.heatmap_key)}`,
                        `Grad-CAM (${meta.names[doc.heatmap_class] || doc.heatmap_class})`, "Grad-CAM heatmap"));
  }
  const rows = meta.classes
    .map((c) => [c, doc[`prob_${c}`]])
    .sort((a, b) => b[1] - a[1])
    .map(([c, p]) => el("tr", {},
      el("td", { class: "name", title: meta.names[c] }, meta.names[c]),
      el("td", {}, el("div", { class: "bar" + (meta.malignant.includes(c) ? " malignant" : ""),
                                width: `${Math.max(0.5, 100 * p).toFixed(1)}%` })),
      el("td", { class: "val" }, (100 * p).toFixed(1) + "%")));
  card.append(
    el("div", { class: "top" }, `${doc.top_class_name} (${(100 * doc.confidence).toFixed(1)}%)`),
    tags,
    el("p", { class: "muted" },
       `malignant probability ${(100 * doc.malignant_prob).toFixed(1)}% · ${doc.width}×${doc.height} px · ` +
       `model ${doc.model_name} v${doc.model_version}`),
    el("table", { class: "probs" }, el("tbody", {}, ...rows)));
  counts.scored += 1;
  updateSummary();
}

function showFailure(card, text) {
  card.className = "card failed";
  card.dataset.state = "failed";
  const s = card.querySelector(".status");
  s.className = "status";
  s.textContent = text;
  counts.failed += 1;
  updateSummary();
}

async function poll(card, key, started) {
  try {
    const r = await fetch(`/api/result?key=${encodeURIComponent(key)}`);
    const body = await r.json();
    if (body.status === "ok") return showResult(card, body.result);
    if (body.status === "failed") return showFailure(card, `not scored: ${body.reason} (${body.detail})`);
  } catch (e) { /* server busy: try again */ }
  if (Date.now() - started > GIVE_UP_MS) return showFailure(card, "no result after 15 minutes");
  setTimeout(() => poll(card, key, started), POLL_MS);
}

async function send(file) {
  const status = el("div", { class: "status pending" }, "uploading…");
  const preview = URL.createObjectURL(file);  // the user's own file, shown from the browser's memory
  const card = el("article", { class: "card", "data-name": file.name, "data-state": "pending" },
                  el("h2", {}, file.name), el("div", { class: "pics" }, picture(preview, "image", file.name)), status);
  document.getElementById("results").prepend(card);
  counts.uploaded += 1;
  updateSummary();
  try {
    const r = await fetch(`/api/upload?name=${encodeURIComponent(file.name)}`, {
      method: "POST", body: file, headers: { "X-Dermscore-Token": TOKEN } });
    const body = await r.json();
    if (!r.ok) return showFailure(card, `upload refused: ${body.error || r.status}`);
    card.dataset.key = body.key;
    status.textContent = "in the pipeline (queue → batch transform)…";
    poll(card, body.key, Date.now());
  } catch (e) {
    showFailure(card, `upload failed: ${e}`);
  }
}

function handleFiles(files) {
  for (const f of files) send(f);
}

async function init() {
  meta = await (await fetch("/api/meta")).json();
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  input.addEventListener("change", () => { handleFiles(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  window.addEventListener("dragover", (e) => e.preventDefault());   // a near miss must not open the file
  window.addEventListener("drop", (e) => e.preventDefault());
  document.body.dataset.ready = "1";
  updateSummary();
}

document.addEventListener("DOMContentLoaded", init);
