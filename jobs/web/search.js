// The search page of `imgindex serve`: upload or drop an image -> POST /search -> grid of the nearest images;
// click a result to search from it (GET /search?path=); browse clusters (GET /clusters, /clusters/{c}).
"use strict";

const $ = (id) => document.getElementById(id);

// Image ids are 63-bit integers, beyond what a JavaScript number holds exactly: read them as strings.
const parseExactIds = (text) => JSON.parse(text.replace(/"id":\s*(\d+)/g, '"id":"$1"'));

async function api(url, options) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body;
  try {
    body = parseExactIds(text);
  } catch {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function card(item, caption, lazy = false) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.id = item.id;
  figure.dataset.path = item.path;
  const img = document.createElement("img");
  img.src = `/thumb/${item.id}`;
  img.alt = item.path;
  img.loading = lazy ? "lazy" : "eager";
  img.title = "search from this image";
  // A busy service answers 503 rather than queueing without limit: try a thumbnail again a little later.
  let tries = 0;
  img.addEventListener("error", () => {
    if (++tries <= 3) setTimeout(() => { img.src = `/thumb/${item.id}?try=${tries}`; }, 500 * tries);
  });
  img.addEventListener("click", () => searchPath(item.path));
  const text = document.createElement("figcaption");
  text.textContent = caption;
  const path = document.createElement("span");
  path.className = "path";
  path.title = item.path;
  path.textContent = item.path.split("/").pop();
  text.appendChild(path);
  figure.append(img, text);
  return figure;
}

function showResults(answer) {
  const [{ query, results }] = answer;
  $("query").textContent = `nearest to ${query}`;
  $("results").replaceChildren(...results.map((hit) =>
    card(hit, `#${hit.rank} · distance ${hit.distance.toFixed(4)}${hit.cluster === null ? "" : ` · cluster ${hit.cluster}`}`)));
  $("results").dataset.state = "done";
}

async function run(request) {
  $("error").textContent = "";
  $("results").dataset.state = "busy";
  try {
    showResults(await request());
  } catch (error) {
    $("error").textContent = error.message;
    $("results").dataset.state = "error";
  }
}

function searchFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  run(() => api(`/search?k=${$("k").value}`, { method: "POST", body: form }));
}

function searchPath(path) {
  run(() => api(`/search?path=${encodeURIComponent(path)}&k=${$("k").value}`));
}

async function showCluster(c) {
  const answer = await api(`/clusters/${c}?limit=60`);
  $("cluster-title").textContent = `cluster ${c}: ${answer.size} images, nearest the centroid first`;
  $("cluster").replaceChildren(...answer.members.map((m) => card(m, `distance ${m.distance.toFixed(4)}`, true)));
}

async function loadClusters() {
  try {
    const clusters = await api("/clusters?examples=0");
    $("clusters").replaceChildren(...clusters.map(({ cluster, size }) => {
      const button = document.createElement("button");
      button.className = "link";
      button.textContent = `cluster ${cluster}: ${size}`;
      button.addEventListener("click", () => showCluster(cluster));
      return button;
    }));
  } catch (error) {
    $("clusters").textContent = error.message;
  }
}

async function start() {
  const health = await api("/healthz");
  $("status").textContent = `${health.images} images · ${health.model} · ${health.metric} · ${health.clusters} clusters · ${health.device}`;
  $("k").max = Math.min(1000, health.images);
  $("k").value = Math.min(Number($("k").value), health.images);
  $("auth").hidden = !health.auth;
  loadClusters();
}

$("file").addEventListener("change", (event) => event.target.files.length && searchFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  document.cookie = `imgindex_token=${encodeURIComponent($("token").value)}; path=/; SameSite=Strict`;
  loadClusters();
});
start().catch((error) => { $("status").textContent = error.message; });
