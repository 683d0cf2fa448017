// asyncjobs browser views: the job page (live through Server-Sent Events) and the dashboard
// (live through the WebSocket). Plain JavaScript, no build step, no third-party code.
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

  // -- the job page ---------------------------------------------------------------

  function jobPage() {
    const jobId = document.body.dataset.jobId;
    const base = "/jobs/" + encodeURIComponent(jobId);
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
            else poll();
          }, () => poll());
        }
      });
    }

    $("cancel").addEventListener("click", async () => {
      const button = $("cancel");
      button.disabled = true;
      $("notice").textContent = "Canceling…";
      try {
        const response = await fetch(base + "/cancel", { method: "POST", headers: JSON_HEADERS });
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

    render(JSON.parse($("initial-job").textContent));
    if (!TERMINAL.has(job.status)) {
      subscribe();
      ticker = setInterval(renderProgress, 1000); // the ETA counts down between events
    }
  }

  // -- the dashboard -----------------------------------------------------------------

  function dashboard() {
    const RECENT = 20;
    const rows = new Map(); // job id -> {job, tr}
    let tasks = [];
    let socket = null;
    let retry = 1000;
    let summaryTimer = null;
    let fallbackTimer = null;

    function setLive(text) { $("live").textContent = text; }

    // Counts and run times: GET / as JSON.
    async function loadSummary() {
      summaryTimer = null;
      try {
        const response = await fetch("/", { headers: JSON_HEADERS, cache: "no-store" });
        if (!response.ok) return;
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
      } catch (err) { /* the next event or tick tries again */ }
    }

    function summarySoon() {
      if (!summaryTimer) summaryTimer = setTimeout(loadSummary, 400);
    }

    function jobCells(job, tr) {
      const link = el("a", { href: "/jobs/" + encodeURIComponent(job.id), text: job.id.slice(0, 10) + "…",
        "aria-label": job.task + " job " + job.id });
      const badge = el("span", { class: "badge", dataset: { status: job.status }, text: job.status });
      const fraction = job.status === "succeeded" ? 1 : job.progress && job.progress.fraction;
      const bar = el("progress", { max: "100", "aria-label": "Progress of job " + job.id.slice(0, 10) });
      if (typeof fraction === "number") bar.value = Math.round(fraction * 100);
      else if (TERMINAL.has(job.status)) bar.value = 0;
      tr.replaceChildren(
        el("td", {}, [link]),
        el("td", { text: job.task }),
        el("td", {}, [badge]),
        el("td", {}, [bar]),
        el("td", {}, [el("time", { datetime: job.created_at, text: formatTime(job.created_at) })]),
      );
      tr.dataset.jobId = job.id;
      tr.dataset.status = job.status;
    }

    function upsert(job) {
      const known = rows.get(job.id);
      if (known) {
        if (job.version < known.job.version) return;
        known.job = job;
        jobCells(job, known.tr);
        return;
      }
      const body = $("recent").tBodies[0];
      const tr = el("tr");
      jobCells(job, tr);
      rows.set(job.id, { job, tr });
      // Newest first, by creation time.
      const after = [...rows.values()].filter((r) => r.tr.isConnected && r.job.created_at < job.created_at)
        .sort((a, b) => (a.job.created_at < b.job.created_at ? 1 : -1))[0];
      if (after) body.insertBefore(tr, after.tr); else body.append(tr);
      while (body.rows.length > RECENT) {
        const last = body.rows[body.rows.length - 1];
        rows.delete(last.dataset.jobId);
        last.remove();
      }
      $("recent-empty").hidden = body.rows.length > 0;
    }

    async function loadRecent() {
      try {
        const response = await fetch("/jobs?limit=" + RECENT, { headers: JSON_HEADERS, cache: "no-store" });
        if (!response.ok) return;
        const body = await response.json();
        for (const job of body.jobs.slice().reverse()) upsert(job);
        $("recent-empty").hidden = $("recent").tBodies[0].rows.length > 0;
      } catch (err) { /* tried again on the next tick */ }
    }

    function connect() {
      if (!("WebSocket" in window)) { startFallback(); return; }
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
          loadRecent(); // anything that changed before the subscription took effect
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
      if (!fallbackTimer) fallbackTimer = setInterval(() => { loadRecent(); loadSummary(); }, 3000);
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
        xhr.setRequestHeader("Accept", "application/json");
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
          headers: { ...JSON_HEADERS, "Content-Type": "application/json" } });
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
    setInterval(loadSummary, 15000); // run times and counts drift even without events
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.page === "job") jobPage();
    else if (document.body.dataset.page === "dashboard") dashboard();
  });
})();
