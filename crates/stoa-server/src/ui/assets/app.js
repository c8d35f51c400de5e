// Stoa dashboard: the live parts. Pages work without this file; it adds live output,
// refreshing tables and charts, confirmations and the start form's kind switch.
(function () {
  'use strict';

  // Confirmation before destructive actions (forms with data-confirm).
  document.addEventListener('submit', function (e) {
    var msg = e.target.getAttribute('data-confirm');
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  // Replaces el's content with the fragment at its data-refresh URL every `ms`.
  function refresh(el, ms) {
    var timer = setInterval(function () {
      fetch(el.dataset.refresh, { credentials: 'same-origin' })
        .then(function (r) {
          // Signed out meanwhile (the fragment became the sign-in page): show that page.
          if (r.redirected) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (t) { if (t !== null && t !== el.innerHTML) el.innerHTML = t; })
        .catch(function () {});
    }, ms);
    return function () { clearInterval(timer); };
  }

  var rows = document.getElementById('runs-rows');
  if (rows && rows.dataset.refresh) refresh(rows, 2000);

  // The start form shows the fields of the kind chosen.
  var start = document.getElementById('start');
  if (start) {
    var show = function () {
      var k = start.querySelector('input[name=kind]:checked');
      ['python', 'image', 'compose'].forEach(function (n) {
        start.querySelector('.kind-' + n).hidden = !!k && n !== k.value;
      });
    };
    start.addEventListener('change', show);
    show();
  }

  var head = document.getElementById('run-head');
  if (!head || !window.EventSource) return;

  // ANSI SGR colours to spans (the same classes the server renders).
  function esc(s) {
    return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  }
  function ansi(text) {
    var out = '', open = false, re = /\x1b(?:\[([0-9;]*)([A-Za-z])?)?/g, last = 0, m;
    while ((m = re.exec(text)) !== null) {
      out += esc(text.slice(last, m.index));
      last = re.lastIndex;
      if (m[2] !== 'm') continue;
      if (open) { out += '</span>'; open = false; }
      var cls = (m[1] || '').split(';').map(Number).filter(function (n) { return !isNaN(n); })
        .map(function (n) {
          if (n === 1) return 'b';
          if (n >= 30 && n <= 37) return 'c' + (n - 30);
          if (n >= 90 && n <= 97) return 'c' + (n - 90 + 8);
          return null;
        }).filter(Boolean);
      if (cls.length) { out += '<span class="' + cls.join(' ') + '">'; open = true; }
    }
    out += esc(text.slice(last));
    if (open) out += '</span>';
    return out;
  }

  var out = document.getElementById('output');
  var follow = document.getElementById('follow');
  var search = document.getElementById('search');
  var service = document.getElementById('service');
  var live = document.getElementById('live-state');
  var compose = head.dataset.kind === 'compose';
  var services = {};

  function visible(div) {
    var q = search.value;
    var s = service ? service.value : '';
    div.hidden = (q !== '' && div._raw.indexOf(q) < 0) || (s !== '' && div.dataset.svc !== s);
  }
  function refilter() {
    Array.prototype.forEach.call(out.children, visible);
  }
  search.addEventListener('input', refilter);
  if (service) service.addEventListener('change', refilter);

  function append(content, stream) {
    var pieces = content.match(/[^\n]*\n|[^\n]+$/g) || [];
    pieces.forEach(function (p) {
      var lastDiv = out.lastElementChild;
      var div;
      if (lastDiv && lastDiv._raw !== undefined && !/\n$/.test(lastDiv._raw) && lastDiv._stream === stream) {
        div = lastDiv;
        div._raw += p;
      } else {
        div = document.createElement('div');
        div.className = 'l' + (stream === 'stderr' ? ' err' : '');
        div._raw = p;
        div._stream = stream;
        out.appendChild(div);
      }
      if (compose) {
        var m = /^([A-Za-z0-9_.-]+) \| /.exec(div._raw);
        if (m) {
          div.dataset.svc = m[1];
          if (service && !services[m[1]]) {
            services[m[1]] = true;
            var o = document.createElement('option');
            o.value = o.textContent = m[1];
            service.appendChild(o);
          }
        }
      }
      div.innerHTML = ansi(div._raw.replace(/\n$/, ''));
      visible(div);
    });
    if (follow.checked) out.scrollTop = out.scrollHeight;
  }

  var charts = document.getElementById('charts');
  var stopCharts = charts && charts.dataset.refresh ? refresh(charts, 3000) : null;
  var wasActive = ['pending', 'starting', 'running'].indexOf(head.dataset.status) >= 0;

  function setState(status, reason) {
    var st = document.getElementById('run-state');
    if (st) st.textContent = status;
    head.dataset.status = status;
    var badge = document.querySelector('#run-badge .badge');
    if (badge) { badge.textContent = status; badge.className = 'badge s-' + status; }
    var r = document.getElementById('run-reason');
    var label = document.getElementById('run-reason-label');
    if (r && reason !== undefined) {
      r.textContent = reason || '';
      r.hidden = label.hidden = !reason;
    }
  }

  // The stream replays the run's output from its start, then follows it live.
  while (out.firstChild) out.removeChild(out.firstChild);
  var es = new EventSource(head.dataset.stream);
  live.textContent = 'live';
  es.onmessage = function (e) {
    var d;
    try { d = JSON.parse(e.data); } catch (_) { return; }
    if (d.output) append(d.output.content, d.output.stream || 'stdout');
    if (d.status) setState(d.status.status, d.status.pending_reason);
    if (d.jobFinished) {
      es.close();
      var job = d.jobFinished.job || {};
      setState(job.status || 'ended');
      var exit = document.getElementById('run-exit');
      if (exit && job.result && job.result.returnCode !== null && job.result.returnCode !== undefined) {
        exit.textContent = String(job.result.returnCode);
      }
      live.textContent = 'ended';
      if (stopCharts) stopCharts();
      // The page again, now with the run's final record and charts.
      if (wasActive) setTimeout(function () { window.location.reload(); }, 1000);
    }
  };
  es.onerror = function () { live.textContent = 'reconnecting…'; };
  es.onopen = function () { live.textContent = 'live'; };
})();
