// emolens dashboard: a chat whose replies stream token by token, coloured by an emotion's
// live reading, with a trajectory plot, steering sliders, a guard editor and the bank's map.
// Plain JavaScript and SVG; everything is served by emolens (no external requests).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#7b4fd0", "#1f9fb0", "#d08a1f", "#2e9e5b", "#c2417a", "#5a6b8c"];
const state = {
  info: null, history: [], steers: [], chosen: [], trail: [], busy: false, reply: null,
};

function key() { return localStorage.getItem("emolens-key") || ""; }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (key()) h.Authorization = "Bearer " + key();
  return h;
}
function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(v) { return (v >= 0 ? "+" : "") + v.toFixed(2); }
function options(select, names, selected) {
  select.replaceChildren(...names.map((n) => el("option", { value: n }, String(n))));
  if (selected !== undefined) select.value = selected;
}
function colour(v) {
  const c = Math.max(-1, Math.min(1, v || 0));
  const rgb = c >= 0 ? "var(--warm)" : "var(--cool)";
  return `rgba(${rgb}, ${(Math.abs(c) * 0.62).toFixed(3)})`;
}

// --- start-up ----------------------------------------------------------------------------

async function start() {
  const health = await (await fetch("/health")).json();
  if (health.auth) {
    $("key-box").classList.remove("hidden");
    $("api-key").value = key();
    $("api-key").addEventListener("change", () => {
      localStorage.setItem("emolens-key", $("api-key").value.trim());
      loadBank();
    });
  }
  await loadBank();
}

async function loadBank() {
  const response = await fetch("/emolens/bank", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = (await errorText(response)) + " (enter the API key above)";
    return;
  }
  const info = await response.json();
  state.info = info;
  $("model").textContent = `${info.model} · read at layer ${info.layer} · ${info.emotions.length} emotions`;
  $("map-layer").textContent = info.layer;
  const names = [...info.emotions].sort();
  const first = ["calm", "desperate", "happy", "afraid"].filter((e) => info.emotions.includes(e));
  const preferred = first.length ? first : (info.showcase.length ? info.showcase : info.emotions).slice(0, 3);
  options($("colour-by"), names, preferred[0]);
  state.chosen = preferred.slice(0, 3);
  options($("steer-layer"), info.layers, info.layer);
  options($("positions"), info.positions, info.defaults.positions);
  options($("g-when"), names, info.emotions.includes("desperate") ? "desperate" : preferred[0]);
  options($("g-steer-emotion"), names, info.emotions.includes("calm") ? "calm" : preferred[0]);
  $("max-tokens").max = info.limits.max_tokens;
  $("temperature").value = info.defaults.temperature;
  drawChips();
  drawMap();
  drawTrajectory();
  showGuard();
  if (!state.steers.length) addSteer(undefined, 0);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// --- steering and guard ------------------------------------------------------------------

function addSteer(emotion, strength = 0) {
  const info = state.info;
  const item = { emotion: emotion || (info.emotions.includes("calm") ? "calm" : info.emotions[0]), strength };
  state.steers.push(item);
  const row = el("div", { class: "steer" });
  const select = el("select", { "aria-label": "steered emotion" });
  options(select, [...info.emotions].sort(), item.emotion);
  const max = info.max_strength || 2;
  const slider = el("input", { type: "range", min: -max / 2, max: max / 2, step: 0.01, value: strength,
                               "aria-label": "steering strength", class: "strength" });
  const out = el("output", {}, fmt(strength));
  const remove = el("button", { type: "button", class: "x", title: "remove" }, "×");
  select.addEventListener("change", () => { item.emotion = select.value; });
  slider.addEventListener("input", () => { item.strength = Number(slider.value); out.textContent = fmt(item.strength); });
  remove.addEventListener("click", () => { state.steers.splice(state.steers.indexOf(item), 1); row.remove(); });
  row.append(select, slider, out, remove);
  $("steers").append(row);
}

function steering() {
  const strengths = {};
  for (const s of state.steers) if (s.strength !== 0) strengths[s.emotion] = (strengths[s.emotion] || 0) + s.strength;
  return strengths;
}

function guardRule() {
  if (!$("guard-on").checked) return null;
  const rule = { when: $("g-when").value };
  rule[$("g-direction").value] = Number($("g-threshold").value);
  rule.window = Number($("g-window").value);
  if ($("g-then").value === "steer") {
    rule.then = { steer: { [$("g-steer-emotion").value]: Number($("g-steer-strength").value) } };
    if ($("g-or").checked) rule.or = "stop";
  } else {
    rule.then = "stop";
  }
  return rule;
}

function showGuard() {
  const steer = $("g-then").value === "steer";
  $("g-steer-box").classList.toggle("hidden", !steer);
  $("g-or-box").classList.toggle("hidden", !steer);
  $("guard-form").classList.toggle("off", !$("guard-on").checked);
  const rule = guardRule();
  $("guard-json").textContent = rule ? JSON.stringify(rule) : "off";
}

// --- chat --------------------------------------------------------------------------------

function bubble(role, text) {
  const node = el("div", { class: `msg ${role}` });
  if (text !== undefined) node.textContent = text;
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function send(text) {
  if (state.busy || !state.info) return;
  state.busy = true;
  $("send").disabled = true;
  bubble("user", text);
  const messages = [...state.history, { role: "user", content: text }];
  const node = bubble("assistant");
  const body = el("div", { class: "body" });
  const meta = el("div", { class: "meta" }, "…");
  node.append(body, meta);
  const colourBy = $("colour-by").value;
  const read = [...new Set([colourBy, ...state.chosen])];
  const strengths = steering();
  const rule = guardRule();
  const extension = { read: [...read, "top:5"], positions: $("positions").value, layers: [Number($("steer-layer").value)] };
  if (Object.keys(strengths).length) extension.steer = strengths;
  if (rule) extension.guard = rule;
  const reply = { node, body, meta, tokens: [], fired: [], read, strengths, text: "" };
  state.reply = reply;
  drawTrajectory();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({
        model: state.info.model, messages, stream: true, emolens: extension,
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, reply);
    state.history = [...messages, { role: "assistant", content: reply.text }];
  } catch (error) {
    meta.replaceChildren(el("span", { class: "badge error" }, String(error.message || error)));
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function readStream(response, reply) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(chunk, reply);
    }
  }
}

function onChunk(chunk, reply) {
  const choice = chunk.choices && chunk.choices[0];
  const extra = chunk.emolens || {};
  if (choice && choice.finish_reason) return finish(choice.finish_reason, extra, reply);
  if (!choice) return;
  const token = { index: extra.index, text: choice.delta.content || "", scaled: extra.scaled || {}, top: extra.top || [] };
  reply.tokens.push(token);
  reply.text += token.text;
  const span = el("span", { class: "tok", "data-index": String(token.index) }, token.text);
  span.style.background = colour(valueOf(token, $("colour-by").value));
  span.addEventListener("mouseenter", (e) => showTip(e, token));
  span.addEventListener("mouseleave", () => $("tooltip").classList.add("hidden"));
  span.tokenData = token;
  reply.body.append(span);
  if (extra.guard) onGuard(extra.guard, reply, span);
  reply.meta.textContent = `${reply.tokens.length} tokens…`;
  reply.node.scrollIntoView({ block: "end" });
  scheduleTrajectory();
}

function valueOf(token, emotion) {
  if (emotion in token.scaled) return token.scaled[emotion];
  const hit = token.top.find((t) => t[0] === emotion);
  return hit ? hit[2] : 0;
}

function onGuard(fired, reply, span) {
  reply.fired.push(fired);
  span.classList.add("fired");
  const what = fired.action === "stop" ? "stopped the reply"
    : "steering " + Object.entries(fired.rule.then.steer).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
  reply.node.append(el("span", { class: "badge guard" },
    `guard fired at token ${fired.index}: ${fired.rule.when} ${fmt(fired.reading)} → ${what}`));
}

function finish(reason, summary, reply) {
  const parts = [];
  const means = Object.entries(summary.scaled_means || {});
  if (means.length) parts.push("mean " + means.map(([k, v]) => `<b>${k}</b> ${fmt(v)}`).join(", "));
  parts.push(`${reply.tokens.length} tokens`);
  parts.push(reason === "content_filter" ? "stopped by the guard" : `finished: ${reason}`);
  const steer = Object.entries(reply.strengths);
  if (steer.length) parts.push("steered " + steer.map(([k, v]) => `${k} ${fmt(v)}`).join(", "));
  reply.meta.innerHTML = parts.join(" · ");
  reply.summary = summary;
  if (summary.map) {
    state.trail.push({ point: summary.map, top: summary.top || [] });
    drawMap();
  }
  drawTrajectory();
}

function showTip(event, token) {
  const tip = $("tooltip");
  const rows = token.top.map((t) => `<tr><td>${t[0]}</td><td class="v">${t[1].toFixed(2)}</td><td class="v">${fmt(t[2])}</td></tr>`).join("");
  const label = JSON.stringify(token.text);
  tip.innerHTML = `<div class="t">token ${token.index}: ${label.replace(/</g, "&lt;")}</div>` +
    `<table><tr class="h"><td>top 5</td><td class="v">score</td><td class="v">scaled</td></tr>${rows}</table>`;
  tip.classList.remove("hidden");
  const box = event.target.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left, window.innerWidth - 190)}px`;
  tip.style.top = `${box.bottom + 6}px`;
}

function recolour() {
  const emotion = $("colour-by").value;
  for (const span of document.querySelectorAll(".tok")) {
    const token = span.tokenData;
    if (token) span.style.background = colour(valueOf(token, emotion));
  }
}

// --- trajectory --------------------------------------------------------------------------

function drawChips() {
  const box = $("chips");
  box.replaceChildren();
  const candidates = [...new Set([...state.chosen, ...state.info.showcase])].slice(0, 12);
  candidates.forEach((name) => {
    const on = state.chosen.includes(name);
    const chip = el("span", { class: "chip" + (on ? " on" : "") }, name);
    if (on) chip.style.background = PALETTE[state.chosen.indexOf(name) % PALETTE.length];
    chip.addEventListener("click", () => {
      if (on) state.chosen = state.chosen.filter((n) => n !== name);
      else if (state.chosen.length < PALETTE.length) state.chosen.push(name);
      drawChips();
      drawTrajectory();
    });
    box.append(chip);
  });
}

let pending = false;
function scheduleTrajectory() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; drawTrajectory(); });
}

function drawTrajectory() {
  const svg = $("trajectory");
  const W = 360, H = 150, L = 28, R = 8, T = 8, B = 20;
  svg.replaceChildren();
  const y = (v) => T + (1 - (Math.max(-1, Math.min(1, v)) + 1) / 2) * (H - T - B);
  for (const v of [-1, -0.5, 0, 0.5, 1]) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: v === 0 ? "#c8ccd4" : "#eef0f3" }));
    svg.append(svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, v.toFixed(1)));
  }
  const reply = state.reply;
  const tokens = reply ? reply.tokens : [];
  const n = Math.max(tokens.length, 16);
  const x = (i) => L + (i / Math.max(n - 1, 1)) * (W - L - R);
  svg.append(svgEl("text", { x: L, y: H - 5 }, "token 0"));
  svg.append(svgEl("text", { x: W - R, y: H - 5, "text-anchor": "end" }, `token ${Math.max(n - 1, 0)}`));
  if (!reply) {
    svg.append(svgEl("text", { x: (W + L) / 2, y: H / 2, "text-anchor": "middle" }, "send a message to see its readout"));
    return;
  }
  for (const fired of reply.fired) {
    svg.append(svgEl("line", { x1: x(fired.index), x2: x(fired.index), y1: T, y2: H - B, stroke: "#e0a100", "stroke-dasharray": "3 2" }));
    svg.append(svgEl("text", { x: x(fired.index) + 3, y: T + 8, style: "fill: #a07000" }, "guard"));
  }
  state.chosen.forEach((name, k) => {
    if (!reply.read.includes(name)) return;
    const points = tokens.map((t, i) => `${x(i).toFixed(1)},${y(valueOf(t, name)).toFixed(1)}`).join(" ");
    const colourK = PALETTE[k % PALETTE.length];
    svg.append(svgEl("polyline", { points, fill: "none", stroke: colourK, "stroke-width": 1.6, "stroke-linejoin": "round" }));
  });
}

// --- map ---------------------------------------------------------------------------------

function drawMap() {
  const svg = $("map");
  const W = 360, H = 230, P = 18;
  svg.replaceChildren();
  const info = state.info;
  const x = (v) => P + ((v + 1) / 2) * (W - 2 * P);
  const y = (v) => H - P - ((v + 1) / 2) * (H - 2 * P);
  svg.append(svgEl("line", { x1: P, x2: W - P, y1: y(0), y2: y(0), stroke: "#eceef2" }));
  svg.append(svgEl("line", { x1: x(0), x2: x(0), y1: P, y2: H - P, stroke: "#eceef2" }));
  svg.append(svgEl("text", { x: W - P, y: H - 4, "text-anchor": "end" }, "PC1 →"));
  svg.append(svgEl("text", { x: x(0) + 4, y: P - 6 }, "PC2 ↑"));
  const last = state.trail[state.trail.length - 1];
  const current = last ? last.top.map((t) => t[0]) : [];
  const named = new Set([...current, ...info.showcase]);
  const labels = [];
  for (const [name, [px, py]] of Object.entries(info.map)) {
    const dot = svgEl("circle", { cx: x(px), cy: y(py), r: named.has(name) ? 2.8 : 1.6 });
    const alpha = named.has(name) ? 0.85 : 0.2 + 0.35 * Math.abs(px);
    dot.style.fill = `rgba(${px >= 0 ? "var(--warm)" : "var(--cool)"}, ${alpha.toFixed(2)})`;
    dot.append(svgEl("title", {}, name));
    svg.append(dot);
  }
  // labels: the current reply's strongest emotions first, then the showcase; none overlaps
  const placed = [];
  for (const name of named) {
    if (!(name in info.map)) continue;
    const [px, py] = info.map[name];
    const right = x(px) > W - 70;
    const width = 4.9 * name.length;
    const left = right ? x(px) - 4 - width : x(px) + 4;
    const box = [left, y(py) - 6, left + width, y(py) + 4];
    if (placed.some((b) => box[0] < b[2] && b[0] < box[2] && box[1] < b[3] && b[1] < box[3])) continue;
    placed.push(box);
    const strong = current.includes(name);
    labels.push(svgEl("text", { x: right ? x(px) - 4 : x(px) + 4, y: y(py) + 3, "text-anchor": right ? "end" : "start",
                                 style: strong ? "fill: #1d2430; font-weight: 600" : "" }, name));
  }
  svg.append(...labels);
  state.trail.forEach((item, i) => {
    const current = i === state.trail.length - 1;
    const [px, py] = item.point;
    if (i > 0) {
      const [qx, qy] = state.trail[i - 1].point;
      svg.append(svgEl("line", { x1: x(qx), y1: y(qy), x2: x(px), y2: y(py), stroke: "#9aa7d8", "stroke-dasharray": "2 2" }));
    }
    svg.append(svgEl("circle", { cx: x(px), cy: y(py), r: current ? 6 : 3.5, fill: current ? "#3c5bd6" : "#9aa7d8",
                                  stroke: "#fff", "stroke-width": 1.5, class: current ? "reply-point" : "" }));
    if (current) svg.append(svgEl("text", { x: x(px) + 8, y: y(py) - 6, style: "fill: #3c5bd6; font-weight: 600" }, `reply ${i + 1}`));
  });
}

// --- wiring ------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("reset").addEventListener("click", () => {
  state.history = []; state.reply = null; state.trail = [];
  $("messages").replaceChildren(); drawTrajectory(); drawMap();
});
$("add-steer").addEventListener("click", () => addSteer());
$("colour-by").addEventListener("change", recolour);
for (const id of ["guard-on", "g-when", "g-direction", "g-threshold", "g-window", "g-then", "g-steer-emotion", "g-steer-strength", "g-or"]) {
  $(id).addEventListener("input", showGuard);
  $(id).addEventListener("change", showGuard);
}
start();
