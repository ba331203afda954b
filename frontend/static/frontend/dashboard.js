// The dashboard's small JS layer (no library): local times, one websocket per page with
// reconnect and catch-up, live regions re-rendered by the server, the backend editor.
(function () {
  "use strict";
  const body = document.body;
  const page = body.dataset.livePage;
  let cursor = Number(body.dataset.eventCursor || 0);

  function localiseTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.textContent = when.toLocaleString(undefined, {
          year: "numeric", month: "2-digit", day: "2-digit",
          hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
        });
      }
    });
  }
  localiseTimes(document);

  const state = { ws: null, paused: false, attempt: 0, refreshTimer: null, inflight: 0, refreshes: 0, events: 0 };
  const liveStatus = document.getElementById("live-status");
  function setStatus(text) { if (liveStatus) liveStatus.textContent = text; }

  // Re-render the page's live regions ([data-live] with an id) from the server's own template.
  async function refresh() {
    state.refreshTimer = null;
    lastRefresh = Date.now();
    state.inflight += 1;
    try {
      await swapLiveRegions();
    } finally {
      state.inflight -= 1;
    }
  }
  async function swapLiveRegions() {
    let response;
    try {
      response = await fetch(location.href, { headers: { "X-Dashboard-Live": "1" }, credentials: "same-origin" });
    } catch (err) { return; }
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    document.querySelectorAll("[data-live][id]").forEach((el) => {
      const next = fresh.getElementById(el.id);
      if (next) { el.replaceWith(next); localiseTimes(next); }
    });
    state.refreshes += 1;
    body.dataset.refreshes = String(state.refreshes);
  }
  // Coalesce bursts (one change can bring several status events): at most one re-render per
  // REFRESH_GAP_MS, the first 50 ms after the news.
  const REFRESH_GAP_MS = 250;
  let lastRefresh = 0;
  function scheduleRefresh() {
    if (state.refreshTimer) return;
    const wait = Math.max(50, lastRefresh + REFRESH_GAP_MS - Date.now());
    state.refreshTimer = setTimeout(refresh, wait);
  }

  function appendLog(line) {
    const log = document.getElementById("job-log");
    if (!log || log.querySelector(`[data-log-id="${line.id}"]`)) return;
    const empty = log.querySelector(".empty");
    if (empty) empty.remove();
    const li = document.createElement("li");
    li.dataset.logId = line.id;
    li.className = line.level;
    const time = document.createElement("time");
    time.setAttribute("datetime", line.at);
    time.title = line.at;
    li.append(time, ` [${line.stage}] ${line.message}`);
    log.append(li);
    localiseTimes(li);
  }

  function handle(message) {
    if (message.type === "event") {
      if (message.id <= cursor) return;
      cursor = message.id;
      state.events += 1;
      scheduleRefresh();
    } else if (message.type === "synced") {
      cursor = Math.max(cursor, message.cursor);
      setStatus("live");
      body.dataset.live = "connected";
      if (state.connects > 1 || message.replayed > 0) scheduleRefresh(); // catch up after a gap
    } else if (message.type === "job.log") {
      appendLog(message.data);
    } else {
      scheduleRefresh(); // lb.event status changes, job progress
    }
  }

  function connect() {
    if (!page || state.paused) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/dashboard/?page=${encodeURIComponent(page)}&since=${cursor}`);
    state.ws = ws;
    state.connects = (state.connects || 0) + 1;
    ws.onopen = () => { state.attempt = 0; };
    ws.onmessage = (e) => handle(JSON.parse(e.data));
    ws.onclose = () => {
      if (state.ws === ws) state.ws = null;
      body.dataset.live = "disconnected";
      setStatus(state.paused ? "paused" : "reconnecting…");
      if (!state.paused) {
        const delay = Math.min(5000, 250 * 2 ** state.attempt++) * (0.5 + Math.random() / 2);
        setTimeout(connect, delay);
      }
    };
  }
  connect();

  // Counters arrive with the agents' periodic reports, not as events: pages that show them
  // re-render their live regions every few seconds while the socket is up.
  const every = Number(body.dataset.refreshS || 0);
  if (every > 0) setInterval(() => { if (state.ws && state.ws.readyState === 1) scheduleRefresh(); }, every * 1000);

  window.dashboard = {
    pause() { state.paused = true; if (state.ws) state.ws.close(); },
    resume() { state.paused = false; connect(); },
    get connected() { return !!state.ws && state.ws.readyState === 1 && body.dataset.live === "connected"; },
    get cursor() { return cursor; },
    get refreshes() { return state.refreshes; },
    get idle() { return !state.refreshTimer && state.inflight === 0; },
  };

  // --- backend editor -----------------------------------------------------------------------
  document.querySelectorAll("form.backend-editor").forEach((form) => {
    const result = form.querySelector(".editor-result");
    form.querySelector(".add-row").addEventListener("click", () => {
      const rows = form.querySelectorAll("tr.editor-row");
      const last = rows[rows.length - 1];
      const copy = last.cloneNode(true);
      const n = rows.length + 1;
      copy.querySelectorAll("input, select").forEach((field) => {
        const label = copy.querySelector(`label[for="${field.id}"]`);
        const id = field.id.replace(/-\d+-/, `-${n}-`);
        field.id = id;
        if (label) { label.htmlFor = id; label.textContent = label.textContent.replace(/\d+$/, String(n)); }
        if (field.tagName === "INPUT") field.value = ""; else field.selectedIndex = 0;
      });
      last.after(copy);
      copy.querySelector("input").focus();
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      if (event.submitter && event.submitter.name) data.set(event.submitter.name, event.submitter.value);
      result.textContent = "Working…";
      // getAttribute: the submit buttons are named "action", which shadows form.action
      const response = await fetch(form.getAttribute("action"), {
        method: "POST", body: data, credentials: "same-origin", headers: { "X-Dashboard-Fetch": "1" },
      });
      result.innerHTML = await response.text();
      const outcome = result.querySelector("[data-generation]");
      if (outcome && outcome.dataset.action === "apply") {
        // Applied: the next edit starts from the generation just written.
        form.querySelector("[name=expected_generation]").value = outcome.dataset.generation;
        form.querySelector(".editor-base").textContent = outcome.dataset.generation;
        scheduleRefresh();
      }
    });
  });
})();
