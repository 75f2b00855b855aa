// The diffloom serve page: a form, a live preview fed by server-sent events, and the gallery.
"use strict";

const FIELDS = ["prompt", "negative_prompt", "steps", "guidance", "scheduler", "seed", "width", "height",
                "num_images"];
const NUMBERS = ["steps", "guidance", "seed", "width", "height", "num_images"];
const $ = (id) => document.getElementById(id);

let currentJob = null;
let stream = null;
let frames = 0;

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function setState(state, text) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = text;
}

function showMessage(text, field) {
  $("message").textContent = text || "";
  for (const name of FIELDS) $(name).classList.toggle("invalid", name === field);
}

function fillForm(settings) {
  for (const name of FIELDS) {
    if (!(name in settings)) continue;
    const value = settings[name];
    $(name).value = value === null || value === undefined ? "" : value;
  }
}

function readForm() {
  const settings = {};
  for (const name of FIELDS) {
    const raw = $(name).value;
    if (!NUMBERS.includes(name)) settings[name] = raw;
    else if (raw.trim() === "") settings[name] = name === "seed" ? null : undefined;
    else settings[name] = Number(raw);
  }
  for (const name of Object.keys(settings)) if (settings[name] === undefined) delete settings[name];
  return settings;
}

function setBounds(limits, defaults) {
  const bounds = {steps: limits.steps, guidance: limits.guidance, num_images: limits.num_images,
                  width: limits.size, height: limits.size, seed: limits.seed};
  for (const [name, [low, high]] of Object.entries(bounds)) {
    $(name).min = low;
    $(name).max = high;
  }
  $("width").step = $("height").step = limits.size_multiple;
  $("prompt").maxLength = $("negative_prompt").maxLength = limits.prompt_chars;
  fillForm({...defaults, seed: null});
}

function running(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
}

function showImage(src) {
  $("preview").src = src;
  $("preview").hidden = false;
  $("placeholder").hidden = true;
}

function showResults(images) {
  const box = $("results");
  box.replaceChildren();
  if (images.length < 2) return;
  images.forEach((image, i) => {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `image ${i + 1}`;
    img.className = i === 0 ? "chosen" : "";
    img.onclick = () => {
      showImage(image.url);
      for (const other of box.children) other.classList.toggle("chosen", other === img);
    };
    box.append(img);
  });
}

function finish(data, stopped) {
  stream.close();
  stream = null;
  currentJob = null;
  sessionStorage.removeItem("job");
  running(false);
  $("bar").style.width = `${Math.round(100 * data.steps_done / data.total)}%`;
  if (data.images.length) showImage(data.images[0].url);
  showResults(data.images);
  const count = data.images.length === 1 ? "1 image" : `${data.images.length} images`;
  if (stopped) setState("stopped", `Stopped after step ${data.steps_done} of ${data.total}` +
                                   (data.images.length ? ` (${count} of the latents so far)` : ""));
  else setState("done", `Done: ${count}, ${data.total} steps`);
  $("seed-used").textContent = `Seed ${data.seed}`;
  loadGallery();
}

function follow(jobId) {
  currentJob = jobId;
  sessionStorage.setItem("job", jobId);  // a reload of this tab picks the run up again
  frames = 0;
  $("preview").dataset.frames = "0";
  stream = new EventSource(`/api/jobs/${jobId}/events`);
  stream.addEventListener("queued", (e) => {
    const data = JSON.parse(e.data);
    setState("queued", data.position === 0 ? "Waiting: next in line" : `Waiting: ${data.position} ahead`);
  });
  stream.addEventListener("started", (e) => {
    const data = JSON.parse(e.data);
    setState("running", `Starting (${data.total} steps)`);
    $("seed-used").textContent = `Seed ${data.seed}`;
  });
  stream.addEventListener("step", (e) => {
    const data = JSON.parse(e.data);
    frames += 1;
    $("preview").dataset.frames = String(frames);
    showImage(data.preview);
    $("bar").style.width = `${Math.round(100 * (data.index + 1) / data.total)}%`;
    setState("running", `Step ${data.index + 1} of ${data.total}`);
  });
  stream.addEventListener("done", (e) => finish(JSON.parse(e.data), false));
  stream.addEventListener("stopped", (e) => finish(JSON.parse(e.data), true));
  stream.addEventListener("error", (e) => {
    if (e.data) {  // the job's own error event (a lost connection has no data and is retried by the browser)
      stream.close();
      running(false);
      currentJob = null;
      sessionStorage.removeItem("job");
      setState("error", `Failed: ${JSON.parse(e.data).message}`);
    }
  });
}

async function generate(event) {
  event.preventDefault();
  showMessage("");
  const response = await fetch("/api/generate", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(readForm()),
  });
  const data = await response.json();
  if (!response.ok) {
    showMessage(data.error, data.field);
    return;
  }
  running(true);
  $("results").replaceChildren();
  $("bar").style.width = "0";
  $("seed-used").textContent = `Seed ${data.seed}`;
  setState("queued", "Queued");
  follow(data.job);
}

async function stop() {
  if (!currentJob) return;
  $("stop").disabled = true;
  setState("running", `${$("state").textContent}: stopping after this step`);
  await fetch(`/api/jobs/${currentJob}/stop`, {method: "POST"});
}

function galleryItem(item) {
  const s = item.settings;
  const box = document.createElement("div");
  box.className = "item";
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = s.prompt;
  img.loading = "lazy";
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = s.prompt || "(no prompt)";
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `seed ${item.image_seed} · ${s.steps} steps · ${s.scheduler.replace(/Scheduler$/, "")} · ` +
                     `cfg ${s.guidance} · ${s.width}×${s.height}`;
  if (item.stopped) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = ` · stopped at ${item.steps_done}/${item.total_steps}`;
    meta.append(badge);
  }
  const use = document.createElement("button");
  use.type = "button";
  use.className = "secondary small";
  use.textContent = "Use these settings";
  use.onclick = () => {
    fillForm(s);
    showMessage("");
    window.scrollTo({top: 0, behavior: "smooth"});
  };
  box.append(img, prompt, meta, use);
  box.dataset.name = item.name;
  return box;
}

async function loadGallery() {
  const {outputs} = await getJSON("/api/outputs");
  $("gallery").replaceChildren(...outputs.map(galleryItem));
  $("gallery-empty").hidden = outputs.length > 0;
}

async function start() {
  const [status, schedulers] = await Promise.all([getJSON("/api/status"), getJSON("/api/schedulers")]);
  $("model").textContent = `model: ${status.model}`;
  $("server").textContent = `on ${status.device}`;
  for (const name of schedulers.schedulers) $("scheduler").append(new Option(name, name));
  setBounds(status.limits, status.defaults);
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", stop);
  await loadGallery();
  await resume();
}

async function resume() {
  const jobId = sessionStorage.getItem("job");
  if (!jobId) return;
  const response = await fetch(`/api/jobs/${jobId}`);
  const job = response.ok ? await response.json() : null;
  if (!job || ["done", "stopped", "error"].includes(job.state)) {
    sessionStorage.removeItem("job");
    return;
  }
  fillForm(job.settings);
  running(true);
  follow(jobId);  // the stream replays the job's events from the start
}

start().catch((error) => showMessage(`Could not reach the server: ${error.message}`));
