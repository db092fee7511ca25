// swarm dashboard. Plain JavaScript, no library, no build step: served from the
// coordinator binary under /ui/ with a strict Content-Security-Policy.
//
// Data flow: after sign-in, one GET /v1/status paints the overview, then one stream of
// GET /v1/events keeps everything current (`status`, `tasks`, `reset`; the limits
// view reads GET /v1/limits again when those say something changed). A task's page
// follows GET /v1/tasks/{id}/events. Streams are read with fetch() (EventSource cannot
// send the Authorization header, and the token must never be in a URL), parsed here,
// and resumed with Last-Event-ID after a backoff. All data goes into the page as text
// (textContent / text nodes), never as markup.
'use strict';
(() => {
  const TOKEN_KEY = 'swarm.token';
  const PAGE = 50;
  const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead_lettered']);
  const RETRYABLE = new Set(['failed', 'dead_lettered']);
  const STATES = ['waiting', 'awaiting_approval', 'queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead_lettered'];
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
  // The tasks view: one page of rows keyed by id, newest first.
  const TV = {
    loaded: false, f: null, after: null, rows: new Map(), topId: 0, bottomId: 0,
    nextAfter: null, atHead: true, short: false, stack: [], newer: 0, fetchingNew: false, pendingNew: false,
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
    for (const v of ['login', 'overview', 'tasks', 'task', 'swarms', 'memory', 'limits']) $('view-' + v).hidden = v !== view;
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
    LV.seq++; // a read still under way is for the old session
    LV.list = null;
    LV.error = null;
    LV.armed = null;
    clear($('limits'));
    delete $('limits').dataset.key;
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
    for (const e of document.querySelectorAll('.op-only')) e.hidden = !S.canOperate;
    if (S.view === 'overview') renderOverview();
    if (S.view === 'limits') renderLimits();
    updateCancel();
  }

  function refused(what, e) {
    if (e.status !== 403) return false;
    if (what === 'submit') S.canSubmit = false;
    if (what === 'cancel' || what === 'retry' || what === 'approve' || what === 'reject') S.canOperate = false;
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
          scheduleLimitsRefresh();
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
      if (S.view === 'limits') loadLimits();
    }, 3000);
    S.polling = [status, tasks];
  }

  function onReset() {
    api('GET', '/v1/status').then(onStatus, () => {});
    if (TV.loaded) reloadTasksQuietly();
    SW.tasks.clear();
    if (S.view === 'swarms') loadSwarmTasks();
    scheduleLimitsRefresh();
  }

  function onStatus(st) {
    if (!st || !st.cluster) return;
    S.status = st;
    const now = Date.now();
    const v = (st.throughput && st.throughput.per_second) || 0;
    const lat = st.latency || null;
    S.spark.push({ t: now, v, p50: lat ? lat.p50_ms : null, p99: lat ? lat.p99_ms : null });
    while (S.spark.length > 2 && S.spark[1].t < now - SPARK_WINDOW_MS) S.spark.shift();
    const q = st.queue || {};
    const total = STATES.reduce((a, s) => a + (q[s] || 0), 0);
    S.totalTasks = total;
    updateAgents(st.workers || []);
    updateSwarmNames(st.swarms || []);
    if (S.view === 'overview') renderOverview();
    else if (S.view === 'swarms') renderSwarms();
    else if (S.view === 'limits') scheduleLimitsRefresh();
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

  function updateSwarmNames(swarms) {
    const list = $('swarm-list');
    const want = swarms.map((s) => s.name).sort();
    if (list.dataset.key === want.join('\n')) return;
    list.dataset.key = want.join('\n');
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
    const lat = st.latency;
    $('lat').textContent = lat ? fmtNum(lat.p50_ms) : '–';
    $('lat-detail').textContent = lat
      ? `p90 ${fmtNum(lat.p90_ms)} ms · p99 ${fmtNum(lat.p99_ms)} ms · submit to final, ${fmtNum(lat.tasks)} tasks in the last minute`
      : 'submit to final: no task finished in the last minute';
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
    const shown = [S.canOperate, workers.map((w) => [w.id, w.via, w.slots, w.running, w.draining, w.drain, w.labels, w.agents, w.addr])];
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
        el('td', { class: 'mono hide-narrow' }, w.addr),
        S.canOperate ? el('td', null, workerAction(w)) : null));
    }

    const swarms = st.swarms || [];
    $('swarms-card').hidden = swarms.length === 0;
    const sb = $('swarms');
    const shownSwarms = swarms.map((s) => [s.name, s.topology, s.labels, s.tasks, s.problem, !!s.layout]);
    if (changed(sb, shownSwarms)) for (const s of swarms) {
      const t = s.tasks || {};
      sb.append(el('tr', { testid: 'swarm-row' },
        el('td', null, el('a', { href: '#/swarms' }, s.name)),
        el('td', null, s.topology),
        el('td', { class: 'wrap hide-narrow' }, tags(s.labels)),
        el('td', null, fmtNum(t.queued || 0)),
        el('td', null, fmtNum(t.running || 0)),
        el('td', { class: 'wrap' }, s.problem ? el('span', { class: 'badge st-error', title: s.problem }, 'no layout') : s.layout ? 'planned' : '–')));
    }
  }

  // Drain or resume, for an operate token: a worker stopping (SIGTERM) cannot be resumed.
  function workerAction(w) {
    if (w.draining && w.drain === 'stopping') return el('span', { class: 'muted small' }, 'stopping');
    const action = w.draining ? 'resume' : 'drain';
    return el('button', {
      type: 'button', class: 'btn' + (w.draining ? '' : ' btn-danger'), testid: `worker-${action}`,
      'aria-label': `${action === 'drain' ? 'Drain' : 'Resume'} worker ${w.id}`,
      onclick: (e) => { e.currentTarget.disabled = true; onWorkerAction(w.id, action); },
    }, action === 'drain' ? 'Drain' : 'Resume');
  }

  // The overview's two charts over the last minutes (at least one), from the status
  // events seen since the page opened: throughput, and latency p50 (line) and p99
  // (dashed).
  function renderSpark() {
    const now = Date.now();
    const first = S.spark.length ? S.spark[0].t : now;
    const from = Math.max(now - SPARK_WINDOW_MS, Math.min(first, now - 60000));
    const pts = S.spark.filter((p, i, a) => p.t >= from || (a[i + 1] && a[i + 1].t >= from));
    const mins = Math.round((now - from) / 60000);
    drawSpark($('spark'), pts, from, now, [['v', 'line']], 'sparkline',
      (peak) => `Tasks finished per second (1-minute average) over the last ${mins} min; peak ${fmtRate(peak)}/s`);
    drawSpark($('lat-spark'), pts, from, now, [['p99', 'line2'], ['p50', 'line']], 'latency-sparkline',
      (peak) => `Latency from submit to final (p50, and p99 dashed) over the last ${mins} min; highest p99 ${fmtNum(peak)} ms`);
  }

  function drawSpark(box, pts, from, now, series, testid, describe) {
    const W = 300;
    const H = 56;
    const span = Math.max(1, now - from);
    const vals = pts.flatMap((p) => series.map(([k]) => p[k])).filter((v) => v != null);
    const max = Math.max(1, ...vals);
    const x = (t) => (Math.max(t, from) - from) / span * W;
    const y = (v) => H - 2 - (v / max) * (H - 6);
    const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'data-testid': testid });
    const title = svg('title');
    title.textContent = describe(vals.length ? Math.max(...vals) : 0);
    s.append(title);
    s.append(svg('line', { class: 'axis', x1: 0, y1: H - 1, x2: W, y2: H - 1 }));
    for (const [k, cls] of series) {
      const ps = pts.filter((p) => p[k] != null);
      let d = '';
      ps.forEach((p, i) => {
        d += i === 0 ? `M${x(p.t).toFixed(1)},${y(p[k]).toFixed(1)}` : `H${x(p.t).toFixed(1)}V${y(p[k]).toFixed(1)}`;
      });
      if (!d) continue;
      d += `H${W}`;
      if (cls === 'line') s.append(svg('path', { class: 'area', d: `${d}V${H}H${x(ps[0].t).toFixed(1)}Z` }));
      s.append(svg('path', { class: cls, d }));
    }
    clear(box);
    box.append(s);
  }

  // ---------------------------------------------------------------- tasks view
  // Newest first: GET /v1/tasks?order=desc with the filters. `after` is the cursor the
  // server gave (`next_after`): the page holds tasks below it; none is the newest page.
  const FILTER_KEYS = ['state', 'agent', 'swarm', 'label', 'text'];
  function emptyFilter() { return { state: '', agent: '', swarm: '', label: '', text: '' }; }
  function filterOf(params) {
    const f = emptyFilter();
    for (const k of FILTER_KEYS) f[k] = (params.get(k) || '').trim().slice(0, 256);
    if (!STATES.includes(f.state)) f.state = '';
    return f;
  }
  function filterShown(f) {
    return FILTER_KEYS.filter((k) => f[k]).map((k) => `${k} ${k === 'text' ? JSON.stringify(f[k]) : f[k].replace('_', ' ')}`).join(', ');
  }
  function tasksHash(f, after) {
    const p = new URLSearchParams();
    for (const k of FILTER_KEYS) if (f[k]) p.set(k, f[k]);
    if (after != null) p.set('after', String(after));
    const q = p.toString();
    return '#/tasks' + (q ? `?${q}` : '');
  }
  function listQuery(f, after, limit) {
    const q = new URLSearchParams({ order: 'desc', limit: String(limit) });
    for (const k of FILTER_KEYS) if (f[k]) q.set(k, f[k]);
    if (after != null) q.set('after', String(after));
    return q;
  }
  // Whether a task change may belong in the list: what a change says is checked here,
  // the rest (labels, payload text, a ring's other agents) by the server on the re-read.
  function mightMatch(t, f) {
    return (!f.state || t.state === f.state) && (!f.swarm || (t.swarm || 'default') === f.swarm);
  }

  async function showTasks(params) {
    showOnly('tasks');
    document.title = 'Tasks · swarm';
    const f = filterOf(params);
    for (const k of FILTER_KEYS) $(k === 'state' ? 'tasks-filter' : `filter-${k}`).value = f[k];
    let after = params.has('after') ? Number(params.get('after')) : null;
    if (after !== null && !(after >= 0)) after = null;
    await loadTasks(f, after);
  }

  function tasksError(e) {
    $('tasks-range').textContent = `Could not load tasks: ${e.message}`;
  }

  async function loadTasks(f, after) {
    const seq = ++TV.seq;
    let r;
    try {
      r = await api('GET', `/v1/tasks?${listQuery(f, after, PAGE)}`);
    } catch (e) {
      if (seq === TV.seq) {
        if (e.status === 400) notice(`Filter refused: ${e.message}`, 8000);
        tasksError(e);
      }
      return;
    }
    if (seq !== TV.seq) return;
    TV.loaded = true;
    TV.f = f;
    TV.after = after;
    TV.rows.clear();
    TV.newer = 0;
    TV.topId = 0;
    TV.bottomId = 0;
    clear($('tasks'));
    for (const t of r.tasks) addRow(t, false, false);
    TV.nextAfter = r.next_after == null ? null : r.next_after;
    TV.short = r.tasks.length < PAGE && TV.nextAfter != null;
    TV.atHead = after == null;
    updatePager();
  }

  // A refresh of the page shown (after `reset`, or while polling), keeping its place.
  async function reloadTasksQuietly() {
    if (TV.atHead) { fetchNewRows(); return; }
    try {
      const r = await api('GET', `/v1/tasks?${listQuery(TV.f, TV.after, Math.max(PAGE, TV.rows.size))}`);
      for (const t of r.tasks) {
        const row = TV.rows.get(t.id);
        if (row) updateRow(row, rowData(t), true);
      }
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

  // A row for task `t`: appended (a page read, newest first) or put at the top (`top`).
  function addRow(t, fresh, top) {
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
    const tb = $('tasks');
    if (top) tb.prepend(tr); else tb.append(tr);
    TV.rows.set(d.id, { tr, d });
    TV.topId = Math.max(TV.topId, d.id);
    if (!TV.bottomId || d.id < TV.bottomId) TV.bottomId = d.id;
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
    updateCancel();
    const n = TV.rows.size;
    $('tasks-empty').hidden = n > 0 || TV.short;
    $('page-prev').disabled = TV.atHead;
    $('page-newest').disabled = TV.atHead && TV.newer === 0;
    $('page-next').disabled = TV.nextAfter == null;
    const range = n ? ` (#${TV.topId}–#${TV.bottomId})` : '';
    const f = filterShown(TV.f);
    let text = `${n} task${n === 1 ? '' : 's'}${range}${f ? ` matching ${f}` : ''}, newest first` +
      (TV.atHead ? ' · new tasks appear at the top as they come' : ` · below #${TV.after}`);
    if (TV.short) text += ' · the scan stopped at a bound: Older goes on searching';
    $('tasks-range').textContent = text;
    const newer = $('tasks-newer');
    newer.hidden = TV.newer === 0;
    if (TV.newer) newer.textContent = `${fmtNum(TV.newer)} newer task event${TV.newer === 1 ? '' : 's'} above this page: use Newest.`;
  }

  function onTaskEvents(list) {
    let wantNew = false;
    for (const t of list) {
      if (!t || t.id == null) continue;
      TV.known.delete(t.id);
      TV.known.set(t.id, { state: t.state, attempts: t.attempt || 0 });
      if (TV.known.size > 5000) TV.known.delete(TV.known.keys().next().value);
      trackSwarmTask(t);
      if (TP.id === t.id && TP.task && t.state && t.state !== TP.task.state) scheduleTaskRefresh();
      if (!TV.loaded) continue;
      const row = TV.rows.get(t.id);
      if (row) {
        updateRow(row, { state: t.state, attempts: t.attempt || 0 });
      } else if (t.id > TV.topId && mightMatch(t, TV.f)) {
        if (TV.atHead) wantNew = true;
        else TV.newer++;
      }
    }
    if (S.view === 'swarms') renderSwarmTasks();
    scheduleLimitsRefresh();
    if (wantNew) fetchNewRows();
    else if (TV.loaded) updatePager();
  }

  // New tasks above the newest page: read the head again (one request however many
  // arrived meanwhile) and put the new ones on top, so their rows are exact.
  async function fetchNewRows() {
    if (TV.fetchingNew) { TV.pendingNew = true; return; }
    TV.fetchingNew = true;
    const seq = TV.seq;
    try {
      const r = await api('GET', `/v1/tasks?${listQuery(TV.f, null, PAGE)}`);
      if (seq === TV.seq && TV.atHead) {
        const last = r.tasks.length ? r.tasks[r.tasks.length - 1].id : 0;
        if (r.tasks.length === PAGE && last > TV.topId && TV.topId) {
          // More arrived than a page: show the newest page as it is now.
          TV.seq++;
          clear($('tasks'));
          TV.rows.clear();
          TV.topId = 0;
          TV.bottomId = 0;
          for (const t of r.tasks) addRow(t, true, false);
          TV.nextAfter = r.next_after == null ? null : r.next_after;
        } else {
          for (const t of r.tasks.slice().reverse()) {
            const row = TV.rows.get(t.id);
            if (row) updateRow(row, rowData(t), true);
            else if (t.id > TV.topId) addRow(t, true, true);
          }
          // Keep the page bounded: the oldest rows leave, and Older starts below them.
          while (TV.rows.size > 2 * PAGE) {
            const tb = $('tasks');
            const tr = tb.lastElementChild;
            TV.rows.delete(Number(tr.dataset.taskId));
            tb.removeChild(tr);
            TV.nextAfter = Number(tb.lastElementChild.dataset.taskId);
            TV.bottomId = TV.nextAfter;
          }
          if (TV.nextAfter == null && r.next_after != null && TV.rows.size >= PAGE) TV.nextAfter = TV.bottomId;
        }
        TV.short = false;
        updatePager();
      }
    } catch (_) {
      /* the next event tries again */
    } finally {
      TV.fetchingNew = false;
      if (TV.pendingNew) { TV.pendingNew = false; fetchNewRows(); }
    }
  }

  function applyFilters(ev) {
    if (ev) ev.preventDefault();
    const f = emptyFilter();
    f.state = $('tasks-filter').value;
    for (const k of ['agent', 'swarm', 'label', 'text']) f[k] = $(`filter-${k}`).value.trim();
    if (f.label && !/^[^=,\s]+=[^,]*(,[^=,\s]+=[^,]*)*$/.test(f.label)) {
      notice('A label filter is k=v (several: k=v,k2=v2).', 6000);
      $('filter-label').focus();
      return;
    }
    TV.stack = [];
    pageTo(f, null, false);
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
      if (TV.loaded && !TV.rows.has(r.id) && r.id > TV.topId && mightMatch({ state: 'queued', swarm: swarm || 'default' }, TV.f)) {
        if (TV.atHead) fetchNewRows();
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

  function pageTo(f, after, push) {
    if (push) TV.stack.push(TV.after);
    const h = tasksHash(f, after);
    if (location.hash === h) loadTasks(f, after);
    else location.hash = h;
  }

  // ---------------------------------------------------------------- swarms view
  // Drawn from the status events (each swarm's layout over the connected workers, and
  // its tasks by ring stage) and the task changes (which task is at which stage, and
  // mesh steals: the same attempt seen running on another worker).
  const SW_TASKS_MAX = 2000;
  const STEAL_SHOW_MS = 4000;
  const SW = { tasks: new Map(), steals: new Map(), stealCount: new Map(), loaded: false };

  function trackSwarmTask(t) {
    const name = t.swarm || 'default';
    if (name === 'default') return;
    let m = SW.tasks.get(name);
    if (!m) SW.tasks.set(name, (m = new Map()));
    const prev = m.get(t.id);
    if (prev && t.state === 'running' && prev.state === 'running' && prev.attempt === t.attempt &&
        prev.worker && t.worker && prev.worker !== t.worker) {
      addSteal(name, { id: t.id, from: prev.worker, to: t.worker, at: Date.now() });
    }
    if (FINAL.has(t.state)) { m.delete(t.id); return; }
    m.delete(t.id);
    m.set(t.id, { state: t.state, stage: t.stage || 0, worker: t.worker, attempt: t.attempt, moves: t.moves || 0 });
    if (m.size > SW_TASKS_MAX) m.delete(m.keys().next().value);
  }

  function addSteal(name, s) {
    let l = SW.steals.get(name);
    if (!l) SW.steals.set(name, (l = []));
    l.unshift(s);
    if (l.length > 8) l.length = 8;
    SW.stealCount.set(name, (SW.stealCount.get(name) || 0) + 1);
    if (S.view === 'swarms') drawSteal(name, s);
  }

  // The unfinished tasks of every defined swarm, read once when the view opens (and
  // after a reset); task changes keep them current from then on.
  async function loadSwarmTasks() {
    const swarms = ((S.status && S.status.swarms) || []).filter((s) => s.name !== 'default');
    await Promise.all(swarms.flatMap((s) => ['running', 'queued'].map(async (state) => {
      try {
        const r = await api('GET', `/v1/tasks?${new URLSearchParams({ order: 'desc', swarm: s.name, state, limit: '200' })}`);
        let m = SW.tasks.get(s.name);
        if (!m) SW.tasks.set(s.name, (m = new Map()));
        for (const t of r.tasks) {
          if (t.swarm !== s.name || m.has(t.id)) continue;
          const a = (t.attempts || [])[t.attempts.length - 1];
          m.set(t.id, { state: t.state, stage: t.stage || 0, worker: a && a.worker, attempt: a && a.attempt, moves: t.moves || 0 });
        }
      } catch (_) { /* drawn from the events alone */ }
    })));
    SW.loaded = true;
    renderSwarmTasks();
  }

  function showSwarms() {
    showOnly('swarms');
    document.title = 'Swarms · swarm';
    renderSwarms();
    loadSwarmTasks();
  }

  function workerChip(id, load, gone) {
    const chip = el('span', { class: 'wk' + (gone ? ' gone' : ''), 'data-worker-id': id, testid: 'swarm-worker' }, id);
    if (load) {
      const meter = el('span', { class: 'meter', 'aria-hidden': 'true' }, el('span'));
      meter.firstChild.style.width = `${load.slots ? Math.min(100, (100 * load.running) / load.slots) : 0}%`;
      chip.append(meter);
      chip.title = `${id}: ${load.running} of ${load.slots} slots held`;
    } else if (gone) {
      chip.title = `${id}: not connected`;
    }
    return chip;
  }

  function renderSwarms() {
    const box = $('swarm-cards');
    const all = ((S.status && S.status.swarms) || []).slice();
    // Defined swarms by name, the default (every worker, a star) last.
    all.sort((a, b) => (a.name === 'default') - (b.name === 'default') || a.name.localeCompare(b.name));
    $('swarms-empty').hidden = all.some((s) => s.name !== 'default');
    const names = all.map((s) => s.name);
    for (const card of Array.from(box.children)) if (!names.includes(card.dataset.swarm)) card.remove();
    let prev = null;
    for (const s of all) {
      let card = box.querySelector(`[data-swarm="${CSS.escape(s.name)}"]`);
      if (!card) {
        card = el('section', { class: 'card swarm', testid: 'swarm-card', 'data-swarm': s.name, 'aria-label': `Swarm ${s.name}` },
          el('div', { class: 'swarm-head' }), el('div', { class: 'swarm-body' }));
      }
      if (prev ? prev.nextSibling !== card : box.firstChild !== card) {
        if (prev) prev.after(card); else box.prepend(card);
      }
      prev = card;
      card.dataset.topology = s.topology;
      renderSwarmCard(card, s);
    }
    renderSwarmTasks();
  }

  function renderSwarmCard(card, s) {
    const head = card.firstChild;
    const t = s.tasks || {};
    if (changed(head, [s.name, s.topology, s.labels, t, s.fan_out, s.max_degree, s.queue_depth])) {
      const extra = s.topology === 'hierarchical' ? ` · fan-out ${s.fan_out}`
        : s.topology === 'mesh' ? ` · degree ≤ ${s.max_degree} · queue depth ${s.queue_depth}` : '';
      head.append(el('h2', null, s.name === 'default' ? 'default' : s.name),
        badge(s.topology, 'idle', 'swarm-topology'),
        el('span', { class: 'counts-inline', testid: 'swarm-counts' }, `${fmtNum(t.queued || 0)} queued · ${fmtNum(t.running || 0)} running${extra}`),
        el('span', { class: 'grow' }),
        Object.keys(s.labels || {}).length ? el('span', null, 'workers with ', tags(s.labels)) : null,
        el('a', { href: tasksHash(Object.assign(emptyFilter(), { swarm: s.name }), null) }, 'tasks'));
    }
    const body = card.lastChild;
    const layout = s.layout;
    const key = [s.problem, layout, s.stage_tasks];
    if (!changed(body, key)) return;
    if (!layout) {
      body.append(el('p', { class: 'problem', testid: 'swarm-problem' },
        s.problem ? `No layout: ${s.problem}` : 'No layout (no matching worker is connected).'));
      return;
    }
    const loads = new Map((layout.workers || []).map((w) => [w.id, w.load]));
    const chip = (id) => workerChip(id, loads.get(id), !loads.get(id));
    const lay = layout.layout || {};
    if (lay.topology === 'hierarchical') body.append(drawTree(lay, layout, chip));
    else if (lay.topology === 'mesh') {
      body.append(drawMesh(s.name, lay, loads));
      // Steals still being shown survive a redraw.
      for (const st of SW.steals.get(s.name) || []) if (Date.now() - st.at < STEAL_SHOW_MS) drawSteal(s.name, st);
    }
    else if (lay.topology === 'ring') body.append(drawRing(s, lay, chip));
    else {
      const ids = (layout.workers || []).map((w) => w.id);
      body.append(el('ul', { class: 'tree', role: 'tree', 'aria-label': `${s.name}: the coordinator and its workers` },
        el('li', { role: 'treeitem', 'aria-expanded': 'true' }, el('span', { class: 'coord' }, 'coordinator'),
          el('span', { class: 'role' }, `${ids.length} worker${ids.length === 1 ? '' : 's'}, each connected directly`),
          el('div', { class: 'members' }, ids.map(chip)))));
    }
  }

  function drawTree(lay, layout, chip) {
    const leads = lay.leads || [];
    const members = leads.reduce((a, l) => a + (l.children || []).length, 0);
    return el('ul', { class: 'tree', role: 'tree', testid: 'hier-tree', 'aria-label': 'The coordinator, its leads and their members' },
      el('li', { role: 'treeitem', 'aria-expanded': 'true' },
        el('span', { class: 'coord' }, 'coordinator'),
        el('span', { class: 'role' }, `${leads.length} lead${leads.length === 1 ? '' : 's'} connected directly, ${members} member${members === 1 ? '' : 's'} relayed by them`),
        el('ul', { role: 'group' }, leads.map((l) => el('li', { role: 'treeitem', 'aria-expanded': 'true', testid: 'hier-lead', 'data-worker-id': l.id },
          chip(l.id), el('span', { class: 'role' }, `lead · relays ${(l.children || []).length}`),
          (l.children || []).length ? el('ul', { role: 'group' }, l.children.map((c) => el('li', { role: 'treeitem', testid: 'hier-member', 'data-worker-id': c }, chip(c), el('span', { class: 'role' }, `via ${l.id}`)))) : null)))));
  }

  function drawMesh(name, lay, loads) {
    const peers = lay.peers || [];
    const n = peers.length;
    const W = 420;
    const H = n > 8 ? 380 : 300;
    const R = Math.min(W, H) / 2 - 34;
    const pos = new Map();
    peers.forEach((p, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, n);
      pos.set(p.id, { x: W / 2 + R * Math.cos(a), y: H / 2 + R * Math.sin(a) });
    });
    const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'group', 'aria-label': `Mesh of ${n} workers, ${lay.links} links${lay.connected ? '' : ', not connected'}`, 'data-testid': 'mesh-graph', 'data-swarm': name });
    const defs = svg('defs');
    const marker = svg('marker', { id: 'steal-arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse' });
    marker.append(svg('path', { d: 'M0,0 L10,5 L0,10 z' }));
    defs.append(marker);
    g.append(defs);
    const links = svg('g', { class: 'links' });
    const seen = new Set();
    for (const p of peers) for (const q of p.peers || []) {
      const k = p.id < q ? `${p.id}\n${q}` : `${q}\n${p.id}`;
      if (seen.has(k) || !pos.has(q)) continue;
      seen.add(k);
      const a = pos.get(p.id);
      const b = pos.get(q);
      links.append(svg('line', { class: 'link', x1: a.x.toFixed(1), y1: a.y.toFixed(1), x2: b.x.toFixed(1), y2: b.y.toFixed(1), 'data-testid': 'mesh-link' }));
    }
    g.append(links);
    g.append(svg('g', { class: 'steal-layer' }));
    for (const p of peers) {
      const { x, y } = pos.get(p.id);
      const load = loads.get(p.id);
      const frac = load && load.slots ? Math.min(1, load.running / load.slots) : 0;
      const node = svg('g', { class: 'node', tabindex: 0, role: 'img', 'data-testid': 'mesh-node', 'data-worker-id': p.id });
      const title = svg('title');
      title.textContent = `${p.id}: ${load ? `${load.running} of ${load.slots} slots held` : 'not connected'}; ${p.degree} peer${p.degree === 1 ? '' : 's'} (${(p.peers || []).join(', ')})`;
      node.setAttribute('aria-label', title.textContent);
      node.append(title, svg('circle', { cx: x.toFixed(1), cy: y.toFixed(1), r: 20 }));
      if (frac > 0) node.append(svg('circle', { class: 'fill', cx: x.toFixed(1), cy: y.toFixed(1), r: (4 + 14 * frac).toFixed(1) }));
      const label = svg('text', { x: x.toFixed(1), y: (y + (y < H / 2 ? -26 : 34)).toFixed(1) });
      label.textContent = p.id.length > 14 ? `…${p.id.slice(-13)}` : p.id;
      node.append(label);
      g.append(node);
    }
    const side = el('div', null,
      el('h3', { class: 'small' }, 'Steals ', el('span', { class: 'count', testid: 'steal-count' }, `(${fmtNum(SW.stealCount.get(name) || 0)} seen)`)),
      el('ul', { class: 'steals', testid: 'mesh-steals', 'aria-live': 'polite' }),
      el('p', { class: 'muted small' }, 'An idle member takes attempts queued on a busy peer; each steal is drawn as an arrow from the peer it was taken from.'));
    const wrap = el('div', { class: 'mesh', 'data-swarm': name }, el('div', null, g), side);
    wrap._pos = pos;
    fillSteals(name, side.querySelector('.steals'));
    return wrap;
  }

  function fillSteals(name, ul) {
    clear(ul);
    const l = SW.steals.get(name) || [];
    if (!l.length) ul.append(el('li', { class: 'muted' }, 'none yet'));
    for (const s of l) {
      ul.append(el('li', { testid: 'mesh-steal' }, el('a', { href: `#/tasks/${s.id}` }, `#${s.id}`), ` ${s.from} → ${s.to} `, el('span', { class: 'muted' }, fmtTime(s.at))));
    }
  }

  function drawSteal(name, s) {
    const wrap = document.querySelector(`.mesh[data-swarm="${CSS.escape(name)}"]`);
    if (!wrap) return;
    fillSteals(name, wrap.querySelector('.steals'));
    const count = wrap.querySelector('[data-testid=steal-count]');
    if (count) count.textContent = `(${fmtNum(SW.stealCount.get(name) || 0)} seen)`;
    const a = wrap._pos && wrap._pos.get(s.from);
    const b = wrap._pos && wrap._pos.get(s.to);
    if (!a || !b) return;
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    const k = 22 / len;
    const line = svg('line', {
      class: 'steal', 'data-testid': 'mesh-steal-arrow',
      x1: (a.x + dx * k).toFixed(1), y1: (a.y + dy * k).toFixed(1), x2: (b.x - dx * k).toFixed(1), y2: (b.y - dy * k).toFixed(1),
    });
    wrap.querySelector('.steal-layer').append(line);
    setTimeout(() => line.remove(), STEAL_SHOW_MS);
  }

  function drawRing(s, lay, chip) {
    const stages = lay.stages || [];
    const counts = s.stage_tasks || [];
    const ring = el('ol', { class: 'ring', testid: 'ring-pipeline', 'aria-label': `Pipeline of ${stages.length} stages` });
    stages.forEach((st, i) => {
      const c = counts[i] || {};
      if (i > 0) ring.append(el('li', { class: 'arrow', 'aria-hidden': 'true' }, '→'));
      ring.append(el('li', { class: 'stage', testid: 'ring-stage', 'data-stage': i },
        el('h3', null, el('span', { class: 'num' }, `${i + 1}.`), st.agent),
        Object.keys(st.labels || {}).length ? el('div', null, tags(st.labels)) : null,
        el('div', null, chip(st.worker)),
        el('div', { class: 'muted small', testid: 'ring-stage-counts' }, `${fmtNum(c.queued || 0)} queued · ${fmtNum(c.running || 0)} running`),
        el('div', { class: 'tasks-at', testid: 'ring-stage-tasks', 'aria-label': `Tasks at stage ${i + 1}` })));
    });
    ring.append(el('li', { class: 'ring-done', 'aria-hidden': 'true' }, '→ done'));
    return ring;
  }

  // Which task is at which ring stage: from the tasks read and the changes since.
  function renderSwarmTasks() {
    if (S.view !== 'swarms') return;
    for (const ring of document.querySelectorAll('[data-testid=ring-pipeline]')) {
      const name = ring.closest('[data-swarm]').dataset.swarm;
      const m = SW.tasks.get(name) || new Map();
      const by = new Map();
      for (const [id, t] of m) {
        if (!by.has(t.stage)) by.set(t.stage, []);
        by.get(t.stage).push([id, t]);
      }
      for (const box of ring.querySelectorAll('[data-testid=ring-stage-tasks]')) {
        const stage = Number(box.closest('[data-stage]').dataset.stage);
        const list = (by.get(stage) || []).sort((a, b) => a[0] - b[0]);
        const shown = list.map(([id, t]) => [id, t.state]);
        if (!changed(box, shown)) continue;
        for (const [id, t] of list.slice(0, 12)) {
          box.append(el('a', { href: `#/tasks/${id}`, class: `badge st-${t.state}`, testid: 'ring-task', 'data-task-id': id, title: `task #${id}, ${t.state}${t.worker ? ` on ${t.worker}` : ''}` }, `#${id}`));
        }
        if (list.length > 12) box.append(el('span', { class: 'muted small' }, `+${list.length - 12} more`));
      }
    }
  }

  // ---------------------------------------------------------------- memory view
  // Read when opened and on Refresh (memory changes are not in the event stream).
  const PATTERNS_SHOWN = 200;

  function showMemory() {
    showOnly('memory');
    document.title = 'Memory · swarm';
    loadMemory();
  }

  async function loadMemory() {
    const [cols, pats] = await Promise.allSettled([
      api('GET', '/v1/memory'),
      api('GET', `/v1/patterns?limit=${PATTERNS_SHOWN}`),
    ]);
    const tb = $('collections');
    clear(tb);
    if (cols.status === 'fulfilled') {
      const list = (cols.value && cols.value.collections) || [];
      $('collections-count').textContent = `(${list.length})`;
      $('collections-empty').hidden = list.length > 0;
      const sel = $('search-collection');
      const was = sel.value;
      clear(sel);
      for (const c of list) {
        const sp = c.spec || {};
        tb.append(el('tr', { testid: 'collection-row', 'data-collection': c.name },
          el('td', { class: 'mono' }, c.name),
          el('td', null, String(sp.dimension)),
          el('td', null, String(sp.metric || '')),
          el('td', null, fmtNum(c.live)),
          el('td', { class: 'hide-narrow' }, fmtNum(c.tombstones)),
          el('td', { class: 'hide-narrow' }, c.rebuilding ? 'rebuilding' : c.unindexed ? `${fmtNum(c.unindexed)} unindexed` : `generation ${c.generation}`)));
        sel.append(el('option', { value: c.name }, c.name));
      }
      if (list.some((c) => c.name === was)) sel.value = was;
      $('search-form').hidden = list.length === 0;
    } else {
      $('collections-count').textContent = '';
      tb.append(el('tr', null, el('td', { colspan: 6, class: 'error' }, `Could not read collections: ${cols.reason.message}`)));
    }
    const pb = $('patterns');
    clear(pb);
    if (pats.status === 'fulfilled') {
      const list = ((pats.value && pats.value.patterns) || []).slice()
        .sort((a, b) => b.confidence - a.confidence || b.use_count - a.use_count);
      const total = pats.value && pats.value.total != null ? pats.value.total : list.length;
      $('patterns-count').textContent = total > list.length ? `(${fmtNum(list.length)} of ${fmtNum(total)})` : `(${fmtNum(list.length)})`;
      $('patterns-empty').hidden = list.length > 0;
      for (const p of list.slice(0, PATTERNS_SHOWN)) {
        pb.append(el('tr', { testid: 'pattern-row', 'data-pattern-id': p.id },
          el('td', { class: 'wrap' }, el('strong', null, p.title), el('div', { class: 'muted small' }, p.description)),
          el('td', null, badge(p.outcome, p.outcome === 'success' ? 'succeeded' : 'failed'),
            p.source_task != null ? el('div', null, el('a', { href: `#/tasks/${p.source_task}` }, `task #${p.source_task}`)) : null),
          el('td', { testid: 'pattern-confidence' }, `${Math.round((p.confidence || 0) * 100)}%`),
          el('td', null, fmtNum(p.use_count)),
          el('td', { class: 'hide-narrow' }, `${fmtNum(p.success_count)} / ${fmtNum(p.failure_count)}`),
          el('td', { class: 'hide-narrow' }, fmtTime(p.last_used_ms))));
      }
    } else {
      $('patterns-count').textContent = '';
      pb.append(el('tr', null, el('td', { colspan: 6, class: 'error' }, `Could not read patterns: ${pats.reason.message}`)));
    }
  }

  async function onSearch(ev) {
    ev.preventDefault();
    const name = $('search-collection').value;
    const text = $('search-text').value.trim();
    const k = Math.max(1, Math.min(100, Number($('search-k').value) || 10));
    const status = $('search-status');
    const tb = $('search-hits');
    if (!name || !text) { status.textContent = 'Choose a collection and type a query.'; return; }
    status.textContent = 'searching…';
    status.className = 'result';
    try {
      const started = performance.now();
      const r = await api('POST', `/v1/memory/${encodeURIComponent(name)}/search`, { text, k });
      const hits = (r && r.hits) || [];
      clear(tb);
      for (const h of hits) {
        tb.append(el('tr', { testid: 'search-hit' },
          el('td', { class: 'mono' }, h.id),
          el('td', null, Number(h.distance).toFixed(4)),
          el('td', { class: 'wrap mono small' }, h.metadata == null ? '–' : JSON.stringify(h.metadata))));
      }
      $('search-table').hidden = hits.length === 0;
      status.textContent = `${hits.length} nearest point${hits.length === 1 ? '' : 's'} in ${name} (${Math.round(performance.now() - started)} ms)`;
    } catch (e) {
      $('search-table').hidden = true;
      status.textContent = `Search refused: ${e.message}`;
      status.className = 'result error';
    }
  }

  async function onRetrieve(ev) {
    ev.preventDefault();
    const query = $('retrieve-text').value.trim();
    const k = Math.max(1, Math.min(50, Number($('retrieve-k').value) || 5));
    const status = $('retrieve-status');
    const ol = $('retrieve-hits');
    if (!query) { status.textContent = 'Describe a task.'; return; }
    status.textContent = 'retrieving…';
    status.className = 'result';
    try {
      const r = await api('POST', '/v1/patterns/retrieve', { query, k });
      const items = (r && r.items) || [];
      clear(ol);
      for (const it of items) {
        const p = it.item || {};
        ol.append(el('li', { testid: 'retrieve-hit', 'data-pattern-id': p.id },
          el('strong', null, p.title), ' ', badge(p.outcome, p.outcome === 'success' ? 'succeeded' : 'failed'),
          el('div', { class: 'meta' }, `similarity ${Number(it.similarity).toFixed(3)} · confidence ${Math.round((p.confidence || 0) * 100)}% · score ${Number(it.score).toFixed(3)} · used ${fmtNum(p.use_count)}×`),
          el('div', null, p.description),
          p.content ? el('div', { class: 'muted small' }, p.content.length > 400 ? `${p.content.slice(0, 400)}…` : p.content) : null));
      }
      status.textContent = items.length ? `${items.length} pattern${items.length === 1 ? '' : 's'} an agent would be handed for this` : 'No pattern fits.';
    } catch (e) {
      clear(ol);
      status.textContent = `Retrieve refused: ${e.message}`;
      status.className = 'result error';
    }
  }

  // ---------------------------------------------------------------- limits view
  // GET /v1/limits when the view opens, and again as the event stream says tasks
  // started, finished or queued (task changes and status changes), at most once a
  // second and one read at a time: limits are not in the stream themselves.
  const LIMIT_KEYS_SHOWN = 24;
  const LV = { loading: false, again: false, timer: null, last: 0, list: null, error: null, seq: 0, armed: null };

  function showLimits() {
    showOnly('limits');
    document.title = 'Limits · swarm';
    renderLimits();
    loadLimits();
  }

  // A read soon, if the view is shown: from the cluster's events.
  function scheduleLimitsRefresh() {
    if (S.view !== 'limits' || LV.timer) return;
    const wait = Math.max(200, LV.last + 1000 - Date.now());
    LV.timer = setTimeout(() => { LV.timer = null; loadLimits(); }, wait);
  }

  async function loadLimits() {
    if (LV.loading) { LV.again = true; return; }
    LV.loading = true;
    LV.last = Date.now();
    const seq = ++LV.seq;
    try {
      const r = await api('GET', '/v1/limits');
      if (seq === LV.seq) {
        LV.list = (r && Array.isArray(r.limits)) ? r.limits : [];
        LV.error = null;
      }
    } catch (e) {
      if (seq === LV.seq) LV.error = e.status === 403 ? `This token may not read limits (403 forbidden): ${e.message}` : `Could not load limits: ${e.message}`;
    } finally {
      LV.loading = false;
    }
    if (S.view === 'limits') renderLimits();
    if (LV.again) { LV.again = false; scheduleLimitsRefresh(); }
  }

  // `60/min, burst 10`: the server's rate as it prints it, with the bucket's size.
  function fmtLimitRate(l) {
    if (!l.rate) return '–';
    const m = /^(\d+)\/(\d+)ms$/.exec(l.rate);
    const rate = m ? `${fmtNum(Number(m[1]))} per ${fmtDur(Number(m[2]))}` : l.rate;
    return `${rate}, burst ${l.burst == null ? 1 : l.burst}`;
  }

  function renderLimits() {
    const err = $('limits-error');
    err.textContent = LV.error || '';
    err.hidden = !LV.error;
    const list = LV.list;
    $('limits-empty').hidden = !(list && list.length === 0);
    $('limits-count').textContent = list ? `(${fmtNum(list.length)})` : '';
    const tb = $('limits');
    if (!list) return;
    const armed = LV.armed && LV.armed.until > Date.now() ? LV.armed.name : null;
    if (!changed(tb, [S.canOperate, armed, list])) return;
    for (const l of list) {
      const keys = Object.entries(l.running || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
      const total = keys.reduce((a, [, n]) => a + n, 0);
      const keyCell = keys.length
        ? [el('div', { class: 'muted small', testid: 'limit-running' }, `${fmtNum(total)} running in ${fmtNum(keys.length)} key${keys.length === 1 ? '' : 's'}`),
          ...keys.slice(0, LIMIT_KEYS_SHOWN).map(([k, n]) => el('span', { class: 'tag', testid: 'limit-key', 'data-key': k, 'data-running': n, title: `${n} running under key ${k}` }, `${k} ×${n}`)),
          keys.length > LIMIT_KEYS_SHOWN ? el('span', { class: 'muted small' }, `+${fmtNum(keys.length - LIMIT_KEYS_SHOWN)} more keys`) : null]
        : (l.concurrency != null ? 'none running' : '–');
      tb.append(el('tr', { testid: 'limit-row', 'data-limit': l.name },
        el('td', { class: 'mono' }, l.name),
        el('td', { testid: 'limit-concurrency' }, l.concurrency != null ? `${fmtNum(l.concurrency)} per key` : '–'),
        el('td', { testid: 'limit-rate' }, fmtLimitRate(l)),
        el('td', { class: 'wrap', testid: 'limit-keys' }, keyCell),
        el('td', { testid: 'limit-queued' }, fmtNum(l.queued || 0)),
        S.canOperate ? el('td', null,
          el('button', { type: 'button', class: 'btn', testid: 'limit-edit', 'aria-label': `Edit limit ${l.name}`, onclick: () => editLimit(l) }, 'Edit'), ' ',
          el('button', { type: 'button', class: 'btn btn-danger', testid: 'limit-delete', 'aria-label': `Delete limit ${l.name}`, onclick: (e) => onDeleteLimit(l.name, e.currentTarget) },
            armed === l.name ? `Confirm: delete ${l.name}` : 'Delete')) : null));
    }
  }

  function editLimit(l) {
    $('limit-name').value = l.name;
    $('limit-concurrency').value = l.concurrency != null ? String(l.concurrency) : '';
    $('limit-rate').value = l.rate || '';
    $('limit-burst').value = l.rate && l.burst != null ? String(l.burst) : '';
    clear($('limit-result'));
    $('limit-form').scrollIntoView({ block: 'nearest' });
    $('limit-name').focus();
  }

  function limitRefused(verb, e) {
    if (e.status !== 403) return false;
    S.canOperate = false;
    applyCaps();
    notice(`This token may not ${verb} limits (403 forbidden): ${e.message}`);
    return true;
  }

  // Create or replace: PUT /v1/limits/{name}; the server judges the definition and its
  // refusal (400) is shown as it says it.
  async function onSaveLimit(ev) {
    ev.preventDefault();
    const out = $('limit-result');
    out.className = 'result';
    out.textContent = '';
    const name = $('limit-name').value.trim();
    if (!name) {
      out.textContent = 'Name the limit.';
      out.className = 'result error';
      $('limit-name').focus();
      return;
    }
    const body = {};
    const num = (id) => {
      const input = $(id);
      if (input.value.trim() === '') return input.validity && input.validity.badInput ? NaN : undefined;
      return Number(input.value);
    };
    const conc = num('limit-concurrency');
    const burst = num('limit-burst');
    const rate = $('limit-rate').value.trim();
    if (Number.isNaN(conc) || Number.isNaN(burst)) {
      out.textContent = 'Concurrency and burst are whole numbers.';
      out.className = 'result error';
      return;
    }
    if (conc !== undefined) body.concurrency = conc;
    if (rate) body.rate = rate;
    if (burst !== undefined) body.burst = burst;
    const btn = $('limit-save');
    btn.disabled = true;
    try {
      const v = await api('PUT', `/v1/limits/${encodeURIComponent(name)}`, body);
      const what = [v && v.concurrency != null ? `${v.concurrency} per key` : null, v && v.rate ? fmtLimitRate(v) : null].filter(Boolean).join('; ');
      out.textContent = `Saved limit ${name}${what ? `: ${what}` : ''}.`;
      for (const id of ['limit-name', 'limit-concurrency', 'limit-rate', 'limit-burst']) $(id).value = '';
      loadLimits();
    } catch (e) {
      if (!limitRefused('set', e)) {
        out.textContent = `Refused: ${e.message}`;
        out.className = 'result error';
      }
    } finally {
      btn.disabled = false;
    }
  }

  // Delete asks for a second click, like Cancel task; the armed button survives the
  // table being redrawn meanwhile.
  async function onDeleteLimit(name, b) {
    if (!(LV.armed && LV.armed.name === name && LV.armed.until > Date.now())) {
      LV.armed = { name, until: Date.now() + 4000 };
      b.textContent = `Confirm: delete ${name}`;
      setTimeout(() => { if (LV.armed && LV.armed.until <= Date.now()) { LV.armed = null; renderLimits(); } }, 4100);
      return;
    }
    LV.armed = null;
    b.disabled = true;
    try {
      await api('DELETE', `/v1/limits/${encodeURIComponent(name)}`);
      notice(`Limit ${name} deleted: tasks naming it are no longer held by it.`, 6000);
    } catch (e) {
      if (!limitRefused('delete', e)) notice(`Could not delete limit ${name}: ${e.message}`, 8000);
    } finally {
      b.disabled = false;
      b.textContent = 'Delete';
    }
    loadLimits();
  }

  // ---------------------------------------------------------------- workers: drain
  async function onWorkerAction(id, action) {
    try {
      await api('POST', `/v1/workers/${encodeURIComponent(id)}/${action}`);
      notice(action === 'drain'
        ? `Worker ${id} is draining: it finishes what it runs and takes no new work.`
        : `Worker ${id} takes work again.`, 6000);
    } catch (e) {
      if (e.status === 403) {
        S.canOperate = false;
        applyCaps();
        notice(`This token may not ${action} workers (403 forbidden): ${e.message}`);
      } else notice(`Could not ${action} worker ${id}: ${e.message}`, 8000);
    }
  }

  // ---------------------------------------------------------------- theme and keys
  const THEMES = ['auto', 'light', 'dark'];
  function applyTheme(t) {
    if (t === 'light' || t === 'dark') document.documentElement.dataset.theme = t;
    else delete document.documentElement.dataset.theme;
    const b = $('theme');
    b.textContent = `Theme: ${t}`;
    b.setAttribute('aria-label', t === 'auto' ? 'Colour theme: follows the system. Change' : `Colour theme: ${t}. Change`);
  }
  function cycleTheme() {
    let t = 'auto';
    try { t = localStorage.getItem('swarm.theme') || 'auto'; } catch (_) { /* storage off */ }
    t = THEMES[(THEMES.indexOf(t) + 1) % THEMES.length];
    try { localStorage.setItem('swarm.theme', t); } catch (_) { /* storage off */ }
    applyTheme(t);
  }

  // `/` filters tasks; `g` then `o`, `t`, `s`, `m` or `l` opens a view.
  let goPending = 0;
  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey || !S.token) return;
    const tag = (e.target && e.target.tagName) || '';
    if (/^(INPUT|TEXTAREA|SELECT)$/.test(tag) || (e.target && e.target.isContentEditable)) return;
    if (e.key === '/') {
      e.preventDefault();
      if (S.view !== 'tasks') location.hash = '#/tasks';
      setTimeout(() => $('filter-text').focus(), 0);
      return;
    }
    if (e.key === 'g') { goPending = Date.now(); return; }
    if (goPending && Date.now() - goPending < 1500) {
      const to = { o: '#/', t: '#/tasks', s: '#/swarms', m: '#/memory', l: '#/limits' }[e.key];
      goPending = 0;
      if (to) { e.preventDefault(); location.hash = to; }
    }
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
    row('Swarm', t.swarm && t.swarm !== 'default' ? el('a', { href: '#/swarms' }, t.swarm) : 'default');
    if (t.stages && t.stages.length) row('Stages', `${t.stages.join(' → ')} (at stage ${(t.stage || 0) + 1})`);
    row('Priority', String(t.priority));
    row('Created', fmtTime(t.created_at_ms));
    if (t.finished_at_ms) row('Finished', `${fmtTime(t.finished_at_ms)} (${fmtDur(t.finished_at_ms - t.created_at_ms)} after submit)`);
    row('Timeout', fmtDur(t.timeout_ms));
    row('Max attempts', String(t.max_attempts));
    if (t.idempotency_key) row('Idempotency key', t.idempotency_key);
    if (t.labels && Object.keys(t.labels).length) row('Labels', el('span', null, tags(t.labels)));
    if (t.moves) row('Moves', `${t.moves} (mesh steals)`);
    // Graph: the tasks this one runs after and those that run after it, as links.
    const links = (ids) => el('span', null, ...ids.flatMap((id, i) => [i ? ', ' : null, el('a', { href: `#/tasks/${id}` }, `#${id}`)]));
    if (t.step) row('Step', t.step, 'detail-step');
    if (t.parents && t.parents.length) {
      row('Runs after', links(t.parents), 'detail-parents');
      if (t.waiting_on) row('Waiting on', `${t.waiting_on} of ${t.parents.length} parent${t.parents.length === 1 ? '' : 's'} to succeed`);
    }
    if (t.children && t.children.length) row('Runs before', links(t.children), 'detail-children');
    if (t.patterns) row('Patterns', `up to ${t.patterns} ReasoningBank pattern${t.patterns === 1 ? '' : 's'} handed to the agent before it ran`, 'detail-patterns');
    if (t.usage) row('Tokens', `${fmtNum(t.usage.prompt_tokens)} prompt + ${fmtNum(t.usage.completion_tokens)} completion (${t.usage.model})`);
    if (t.held) row('Held', t.held);
    if (t.concurrency_key) row('Concurrency key', el('a', { href: '#/limits', title: 'The limits view' }, t.concurrency_key), 'detail-concurrency-key');
    if (t.rate_limit) row('Rate limit', el('a', { href: '#/limits', title: 'The limits view' }, t.rate_limit), 'detail-rate-limit');
    if (t.approval) {
      const a = t.approval;
      const d = a.decision;
      const deadline = a.deadline_ms ? `fails unless decided by ${fmtTime(a.deadline_ms)}`
        : a.timeout_ms ? `may await a decision for ${fmtDur(a.timeout_ms)}` : 'no deadline';
      row('Approval', d
        ? `${d.approved ? 'approved' : 'rejected'} by ${d.by} at ${fmtTime(d.at_ms)}${d.comment ? `: ${d.comment}` : ''}`
        : `required (${deadline})`, 'detail-approval');
    }
    if (t.callback) {
      const c = t.callback;
      const ended = c.state === 'pending' ? 'pending'
        : `${c.state} after ${c.attempts} attempt${c.attempts === 1 ? '' : 's'}${c.status ? ` (HTTP ${c.status})` : ''} at ${fmtTime(c.at_ms)}${c.error ? `: ${c.error}` : ''}`;
      row('Callback', el('span', null, el('span', { class: 'mono' }, c.url), ` — ${ended}`), 'detail-callback');
    }
    if (t.expires_at_ms) row('Expires', fmtTime(t.expires_at_ms));
    if (t.error) row('Error', el('span', { class: 'mono' }, t.error), 'detail-error');

    const ol = $('attempts');
    clear(ol);
    const atts = t.attempts || [];
    $('attempts-empty').hidden = atts.length > 0;
    for (const a of atts) {
      const outcome = a.outcome || 'running';
      const when = a.finished_at_ms
        ? `${fmtTime(a.started_at_ms)} → ${fmtTime(a.finished_at_ms)} (${fmtDur(Math.max(0, a.finished_at_ms - a.started_at_ms))})`
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
    $('retry').hidden = !(S.canOperate && t && RETRYABLE.has(t.state) && S.view === 'task');
    const awaiting = S.canOperate && t && t.state === 'awaiting_approval' && S.view === 'task';
    const box = $('approval-box');
    if (box.hidden === awaiting) $('approval-comment').value = '';
    box.hidden = !awaiting;
    if (awaiting) {
      const a = t.approval || {};
      $('approval-deadline').textContent = a.deadline_ms
        ? `Fails with approval_timeout unless approved by ${fmtTime(a.deadline_ms)}.`
        : 'No deadline: the task waits until someone decides.';
    }
    const f = TV.f;
    $('retry-matching').hidden = !(S.canOperate && f && RETRYABLE.has(f.state) && S.view === 'tasks');
  }

  // Redrive: a failed or dead-lettered task runs again (new attempts, history kept).
  async function onRetry() {
    const t = TP.task;
    if (!t) return;
    const b = $('retry');
    b.disabled = true;
    try {
      const v = await api('POST', `/v1/tasks/${t.id}/retry`);
      if (TP.id === t.id && v && v.id != null) {
        renderTask(v);
        if (!TP.stream) {
          // The new stream replays the stored output from the first attempt on.
          clear($('live'));
          delete $('live').dataset.ended;
          TP.chars = 0;
          TP.attempt = null;
          followTask(t.id);
        }
      }
      notice(`Task #${t.id} is queued again.`, 5000);
    } catch (e) {
      if (!refused('retry', e)) notice(`Could not retry task #${t.id}: ${e.message}`, 8000);
    } finally {
      b.disabled = false;
    }
  }

  // Every task the filter selects, a page (up to 1000, oldest first) per click.
  async function onRetryMatching() {
    const f = TV.f;
    if (!f || !RETRYABLE.has(f.state)) return;
    const body = { state: f.state, limit: 1000 };
    for (const k of ['agent', 'swarm', 'label', 'text']) if (f[k]) body[k] = f[k];
    const b = $('retry-matching');
    b.disabled = true;
    try {
      const r = await api('POST', '/v1/tasks/retry', body);
      const n = (r.retried || []).length;
      notice(`${fmtNum(n)} task${n === 1 ? '' : 's'} queued again${r.next_after != null ? '; more may match: click again' : ''}.`, 8000);
      loadTasks(TV.f, TV.after);
    } catch (e) {
      if (!refused('retry', e)) notice(`Could not retry: ${e.message}`, 8000);
    } finally {
      b.disabled = false;
    }
  }

  // Approvals: queue (approve) or cancel (reject) a task awaiting approval, with the
  // comment typed; the token's name is recorded as who decided.
  async function onDecide(approve) {
    const t = TP.task;
    if (!t) return;
    const verb = approve ? 'approve' : 'reject';
    const comment = $('approval-comment').value.trim();
    const body = comment ? { comment } : {};
    for (const id of ['approve', 'reject']) $(id).disabled = true;
    try {
      const v = await api('POST', `/v1/tasks/${t.id}/${verb}`, body);
      if (TP.id === t.id && v && v.id != null) renderTask(v);
      notice(`Task #${t.id} ${approve ? 'approved: it is queued' : 'rejected: it is cancelled'}.`, 5000);
    } catch (e) {
      if (!refused(verb, e)) notice(`Could not ${verb} task #${t.id}: ${e.message}`, 8000);
    } finally {
      for (const id of ['approve', 'reject']) $(id).disabled = false;
    }
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
    } else if (path === '/swarms') {
      showSwarms();
    } else if (path === '/memory') {
      showMemory();
    } else if (path === '/limits') {
      showLimits();
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
    $('retry').addEventListener('click', onRetry);
    $('approval-box').addEventListener('submit', (e) => { e.preventDefault(); onDecide(true); });
    $('reject').addEventListener('click', () => onDecide(false));
    $('retry-matching').addEventListener('click', onRetryMatching);
    $('tasks-filters').addEventListener('submit', applyFilters);
    $('tasks-filter').addEventListener('change', () => applyFilters());
    $('filter-clear').addEventListener('click', () => {
      for (const k of ['agent', 'swarm', 'label', 'text']) $(`filter-${k}`).value = '';
      $('tasks-filter').value = '';
      applyFilters();
    });
    $('page-next').addEventListener('click', () => { if (TV.nextAfter != null) pageTo(TV.f, TV.nextAfter, true); });
    $('page-prev').addEventListener('click', () => pageTo(TV.f, TV.stack.length ? TV.stack.pop() : null, false));
    $('page-newest').addEventListener('click', () => { TV.stack = []; pageTo(TV.f, null, false); });
    $('search-form').addEventListener('submit', onSearch);
    $('retrieve-form').addEventListener('submit', onRetrieve);
    $('memory-refresh').addEventListener('click', loadMemory);
    $('limits-refresh').addEventListener('click', loadLimits);
    $('limit-form').addEventListener('submit', onSaveLimit);
    $('theme').addEventListener('click', cycleTheme);
    document.addEventListener('keydown', onKey);
    let theme = 'auto';
    try { theme = localStorage.getItem('swarm.theme') || 'auto'; } catch (_) { /* storage off */ }
    applyTheme(THEMES.includes(theme) ? theme : 'auto');
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
