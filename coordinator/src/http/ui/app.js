// swarm dashboard. Plain JavaScript, no library, no build step: served from the
// coordinator binary under /ui/ with a strict Content-Security-Policy.
//
// Data flow: after sign-in, one GET /v1/status paints the overview, then one stream of
// GET /v1/events keeps everything current (`status`, `tasks`, `reset`). A task's page
// follows GET /v1/tasks/{id}/events. Streams are read with fetch() (EventSource cannot
// send the Authorization header, and the token must never be in a URL), parsed here,
// and resumed with Last-Event-ID after a backoff. All data goes into the page as text
// (textContent / text nodes), never as markup.
'use strict';
(() => {
  const TOKEN_KEY = 'swarm.token';
  const PAGE = 50;
  const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead_lettered']);
  const STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead_lettered'];
  const SCOPES = ['read', 'submit', 'operate', 'admin'];
  const SPARK_WINDOW_MS = 5 * 60 * 1000;
  const LOG_MAX_CHARS = 512 * 1024;
  const STREAM_IDLE_MS = 35000; // the server sends a keep-alive every 10 s
  const SVG_NS = 'http://www.w3.org/2000/svg';
  // The API lives where the page does, less its /ui/ (behind a proxy that adds a prefix too).
  const BASE = (() => {
    const p = location.pathname;
    const i = p.lastIndexOf('/ui/');
    return i >= 0 ? p.slice(0, i) : '';
  })();

  // ---------------------------------------------------------------- state
  const S = {
    token: null,
    status: null,
    scope: null, // 'read' | 'submit' | 'operate' | 'admin' | null (not known)
    canSubmit: false, // known once detectScope has run
    canOperate: false,
    events: null, // the /v1/events stream
    polling: null, // fallback timers when /v1/events does not exist
    spark: [], // [{t, v}] throughput samples from status events
    view: null,
  };
  // The tasks view: one page of rows keyed by id, in id order.
  const TV = {
    loaded: false, filter: '', after: 0, rows: new Map(), firstId: 0, lastId: 0,
    nextAfter: null, atHead: false, stack: [], maxId: 0, newer: 0, fetchingNew: false, pendingNew: false,
    known: new Map(), // id -> the latest task event, for rows still being read
    seq: 0,
  };
  // The task page.
  const TP = { id: null, task: null, stream: null, attempt: null, chars: 0, refresh: null, seq: 0 };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k === 'text') e.textContent = v;
        else if (k === 'testid') e.dataset.testid = v;
        else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const k of kids.flat()) {
      if (k == null || k === false) continue;
      e.append(k instanceof Node ? k : String(k));
    }
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function badge(text, cls, testid) {
    return el('span', { class: 'badge st-' + (cls || text), testid }, text);
  }
  function setBadge(node, text) {
    node.textContent = text;
    node.className = 'badge st-' + text;
  }
  function pad(n) { return String(n).padStart(2, '0'); }
  function fmtTime(ms) {
    if (!ms) return '–';
    const d = new Date(ms);
    const now = new Date();
    const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === now.toDateString()) return hms;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hms}`;
  }
  function fmtDur(ms) {
    if (ms == null || ms < 0) return '';
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const m = Math.floor(ms / 60000);
    if (m < 60) return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }
  function fmtNum(n) { return n == null ? '–' : Number(n).toLocaleString('en-US'); }
  function fmtRate(v) {
    if (v == null) return '–';
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }
  function fmtBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1048576).toFixed(1)} MiB`;
  }
  function tags(obj) {
    const out = Object.entries(obj || {}).map(([k, v]) => el('span', { class: 'tag' }, `${k}=${v}`));
    return out.length ? out : ['–'];
  }

  // ---------------------------------------------------------------- notices
  let noticeTimer = null;
  function notice(text, ms) {
    const n = $('notice');
    n.textContent = text;
    n.hidden = !text;
    clearTimeout(noticeTimer);
    if (text && ms) noticeTimer = setTimeout(() => { n.hidden = true; }, ms);
  }
  function setConn(text, cls) {
    const c = $('conn');
    c.textContent = text;
    c.className = 'conn ' + (cls || '');
  }

  // ---------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }
  async function errorOf(resp) {
    let text = '';
    try { text = await resp.text(); } catch (_) { /* body lost */ }
    let err = null;
    try { err = JSON.parse(text).error; } catch (_) { /* not JSON */ }
    return new ApiError(resp.status, (err && err.code) || `http_${resp.status}`,
      (err && err.message) || text.slice(0, 300) || resp.statusText || `HTTP ${resp.status}`);
  }
  function authHeaders(extra) {
    return Object.assign({ Authorization: `Bearer ${S.token}` }, extra || {});
  }
  // One JSON call. A 401 signs out (unless told not to): the token is no longer good.
  async function api(method, path, body, opts) {
    opts = opts || {};
    const headers = authHeaders({ Accept: 'application/json' });
    let payload;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = typeof body === 'string' ? body : JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(BASE + path, {
        method, headers, body: payload, cache: 'no-store', credentials: 'omit',
        redirect: 'error', signal: opts.signal,
      });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, 'network', 'cannot reach the coordinator');
    }
    if (!resp.ok) {
      const e = await errorOf(resp);
      if (e.status === 401 && !opts.noSignOut) signOut('Your token is no longer accepted (401 unauthorized). Sign in again.');
      throw e;
    }
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }

  // A Server-Sent Events stream over fetch(). `h.onEvent(type, data, id)` for each
  // event (data parsed as JSON when it is), `h.onOpen()`, `h.onDown(err, delayMs)` before
  // each reconnect, `h.onFatal(err)` when it gives up (404, 403, 400). A 401 signs out.
  // `h.done()` true stops it reconnecting when the server ends the stream.
  function openStream(path, h) {
    let closed = false;
    let ctrl = null;
    let timer = null;
    let delay = 1000;
    let lastId = null;
    async function connect() {
      if (closed) return;
      ctrl = new AbortController();
      const headers = authHeaders({ Accept: 'text/event-stream' });
      if (lastId) headers['Last-Event-ID'] = lastId;
      let resp;
      try {
        resp = await fetch(BASE + path, { headers, cache: 'no-store', credentials: 'omit', redirect: 'error', signal: ctrl.signal });
      } catch (e) {
        return retry(new ApiError(0, 'network', 'connection lost'));
      }
      if (!resp.ok) {
        const e = await errorOf(resp);
        if (e.status === 401) { signOut('Your token is no longer accepted (401 unauthorized). Sign in again.'); return; }
        if (e.status === 400 && lastId) { lastId = null; return retry(e); }
        if (e.status === 404 || e.status === 403 || e.status === 400 || e.status === 410) {
          closed = true;
          if (h.onFatal) h.onFatal(e);
          return;
        }
        return retry(e);
      }
      delay = 1000;
      if (h.onOpen) h.onOpen();
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      let type = '';
      let data = [];
      let id = null;
      const idle = () => new Promise((_, reject) => {
        timer = setTimeout(() => reject(new ApiError(0, 'idle', 'stream went silent')), STREAM_IDLE_MS);
      });
      try {
        for (;;) {
          const r = await Promise.race([reader.read(), idle()]);
          clearTimeout(timer);
          if (r.done) break;
          buf += dec.decode(r.value, { stream: true });
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            let line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            if (line.endsWith('\r')) line = line.slice(0, -1);
            if (line === '') {
              if (id !== null) lastId = id;
              if (data.length && !closed) {
                const raw = data.join('\n');
                let parsed = raw;
                try { parsed = JSON.parse(raw); } catch (_) { /* plain text */ }
                try { h.onEvent(type || 'message', parsed, id); } catch (err) { reportBug(err); }
              }
              type = ''; data = []; id = null;
              continue;
            }
            if (line.startsWith(':')) continue; // keep-alive comment
            const c = line.indexOf(':');
            const field = c < 0 ? line : line.slice(0, c);
            let value = c < 0 ? '' : line.slice(c + 1);
            if (value.startsWith(' ')) value = value.slice(1);
            if (field === 'event') type = value;
            else if (field === 'data') data.push(value);
            else if (field === 'id' && !value.includes('\0')) id = value;
          }
        }
      } catch (e) {
        clearTimeout(timer);
        if (closed) return;
        try { ctrl.abort(); } catch (_) { /* already gone */ }
        return retry(e instanceof ApiError ? e : new ApiError(0, 'network', 'connection lost'));
      }
      if (closed || (h.done && h.done())) return;
      retry(new ApiError(0, 'closed', 'the stream ended'));
    }
    function retry(err) {
      if (closed) return;
      const wait = delay + Math.floor(Math.random() * 250);
      delay = Math.min(delay * 2, 30000);
      if (h.onDown) h.onDown(err, wait);
      timer = setTimeout(connect, wait);
    }
    connect();
    return {
      close() {
        closed = true;
        clearTimeout(timer);
        if (ctrl) ctrl.abort();
      },
    };
  }

  function reportBug(err) {
    // Never logs the token: only the error.
    console.error('swarm ui:', err && err.message ? err.message : err);
  }

  // ---------------------------------------------------------------- session
  function showOnly(view) {
    for (const v of ['login', 'overview', 'tasks', 'task']) $('view-' + v).hidden = v !== view;
    $('nav').hidden = view === 'login';
    $('bar-right').hidden = view === 'login';
    for (const a of document.querySelectorAll('#nav a')) {
      const on = a.dataset.view === view || (view === 'task' && a.dataset.view === 'tasks');
      if (on) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    S.view = view;
  }

  function showLogin(message) {
    showOnly('login');
    document.title = 'Sign in · swarm';
    const err = $('login-error');
    err.textContent = message || '';
    err.hidden = !message;
    const input = $('login-token');
    input.value = '';
    input.focus();
  }

  async function onLogin(ev) {
    ev.preventDefault();
    const input = $('login-token');
    const token = input.value.trim();
    const err = $('login-error');
    if (!token) {
      err.textContent = 'Enter a token.';
      err.hidden = false;
      input.focus();
      return;
    }
    const btn = $('login-submit');
    btn.disabled = true;
    S.token = token;
    try {
      const status = await api('GET', '/v1/status', undefined, { noSignOut: true });
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = '';
      err.hidden = true;
      startSession(status);
    } catch (e) {
      S.token = null;
      err.textContent = e.status === 401
        ? 'This token was refused (401 unauthorized): it is unknown, revoked or expired. Check it and try again.'
        : e.status === 403
          ? `This token may not read the cluster status (403 forbidden): ${e.message}`
          : `Could not sign in: ${e.message}`;
      err.hidden = false;
      input.select();
      input.focus();
    } finally {
      btn.disabled = false;
    }
  }

  function stopStreams() {
    if (S.events) { S.events.close(); S.events = null; }
    if (S.polling) { S.polling.forEach(clearInterval); S.polling = null; }
    closeTaskStream();
  }

  function signOut(message) {
    stopStreams();
    sessionStorage.removeItem(TOKEN_KEY);
    S.token = null;
    S.status = null;
    S.scope = null;
    S.canSubmit = false;
    S.canOperate = false;
    $('scope').textContent = '';
    applyCaps();
    S.spark = [];
    TV.loaded = false;
    TV.rows.clear();
    clear($('tasks'));
    notice('');
    if (location.hash && location.hash !== '#/') history.replaceState(null, '', '#/');
    showLogin(message);
  }

  function startSession(status) {
    notice('');
    if (status) onStatus(status);
    route();
    openEvents();
    detectScope();
  }

  // What the token may do: GET /v1/whoami when the coordinator has it; otherwise probes
  // that the token check answers before any handler could act (a body that is not JSON
  // or an id that is not a number), so nothing is ever submitted or cancelled by them.
  async function detectScope() {
    let scope = null;
    try {
      const me = await api('GET', '/v1/whoami');
      if (me && SCOPES.includes(me.scope)) scope = me.scope;
      if (me && Array.isArray(me.swarms) && me.swarms.length === 1 && !$('submit-swarm').value) {
        $('submit-swarm').value = me.swarms[0];
      }
    } catch (e) {
      if (e.status === 401) return;
    }
    if (scope) {
      S.scope = scope;
      S.canSubmit = SCOPES.indexOf(scope) >= 1;
      S.canOperate = SCOPES.indexOf(scope) >= 2;
    } else {
      const allowed = async (path) => {
        try {
          await api('POST', path, 'probe');
          return true;
        } catch (e) {
          return e.status !== 403 && e.status !== 401;
        }
      };
      const [submit, operate] = await Promise.all([allowed('/v1/tasks'), allowed('/v1/tasks/probe/cancel')]);
      S.canSubmit = submit;
      S.canOperate = operate;
      S.scope = operate ? null : submit ? 'submit' : 'read';
    }
    $('scope').textContent = S.scope ? `scope: ${S.scope}` : '';
    applyCaps();
  }

  function applyCaps() {
    const box = $('submit-box');
    if (box.hidden && S.canSubmit && window.matchMedia('(max-width: 640px)').matches) box.open = false;
    box.hidden = !S.canSubmit;
    updateCancel();
  }

  function refused(what, e) {
    if (e.status !== 403) return false;
    if (what === 'submit') S.canSubmit = false;
    if (what === 'cancel') S.canOperate = false;
    applyCaps();
    notice(`This token may not ${what} tasks (403 forbidden): ${e.message}`);
    return true;
  }

  // ---------------------------------------------------------------- cluster events
  function openEvents() {
    if (S.events) S.events.close();
    setConn('connecting', '');
    let opened = 0;
    S.events = openStream('/v1/events', {
      onOpen() {
        setConn('live', 'live');
        // After a gap, read the page shown again: the stream resumes where it broke off
        // (or says `reset`), and this costs one request more.
        if (opened++ > 0) {
          if (TV.loaded) reloadTasksQuietly();
          if (TP.id != null) scheduleTaskRefresh();
        }
      },
      onEvent(type, data) {
        if (type === 'status') onStatus(data);
        else if (type === 'tasks' || type === 'task') onTaskEvents(Array.isArray(data) ? data : (data && Array.isArray(data.tasks) ? data.tasks : [data]));
        else if (type === 'reset') onReset();
      },
      onDown(err, wait) { setConn(`reconnecting in ${Math.ceil(wait / 1000)} s`, 'down'); },
      onFatal(err) {
        S.events = null;
        if (err.status === 404) startPolling();
        else setConn(`no live updates: ${err.message}`, 'down');
      },
    });
  }

  // Only for a coordinator without GET /v1/events (older than this page).
  function startPolling() {
    setConn('polling (no /v1/events)', 'poll');
    const status = setInterval(async () => {
      try { onStatus(await api('GET', '/v1/status')); } catch (_) { /* shown by the next success */ }
    }, 2000);
    const tasks = setInterval(() => {
      if (S.view === 'tasks' && TV.loaded) reloadTasksQuietly();
    }, 3000);
    S.polling = [status, tasks];
  }

  function onReset() {
    api('GET', '/v1/status').then(onStatus, () => {});
    if (TV.loaded) reloadTasksQuietly();
  }

  function onStatus(st) {
    if (!st || !st.cluster) return;
    S.status = st;
    const now = Date.now();
    const v = (st.throughput && st.throughput.per_second) || 0;
    S.spark.push({ t: now, v });
    while (S.spark.length > 2 && S.spark[1].t < now - SPARK_WINDOW_MS) S.spark.shift();
    const q = st.queue || {};
    const total = STATES.reduce((a, s) => a + (q[s] || 0), 0);
    S.totalTasks = total;
    updateAgents(st.workers || []);
    if (S.view === 'overview') renderOverview();
  }

  function updateAgents(workers) {
    const names = new Set();
    for (const w of workers) for (const a of w.agents || []) names.add(a);
    const list = $('agent-list');
    const have = Array.from(list.options).map((o) => o.value).join('\n');
    const want = Array.from(names).sort();
    if (have === want.join('\n')) return;
    clear(list);
    for (const n of want) list.append(el('option', { value: n }));
  }

  // ---------------------------------------------------------------- overview
  // Rebuild `node`'s children only when what they show changed (status events come
  // often, and a rebuild would drop a selection in the table).
  function changed(node, shown) {
    const key = JSON.stringify(shown);
    if (node.dataset.key === key) return false;
    node.dataset.key = key;
    clear(node);
    return true;
  }

  function renderOverview() {
    const st = S.status;
    if (!st) return;
    const q = st.queue || {};
    const dl = $('queue');
    if (changed(dl, q)) for (const s of STATES) {
      dl.append(el('div', null,
        el('dt', null, s.replace('_', ' ')),
        el('dd', { testid: `queue-${s}` }, el('a', { href: `#/tasks?state=${s}` }, fmtNum(q[s] || 0)))));
    }
    $('queue-limit').textContent = st.queue_limit ? `queue limit ${fmtNum(st.queue_limit)}` : '';
    const tp = st.throughput || {};
    $('tput').textContent = fmtRate(tp.per_second || 0);
    $('tput-minute').textContent = `${fmtNum(tp.finished_last_minute || 0)} finished in the last minute`;
    renderSpark();

    const c = st.cluster;
    const nodes = c.nodes || [];
    $('leader').textContent = c.leader != null ? `leader: node ${c.leader}` : 'no leader';
    const healthy = nodes.filter((n) => n.status && n.status.healthy).length;
    $('cluster-sum').textContent = `term ${c.term} · ${healthy} of ${nodes.length} node${nodes.length === 1 ? '' : 's'} healthy · answered by node ${c.node_id}`;

    const tb = $('nodes');
    if (changed(tb, nodes.map((n) => [n.id, n.voter, n.api_addr, n.role, n.lag, n.error, n.status]))) for (const n of nodes) {
      const s = n.status;
      const role = (s && s.role) || n.role || 'unknown';
      const health = s ? (s.healthy ? badge('healthy', 'healthy') : badge('unhealthy', 'unhealthy')) : badge('unreachable', 'error');
      if (!s && n.error) health.title = n.error;
      if (s && !s.healthy) health.title = s.health;
      tb.append(el('tr', { testid: 'node-row', 'data-node-id': n.id },
        el('td', null, `node ${n.id}`, n.voter === false ? ' (learner)' : ''),
        el('td', { class: 'mono hide-narrow' }, n.api_addr),
        el('td', null, badge(role, role)),
        el('td', null, s ? String(s.term) : '–'),
        el('td', null, health),
        el('td', { class: 'hide-narrow' }, s ? `${fmtNum(s.applied_index)} / ${fmtNum(s.last_log_index)}` : '–'),
        el('td', null, n.lag == null ? '–' : fmtNum(n.lag))));
    }

    const workers = (st.workers || []).slice().sort((a, b) => a.id.localeCompare(b.id));
    $('worker-count').textContent = `(${workers.length})`;
    $('workers-empty').hidden = workers.length > 0;
    const wb = $('workers');
    const shown = workers.map((w) => [w.id, w.via, w.slots, w.running, w.draining, w.labels, w.agents, w.addr]);
    if (changed(wb, shown)) for (const w of workers) {
      const meter = el('span', { class: 'meter', 'aria-hidden': 'true' }, el('span'));
      meter.firstChild.style.width = `${w.slots ? Math.min(100, (100 * w.running) / w.slots) : 0}%`;
      wb.append(el('tr', { testid: 'worker-row', 'data-worker-id': w.id },
        el('td', { class: 'mono' }, w.id, w.via ? el('span', { class: 'muted small' }, ` via ${w.via}`) : null),
        el('td', null, String(w.slots)),
        el('td', null, String(w.running), meter),
        el('td', null, w.draining ? badge('draining', 'draining') : badge('ready', 'ok')),
        el('td', { class: 'wrap' }, tags(w.labels)),
        el('td', { class: 'wrap hide-narrow' }, (w.agents || []).join(', ') || '–'),
        el('td', { class: 'mono hide-narrow' }, w.addr)));
    }

    const swarms = st.swarms || [];
    $('swarms-card').hidden = swarms.length === 0;
    const sb = $('swarms');
    const shownSwarms = swarms.map((s) => [s.name, s.topology, s.labels, s.tasks, s.problem, !!s.layout]);
    if (changed(sb, shownSwarms)) for (const s of swarms) {
      const t = s.tasks || {};
      sb.append(el('tr', { testid: 'swarm-row' },
        el('td', null, s.name),
        el('td', null, s.topology),
        el('td', { class: 'wrap hide-narrow' }, tags(s.labels)),
        el('td', null, fmtNum(t.queued || 0)),
        el('td', null, fmtNum(t.running || 0)),
        el('td', { class: 'wrap' }, s.problem ? el('span', { class: 'badge st-error', title: s.problem }, 'no layout') : s.layout ? 'planned' : '–')));
    }
  }

  function renderSpark() {
    const box = $('spark');
    const now = Date.now();
    // The last 5 minutes, or less while fewer have been seen (at least one).
    const first = S.spark.length ? S.spark[0].t : now;
    const from = Math.max(now - SPARK_WINDOW_MS, Math.min(first, now - 60000));
    const span = now - from;
    const W = 300;
    const H = 56;
    const pts = S.spark.filter((p, i, a) => p.t >= from || (a[i + 1] && a[i + 1].t >= from));
    const max = Math.max(1, ...pts.map((p) => p.v));
    const x = (t) => (Math.max(t, from) - from) / span * W;
    const y = (v) => H - 2 - (v / max) * (H - 6);
    let d = '';
    pts.forEach((p, i) => {
      d += i === 0 ? `M${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}` : `H${x(p.t).toFixed(1)}V${y(p.v).toFixed(1)}`;
    });
    if (pts.length) d += `H${W}`;
    const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'data-testid': 'sparkline' });
    const peak = pts.length ? Math.max(...pts.map((p) => p.v)) : 0;
    const title = svg('title');
    title.textContent = `Tasks finished per second (1-minute average) over the last ${Math.round(span / 60000)} min; peak ${fmtRate(peak)}/s`;
    s.append(title);
    s.append(svg('line', { class: 'axis', x1: 0, y1: H - 1, x2: W, y2: H - 1 }));
    if (d) {
      s.append(svg('path', { class: 'area', d: `${d}V${H}H${x(pts[0].t).toFixed(1)}Z` }));
      s.append(svg('path', { class: 'line', d }));
    }
    clear(box);
    box.append(s);
  }

  // ---------------------------------------------------------------- tasks view
  function tasksHash(filter, after) {
    const p = new URLSearchParams();
    if (filter) p.set('state', filter);
    if (after != null) p.set('after', String(after));
    const q = p.toString();
    return '#/tasks' + (q ? `?${q}` : '');
  }

  // The highest task id this token can see: from the queue counts (ids are dense unless
  // tasks were purged), checked and widened with one-task pages.
  async function findMaxId() {
    const exists = async (after) => {
      const r = await api('GET', `/v1/tasks?after=${after}&limit=1`);
      return r.tasks.length ? r.tasks[0].id : null;
    };
    // lo: an id that exists (or 0); hi: no id is above it.
    let lo = 0;
    let hi = null;
    let probes = 1;
    let t = await exists(Math.max(0, (S.totalTasks || 0) - 1));
    if (t === null) {
      hi = Math.max(0, (S.totalTasks || 0) - 1);
    } else {
      lo = t;
      let step = 1;
      while (hi === null && probes < 40) {
        t = await exists(lo + step - 1);
        probes++;
        if (t === null) hi = lo + step - 1;
        else { lo = t; step *= 4; }
      }
    }
    if (hi === null) return lo;
    while (hi > lo && probes < 64) {
      const mid = Math.floor((lo + hi) / 2);
      t = await exists(mid);
      probes++;
      if (t === null) hi = mid; else lo = t;
    }
    return hi;
  }

  async function showTasks(params) {
    showOnly('tasks');
    document.title = 'Tasks · swarm';
    const filter = STATES.includes(params.get('state')) ? params.get('state') : '';
    $('tasks-filter').value = filter;
    let after = params.has('after') ? Number(params.get('after')) : null;
    if (after !== null && !(after >= 0)) after = 0;
    if (after === null) {
      if (filter) after = 0;
      else {
        try {
          TV.maxId = Math.max(TV.maxId, await findMaxId());
        } catch (e) {
          tasksError(e);
          return;
        }
        after = Math.max(0, TV.maxId - PAGE);
      }
    }
    await loadTasks(filter, after);
  }

  function tasksError(e) {
    $('tasks-range').textContent = `Could not load tasks: ${e.message}`;
  }

  async function loadTasks(filter, after) {
    const seq = ++TV.seq;
    const q = new URLSearchParams({ after: String(after), limit: String(PAGE) });
    if (filter) q.set('state', filter);
    let r;
    try {
      r = await api('GET', `/v1/tasks?${q}`);
    } catch (e) {
      if (seq === TV.seq) tasksError(e);
      return;
    }
    if (seq !== TV.seq) return;
    TV.loaded = true;
    TV.filter = filter;
    TV.after = after;
    TV.rows.clear();
    TV.newer = 0;
    TV.firstId = 0;
    TV.lastId = after;
    const tb = $('tasks');
    clear(tb);
    for (const t of r.tasks) addRow(t, false);
    TV.nextAfter = r.next_after == null ? null : r.next_after;
    // The newest page: new tasks are appended to it as they come.
    TV.atHead = TV.nextAfter == null || TV.lastId >= TV.maxId;
    updatePager();
  }

  // A refresh of the page shown (after `reset`, or while polling), keeping its place.
  async function reloadTasksQuietly() {
    const q = new URLSearchParams({ after: String(TV.after), limit: String(Math.max(PAGE, TV.rows.size)) });
    if (TV.filter) q.set('state', TV.filter);
    try {
      const r = await api('GET', `/v1/tasks?${q}`);
      for (const t of r.tasks) {
        const row = TV.rows.get(t.id);
        if (row) updateRow(row, rowData(t), true);
        else if (t.id > TV.lastId) addRow(t, true);
      }
      TV.nextAfter = r.next_after == null ? null : r.next_after;
      if (TV.nextAfter == null) TV.atHead = true;
      updatePager();
    } catch (_) { /* the next event or poll tries again */ }
  }

  function rowData(t) {
    return {
      id: t.id, state: t.state, agent: t.agent, swarm: t.swarm,
      attempts: Array.isArray(t.attempts) ? t.attempts.length : (t.attempt || 0),
      created: t.created_at_ms,
    };
  }

  // How far along a state is: a page read may be older than the events seen meanwhile.
  function rank(state) { return FINAL.has(state) ? 2 : state === 'running' ? 1 : 0; }

  function addRow(t, fresh) {
    const d = rowData(t);
    const k = TV.known.get(d.id);
    if (k && rank(k.state) > rank(d.state)) d.state = k.state;
    if (k && k.attempts > d.attempts) d.attempts = k.attempts;
    const tr = el('tr', { testid: 'task-row', 'data-task-id': d.id, class: fresh ? 'fresh' : null },
      el('td', null, el('a', { href: `#/tasks/${d.id}`, 'data-testid': 'task-link' }, `#${d.id}`)),
      el('td', null, badge(d.state, d.state, 'row-state')),
      el('td', { class: 'mono' }, d.agent || '–'),
      el('td', { class: 'hide-narrow' }, d.swarm || 'default'),
      el('td', { 'data-testid': 'task-attempts' }, String(d.attempts)),
      el('td', null, fmtTime(d.created)));
    $('tasks').append(tr);
    TV.rows.set(d.id, { tr, d });
    if (!TV.firstId || d.id < TV.firstId) TV.firstId = d.id;
    TV.lastId = Math.max(TV.lastId, d.id);
    TV.maxId = Math.max(TV.maxId, d.id);
    $('tasks-empty').hidden = true;
  }

  // `d` from an event (in order: taken as it is, except that a final state is never
  // left) or from a page read (`read`: taken only if further along).
  function updateRow(row, d, read) {
    const cells = row.tr.children;
    const back = read ? rank(d.state) < rank(row.d.state) : FINAL.has(row.d.state) && !FINAL.has(d.state);
    if (d.state && d.state !== row.d.state && !back) {
      row.d.state = d.state;
      setBadge(cells[1].firstChild, d.state);
      row.tr.classList.remove('fresh');
      void row.tr.offsetWidth; // restart the highlight
      row.tr.classList.add('fresh');
    }
    if (d.attempts > row.d.attempts) {
      row.d.attempts = d.attempts;
      cells[4].textContent = String(d.attempts);
    }
  }

  function updatePager() {
    const n = TV.rows.size;
    $('tasks-empty').hidden = n > 0;
    $('page-prev').disabled = TV.stack.length === 0 && TV.after === 0;
    $('page-oldest').disabled = TV.after === 0;
    $('page-next').disabled = TV.nextAfter == null || (TV.atHead && TV.newer === 0);
    const range = n ? `#${TV.firstId}–#${TV.lastId}` : 'none';
    const filter = TV.filter ? ` ${TV.filter.replace('_', ' ')}` : '';
    $('tasks-range').textContent = `${n}${filter} task${n === 1 ? '' : 's'} (${range}) after #${TV.after}` +
      (TV.atHead ? ' · the newest: new tasks appear here as they come' : ' · more on the next page');
    const newer = $('tasks-newer');
    newer.hidden = TV.newer === 0;
    if (TV.newer) newer.textContent = `${fmtNum(TV.newer)} newer task event${TV.newer === 1 ? '' : 's'} beyond this page: use Newest.`;
  }

  function onTaskEvents(list) {
    let wantNew = false;
    for (const t of list) {
      if (!t || t.id == null) continue;
      TV.maxId = Math.max(TV.maxId, t.id);
      TV.known.delete(t.id);
      TV.known.set(t.id, { state: t.state, attempts: t.attempt || 0 });
      if (TV.known.size > 5000) TV.known.delete(TV.known.keys().next().value);
      if (TP.id === t.id && TP.task && t.state && t.state !== TP.task.state) scheduleTaskRefresh();
      if (!TV.loaded) continue;
      const row = TV.rows.get(t.id);
      if (row) {
        updateRow(row, { state: t.state, attempts: t.attempt || 0 });
      } else if (t.id > TV.lastId && (!TV.filter || TV.filter === t.state)) {
        if (TV.atHead && TV.rows.size < 2 * PAGE) wantNew = true;
        else TV.newer++;
      }
    }
    if (wantNew) fetchNewRows();
    else if (TV.loaded) updatePager();
  }

  // New tasks past the end of the newest page: read them (one request however many
  // arrived meanwhile), so their rows are exact.
  async function fetchNewRows() {
    if (TV.fetchingNew) { TV.pendingNew = true; return; }
    TV.fetchingNew = true;
    const seq = TV.seq;
    try {
      const q = new URLSearchParams({ after: String(TV.lastId), limit: String(PAGE) });
      if (TV.filter) q.set('state', TV.filter);
      const r = await api('GET', `/v1/tasks?${q}`);
      if (seq === TV.seq) {
        for (const t of r.tasks) {
          const row = TV.rows.get(t.id);
          if (row) updateRow(row, rowData(t), true);
          else if (TV.rows.size < 2 * PAGE) addRow(t, true);
          else { TV.atHead = false; TV.newer++; }
        }
        if (r.next_after != null) {
          if (TV.rows.size < 2 * PAGE) TV.pendingNew = true;
          else TV.atHead = false;
        }
        TV.nextAfter = TV.lastId;
        updatePager();
      }
    } catch (_) {
      /* the next event tries again */
    } finally {
      TV.fetchingNew = false;
      if (TV.pendingNew) { TV.pendingNew = false; fetchNewRows(); }
    }
  }

  async function onSubmit(ev) {
    ev.preventDefault();
    const out = $('submit-result');
    const agent = $('submit-agent').value.trim();
    const swarm = $('submit-swarm').value.trim();
    const text = $('submit-payload').value;
    const prio = Number($('submit-priority').value || 0);
    clear(out);
    out.className = 'result';
    if (!agent && !swarm) {
      out.textContent = 'Name an agent (or a ring swarm, whose stages name them).';
      out.className = 'result error';
      $('submit-agent').focus();
      return;
    }
    const body = { agent, priority: Number.isInteger(prio) ? prio : 0 };
    if (swarm) body.swarm = swarm;
    if (text.trim() !== '') {
      try { body.payload = JSON.parse(text); } catch (_) { body.payload = text; }
    }
    const btn = ev.submitter || $('submit-form').querySelector('button[type=submit]');
    btn.disabled = true;
    try {
      const r = await api('POST', '/v1/tasks', body);
      out.append(r.duplicate ? 'Already submitted: ' : 'Submitted ',
        el('a', { href: `#/tasks/${r.id}`, 'data-testid': 'submit-link' }, `task #${r.id}`));
      TV.maxId = Math.max(TV.maxId, r.id);
      if (TV.loaded && !TV.rows.has(r.id) && r.id > TV.lastId && (!TV.filter || TV.filter === 'queued')) {
        if (TV.atHead && TV.rows.size < 2 * PAGE) fetchNewRows();
        else { TV.newer++; updatePager(); }
      }
    } catch (e) {
      if (!refused('submit', e)) {
        out.textContent = `Refused: ${e.message}`;
        out.className = 'result error';
      }
    } finally {
      btn.disabled = false;
    }
  }

  function pageTo(filter, after, push) {
    if (push) TV.stack.push(TV.after);
    location.hash = tasksHash(filter, after);
  }

  // ---------------------------------------------------------------- task page
  function closeTaskStream() {
    if (TP.stream) { TP.stream.close(); TP.stream = null; }
    clearTimeout(TP.refresh);
    TP.refresh = null;
  }

  async function showTask(id) {
    showOnly('task');
    document.title = `Task #${id} · swarm`;
    if (TP.id === id && TP.stream) return; // already shown and followed
    closeTaskStream();
    TP.id = id;
    TP.task = null;
    TP.attempt = null;
    TP.chars = 0;
    clear($('live'));
    delete $('live').dataset.ended;
    clear($('attempts'));
    clear($('task-details'));
    $('task-payload').textContent = '';
    $('task-output').textContent = '';
    $('task-title').textContent = `Task #${id}`;
    setBadge($('task-state'), '…');
    $('task-error').hidden = true;
    $('cancel').hidden = true;
    const seq = ++TP.seq;
    let task;
    try {
      task = await api('GET', `/v1/tasks/${id}`);
    } catch (e) {
      if (seq !== TP.seq) return;
      const err = $('task-error');
      err.textContent = e.code === 'task_expired'
        ? `Task #${id} has expired: its retention ended and it was purged.`
        : e.status === 404 ? `There is no task #${id}.` : `Could not load task #${id}: ${e.message}`;
      err.hidden = false;
      setBadge($('task-state'), 'unknown');
      $('live-status').textContent = '';
      return;
    }
    if (seq !== TP.seq || TP.id !== id) return;
    renderTask(task);
    followTask(id);
  }

  function followTask(id) {
    let ended = false;
    $('live-status').textContent = 'connecting…';
    TP.stream = openStream(`/v1/tasks/${id}/events`, {
      done: () => ended,
      onOpen() { $('live-status').textContent = ended ? '' : '· live'; },
      onDown(err, wait) { $('live-status').textContent = `· ${err.message}; reconnecting in ${Math.ceil(wait / 1000)} s`; },
      onFatal(err) { $('live-status').textContent = `· not available: ${err.message}`; },
      onEvent(type, data) {
        if (TP.id !== id) return;
        if (type === 'output') appendOutput(data);
        else if (type === 'gap') {
          const n = data.to != null && data.from != null ? ` (${fmtBytes(data.to - data.from)})` : '';
          appendNote(`[output not shown${n}: ${data.reason || 'skipped'}]\n`);
        } else if (type === 'state') {
          if (TP.task && data.state) {
            TP.task.state = data.state;
            setBadge($('task-state'), data.state);
            updateCancel();
          }
          scheduleTaskRefresh();
        } else if (type === 'attempt') {
          scheduleTaskRefresh();
        } else if (type === 'end') {
          ended = true;
          $('live-status').textContent = '· ended';
          $('live').dataset.ended = '1';
          if (data && data.id != null) renderTask(data);
          if (TP.stream) { TP.stream.close(); TP.stream = null; }
        }
      },
    });
  }

  function scheduleTaskRefresh() {
    if (TP.refresh || TP.id == null) return;
    const id = TP.id;
    TP.refresh = setTimeout(async () => {
      TP.refresh = null;
      try {
        const t = await api('GET', `/v1/tasks/${id}`);
        // Not an older read over the stream's final answer.
        if (TP.id === id && !(TP.task && FINAL.has(TP.task.state) && !FINAL.has(t.state))) renderTask(t);
      } catch (_) { /* the stream's end brings the task anyway */ }
    }, 150);
  }

  function appendOutput(o) {
    const log = $('live');
    if (o.attempt != null && o.attempt !== TP.attempt) {
      if (TP.attempt != null || o.attempt > 1) appendNote(`── attempt ${o.attempt} ──\n`);
      TP.attempt = o.attempt;
    }
    let text = o.text;
    if (text == null && o.data != null) text = `[${fmtBytes(o.len || 0)} of binary output]\n`;
    if (!text) return;
    const cls = o.stream === 'stderr' ? 'stderr' : 'out';
    const pinned = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    const last = log.lastChild;
    if (last && last.nodeType === 1 && last.className === cls && last.dataset.attempt === String(o.attempt)) {
      last.firstChild.appendData(text);
    } else {
      const span = el('span', { class: cls, 'data-stream': o.stream || 'stdout' }, text);
      span.dataset.attempt = String(o.attempt);
      log.append(span);
    }
    TP.chars += text.length;
    trimLog(log);
    if (pinned) log.scrollTop = log.scrollHeight;
  }

  function appendNote(text) {
    const log = $('live');
    log.append(el('span', { class: 'note' }, text));
    TP.chars += text.length;
  }

  function trimLog(log) {
    if (TP.chars <= LOG_MAX_CHARS) return;
    while (TP.chars > LOG_MAX_CHARS * 0.75 && log.firstChild) {
      TP.chars -= log.firstChild.textContent.length;
      log.removeChild(log.firstChild);
    }
    log.prepend(el('span', { class: 'note' }, '[earlier output trimmed here; `swarm task logs` has the stored tail]\n'));
  }

  function bytesText(obj, field) {
    if (obj[field] != null) {
      const s = obj[field];
      try {
        const v = JSON.parse(s);
        if (v !== null && typeof v === 'object') return JSON.stringify(v, null, 2);
      } catch (_) { /* text */ }
      return s;
    }
    if (obj[`${field}_base64`] != null) return `(binary, base64)\n${obj[`${field}_base64`]}`;
    return '';
  }

  function renderTask(t) {
    TP.task = t;
    $('task-title').textContent = `Task #${t.id}`;
    setBadge($('task-state'), t.state);
    const dl = $('task-details');
    clear(dl);
    const row = (k, v, testid) => {
      if (v == null || v === '') return;
      dl.append(el('dt', null, k), el('dd', { testid }, v));
    };
    row('Agent', t.agent || '–', 'detail-agent');
    row('Swarm', t.swarm || 'default');
    if (t.stages && t.stages.length) row('Stages', `${t.stages.join(' → ')} (at stage ${(t.stage || 0) + 1})`);
    row('Priority', String(t.priority));
    row('Created', fmtTime(t.created_at_ms));
    if (t.finished_at_ms) row('Finished', `${fmtTime(t.finished_at_ms)} (${fmtDur(t.finished_at_ms - t.created_at_ms)} after submit)`);
    row('Timeout', fmtDur(t.timeout_ms));
    row('Max attempts', String(t.max_attempts));
    if (t.idempotency_key) row('Idempotency key', t.idempotency_key);
    if (t.labels && Object.keys(t.labels).length) row('Labels', el('span', null, tags(t.labels)));
    if (t.moves) row('Moves', String(t.moves));
    if (t.usage) row('Tokens', `${fmtNum(t.usage.prompt_tokens)} prompt + ${fmtNum(t.usage.completion_tokens)} completion (${t.usage.model})`);
    if (t.held) row('Held', t.held);
    if (t.expires_at_ms) row('Expires', fmtTime(t.expires_at_ms));
    if (t.error) row('Error', el('span', { class: 'mono' }, t.error), 'detail-error');

    const ol = $('attempts');
    clear(ol);
    const atts = t.attempts || [];
    $('attempts-empty').hidden = atts.length > 0;
    for (const a of atts) {
      const outcome = a.outcome || 'running';
      const when = a.finished_at_ms
        ? `${fmtTime(a.started_at_ms)} → ${fmtTime(a.finished_at_ms)} (${fmtDur(a.finished_at_ms - a.started_at_ms)})`
        : `started ${fmtTime(a.started_at_ms)}`;
      ol.append(el('li', { class: `o-${outcome}`, testid: 'attempt-item', 'data-attempt': a.attempt },
        el('div', null, el('strong', null, `Attempt ${a.attempt}`), ' on ',
          el('span', { class: 'mono', 'data-testid': 'attempt-worker' }, a.worker), ' ',
          badge(outcome, outcome, 'attempt-outcome'),
          a.stage ? el('span', { class: 'muted small' }, ` stage ${a.stage + 1}`) : null),
        el('div', { class: 'when' }, when, a.output_bytes ? ` · ${fmtBytes(a.output_bytes)} of output` : ''),
        a.error ? el('div', { class: 'err' }, a.error) : null));
    }
    $('task-payload').textContent = bytesText(t, 'payload');
    let output = bytesText(t, 'output');
    if (t.stage_outputs && t.stage_outputs.length > 1) {
      output = t.stage_outputs.map((s, i) => `── stage ${i + 1} ──\n${s}`).join('\n') + (output ? `\n── result ──\n${output}` : '');
    }
    $('task-output').textContent = output;
    updateCancel();
  }

  function updateCancel() {
    const b = $('cancel');
    const t = TP.task;
    b.hidden = !(S.canOperate && t && !FINAL.has(t.state) && S.view === 'task');
  }

  let cancelArmed = null;
  async function onCancel() {
    const b = $('cancel');
    const t = TP.task;
    if (!t) return;
    if (!cancelArmed) {
      b.textContent = `Confirm: cancel task #${t.id}`;
      cancelArmed = setTimeout(() => { cancelArmed = null; b.textContent = 'Cancel task'; }, 4000);
      return;
    }
    clearTimeout(cancelArmed);
    cancelArmed = null;
    b.textContent = 'Cancel task';
    b.disabled = true;
    try {
      const v = await api('POST', `/v1/tasks/${t.id}/cancel`);
      if (TP.id === t.id && v && v.id != null) renderTask(v);
    } catch (e) {
      if (!refused('cancel', e)) notice(`Could not cancel task #${t.id}: ${e.message}`, 8000);
    } finally {
      b.disabled = false;
    }
  }

  // ---------------------------------------------------------------- routing
  function route(focus) {
    if (!S.token) { showLogin(); return; }
    const h = location.hash.startsWith('#') ? location.hash.slice(1) : '';
    const [path, query] = h.split('?');
    const params = new URLSearchParams(query || '');
    const m = /^\/tasks\/(\d+)$/.exec(path);
    if (!m && S.view === 'task') { closeTaskStream(); TP.id = null; }
    if (m) {
      showTask(Number(m[1]));
    } else if (path === '/tasks') {
      showTasks(params);
    } else {
      showOnly('overview');
      document.title = 'Overview · swarm';
      renderOverview();
    }
    if (focus) $('main').focus({ preventScroll: false });
  }

  function init() {
    $('login-form').addEventListener('submit', onLogin);
    $('signout').addEventListener('click', () => signOut('Signed out.'));
    $('submit-form').addEventListener('submit', onSubmit);
    $('cancel').addEventListener('click', onCancel);
    $('tasks-filter').addEventListener('change', (e) => { TV.stack = []; pageTo(e.target.value, null, false); });
    $('page-next').addEventListener('click', () => { if (TV.nextAfter != null) pageTo(TV.filter, TV.nextAfter, true); });
    $('page-prev').addEventListener('click', () => {
      const a = TV.stack.length ? TV.stack.pop() : Math.max(0, TV.after - PAGE);
      pageTo(TV.filter, a, false);
    });
    $('page-oldest').addEventListener('click', () => { TV.stack = []; pageTo(TV.filter, 0, false); });
    $('page-newest').addEventListener('click', async () => {
      TV.stack = [];
      try { TV.maxId = Math.max(TV.maxId, await findMaxId()); } catch (_) { /* keep what we know */ }
      const after = Math.max(0, TV.maxId - PAGE);
      if (location.hash === tasksHash(TV.filter, after)) loadTasks(TV.filter, after);
      else pageTo(TV.filter, after, false);
    });
    window.addEventListener('hashchange', () => route(true));
    setInterval(() => { if (S.view === 'overview' && S.status) renderSpark(); }, 5000);

    S.token = sessionStorage.getItem(TOKEN_KEY);
    if (!S.token) { showLogin(); return; }
    api('GET', '/v1/status', undefined, { noSignOut: true }).then(startSession, (e) => {
      if (e.status === 401) signOut('The saved token is no longer accepted (401 unauthorized). Sign in again.');
      else { startSession(null); notice(`Could not read the cluster status: ${e.message}`, 8000); }
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
