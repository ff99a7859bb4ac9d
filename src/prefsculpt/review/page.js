// The review page's script (served as /page.js, CSP script-src 'self'). Every dataset string goes
// into the page through textContent / value, never as markup. Talks only to the server it came from:
// GET api/data, GET api/concept?name=, POST api/decisions (with the page's X-Review-Token).
(function () {
  "use strict";
  // Every dataset string goes into the page through textContent / value: never as markup.
  var TOKEN = document.querySelector('meta[name="review-token"]').getAttribute("content");
  var COLS = [
    ["", "", false, "open the details"], ["rank", "#", true, "rank among hypotheses"],
    ["concept", "concept", true, "latent:<i>, cluster:<i>, named:<name>, or a built-in"],
    ["label", "label", true, "tokens where it fires most, and its characteristic phrase"],
    ["direction", "chosen has", true, "does the preferred (chosen) response have more or less of it"],
    ["d_z", "effect d_z", true, "paired effect size mean(d)/sd(d), d = chosen - rejected"],
    ["mean_diff", "mean d [95% CI]", true, "mean chosen - rejected difference with its interval"],
    ["q", "q", true, "Benjamini-Hochberg q-value"],
    ["half_a", "halves A / B", true, "effect on each half of the prompts; replicated when both agree"],
    ["length_effect", "length-ctrl", true, "effect at equal response length"],
    ["support", "support", true, "share of pairs where it fires on either side"],
    ["member_of", "cluster", true, "co-firing latent cluster it belongs to, or the cluster's size"],
    ["", "decision", false, "what training may learn of it: action, method, strength"]
  ];
  var PARAM_OF = {filter: ["share", "number", "share of pairs dropped (0-1)"],
                  steer: ["multiplier", "number", "steering multiplier m"],
                  inoculate: ["instruction", "text", "instruction C_u added to the prompt"]};
  var S = {rows: [], byConcept: new Map(), dec: new Map(), init: new Map(), order: [], details: new Map(),
           open: new Set(), sortKey: "rank", sortDesc: false, page: 0, data: null};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v === "") { return "\u2013"; }
    if (typeof v !== "number") { return String(v); }
    if (Number.isInteger(v) && Math.abs(v) < 1e7) { return String(v); }
    if (v !== 0 && Math.abs(v) < 1e-3) { return v.toExponential(1); }
    return String(Number(v.toPrecision(digits || 3)));
  }
  function fmtQ(v) {
    if (v === null || v === undefined) { return "\u2013"; }
    return v >= 1e-3 ? v.toFixed(3) : v.toExponential(1);
  }
  function blank(concept) { return {concept: concept, action: "allow", method: "score", strength: 0, note: ""}; }
  function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }
  function decOf(c) { return S.dec.get(c) || blank(c); }
  function changed(c) { return !same(decOf(c), S.init.get(c) || blank(c)); }

  // ------------------------------------------------------------------ load
  function load() {
    fetch("api/data", {credentials: "same-origin"}).then(function (r) { return r.json(); }).then(function (d) {
      S.data = d;
      var cols = d.table.columns;
      S.rows = d.table.rows.map(function (r) {
        var o = {};
        cols.forEach(function (c, i) { o[c] = r[i]; });
        o._text = [o.concept, o.label || "", o.member_of || ""].join(" ").toLowerCase();
        return o;
      });
      S.rows.forEach(function (r) { S.byConcept.set(r.concept, r); });
      d.decisions.forEach(function (e) {
        var x = Object.assign(blank(e.concept), e);
        S.dec.set(e.concept, x);
        S.init.set(e.concept, Object.assign({}, x));
        S.order.push(e.concept);
      });
      var meta = document.getElementById("meta");
      Object.keys(d.meta).forEach(function (k) { meta.appendChild(el("span", "", k + ": " + d.meta[k])); });
      var fam = document.getElementById("family");
      Array.from(new Set(S.rows.map(function (r) { return r.kind; }))).filter(Boolean).sort().forEach(function (k) {
        var o = el("option", "", k); o.value = k; fam.appendChild(o);
      });
      if (!S.rows.some(function (r) { return r.significant; })) { document.getElementById("sig").checked = false; }
      buildHeads();
      render();
      document.body.setAttribute("data-ready", "1");
    }).catch(function (err) { showErrors("Could not load the audit", [String(err)]); });
  }

  // ------------------------------------------------------------------ table
  function buildHeads() {
    var tr = document.getElementById("heads");
    COLS.forEach(function (c) {
      var th = el("th", c[2] ? "sortable" : "", c[1]);
      th.title = c[3];
      if (c[2]) {
        th.setAttribute("data-key", c[0]);
        th.addEventListener("click", function () {
          S.sortDesc = S.sortKey === c[0] ? !S.sortDesc : false;
          S.sortKey = c[0]; S.page = 0; render();
        });
      }
      tr.appendChild(th);
    });
  }
  function filtered() {
    var q = document.getElementById("q").value.trim().toLowerCase();
    var fam = document.getElementById("family").value, side = document.getElementById("side").value;
    var sig = document.getElementById("sig").checked, decided = document.getElementById("decided").checked;
    var out = S.rows.filter(function (r) {
      if (q && r._text.indexOf(q) < 0) { return false; }
      if (fam && r.kind !== fam) { return false; }
      if (side && String(r.direction) !== side) { return false; }
      if (sig && !r.significant) { return false; }
      if (decided && decOf(r.concept).action === "allow" && !changed(r.concept)) { return false; }
      return true;
    });
    var k = S.sortKey, sgn = S.sortDesc ? -1 : 1;
    out.sort(function (a, b) {
      var x = a[k], y = b[k];
      var nx = x === null || x === undefined, ny = y === null || y === undefined;
      if (nx || ny) { return nx === ny ? 0 : (nx ? 1 : -1); }  // missing values last either way
      if (typeof x === "string") { x = x.toLowerCase(); y = String(y).toLowerCase(); }
      return x < y ? -sgn : (x > y ? sgn : 0);
    });
    return out;
  }
  function render() {
    var rows = filtered(), size = parseInt(document.getElementById("pagesize").value, 10);
    var pages = Math.max(1, Math.ceil(rows.length / size));
    S.page = Math.min(S.page, pages - 1);
    var body = document.getElementById("rows");
    body.replaceChildren();
    rows.slice(S.page * size, (S.page + 1) * size).forEach(function (r) {
      body.appendChild(rowEl(r));
      if (S.open.has(r.concept)) { body.appendChild(detailRow(r)); }
    });
    document.querySelectorAll("#heads th").forEach(function (th) {
      var on = th.getAttribute("data-key") === S.sortKey;
      if (on) { th.setAttribute("aria-sort", S.sortDesc ? "descending" : "ascending"); } else { th.removeAttribute("aria-sort"); }
    });
    document.getElementById("empty").hidden = rows.length > 0;
    var from = rows.length ? S.page * size + 1 : 0, to = Math.min(rows.length, (S.page + 1) * size);
    document.getElementById("pageinfo").textContent = "Concepts " + from + "\u2013" + to + " of " + rows.length +
      " shown (" + S.rows.length + " concepts in the audit) \u00b7 page " + (S.page + 1) + " of " + pages;
    document.getElementById("prev").disabled = S.page === 0;
    document.getElementById("next").disabled = S.page >= pages - 1;
    updateChanged();
  }
  function numCell(tr, v, digits) { tr.appendChild(el("td", "n", fmt(v, digits))); }
  function rowEl(r) {
    var d = decOf(r.concept);
    var tr = el("tr", "row" + (r.significant ? "" : " ns") + " act-" + d.action + (changed(r.concept) ? " changed" : ""));
    tr.setAttribute("data-concept", r.concept);
    var t0 = el("td"), btn = el("button", "toggle", S.open.has(r.concept) ? "\u25be" : "\u25b8");
    btn.type = "button"; btn.title = "details"; btn.setAttribute("aria-expanded", String(S.open.has(r.concept)));
    btn.addEventListener("click", function () {
      if (S.open.has(r.concept)) { S.open.delete(r.concept); } else { S.open.add(r.concept); }
      render();
    });
    t0.appendChild(btn); tr.appendChild(t0);
    numCell(tr, r.rank);
    tr.appendChild(el("td", "concept", r.concept));
    tr.appendChild(el("td", "lbl", r.label || ""));
    var dir = r.direction > 0 ? "\u25b2 more" : (r.direction < 0 ? "\u25bc less" : "none");
    tr.appendChild(el("td", "side " + (r.direction > 0 ? "up" : (r.direction < 0 ? "down" : "")), dir));
    numCell(tr, r.d_z);
    tr.appendChild(el("td", "n", fmt(r.mean_diff) + " [" + fmt(r.ci_low) + ", " + fmt(r.ci_high) + "]"));
    tr.appendChild(el("td", "n", fmtQ(r.q)));
    var th = el("td", "n", fmt(r.half_a, 2) + " / " + fmt(r.half_b, 2) + " ");
    th.appendChild(el("span", "chip" + (r.replicated ? " yes" : ""), r.replicated ? "replicated" : "not replicated"));
    tr.appendChild(th);
    numCell(tr, r.length_effect);
    numCell(tr, r.support, 2);
    tr.appendChild(el("td", "", r.member_of ? "in " + r.member_of : (r.n_members ? r.n_members + " latents" : "")));
    tr.appendChild(decisionCell(r, tr));
    return tr;
  }
  function option(sel, v) { var o = el("option", "", v); o.value = v; sel.appendChild(o); }
  function decisionCell(r, tr) {
    var td = el("td", "dec"), d = decOf(r.concept);
    var act = el("select", "action " + d.action); act.setAttribute("aria-label", "action for " + r.concept);
    S.data.actions.forEach(function (a) { option(act, a); }); act.value = d.action;
    var meth = el("select", "method"); meth.setAttribute("aria-label", "method for " + r.concept);
    S.data.methods.forEach(function (m) { option(meth, m); }); meth.value = d.method;
    var lam = el("input", "strength"); lam.type = "number"; lam.step = "any"; lam.min = "0";
    lam.title = "strength \u03bb \u2265 0"; lam.setAttribute("aria-label", "strength for " + r.concept);
    lam.value = d.strength === null || d.strength === undefined ? "" : String(d.strength);
    var l1 = el("div", "line"), l2 = el("div", "line");
    l1.appendChild(act); l1.appendChild(meth); l2.appendChild(el("span", "", "\u03bb")); l2.appendChild(lam);
    td.appendChild(l1); td.appendChild(l2);
    var p = PARAM_OF[d.method];
    if (p) {
      var inp = el("input", "param"); inp.type = p[1]; inp.placeholder = p[0]; inp.title = p[2];
      if (p[1] === "number") { inp.step = "any"; }
      inp.setAttribute("aria-label", p[0] + " for " + r.concept);
      l2.appendChild(el("span", "", p[0]));
      inp.value = d[p[0]] === undefined || d[p[0]] === null ? "" : String(d[p[0]]);
      inp.addEventListener("change", function () { update(r.concept, p[0], inp.value, p[1] === "number"); });
      l2.appendChild(inp);
    }
    var dim = function () { meth.disabled = lam.disabled = act.value === "allow"; };
    dim();
    act.addEventListener("change", function () {
      var x = update(r.concept, "action", act.value, false);
      if (x.action !== "allow" && !(x.strength > 0) && x.method !== "ablate") { update(r.concept, "strength", "1", true); }
      render();
    });
    meth.addEventListener("change", function () { update(r.concept, "method", meth.value, false); render(); });
    lam.addEventListener("change", function () { update(r.concept, "strength", lam.value, true); refreshRow(tr, r); });
    return td;
  }
  function update(concept, key, value, numeric) {
    var x = Object.assign({}, decOf(concept));
    if (numeric) {
      var f = Number(value);
      x[key] = value === "" ? null : (Number.isFinite(f) && value.trim() !== "" ? f : value);
    } else { x[key] = value; }
    if (key === "method") { ["share", "multiplier", "instruction"].forEach(function (k) { if (!PARAM_OF[value] || PARAM_OF[value][0] !== k) { delete x[k]; } }); }
    if (x[key] === null && key !== "strength") { delete x[key]; }
    S.dec.set(concept, x);
    if (S.order.indexOf(concept) < 0) { S.order.push(concept); }
    updateChanged();
    return x;
  }
  function refreshRow(tr, r) {
    tr.classList.toggle("changed", changed(r.concept));
  }
  function updateChanged() {
    var n = 0, active = 0;
    S.dec.forEach(function (d, c) { if (changed(c)) { n += 1; } if (d.action !== "allow") { active += 1; } });
    document.getElementById("changed").textContent = active + " concept(s) shaped \u00b7 " + n + " unsaved change(s)";
  }

  // ------------------------------------------------------------------ details
  function detailRow(r) {
    var tr = el("tr", "detail"), td = el("td");
    td.colSpan = COLS.length; tr.appendChild(td);
    var have = S.details.get(r.concept);
    if (have) { fillDetail(td, r, have); return tr; }
    td.textContent = "loading\u2026";
    fetch("api/concept?name=" + encodeURIComponent(r.concept), {credentials: "same-origin"})
      .then(function (x) { return x.json(); })
      .then(function (d) {
        S.details.set(r.concept, d);
        if (!r.label && d.label && d.label.label) {  // labelled when opened: show it in the row too
          r.label = d.label.label; r._text = [r.concept, r.label, r.member_of || ""].join(" ").toLowerCase();
          render(); return;
        }
        td.replaceChildren(); fillDetail(td, r, d);
      })
      .catch(function (err) { td.textContent = "could not load: " + err; });
    return tr;
  }
  function marked(parent, left, token, right) {
    parent.appendChild(document.createTextNode(left || ""));
    parent.appendChild(el("mark", "", token));
    parent.appendChild(document.createTextNode(right || ""));
    return parent;
  }
  function segs(parent, list) {
    (list || []).forEach(function (s) {
      parent.appendChild(s.mark ? el("mark", "", s.text) : document.createTextNode(s.text));
    });
    return parent;
  }
  function fillDetail(td, r, d) {
    var lab = d.label || {};
    if (lab.explanation) { td.appendChild(el("p", "expl", lab.explanation)); }
    if (lab.phrase) {
      var c = lab.phrase_counts, p = el("p", "phrase", "Characteristic phrase: ");
      p.appendChild(el("q", "", lab.phrase));
      p.appendChild(document.createTextNode(" in " + c.k_side + " of " + c.n_side + " top " + c.side +
        " windows" + (c.n_other ? ", " + c.k_other + " of " + c.n_other + " " + c.other : "") + "  (X = varies)"));
      td.appendChild(p);
    }
    var facts = "p " + fmtQ(r.p) + " \u00b7 length-controlled p " + fmtQ(r.length_p) + " \u00b7 pairs " + fmt(r.n);
    if (d.share_chosen_more !== null && d.share_chosen_more !== undefined) {
      facts += " \u00b7 chosen scores higher in " + Math.round(100 * d.share_chosen_more) + "% of pairs, rejected in " +
        Math.round(100 * d.share_rejected_more) + "%";
    }
    td.appendChild(el("p", "facts", facts));
    if (lab.tokens_chosen || lab.tokens_rejected) {
      var g = el("div", "grid2");
      [["chosen", lab.tokens_chosen, lab.contexts_chosen], ["rejected", lab.tokens_rejected, lab.contexts_rejected]].forEach(function (s) {
        var box = el("div");
        var h = el("h4", "", "Fires most in " + s[0] + " responses: ");
        (s[1] || []).forEach(function (t, i) {
          if (i) { h.appendChild(document.createTextNode(", ")); }
          h.appendChild(el("code", "tok", JSON.stringify(t[0]))); h.appendChild(document.createTextNode("\u00d7" + t[1]));
        });
        if (!(s[1] || []).length) { h.appendChild(el("i", "", "(none)")); }
        box.appendChild(h);
        (s[2] || []).forEach(function (x) { box.appendChild(marked(el("div", "ctx"), x.left, x.token, x.right)); });
        g.appendChild(box);
      });
      td.appendChild(g);
    }
    if (d.members && d.members.length) { td.appendChild(el("p", "facts", "Latents in this cluster: " + d.members.join(", "))); }
    if (d.where_detail.length) {
      td.appendChild(el("h4", "", "Where it concentrates (data clusters; mean d inside vs outside)"));
      d.where_detail.forEach(function (w) {
        td.appendChild(el("div", "facts", "cluster " + w.cluster + " (" + w.n + " pairs): mean d " + fmt(w.mean_in) +
          " vs " + fmt(w.mean_out) + ", Welch z " + fmt(w.welch_z) + (w.about ? " \u2014 " + w.about : "")));
      });
    }
    if (d.examples.length) {
      td.appendChild(el("h4", "", "Example pairs (firing tokens marked)"));
      d.examples.forEach(function (e) {
        var g3 = el("div", "grid3");
        var p0 = el("div", "box"); p0.appendChild(el("span", "cap", "prompt \u00b7 " + e.pair_id + " \u00b7 d = " + fmt(e.d)));
        var p1 = el("div", "box ch"); p1.appendChild(el("span", "cap", "chosen"));
        var p2 = el("div", "box rj"); p2.appendChild(el("span", "cap", "rejected"));
        segs(p0, e.prompt); segs(p1, e.chosen); segs(p2, e.rejected);
        g3.appendChild(p0); g3.appendChild(p1); g3.appendChild(p2); td.appendChild(g3);
      });
    }
    var nl = el("label", "facts", "Note: "), note = el("input", "note"); note.type = "text";
    note.value = decOf(r.concept).note || ""; note.placeholder = "why (saved with the decision)";
    note.addEventListener("change", function () { update(r.concept, "note", note.value, false); });
    nl.appendChild(note); td.appendChild(nl);
  }

  // ------------------------------------------------------------------ save
  function entries() {
    var seen = new Set(S.order), out = [];
    S.rows.forEach(function (r) { if (!seen.has(r.concept) && changed(r.concept)) { S.order.push(r.concept); seen.add(r.concept); } });
    S.order.forEach(function (c) {
      if (!S.init.has(c) && !changed(c)) { return; }  // touched and set back: leave it out
      var d = decOf(c), e = {concept: c, action: d.action, method: d.method, strength: d.strength, note: d.note || ""};
      ["share", "multiplier", "instruction"].forEach(function (k) { if (d[k] !== undefined && d[k] !== null && d[k] !== "") { e[k] = d[k]; } });
      out.push(e);
    });
    return out;
  }
  function showErrors(title, list) {
    var box = document.getElementById("messages"), m = el("div", "msg err");
    m.setAttribute("role", "alert");
    m.appendChild(el("b", "", title));
    var ul = el("ul"); list.forEach(function (t) { ul.appendChild(el("li", "", t)); }); m.appendChild(ul);
    box.replaceChildren(m);
  }
  function showSaved(res) {
    var box = document.getElementById("messages"), m = el("div", "msg ok");
    m.setAttribute("role", "status");
    m.appendChild(el("b", "", "Saved " + res.artifact + " (version " + res.version + ", " + res.n_entries + " entries, " + res.n_active + " shaping). "));
    m.appendChild(document.createTextNode("Train or search with it: "));
    var code = el("code", "ref", res.ref); m.appendChild(code);
    var cp = el("button", "", "copy"); cp.type = "button";
    cp.addEventListener("click", function () { if (navigator.clipboard) { navigator.clipboard.writeText(res.ref); } });
    m.appendChild(document.createTextNode(" ")); m.appendChild(cp);
    m.appendChild(el("div", "", "hash (sha256 of the canonical content, as training logs it): " + res.hash));
    box.replaceChildren(m);
  }
  function save() {
    var btn = document.getElementById("save");
    btn.disabled = true;
    fetch("api/decisions", {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Review-Token": TOKEN},
      body: JSON.stringify({concepts: entries()})})
      .then(function (r) { return r.json(); })
      .then(function (res) {
        if (!res.ok) { showErrors("Not saved: " + res.errors.length + " problem(s); fix them and save again", res.errors); return; }
        S.dec.forEach(function (d, c) { S.init.set(c, Object.assign({}, d)); });
        showSaved(res); render();
      })
      .catch(function (err) { showErrors("Not saved", [String(err)]); })
      .then(function () { btn.disabled = false; });
  }

  // ------------------------------------------------------------------ wiring
  ["q", "family", "side", "sig", "decided", "pagesize"].forEach(function (id) {
    var e = document.getElementById(id);
    e.addEventListener(id === "q" ? "input" : "change", function () { S.page = 0; render(); });
  });
  document.getElementById("prev").addEventListener("click", function () { S.page -= 1; render(); window.scrollTo(0, 0); });
  document.getElementById("next").addEventListener("click", function () { S.page += 1; render(); window.scrollTo(0, 0); });
  document.getElementById("save").addEventListener("click", save);
  var head = document.getElementById("top");
  var setHead = function () { document.documentElement.style.setProperty("--head", head.offsetHeight + "px"); };
  window.addEventListener("resize", setHead); setHead();
  window.addEventListener("beforeunload", function (ev) {
    var n = 0; S.dec.forEach(function (d, c) { if (changed(c)) { n += 1; } });
    if (n) { ev.preventDefault(); ev.returnValue = ""; }
  });
  load();
})();
