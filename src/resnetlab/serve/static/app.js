// The resnetlab serve page: send one image to /explain, show the top-k, the Grad-CAM overlay and the latency.
// Plain browser JavaScript, no libraries: the page works with no network beyond this server.
"use strict";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);
let current = null; // the image being shown (a File or Blob)
let photoUrl = null;

function percent(p) {
  return p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
}

function milliseconds(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  document.body.classList.remove("busy");
}

async function describeModel() {
  try {
    const response = await fetch("/metadata");
    const meta = await response.json();
    if (!response.ok) throw new Error(meta.error || `error ${response.status}`);
    const size = meta.input_size.slice(-2).join("×");
    $("model").textContent = `${meta.architecture} · ${meta.num_classes} classes · input ${size} px · ${meta.device}`;
  } catch (err) {
    $("model").textContent = `could not read the model's description (${err.message})`;
  }
}

function choose(file) {
  if (!file) return;
  current = file;
  if (photoUrl) URL.revokeObjectURL(photoUrl);
  photoUrl = URL.createObjectURL(file);
  $("photo").src = photoUrl;
  $("result").hidden = true; // the last image's answer does not belong to this one
  explain(null);
}

async function explain(target) {
  const form = new FormData();
  form.append("file", current, current.name || "pasted image");
  const query = `top_k=${TOP_K}` + (target === null ? "" : `&target=${target}`);
  $("error").hidden = true;
  $("status").textContent = "Asking the model…";
  document.body.classList.add("busy");
  const started = performance.now();
  let response, body;
  try {
    response = await fetch(`/explain?${query}`, { method: "POST", body: form });
  } catch (err) {
    showError(`The server did not answer (${err.message}). Is resnetlab serve still running?`);
    return;
  }
  try {
    body = await response.json();
  } catch (err) {
    showError(`The server answered ${response.status} ${response.statusText} with no readable message.`);
    return;
  }
  if (!response.ok) {
    showError(body.error || `The server answered ${response.status}.`);
    return;
  }
  show(body, performance.now() - started);
}

function show(body, roundTrip) {
  const best = body.top[0];
  $("top-label").textContent = best.label;
  $("top-probability").textContent = percent(best.probability);
  $("explained-label").textContent = `${body.explained.label} (${percent(body.explained.probability)})`;
  $("overlay").src = `data:image/png;base64,${body.overlay_png_base64}`;

  const list = $("topk");
  list.replaceChildren();
  for (const entry of body.top) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.index = entry.index;
    button.className = entry.index === body.explained.index ? "explained" : "";
    button.title = `show the Grad-CAM for ${entry.label}`;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, 100 * entry.probability)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(entry.probability);
    button.append(name, bar, value);
    button.addEventListener("click", () => explain(entry.index));
    item.append(button);
    list.append(item);
  }

  $("latency-server").textContent = milliseconds(body.latency_ms.total);
  $("latency-model").textContent = `${milliseconds(body.latency_ms.model)} (forward pass and Grad-CAM)`;
  $("latency-round-trip").textContent = milliseconds(roundTrip);
  $("result").hidden = false;
  $("status").textContent = "";
  document.body.classList.remove("busy");
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((entry) => entry.kind === "file");
    if (item) choose(item.getAsFile());
  });
  describeModel();
}

setUp();
