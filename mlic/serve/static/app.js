// mlic web page: upload images to /v1/predict, draw score bars against thresholds, overlay attention maps.
"use strict";

const state = { model: null, results: [] };
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value || localStorage.getItem("mlic-api-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function status(text, ok) {
  $("status").textContent = text;
  $("status").className = ok ? "ok" : "";
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    status("This service needs an API key: enter it above, then choose images.");
    return false;
  }
  const body = await response.json();
  if (!response.ok) { status(body.error || "cannot read the model"); return false; }
  state.model = body;
  $("model").textContent = `${body.backbone} + ${body.head} head · ${body.classes.length} classes · ` +
    `${body.img_size}px · ${body.engine}` + (body.attention ? " · attention maps" : "");
  return true;
}

function threshold(k) {
  return $("per-class").checked ? state.model.thresholds[k] : parseFloat($("threshold").value);
}

function drawAttention(card, map) {
  const canvas = card.querySelector("canvas");
  const img = card.querySelector("img");
  canvas.width = 256; canvas.height = 256;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, 256, 256);
  if (!map) return;
  const h = map.length, w = map[0].length;
  const flat = map.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const grid = document.createElement("canvas");
  grid.width = w; grid.height = h;
  const g = grid.getContext("2d");
  const pixels = g.createImageData(w, h);
  flat.forEach((v, i) => {
    const t = (v - lo) / (hi - lo + 1e-12);  // blue (low) to red (high), more opaque where attention is high
    pixels.data.set([Math.round(255 * t), Math.round(80 * (1 - Math.abs(t - 0.5) * 2)), Math.round(255 * (1 - t)),
                     Math.round(60 + 130 * t)], i * 4);
  });
  g.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(grid, 0, 0, 256, 256);
  img.title = "attention map";
}

function render() {
  const results = $("results");
  results.textContent = "";
  for (const item of state.results) {
    const card = $("card").content.firstElementChild.cloneNode(true);
    card.querySelector("img").src = item.url;
    card.querySelector(".name").textContent = item.name;
    const bars = card.querySelector(".bars");
    const classes = state.model.classes;
    const order = classes.map((c, k) => k).sort((a, b) => item.scores[classes[b]] - item.scores[classes[a]]);
    const on = [];
    for (const k of order) {
      const name = classes[k], score = item.scores[name], thr = threshold(k);
      const li = document.createElement("li");
      li.className = "label" + (score >= thr ? " on" : "");
      li.dataset.label = name;
      li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span>' +
                     '<span class="mark"></span></span><span class="score"></span>';
      li.querySelector(".name").textContent = name;
      li.querySelector(".fill").style.width = (100 * score).toFixed(1) + "%";
      li.querySelector(".mark").style.left = `calc(${(100 * thr).toFixed(1)}% - 1px)`;
      li.querySelector(".mark").title = "threshold " + thr.toFixed(2);
      li.querySelector(".score").textContent = score.toFixed(3);
      if (item.attention && item.attention[name]) {
        li.classList.add("attn");
        li.addEventListener("click", () => {
          bars.querySelectorAll("li").forEach((x) => x.classList.remove("selected"));
          li.classList.add("selected");
          drawAttention(card, item.attention[name]);
        });
      }
      if (score >= thr) on.push(name);
      bars.appendChild(li);
    }
    const attn = item.attention ? Object.keys(item.attention) : [];
    card.querySelector(".hint").textContent = (on.length ? "labels: " + on.join(", ") : "no label above its threshold") +
      (attn.length ? " · click a label with a map to see where it looked" : "");
    if (attn.length) {
      const first = on.find((c) => item.attention[c]) || attn[0];
      bars.querySelector(`li[data-label="${CSS.escape(first)}"]`).classList.add("selected");
      drawAttention(card, item.attention[first]);
    }
    results.appendChild(card);
  }
}

async function predict(files) {
  if (!state.model && !(await loadModel())) return;
  const images = [...files].filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|webp|bmp|gif|tiff?)$/i.test(f.name));
  if (!images.length) { status("Choose image files (JPEG, PNG, WebP, …)."); return; }
  const limit = state.model.limits.max_files;
  status(`Predicting ${images.length} image(s)…`, true);
  const fresh = [];
  for (let i = 0; i < images.length; i += limit) {  // the service takes max_files images per request
    const chunk = images.slice(i, i + limit);
    const form = new FormData();
    chunk.forEach((f) => form.append("file", f, f.name));
    if (state.model.attention) form.append("attention", "true");
    const response = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) { status(body.error || `HTTP ${response.status}`); if (response.status === 401) $("key-box").hidden = false; return; }
    body.results.forEach((r, j) => fresh.push({ ...r, name: chunk[j].name, url: URL.createObjectURL(chunk[j]) }));
  }
  state.results = fresh.concat(state.results);
  status(`${fresh.length} image(s) labelled.`, true);
  render();
}

function init() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => predict(e.target.files));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => predict(e.dataTransfer.files));
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = parseFloat($("threshold").value).toFixed(2);
    if (state.model) render();
  });
  $("per-class").addEventListener("change", () => {
    $("threshold").disabled = $("per-class").checked;
    if (state.model) render();
  });
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("mlic-api-key", $("api-key").value);
    state.model = null;
    loadModel();
  });
  loadModel();
}

init();
