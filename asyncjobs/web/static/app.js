// asyncjobs browser views: the job page (live through Server-Sent Events) and the dashboard
// (live through the WebSocket). Plain JavaScript, no build step, no third-party code.
// With auth on, the sign-in session's cookie authenticates every request (same origin: fetch, XHR,
// EventSource and WebSocket all carry it); what changes something also carries the page's CSRF token.
"use strict";

(function () {
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const JSON_HEADERS = { Accept: "application/json" };

  // -- helpers ----------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function formatTime(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString();
  }

  function formatSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 10) return s.toFixed(2) + " s";
    if (s < 120) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    return m + " min " + Math.round(s - m * 60) + " s";
  }

  function secondsBetween(a, b) {
    if (!a || !b) return null;
    return (new Date(b) - new Date(a)) / 1000;
  }

  // Binary units, one decimal: "999 bytes", "12.3 MiB".
  function formatBytes(n) {
    if (typeof n !== "number" || !isFinite(n) || n < 0) return "–";
    if (n === 1) return "1 byte";
    if (n < 1024) return n + " bytes";
    const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = n / 1024;
    let unit = 0;
    while (value >= 1023.95 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return value.toFixed(1) + " " + units[unit];
  }

  // The exact count, grouped: "5,000 bytes".
  function exactBytes(n) {
    return n.toLocaleString("en-US") + (n === 1 ? " byte" : " bytes");
  }

  function parseJson(text) {
    try { return JSON.parse(text); } catch (err) { return null; }
  }

  // A problem+json answer (RFC 9457) as one line: its detail, then the field errors.
  function problemMessage(status, statusText, body) {
    if (!body || typeof body !== "object") return "HTTP " + status + (statusText ? " " + statusText : "");
    let text = body.detail || body.title || ("HTTP " + status);
    if (Array.isArray(body.errors) && body.errors.length) {
      text += ": " + body.errors.map((e) => (e.field ? e.field + " " : "") + e.message).join("; ");
    }
    return text;
  }

  async function problemText(response) {
    let body = null;
    try { body = parseJson(await response.text()); } catch (err) { /* the body was cut off */ }
    return problemMessage(response.status, response.statusText, body);
  }

  function setBadge(node, status) {
    node.textContent = status;
    node.dataset.status = status;
  }

  // The sign-in session's CSRF token from <meta name="csrf-token"> (empty with auth off).
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  // Headers for a request that changes something: JSON, and the CSRF token the server asks of the cookie.
  function writeHeaders(extra) {
    const headers = { ...JSON_HEADERS, ...(extra || {}) };
    const token = csrfToken();
    if (token) headers["X-CSRF-Token"] = token;
    return headers;
  }

  // A 401 while signed in means the session ended (expired, signed out elsewhere, token revoked).
  function sessionEnded(status) {
    if (status !== 401 || !csrfToken()) return false;
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
    return true;
  }

  // -- the job page ---------------------------------------------------------------

  function jobPage() {
    const jobId = document.body.dataset.jobId;
    const base = "/jobs/" + encodeURIComponent(jobId);
    const initial = JSON.parse($("initial-job").textContent);
    const rerun = initial.rerun || null; // the page's own member: what "Run again" submits
    delete initial.rerun;
    let job = null;
    let source = null;
    let ticker = null;
    let polling = false;

    function isBlob(value) {
      return value && typeof value === "object" && !Array.isArray(value) &&
        Object.keys(value).length === 3 && typeof value.content_type === "string" &&
        typeof value.size === "number" && value.href === base + "/result";
    }

    function renderProgress() {
      const bar = $("progress");
      const text = $("progress-text");
      const progress = job.progress || {};
      const fraction = typeof progress.fraction === "number" ? Math.max(0, Math.min(1, progress.fraction)) : null;
      const parts = [];
      if (job.status === "succeeded") {
        bar.value = 100;
        parts.push("Done");
      } else if (fraction !== null) {
        bar.value = Math.round(fraction * 1000) / 10;
        parts.push(Math.round(fraction * 100) + "%");
      } else if (job.status === "queued" || job.status === "running") {
        bar.removeAttribute("value"); // indeterminate
      } else {
        bar.value = 0; // stopped before its first report
      }
      if (progress.message) parts.push(progress.message);
      if (job.status === "queued") {
        parts.push(job.queue_position ? "position " + job.queue_position + " in the queue" : "queued");
      }
      if ((job.status === "queued" || job.status === "running") && job.eta) {
        const left = (new Date(job.eta) - Date.now()) / 1000;
        parts.push(left > 1 ? "about " + (left < 60 ? Math.ceil(left) + " s" : formatSeconds(left)) + " left" : "finishing");
      }
      if (TERMINAL.has(job.status) && job.status !== "succeeded") parts.push("Stopped: " + job.status);
      text.textContent = parts.join(" · ") || "Starting…";
    }

    function resultUrl() {
      return (job.links && typeof job.links.result === "string") ? job.links.result : base + "/result";
    }

    // One file's facts. Names come from clients: always text, never markup.
    function fileFacts(file, ids) {
      const size = el("dd", { id: ids && ids.size, text: formatBytes(file.size) });
      if (file.size >= 1024) size.append(" (" + exactBytes(file.size) + ")");
      return el("dl", { class: "facts file-facts" }, [
        el("div", {}, [el("dt", { text: "Name" }), el("dd", { id: ids && ids.name, class: "file-name", text: file.name })]),
        el("div", {}, [el("dt", { text: "Size" }), size]),
        el("div", {}, [el("dt", { text: "Type" }), el("dd", { id: ids && ids.type, text: file.content_type })]),
        el("div", { class: "wide" }, [el("dt", { text: "SHA-256" }),
          el("dd", {}, [el("code", { id: ids && ids.sha256, class: "digest", text: file.sha256 })])]),
      ]);
    }

    function renderFiles() {
      const inputs = (job.files && job.files.inputs) || {};
      const list = $("input-files");
      list.replaceChildren();
      for (const [param, file] of Object.entries(inputs)) {
        if (!file || typeof file !== "object") continue;
        list.append(el("li", { dataset: { param: param } }, [
          el("h3", { class: "file-param", text: param }),
          fileFacts(file),
        ]));
      }
      $("files-section").hidden = list.children.length === 0;
    }

    function renderResult() {
      const box = $("result");
      box.replaceChildren();
      const file = job.files && job.files.result;
      $("result-link-line").hidden = Boolean(file);
      if (file) {
        box.append(
          fileFacts(file, { name: "result-file-name", size: "result-file-size", type: "result-file-type",
            sha256: "result-file-sha256" }),
          el("p", {}, [el("a", { id: "result-download", class: "button download", href: resultUrl(),
            download: file.name || "", type: file.content_type, text: "Download " + file.name })]));
      } else if (isBlob(job.result)) {
        const r = job.result;
        box.append(el("p", {}, [
          el("a", { href: r.href, download: "", class: "button", text: "Download the result" }),
          " (" + r.content_type + ", " + formatBytes(r.size) + ")",
        ]));
      } else {
        box.append(el("pre", { class: "json", tabindex: "0", "aria-label": "Result as JSON",
          text: JSON.stringify(job.result, null, 2) }));
      }
    }

    function render(next) {
      if (job && next.version < job.version) return; // an older event, arrived late
      job = next;
      $("task").textContent = job.task;
      setBadge($("status"), job.status);
      document.title = job.task + " job: " + job.status + " · asyncjobs";
      $("created").textContent = formatTime(job.created_at);
      $("started").textContent = formatTime(job.started_at);
      let finished = formatTime(job.finished_at);
      const took = secondsBetween(job.started_at, job.finished_at);
      if (took !== null) finished += " (took " + formatSeconds(took) + ")";
      $("finished").textContent = finished;
      $("attempts").textContent = String(job.attempts);
      renderProgress();
      renderFiles();
      $("result-section").hidden = job.status !== "succeeded";
      if (job.status === "succeeded") renderResult();
      const failed = (job.status === "failed" || job.status === "canceled") && job.error;
      $("error-section").hidden = !failed;
      if (failed) {
        $("error-type").textContent = job.error.type + ":";
        $("error-message").textContent = job.error.message;
      }
      const cancel = $("cancel");
      cancel.disabled = TERMINAL.has(job.status);
      cancel.hidden = TERMINAL.has(job.status);
      $("rerun").hidden = !(rerun && TERMINAL.has(job.status));
      if (TERMINAL.has(job.status)) stop();
    }

    function stop() {
      if (source) { source.close(); source = null; }
      if (ticker) { clearInterval(ticker); ticker = null; }
    }

    function gone(status) {
      stop();
      $("notice").textContent = status === 410 ? "This job has expired." : "This job no longer exists.";
      $("cancel").hidden = true;
    }

    // Long polls, for a browser without EventSource or when the event stream fails.
    async function poll() {
      if (polling) return;
      polling = true;
      let delay = 0;
      while (job && !TERMINAL.has(job.status)) {
        if (delay) await new Promise((resolve) => setTimeout(resolve, delay));
        try {
          const response = await fetch(base + "?redirect=false&wait=30", {
            headers: { ...JSON_HEADERS, "If-None-Match": 'W/"' + job.version + '"' }, cache: "no-store" });
          if (response.status === 404 || response.status === 410) { gone(response.status); break; }
          if (sessionEnded(response.status)) break;
          if (response.ok) render(await response.json());
          delay = response.ok || response.status === 304 ? 0 : 2000;
        } catch (err) {
          delay = 2000;
        }
      }
      polling = false;
    }

    function subscribe() {
      if (!("EventSource" in window)) { poll(); return; }
      source = new EventSource(base + "/events");
      const onEvent = (event) => render(JSON.parse(event.data));
      source.addEventListener("status", onEvent);
      source.addEventListener("progress", onEvent);
      source.addEventListener("error", () => {
        // EventSource reconnects by itself (with Last-Event-ID) unless the server refused it.
        if (source && source.readyState === EventSource.CLOSED) {
          source = null;
          fetch(base + "?redirect=false", { headers: JSON_HEADERS, cache: "no-store" }).then((response) => {
            if (response.status === 404 || response.status === 410) gone(response.status);
            else if (!sessionEnded(response.status)) poll();
          }, () => poll());
        }
      });
    }

    $("cancel").addEventListener("click", async () => {
      const button = $("cancel");
      button.disabled = true;
      $("notice").textContent = "Canceling…";
      try {
        const response = await fetch(base + "/cancel", { method: "POST", headers: writeHeaders() });
        if (sessionEnded(response.status)) return;
        if (response.ok) {
          const body = await response.json();
          render(body);
          $("notice").textContent = response.status === 202
            ? "Cancel requested; the handler is still stopping." : "The job is canceled.";
        } else {
          $("notice").textContent = "Could not cancel: " + await problemText(response);
          button.disabled = TERMINAL.has(job.status);
        }
      } catch (err) {
        $("notice").textContent = "Could not cancel: the server did not answer.";
        button.disabled = false;
      }
    });

    // "Run again": a new job with the same task, params and priority. Cache-Control: no-cache, so
    // that a task which reuses equal jobs makes a new one rather than answering with this one.
    $("rerun").addEventListener("click", async () => {
      const button = $("rerun");
      button.disabled = true;
      $("notice").textContent = "Submitting again…";
      const body = { task: rerun.task, params: rerun.params };
      if (rerun.priority) body.priority = rerun.priority;
      try {
        const response = await fetch("/jobs", { method: "POST", body: JSON.stringify(body),
          headers: writeHeaders({ "Content-Type": "application/json", "Cache-Control": "no-cache" }) });
        if (sessionEnded(response.status)) return;
        if (!response.ok) {
          $("notice").textContent = "Could not run again: " + await problemText(response);
        } else {
          const created = parseJson(await response.text());
          if (created && typeof created.id === "string") {
            $("notice").textContent = "Submitted; opening the new job…";
            location.assign("/jobs/" + encodeURIComponent(created.id));
            return;
          }
          $("notice").textContent = "Could not run again: the answer was not a job.";
        }
      } catch (err) {
        $("notice").textContent = "Could not run again: the server did not answer.";
      }
      button.disabled = false;
    });

    render(initial);
    if (!TERMINAL.has(job.status)) {
      subscribe();
      ticker = setInterval(renderProgress, 1000); // the ETA counts down between events
    }
  }

  // -- the dashboard -----------------------------------------------------------------

  function dashboard() {
    const RECENT = 20; // jobs a page
    const LIVE_MAX = 100; // the live first page grows up to this, then is loaded afresh
    const owners = document.body.dataset.owners === "true"; // an admin with auth on: every owner's jobs
    const service = document.body.dataset.admin === "true"; // may see the service-wide charts
    const rows = new Map(); // job id -> {job, tr}
    let tasks = [];
    let socket = null;
    let retry = 1000;
    let summaryTimer = null;
    let fallbackTimer = null;
    let filters = { status: "", task: "", owner: "" };
    let pages = []; // the URLs of the pages shown so far; the last is the one on screen
    let nextUrl = null; // the server's "next" for the page on screen

    function setLive(text) { $("live").textContent = text; }

    // Counts, run times and (for operators) the last hour's history: GET / as JSON.
    async function loadSummary() {
      summaryTimer = null;
      try {
        const response = await fetch("/", { headers: JSON_HEADERS, cache: "no-store" });
        if (sessionEnded(response.status) || !response.ok) return;
        const summary = await response.json();
        for (const [status, n] of Object.entries(summary.counts || {})) {
          const node = $("count-" + status);
          if (node) node.textContent = String(n);
        }
        const body = $("runtimes").tBodies[0];
        body.replaceChildren();
        for (const [task, f] of Object.entries(summary.run_times || {})) {
          body.append(el("tr", {}, [
            el("th", { scope: "row", text: task }),
            el("td", { class: "num", text: String(f.succeeded) }),
            el("td", { class: "num", text: String(f.failed) }),
            el("td", { class: "num", text: formatSeconds(f.mean_s) }),
            el("td", { class: "num", text: formatSeconds(f.median_s) }),
            el("td", { class: "num", text: formatSeconds(f.max_s) }),
            el("td", { class: "num", text: formatSeconds(f.estimate_s) }),
          ]));
        }
        $("runtimes-note").textContent = body.rows.length
          ? "From the " + summary.run_times_from + " newest jobs; the estimate is the moving average used for ETAs."
          : "No finished jobs yet.";
        if (service && Array.isArray(summary.history)) drawHistory(summary.history);
      } catch (err) { /* the next event or tick tries again */ }
    }

    function summarySoon() {
      if (!summaryTimer) summaryTimer = setTimeout(loadSummary, 400);
    }

    // -- charts: inline SVG drawn here (no library), one bar or point per minute --
    const SVG_NS = "http://www.w3.org/2000/svg";
    const CHART = { width: 600, height: 180, left: 40, right: 8, top: 10, bottom: 24 };

    function svg(tag, attrs, text) {
      const node = document.createElementNS(SVG_NS, tag);
      for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
      if (text !== undefined) node.textContent = text;
      return node;
    }

    function niceMax(n) {
      if (n <= 4) return 4;
      const step = Math.pow(10, Math.floor(Math.log10(n)));
      for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= n) return m * step;
      return 10 * step;
    }

    function minuteLabel(iso) {
      const date = new Date(iso);
      return isNaN(date) ? iso : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }

    // Axes and grid for values up to `top`; returns the x of minute i and the y of a value.
    function chartFrame(node, count, top) {
      const plotW = CHART.width - CHART.left - CHART.right;
      const plotH = CHART.height - CHART.top - CHART.bottom;
      const x = (i) => CHART.left + (i * plotW) / count;
      const y = (v) => CHART.top + plotH - (v / top) * plotH;
      node.replaceChildren();
      for (const v of [0, top / 2, top]) {
        node.append(svg("line", { class: "grid", x1: CHART.left, x2: CHART.width - CHART.right, y1: y(v), y2: y(v) }));
        node.append(svg("text", { class: "axis-label", x: CHART.left - 6, y: y(v) + 4, "text-anchor": "end" },
          String(Math.round(v * 10) / 10)));
      }
      const bottom = CHART.height - 6;
      node.append(svg("text", { class: "axis-label", x: CHART.left, y: bottom }, "60 min ago"));
      node.append(svg("text", { class: "axis-label", x: x(count / 2), y: bottom, "text-anchor": "middle" }, "30 min ago"));
      node.append(svg("text", { class: "axis-label", x: CHART.width - CHART.right, y: bottom, "text-anchor": "end" }, "now"));
      return { x, y, slot: plotW / count };
    }

    function drawHistory(history) {
      $("charts").hidden = false;
      const n = history.length || 1;
      // Throughput: a bar a minute, the failed and canceled part on top in the failure colour.
      const finished = history.map((h) => h.completed || 0);
      const tp = $("throughput-chart");
      const f = chartFrame(tp, n, niceMax(Math.max(0, ...finished)));
      history.forEach((h, i) => {
        if (!h.completed) return;
        const width = Math.max(1, f.slot - 2);
        const ok = h.completed - (h.failed || 0);
        const bar = svg("g", { class: "bar-group" });
        bar.append(svg("title", {}, minuteLabel(h.t) + ": " + h.completed + " finished" +
          (h.failed ? ", " + h.failed + " failed or canceled" : "")));
        if (ok > 0) bar.append(svg("rect", { class: "bar", x: f.x(i) + 1, y: f.y(ok),
          width: width, height: f.y(0) - f.y(ok) }));
        if (h.failed) bar.append(svg("rect", { class: "bar-failed", x: f.x(i) + 1, y: f.y(h.completed),
          width: width, height: f.y(0) - f.y(h.failed) }));
        tp.append(bar);
      });
      const total = finished.reduce((a, b) => a + b, 0);
      const failed = history.reduce((a, h) => a + (h.failed || 0), 0);
      const busiest = Math.max(0, ...finished);
      $("throughput-summary").textContent = total
        ? total + " finished in the last hour" + (failed ? " (" + failed + " failed or canceled)" : "") +
          "; the busiest minute had " + busiest + "."
        : "No job finished in the last hour.";

      // Queue depth: a line through the minutes that were sampled (gaps where the server was not running).
      const depth = history.map((h) => (typeof h.queued === "number" ? h.queued : null));
      const dc = $("depth-chart");
      const known = depth.filter((v) => v !== null);
      const d = chartFrame(dc, n, niceMax(Math.max(0, ...known)));
      let points = [];
      const flush = () => {
        if (points.length === 1) {
          const [px, py] = points[0].split(",");
          dc.append(svg("circle", { class: "dot", cx: px, cy: py, r: 3 }));
        } else if (points.length > 1) {
          dc.append(svg("polyline", { class: "line", points: points.join(" ") }));
        }
        points = [];
      };
      depth.forEach((v, i) => {
        if (v === null) { flush(); return; }
        points.push((d.x(i) + d.slot / 2).toFixed(1) + "," + d.y(v).toFixed(1));
      });
      flush();
      dc.setAttribute("data-points", String(known.length));
      tp.setAttribute("data-total", String(total));
      const now = known.length ? known[known.length - 1] : null;
      $("depth-summary").textContent = known.length
        ? "Highest in the last hour: " + Math.max(...known) + " queued; this minute: " + now + "."
        : "Not sampled yet.";
    }

    // -- the job list: filters, pages, live rows --
    function listUrl() {
      const query = new URLSearchParams();
      if (filters.status) query.set("status", filters.status);
      if (filters.task) query.set("task", filters.task);
      if (owners && filters.owner) query.set("owner", filters.owner);
      query.set("limit", String(RECENT));
      return "/jobs?" + query.toString();
    }

    function onFirstPage() { return pages.length <= 1; }

    function matches(job) {
      return (!filters.status || job.status === filters.status) && (!filters.task || job.task === filters.task) &&
        (!owners || !filters.owner || job.owner === filters.owner);
    }

    function jobCells(job, tr) {
      const link = el("a", { href: "/jobs/" + encodeURIComponent(job.id), text: job.id.slice(0, 10) + "…",
        "aria-label": job.task + " job " + job.id });
      const badge = el("span", { class: "badge", dataset: { status: job.status }, text: job.status });
      const fraction = job.status === "succeeded" ? 1 : job.progress && job.progress.fraction;
      const bar = el("progress", { max: "100", "aria-label": "Progress of job " + job.id.slice(0, 10) });
      if (typeof fraction === "number") bar.value = Math.round(fraction * 100);
      else if (TERMINAL.has(job.status)) bar.value = 0;
      const cells = [
        el("td", { class: "c-job" }, [link]),
        el("td", { class: "c-task", text: job.task }),
      ];
      if (owners) cells.push(el("td", { class: "c-owner", text: job.owner || "–" }));
      cells.push(
        el("td", { class: "c-status" }, [badge]),
        el("td", { class: "c-progress" }, [bar]),
        el("td", { class: "c-created" }, [el("time", { datetime: job.created_at, text: formatTime(job.created_at) })]),
      );
      tr.replaceChildren(...cells);
      tr.dataset.jobId = job.id;
      tr.dataset.status = job.status;
    }

    function showEmpty() {
      const filtered = filters.status || filters.task || filters.owner;
      const empty = $("recent").tBodies[0].rows.length === 0;
      $("recent-empty").hidden = !empty;
      $("recent-empty").textContent = filtered ? "No jobs match these filters." : "No jobs yet: submit one above.";
    }

    // A job from the socket or the form: updated where shown; added on the live first page if it matches.
    function upsert(job) {
      const known = rows.get(job.id);
      if (known) {
        if (job.version < known.job.version) return;
        known.job = job;
        jobCells(job, known.tr);
        return;
      }
      if (!onFirstPage() || !matches(job)) return;
      const body = $("recent").tBodies[0];
      const tr = el("tr");
      jobCells(job, tr);
      rows.set(job.id, { job, tr });
      // Newest first, by creation time.
      const after = [...rows.values()].filter((r) => r.tr.isConnected && r.job.created_at < job.created_at)
        .sort((a, b) => (a.job.created_at < b.job.created_at ? 1 : -1))[0];
      if (after) body.insertBefore(tr, after.tr); else body.append(tr);
      if (body.rows.length > LIVE_MAX) loadRecent();
      showEmpty();
    }

    function renderPager() {
      $("page-newest").disabled = onFirstPage();
      $("page-newer").disabled = onFirstPage();
      $("page-older").disabled = !nextUrl;
      $("page-info").textContent = "Page " + pages.length + (onFirstPage() ? " (live)" : "");
    }

    // The page on screen, afresh (the first page's rows then keep updating from the socket).
    async function loadRecent() {
      if (!pages.length) pages = [listUrl()];
      const url = pages[pages.length - 1];
      try {
        const response = await fetch(url, { headers: JSON_HEADERS, cache: "no-store" });
        if (sessionEnded(response.status)) return;
        if (!response.ok) {
          $("page-info").textContent = "Could not list the jobs: " + await problemText(response);
          return;
        }
        const body = await response.json();
        if (url !== pages[pages.length - 1]) return; // another page was asked for meanwhile
        const tbody = $("recent").tBodies[0];
        rows.clear();
        tbody.replaceChildren(...body.jobs.map((job) => {
          const tr = el("tr");
          jobCells(job, tr);
          rows.set(job.id, { job, tr });
          return tr;
        }));
        nextUrl = body.next || null;
        renderPager();
        showEmpty();
      } catch (err) { /* tried again on the next tick */ }
    }

    function readFilters() {
      filters = { status: $("filter-status").value, task: $("filter-task").value,
        owner: owners ? $("filter-owner").value.trim() : "" };
      pages = [listUrl()];
      nextUrl = null;
      loadRecent();
    }

    $("filters").addEventListener("submit", (event) => { event.preventDefault(); readFilters(); });
    $("filters").addEventListener("reset", (event) => {
      event.preventDefault();
      $("filter-status").value = "";
      $("filter-task").value = "";
      $("filter-owner").value = "";
      readFilters();
    });
    $("filter-status").addEventListener("change", readFilters);
    $("filter-task").addEventListener("change", readFilters);
    $("page-older").addEventListener("click", () => { if (nextUrl) { pages.push(nextUrl); nextUrl = null; loadRecent(); } });
    $("page-newer").addEventListener("click", () => { if (pages.length > 1) { pages.pop(); loadRecent(); } });
    $("page-newest").addEventListener("click", () => { pages = [listUrl()]; loadRecent(); });
    if (owners) {
      $("filter-owner-field").hidden = false;
      for (const th of document.querySelectorAll("#recent th.c-owner")) th.hidden = false;
    }

    function connect() {
      if (!("WebSocket" in window)) { startFallback(); return; }
      // No ?access_token=: the page's origin is the socket's, so the sign-in cookie goes with it.
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
      socket = new WebSocket(url);
      socket.addEventListener("open", () => {
        retry = 1000;
        socket.send(JSON.stringify({ op: "subscribe", jobs: "*", progress: true }));
      });
      socket.addEventListener("message", (event) => {
        let message;
        try { message = JSON.parse(event.data); } catch (err) { return; }
        if (message.type === "subscribed") {
          setLive("Live: jobs update as they change.");
          stopFallback();
          if (onFirstPage()) loadRecent(); // anything that changed before the subscription took effect
          loadSummary();
        } else if (message.type === "job") {
          upsert(message.job);
          summarySoon();
        }
      });
      socket.addEventListener("close", () => {
        socket = null;
        setLive("Reconnecting… (refreshing every few seconds meanwhile)");
        startFallback();
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 15000);
      });
    }

    function startFallback() {
      if (!fallbackTimer) fallbackTimer = setInterval(() => { if (onFirstPage()) loadRecent(); loadSummary(); }, 3000);
    }

    function stopFallback() {
      if (fallbackTimer) { clearInterval(fallbackTimer); fallbackTimer = null; }
    }

    // -- the submit form --
    function example(schema) {
      const props = (schema && schema.properties) || {};
      const required = (schema && schema.required) || [];
      const out = {};
      for (const name of required) {
        const p = props[name] || {};
        if (p.default !== undefined) out[name] = p.default;
        else if (p.type === "number" || p.type === "integer") out[name] = Math.max(p.minimum || 0, 1);
        else if (p.type === "boolean") out[name] = false;
        else if (p.type === "array") out[name] = [];
        else if (p.type === "object") out[name] = {};
        else out[name] = "";
      }
      return out;
    }

    function currentTask() {
      return tasks.find((t) => t.name === $("task-select").value);
    }

    function fileParamsOf(task) {
      const params = task && task.file_params;
      return params && typeof params === "object" ? Object.entries(params) : [];
    }

    // One file input per file param of the task; `accept` from its content types unless it takes any.
    function renderFileFields(task) {
      const box = $("file-inputs");
      box.replaceChildren();
      const params = fileParamsOf(task);
      $("file-fields").hidden = params.length === 0;
      params.forEach(([name, spec], i) => {
        const id = "file-input-" + i;
        const types = ((spec && spec.content_types) || []).filter((t) => t !== "*/*");
        const required = Boolean(spec && spec.required);
        const typesText = types.length ? "Accepted: " + types.join(", ") + "." : "Any type of file.";
        const help = el("p", { id: id + "-help", class: "help", text: typesText });
        const error = el("p", { id: id + "-error", class: "field-error", "aria-live": "polite" });
        const input = el("input", { type: "file", id: id, name: name, dataset: { param: name },
          accept: types.length ? types.join(",") : null, required: required ? "" : null,
          "aria-describedby": help.id + " " + error.id });
        input.addEventListener("change", () => {
          const chosen = input.files && input.files[0];
          help.textContent = typesText + (chosen ? " Chosen: " + formatBytes(chosen.size) + "." : "");
          error.textContent = "";
          input.removeAttribute("aria-invalid");
        });
        box.append(el("div", { class: "field" }, [
          el("label", { for: id }, [el("span", { class: "param-name", text: name }), " ",
            el("span", { class: required ? "required" : "muted", text: required ? "(required)" : "(optional)" })]),
          input, help, error,
        ]));
      });
    }

    function describeTask() {
      const task = currentTask();
      $("task-help").textContent = task ? (task.description || "").replace(/``/g, "") : "";
      if (task) $("params").value = JSON.stringify(example(task.params_schema), null, 2);
      $("params-error").textContent = "";
      renderFileFields(task);
    }

    // The file inputs, after checking that every required one has a file (the form is novalidate).
    function chosenFiles() {
      const inputs = [...$("file-inputs").querySelectorAll("input[type=file]")];
      let missing = null;
      for (const input of inputs) {
        const error = $(input.id + "-error");
        if (input.required && !(input.files && input.files.length)) {
          error.textContent = "Choose a file: the task needs it.";
          input.setAttribute("aria-invalid", "true");
          missing = missing || input;
        } else {
          error.textContent = "";
          input.removeAttribute("aria-invalid");
        }
      }
      if (missing) { missing.focus(); return null; }
      return inputs.filter((input) => input.files && input.files.length)
        .map((input) => [input.dataset.param, input.files[0]]);
    }

    function showUpload(fraction, text) {
      $("upload").hidden = false;
      const bar = $("upload-progress");
      if (fraction === null) bar.removeAttribute("value"); else bar.value = Math.round(fraction * 1000) / 10;
      $("upload-text").textContent = text;
    }

    // multipart/form-data through XMLHttpRequest: fetch cannot report upload progress, XHR can.
    function postWithProgress(url, form, fileBytes) {
      return new Promise((resolve, reject) => {
        const xhr = new XMLHttpRequest();
        const started = Date.now();
        let sent = 0;
        xhr.open("POST", url);
        for (const [name, value] of Object.entries(writeHeaders())) xhr.setRequestHeader(name, value);
        xhr.upload.addEventListener("progress", (event) => {
          if (!event.lengthComputable || !event.total) { showUpload(null, "Uploading…"); return; }
          const fraction = event.loaded / event.total;
          sent = Math.min(fileBytes, Math.round(fraction * fileBytes));
          showUpload(fraction, "Uploading: " + Math.floor(fraction * 100) + "% (" + formatBytes(sent) +
            " of " + formatBytes(fileBytes) + ")");
        });
        xhr.upload.addEventListener("load", () => {
          sent = fileBytes;
          showUpload(1, "Uploaded " + formatBytes(fileBytes) + "; waiting for the server to store it…");
        });
        xhr.addEventListener("load", () => resolve({
          status: xhr.status, statusText: xhr.statusText, body: parseJson(xhr.responseText),
          seconds: (Date.now() - started) / 1000 }));
        xhr.addEventListener("error", () => reject(new Error(sent < fileBytes
          ? "the connection closed during the upload, at " + formatBytes(sent) + " of " + formatBytes(fileBytes) +
            " (a file over the server's size limit ends this way too)"
          : "the server did not answer.")));
        xhr.addEventListener("abort", () => reject(new Error("the upload was stopped.")));
        xhr.send(form);
      });
    }

    async function postJson(url, body) {
      let response;
      try {
        response = await fetch(url, { method: "POST", body: JSON.stringify(body),
          headers: writeHeaders({ "Content-Type": "application/json" }) });
      } catch (err) {
        throw new Error("the server did not answer.");
      }
      let parsed = null;
      try { parsed = parseJson(await response.text()); } catch (err) { /* cut off */ }
      return { status: response.status, statusText: response.statusText, body: parsed };
    }

    async function loadTasks() {
      try {
        const response = await fetch("/tasks", { headers: JSON_HEADERS });
        tasks = (await response.json()).tasks || [];
      } catch (err) { tasks = []; }
      const select = $("task-select");
      select.replaceChildren(...tasks.map((t) => el("option", { value: t.name, text: t.name })));
      const filter = $("filter-task");
      filter.replaceChildren(el("option", { value: "", text: "Any" }),
        ...tasks.map((t) => el("option", { value: t.name, text: t.name })));
      filter.value = filters.task;
      if (tasks.some((t) => t.name === "sleep")) select.value = "sleep";
      describeTask();
    }

    $("task-select").addEventListener("change", describeTask);

    $("submit-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const out = $("submit-result");
      const paramsBox = $("params");
      out.textContent = "";
      let params;
      try {
        params = JSON.parse(paramsBox.value.trim() || "{}");
        if (params === null || typeof params !== "object" || Array.isArray(params)) throw new Error("not an object");
        $("params-error").textContent = "";
        paramsBox.removeAttribute("aria-invalid");
      } catch (err) {
        $("params-error").textContent = "Params must be a JSON object, e.g. {\"seconds\": 3}.";
        paramsBox.setAttribute("aria-invalid", "true");
        paramsBox.focus();
        return;
      }
      const body = { task: $("task-select").value, params: params };
      const priority = parseInt($("priority").value, 10);
      if (!isNaN(priority) && priority !== 0) body.priority = priority;
      const withFiles = fileParamsOf(currentTask()).length > 0;
      const files = withFiles ? chosenFiles() : [];
      if (files === null) return;
      $("upload").hidden = true;
      $("submit-button").disabled = true;
      try {
        let answer;
        if (withFiles) {
          // The job part first (the server reads it before any file), then one part per file.
          const form = new FormData();
          form.append("job", new Blob([JSON.stringify(body)], { type: "application/json" }), "job.json");
          for (const [param, file] of files) form.append(param, file, file.name);
          const fileBytes = files.reduce((sum, [, file]) => sum + file.size, 0);
          out.textContent = "Uploading " + (files.length === 1 ? "1 file" : files.length + " files") + "…";
          showUpload(0, "Uploading: 0% (0 bytes of " + formatBytes(fileBytes) + ")");
          answer = await postWithProgress("/jobs", form, fileBytes);
          if (answer.status >= 200 && answer.status < 400) {
            showUpload(1, "Uploaded " + formatBytes(fileBytes) + " in " + formatSeconds(answer.seconds) + ".");
          } else {
            $("upload").hidden = true;
          }
        } else {
          answer = await postJson("/jobs", body);
        }
        if (sessionEnded(answer.status)) return;
        const job = answer.body;
        if ((answer.status === 202 || answer.status === 303 || (answer.status >= 200 && answer.status < 300)) &&
            job && typeof job.id === "string") {
          upsert(job);
          summarySoon();
          out.replaceChildren(answer.status === 303 ? "Already running: " : "Submitted: ",
            el("a", { href: "/jobs/" + encodeURIComponent(job.id), text: job.task + " job " + job.id }));
        } else {
          out.textContent = "Not submitted: " + problemMessage(answer.status, answer.statusText, answer.body);
        }
      } catch (err) {
        out.textContent = "Not submitted: " + (err && err.message ? err.message : "the server did not answer.");
      } finally {
        $("submit-button").disabled = false;
      }
    });

    loadTasks();
    loadRecent();
    loadSummary();
    connect();
    setInterval(loadSummary, 10000); // run times, counts and charts move on even without events
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.page === "job") jobPage();
    else if (document.body.dataset.page === "dashboard") dashboard();
  });
})();
