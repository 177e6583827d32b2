(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("gx-data").textContent);
  // Task colours: no red or amber (failures and retries) and green only last
  // (green means completed in the table above).
  var PALETTE = ["#4e79a7", "#76b7b2", "#b07aa1", "#9c755f", "#2a7f7a", "#a49ad1",
                 "#4b5d73", "#8f9e3f", "#d4a6c8", "#a0cbe8", "#79706e", "#59a14f"];
  var ROW = 30, BAR = 20, AXIS = 26, LABEL = 170, PAD = 18;
  var labels = document.getElementById("gx-lanes");
  var scroll = document.getElementById("gx-scroll");
  var tip = document.getElementById("gx-tip");
  var detail = document.getElementById("gx-detail");
  var zoom = 1, selected = -1;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function fmt(s) {
    if (s === 0) return "0";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " \u00b5s";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 0) + " ms";
    if (s < 60) return s.toFixed(2) + " s";
    return Math.floor(s / 60) + " min " + (s % 60).toFixed(0) + " s";
  }
  function step(span, px) {
    var raw = span / Math.max(px / 110, 1), p = Math.pow(10, Math.floor(Math.log10(raw)));
    var m = [1, 2, 5, 10].find(function (k) { return k * p >= raw; });
    return m * p;
  }
  function colour(bar) {
    if (bar[5] === 1) return D.colours.state.Failed;
    if (bar[5] === 2) return "url(#gx-hatch-retry)";
    if (bar[5] === 3) return "url(#gx-hatch-cancel)";
    return PALETTE[D.nodes[bar[3]][1] % PALETTE.length];
  }
  var KIND = ["gx-ok", "gx-failed", "gx-retried", "gx-cancelled"];
  var busy = D.lanes.map(function () { return [0, 0]; });
  D.bars.forEach(function (b) { busy[b[0]][0] += b[2] - b[1]; busy[b[0]][1] += 1; });

  function drawLabels() {
    var h = AXIS + D.lanes.length * ROW + 6, out = [];
    out.push('<svg width="' + LABEL + '" height="' + h + '">');
    out.push('<text x="12" y="17" class="gx-lane-sub">worker</text>');
    D.lanes.forEach(function (name, k) {
      var y = AXIS + k * ROW;
      out.push('<g class="gx-lane-name"><text class="gx-lane-label" x="12" y="' + (y + 13) +
        '">' + esc(name) + '</text><text class="gx-lane-sub" x="12" y="' + (y + 25) + '">' +
        busy[k][1] + " attempts \u00b7 " + (100 * busy[k][0] / D.span).toFixed(0) +
        '% busy</text></g>');
    });
    out.push("</svg>");
    labels.innerHTML = out.join("");
  }

  function draw() {
    var width = Math.max(scroll.clientWidth - 2, 400) * zoom, plot = width - PAD * 2;
    var h = AXIS + D.lanes.length * ROW + 6, span = D.span, out = [];
    var x = function (t) { return PAD + (t / span) * plot; };
    out.push('<svg xmlns="http://www.w3.org/2000/svg" class="gx-gantt" width="' + width +
      '" height="' + h + '">');
    out.push('<defs><pattern id="gx-hatch-retry" width="6" height="6" ' +
      'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" ' +
      'height="6" fill="#fbd38d"/><rect width="3" height="6" fill="' + D.colours.retry +
      '"/></pattern><pattern id="gx-hatch-cancel" width="6" height="6" ' +
      'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" ' +
      'height="6" fill="#d5dae0"/><rect width="3" height="6" fill="#9aa3ad"/></pattern></defs>');
    D.lanes.forEach(function (name, k) {
      out.push('<g class="gx-lane" data-lane="' + k + '"><rect x="0" y="' + (AXIS + k * ROW) +
        '" width="' + width + '" height="' + ROW + '" fill="' + (k % 2 ? "#fafbfc" : "#fff") +
        '"/></g>');
    });
    var s = step(span, plot);
    for (var t = 0; t <= span + 1e-9; t += s) {
      var gx = x(t).toFixed(1);
      out.push('<line x1="' + gx + '" x2="' + gx + '" y1="' + (AXIS - 6) + '" y2="' + h +
        '" stroke="#e3e7ec"/><text x="' + gx + '" y="14" text-anchor="middle">' +
        esc(fmt(t)) + "</text>");
    }
    out.push('<line x1="0" x2="' + width + '" y1="' + AXIS + '" y2="' + AXIS +
      '" stroke="#cfd6de"/>');
    // ok bars first, failures and retries on top: at 10,000 bars they must still show
    D.bars.forEach(function (b, i) { if (b[5] === 0) bar(b, i); });
    D.bars.forEach(function (b, i) { if (b[5] !== 0) bar(b, i); });
    function bar(b, i) {
      var x0 = x(b[1]), w = Math.max(x(b[2]) - x0, 1.5), y = AXIS + b[0] * ROW + (ROW - BAR) / 2;
      var cls = "gx-bar " + KIND[b[5]] + (b[3] === selected ? " gx-sel" : "");
      out.push('<rect class="' + cls + '" data-b="' + i + '" x="' + x0.toFixed(2) + '" y="' +
        y + '" width="' + w.toFixed(2) + '" height="' + BAR + '" rx="2" fill="' + colour(b) +
        '"/>');
    }
    out.push("</svg>");
    scroll.innerHTML = out.join("");
  }

  function describe(b) {
    var n = D.nodes[b[3]], err = b[6] >= 0 ? D.errors[b[6]] : null;
    var what = ["completed", "failed", "failed, retried", "cancelled"][b[5]];
    return {node: n, err: err, what: what,
            attempt: "attempt " + b[4] + " of " + n[3], lane: D.lanes[b[0]]};
  }
  function showTip(ev, b) {
    var d = describe(b);
    tip.innerHTML = "<b>" + esc(d.node[0]) + "</b> <span class=\"r\">(" +
      esc(D.tasks[d.node[1]]) + ")</span><br>" + esc(d.attempt) + " \u00b7 " + esc(d.what) +
      "<br>" + esc(d.lane) + " \u00b7 " + fmt(b[2] - b[1]) + ", started at +" + fmt(b[1]) +
      (d.err ? '<div class="e">' + esc(d.err[0]) + "</div>" : "");
    tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var r = tip.getBoundingClientRect();
    if (x + r.width > window.innerWidth - 8) x = ev.clientX - r.width - 14;
    if (y + r.height > window.innerHeight - 8) y = ev.clientY - r.height - 14;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function select(b) {
    selected = b ? b[3] : -1;
    scroll.querySelectorAll(".gx-bar").forEach(function (el) {
      el.classList.toggle("gx-sel", D.bars[+el.getAttribute("data-b")][3] === selected);
    });
    if (!b) { detail.style.display = "none"; return; }
    var d = describe(b), rows = [["task", D.tasks[d.node[1]]], ["final state", d.node[2]],
      ["this attempt", d.attempt + " \u00b7 " + d.what], ["worker", d.lane],
      ["started", "+" + fmt(b[1])], ["duration", fmt(b[2] - b[1])]];
    if (d.err) rows.push(["error", d.err[0]]);
    var html = "<h3>" + esc(d.node[0]) + "</h3><table>" + rows.map(function (r) {
      return "<tr><td>" + esc(r[0]) + "</td><td>" + esc(r[1]) + "</td></tr>";
    }).join("") + "</table>";
    if (d.err && d.err[1]) html += "<pre>" + esc(d.err[1]) + "</pre>";
    detail.innerHTML = html;
    detail.style.display = "block";
  }
  function barOf(ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-b");
    return i === null || i === undefined ? null : D.bars[+i];
  }
  scroll.addEventListener("mousemove", function (ev) {
    var b = barOf(ev);
    if (b) showTip(ev, b); else tip.style.display = "none";
  });
  scroll.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  scroll.addEventListener("click", function (ev) { select(barOf(ev)); });
  function setZoom(z) {
    var centre = (scroll.scrollLeft + scroll.clientWidth / 2) / Math.max(scroll.scrollWidth, 1);
    zoom = Math.min(Math.max(z, 1), 64);
    draw();
    scroll.scrollLeft = centre * scroll.scrollWidth - scroll.clientWidth / 2;
    document.getElementById("gx-zoom-level").textContent = zoom + "\u00d7";
  }
  document.getElementById("gx-zoom-in").addEventListener("click", function () {
    setZoom(zoom * 2);
  });
  document.getElementById("gx-zoom-out").addEventListener("click", function () {
    setZoom(zoom / 2);
  });
  document.getElementById("gx-zoom-fit").addEventListener("click", function () { setZoom(1); });
  var pending = 0;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(draw, 120);
  });
  if (!D.bars.length) {
    document.getElementById("gx-timeline").innerHTML =
      '<p class="muted">No attempt ran (every node was cached, skipped or cancelled).</p>';
    return;
  }
  var legend = document.getElementById("gx-legend"), shown = D.tasks.slice(0, 12);
  legend.insertAdjacentHTML("afterbegin", shown.map(function (name, t) {
    return '<span class="gx-task-key"><i style="background:' + PALETTE[t % PALETTE.length] +
      '"></i>' + esc(name) + "</span>";
  }).join("") + (D.tasks.length > shown.length ? "<span>…</span>" : ""));
  drawLabels();
  draw();
  // Links into the report: #first-failure, or #node=<name> (its last attempt).
  var hash = decodeURIComponent(location.hash.slice(1)), target = null;
  if (hash === "first-failure") {
    target = D.bars.find(function (b) { return b[5] === 1; });
  } else if (hash.indexOf("node=") === 0) {
    D.bars.forEach(function (b) { if (D.nodes[b[3]][0] === hash.slice(5)) target = b; });
  }
  if (target) { select(target); detail.scrollIntoView(); }
  document.body.setAttribute("data-gx-rendered", String(D.bars.length));
})();
