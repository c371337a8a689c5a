// oaiproxy dashboard.  One script, no framework, no build step.
//
// Security: the admin key lives in this tab's sessionStorage only and goes
// out as "Authorization: Bearer", never in a URL (no cookies: no CSRF).
// Every name that comes from the proxy (clients, models, upstreams, codes)
// is put on the page with textContent, never as markup.
"use strict";

(function () {
  const KEY = "oaiproxy.admin_key";
  const LIVE = "live";
  const USAGE = "../usage";
  const USAGE_EVERY = 30000;
  const REFUSALS_SHOWN = 15;
  const DAY = 86400;
  const STATUS_COLOURS = { "1xx": "--c8", "2xx": "--ok", "3xx": "--info", "4xx": "--warn", "5xx": "--bad" };
  const PALETTE = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6", "--c7", "--c8"];

  const $ = (id) => document.getElementById(id);
  const charts = {};
  let liveTimer = null;
  let usageTimer = null;
  let lastLive = null;
  let lastUsage = null;

  class AuthError extends Error {}

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = el("td", cell.text, cell.cls);
      if (cell.node) td.insertBefore(cell.node, td.firstChild);
      tr.appendChild(td);
    }
    return tr;
  }

  // --- talking to the proxy ------------------------------------------------

  async function api(path, key) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + key, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.status === 401) {
      const message = body && body.error && body.error.message;
      throw new AuthError(message || "The proxy refused the key.");
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      const error = new Error(message || "HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // --- formatting ----------------------------------------------------------

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function ago(seconds) {
    const s = Math.max(0, Date.now() / 1000 - seconds);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 129600) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  function until(iso) {
    const ms = Date.parse(iso) - Date.now();
    if (!(ms > 0)) return "now";
    const h = ms / 3600000;
    if (h < 1.5) return "in " + Math.round(ms / 60000) + " min";
    if (h < 36) return "in " + Math.round(h) + " h";
    return "in " + Math.round(h / 24) + " days";
  }

  function amount(value, unit) {
    if (value === null || value === undefined) return "unknown";
    if (unit === "usd") return "$" + value.toFixed(value < 0.1 ? 4 : value < 10 ? 2 : 0);
    return Math.round(value).toLocaleString() + " " + (unit === "tokens" ? "tokens" : unit);
  }

  function usd(value) {
    if (value === null || value === undefined) return "unpriced";
    return "$" + value.toFixed(value < 1 ? 4 : 2);
  }

  // --- charts --------------------------------------------------------------

  function axes(valueFormat) {
    const stroke = css("--muted");
    const grid = { stroke: css("--grid"), width: 1 };
    return [
      { stroke, grid, ticks: grid },
      { stroke, grid, ticks: grid, size: 64, values: valueFormat ? (u, vals) => vals.map(valueFormat) : undefined },
    ];
  }

  function chartWidth(node) {
    return Math.max(220, node.clientWidth || node.parentNode.clientWidth - 20);
  }

  // Draw (or update) the chart in container `id`: `names` and `colours` for
  // each series, `data` as uPlot wants it ([x, ...ys]).
  function draw(id, names, colours, data, options) {
    const node = $(id);
    const signature = names.join("\u0000") + "|" + document.documentElement.dataset.scheme;
    let chart = charts[id];
    if (chart && chart.signature !== signature) {
      chart.plot.destroy();
      chart = null;
    }
    if (!chart) {
      const opts = options || {};
      const series = [{}].concat(
        names.map((name, i) => ({
          label: name,
          stroke: css(colours[i]),
          fill: opts.fill ? css(colours[i]) + "22" : undefined,
          width: 1.6,
          points: { show: data[0].length < 40 },
          spanGaps: false,
        })),
      );
      const plot = new uPlot(
        {
          width: chartWidth(node),
          height: window.innerWidth >= 1800 ? 240 : 190,
          series,
          axes: axes(opts.format),
          scales: {
            x: opts.xRange ? { time: true, range: () => opts.xRange } : { time: true },
            y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
          },
          legend: { live: true },
          cursor: { points: { size: 6 } },
        },
        data,
        node,
      );
      chart = charts[id] = { plot, signature };
    } else {
      chart.plot.setData(data);
    }
    // What the chart holds, for a glance in the inspector (and the tests).
    let max = 0;
    for (const ys of data.slice(1)) for (const y of ys) if (y !== null && y > max) max = y;
    node.dataset.points = String(data[0].length);
    node.dataset.max = String(max);
  }

  function resizeCharts() {
    for (const id of Object.keys(charts)) {
      const node = $(id);
      charts[id].plot.setSize({ width: chartWidth(node), height: window.innerWidth >= 1800 ? 240 : 190 });
    }
  }

  function destroyCharts() {
    for (const id of Object.keys(charts)) {
      charts[id].plot.destroy();
      delete charts[id];
    }
  }

  function columns(map, order) {
    const names = Object.keys(map).sort((a, b) => (order ? order.indexOf(a) - order.indexOf(b) : a.localeCompare(b)));
    return names;
  }

  // --- panels --------------------------------------------------------------

  function showLive(live) {
    lastLive = live;
    const s = live.series;
    const t = s.t;
    const statuses = columns(s.requests_per_second, ["1xx", "2xx", "3xx", "4xx", "5xx"]);
    const rpsNames = statuses.length ? statuses : ["2xx"];
    draw(
      "chart-rps",
      rpsNames,
      rpsNames.map((name) => STATUS_COLOURS[name] || "--c8"),
      [t].concat(rpsNames.map((name) => s.requests_per_second[name] || t.map(() => 0))),
      { fill: true },
    );
    draw("chart-flight", ["in flight", "open streams"], ["--c1", "--c5"], [t, s.in_flight, s.open_streams]);
    const ms = (values) => values.map((v) => (v === null ? null : v * 1000));
    draw("chart-overhead", ["p50", "p99"], ["--c1", "--c3"], [t, ms(s.overhead_p50), ms(s.overhead_p99)], {
      format: (v) => +v.toPrecision(3),
    });
    draw("chart-ttft", ["p50", "p99"], ["--c2", "--c4"], [t, s.ttft_p50, s.ttft_p99], {
      format: (v) => +v.toPrecision(3),
    });
    const kinds = columns(s.upstream_errors_per_second);
    const kindNames = kinds.length ? kinds : ["none"];
    draw(
      "chart-errors",
      kindNames,
      kindNames.map((_, i) => PALETTE[(i + 3) % PALETTE.length]),
      [t].concat(kindNames.map((name) => s.upstream_errors_per_second[name] || t.map(() => 0))),
    );

    const upstreams = $("upstreams").tBodies[0];
    clear(upstreams);
    for (const u of live.upstreams) {
      const badge = el("span", u.state, "badge " + (["closed", "half-open", "open"][u.state_value] || "open"));
      const failure = u.last_failure ? u.last_failure + ", " + ago(u.last_failure_at) : "none";
      upstreams.appendChild(
        row([
          { text: u.name },
          { node: badge, text: live.group && u.not_closed ? " in " + u.not_closed + " of " + u.workers + " workers" : "" },
          { text: u.in_flight, cls: "num" },
          { text: failure },
          { text: u.cooldown_left > 0 ? Math.ceil(u.cooldown_left) + " s" : "-", cls: "num" },
        ]),
      );
    }

    const refusals = $("refusals").tBodies[0];
    clear(refusals);
    if (!live.refusals.length) refusals.appendChild(row([{ text: "none in memory", cls: "muted" }, {}, {}, {}, {}]));
    for (const r of live.refusals.slice(0, REFUSALS_SHOWN)) {
      refusals.appendChild(
        row([
          { text: clock(r.at) },
          r.client === "-" ? { text: "(no valid key)", cls: "muted" } : { text: r.client },
          { text: r.route },
          { text: r.status, cls: "num status-" + String(r.status).charAt(0) },
          { text: r.code || "-" },
        ]),
      );
    }
    $("scope").textContent = live.group ? "group of " + live.workers + " workers" : "one process";
    $("updated").textContent = "updated " + clock(live.generated_at);
  }

  function showUsage(usage) {
    lastUsage = usage;
    const budgets = $("budgets");
    clear(budgets);
    const spendNote = $("spend-note");
    spendNote.textContent = usage.ledger
      ? usage.since + " to " + usage.until + " (UTC days)"
      : "The usage ledger is off: no spend to show (see --usage-db).";
    let anyBudget = false;
    for (const client of usage.clients) {
      for (const b of client.budgets || []) {
        anyBudget = true;
        const used = b.used || 0;
        const share = b.limit > 0 ? Math.min(1, used / b.limit) : 1;
        const box = el("div", null, "budget");
        const label = el("div", null, "label");
        label.appendChild(el("span", client.client, "name"));
        label.appendChild(el("span", b.budget.replace(/_/g, " "), "muted"));
        box.appendChild(label);
        const bar = el("div", null, "bar");
        bar.setAttribute("role", "meter");
        bar.setAttribute("aria-valuemin", "0");
        bar.setAttribute("aria-valuemax", String(b.limit));
        bar.setAttribute("aria-valuenow", String(used));
        bar.setAttribute("aria-label", client.client + " " + b.budget);
        const fill = el("div", null, "fill" + (share >= 1 ? " full" : share >= 0.8 ? " high" : ""));
        fill.style.width = (share * 100).toFixed(1) + "%"; // CSSOM: allowed by the CSP
        bar.appendChild(fill);
        box.appendChild(bar);
        box.appendChild(
          el(
            "div",
            amount(used, b.unit) +
              " of " +
              amount(b.limit, b.unit) +
              " used, " +
              amount(b.left, b.unit) +
              " left; resets " +
              until(b.resets_at) +
              " (" +
              new Date(Date.parse(b.resets_at)).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) +
              ")",
            "detail",
          ),
        );
        budgets.appendChild(box);
      }
    }
    $("budgets-note").textContent = anyBudget ? "" : "No client has a budget (see the clients file).";

    // Spend per day: one series per client, in USD.
    const days = [];
    const since = Date.parse(usage.since + "T00:00:00Z") / 1000;
    const untilDay = Date.parse(usage.until + "T00:00:00Z") / 1000;
    for (let d = since; d <= untilDay; d += 86400) days.push(d);
    const index = new Map(days.map((d, i) => [new Date(d * 1000).toISOString().slice(0, 10), i]));
    const names = [];
    const perClient = [];
    const tokensPerClient = [];
    const models = new Map();
    const clientRows = $("spend-clients").tBodies[0];
    clear(clientRows);
    for (const client of usage.clients) {
      const values = days.map(() => 0);
      const tokens = days.map(() => 0);
      for (const day of client.days || []) {
        const i = index.get(day.day);
        if (i !== undefined && day.cost_usd !== null) values[i] += day.cost_usd;
        if (i !== undefined) tokens[i] += day.prompt_tokens + day.completion_tokens;
        const m = models.get(day.model) || { requests: 0, tokens: 0, usd: 0, unpriced: false };
        m.requests += day.requests;
        m.tokens += day.prompt_tokens + day.completion_tokens;
        if (day.cost_usd === null) m.unpriced = true;
        else m.usd += day.cost_usd;
        models.set(day.model, m);
      }
      const totals = client.totals || {};
      if ((totals.requests || 0) > 0) {
        names.push(client.client);
        perClient.push(values);
        tokensPerClient.push(tokens);
      }
      clientRows.appendChild(
        row([
          { text: client.client },
          { text: (totals.requests || 0).toLocaleString(), cls: "num" },
          { text: ((totals.prompt_tokens || 0) + (totals.completion_tokens || 0)).toLocaleString(), cls: "num" },
          { text: usd(totals.cost_usd === undefined ? 0 : totals.cost_usd), cls: "num" },
        ]),
      );
    }
    const modelRows = $("spend-models").tBodies[0];
    clear(modelRows);
    for (const [model, m] of [...models.entries()].sort((a, b) => b[1].usd - a[1].usd)) {
      modelRows.appendChild(
        row([
          { text: model },
          { text: m.requests.toLocaleString(), cls: "num" },
          { text: m.tokens.toLocaleString(), cls: "num" },
          { text: m.unpriced ? "unpriced" : usd(m.usd), cls: "num" },
        ]),
      );
    }
    const shown = names.length ? names : ["no spend"];
    const colours = shown.map((_, i) => PALETTE[i % PALETTE.length]);
    const zero = [days.map(() => 0)];
    const xRange = [days[0] - DAY / 2, days[days.length - 1] + DAY / 2];
    draw("chart-spend", shown, colours, [days].concat(names.length ? perClient : zero), {
      format: (v) => "$" + +v.toPrecision(2),
      xRange,
    });
    draw("chart-tokens", shown, colours, [days].concat(names.length ? tokensPerClient : zero), {
      format: (v) => (v >= 1e6 ? +(v / 1e6).toPrecision(3) + "M" : v >= 1e3 ? +(v / 1e3).toPrecision(3) + "k" : v),
      xRange,
    });
  }

  function usageUnavailable(error) {
    $("spend-note").textContent = "Spend is not available: " + error.message;
    $("budgets-note").textContent = "Budgets are not available: " + error.message;
  }

  // --- signing in and refreshing -------------------------------------------

  function problem(text) {
    $("problem").textContent = text || "";
  }

  async function refreshLive() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return;
    try {
      showLive(await api(LIVE, key));
      problem("");
    } catch (error) {
      if (error instanceof AuthError) return signOut(error.message);
      problem("Live figures: " + error.message);
    }
  }

  async function refreshUsage() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return;
    try {
      showUsage(await api(USAGE, key));
    } catch (error) {
      if (error instanceof AuthError) return signOut(error.message);
      usageUnavailable(error);
    }
  }

  function start(live) {
    $("signin").hidden = true;
    $("board").hidden = false;
    $("signout").hidden = false;
    showLive(live);
    refreshUsage();
    const every = Math.max(1, (live.series && live.series.interval) || 5) * 1000;
    liveTimer = setInterval(refreshLive, every);
    usageTimer = setInterval(refreshUsage, USAGE_EVERY);
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    clearInterval(liveTimer);
    clearInterval(usageTimer);
    destroyCharts();
    lastLive = lastUsage = null;
    $("board").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    $("scope").textContent = "";
    $("updated").textContent = "";
    problem("");
    $("signin-error").textContent = message || "";
    $("key").value = "";
    $("key").focus();
  }

  async function signIn(key) {
    const button = $("signin-button");
    button.disabled = true;
    $("signin-error").textContent = "";
    try {
      const live = await api(LIVE, key);
      sessionStorage.setItem(KEY, key);
      $("key").value = "";
      start(live);
    } catch (error) {
      sessionStorage.removeItem(KEY);
      $("signin-error").textContent =
        error instanceof AuthError
          ? (/none is configured/.test(error.message) ? "" : "Wrong key. ") + error.message
          : "The proxy did not answer: " + error.message;
    } finally {
      button.disabled = false;
    }
  }

  function scheme() {
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.documentElement.dataset.scheme = scheme();
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      if (key) signIn(key);
    });
    $("signout").addEventListener("click", () => signOut(""));
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(resizeCharts, 150);
    });
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
      // The charts' colours come from the CSS: redraw them in the new scheme.
      document.documentElement.dataset.scheme = scheme();
      if (lastLive) showLive(lastLive);
      if (lastUsage) showUsage(lastUsage);
    });
    const key = sessionStorage.getItem(KEY);
    if (key) signIn(key);
    else $("key").focus();
  });
})();
