// clipfuse review app: labeling forms, the keyboard queue and retrain progress. No framework, no CDN.
"use strict";

async function post(url, body) {
  const response = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
  let data = {};
  try { data = await response.json(); } catch (e) { data = {error: response.statusText}; }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function classMatch(text, classes) {
  // The class a typed text means: an exact (case-insensitive) name, else the one class it starts.
  const t = text.trim().toLowerCase();
  if (!t) return null;
  const exact = classes.find(c => c.toLowerCase() === t);
  if (exact) return exact;
  const starts = classes.filter(c => c.toLowerCase().startsWith(t));
  return starts.length === 1 ? starts[0] : null;
}

function classesOf(datalist) {
  return datalist ? Array.from(datalist.options).map(o => o.value) : [];
}

function describe(result) {
  if (result.state === "queued") return "queued (a retrain is running): it is written when the retrain ends";
  return "saved";
}

// ---- retrain --------------------------------------------------------------------------------------
function watchRetrain() {
  const box = document.getElementById("retrain");
  if (!box) return;
  const button = document.getElementById("retrain-button");
  const status = document.getElementById("retrain-status");
  const pending = document.getElementById("pending");
  let wasBusy = ["queued", "running"].includes(box.dataset.state);
  async function poll() {
    let s;
    try { s = await (await fetch("/api/retrain", {credentials: "same-origin"})).json(); } catch (e) { return; }
    const busy = ["queued", "running"].includes(s.state);
    box.dataset.state = s.state;
    button.disabled = busy;
    pending.textContent = s.pending_labels ? `${s.pending_labels} label change(s) queued` : "";
    if (busy) {
      const part = s.total ? ` ${s.done}/${s.total}` : "";
      status.textContent = `${s.state}: ${s.stage}${part}`;
      setTimeout(poll, 700);
    } else if (s.state === "failed") {
      status.textContent = `retrain failed: ${s.error}`;
    } else if (s.state === "done" && wasBusy) {
      status.textContent = s.result.fused_accuracy === null ? `retrained on ${s.result.n_train} labels (one per class: none held out)` : `retrained: fused ${(100 * s.result.fused_accuracy).toFixed(1)}% on ${s.result.n_val} held-out labels`;
      document.body.dataset.retrainState = "done";
      if (!document.getElementById("queue")) location.reload();  // new predictions on the page
    }
    wasBusy = busy;
  }
  button.addEventListener("click", async () => {
    button.disabled = true;
    try { await post("/api/retrain"); wasBusy = true; } catch (e) { status.textContent = e.message; }
    poll();
  });
  if (wasBusy) poll();
}

// ---- the image page's label form -------------------------------------------------------------------
function labelForm() {
  const form = document.getElementById("label-form");
  if (!form) return;
  const input = form.querySelector("input[name=label]");
  const result = document.getElementById("label-result");
  const current = document.getElementById("current-label");
  const classes = classesOf(document.getElementById("classes"));
  async function send(body) {
    result.classList.remove("bad");
    try {
      const r = await post(body.undo ? "/api/undo" : "/api/label", body.undo ? {} : body);
      current.textContent = r.label || "none";
      result.textContent = body.undo ? `undone (${describe(r)})` : describe(r);
      input.value = "";
    } catch (e) { result.textContent = e.message; result.classList.add("bad"); }
  }
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const name = classMatch(input.value, classes) || input.value.trim();
    if (name) send({id: form.dataset.id, label: name});
  });
  form.querySelector("[data-remove]").addEventListener("click", () => send({id: form.dataset.id, remove: true}));
  form.querySelector("[data-undo]").addEventListener("click", () => send({undo: true}));
}

// ---- the keyboard queue (Label next, Suspects) -----------------------------------------------------
function labelQueue() {
  const root = document.getElementById("queue");
  if (!root) return;
  const items = JSON.parse(document.getElementById("queue-items").textContent);
  const classes = classesOf(document.getElementById("queue-classes"));
  const input = document.getElementById("queue-input");
  const img = root.querySelector("#queue-image img");
  const caption = root.querySelector("#queue-image figcaption");
  const log = document.getElementById("queue-log");
  const progress = document.getElementById("queue-progress");
  let at = 0, newClass = null, busy = false;  // busy: a label request is on its way; keys wait for it
  const done = [];  // positions labeled, for undo
  const datalist = document.getElementById("queue-classes");

  function show() {
    if (at >= items.length) {
      img.removeAttribute("src");
      caption.textContent = "";
      document.getElementById("proposed").textContent = "—";
      progress.textContent = `done: ${done.length} labeled, ${items.length - done.length} skipped`;
      root.dataset.finished = "1";
      return;
    }
    const it = items[at];
    img.src = `/thumb/${encodeURIComponent(it.id)}?size=512`;
    img.dataset.id = it.id;
    caption.textContent = it.path;
    document.getElementById("proposed").textContent = it.proposed;
    const given = document.getElementById("given");
    if (given) given.textContent = it.now;
    document.getElementById("why").textContent = it.why;
    progress.textContent = `${at + 1} of ${items.length}`;
    root.dataset.current = it.id;
    input.value = "";
    newClass = null;  // a "new class?" question belongs to the image it was asked on
    input.focus();
  }
  function note(text, bad) {
    const li = document.createElement("li");
    li.textContent = text;
    if (bad) li.className = "error";
    log.prepend(li);
  }
  async function label(name) {
    if (busy || at >= items.length) return;
    const it = items[at];
    busy = true;
    try {
      const r = await post("/api/label", {id: it.id, label: name});
      note(`${it.path}: ${name} (${describe(r)})`);
      if (!classes.includes(name)) {  // a class made here: known from now on
        classes.push(name);
        const option = document.createElement("option");
        option.value = name;
        datalist.appendChild(option);
      }
      done.push(at);
      at += 1;
      show();
    } catch (e) { note(`${it.path}: ${e.message}`, true); }
    finally { busy = false; }
  }
  async function undo() {
    if (busy) return;
    busy = true;
    try {
      const r = await post("/api/undo");
      note(`undone: ${r.undone} → ${r.label || "no label"}`);
      if (done.length) { at = done.pop(); show(); }
    } catch (e) { note(e.message, true); }
    finally { busy = false; }
  }
  input.addEventListener("keydown", ev => {
    if (busy && ["Enter", "Escape"].includes(ev.key)) { ev.preventDefault(); return; }
    if (ev.key === "Enter") {
      ev.preventDefault();
      if (at >= items.length) return;
      const text = input.value.trim();
      if (!text) { label(items[at].proposed); return; }
      const name = classMatch(text, classes);
      if (name) { label(name); return; }
      if (newClass === text) { newClass = null; label(text); return; }
      newClass = text;
      note(`"${text}" is a new class: press Enter again to create it`);
    } else if (ev.key === "Tab") {
      const t = input.value.trim().toLowerCase();
      const hit = t && classes.find(c => c.toLowerCase().startsWith(t));
      if (hit) { ev.preventDefault(); input.value = hit; }
    } else if (ev.key === "Escape") {
      ev.preventDefault();
      if (at < items.length) { note(`${items[at].path}: skipped`); at += 1; show(); }
    } else if (ev.key.toLowerCase() === "z" && (ev.ctrlKey || ev.metaKey) && !ev.shiftKey) {
      ev.preventDefault();
      undo();
    }
  });
  root.querySelector("[data-accept]").addEventListener("click", () => at < items.length && label(items[at].proposed));
  root.querySelector("[data-skip]").addEventListener("click", () => { if (!busy && at < items.length) { at += 1; show(); } });
  root.querySelector("[data-undo]").addEventListener("click", undo);
  show();
}

function bars() {
  document.querySelectorAll(".probs .bar span[data-p]").forEach(s => { s.style.width = `${100 * parseFloat(s.dataset.p)}%`; });
}

function backLinks() {
  document.querySelectorAll("a[data-back]").forEach(a => a.addEventListener("click", ev => {
    if (history.length > 1) { ev.preventDefault(); history.back(); }
  }));
}

function uploads() {
  document.querySelectorAll("input[data-autosubmit]").forEach(i => i.addEventListener("change", () => i.form.submit()));
}

document.addEventListener("DOMContentLoaded", () => { watchRetrain(); labelForm(); labelQueue(); bars(); uploads(); backLinks(); });
