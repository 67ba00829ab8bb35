/* s3spot dashboard front-end.
 *
 * Plain ES2020, no dependencies, no inline anything: the page is served with a
 * strict Content-Security-Policy. Every piece of data from the API (bucket and
 * key names in particular, which whoever can upload to the bucket controls) is
 * put into the page with textContent / setAttribute only, never innerHTML.
 */
(function () {
  'use strict';

  const TOKEN = new URLSearchParams(location.search).get('token') || '';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const DEFAULT_REFRESH_SECS = 3;
  // The chart reads every job's status.json of the last 30 days: a few times an hour, not at
  // every refresh, since each read is an S3 request.
  const CHART_EVERY_MS = 5 * 60 * 1000;
  const REQUEST_TIMEOUT_MS = 30000;
  const MAX_MESSAGE_CHARS = 4000;
  const ACTIVE_EC2 = new Set(['pending', 'running']);
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

  const state = {
    info: null,
    refreshSecs: DEFAULT_REFRESH_SECS,
    jobs: null,
    selected: null, // {bucket, key, target}
    detail: null,
    cost: null,
    chartLoadedAt: 0,
    paused: false,
    actionBusy: false,
    timer: null,
    message: null, // {text, kind, source}
    lastUpdated: null,
    refreshFailed: false,
  };

  // ---------------------------------------------------------------- helpers

  function $(sel) { return document.querySelector(sel); }

  function el(tag, opts, children) {
    const node = document.createElement(tag);
    if (opts) {
      if (opts.cls) node.className = opts.cls;
      if (opts.text != null) node.textContent = String(opts.text);
      if (opts.title != null) node.title = String(opts.title);
      if (opts.attrs) for (const [k, v] of Object.entries(opts.attrs)) node.setAttribute(k, String(v));
    }
    if (children) for (const c of children) if (c != null) node.append(c);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text != null) node.textContent = String(text);
    return node;
  }

  function svgTitle(parent, text) {
    parent.append(svg('title', null, text));
    return parent;
  }

  function pad2(n) { return String(n).padStart(2, '0'); }

  function clock(d) {
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }

  function isNum(v) { return typeof v === 'number' && Number.isFinite(v); }

  /** "4m 12s", "2h 05m", "3d 4h". */
  function humanDuration(secs) {
    if (!isNum(secs) || secs < 0) return '—';
    const s = Math.floor(secs);
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + pad2(s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + pad2(Math.floor((s % 3600) / 60)) + 'm';
    return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
  }

  /** "$0.0031", "$0.12", "$12.34"; "—" when unknown. */
  function usd(v) {
    if (!isNum(v)) return '—';
    const a = Math.abs(v);
    if (a === 0) return '$0.00';
    if (a < 0.01) return '$' + v.toFixed(4);
    if (a < 1) return '$' + v.toFixed(a < 0.1 ? 4 : 3);
    return '$' + v.toFixed(2);
  }

  /** Local "YYYY-MM-DD HH:MM:SS" for unix seconds or a date string; raw text if unparseable. */
  function when(v) {
    if (v == null || v === '') return '—';
    const d = isNum(v) ? new Date(v * 1000) : new Date(String(v));
    if (Number.isNaN(d.getTime())) return String(v);
    return d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' + clock(d);
  }

  /** Short local time for something happening today, else date and time. */
  function shortWhen(v) {
    if (v == null || v === '') return '—';
    const d = isNum(v) ? new Date(v * 1000) : new Date(String(v));
    if (Number.isNaN(d.getTime())) return String(v);
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return clock(d);
    return when(v);
  }

  function plural(n, one, many) { return n + ' ' + (n === 1 ? one : (many || one + 's')); }

  function targetOf(bucket, key) { return 's3://' + bucket + '/' + key; }

  function parseTarget(t) {
    if (typeof t !== 'string' || !t.startsWith('s3://')) return null;
    const rest = t.slice(5);
    const i = rest.indexOf('/');
    if (i <= 0 || i === rest.length - 1) return null;
    return { bucket: rest.slice(0, i), key: rest.slice(i + 1), target: t };
  }

  /** The state shown for a row: its result, else waiting / running / the EC2 state. */
  function displayState(r) {
    if (!r) return 'unknown';
    if (r.result) return String(r.result);
    if (r.state === 'waiting') return 'waiting';
    if (ACTIVE_EC2.has(r.state)) return 'running';
    return r.state ? String(r.state) : 'unknown';
  }

  function stateClass(s) { return 'state-' + String(s).toLowerCase().replace(/[^a-z0-9_-]/g, ''); }

  function badge(s) {
    return el('span', { cls: 'badge ' + stateClass(s), text: String(s).replace(/_/g, ' ') });
  }

  function flag(text, cls, title) { return el('span', { cls: 'flag ' + cls, text, title }); }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, text) { super(text); this.status = status; }
  }

  function apiUrl(path, params) {
    const parts = ['token=' + encodeURIComponent(TOKEN)];
    if (params) {
      for (const [k, v] of Object.entries(params)) {
        if (v != null) parts.push(encodeURIComponent(k) + '=' + encodeURIComponent(String(v)));
      }
    }
    return 'api/' + path + '?' + parts.join('&');
  }

  async function api(path, params, init) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), REQUEST_TIMEOUT_MS);
    let res;
    let text;
    try {
      res = await fetch(apiUrl(path, params), Object.assign({
        cache: 'no-store',
        credentials: 'same-origin',
        redirect: 'error',
        signal: ctl.signal,
      }, init || {}));
      text = await res.text();
    } catch (e) {
      if (e && e.name === 'AbortError') throw new ApiError(0, 'api/' + path + ': no answer after ' + REQUEST_TIMEOUT_MS / 1000 + ' s');
      throw new ApiError(0, 'api/' + path + ': cannot reach the s3spot dashboard server (is it still running?)');
    } finally {
      clearTimeout(timer);
    }
    if (!res.ok) {
      let msg = text.trim() || res.statusText || 'request failed';
      if (msg.length > MAX_MESSAGE_CHARS) msg = msg.slice(0, MAX_MESSAGE_CHARS) + '…';
      let full = 'api/' + path + ' (HTTP ' + res.status + '): ' + msg;
      if (res.status === 401 || res.status === 403) full += '\nOpen the dashboard with the URL (including its token) that s3spot printed.';
      throw new ApiError(res.status, full);
    }
    try {
      return JSON.parse(text);
    } catch (_) {
      throw new ApiError(res.status, 'api/' + path + ': the server sent something that is not JSON');
    }
  }

  function post(path, body) {
    return api(path, null, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
  }

  /** Run fn at most once at a time. run(true) waits for a running call and then starts a new one. */
  function singleFlight(fn) {
    let inflight = null;
    let queued = null;
    function run(fresh) {
      if (!inflight) {
        inflight = Promise.resolve().then(fn).finally(() => { inflight = null; });
        return inflight;
      }
      if (!fresh) return inflight;
      if (!queued) {
        queued = inflight.catch(() => {}).then(() => { queued = null; return run(false); });
      }
      return queued;
    }
    return run;
  }

  // ---------------------------------------------------------------- message

  function showMessage(text, kind, source) {
    const cur = state.message;
    if (cur && cur.text === text && cur.kind === kind) { cur.source = source; return; }
    state.message = { text, kind, source };
    const bar = $('#message-bar');
    const p = $('#message');
    p.textContent = text;
    bar.className = 'message-bar ' + (kind || 'info');
    bar.hidden = false;
  }

  function clearMessage(source) {
    if (!state.message) return;
    if (source && state.message.source !== source) return;
    state.message = null;
    $('#message').textContent = '';
    $('#message-bar').hidden = true;
  }

  function failed(source, err) {
    showMessage(err && err.message ? err.message : String(err), 'error', source);
  }

  // ---------------------------------------------------------------- header

  function renderInfo(info) {
    const p = $('#pipeline');
    p.textContent = info.pipeline ? String(info.pipeline) : '(no pipeline name)';
    document.title = (info.pipeline ? info.pipeline + ' · ' : '') + 's3spot dashboard';
    const mode = $('#mode');
    const bits = [];
    if (info.mode) bits.push(String(info.mode));
    if (info.region) bits.push(String(info.region));
    mode.textContent = bits.join(' · ');
    mode.hidden = bits.length === 0;
    mode.className = 'chip' + (info.mode === 'local' ? ' chip-local' : '');
  }

  function renderUpdated() {
    const u = $('#updated');
    if (!state.lastUpdated) {
      u.textContent = state.refreshFailed ? 'not updated' : 'connecting…';
    } else {
      u.textContent = 'updated ' + clock(state.lastUpdated);
    }
    u.classList.toggle('stale', state.refreshFailed);
    u.title = state.refreshFailed ? 'the last refresh failed' : 'refreshes every ' + state.refreshSecs + ' s';
  }

  // ---------------------------------------------------------------- jobs table

  function rowId(r) {
    return r.instance_id ? 'i:' + r.instance_id : 'w:' + targetOf(r.bucket, r.key);
  }

  function waitingText(r) {
    const w = r.waiting;
    if (!w || typeof w !== 'object') return null;
    const bits = ['waiting: ' + (w.reason || 'no capacity yet')];
    if (isNum(w.pools_tried)) bits.push('tried ' + plural(w.pools_tried, 'pool'));
    if (w.next_try) bits.push('next try ' + shortWhen(w.next_try));
    if (w.gives_up_at) bits.push('gives up ' + shortWhen(w.gives_up_at));
    return bits.join(' · ');
  }

  function jobRow(r) {
    const ds = displayState(r);
    const target = targetOf(r.bucket, r.key);
    const tr = el('tr', { cls: 'job ' + stateClass(ds) });
    tr.dataset.key = String(r.key);
    tr.dataset.bucket = String(r.bucket);
    tr.dataset.rowId = rowId(r);
    tr.tabIndex = 0;
    if (state.selected && state.selected.bucket === r.bucket && state.selected.key === r.key) {
      tr.classList.add('selected');
      tr.setAttribute('aria-current', 'true');
    }

    // state
    const stateTd = el('td', { cls: 'c-state' }, [badge(ds)]);
    if (r.stuck) stateTd.append(flag('stuck', 'flag-bad', 'no progress: the instance looks stuck'));
    if (r.spot_interruption && ds !== 'interrupted') stateTd.append(flag('spot reclaimed', 'flag-warn', 'AWS reclaimed this spot instance'));
    if (r.awaits_next_attempt) stateTd.append(flag('retrying', 'flag-info', 'the next attempt will be launched'));
    if (r.status_unreadable) stateTd.append(flag('status?', 'flag-warn', 'status.json could not be read'));
    tr.append(stateTd);

    // object
    const objTd = el('td', { cls: 'c-object' }, [el('span', { cls: 'object', text: target })]);
    const wt = waitingText(r);
    if (wt) objTd.append(el('div', { cls: 'sub', text: wt }));
    else if (r.job_id) objTd.append(el('div', { cls: 'sub mono', text: String(r.job_id), title: 'job id' }));
    tr.append(objTd);

    // attempt
    tr.append(el('td', { cls: 'num c-attempt', text: isNum(r.attempt) ? r.attempt : '—' }));

    // instance
    const instTd = el('td', { cls: 'c-instance' });
    if (r.instance_id) {
      instTd.append(el('span', { cls: 'mono', text: r.instance_id }));
      if (r.instance_type) instTd.append(el('div', { cls: 'sub', text: r.instance_type }));
    } else {
      instTd.append(el('span', { cls: 'muted', text: r.state === 'waiting' ? 'not launched' : '—' }));
      if (r.instance_type) instTd.append(el('div', { cls: 'sub', text: r.instance_type }));
    }
    tr.append(instTd);

    // market
    tr.append(el('td', { cls: 'c-market market-' + (r.market === 'spot' ? 'spot' : 'od'), text: r.market || '—' }));

    // duration
    const dur = isNum(r.duration_secs) ? r.duration_secs : r.age_secs;
    const durTd = el('td', { cls: 'num c-duration', text: humanDuration(dur) });
    if (r.launched_at) durTd.title = 'launched ' + when(r.launched_at);
    if (isNum(r.max_runtime_secs) && isNum(dur) && ACTIVE_EC2.has(r.state) && dur > r.max_runtime_secs) {
      durTd.classList.add('over');
      durTd.title += (durTd.title ? '; ' : '') + 'over its max runtime of ' + humanDuration(r.max_runtime_secs);
    }
    tr.append(durTd);

    // cost
    tr.append(el('td', { cls: 'num c-cost', text: usd(r.cost_usd) }));
    return tr;
  }

  function renderJobs(rows) {
    const tbody = $('#jobs tbody');
    const active = document.activeElement;
    let focusId = null;
    if (active && tbody.contains(active)) {
      const tr = active.closest('tr');
      if (tr) focusId = tr.dataset.rowId || null;
    }
    const frag = document.createDocumentFragment();
    if (!rows.length) {
      frag.append(el('tr', { cls: 'empty-row' }, [
        el('td', { attrs: { colspan: 7 }, text: 'No jobs yet. Upload an object to the pipeline’s bucket to launch one.' }),
      ]));
    }
    for (const r of rows) frag.append(jobRow(r));
    tbody.replaceChildren(frag);
    if (focusId) {
      for (const tr of tbody.rows) {
        if (tr.dataset.rowId === focusId) { tr.focus({ preventScroll: true }); break; }
      }
    }

    const counts = {};
    for (const r of rows) { const s = displayState(r); counts[s] = (counts[s] || 0) + 1; }
    const bits = [plural(rows.length, 'row')];
    for (const s of ['running', 'waiting', 'failed', 'timed_out', 'interrupted']) {
      if (counts[s]) bits.push(counts[s] + ' ' + s.replace('_', ' '));
    }
    const stuck = rows.filter((r) => r.stuck).length;
    if (stuck) bits.push(stuck + ' stuck');
    $('#jobs-count').textContent = bits.join(' · ');
  }

  function markSelectedRows() {
    const sel = state.selected;
    for (const tr of $('#jobs tbody').rows) {
      const on = !!sel && tr.dataset.bucket === sel.bucket && tr.dataset.key === sel.key;
      tr.classList.toggle('selected', on);
      if (on) tr.setAttribute('aria-current', 'true'); else tr.removeAttribute('aria-current');
    }
  }

  const loadJobs = singleFlight(async () => {
    try {
      const rows = await api('jobs');
      if (!Array.isArray(rows)) throw new Error('api/jobs: expected a list');
      state.jobs = rows;
      renderJobs(rows);
      state.lastUpdated = new Date();
      state.refreshFailed = false;
      clearMessage('jobs');
    } catch (e) {
      state.refreshFailed = true;
      failed('jobs', e);
    }
    renderUpdated();
  });

  // ---------------------------------------------------------------- detail

  function kv(dl, label, value) {
    if (value == null || value === '') return;
    const dd = el('dd');
    if (value instanceof Node) dd.append(value); else dd.textContent = String(value);
    dl.append(el('dt', { text: label }), dd);
  }

  function latestInstance(list) {
    if (!Array.isArray(list) || !list.length) return null;
    let best = list[0];
    for (const r of list) {
      const a = isNum(r.attempt) ? r.attempt : -1;
      const b = isNum(best.attempt) ? best.attempt : -1;
      if (a > b || (a === b && (r.launched_at || 0) > (best.launched_at || 0))) best = r;
    }
    return best;
  }

  function renderDetail(d) {
    const sel = state.selected;
    const sec = $('#detail');
    $('#detail-title').textContent = sel.target;

    const st = d && d.status && typeof d.status === 'object' ? d.status : null;
    const latest = latestInstance(d && d.instances);
    const dl = $('#detail-summary');
    dl.replaceChildren();
    const shown = latest ? displayState(latest) : (st && st.state ? String(st.state) : 'unknown');
    kv(dl, 'State', badge(shown));
    kv(dl, 'Job id', d && d.job_id);
    kv(dl, 'Attempt', st && isNum(st.attempt) ? st.attempt : latest && latest.attempt);
    if (st && st.instance && typeof st.instance === 'object') {
      const i = st.instance;
      kv(dl, 'Instance', [i.id, i.type, i.lifecycle].filter(Boolean).join(' · '));
    }
    if (st) {
      kv(dl, 'Started', st.started_at ? when(st.started_at) : null);
      kv(dl, 'Finished', st.finished_at ? when(st.finished_at) : null);
    }
    const cost = st && st.cost && typeof st.cost === 'object' ? st.cost : null;
    if (cost) {
      const bits = [usd(cost.usd)];
      if (isNum(cost.seconds)) bits.push(humanDuration(cost.seconds));
      if (isNum(cost.usd_per_hour)) bits.push(usd(cost.usd_per_hour) + '/h');
      if (cost.market) bits.push(String(cost.market));
      if (isNum(cost.on_demand_usd) && isNum(cost.usd)) bits.push('on-demand ' + usd(cost.on_demand_usd));
      kv(dl, 'Cost', bits.join(' · '));
    }
    if (st && st.error) kv(dl, 'Error', el('span', { cls: 'error-text', text: typeof st.error === 'string' ? st.error : JSON.stringify(st.error) }));
    if (d && Array.isArray(d.uploads) && d.uploads.length) {
      const ul = el('ul', { cls: 'plain' });
      for (const u of d.uploads) ul.append(el('li', { cls: 'mono', text: String(u) }));
      kv(dl, d.uploads.length === 1 ? 'Upload' : 'Uploads', ul);
    }
    kv(dl, 'Status URL', d && d.status_url ? el('span', { cls: 'mono', text: String(d.status_url) }) : null);

    // instances
    const tb = $('#detail-instances tbody');
    const frag = document.createDocumentFragment();
    const insts = (d && Array.isArray(d.instances)) ? d.instances : [];
    if (!insts.length) {
      frag.append(el('tr', { cls: 'empty-row' }, [el('td', { attrs: { colspan: 4 }, text: 'no instances' })]));
    }
    for (const r of insts) {
      const idCell = el('td');
      idCell.append(el('span', { cls: r.instance_id ? 'mono' : 'muted', text: r.instance_id || 'not launched' }));
      const sub = [isNum(r.attempt) ? 'attempt ' + r.attempt : null, r.instance_type, r.market].filter(Boolean).join(' · ');
      if (sub) idCell.append(el('div', { cls: 'sub', text: sub }));
      frag.append(el('tr', null, [
        idCell,
        el('td', null, [badge(displayState(r))]),
        el('td', { text: r.launched_at ? shortWhen(r.launched_at) : '—' }),
        el('td', { cls: 'num', text: usd(r.cost_usd) }),
      ]));
    }
    tb.replaceChildren(frag);

    // status.json: only touch the DOM when it changed, so a text selection survives refreshes
    const pre = $('#detail-status');
    const statusText = st ? JSON.stringify(st, null, 2) : (d && d.status != null ? JSON.stringify(d.status, null, 2) : 'no status.json yet');
    if (pre.textContent !== statusText) pre.textContent = statusText;
    pre.classList.toggle('muted', !st);

    renderLogs(d && Array.isArray(d.logs) ? d.logs : []);
    sec.hidden = false;
  }

  function renderLogs(logs) {
    const box = $('#detail-logs');
    const existing = new Map();
    for (const fig of Array.from(box.children)) {
      if (fig.dataset && fig.dataset.url != null) existing.set(fig.dataset.url, fig);
    }
    const keep = [];
    for (const log of logs) {
      const url = String(log && log.url != null ? log.url : '');
      const tail = String(log && log.tail != null ? log.tail : '');
      let fig = existing.get(url);
      if (!fig) {
        fig = el('figure', { cls: 'log-figure' }, [
          el('figcaption', { cls: 'mono', text: url || '(log)' }),
          el('pre', { cls: 'log', attrs: { tabindex: 0 } }),
        ]);
        fig.dataset.url = url;
      }
      existing.delete(url);
      const pre = fig.querySelector('pre.log');
      const wasNew = !pre.isConnected;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      const text = tail || '(empty)';
      if (pre.textContent !== text) {
        pre.textContent = text;
        pre.classList.toggle('muted', !tail);
        if (atBottom || wasNew) keep.push(pre);
      } else if (wasNew) {
        keep.push(pre);
      }
      box.append(fig); // appends or moves into order
    }
    for (const fig of existing.values()) fig.remove();
    let empty = box.querySelector('.no-logs');
    if (!logs.length) {
      if (!empty) { empty = el('p', { cls: 'muted no-logs', text: 'no logs yet' }); box.append(empty); }
    } else if (empty) {
      empty.remove();
    }
    for (const pre of keep) pre.scrollTop = pre.scrollHeight; // follow the tail
  }

  let detailSeq = 0;
  const loadDetailOnce = singleFlight(async () => {
    const sel = state.selected;
    if (!sel) return;
    const seq = ++detailSeq;
    $('#detail-loading').hidden = state.detail != null;
    try {
      const d = await api('job', { job: sel.target });
      if (state.selected !== sel || seq !== detailSeq) return; // selection changed meanwhile
      state.detail = d;
      setActionButtons();
      renderDetail(d);
      clearMessage('detail');
    } catch (e) {
      if (state.selected !== sel) return;
      failed('detail', e);
    } finally {
      if (state.selected === sel) $('#detail-loading').hidden = true;
    }
  });
  function loadDetail(fresh) { return loadDetailOnce(fresh); }

  function select(bucket, key, opts) {
    const target = targetOf(bucket, key);
    const same = state.selected && state.selected.target === target;
    if (!same) {
      state.selected = { bucket, key, target };
      state.detail = null;
      setActionButtons();
      $('#detail-title').textContent = target;
      $('#detail-summary').replaceChildren();
      $('#detail-instances tbody').replaceChildren();
      $('#detail-status').textContent = '';
      $('#detail-logs').replaceChildren();
      $('#detail').hidden = false;
      $('#layout').classList.add('has-detail');
      markSelectedRows();
      if (!(opts && opts.noHash)) history.replaceState(null, '', location.pathname + location.search + '#job=' + encodeURIComponent(target));
    }
    loadDetail(true);
  }

  function closeDetail() {
    const prev = state.selected;
    state.selected = null;
    state.detail = null;
    detailSeq++;
    $('#detail').hidden = true;
    $('#layout').classList.remove('has-detail');
    markSelectedRows();
    clearMessage('detail');
    history.replaceState(null, '', location.pathname + location.search);
    if (prev) {
      for (const tr of $('#jobs tbody').rows) {
        if (tr.dataset.bucket === prev.bucket && tr.dataset.key === prev.key) { tr.focus({ preventScroll: true }); break; }
      }
    }
  }

  // ---------------------------------------------------------------- actions

  function describe(item) {
    if (item == null) return '';
    if (typeof item === 'string') return item;
    if (typeof item !== 'object') return String(item);
    const who = item.bucket != null && item.key != null ? targetOf(item.bucket, item.key) : (item.instance_id || '');
    const why = item.reason || item.error || item.message || '';
    if (who || why) return [who, why].filter(Boolean).join(': ');
    return JSON.stringify(item);
  }

  function cancelOutcome(res, target) {
    // What the cancel stopped; `ended` is the reaper's findings, not a cancel's.
    const ended = Array.isArray(res && res.instances) ? res.instances : [];
    const errors = Array.isArray(res && res.errors) ? res.errors : [];
    const lines = [];
    if (ended.length) lines.push('cancelled ' + plural(ended.length, 'instance') + ' for ' + target);
    else if (!errors.length) lines.push('nothing to cancel for ' + target + ': no live instance');
    for (const e of errors) lines.push('error: ' + describe(e));
    return { text: lines.join('\n'), kind: errors.length ? 'error' : 'ok' };
  }

  function retryOutcome(res, target) {
    const launched = Array.isArray(res && res.launched) ? res.launched : [];
    const skipped = Array.isArray(res && res.skipped) ? res.skipped : [];
    const failedList = Array.isArray(res && res.failed) ? res.failed : [];
    const lines = [];
    for (const l of launched) {
      lines.push('launched ' + (l && l.bucket != null ? targetOf(l.bucket, l.key) : target) + (l && l.instance_id ? ' as ' + l.instance_id : ''));
    }
    for (const s of skipped) lines.push('skipped ' + describe(s));
    for (const f of failedList) {
      lines.push('failed ' + describe(f) + (f && f.retryable ? ' (retryable: try again later)' : ''));
    }
    if (!lines.length) lines.push('nothing launched for ' + target);
    const kind = failedList.length ? 'error' : (launched.length ? 'ok' : 'info');
    return { text: lines.join('\n'), kind };
  }

  // What a cancel or retry names: the shown job's own instance (its live one first), so that
  // it acts on this job alone; an object would name every upload's job for a cancel. A job
  // with no instance yet (waiting) is named by its object, which names its newest job.
  function jobTarget(sel) {
    const insts = state.detail && Array.isArray(state.detail.instances) ? state.detail.instances : [];
    const live = insts.filter((i) => ACTIVE_EC2.has(i.state) && i.instance_id);
    const any = insts.filter((i) => i.instance_id);
    const pick = live.length ? live[live.length - 1] : (any.length ? any[any.length - 1] : null);
    return pick ? pick.instance_id : sel.target;
  }

  async function act(kind) {
    const sel = state.selected;
    if (!sel || state.actionBusy) return;
    const job = jobTarget(sel);
    const on = job === sel.target ? '' : ' (on ' + job + ')';
    const question = kind === 'cancel'
      ? 'Cancel the job for ' + sel.target + on + '? Its instance is terminated.'
      : 'Launch ' + sel.target + ' again as its next attempt?';
    state.paused = true;
    let ok = false;
    try {
      ok = window.confirm(question);
    } finally {
      state.paused = false;
    }
    if (!ok) return;
    state.actionBusy = true;
    setActionButtons();
    try {
      const res = await post(kind, { job });
      const out = kind === 'cancel' ? cancelOutcome(res, sel.target) : retryOutcome(res, sel.target);
      showMessage(out.text, out.kind, 'action');
    } catch (e) {
      failed('action', e);
    } finally {
      state.actionBusy = false;
      setActionButtons();
    }
    await refreshNow();
  }

  // Not before the job is loaded: its instance is what the buttons act on.
  function setActionButtons() {
    $('#cancel').disabled = state.actionBusy || !state.detail;
    $('#retry').disabled = state.actionBusy || !state.detail;
  }

  // ---------------------------------------------------------------- chart

  function utcDay(d) {
    return d.getUTCFullYear() + '-' + pad2(d.getUTCMonth() + 1) + '-' + pad2(d.getUTCDate());
  }

  function parseDay(s) {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(String(s));
    return m ? Date.UTC(+m[1], +m[2] - 1, +m[3]) : NaN;
  }

  /** One entry per calendar day from `since` to today, zero-filled; falls back to the groups as given. */
  function chartDays(data) {
    const groups = Array.isArray(data && data.groups) ? data.groups : [];
    const byDay = new Map();
    for (const g of groups) if (g && g.group != null) byDay.set(String(g.group), g);
    const dated = groups.every((g) => !Number.isNaN(parseDay(g.group)));
    const sinceMs = data && data.since ? Date.parse(data.since) : NaN;
    if (!dated || Number.isNaN(sinceMs)) {
      return groups.map((g) => ({ day: String(g.group), g }));
    }
    let start = parseDay(utcDay(new Date(sinceMs)));
    let end = parseDay(utcDay(new Date()));
    for (const k of byDay.keys()) {
      const t = parseDay(k);
      if (t < start) start = t;
      if (t > end) end = t;
    }
    const days = [];
    for (let t = start; t <= end && days.length < 400; t += 86400000) {
      const k = utcDay(new Date(t));
      days.push({ day: k, g: byDay.get(k) || null });
    }
    return days;
  }

  /** A round step so that `ticks` steps cover max. */
  function niceStep(max, ticks, integer) {
    if (!(max > 0)) return integer ? 1 : 0.01;
    const raw = max / ticks;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / p;
    let s = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
    if (integer) s = Math.max(1, Math.ceil(s));
    return s;
  }

  function dayLabel(day) {
    const t = parseDay(day);
    if (Number.isNaN(t)) return day;
    const d = new Date(t);
    return MONTHS[d.getUTCMonth()] + ' ' + d.getUTCDate();
  }

  function axisUsd(v, step) {
    if (v === 0) return '$0';
    let dec = 0;
    while (dec < 6 && Math.abs(step * Math.pow(10, dec) - Math.round(step * Math.pow(10, dec))) > 1e-6) dec++;
    return '$' + v.toFixed(dec);
  }

  function renderTotals(data) {
    const dl = $('#cost-totals');
    dl.replaceChildren();
    const t = data && data.total ? data.total : null;
    const add = (label, value, cls) => dl.append(el('div', { cls: 'total' + (cls ? ' ' + cls : '') }, [
      el('dt', { text: label }), el('dd', { text: value }),
    ]));
    add('attempts', t && isNum(t.attempts) ? String(t.attempts) : '0');
    add('spent', usd(t && isNum(t.usd) ? t.usd : 0));
    if (t && isNum(t.saving_usd)) add('saved vs on-demand', usd(t.saving_usd), 'saving');
    if (t && isNum(t.seconds)) add('instance time', humanDuration(t.seconds));
    if (t && isNum(t.attempts) && isNum(t.priced) && t.priced < t.attempts) add('unpriced', String(t.attempts - t.priced), 'warn');
  }

  function renderChart() {
    const box = $('#chart');
    const data = state.cost;
    if (!data) return;
    const days = chartDays(data);
    const W = Math.max(360, Math.floor(box.clientWidth || 800));
    const H = 190;
    const m = { l: 40, r: 58, t: 30, b: 26 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const TICKS = 4;

    const jobsOf = (d) => (d.g && isNum(d.g.attempts) ? d.g.attempts : 0);
    const usdOf = (d) => (d.g && isNum(d.g.usd) ? d.g.usd : 0);
    const maxJobs = days.reduce((a, d) => Math.max(a, jobsOf(d)), 0);
    const maxUsd = days.reduce((a, d) => Math.max(a, usdOf(d)), 0);
    const jStep = niceStep(maxJobs, TICKS, true);
    const uStep = niceStep(maxUsd, TICKS, false);
    const jMax = jStep * TICKS;
    const uMax = uStep * TICKS;
    const totalJobs = data.total && isNum(data.total.attempts) ? data.total.attempts : days.reduce((a, d) => a + jobsOf(d), 0);
    const totalUsd = data.total && isNum(data.total.usd) ? data.total.usd : days.reduce((a, d) => a + usdOf(d), 0);

    const root = svg('svg', {
      width: W, height: H, viewBox: '0 0 ' + W + ' ' + H,
      role: 'img', 'aria-labelledby': 'chart-title chart-desc', class: 'chart-svg',
    });
    root.append(svg('title', { id: 'chart-title' }, 'Jobs and cost per day'));
    root.append(svg('desc', { id: 'chart-desc' },
      days.length ? plural(totalJobs, 'job') + ', ' + usd(totalUsd) + ' from ' + days[0].day + ' to ' + days[days.length - 1].day : 'no data'));

    // legend
    const legend = svg('g', { class: 'legend', transform: 'translate(' + m.l + ',12)' });
    legend.append(svg('rect', { x: 0, y: -8, width: 10, height: 10, rx: 2, class: 'legend-bar' }));
    legend.append(svg('text', { x: 15, y: 1 }, 'attempts per day (left axis)'));
    legend.append(svg('line', { x1: 200, y1: -3, x2: 218, y2: -3, class: 'legend-line' }));
    legend.append(svg('circle', { cx: 209, cy: -3, r: 3, class: 'legend-dot' }));
    legend.append(svg('text', { x: 224, y: 1 }, 'cost per day, USD (right axis)'));
    root.append(legend);

    // grid + axes
    const yJ = (v) => m.t + ph - (v / jMax) * ph;
    const yU = (v) => m.t + ph - (v / uMax) * ph;
    const grid = svg('g', { class: 'grid' });
    for (let i = 0; i <= TICKS; i++) {
      const y = m.t + ph - (i / TICKS) * ph;
      grid.append(svg('line', { x1: m.l, x2: m.l + pw, y1: y, y2: y, class: i === 0 ? 'baseline' : '' }));
      grid.append(svg('text', { x: m.l - 6, y: y + 4, class: 'axis-label y-left' }, String(Math.round(jStep * i))));
      grid.append(svg('text', { x: m.l + pw + 6, y: y + 4, class: 'axis-label y-right' }, axisUsd(uStep * i, uStep)));
    }
    root.append(grid);

    if (!days.length) {
      root.append(svg('text', { x: m.l + pw / 2, y: m.t + ph / 2, class: 'empty-label' }, 'no jobs in the last 30 days'));
      box.replaceChildren(root);
      return;
    }

    const slot = pw / days.length;
    const barW = Math.max(2, Math.min(36, slot * 0.62));
    const cx = (i) => m.l + slot * i + slot / 2;

    // x labels: at most one per ~52 px, always including the last day
    const step = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(pw / 52))));
    const xl = svg('g', { class: 'x-labels' });
    days.forEach((d, i) => {
      if ((days.length - 1 - i) % step !== 0) return;
      xl.append(svg('text', { x: cx(i), y: H - m.b + 16, class: 'axis-label x' }, dayLabel(d.day)));
    });
    root.append(xl);

    // bars, each with a hover column
    const bars = svg('g', { class: 'bars' });
    days.forEach((d, i) => {
      const g = svg('g', { class: 'day', 'data-day': d.day });
      const jobs = jobsOf(d);
      let tip = d.day + ': ' + plural(jobs, 'attempt');
      if (d.g) {
        tip += ', ' + usd(usdOf(d));
        if (isNum(d.g.priced) && d.g.priced < jobs) tip += ' (' + (jobs - d.g.priced) + ' unpriced)';
        if (isNum(d.g.saving_usd) && d.g.saving_usd > 0) tip += ', saved ' + usd(d.g.saving_usd) + ' vs on-demand';
        if (isNum(d.g.seconds) && d.g.seconds > 0) tip += ', ' + humanDuration(d.g.seconds) + ' of instance time';
      }
      svgTitle(g.appendChild(svg('rect', { x: m.l + slot * i, y: m.t, width: slot, height: ph, class: 'hit' })), tip);
      if (d.g) {
        const h = Math.max(jobs > 0 ? 1.5 : 0, (jobs / jMax) * ph);
        const bar = svg('rect', { x: cx(i) - barW / 2, y: m.t + ph - h, width: barW, height: h, rx: Math.min(3, barW / 4), class: 'bar' });
        svgTitle(bar, tip);
        g.append(bar);
      }
      bars.append(g);
    });
    root.append(bars);

    // cost line (zero on days without jobs) + dots on days that cost something
    const pts = days.map((d, i) => [cx(i), yU(usdOf(d))]);
    if (maxUsd > 0) {
      if (pts.length > 1) {
        root.append(svg('path', {
          class: 'cost-line',
          d: pts.map((p, i) => (i ? 'L' : 'M') + p[0].toFixed(1) + ' ' + p[1].toFixed(1)).join(' '),
        }));
      }
      const dots = svg('g', { class: 'cost-dots' });
      days.forEach((d, i) => {
        if (usdOf(d) <= 0) return;
        const c = svg('circle', { cx: pts[i][0], cy: pts[i][1], r: days.length > 45 ? 2.5 : 3.5, class: 'cost-dot' });
        svgTitle(c, d.day + ': ' + usd(usdOf(d)));
        dots.append(c);
      });
      root.append(dots);
    }
    if (totalJobs === 0) {
      root.append(svg('text', { x: m.l + pw / 2, y: m.t + ph / 2, class: 'empty-label' }, 'no jobs in the last 30 days'));
    }
    box.replaceChildren(root);
  }

  const loadChart = singleFlight(async () => {
    try {
      const data = await api('cost', { since: '30d', by: 'day' });
      state.cost = data;
      state.chartLoadedAt = Date.now();
      renderTotals(data);
      renderChart();
      clearMessage('chart');
    } catch (e) {
      state.chartLoadedAt = Date.now(); // retry on the chart's own schedule, not every tick
      failed('chart', e);
      if (!state.cost) $('#chart').replaceChildren(el('p', { cls: 'muted chart-empty', text: 'cost data unavailable' }));
    }
  });

  const loadInfo = singleFlight(async () => {
    try {
      const info = await api('info');
      state.info = info;
      const secs = Number(info && info.refresh_secs);
      state.refreshSecs = Number.isFinite(secs) && secs >= 1 ? Math.min(secs, 3600) : DEFAULT_REFRESH_SECS;
      renderInfo(info);
      clearMessage('info');
    } catch (e) {
      failed('info', e);
    }
  });

  // ---------------------------------------------------------------- refresh loop

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(tick, state.refreshSecs * 1000);
  }

  async function tick() {
    state.timer = null;
    if (state.paused || document.hidden) { schedule(); return; }
    const tasks = [loadJobs()];
    if (state.selected) tasks.push(loadDetail());
    if (Date.now() - state.chartLoadedAt >= CHART_EVERY_MS) tasks.push(loadChart());
    if (!state.info) tasks.push(loadInfo());
    try { await Promise.allSettled(tasks); } finally { schedule(); }
  }

  async function refreshNow() {
    const tasks = [loadJobs(true)];
    if (state.selected) tasks.push(loadDetail(true));
    await Promise.allSettled(tasks);
  }

  // ---------------------------------------------------------------- events

  function rowFrom(target) {
    const tr = target && target.closest ? target.closest('tr') : null;
    return tr && tr.dataset.key != null && tr.dataset.bucket != null ? tr : null;
  }

  function wire() {
    const tbody = $('#jobs tbody');
    tbody.addEventListener('click', (ev) => {
      const tr = rowFrom(ev.target);
      if (!tr) return;
      if (window.getSelection && String(window.getSelection()).length > 0) return; // user is selecting text
      select(tr.dataset.bucket, tr.dataset.key);
    });
    tbody.addEventListener('keydown', (ev) => {
      const tr = rowFrom(ev.target);
      if (!tr || ev.target !== tr) return;
      if (ev.key === 'Enter' || ev.key === ' ') {
        ev.preventDefault();
        select(tr.dataset.bucket, tr.dataset.key);
      } else if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp') {
        const next = ev.key === 'ArrowDown' ? tr.nextElementSibling : tr.previousElementSibling;
        if (next && next.tabIndex >= 0) { ev.preventDefault(); next.focus(); }
      }
    });
    $('#cancel').addEventListener('click', () => act('cancel'));
    $('#retry').addEventListener('click', () => act('retry'));
    $('#close-detail').addEventListener('click', closeDetail);
    $('#message-close').addEventListener('click', () => clearMessage());
    document.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape' && state.selected && !ev.defaultPrevented) closeDetail();
    });
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && !state.paused) { clearTimeout(state.timer); tick(); }
    });
    if (typeof ResizeObserver === 'function') {
      let raf = 0;
      let lastW = 0;
      new ResizeObserver((entries) => {
        const w = Math.floor(entries[0].contentRect.width);
        if (w === lastW) return;
        lastW = w;
        cancelAnimationFrame(raf);
        raf = requestAnimationFrame(renderChart);
      }).observe($('#chart'));
    }
  }

  function start() {
    wire();
    renderUpdated();
    if (!/^[0-9a-fA-F]{16,}$/.test(TOKEN)) {
      showMessage('This page needs the access token: open the dashboard with the URL that s3spot printed (…/?token=…).', 'error', 'token');
    }
    const m = /^#job=(.+)$/.exec(location.hash);
    if (m) {
      let t = null;
      try { t = parseTarget(decodeURIComponent(m[1])); } catch (_) { t = null; }
      if (t) select(t.bucket, t.key, { noHash: true });
    }
    loadInfo().finally(() => {
      tick();
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
