// Offline API reference: renders /openapi.json (FastAPI's schema) as plain HTML.
// Why not Swagger UI: FastAPI's default /docs loads Swagger UI from a CDN, which an
// inspection station without internet cannot reach. The schema itself is always at /openapi.json.
"use strict";

(function () {
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };

  function resolve(spec, schema) {
    let s = schema || {};
    for (let i = 0; i < 10 && s.$ref; i++) {
      s = s.$ref.replace(/^#\//, "").split("/").reduce((o, k) => (o ? o[k] : undefined), spec) || {};
    }
    return s;
  }

  function typeOf(spec, schema) {
    const s = resolve(spec, schema);
    if (s.anyOf) return s.anyOf.map((x) => typeOf(spec, x)).join(" | ");
    if (s.type === "array") return "array of " + typeOf(spec, s.items);
    if (s.format === "binary") return "file";
    return s.type || s.title || "object";
  }

  function table(rows, head) {
    const t = el("table");
    const tr = el("tr");
    head.forEach((h) => tr.appendChild(el("th", h)));
    t.appendChild(tr);
    rows.forEach((r) => {
      const row = el("tr");
      r.forEach((c) => row.appendChild(el("td", c)));
      t.appendChild(row);
    });
    return t;
  }

  function properties(spec, schema) {
    const s = resolve(spec, schema);
    const req = new Set(s.required || []);
    return Object.entries(s.properties || {}).map(([name, p]) => [
      name + (req.has(name) ? " *" : ""), typeOf(spec, p), resolve(spec, p).description || p.description || "",
    ]);
  }

  function render(spec) {
    document.title = spec.info.title + ": API";
    document.getElementById("title").textContent = spec.info.title;
    document.getElementById("version").textContent = "version " + spec.info.version;
    document.getElementById("description").textContent = spec.info.description || "";
    const root = document.getElementById("operations");
    root.textContent = "";
    for (const [path, ops] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const box = el("section", null, "op");
        const h = el("h2");
        h.append(el("span", method.toUpperCase(), "method " + method), path);
        box.appendChild(h);
        if (op.summary) box.appendChild(el("p", op.summary));
        if (op.description) box.appendChild(el("p", op.description));
        const params = (op.parameters || []).map((p) => [
          p.name + (p.required ? " *" : ""), p.in, typeOf(spec, p.schema), p.description || "",
        ]);
        if (params.length) {
          box.appendChild(el("h3", "Parameters"));
          box.appendChild(table(params, ["name", "in", "type", "description"]));
        }
        const body = op.requestBody && op.requestBody.content;
        if (body) {
          for (const [ctype, media] of Object.entries(body)) {
            box.appendChild(el("h3", "Body (" + ctype + ")"));
            box.appendChild(table(properties(spec, media.schema), ["field", "type", "description"]));
          }
        }
        box.appendChild(el("h3", "Responses"));
        const rows = Object.entries(op.responses || {}).map(([code, r]) => {
          const media = r.content && r.content["application/json"];
          const fields = media ? properties(spec, media.schema).map((f) => f[0] + ": " + f[1]).join(", ") : "";
          return [code, r.description || "", fields];
        });
        box.appendChild(table(rows, ["status", "meaning", "JSON fields"]));
        if (method === "post" && path === "/predict") {
          box.appendChild(el("h3", "Example"));
          box.appendChild(el("pre", "curl -F files=@img.png '" + location.origin + "/predict?heatmap=false'"));
          const result = spec.components && spec.components.schemas && spec.components.schemas.ImageResult;
          if (result) {
            box.appendChild(el("h3", "Each entry of results"));
            box.appendChild(table(properties(spec, result), ["field", "type", "description"]));
          }
        }
        root.appendChild(box);
      }
    }
  }

  fetch("openapi.json")
    .then((r) => r.json())
    .then(render)
    .catch((err) => { document.getElementById("operations").textContent = "cannot load /openapi.json: " + err; });
})();
