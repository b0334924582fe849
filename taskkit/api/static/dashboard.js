// taskkit dashboard: the token field, buttons that POST to the API, the New run form, live runs
// (Server-Sent Events and a refresh of the page's [data-refresh] parts) and the metric curves.
// The token lives in this tab's sessionStorage only: never in a URL, a cookie or the page.
"use strict";
(() => {
  const root = document.body.dataset.root || "";
  const tokenField = document.getElementById("token");
  const notice = document.getElementById("notice");
  const TOKEN = "taskkit.token";
  tokenField.value = sessionStorage.getItem(TOKEN) || "";
  tokenField.addEventListener("input", () => sessionStorage.setItem(TOKEN, tokenField.value.trim()));

  function say(text, bad) {
    notice.textContent = text;
    notice.className = bad ? "notice bad" : "notice good";
    notice.hidden = false;
  }

  function detail(data) {
    const d = data && data.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".") || "body"}: ${e.msg}`).join("; ");
    return "refused";
  }

  async function post(path, body, headers) {
    const token = tokenField.value.trim();
    if (!token) {
      tokenField.focus();
      say("✗ Type the API token (TASKKIT_API_TOKEN) first.", true);
      return null;
    }
    let answer;
    try {
      answer = await fetch(root + path, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json", ...headers },
        body: JSON.stringify(body || {}),
      });
    } catch (error) {
      say(`✗ The service did not answer: ${error.message}`, true);
      return null;
    }
    const data = await answer.json().catch(() => ({}));
    if (!answer.ok) {
      say(`✗ ${answer.status}: ${detail(data)}`, true);
      return null;
    }
    return data;
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-post]");
    if (!button || (button.dataset.confirm && !window.confirm(button.dataset.confirm))) return;
    button.disabled = true;
    const data = await post(button.dataset.post, button.dataset.body ? JSON.parse(button.dataset.body) : {});
    button.disabled = false;
    if (data) {
      say(`✓ ${button.dataset.done || "done"}${data.detail ? `: ${data.detail}` : ""}`);
      refresh();
    }
  });

  // One Idempotency-Key per submission: a retried click after a lost answer gives the same run.
  const newKey = () => (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);
  let runKey = newKey();
  const form = document.getElementById("new-run");
  if (form) form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = new FormData(form);
    let config;
    try {
      config = JSON.parse(fields.get("config").trim() || "{}");
    } catch (error) {
      return say(`✗ More config is not JSON: ${error.message}`, true);
    }
    if (config === null || typeof config !== "object" || Array.isArray(config)) {
      return say("✗ More config must be a JSON object", true);
    }
    const body = { ...config, name: fields.get("name"), model_type: fields.get("model_type"), epochs: Number(fields.get("epochs")) };
    const data = await post(form.dataset.post, body, { "Idempotency-Key": runKey });
    if (data) {
      runKey = newKey();
      say(`✓ Run ${data.model_run_id} ${data.status}`);
      refresh();
    }
  });

  // -- live runs ---------------------------------------------------------------------------------
  const streams = new Map();
  // Per run, after a stream error: no new stream before `at`; the wait doubles from 1 s to 30 s
  // and an event received resets it (a service that is down is not asked again and again).
  const retries = new Map();
  function stream() {
    for (const [id, source] of streams) {
      if (!document.querySelector(`[data-stream][data-run="${id}"]`)) {
        source.close(); // finished or stale: the refresh shows it from here
        streams.delete(id);
      }
    }
    for (const row of document.querySelectorAll("[data-stream]")) {
      const id = row.dataset.run;
      if (streams.has(id) || streams.size >= 4) continue; // a browser opens 6 connections per host
      if (retries.has(id) && Date.now() < retries.get(id).at) continue;
      const source = new EventSource(`${root}/runs/${id}/events`);
      streams.set(id, source);
      const stop = () => {
        source.close();
        streams.delete(id);
        refresh();
      };
      source.addEventListener("progress", (event) => {
        retries.delete(id);
        show(id, JSON.parse(event.data));
      });
      // Every epoch of the run's history, in order, however fast they end: the whole curve.
      source.addEventListener("epoch", (event) => {
        retries.delete(id);
        const data = JSON.parse(event.data);
        if (curve) curve.add(data.epoch, data.metrics || {});
      });
      // "end" comes with the run's end; after an error EventSource would reconnect on its own:
      // the next refresh decides instead whether the run still needs a stream.
      source.addEventListener("end", stop);
      source.onerror = () => {
        const delay = Math.min(2 * (retries.has(id) ? retries.get(id).delay : 500), 30000);
        retries.set(id, { delay, at: Date.now() + delay });
        setTimeout(stream, delay);
        stop();
      };
    }
  }

  function show(id, event) {
    const percent = event.percent;
    const epoch = event.epoch;
    const total = event.total_epochs;
    for (const row of document.querySelectorAll(`[data-run="${id}"]`)) {
      const bar = row.querySelector('[data-field="bar"]');
      if (bar && percent != null) {
        bar.setAttribute("aria-valuenow", percent);
        bar.firstElementChild.style.width = `${percent}%`;
        row.querySelector('[data-field="percent"]').textContent = `${Math.round(percent)}%`;
      }
      const cell = row.querySelector('[data-field="epoch"]');
      if (cell && epoch != null) cell.textContent = total ? `${epoch}/${total}` : `${epoch}`;
    }
    if (epoch && event.metrics && curve) curve.add(epoch, event.metrics);
    const shown = document.querySelector(`[data-run="${id}"]`);
    if (shown && (event.status !== shown.dataset.status || event.stale !== !!shown.dataset.stale)) refresh();
  }

  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const page = new DOMParser().parseFromString(await (await fetch(location.href)).text(), "text/html");
      for (const part of document.querySelectorAll("[data-refresh][id]")) {
        const fresh = page.getElementById(part.id);
        if (fresh) part.innerHTML = fresh.innerHTML;
      }
      document.body.dataset.live = page.body.dataset.live || "";
      stream();
    } catch (error) {
      // The next refresh tries again; the page keeps what it showed.
    } finally {
      refreshing = false;
    }
  }
  setInterval(() => document.body.dataset.live && !document.hidden && refresh(), 3000);

  // -- curves: one small chart per metric, drawn from the page's points and live epochs ---------
  const curveBox = document.getElementById("curve");
  const curve = curveBox && {
    byEpoch: new Map(JSON.parse(document.getElementById("curve-data").textContent).map((p) => [p.epoch, p])),
    pending: false,
    add(epoch, metrics) {
      const numbers = Object.fromEntries(Object.entries(metrics).filter(([k, v]) => k !== "best_score" && k !== "epoch" && Number.isFinite(v)));
      if (!Object.keys(numbers).length) return;
      this.byEpoch.set(epoch, { epoch, ...numbers });
      // A stream replays the whole history at once: draw once per frame, not once per epoch.
      if (!this.pending) {
        this.pending = true;
        requestAnimationFrame(() => { this.pending = false; this.draw(); });
      }
    },
    draw() {
      this.points = [...this.byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
      const names = [...new Set(this.points.flatMap((p) => Object.keys(p).filter((k) => k !== "epoch")))].sort();
      if (!names.length) return;
      curveBox.replaceChildren(...names.map((name) => chart(name, this.points.filter((p) => name in p))));
    },
  };
  if (curve) curve.draw();
  stream();

  function chart(name, points) {
    const W = 320, H = 170, L = 48, B = 24, T = 26, ns = "http://www.w3.org/2000/svg";
    const el = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text != null) node.textContent = text;
      return node;
    };
    const xs = points.map((p) => p.epoch), ys = points.map((p) => p[name]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const x = (v) => L + ((v - x0) / (x1 - x0 || 1)) * (W - L - 8);
    const y = (v) => T + (1 - (v - y0) / (y1 - y0 || 1)) * (H - B - T);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart", "aria-label": `${name} by epoch, epochs ${x0} to ${x1}, from ${ys[0].toPrecision(4)} to ${ys.at(-1).toPrecision(4)}` });
    svg.append(
      el("title", {}, `${name} by epoch`),
      el("line", { x1: L, y1: H - B, x2: W - 8, y2: H - B, class: "axis" }),
      el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      el("text", { x: L - 4, y: T + 4, "text-anchor": "end" }, y1.toPrecision(3)),
      el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, y0.toPrecision(3)),
      el("text", { x: L, y: H - 6 }, `epoch ${x0}`),
      el("text", { x: W - 8, y: H - 6, "text-anchor": "end" }, `${x1}`),
      el("text", { x: (L + W) / 2, y: 16, "text-anchor": "middle", class: "label" }, name),
      el("polyline", { points: points.map((p) => `${x(p.epoch)},${y(p[name])}`).join(" "), class: "line" }),
      ...points.map((p) => el("circle", { cx: x(p.epoch), cy: y(p[name]), r: 2.5, class: "dot" })),
    );
    return svg;
  }
})();
