// difflab serve: the page's only script (no libraries, nothing loaded from elsewhere).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;        // GET /api/info
let imageOk = false;    // the chosen upload passed /api/preview
let polling = null;     // the job being polled

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

async function jsonOrError(resp) {
  let body = {};
  try { body = await resp.json(); } catch (e) { body = {}; }
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }
function model() { return info.models[Number($("model").value)]; }

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => {
    const o = document.createElement("option");
    o.value = value; o.textContent = label; o.selected = value === selected;
    return o;
  }));
}

function onModel() {
  const m = model();
  fillSelect($("class"), [["all", "all classes in turn"],
    ...m.class_names.map((n, i) => [String(i), `${i}: ${n}`])], "all");
  $("class-row").hidden = m.conditioning !== "class";
  $("prompt-row").hidden = m.conditioning !== "text";
  $("negative-row").hidden = !m.negative_prompt;
  $("guidance").disabled = !m.guided;
  if (!m.guided) $("guidance").value = 1;
  fillSelect($("sampler"), info.samplers.map((s) => [s, s]), m.default_sampler);
  $("steps").value = Math.min(m.default_steps, info.limits.max_steps);
  if ($("image").files.length) preview();
  onMode();
}

function onMode() {
  const md = mode();
  $("edit-rows").hidden = md === "generate";
  $("strength-row").hidden = md !== "sdedit";
  $("mask-tools").hidden = md !== "inpaint";
  $("mask").hidden = md !== "inpaint";
  $("sampler").disabled = md === "inpaint";  // inpainting takes DDIM (eta 1) steps
  $("run").textContent = {generate: "Generate", sdedit: "Run SDEdit", inpaint: "Inpaint"}[md];
}

async function preview() {
  imageOk = false;
  $("canvas-wrap").hidden = true;
  const file = $("image").files[0];
  if (!file) return;
  const fd = new FormData();
  fd.append("model", $("model").value);
  fd.append("image", file);
  try {
    const body = await jsonOrError(await fetch("/api/preview", {method: "POST", body: fd}));
    $("input-image").src = body.image;
    $("canvas-wrap").hidden = false;
    clearMask();
    imageOk = true;
    showMessage("");
  } catch (e) {
    showMessage(`Upload refused: ${e.message}`);
  }
}

// -- the mask: painted with the pointer on a canvas over the input image -----------------
const painting = {down: false, last: null};

function clearMask() {
  const c = $("mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

function canvasPoint(ev) {
  const c = $("mask"), r = c.getBoundingClientRect();
  return [(ev.clientX - r.left) * c.width / r.width, (ev.clientY - r.top) * c.height / r.height];
}

function paintTo(p) {
  const ctx = $("mask").getContext("2d");
  ctx.strokeStyle = "rgb(255, 255, 255)";  // shown at 60% over the image
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  const from = painting.last || p;
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(p[0], p[1]);
  ctx.stroke();
  painting.last = p;
}

function setupCanvas() {
  const c = $("mask");
  c.addEventListener("pointerdown", (ev) => {
    painting.down = true; painting.last = null; paintTo(canvasPoint(ev));
    c.setPointerCapture(ev.pointerId);
  });
  c.addEventListener("pointermove", (ev) => { if (painting.down) paintTo(canvasPoint(ev)); });
  const stop = () => { painting.down = false; painting.last = null; };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
  $("clear-mask").addEventListener("click", clearMask);
}

function maskBlob() {
  return new Promise((resolve) => $("mask").toBlob(resolve, "image/png"));
}

// -- jobs ------------------------------------------------------------------------------
async function submit(ev) {
  ev.preventDefault();
  showMessage("");
  const md = mode();
  const fd = new FormData($("form"));
  fd.delete("image");
  if (md !== "generate") {
    if (!imageOk) { showMessage("Choose an input image first."); return; }
    fd.append("image", $("image").files[0]);
  }
  if (md === "inpaint") fd.append("mask", await maskBlob(), "mask.png");
  if (md === "inpaint") fd.delete("sampler");
  try {
    const body = await jsonOrError(await fetch("/api/jobs", {method: "POST", body: fd}));
    $("run").disabled = true;
    $("progress-text").textContent = body.ahead ? `queued (${body.ahead} ahead)` : "starting";
    poll(body.id);
  } catch (e) {
    showMessage(e.message);
  }
}

function poll(id) {
  polling = id;
  const tick = async () => {
    let job;
    try {
      job = await jsonOrError(await fetch(`/api/jobs/${id}`));
    } catch (e) {
      finish(e.message);
      return;
    }
    $("progress").value = job.progress ?? 0;
    if (job.status === "queued") $("progress-text").textContent = "queued";
    if (job.status === "running") {
      const of = job.expected_nfe ? ` / ${job.expected_nfe}` : "";
      $("progress-text").textContent = `running: ${job.nfe}${of} network evaluations`;
    }
    if (job.status === "done") { addToGallery(job); finish(""); return; }
    if (job.status === "error") { finish(job.error); return; }
    setTimeout(tick, 200);
  };
  tick();
}

function finish(error) {
  polling = null;
  $("run").disabled = false;
  if (error) {
    showMessage(error);
    $("progress-text").textContent = "failed";
  }
}

function caption(s) {
  const parts = [s.mode, s.model, `${s.sampler}, ${s.steps} steps`, `guidance ${s.guidance}`,
    `seeds ${s.seeds[0]}-${s.seeds[s.seeds.length - 1]}`];
  if (s.class !== undefined) parts.push(`class ${s.class}`);
  if (s.prompt) parts.push(`prompt "${s.prompt}"`);
  if (s.negative_prompt) parts.push(`negative "${s.negative_prompt}"`);
  if (s.strength !== undefined) parts.push(`strength ${s.strength}`);
  return parts.join(" · ");
}

function addToGallery(job) {
  const s = job.settings;
  const div = document.createElement("div");
  div.className = "job";
  div.dataset.mode = s.mode;
  div.dataset.id = job.id;
  const cap = document.createElement("div");
  cap.className = "caption";
  cap.textContent = `${caption(s)} · ${job.seconds} s · `;
  const json = document.createElement("a");
  json.href = job.settings_url; json.textContent = "settings.json";
  json.download = `difflab_${job.id.slice(0, 8)}.json`;
  cap.append(json);
  const images = document.createElement("div");
  images.className = "images";
  job.images.forEach((url, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url; img.alt = `seed ${s.seeds[i]}`;
    const a = document.createElement("a");
    a.href = url; a.download = `difflab_${job.id.slice(0, 8)}_seed${s.seeds[i]}.png`;
    a.textContent = `seed ${s.seeds[i]} (PNG)`;
    fig.append(img, a);
    images.append(fig);
  });
  div.append(cap, images);
  $("gallery").prepend(div);
  $("progress-text").textContent = `done in ${job.seconds} s`;
}

async function start() {
  try {
    info = await jsonOrError(await fetch("/api/info"));
  } catch (e) {
    showMessage(`Cannot reach the server: ${e.message}`);
    return;
  }
  $("version").textContent = `difflab ${info.version}`;
  fillSelect($("model"), info.models.map((m) => [String(m.index),
    `${m.name} (${m.conditioning}, ${m.channels}x${m.height}x${m.width})`]), "0");
  $("count").max = info.limits.max_count;
  $("steps").max = info.limits.max_steps;
  $("model").addEventListener("change", onModel);
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", onMode));
  $("image").addEventListener("change", preview);
  $("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
  $("form").addEventListener("submit", submit);
  setupCanvas();
  onModel();
  document.body.dataset.ready = "1";
}

start();
