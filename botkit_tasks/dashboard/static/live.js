// Live refresh: every few seconds, fetch the page again and swap in the
// sections marked data-live, keeping open tracebacks open.  Without
// JavaScript the page is the same, only static.
(function () {
  "use strict";
  var main = document.querySelector("main[data-refresh]");
  if (!main || !window.fetch || !window.DOMParser) { return; }
  var every = parseFloat(main.getAttribute("data-refresh")) * 1000;
  if (!(every > 0)) { return; }
  var status = document.getElementById("live-status");
  function say(text, stale) {
    if (!status) { return; }
    status.textContent = text;
    status.className = stale ? "stale" : "";
  }
  function swap(doc) {
    var sections = document.querySelectorAll("[data-live]");
    for (var i = 0; i < sections.length; i++) {
      var old = sections[i];
      var fresh = doc.getElementById(old.id);
      if (!fresh) { continue; }
      var open = old.querySelectorAll("details[open][id]");
      for (var j = 0; j < open.length; j++) {
        var same = fresh.querySelector("#" + CSS.escape(open[j].id));
        if (same) { same.open = true; }
      }
      old.replaceWith(document.importNode(fresh, true));
    }
    var taken = doc.getElementById("taken-at");
    var here = document.getElementById("taken-at");
    if (taken && here) { here.replaceWith(document.importNode(taken, true)); }
  }
  function tick() {
    fetch(window.location.pathname, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        swap(new DOMParser().parseFromString(text, "text/html"));
        say("· live", false);
      })
      .catch(function (error) { say("· not updating (" + error.message + ")", true); })
      .then(function () { window.setTimeout(tick, every); });
  }
  say("· live", false);
  window.setTimeout(tick, every);
})();
