// The page: choose or drop an image, show the top labels and the attention overlay. For a
// CLIP (zero-shot), the labels are the user's, typed comma-separated. A second tab shows the
// model's inspection (/v1/inspect): its filters, position embeddings and attention distances.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5;
const ZERO_SHOT_TOP_K = 10;
const KEY_ITEM = "vitkit-api-key"; // in sessionStorage: kept until the tab is closed

let current = null; // the image being shown (a File)
let keyWanted = null; // { promise, resolve } while the page waits for an API key
let run = 0; // answers to an older choice are dropped
let zeroShot = false; // the model classifies by the labels typed (/v1/zero-shot)
const urls = { preview: null, overlay: null };
const TABS = ["classify", "inspect"];
// The inspection's figures, in the order shown, with what each says.
const FIGURES = {
  filters: "The filters that first see the pixels (left) and their top principal components",
  position_similarity:
    "How alike the patches' position embeddings are: each small map is one patch against all",
  attention_distance: "How far each head attends, layer by layer: one dot per head",
  attention_entropy: "How widely each head spreads its attention (higher: more evenly)",
};
let inspecting = false; // /v1/inspect is asked for once, when its tab is first opened

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

function showUrl(which, blob) {
  if (urls[which]) URL.revokeObjectURL(urls[which]);
  urls[which] = blob ? URL.createObjectURL(blob) : null;
  if (urls[which]) $(which).src = urls[which];
  else $(which).removeAttribute("src");
}

function setError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// The page asks for the key when the service first answers 401, once for all the calls
// refused together, and sends it with every call after.
function askForKey(refused) {
  if (!keyWanted) {
    let resolve;
    const promise = new Promise((r) => {
      resolve = r;
    });
    keyWanted = { promise, resolve };
    $("key-message").textContent = refused
      ? "That API key was refused. Enter the service's key:"
      : "This service needs an API key:";
    $("key-form").hidden = false;
    $("key").focus();
  }
  return keyWanted.promise;
}

function keyEntered(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key || !keyWanted) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key").value = "";
  $("key-form").hidden = true;
  const { resolve } = keyWanted;
  keyWanted = null;
  resolve();
}

// fetch, with the API key as a bearer token once there is one; a 401 asks for the key and
// calls again.
async function api(path, init = {}) {
  for (;;) {
    const sent = sessionStorage.getItem(KEY_ITEM);
    const headers = sent === null ? {} : { Authorization: `Bearer ${sent}` };
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    const now = sessionStorage.getItem(KEY_ITEM);
    if (now !== null && now !== sent) continue; // a key came in meanwhile: try that
    if (now !== null) sessionStorage.removeItem(KEY_ITEM); // this key was refused
    await askForKey(sent !== null);
  }
}

// The labels typed: comma-separated, blanks dropped.
function typedLabels() {
  return $("labels")
    .value.split(",")
    .map((label) => label.trim())
    .filter((label) => label);
}

// The service's answer, or an Error with its message for a refusal.
async function checked(response) {
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error || message;
  } catch {
    // not JSON: keep the status line
  }
  throw new Error(message);
}

async function post(path, file, params, fields = {}) {
  const body = new FormData();
  body.append("file", file);
  for (const [name, value] of Object.entries(fields)) body.append(name, value);
  return checked(await api(`${path}?${new URLSearchParams(params)}`, { method: "POST", body }));
}

function showLabels(labels) {
  const [best] = labels;
  $("top-label").textContent = best.label;
  $("top-probability").textContent = `${percent(best.probability)} probability`;
  const bars = $("bars");
  bars.replaceChildren(
    ...labels.map(({ label, probability }) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label;
      name.title = label;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true"); // the percentage beside it says the same
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${(probability * 100).toFixed(2)}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(probability);
      item.append(name, track, value);
      return item;
    }),
  );
}

async function explain(file, token) {
  const method = $("method").value;
  $("overlay-caption").textContent = `Where the model looked (${method})`;
  showUrl("overlay", null);
  const response = await post("/v1/explain", file, { method, top_k: 1 });
  const blob = await response.blob();
  if (token === run) showUrl("overlay", blob);
}

// /v1/predict's top labels, or /v1/zero-shot's ranking of the labels typed.
function labelsFor(file) {
  if (!zeroShot) return post("/v1/predict", file, { top_k: TOP_K });
  const labels = typedLabels();
  if (labels.length < 2) {
    return Promise.reject(new Error("type at least two labels, separated by commas"));
  }
  const params = { top_k: Math.min(ZERO_SHOT_TOP_K, labels.length) };
  return post("/v1/zero-shot", file, params, { labels: JSON.stringify(labels) });
}

async function classify(file) {
  const token = ++run;
  showTab("classify");
  current = file;
  setError("");
  $("status").textContent = `Classifying ${file.name || "the image"}…`;
  showUrl("preview", file);
  $("result").hidden = true;
  const predicted = labelsFor(file).then(async (response) => {
    const { labels } = await response.json();
    if (token !== run) return;
    showLabels(labels);
    $("result").hidden = false;
  });
  const explained = explain(file, token);
  const [labels, overlay] = await Promise.allSettled([predicted, explained]);
  if (token !== run) return;
  if (labels.status === "rejected") {
    $("status").textContent = "";
    setError(`Could not classify this file: ${labels.reason.message}`);
    return;
  }
  $("status").textContent = `${file.name || "The image"}: ${$("top-label").textContent}.`;
  if (overlay.status === "rejected") {
    setError(`Could not draw the attention map: ${overlay.reason.message}`);
  }
}

async function reexplain() {
  if (!current) return;
  const token = ++run;
  setError("");
  try {
    await explain(current, token);
  } catch (error) {
    if (token === run) setError(`Could not explain this image: ${error.message}`);
  }
}

function showTab(name) {
  for (const tab of TABS) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`${tab}-view`).hidden = !selected;
  }
  if (name === "inspect") inspectModel();
}

// Left and right arrows move between the tabs, as in any tab list.
function tabKey(event) {
  const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
  if (!step) return;
  const at = TABS.indexOf(event.target.id.replace("tab-", ""));
  const next = TABS[(at + step + TABS.length) % TABS.length];
  showTab(next);
  $(`tab-${next}`).focus();
}

function inspectionFigure(caption, png) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${png}`;
  img.alt = caption;
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figure.append(img, text);
  return figure;
}

async function inspectModel() {
  if (inspecting) return;
  inspecting = true;
  $("inspect-error").hidden = true;
  $("inspect-status").textContent = "Inspecting the model (the first time takes a few seconds)…";
  try {
    const body = await (await checked(await api("/v1/inspect"))).json();
    $("inspect-summary").textContent = body.summary;
    $("inspect-summary").hidden = false;
    $("inspect-figures").replaceChildren(
      ...Object.entries(FIGURES)
        .filter(([name]) => body.figures[name])
        .map(([name, caption]) => inspectionFigure(caption, body.figures[name])),
    );
    $("inspect-status").textContent = body.attention
      ? `Attention measured on ${body.num_images} of the model's own training images.`
      : "The model keeps no sample images, so its attention is not measured here " +
        "(vitkit inspect MODEL --data DATA measures it).";
  } catch (error) {
    inspecting = false; // asked again when the tab is next opened
    $("inspect-status").textContent = "";
    $("inspect-error").textContent = `Could not inspect the model: ${error.message}`;
    $("inspect-error").hidden = false;
  }
}

async function describeModel() {
  try {
    const model = await (await api("/v1/model")).json();
    const p = model.preprocessing;
    const colour = p.channels === 1 ? "greyscale" : "colour";
    zeroShot = model.zero_shot === true;
    const what = zeroShot
      ? "a CLIP, classifying by the labels you type"
      : `${model.labels.length} classes`;
    $("model-info").textContent =
      `Model ${model.name}: ${what}, ${p.image_size} × ${p.image_size} px ${colour} input.`;
    $("labels-form").hidden = !zeroShot;
    $("chart-title").textContent = zeroShot ? "Your labels, ranked" : "Top predictions";
  } catch {
    $("model-info").textContent = "The model's description is not available.";
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) classify(file);
  });
  $("method").addEventListener("change", reexplain);
  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
    $(`tab-${tab}`).addEventListener("keydown", tabKey);
  }
  $("labels-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (current) classify(current);
    else $("status").textContent = "Now choose an image to classify by these labels.";
  });
  $("key-form").addEventListener("submit", keyEntered);
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, () => drop.classList.add("dragging"));
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  // Drops are taken anywhere on the page: a file dropped beside the zone would otherwise
  // replace the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    if (file) classify(file);
  });
  describeModel();
}

setUp();
