// The idc-lite page: two images in, the caption and the time taken out. No build step, no CDN.
"use strict";

const files = { before: null, after: null };
const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("idc-lite-token") || "";
}

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

function showError(message) {
  $("error").textContent = message;
}

async function loadInfo() {
  try {
    const response = await fetch("/v1/info", { headers: headers() });
    const body = await response.json();
    if (response.status === 401) {
      $("token-box").hidden = false;
      $("model").textContent = "this server needs its token";
      return;
    }
    if (response.status === 503) {
      $("model").textContent = "the model is loading…";
      setTimeout(loadInfo, 1000);
      return;
    }
    if (!response.ok) throw new Error(body.error || response.statusText);
    $("model").textContent = `model ${body.model} · ${body.backend}${body.decoder ? " " + body.decoder : ""} · ${body.device} · idc-lite ${body.version}`;
  } catch (err) {
    $("model").textContent = "cannot reach the server: " + err.message;
  }
}

function setFile(side, file) {
  if (!file) return;
  files[side] = file;
  const img = $("preview-" + side);
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("drop-" + side).classList.add("filled");
  $("drop-" + side).querySelector(".hint").textContent = file.name;
  $("describe").disabled = !(files.before && files.after);
  $("caption").textContent = "";
  $("timing").textContent = "";
  showError("");
}

async function describe() {
  const form = new FormData();
  form.append("before", files.before, files.before.name);
  form.append("after", files.after, files.after.name);
  $("describe").disabled = true;
  $("caption").textContent = "…";
  $("timing").textContent = "";
  showError("");
  const started = performance.now();
  try {
    const response = await fetch("/v1/describe", { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    const elapsed = (performance.now() - started) / 1000;
    if (!response.ok) {
      if (response.status === 401) $("token-box").hidden = false;
      throw new Error(body.error || response.statusText);
    }
    $("caption").textContent = body.caption;
    $("timing").textContent = `${elapsed.toFixed(2)} s in all · model ${body.timings.total_s.toFixed(3)} s (batch of ${body.timings.batch_size})`;
    $("output").dataset.done = "1";
  } catch (err) {
    $("caption").textContent = "";
    showError(err.message);
  } finally {
    $("describe").disabled = !(files.before && files.after);
  }
}

for (const side of ["before", "after"]) {
  $(side).addEventListener("change", (event) => setFile(side, event.target.files[0]));
  const zone = $("drop-" + side);
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    setFile(side, event.dataTransfer.files[0]);
  });
}
$("describe").addEventListener("click", describe);
$("token").addEventListener("change", (event) => {
  sessionStorage.setItem("idc-lite-token", event.target.value.trim());
  loadInfo();
});
loadInfo();
