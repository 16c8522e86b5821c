// Sherpa Swarm dashboard. Plain ES2020 module, no dependencies.
// Every string from the server goes through textContent: node names come from strangers.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'sherpa-token';
const TRACKER_KEY = 'sherpa-tracker';
const AUTH_MESSAGE = 'This dashboard needs its access token: open the URL it printed.';

// ---------- small helpers ----------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function store(key, value) {
  try {
    if (value === undefined) return localStorage.getItem(key);
    if (value === null) localStorage.removeItem(key); else localStorage.setItem(key, value);
  } catch { /* storage may be unavailable */ }
  return null;
}

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const fmt = (v, digits = 1) => (isNum(v) ? v.toFixed(digits) : '—');
const fmtMs = (v) => (isNum(v) ? (v < 10 ? v.toFixed(1) : Math.round(v).toString()) + ' ms' : '—');
const fmtMbit = (bps) => {
  if (!isNum(bps)) return '—';
  const m = (bps * 8) / 1e6;
  return (m < 10 ? m.toFixed(1) : Math.round(m).toString()) + ' Mbit/s';
};
const fmtGB = (bytes) => (isNum(bytes) ? (bytes / 1e9).toFixed(1) + ' GB' : '—');
const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString('en-US') : '—');
const blocksOf = (b) => (b && isNum(b.start) && isNum(b.end) ? b : null);
// Block ranges read as everywhere else in Sherpa (the command line, the
// server's messages): half-open, "0..15" is blocks 0 to 14.
const fmtSpan = (b) => (blocksOf(b) ? `${b.start}..${b.end}` : '—');
const spanTitle = (b) => (blocksOf(b) ? `blocks ${b.start} to ${b.end - 1} (${b.end - b.start} blocks)` : '');
const fmtRange = (r) => `${r.start}..${r.end}`;

function humanError(message) {
  const text = String(message || 'Something went wrong').trim();
  return text.charAt(0).toUpperCase() + text.slice(1);
}

const STATUS_TEXT = {
  pinned: 'Pinned', selected: 'Selected', replica: 'Replica', excluded: 'Excluded', '-': 'Not used', unusable: 'Unusable',
};
const REACH_TEXT = { direct: 'Direct', relayed: 'Relayed', unreachable: 'Unreachable', unknown: 'Unknown' };
const CELL_TEXT = { selected: 'selected', elsewhere: 'served elsewhere', missing: 'missing' };

function badge(kind, text) {
  return h('span', { class: `badge ${String(kind).replace(/[^a-z-]/g, '')}`, text });
}

// ---------- API ----------

(function takeTokenFromUrl() {
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (!match) return;
  store(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, '', location.pathname + location.search);
})();

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

function authHeaders(json) {
  const headers = {};
  const token = store(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json) headers['Content-Type'] = 'application/json';
  return headers;
}

function errorFromBody(status, text) {
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON */ }
  const err = data && data.error;
  const message = (err && (err.message || (typeof err === 'string' ? err : ''))) || text.trim() || `HTTP ${status}`;
  return new ApiError(status, status === 401 ? AUTH_MESSAGE : humanError(message), err && err.code);
}

async function api(path, { method = 'GET', body, signal } = {}) {
  let res;
  try {
    res = await fetch(path, {
      method, signal, cache: 'no-store',
      headers: authHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'Cannot reach the dashboard server', 'offline');
  }
  const text = await res.text();
  if (res.status === 401) showAuthBanner();
  if (!res.ok) throw errorFromBody(res.status, text);
  if (!text) return null;
  try { return JSON.parse(text); } catch { throw new ApiError(res.status, 'The server sent an invalid answer', 'invalid_json'); }
}

function showAuthBanner() {
  const banner = $('auth-banner');
  banner.textContent = AUTH_MESSAGE;
  banner.hidden = false;
}

// ---------- application state ----------

const S = {
  state: null,          // last /api/state body
  uiMode: null,         // what the radios show (may be ahead of the server)
  first: true,
  nodes: null,          // last /api/nodes body
  nodesAt: 0,
  nodesInflight: false,
  nodesError: null,
  surveying: 0,
  selGen: 0,            // bumped on each selection change; stale answers are dropped
  putPending: 0,
  putInflight: false,   // a PUT /api/selection is out
  putQueued: null,      // changes made meanwhile: {reset}
  checked: new Set(),   // peer ids checked in the node selector (local, immediate)
  pinned: new Set(),
  excluded: new Set(),
  seen: new Set(),      // peer ids already shown (to highlight new LAN finds)
  detailsPeer: null,
  route: null,
  routeLive: false,
  models: null,
  modelsAt: 0,
  turns: [],            // {user, answer, el, status}
  stream: null,         // {controller, turn}
  returnFocus: null,
};

const ready = () => S.state && S.state.state === 'ready';
const serverMode = () => (S.state && S.state.mode) || null;
const modelBlocks = () => {
  if (S.nodes && isNum(S.nodes.model_blocks) && S.nodes.model_blocks > 0) return S.nodes.model_blocks;
  if (S.state && isNum(S.state.model_blocks)) return S.state.model_blocks;
  return 0;
};
const servers = () => (S.nodes && Array.isArray(S.nodes.servers) ? S.nodes.servers : []);
const findServer = (peer) => servers().find((s) => s.peer_id === peer);

// ---------- state polling and header ----------

let stateTimer = 0;
async function pollState() {
  clearTimeout(stateTimer);
  try {
    applyState(await api('/api/state'));
  } catch (e) {
    if (e.status === 401) setHeader('failed', 'Locked', 'needs the access token');
    else setHeader('offline', 'Offline', e.message);
  }
  const loading = S.state && S.state.state === 'loading';
  stateTimer = setTimeout(pollState, loading ? 1000 : 5000);
}

function setHeader(kind, label, detail) {
  const box = $('state');
  if (box.dataset.state !== kind) box.dataset.state = kind;
  if ($('state-label').textContent !== label) $('state-label').textContent = label;
  const d = detail || '';
  if ($('state-detail').textContent !== d) {
    $('state-detail').textContent = d;
    $('state-detail').title = d;
  }
}

function applyState(st) {
  if (!st || typeof st !== 'object') return;
  const prev = S.state;
  S.state = st;
  const modeName = st.mode === 'wan' ? 'WAN' : st.mode === 'lan' ? 'LAN' : '';
  if (st.state === 'loading') {
    const p = st.progress || {};
    setHeader('loading', 'Loading', [p.stage, p.detail].filter(Boolean).join(': ') || 'starting');
  } else if (st.state === 'ready') {
    setHeader('ready', 'Ready', modeName ? `${modeName} swarm` : '');
  } else if (st.state === 'failed') {
    setHeader('failed', 'Failed', humanError(st.message || 'the swarm client failed'));
  } else {
    setHeader('idle', 'Idle', st.message ? humanError(st.message) : 'Choose a swarm mode');
  }
  $('model-name').textContent = st.model || '—';
  $('version').textContent = st.version ? `v${st.version}` : '';
  $('chat-model').textContent = st.model ? `Model ${st.model}` : '';

  if (S.first) {
    S.first = false;
    setRadios(st.mode === 'lan' || st.mode === 'wan' ? st.mode : null);
  }
  const tracker = $('tracker');
  if (!tracker.value && document.activeElement !== tracker) tracker.value = st.tracker || store(TRACKER_KEY) || '';
  if (st.tracker) store(TRACKER_KEY, st.tracker);

  const switched = !prev || prev.mode !== st.mode || prev.tracker !== st.tracker;
  const becameReady = st.state === 'ready' && (!prev || prev.state !== 'ready' || switched);
  if (switched && prev) clearNodes();
  if (becameReady) {
    loadNodes();
    loadModels();
    loadRoute();
  }
  if (st.state !== 'ready' && st.state !== prev?.state) clearNodes();
  renderModeNote();
  renderDialogWait();
  renderCoverage();
  renderNodesTable();
}

function setRadios(mode) {
  S.uiMode = mode;
  $('mode-lan').checked = mode === 'lan';
  $('mode-wan').checked = mode === 'wan';
  $('wan-form').hidden = mode !== 'wan';
  $('node-dialog-desc').textContent = mode === 'lan'
    ? 'Nodes found on the local network, ranked by Performance Score. The checked ones serve your prompts.'
    : 'Nodes found through the tracker, ranked by Performance Score. The checked ones serve your prompts.';
}

function renderModeNote() {
  const st = S.state;
  let note = '';
  if (!st) note = '';
  else if (!st.mode) note = 'Choose how to find machines to run the model with.';
  else if (st.state === 'loading') note = st.mode === 'wan' ? 'Connecting to the tracker…' : 'Looking for machines on this network…';
  else if (st.state === 'failed') note = `The swarm could not start. ${st.mode === 'wan' ? 'Check the tracker address and Connect' : 'Choose a mode'} to try again.`;
  else if (st.state === 'ready') {
    const n = servers().length;
    const sel = servers().filter((s) => s.selected).length;
    if (S.nodes) note = `${n} ${n === 1 ? 'node' : 'nodes'} found, ${sel} selected.`;
    else note = st.mode === 'lan' ? 'Searching the local network…' : 'Surveying the tracker’s servers…';
  }
  $('mode-note').textContent = note;
}

// ---------- swarm mode ----------

async function switchMode(mode, tracker) {
  const body = mode === 'wan' ? { mode, tracker } : { mode };
  const st = await api('/api/mode', { method: 'POST', body });
  if (mode === 'wan') store(TRACKER_KEY, tracker);
  clearNodes();
  S.route = null;
  setRadios(mode);
  applyState(st);
  clearTimeout(stateTimer);
  stateTimer = setTimeout(pollState, 800);
}

function showTrackerError(message) {
  const err = $('tracker-error');
  err.textContent = message || '';
  err.hidden = !message;
  $('tracker').setAttribute('aria-invalid', message ? 'true' : 'false');
}

let connecting = false;
async function connectWan(trigger) {
  if (connecting) return;
  const tracker = $('tracker').value.trim();
  if (!tracker) {
    showTrackerError('Enter the tracker address first.');
    $('tracker').focus();
    return;
  }
  showTrackerError('');
  connecting = true;
  $('connect').setAttribute('aria-busy', 'true');
  try {
    await switchMode('wan', tracker);
    openDialog(trigger);
  } catch (e) {
    showTrackerError(e.message);
    $('tracker').focus();
  } finally {
    connecting = false;
    $('connect').removeAttribute('aria-busy');
  }
}

function onModeChange(event) {
  const mode = event.target.value;
  setRadios(mode);
  if (mode === 'lan') {
    showTrackerError('');
    const st = S.state;
    if (st && st.mode === 'lan' && (st.state === 'ready' || st.state === 'loading')) return;
    switchMode('lan').catch((e) => { $('mode-note').textContent = e.message; });
    return;
  }
  const tracker = $('tracker').value.trim();
  const st = S.state;
  if (!tracker) {
    showTrackerError('');
    $('mode-note').textContent = 'Enter the tracker address, then Connect.';
    $('tracker').focus();
    return;
  }
  if (st && st.mode === 'wan' && st.tracker === tracker && st.state !== 'failed') openDialog(event.target);
  else connectWan(event.target);
}

// ---------- nodes ----------

function clearNodes() {
  S.nodes = null;
  S.nodesAt = 0;
  S.checked = new Set();
  S.selGen++;
  renderAllNodes();
}

function takeSelection(data) {
  const list = Array.isArray(data.servers) ? data.servers : [];
  S.checked = new Set(list.filter((s) => s.selected).map((s) => s.peer_id));
  S.pinned = new Set(Array.isArray(data.pinned) ? data.pinned : list.filter((s) => s.pinned).map((s) => s.peer_id));
  S.excluded = new Set(Array.isArray(data.excluded) ? data.excluded : list.filter((s) => s.excluded).map((s) => s.peer_id));
}

async function loadNodes({ refresh = false } = {}) {
  if (!ready()) return;
  if (S.nodesInflight && !refresh) return;
  const gen = S.selGen;
  const counted = refresh || !S.nodes;
  S.nodesInflight = true;
  if (counted) setSurveying(+1);
  try {
    const data = await api(refresh ? '/api/nodes?refresh=1' : '/api/nodes');
    // A choice still being saved is newer than what this answer says.
    if (gen === S.selGen && !S.putInflight && data) {
      S.nodesError = null;
      S.nodes = data;
      takeSelection(data);
      renderAllNodes();
    }
  } catch (e) {
    if (gen === S.selGen) {
      S.nodesError = e.message;
      renderAllNodes();
    }
  } finally {
    S.nodesInflight = false;
    S.nodesAt = Date.now();
    if (counted) setSurveying(-1);
  }
}

function setSurveying(delta) {
  S.surveying = Math.max(0, S.surveying + delta);
  const busy = S.surveying > 0;
  $('refresh-progress').hidden = !busy;
  // aria-disabled rather than disabled: the button keeps the focus while the survey runs.
  $('refresh').setAttribute('aria-disabled', String(busy || !ready()));
  $('node-select-wrap').setAttribute('aria-busy', busy ? 'true' : 'false');
}

function renderAllNodes() {
  renderNodesTable();
  renderSelectTable();
  renderCoverage();
  renderModeNote();
  renderDetails();
  renderDialogWait();
  if (!S.route) renderPipeline();
}

// Coverage of the model by the checked servers, computed here for instant feedback.
function localCoverage() {
  const n = modelBlocks();
  const list = servers();
  const cells = [];
  for (let b = 0; b < n; b++) {
    const hosts = list.filter((s) => blocksOf(s.blocks) && s.blocks.start <= b && b < s.blocks.end);
    const state = hosts.some((s) => S.checked.has(s.peer_id)) ? 'selected' : hosts.length ? 'elsewhere' : 'missing';
    cells.push({ block: b, state, hosts: hosts.length });
  }
  return { cells, missing: rangesOf(cells.filter((c) => c.state !== 'selected').map((c) => c.block)) };
}

function rangesOf(blocks) {
  const out = [];
  for (const b of blocks) {
    const last = out[out.length - 1];
    if (last && last.end === b) last.end = b + 1; else out.push({ start: b, end: b + 1 });
  }
  return out;
}

function coverageSentence(missing, n) {
  if (!n) return 'No servers found for this model yet';
  if (!missing.length) return `Selection covers all ${n} blocks`;
  const count = missing.reduce((sum, r) => sum + (r.end - r.start), 0);
  const parts = missing.map(fmtRange).join(', ');
  return count === 1 ? `Block ${missing[0].start} has no selected server` : `Blocks ${parts} have no selected server`;
}

function renderCoverage(local) {
  const n = modelBlocks();
  let cells = null;
  let missing = [];
  if (!local && S.putPending > 0 && S.nodes) local = localCoverage();
  if (local) ({ cells, missing } = local);
  else if (S.nodes && S.nodes.coverage && Array.isArray(S.nodes.coverage.cells)) {
    cells = S.nodes.coverage.cells;
    missing = Array.isArray(S.nodes.coverage.missing) ? S.nodes.coverage.missing : [];
  }
  for (const id of ['coverage-bar', 'modal-coverage-bar']) drawBar($(id), cells, n);
  const status = $('coverage-status');
  if (!cells) {
    status.textContent = S.nodesError ? S.nodesError : ready() ? 'Looking for servers…' : 'Waiting for the swarm…';
    status.removeAttribute('data-covered');
    $('coverage-summary').textContent = '';
    return;
  }
  const covered = n > 0 && missing.length === 0;
  const sentence = coverageSentence(missing, n);
  if (status.textContent !== sentence) status.textContent = sentence;
  status.dataset.covered = String(covered);
  $('coverage-summary').textContent = !n ? '' : covered ? `All ${n} blocks served by the selection` : sentence;
}

function drawBar(bar, cells, n) {
  const model = (S.nodes && S.nodes.model) || (S.state && S.state.model) || 'the model';
  bar.setAttribute('aria-label', `Block coverage of ${model}`);
  if (!cells || !cells.length) {
    bar.replaceChildren(h('span', {
      class: 'placeholder', role: 'listitem',
      text: n ? `${n} blocks — waiting for the node survey` : 'Waiting for the swarm',
    }));
    return;
  }
  bar.style.setProperty('--cells', String(cells.length));
  if (bar.children.length !== cells.length || !bar.firstElementChild.classList.contains('cell')) {
    bar.replaceChildren(...cells.map(() => h('span', { class: 'cell', role: 'listitem' })));
  }
  cells.forEach((c, i) => {
    const cell = bar.children[i];
    const hosts = isNum(c.hosts) ? c.hosts : 0;
    const label = `block ${c.block}: ${hosts === 0 ? 'no servers' : hosts === 1 ? '1 server' : `${hosts} servers`}, ${CELL_TEXT[c.state] || c.state}`;
    cell.className = `cell ${c.state}`;
    if (cell.getAttribute('aria-label') !== label) {
      cell.setAttribute('aria-label', label);
      cell.title = label;
    }
  });
}

function scoreCell(s) {
  const total = s.score && isNum(s.score.total) ? s.score.total : null;
  const fill = h('span');
  fill.style.width = `${Math.max(0, Math.min(100, total || 0))}%`;
  return h('span', { class: 'score' }, h('span', { class: 'bar', 'aria-hidden': 'true' }, fill), total === null ? '—' : total.toFixed(1));
}

function reachCell(s) {
  const r = s.reachability || {};
  const path = r.path || 'unknown';
  return h('td', { class: 'wrap' },
    badge(path, REACH_TEXT[path] || path),
    r.error ? h('span', { class: 'reach-note error', text: r.error }) : null,
    r.hint ? h('span', { class: 'reach-note', text: r.hint }) : null);
}

const memoryText = (s) => `${fmtGB(s.memory_free)} ${s.gpu ? 'VRAM' : 'RAM'}`;

function renderNodesTable() {
  const body = $('nodes-table').tBodies[0];
  const list = servers();
  const rows = list.map((s) => {
    const fresh = S.seen.size > 0 && !S.seen.has(s.peer_id);
    const status = s.status || (s.selected ? 'selected' : '-');
    return h('tr', { class: fresh ? 'fresh' : null },
      h('td', { class: 'num', text: isNum(s.rank) ? s.rank : '' }),
      h('td', { class: 'name-cell', title: s.summary || s.name || '', text: s.name || '(unnamed)' }),
      h('td', { title: spanTitle(s.blocks), text: fmtSpan(s.blocks) }),
      h('td', null, scoreCell(s)),
      h('td', { class: 'num', text: fmtMs(s.ping_ms) }),
      h('td', { text: `${s.gpu ? 'GPU' : 'CPU'} · ${memoryText(s)}` }),
      h('td', null, badge(status === '-' ? 'none' : status, STATUS_TEXT[status] || status)),
      reachCell(s));
  });
  body.replaceChildren(...rows);
  for (const s of list) S.seen.add(s.peer_id);
  const empty = $('nodes-empty');
  const st = S.state;
  let msg = '';
  if (!list.length) {
    if (S.nodesError) msg = S.nodesError;
    else if (!st || st.state !== 'ready') msg = 'Nodes appear here once the swarm is ready.';
    else if (!S.nodes) msg = st.mode === 'lan' ? 'Searching the local network…' : 'Surveying servers…';
    else msg = st.mode === 'lan'
      ? 'No machines found on this network yet. They appear here as they are discovered.'
      : 'The tracker knows no servers for this model yet.';
  }
  empty.textContent = msg;
  empty.hidden = !msg;
  // Servers whose weights differ from this model's copy: never used.
  const skipped = S.nodes && Array.isArray(S.nodes.skipped_servers) ? S.nodes.skipped_servers : [];
  const skipList = $('nodes-skipped');
  skipList.replaceChildren(...skipped.map((k) => h('li', {
    text: `Skipped ${k.name || k.peer_id} (${fmtSpan(k.blocks)}): ${k.reason}`,
  })));
  skipList.hidden = !skipped.length;
  const mode = serverMode();
  $('nodes-caption').textContent = list.length
    ? `${list.length} found${mode === 'lan' ? ' on this network (updates every few seconds)' : mode === 'wan' ? ' through the tracker' : ''}`
    : '';
}

// The node selector's rows.
// Rows are kept per peer and updated in place: elements (and the focus, and a
// click in progress, and a test's element references) survive every refresh.
const selectRows = new Map();

function selectRow(peer) {
  let row = selectRows.get(peer);
  if (row) return row;
  const box = h('input', { type: 'checkbox', 'data-key': `use:${peer}` });
  box.addEventListener('change', () => onUseChange(peer, box.checked));
  const pin = h('button', { type: 'button', class: 'small-btn', 'data-key': `pin:${peer}`, text: 'Pin' });
  pin.addEventListener('click', () => onPinToggle(peer));
  const det = h('button', {
    type: 'button', class: 'small-btn', 'aria-controls': 'node-details', 'data-key': `det:${peer}`, text: 'Details',
  });
  det.addEventListener('click', () => openDetails(peer));
  const cells = Array.from({ length: 10 }, () => h('td'));
  const tr = h('tr', null, h('td', null, box), cells, h('td', null, pin), h('td', null, det));
  row = { tr, box, pin, det, cells };
  selectRows.set(peer, row);
  return row;
}

function fill(td, cls, title, ...content) {
  td.className = cls || '';
  if (title) td.title = title; else td.removeAttribute('title');
  td.replaceChildren(...content.filter((c) => c !== null && c !== undefined));
}

function renderSelectTable() {
  const table = $('node-select-table');
  // Reordering rows between a press and its release would swallow the click.
  if (S.pressing) {
    S.renderPending = true;
    return;
  }
  S.renderPending = false;
  const body = table.tBodies[0];
  const active = document.activeElement;
  const list = servers();
  const keep = new Set(list.map((s) => s.peer_id));
  for (const [peer, row] of selectRows) {
    if (!keep.has(peer)) {
      row.tr.remove();
      selectRows.delete(peer);
    }
  }
  list.forEach((s, i) => {
    const peer = s.peer_id;
    const name = s.name || '(unnamed)';
    const checked = S.checked.has(peer);
    const pinned = S.pinned.has(peer);
    const status = s.status || (s.selected ? 'selected' : '-');
    const row = selectRow(peer);
    const { box, pin, det, cells } = row;
    box.setAttribute('aria-label', `Use ${name}`);
    box.checked = checked;
    pin.setAttribute('aria-label', `Pin ${name}`);
    pin.setAttribute('aria-pressed', String(pinned));
    pin.title = pinned ? 'Pinned: always used' : 'Pin: always use this node';
    det.setAttribute('aria-label', `Details for ${name}`);
    det.setAttribute('aria-expanded', String(S.detailsPeer === peer));
    row.tr.className = [checked ? '' : 'unchecked', S.detailsPeer === peer ? 'is-detailed' : ''].join(' ').trim();
    const r = s.reachability || {};
    const path = r.path || 'unknown';
    fill(cells[0], 'num', null, isNum(s.rank) ? String(s.rank) : '');
    fill(cells[1], 'name-cell', s.summary || name, name);
    fill(cells[2], '', null, scoreCell(s));
    fill(cells[3], 'num', null, fmtMs(s.ping_ms));
    fill(cells[4], 'num', null, fmtMbit(s.upload_bps));
    fill(cells[5], 'num', null, fmtMbit(s.download_bps));
    fill(cells[6], '', s.hardware || '', `${s.gpu ? 'GPU' : 'CPU'} · ${memoryText(s)}`);
    fill(cells[7], '', spanTitle(s.blocks), fmtSpan(s.blocks));
    fill(cells[8], '', null, badge(status === '-' ? 'none' : status, STATUS_TEXT[status] || status));
    fill(cells[9], 'wrap', [r.error, r.hint].filter(Boolean).join('\n'), badge(path, REACH_TEXT[path] || path),
      r.error ? h('span', { class: 'reach-note error', text: r.error }) : null);
    if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
  });
  if (active && table.contains(active) && document.activeElement !== active && active.isConnected) active.focus();
  const empty = $('node-select-empty');
  let msg = '';
  if (!list.length && ready()) {
    msg = S.nodesError || (S.nodes ? 'No servers found for this model yet. Try Refresh in a moment.' : '');
  }
  empty.textContent = msg;
  empty.hidden = !msg;
  $('node-select-wrap').hidden = !list.length;
  $('modal-coverage').hidden = !S.nodes;
  $('reset-selection').disabled = !S.nodes;
}

function selectionNote(text, isError = false) {
  const note = $('selection-note');
  note.textContent = text || '';
  note.classList.toggle('error', isError);
}

function onUseChange(peer, checked) {
  if (checked) {
    S.checked.add(peer);
    const s = findServer(peer);
    if (!(s && s.selected)) S.pinned.add(peer);
    S.excluded.delete(peer);
  } else {
    S.checked.delete(peer);
    S.excluded.add(peer);
    S.pinned.delete(peer);
  }
  commitSelection();
}

function onPinToggle(peer) {
  if (S.pinned.has(peer)) {
    S.pinned.delete(peer);
  } else {
    S.pinned.add(peer);
    S.excluded.delete(peer);
    S.checked.add(peer);
  }
  commitSelection();
}

function commitSelection(reset = false) {
  if (reset) {
    S.pinned = new Set();
    S.excluded = new Set();
  }
  // Instant feedback from the checkboxes, then the server's answer.
  if (!reset) renderCoverage(localCoverage());
  renderSelectTable();
  S.selGen++;
  selectionNote('Saving selection…');
  // One PUT at a time, so the server applies the choices in the order they
  // were made; changes made meanwhile go in one PUT when it answers.
  if (S.putInflight) {
    S.putQueued = { reset: S.putQueued ? S.putQueued.reset || reset : reset };
    return;
  }
  sendSelection(reset);
}

function sendSelection(reset) {
  const wanted = new Set(S.checked);
  const gen = S.selGen;
  S.putInflight = true;
  S.putPending++;
  const settle = () => {
    S.putInflight = false;
    S.putPending = Math.max(0, S.putPending - 1);
    const queued = S.putQueued;
    S.putQueued = null;
    if (queued) sendSelection(queued.reset);
    return !queued;
  };
  api('/api/selection', { method: 'PUT', body: { pinned: [...S.pinned], excluded: [...S.excluded] } })
    .then((data) => {
      if (!settle() || gen !== S.selGen || !data) return;
      S.nodes = data;
      S.nodesAt = Date.now();
      S.nodesError = null;
      takeSelection(data);
      renderAllNodes();
      selectionNote(reset ? 'Back to the automatic selection.' : describeAnswer(wanted, data));
    })
    .catch((e) => {
      if (!settle() || gen !== S.selGen) return;
      selectionNote(`Could not save the selection: ${e.message}`, true);
      S.selGen++;
      loadNodes();
    });
}

function describeAnswer(wanted, data) {
  const list = Array.isArray(data.servers) ? data.servers : [];
  const nameOf = (s) => s.name || s.peer_id;
  const added = list.filter((s) => s.selected && !wanted.has(s.peer_id)).map(nameOf);
  const dropped = list.filter((s) => !s.selected && wanted.has(s.peer_id)).map(nameOf);
  const parts = ['Saved.'];
  if (added.length) parts.push(`The swarm also chose ${added.join(', ')}.`);
  if (dropped.length) parts.push(`Not used: ${dropped.join(', ')}.`);
  const notes = data.selection && Array.isArray(data.selection.notes) ? data.selection.notes : [];
  for (const n of notes) parts.push(humanError(n) + (/[.!?]$/.test(String(n)) ? '' : '.'));
  return parts.join(' ');
}

// ---------- details panel ----------

function openDetails(peer) {
  S.detailsPeer = peer;
  renderDetails();
  renderSelectTable();
  const panel = $('node-details');
  panel.scrollIntoView({ block: 'nearest' });
  $('details-headline').focus();
}

function closeDetails() {
  const peer = S.detailsPeer;
  S.detailsPeer = null;
  renderDetails();
  renderSelectTable();
  const back = peer && $('node-select-table').querySelector(`[data-key="${CSS.escape(`det:${peer}`)}"]`);
  if (back) back.focus();
}

function renderDetails() {
  const panel = $('node-details');
  const s = S.detailsPeer ? findServer(S.detailsPeer) : null;
  if (!s) {
    panel.hidden = true;
    if (S.detailsPeer && S.nodes) S.detailsPeer = null;
    return;
  }
  panel.hidden = false;
  $('details-headline').textContent = s.summary || s.name || s.peer_id;
  const r = s.reachability || {};
  const sc = s.score || {};
  const components = h('div', { class: 'components' });
  for (const key of ['ping', 'upload', 'download', 'memory', 'compute']) {
    const v = isNum(sc[key]) ? sc[key] : null;
    const fill = h('span');
    fill.style.width = `${Math.round((v || 0) * 100)}%`;
    components.append(h('span', { text: key }), h('span', { class: 'bar', 'aria-hidden': 'true' }, fill), h('span', { text: v === null ? '—' : v.toFixed(2) }));
  }
  const bw = (measured, reported) => {
    let t = fmtMbit(measured);
    if (isNum(reported) && reported > 0 && reported !== measured) t += ` (reports ${fmtMbit(reported)})`;
    return t;
  };
  const status = s.status || (s.selected ? 'selected' : '-');
  const rows = [
    ['Name', s.name || '(unnamed)'],
    ['Peer ID', h('span', { class: 'mono', text: s.peer_id || '—' })],
    ['Rank', isNum(s.rank) ? `#${s.rank}` : '—'],
    ['Status', `${STATUS_TEXT[status] || status}${s.pinned && status !== 'pinned' ? ' · pinned' : ''}${s.excluded && status !== 'excluded' ? ' · excluded' : ''}`],
    ['Blocks', blocksOf(s.blocks) ? `${fmtSpan(s.blocks)}: ${spanTitle(s.blocks)}` : '—'],
    ['Hardware', s.hardware || '—'],
    ['Compute', s.gpu ? 'GPU' : 'CPU'],
    ['Memory free', memoryText(s)],
    ['CPU cores', fmtInt(s.cpu_cores)],
    ['Throughput', isNum(s.throughput) ? `${fmt(s.throughput)} blocks × tokens/s` : '—'],
    ['Cache free', isNum(s.cache_tokens_free) ? `${fmtInt(s.cache_tokens_free)} tokens` : '—'],
    ['Sessions', fmtInt(s.sessions)],
    ['Version', s.software_version || '—'],
    ['Ping', fmtMs(s.ping_ms)],
    ['Upload', bw(s.upload_bps, s.reported_upload_bps)],
    ['Download', bw(s.download_bps, s.reported_download_bps)],
    ['Score', isNum(sc.total) ? `${sc.total.toFixed(1)} / 100` : '—'],
    ['Score components', components],
    ['Reachability', REACH_TEXT[r.path] || r.path || 'Unknown'],
    ['Last error', r.error || 'none'],
    ['Hint', r.hint || '—'],
  ];
  $('details-list').replaceChildren(...rows.flatMap(([k, v]) => [h('dt', { text: k }), h('dd', null, v)]));
}

// ---------- node selector dialog ----------

function openDialog(trigger) {
  const dlg = $('node-dialog');
  if (!dlg.open) {
    const active = document.activeElement;
    S.returnFocus = trigger instanceof HTMLElement ? trigger : active && active !== document.body ? active : null;
    dlg.showModal();
  }
  $('node-dialog-title').focus();
  renderDialogWait();
  renderAllNodes();
  if (ready() && (!S.nodes || Date.now() - S.nodesAt > 5000)) loadNodes();
}

function renderDialogWait() {
  const box = $('dialog-wait');
  const st = S.state;
  let text = '';
  let failed = false;
  if (!st) text = 'Connecting to the dashboard…';
  else if (st.state === 'loading') {
    const p = st.progress || {};
    const stage = [p.stage, p.detail].filter(Boolean).join(': ');
    text = `${st.mode === 'wan' ? 'Connecting to the tracker' : 'Starting'}${stage ? ` — ${stage}` : '…'}`;
  } else if (st.state === 'failed') {
    failed = true;
    text = `The swarm could not start: ${st.message || 'unknown error'}`;
  } else if (st.state !== 'ready') text = 'Choose a swarm mode first.';
  else if (!S.nodes && !S.nodesError) text = 'Surveying servers… this takes a few seconds.';
  box.hidden = !text;
  box.classList.toggle('failed', failed);
  $('refresh').setAttribute('aria-disabled', String(!ready() || S.surveying > 0));
  $('dialog-wait-text').textContent = text;
}

// ---------- pipeline ----------

async function loadRoute() {
  try {
    const route = await api('/api/route');
    S.route = route && Array.isArray(route.hops) ? route : null;
    S.routeLive = false;
    renderPipeline();
  } catch { /* keep what is shown */ }
}

function hopItem(hop, extraClass) {
  const bits = [];
  if (hop.path) bits.push(badge(hop.path, hop.path));
  if (hop.latency_ms !== undefined) bits.push(` ${fmtMs(hop.latency_ms)}`);
  return h('li', null, h('div', { class: `hop ${extraClass || ''}`.trim(), title: hop.peer_id || '' },
    h('strong', { text: hop.name || 'server' }),
    h('span', { class: 'muted', title: spanTitle(hop.blocks), text: `blocks ${fmtSpan(hop.blocks)}` }),
    bits.length ? h('span', { class: 'hop-meta' }, bits) : null));
}

function renderPipeline() {
  const box = $('pipeline');
  const route = S.route;
  const caption = $('pipeline-caption');
  if (!route) {
    const planned = S.nodes && S.nodes.route;
    if (planned && Array.isArray(planned.hops) && planned.hops.length) {
      caption.textContent = 'Planned route';
      const est = isNum(planned.est_secs_per_token) ? `Estimated ${fmtMs(planned.est_secs_per_token * 1000)} per token.` : '';
      box.replaceChildren(
        h('ol', { class: 'chain', 'aria-label': 'Planned route' },
          h('li', null, h('div', { class: 'hop client' }, h('strong', { text: 'Client' }), h('span', { class: 'muted', text: 'embeds the prompt' }))),
          planned.hops.map((hop) => hopItem({ ...hop, latency_ms: isNum(hop.est_secs) ? hop.est_secs * 1000 : undefined })),
          h('li', null, h('div', { class: 'hop client' }, h('strong', { text: 'Client' }), h('span', { class: 'muted', text: 'samples the next token' })))),
        h('p', { class: 'stats small', text: est }));
    } else {
      caption.textContent = '';
      const missing = S.nodes && S.nodes.coverage && Array.isArray(S.nodes.coverage.missing) ? S.nodes.coverage.missing : [];
      const text = S.nodes && missing.length
        ? `No route yet: ${coverageSentence(missing, modelBlocks()).replace(/^B/, 'b')}.`
        : 'The chain of machines that serves your next answer will show here.';
      box.replaceChildren(h('p', { class: 'empty small', text }));
    }
    return;
  }
  caption.textContent = S.routeLive ? 'Answer in progress' : 'Last answer';
  const local = blocksOf(route.local_blocks);
  const chain = h('ol', { class: 'chain', 'aria-label': 'Route of the last answer' },
    h('li', null, h('div', { class: 'hop client' }, h('strong', { text: 'Client' }),
      h('span', { class: 'muted', text: local ? `embeds the prompt, runs blocks ${fmtSpan(local)}` : 'embeds the prompt' }))),
    route.hops.map((hop) => hopItem({ ...hop, latency_ms: hop.latency_ms === undefined ? null : hop.latency_ms })),
    h('li', null, h('div', { class: 'hop client' }, h('strong', { text: 'Client' }), h('span', { class: 'muted', text: 'samples the next token' }))));
  const nodes = [chain];
  const failovers = Array.isArray(route.failovers) ? route.failovers : [];
  if (failovers.length) {
    nodes.push(h('ul', { class: 'failovers', 'aria-label': 'Failovers' }, failovers.map((f) => {
      const lost = f.lost || {};
      const repl = Array.isArray(f.replaced_by) ? f.replaced_by : [];
      const text = `Lost ${lost.name || 'a server'} (blocks ${fmtSpan(lost.blocks)}): ${f.error || 'unknown error'}. `
        + (repl.length ? `Replaced by ${repl.map((r) => `${r.name || 'server'} (${fmtSpan(r.blocks)})`).join(', ')}` : 'No replacement')
        + (isNum(f.took_ms) ? ` in ${fmtMs(f.took_ms)}` : '')
        + (isNum(f.replayed_positions) ? `, replayed ${f.replayed_positions} positions.` : '.');
      return h('li', { text });
    })));
  }
  const stats = [];
  if (isNum(route.ttft_ms)) stats.push(`first token ${fmtMs(route.ttft_ms)}`);
  if (isNum(route.tokens_per_s)) stats.push(`${route.tokens_per_s.toFixed(1)} tokens/s`);
  if (isNum(route.prompt_tokens) || isNum(route.completion_tokens)) {
    stats.push(`${fmtInt(route.prompt_tokens)} prompt + ${fmtInt(route.completion_tokens)} completion tokens`);
  }
  if (isNum(route.finished_at_ms)) stats.push(`at ${new Date(route.finished_at_ms).toLocaleTimeString()}`);
  nodes.push(h('p', { class: 'stats small', text: stats.join(' · ') }));
  box.replaceChildren(...nodes);
}

// ---------- models ----------

async function loadModels() {
  if (!ready()) return;
  S.modelsAt = Date.now();
  const box = $('models');
  try {
    const data = await api('/v1/models');
    S.models = data && Array.isArray(data.data) ? data.data : [];
  } catch (e) {
    box.replaceChildren(h('p', { class: 'empty small', text: e.message }));
    return;
  }
  if (!S.models.length) {
    box.replaceChildren(h('p', { class: 'empty small', text: 'No models are served in this swarm yet.' }));
    return;
  }
  const rows = S.models.map((m) => {
    const cov = isNum(m.coverage) ? Math.max(0, Math.min(1, m.coverage)) : null;
    const fill = h('span');
    fill.style.width = `${Math.round((cov || 0) * 100)}%`;
    return h('tr', null,
      h('td', { class: 'name-cell', title: m.id || '', text: m.id || '—' }),
      h('td', { class: 'num', text: fmtInt(m.blocks) }),
      h('td', null, h('span', { class: 'score' }, h('span', { class: 'bar', 'aria-hidden': 'true' }, fill),
        cov === null ? '—' : `${Math.round(cov * 100)}%`)),
      h('td', { class: 'num', text: fmtInt(m.servers) }),
      h('td', null, m.chat ? badge('ok', 'Yes') : h('span', { class: 'muted', text: 'No' })));
  });
  box.replaceChildren(h('table', { class: 'table compact', id: 'models-table' },
    h('thead', null, h('tr', null,
      h('th', { scope: 'col', text: 'Model' }), h('th', { scope: 'col', class: 'num', text: 'Blocks' }),
      h('th', { scope: 'col', text: 'Coverage' }), h('th', { scope: 'col', class: 'num', text: 'Servers' }),
      h('th', { scope: 'col', text: 'Chat' }))),
    h('tbody', null, rows)));
}

// ---------- chat ----------

const messagesBox = $('messages');

function nearBottom() {
  return messagesBox.scrollHeight - messagesBox.scrollTop - messagesBox.clientHeight < 48;
}

function scrollDown(force) {
  if (force) messagesBox.scrollTop = messagesBox.scrollHeight;
}

function addUserMessage(text) {
  $('messages-empty').hidden = true;
  const el = h('article', { class: 'msg user', 'aria-label': 'You' },
    h('div', { class: 'msg-role', text: 'You' }), h('div', { class: 'msg-text', text }));
  messagesBox.append(el);
  return el;
}

function addAssistantMessage() {
  const old = $('last-answer');
  if (old) old.removeAttribute('id');
  const text = h('div', { class: 'msg-text', id: 'last-answer' });
  const typing = h('span', { class: 'typing', 'aria-hidden': 'true' }, h('i'), h('i'), h('i'));
  const el = h('article', { class: 'msg assistant', 'aria-label': 'Assistant', 'data-streaming': 'true' },
    h('div', { class: 'msg-role', text: 'Assistant' }), typing, text,
    h('div', { class: 'msg-error', role: 'alert', hidden: true }),
    h('div', { class: 'msg-meta' }));
  messagesBox.append(el);
  return el;
}

function updateChatButtons() {
  const streaming = !!S.stream;
  // A button that is about to be disabled would drop the focus to <body>.
  const active = document.activeElement;
  if (active && ['send', 'stop', 'retry', 'clear'].includes(active.id)) {
    const off = active.id === 'send' ? streaming : active.id === 'stop' ? !streaming
      : active.id === 'retry' ? streaming || !S.turns.length : !streaming && !S.turns.length;
    if (off) $(streaming ? 'stop' : 'prompt').focus();
  }
  $('send').disabled = streaming;
  $('stop').disabled = !streaming;
  $('retry').disabled = streaming || S.turns.length === 0;
  $('clear').disabled = !streaming && S.turns.length === 0;
}

function historyFor(turn) {
  const messages = [];
  for (const t of S.turns) {
    if (t === turn) {
      messages.push({ role: 'user', content: t.user });
      break;
    }
    if (t.answer) messages.push({ role: 'user', content: t.user }, { role: 'assistant', content: t.answer });
  }
  return messages;
}

function sendPrompt() {
  if (S.stream) return;
  const prompt = $('prompt');
  const text = prompt.value.trim();
  if (!text) {
    prompt.focus();
    return;
  }
  prompt.value = '';
  const turn = { user: text, answer: '', userEl: addUserMessage(text), el: null };
  S.turns.push(turn);
  runTurn(turn);
}

function retryLast() {
  if (S.stream || !S.turns.length) return;
  const turn = S.turns[S.turns.length - 1];
  if (turn.el) turn.el.remove();
  turn.answer = '';
  runTurn(turn);
}

function clearChat() {
  if (S.stream) S.stream.controller.abort();
  S.turns = [];
  for (const el of [...messagesBox.querySelectorAll('.msg')]) el.remove();
  $('messages-empty').hidden = false;
  $('metrics').textContent = '\u00a0';
  updateChatButtons();
  $('prompt').focus();
}

function settingNumber(id, fallback, min, max) {
  const v = Number($(id).value);
  return Number.isFinite(v) && $(id).value !== '' ? Math.min(max, Math.max(min, v)) : fallback;
}

// Splits an SSE byte stream into events; chunks may split anywhere.
function sseParser(onEvent, onComment) {
  let buffer = '';
  let data = [];
  const line = (raw) => {
    const l = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (l === '') {
      if (data.length) onEvent(data.join('\n'));
      data = [];
    } else if (l.startsWith(':')) {
      onComment(l.slice(1).trimStart());
    } else {
      const colon = l.indexOf(':');
      const field = colon < 0 ? l : l.slice(0, colon);
      let value = colon < 0 ? '' : l.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'data') data.push(value);
    }
  };
  return {
    push(text) {
      buffer += text;
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        line(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
    },
    end() {
      if (buffer) line(buffer);
      buffer = '';
      line('');
    },
  };
}

async function runTurn(turn) {
  const el = addAssistantMessage();
  turn.el = el;
  const textEl = el.querySelector('.msg-text');
  const typing = el.querySelector('.typing');
  const errEl = el.querySelector('.msg-error');
  const metaEl = el.querySelector('.msg-meta');
  const controller = new AbortController();
  S.stream = { controller, turn };
  updateChatButtons();
  messagesBox.setAttribute('aria-busy', 'true');
  scrollDown(true);

  const started = performance.now();
  let firstAt = null;
  let pieces = 0;
  let usage = null;
  let timing = null;
  let finish = null;
  let failure = null;
  let done = false;
  const metrics = $('metrics');
  metrics.textContent = 'Waiting for the first token…';

  const append = (piece) => {
    if (!piece) return;
    const stick = nearBottom();
    if (firstAt === null) {
      firstAt = performance.now();
      typing.remove();
    }
    pieces += 1;
    turn.answer += piece;
    if (textEl.firstChild) textEl.firstChild.appendData(piece); else textEl.append(document.createTextNode(piece));
    metrics.textContent = `Streaming… ${pieces} tokens · first token ${fmtMs(firstAt - started)}`;
    scrollDown(stick);
  };

  const onEvent = (payload) => {
    if (done) return;
    if (payload.trim() === '[DONE]') {
      done = true;
      return;
    }
    let msg;
    try { msg = JSON.parse(payload); } catch { return; }
    if (msg.error) {
      failure = humanError(msg.error.message || msg.error);
      return;
    }
    const choice = msg.choices && msg.choices[0];
    if (choice) {
      const delta = choice.delta || {};
      if (typeof delta.content === 'string') append(delta.content);
      else if (typeof choice.text === 'string') append(choice.text);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (msg.usage) usage = msg.usage;
  };

  const onComment = (text) => {
    const space = text.indexOf(' ');
    const name = space < 0 ? text : text.slice(0, space);
    const rest = space < 0 ? '' : text.slice(space + 1);
    let obj = null;
    try { obj = rest ? JSON.parse(rest) : null; } catch { return; }
    if (!obj) return;
    if (name === 'route' && Array.isArray(obj.hops)) {
      S.route = { failovers: [], ...obj };
      S.routeLive = true;
      renderPipeline();
    } else if (name === 'timing') {
      timing = obj;
    } else if (name === 'failover') {
      if (S.route) {
        S.route.failovers = [...(S.route.failovers || []), obj];
        renderPipeline();
      }
    }
  };

  let reachedStream = false;
  try {
    const res = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: { ...authHeaders(true), Accept: 'text/event-stream' },
      signal: controller.signal,
      body: JSON.stringify({
        model: (S.state && S.state.model) || undefined,
        messages: historyFor(turn),
        stream: true,
        max_tokens: Math.round(settingNumber('max-tokens', 256, 1, 32768)),
        temperature: settingNumber('temperature', 0, 0, 2),
      }),
    });
    if (!res.ok) {
      if (res.status === 401) showAuthBanner();
      throw errorFromBody(res.status, await res.text());
    }
    reachedStream = true;
    const parser = sseParser(onEvent, onComment);
    if (res.body && res.body.getReader) {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        parser.push(decoder.decode(value, { stream: true }));
        if (done) {
          reader.cancel().catch(() => {});
          break;
        }
      }
      parser.push(decoder.decode());
    } else {
      parser.push(await res.text());
    }
    parser.end();
  } catch (e) {
    if (e.name === 'AbortError') {
      if (!done) finish = 'stopped';
    } else if (e instanceof ApiError) {
      failure = e.message;
    } else {
      failure = reachedStream ? `The connection broke during the answer (${e.message})` : 'Cannot reach the dashboard server';
    }
  }

  // Finish: metrics, errors, route.
  typing.remove();
  el.removeAttribute('data-streaming');
  const endAt = performance.now();
  const ttft = timing && isNum(timing.ttft_ms) ? timing.ttft_ms : firstAt !== null ? firstAt - started : null;
  const completion = usage && isNum(usage.completion_tokens) ? usage.completion_tokens : pieces;
  let tps = timing && isNum(timing.tokens_per_s) ? timing.tokens_per_s : null;
  if (tps === null && firstAt !== null && completion > 1 && endAt > firstAt) tps = ((completion - 1) * 1000) / (endAt - firstAt);
  const parts = [];
  if (ttft !== null) parts.push(`first token ${fmtMs(ttft)}`);
  if (tps !== null) parts.push(`${tps.toFixed(1)} tokens/s`);
  if (usage && isNum(usage.prompt_tokens)) parts.push(`${usage.prompt_tokens} prompt + ${completion} completion tokens`);
  else if (pieces) parts.push(`${completion} tokens`);
  if (finish === 'length') parts.push('stopped at max tokens');
  if (finish === 'stopped') parts.push('stopped by you');
  if (failure) {
    errEl.textContent = failure;
    errEl.hidden = false;
  }
  metaEl.textContent = parts.join(' · ');
  if (!S.turns.includes(turn)) metrics.textContent = '\u00a0'; // cleared while streaming
  else metrics.textContent = failure ? 'The last answer failed.' : parts.length ? `Last answer: ${parts.join(' · ')}` : '\u00a0';
  S.stream = null;
  messagesBox.setAttribute('aria-busy', 'false');
  updateChatButtons();
  scrollDown(nearBottom() || !!failure);
  if (reachedStream) loadRoute();
}

// ---------- wiring ----------

function wire() {
  // click (not change) so choosing the current mode again retries a failed start or reopens the selector;
  // arrow keys in the group fire click too.
  $('mode-lan').addEventListener('click', onModeChange);
  $('mode-wan').addEventListener('click', onModeChange);
  $('wan-form').addEventListener('submit', (e) => {
    e.preventDefault();
    connectWan($('connect'));
  });
  $('tracker').addEventListener('input', () => showTrackerError(''));
  $('open-selector').addEventListener('click', () => openDialog($('open-selector')));

  const dlg = $('node-dialog');
  $('dialog-close').addEventListener('click', () => dlg.close());
  dlg.addEventListener('click', (e) => { if (e.target === dlg) dlg.close(); });
  dlg.addEventListener('close', () => {
    S.detailsPeer = null;
    renderDetails();
    const back = S.returnFocus;
    S.returnFocus = null;
    if (back && document.contains(back) && typeof back.focus === 'function') back.focus();
  });
  $('refresh').addEventListener('click', () => {
    if ($('refresh').getAttribute('aria-disabled') !== 'true') loadNodes({ refresh: true });
  });
  $('reset-selection').addEventListener('click', () => commitSelection(true));
  $('details-close').addEventListener('click', closeDetails);
  $('node-select-table').addEventListener('pointerdown', () => { S.pressing = true; });
  const release = () => {
    if (!S.pressing) return;
    S.pressing = false;
    if (S.renderPending) setTimeout(renderSelectTable, 0);
  };
  document.addEventListener('pointerup', release, true);
  document.addEventListener('pointercancel', release, true);

  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    sendPrompt();
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      sendPrompt();
    }
  });
  $('stop').addEventListener('click', () => { if (S.stream) S.stream.controller.abort(); });
  $('retry').addEventListener('click', retryLast);
  $('clear').addEventListener('click', clearChat);
}

function heartbeat() {
  if (!ready() || document.hidden) return;
  const lan = serverMode() === 'lan';
  const every = lan ? 3000 : $('node-dialog').open ? 15000 : 30000;
  if (!S.nodesInflight && Date.now() - S.nodesAt > every) loadNodes();
  if (Date.now() - S.modelsAt > 20000) loadModels();
}

wire();
updateChatButtons();
renderAllNodes();
pollState();
setInterval(heartbeat, 1000);
