// Renders the OpenAPI document of this server as a readable reference (no CDN, no build).

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Inline text with `code` spans (descriptions use backticks).
function prose(text) {
  return (text || "").split(/(`[^`]+`)/).map((part) => (part.startsWith("`") ? h("code", { text: part.slice(1, -1) }) : part));
}

function resolve(doc, schema, depth = 0) {
  if (!schema || depth > 6) return schema;
  if (schema.$ref) return resolve(doc, doc.components.schemas[schema.$ref.split("/").pop()], depth + 1);
  return schema;
}

// A compact, TypeScript-like sketch of a schema.
function sketch(doc, schema, indent = "", depth = 0) {
  if (!schema) return "any";
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    if (depth > 1) return name;
    return sketch(doc, doc.components.schemas[name], indent, depth + 1);
  }
  if (schema.anyOf) return schema.anyOf.map((s) => sketch(doc, s, indent, depth)).join(" | ");
  const types = [].concat(schema.type || "any");
  const base = types.filter((t) => t !== "null");
  const nullable = types.includes("null") ? " | null" : "";
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ") + nullable;
  if (base[0] === "array") return `${sketch(doc, schema.items, indent, depth)}[]${nullable}`;
  if (base[0] === "object" && schema.properties) {
    const required = new Set(schema.required || []);
    const lines = Object.entries(schema.properties).map(([k, v]) => `${indent}  ${k}${required.has(k) ? "" : "?"}: ${sketch(doc, v, indent + "  ", depth)}`);
    return `{\n${lines.join(",\n")}\n${indent}}${nullable}`;
  }
  if (base[0] === "object" && schema.additionalProperties) return `{ [key: string]: ${sketch(doc, schema.additionalProperties, indent, depth)} }${nullable}`;
  return (schema.format ? `${base[0]} (${schema.format})` : base.join(" | ") || "any") + nullable;
}

function operation(doc, path, method, op) {
  const role = op.security && op.security.length === 0 ? "public" : op["x-role"] || "viewer";
  const body = h("div", { class: "body" });
  if (op.description) body.append(h("p", {}, prose(op.description)));
  if (op.parameters && op.parameters.length) {
    body.append(h("h4", { text: "Parameters" }), h("div", { class: "table-wrap" }, h("table", {},
      h("tbody", {}, op.parameters.map((p) => h("tr", {},
        h("td", {}, h("code", { text: p.name }), p.required ? " *" : ""),
        h("td", { class: "muted", text: p.in }),
        h("td", {}, h("code", { text: sketch(doc, p.schema) })),
        h("td", {}, prose(p.description))))))));
  }
  if (op.requestBody) {
    for (const [media, content] of Object.entries(op.requestBody.content)) {
      body.append(h("h4", { text: `Body (${media})` }), h("pre", { class: "schema", text: sketch(doc, content.schema) }));
    }
  }
  body.append(h("h4", { text: "Responses" }));
  for (const [status, response] of Object.entries(op.responses)) {
    const contents = Object.entries(response.content || {});
    body.append(h("div", {},
      h("p", {}, h("span", { class: `status s${status[0]}`, text: status }), " ", prose(response.description), contents.length ? h("span", { class: "muted", text: ` — ${contents.map(([m]) => m).join(", ")}` }) : null),
      status.startsWith("2") && contents.length && contents[0][0] === "application/json" ? h("pre", { class: "schema", text: sketch(doc, contents[0][1].schema) }) : null));
  }
  return h("details", { class: "op", id: op.operationId },
    h("summary", {}, h("span", { class: `method ${method}`, text: method }), h("span", { class: "path", text: path }),
      h("span", { class: "summary", text: op.summary }),
      h("span", { class: `badge role ${role === "admin" ? "warn" : role === "public" ? "" : "queued"}`, text: role })),
    body);
}

async function main() {
  const root = document.getElementById("docs");
  const doc = await (await fetch("/api/v1/openapi.json")).json();
  const byTag = new Map(doc.tags.map((t) => [t.name, []]));
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) byTag.get(op.tags[0]).push(operation(doc, path, method, op));
  }
  root.replaceChildren(
    h("div", { class: "intro" },
      h("h1", { text: `${doc.info.title} ${doc.info.version}` }),
      h("p", {}, prose(doc.info.description)),
      h("p", {}, "Example: ", h("code", { text: 'curl -H "Authorization: Bearer $TOKEN" -F file=@urls.csv -F batch_name="My batch" ' + location.origin + "/api/v1/batches" })),
      h("div", { class: "toc" }, doc.tags.map((t) => h("a", { class: "button", href: `#tag-${t.name}`, text: t.name })))),
    ...doc.tags.flatMap((t) => [h("h2", { class: "tag-title", id: `tag-${t.name}`, text: t.name }), h("p", { class: "muted", text: t.description }), ...byTag.get(t.name)]));
  if (location.hash) document.getElementById(location.hash.slice(1))?.setAttribute("open", "");
}
main();
