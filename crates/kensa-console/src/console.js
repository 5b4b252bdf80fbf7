// Kensa console: live tiles from the server's event stream, local times, and the answer
// buttons. No libraries.
"use strict";

function localTimes(root) {
  root.querySelectorAll("time.ts[data-ms]").forEach((t) => {
    const ms = Number(t.dataset.ms);
    if (ms > 0) t.textContent = new Date(ms).toLocaleString();
  });
}

function tileFor(camera) {
  for (const t of document.querySelectorAll("article.tile")) {
    if (t.dataset.camera === camera) return t;
  }
  const t = document.createElement("article");
  t.className = "tile none";
  t.dataset.camera = camera;
  t.innerHTML = '<h2></h2><div class="frame empty">no frame yet</div><p class="answer"></p>' +
    '<p class="meta"><span class="conf"></span> · <span class="fps"></span> fps · <span class="frames"></span> frames</p>';
  t.querySelector("h2").textContent = camera + " ";
  const s = document.createElement("span");
  t.querySelector("h2").appendChild(s);
  s.className = "state";
  document.getElementById("tiles").appendChild(t);
  return t;
}

function showTile(tile) {
  const t = tileFor(tile.camera);
  const h2 = t.querySelector("h2");
  let state = h2.querySelector(".state");
  if (!state) { state = document.createElement("span"); h2.appendChild(state); }
  state.className = "state s-" + tile.state;
  state.textContent = tile.state;
  state.title = tile.detail || "";
  t.querySelector(".fps").textContent = tile.fps.toFixed(1);
  t.querySelector(".frames").textContent = tile.frames;
  const l = tile.latest;
  if (!l) return;
  t.className = "tile " + (l.decided.anomalous ? "bad" : "good");
  t.querySelector(".answer").textContent = l.decided.answer;
  t.querySelector(".conf").textContent = Math.round(l.decided.confidence * 100) + " %";
  if (t.dataset.event !== l.event_id) {
    t.dataset.event = l.event_id;
    let img = t.querySelector("img.frame");
    if (!img) {
      const a = document.createElement("a");
      img = document.createElement("img");
      img.className = "frame";
      img.alt = "latest frame of " + tile.camera;
      a.appendChild(img);
      t.querySelector(".frame").replaceWith(a);
    }
    img.src = "/console/picture?kind=tile&id=" + encodeURIComponent(l.event_id);
    img.parentElement.href = "/console/defect?id=" + encodeURIComponent(l.event_id);
  }
}

function followLive() {
  const es = new EventSource("/console/live");
  es.addEventListener("tiles", (e) => {
    JSON.parse(e.data).forEach(showTile);
    document.body.dataset.live = "1";
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
  es.onerror = () => { document.body.dataset.live = "0"; };
}

// Headers of an action: JSON, and the token when the page asks for one (kept for the tab).
function jsonHeaders() {
  const token = document.getElementById("token");
  const headers = { "Content-Type": "application/json" };
  if (token && token.value) {
    sessionStorage.setItem("kensa.token", token.value);
    headers.Authorization = "Bearer " + token.value;
  }
  return headers;
}

// Shows why an action did not go through: the listener's refusal, or no connection.
function refused(el, r, j) {
  el.className = "err";
  el.textContent = r ? "Refused (" + r.status + "): " + (j.error || j.result || r.statusText) : "Cannot reach Kensa: " + j;
}

function answering() {
  const box = document.getElementById("feedback");
  if (!box) return;
  const who = document.getElementById("who");
  const out = document.getElementById("feedback-result");
  who.value = localStorage.getItem("kensa.who") || "";
  box.querySelectorAll("button[data-label]").forEach((b) => b.addEventListener("click", async () => {
    localStorage.setItem("kensa.who", who.value);
    const headers = jsonHeaders();
    const body = JSON.stringify({ event_id: box.dataset.event, label: b.dataset.label, who: who.value || "console" });
    out.className = "";
    out.textContent = "sending…";
    try {
      const r = await fetch("/v1/feedback", { method: "POST", headers, body });
      const j = await r.json().catch(() => ({}));
      out.dataset.status = String(r.status);
      out.dataset.result = j.result || "";
      if (r.ok) {
        out.className = "ok";
        out.textContent = j.result === "changed"
          ? "Thank you: learned as " + b.dataset.label + " (bank " + (j.bank_version || "") + ")."
          : "Already answered (" + j.result + ").";
      } else {
        refused(out, r, j);
      }
    } catch (e) {
      refused(out, null, e);
    }
  }));
}

function asking() {
  const box = document.getElementById("ask");
  if (!box) return;
  const form = document.getElementById("ask-form");
  const input = document.getElementById("question");
  const status = document.getElementById("ask-status");
  const list = document.getElementById("dialogue");
  const history = [];
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const question = input.value.trim();
    if (!question) return;
    const headers = jsonHeaders();
    status.className = "";
    status.textContent = "thinking…";
    delete status.dataset.status;
    try {
      const r = await fetch("/v1/frames/" + encodeURIComponent(box.dataset.event) + "/ask",
        { method: "POST", headers, body: JSON.stringify({ question, history }) });
      const j = await r.json().catch(() => ({}));
      status.dataset.status = String(r.status);
      if (r.ok) {
        history.push({ question, answer: j.answer });
        const li = document.createElement("li");
        li.className = "turn";
        li.dataset.source = j.source;
        const q = document.createElement("p"); q.className = "q"; q.textContent = question;
        const a = document.createElement("p"); a.className = "a"; a.textContent = j.answer;
        li.append(q, a);
        list.appendChild(li);
        status.textContent = j.tokens + " tokens in " + j.seconds.toFixed(1) + " s" + (j.source === "facts" ? " (from the facts)" : "");
        input.value = "";
      } else {
        refused(status, r, j);
      }
    } catch (e) {
      refused(status, null, e);
    }
  });
}

// Pictures the console was too busy to draw (503) are asked for again, a few times.
function retryPictures() {
  document.querySelectorAll("img").forEach((img) => {
    img.addEventListener("error", () => {
      const tries = Number(img.dataset.tries || 0);
      if (tries < 5 && img.src.includes("/console/picture")) {
        img.dataset.tries = String(tries + 1);
        setTimeout(() => { img.src = img.src.split("&retry=")[0] + "&retry=" + (tries + 1); }, 1000 * (tries + 1));
      }
    });
  });
}

// The token, once given in this tab, fills the page's token field.
const tokenField = document.getElementById("token");
if (tokenField) tokenField.value = sessionStorage.getItem("kensa.token") || "";
// The gallery's filters apply as soon as one is chosen.
document.querySelectorAll("form.filter select").forEach((sel) => sel.addEventListener("change", () => sel.form.submit()));
localTimes(document);
retryPictures();
if (document.body.dataset.view === "Live") followLive();
answering();
asking();
