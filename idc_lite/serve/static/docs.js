// The API's routes, read from /openapi.json: a reader for the description, with nothing from a CDN.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  document.getElementById("about").textContent = `${spec.info.title} ${spec.info.version}: ${spec.info.description || ""}`;
  const routes = document.getElementById("routes");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const section = el("section");
      section.append(el("h2", `${method.toUpperCase()} ${path}`));
      if (op.summary) section.append(el("p", op.summary));
      const body = op.requestBody && op.requestBody.content;
      if (body) section.append(el("p", "body: " + Object.keys(body).join(" or "), "muted"));
      const statuses = Object.entries(op.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`);
      const list = el("ul");
      for (const s of statuses) list.append(el("li", s));
      section.append(list);
      routes.append(section);
    }
  }
}).catch((err) => { document.getElementById("about").textContent = "cannot read /openapi.json: " + err.message; });
